"""Moved to :mod:`kamim.runtime.sampler` (re-exported here for old imports)."""
from kamim.runtime.sampler import ResumableBatchSampler, SeededDataset, sample_seed  # noqa: F401

__all__ = ["sample_seed", "SeededDataset", "ResumableBatchSampler"]
