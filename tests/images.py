"""Small real images in every format and mode, written to a folder for tests."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

from .conftest import SAMPLES


def photo(size=(96, 64)) -> Image.Image:
    """A crop of a bundled photo, resized: real colors, small enough to be fast."""
    with Image.open(SAMPLES / "coffee.png") as im:
        return im.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def png_info(data: bytes) -> dict:
    """IHDR fields and chunk names of a PNG file's bytes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, info = 8, [], {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append(kind.decode())
        if kind == b"IHDR":
            info.update(zip(("width", "height", "bit_depth", "color_type"), struct.unpack(">IIBB", body[:10])))
        if kind == b"PLTE":
            info["palette_len"] = n // 3
        if kind == b"tRNS":
            info["trns_len"] = n
        pos += 12 + n
    info["chunks"] = chunks
    return info


def with_alpha(im: Image.Image) -> Image.Image:
    """RGBA: a transparent band on the left, a half-transparent ramp in the middle."""
    a = np.asarray(im.convert("RGBA")).copy()
    w = a.shape[1]
    a[:, : w // 4, 3] = 0
    a[:, w // 4 : w // 2, 3] = np.linspace(40, 220, w // 2 - w // 4).astype(np.uint8)
    return Image.fromarray(a)


def exif_rotated_png(path: Path) -> Image.Image:
    """A PNG whose EXIF says 'rotate 90 degrees clockwise to display'; returns the upright image."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 10:] = (0, 0, 255)
    a[:3, :3] = (0, 255, 0)
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif.tobytes())
    return im.rotate(-90, expand=True)


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()
