"""The paper's KAMIM sweep grid and the sweep's evaluation methods, as plain constants.

Kept apart from :mod:`kamim.experiments.sweep` (which imports torch) so that ``kamim sweep --help``
can show them as defaults without importing torch; :mod:`kamim.experiments.sweep` re-exports them.
"""
from __future__ import annotations

from kamim.config import SWEEP_EVAL_METHODS as EVAL_METHODS  # defined with SweepEval (kamim.config)

__all__ = ["PAPER_WEIGHT_PATCH_SIZES", "PAPER_TEMPERATURES", "EVAL_METHODS"]

PAPER_WEIGHT_PATCH_SIZES = (8, 16, 32)
PAPER_TEMPERATURES = (0.1, 0.25, 0.5, 1.0, 2.5)
