"""The one on-disk cache directory every backend and suite shares: exported graphs, calibrated weights, stored
fp32 log-probabilities ($EXACTBENCH_CACHE, else ~/.cache/exactbench). Each user keys its own entries."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "EXACTBENCH_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "exactbench")
