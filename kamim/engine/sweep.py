"""Moved to :mod:`kamim.experiments.sweep` (re-exported here for old imports; the lead removes this)."""
from kamim.experiments.sweep import *  # noqa: F401,F403
