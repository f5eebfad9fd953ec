"""The paper's KAMIM sweep grid and the sweep's evaluation methods (defined in :mod:`kamim.config`
with :class:`kamim.config.SweepGrid` / :class:`kamim.config.SweepEval`; re-exported here, torch-free)."""
from __future__ import annotations

from kamim.config import PAPER_TEMPERATURES, PAPER_WEIGHT_PATCH_SIZES  # defined with SweepGrid
from kamim.config import SWEEP_EVAL_METHODS as EVAL_METHODS  # defined with SweepEval (kamim.config)

__all__ = ["PAPER_WEIGHT_PATCH_SIZES", "PAPER_TEMPERATURES", "EVAL_METHODS"]
