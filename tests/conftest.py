"""Shared pytest fixtures: real photographs, deterministic torch settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

# Tiny models run fastest (and most reproducibly) on one thread; the suite is many small ops.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """A few real RGB uint8 photographs shipped by scikit-image."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
