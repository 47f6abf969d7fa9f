"""Plots for the published tables, and the growth fit their notes quote."""
from __future__ import annotations

import warnings
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


def label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The published plots' common dress: axis labels, a small title, a light grid, a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def growth_exponent(n, values) -> float:
    """c of the least-squares fit value = a + b * N^c (b >= 0, c in [0, 3], residuals relative to the value),
    by scipy's curve_fit: the growth without the fixed part, which a absorbs. NaN with fewer than 3 sizes."""
    from scipy.optimize import OptimizeWarning, curve_fit

    n, y = np.asarray(n, float), np.asarray(values, float)
    if len(np.unique(n)) < 3:
        return float("nan")  # three parameters: two sizes fit any c
    x = n / n.max()  # the same c; b stays of the order of the values, which keeps the fit well conditioned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # about the covariance, which is not used
        (_, _, c), _ = curve_fit(lambda x, a, b, c: a + b * x**c, x, y, p0=(y.min(), y.max() - y.min(), 1.0),
                                 sigma=np.maximum(np.abs(y), 1e-12), max_nfev=10_000,
                                 bounds=([-np.inf, 0.0, 0.0], [np.inf, np.inf, 3.0]))
    return float(c)



@contextmanager
def ratio_bars(path: Path, labels: list[str], ratios: dict[str, list[float]], xlabel: str, title: str):
    """Grouped horizontal bars, one group per label and one bar per series, with a line at 1 (the baseline);
    yields the axes (a caller may set a log scale), saved to `path` on leaving."""
    height = 0.8 / max(len(ratios), 1)
    with figure(path, figsize=(7.0, 0.45 * len(labels) + 1.5)) as (_, ax):
        for index, (series, values) in enumerate(ratios.items()):
            ax.barh([i + index * height for i in range(len(labels))], values, height=height, label=series)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        yield ax
