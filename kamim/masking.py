"""SimMIM random block masking."""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np

from kamim.backbone import to_hw

__all__ = ["MaskGenerator"]


class MaskGenerator:
    """SimMIM block mask: ``ceil(ratio * blocks)`` random ``mask_patch_size`` blocks, on the token grid.

    ``generator()`` returns a uint8 (H / model_patch, W / model_patch) mask, 1 = masked. At the
    defaults (192 px, 32 px blocks, 16 px tokens, ratio 0.6) exactly 22 of 36 blocks are masked.

    Randomness: pass a ``np.random.Generator`` to ``__call__``, or the generator's own one is used,
    seeded by ``seed``. The object is picklable; in a new process (e.g. a DataLoader worker) its own
    generator is re-derived from the worker's torch seed (which differs per worker and epoch and is
    reproducible under ``torch.manual_seed``) and ``seed``, so workers never draw identical masks.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 16,
        mask_ratio: float = 0.6,
        seed: int | None = None,
    ) -> None:
        self.input_size = to_hw(input_size, "input_size")
        self.mask_patch_size = to_hw(mask_patch_size, "mask_patch_size")[0]
        self.model_patch_size = to_hw(model_patch_size, "model_patch_size")[0]
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real) or not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}")
        if self.mask_patch_size % self.model_patch_size:
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must be divisible by model_patch_size {self.model_patch_size}"
            )
        if any(s % self.mask_patch_size for s in self.input_size):
            raise ValueError(
                f"input_size {self.input_size} must be divisible by mask_patch_size {self.mask_patch_size}"
            )
        self.mask_ratio = float(mask_ratio)
        self.seed = seed
        self.block_grid = (self.input_size[0] // self.mask_patch_size, self.input_size[1] // self.mask_patch_size)
        self.scale = self.mask_patch_size // self.model_patch_size
        self.token_count = self.block_grid[0] * self.block_grid[1]
        self.mask_count = int(math.ceil(self.token_count * self.mask_ratio))  # as SimMIM
        self._rng: np.random.Generator | None = None
        self._pid: int | None = None

    @property
    def grid_size(self) -> tuple[int, int]:
        """Shape of the returned mask: the model's token grid."""
        return self.block_grid[0] * self.scale, self.block_grid[1] * self.scale

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rng"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}, seed={self.seed})"
        )

    def _own_rng(self) -> np.random.Generator:
        if self._rng is None or self._pid != os.getpid():
            from torch.utils.data import get_worker_info

            entropy: Any = self.seed
            info = get_worker_info()
            if info is not None:  # DataLoader worker: torch's per-worker, per-epoch seed
                entropy = [info.seed] if self.seed is None else [info.seed, self.seed]
            self._rng = np.random.default_rng(entropy)
            self._pid = os.getpid()
        return self._rng

    def __call__(self, generator: np.random.Generator | None = None) -> np.ndarray:
        """Draw a mask: uint8 of shape ``grid_size`` (1 = masked)."""
        rng = self._own_rng() if generator is None else generator
        blocks = np.zeros(self.token_count, np.uint8)
        blocks[rng.permutation(self.token_count)[: self.mask_count]] = 1
        blocks = blocks.reshape(self.block_grid)
        return blocks.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
