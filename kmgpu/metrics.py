"""Quality and size measures of a quantized image."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["psnr", "bits_per_pixel"]


def psnr(original: np.ndarray, quantized: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all channel values on 0-255.

    Both arrays are uint8 of the same shape; identical images give ``inf``.
    """
    if original.shape != quantized.shape:
        raise ValueError(f"shapes differ: {original.shape} and {quantized.shape}")
    diff = original.astype(np.float64) - quantized.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def bits_per_pixel(n_bytes: int, width: int, height: int) -> float:
    """File size in bits per pixel."""
    return 8.0 * n_bytes / (width * height)
