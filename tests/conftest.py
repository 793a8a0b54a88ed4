from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "kmgpu" / "samples"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def sample_pixels(name: str, step: int = 1) -> np.ndarray:
    """A bundled photo as (N, C) uint8 pixels, every ``step``-th row and column."""
    with Image.open(SAMPLES / name) as im:
        a = np.asarray(im.convert("L" if im.mode == "L" else "RGB"))
    a = a[::step, ::step]
    return np.ascontiguousarray(a.reshape(-1, 1 if a.ndim == 2 else 3))


@pytest.fixture
def coffee_small() -> np.ndarray:
    return sample_pixels("coffee.png", step=3)
