import io

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from kmgpu.metrics import bits_per_pixel, lossless_png_bytes, luma, psnr, ssim

from .conftest import SAMPLES


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "coffee.png", "rocket.jpg"])
@pytest.mark.parametrize("k", [4, 64])
def test_ssim_equals_scikit_image(name, k):
    with Image.open(SAMPLES / name) as im:
        rgb = im.convert("RGB")
    a = np.asarray(rgb)
    b = np.asarray(rgb.quantize(k, dither=Image.Dither.NONE).convert("RGB"))
    ref = structural_similarity(
        luma(a), luma(b), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(a, b) == pytest.approx(ref, abs=1e-9)


def test_identical_images():
    a = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")


def test_psnr_by_hand():
    a = np.zeros((2, 2, 1), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 10  # MSE = 100 / 4 = 25
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 25))


def test_tiny_images_have_an_ssim():
    a = np.random.default_rng(1).integers(0, 256, size=(5, 8, 1), dtype=np.uint8)
    assert -1 <= ssim(a, 255 - a) < ssim(a, a) == pytest.approx(1.0)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 3), np.uint8))


def test_sizes():
    a = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert lossless_png_bytes(a) == buf.tell()
    assert bits_per_pixel(1000, 100, 10) == 8.0
