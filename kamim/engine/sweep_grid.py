"""Moved to :mod:`kamim.experiments.sweep_grid` (re-exported here for old imports; the lead removes this)."""
from kamim.experiments.sweep_grid import *  # noqa: F401,F403
