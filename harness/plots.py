"""Plots for the published tables, and the growth fit their notes quote."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def figure(path: Path, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0)):
    """Yield (figure, axes) drawn off-screen; on leaving, lay out and save to `path` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def growth_exponent(n, values) -> float:
    """c of the least-squares fit value = a + b * N^c (c on a 0.01 grid in [0, 3], a and b by linear least
    squares, residuals relative to the value): the growth without the fixed part, which a absorbs."""
    n, y = np.asarray(n, float), np.asarray(values, float)
    weight = 1.0 / np.maximum(np.abs(y), 1e-12)
    best_c, best_residual = float("nan"), float("inf")
    for c in np.arange(0.0, 3.0 + 1e-9, 0.01):
        design = np.stack([np.ones_like(n), n**c], axis=1) * weight[:, None]
        coef, *_ = np.linalg.lstsq(design, y * weight, rcond=None)
        residual = float(((design @ coef - y * weight) ** 2).sum())
        if coef[1] >= 0 and residual < best_residual:
            best_c, best_residual = float(c), residual
    return best_c
