"""Reading images into pixel arrays and writing palette PNGs atomically.

The K-means core never touches files; this module is the only one that does
image I/O.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "LoadedImage", "load_image", "save_palette_png", "sample_paths"]

SAMPLES_DIR = Path(__file__).with_name("samples")


class ImageReadError(ValueError):
    """A file that is not a readable image."""


@dataclass
class LoadedImage:
    """Decoded pixels of one image.

    Attributes
    ----------
    pixels : ndarray of shape (H, W, C), uint8
        C is 1 (grayscale) or 3 (RGB).
    path : Path or None
    bytes_in : int
        Size of the source file, 0 when there is none.
    """

    pixels: np.ndarray
    path: Path | None
    bytes_in: int

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Decode an image file, upright (EXIF orientation applied), as L or RGB uint8."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            mode = "L" if im.mode in ("1", "L", "I;16", "I") else "RGB"
            pixels = np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise ImageReadError(f"{p}: no such file") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{p}: not an image Pillow can read") from None
    except OSError as err:
        raise ImageReadError(f"{p}: cannot decode image ({err})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return LoadedImage(np.ascontiguousarray(pixels), p, p.stat().st_size)


def save_palette_png(path: str | os.PathLike, indices: np.ndarray, palette: np.ndarray) -> int:
    """Write a palette PNG atomically and return its size in bytes.

    Parameters
    ----------
    indices : ndarray of shape (H, W), integer
        Palette index of every pixel.
    palette : ndarray of shape (k, C), uint8
        C = 1 (gray levels) or 3 (RGB); k <= 256.
    """
    dest = Path(path)
    k = palette.shape[0]
    if not 1 <= k <= 256:
        raise ValueError(f"a palette PNG holds 1 to 256 colors, got {k}")
    rgb = np.repeat(palette, 3, axis=1) if palette.shape[1] == 1 else palette
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(rgb.astype(np.uint8).reshape(-1).tolist())
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            im.save(f, format="PNG")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest.stat().st_size


def sample_paths() -> list[Path]:
    """The public-domain photos shipped with the package (see samples/SOURCES.md)."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
