"""Per-image records, tables and pictures: what a run says it did."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .imageio import write_atomic

__all__ = ["ImageRecord", "Table", "contact_sheet", "sweep_chart", "write_csv"]


@dataclass
class ImageRecord:
    """What happened to one image.

    Sizes are in bytes; ``ratio`` is input bytes over output bytes; ``ms`` is
    the time of the fit, the mapping and the encoding.
    """

    source: str
    output: str
    width: int
    height: int
    k: int
    colors: int
    bytes_in: int
    bytes_out: int
    ratio: float
    bpp: float
    psnr: float
    ssim: float
    ms: float

    @classmethod
    def of(cls, result, output: str, bytes_out: int, ms: float) -> ImageRecord:
        """Build the record of a :class:`kmgpu.quantize.QuantizedImage` written to ``output``."""
        from .metrics import bits_per_pixel  # here: kmgpu report reads tables without torch

        src = result.source
        return cls(
            source=str(src.path) if src.path else "",
            output=output,
            width=src.width,
            height=src.height,
            k=result.k,
            colors=len(result.palette),
            bytes_in=src.bytes_in,
            bytes_out=bytes_out,
            ratio=src.bytes_in / bytes_out if src.bytes_in else math.nan,
            bpp=bits_per_pixel(bytes_out, src.width, src.height),
            psnr=result.psnr,
            ssim=result.ssim,
            ms=ms,
        )


class Table:
    """A plain text table: columns of (name, width, format), the first left-aligned.

    The format is a format spec (``",d"``, ``".2f"``); NaN prints empty and
    infinity as ``inf``.
    """

    def __init__(self, columns: Sequence[tuple[str, int, str]]):
        self.columns = list(columns)

    def row(self, *cells) -> str:
        """The cells in their columns; a cell as wide as its column or wider still has a space before it."""
        parts = []
        for i, ((_, width, spec), cell) in enumerate(zip(self.columns, cells)):
            text = _fmt(cell, spec)
            if i == 0:
                parts.append(f"{text:<{width}}")
            else:
                parts.append(f"{text:>{width}}" if len(text) < width else " " + text)
        return "".join(parts).rstrip()

    def header(self) -> str:
        return self.row(*(name for name, _, _ in self.columns))


def _fmt(value, spec: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write dictionaries with the same keys as a CSV file, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _as_rgb(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> RGB Pillow image; transparency shown over a light checkerboard."""
    c = pixels.shape[2]
    color = np.repeat(pixels[:, :, :1], 3, axis=2) if c in (1, 2) else pixels[:, :, :3]
    if c in (2, 4):
        h, w = pixels.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        board = np.where(((yy // 8 + xx // 8) % 2)[:, :, None] == 0, 255, 204).astype(np.float64)
        a = pixels[:, :, -1:].astype(np.float64) / 255
        color = np.rint(color * a + board * (1 - a)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(color))


def contact_sheet(tiles: Sequence[tuple[np.ndarray, str]], *, tile_width: int = 360, columns: int = 3) -> Image.Image:
    """Images side by side, each with a caption below, on a white sheet.

    Parameters
    ----------
    tiles : sequence of (pixels (H, W, C) uint8, caption)
    """
    first = tiles[0][0]
    scale = min(1.0, tile_width / first.shape[1])
    tw, th = max(1, round(first.shape[1] * scale)), max(1, round(first.shape[0] * scale))
    font = _font(14)
    caption_h, pad = 24, 8
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (pixels, caption) in enumerate(tiles):
        x = pad + (i % cols) * (tw + pad)
        y = pad + (i // cols) * (th + caption_h + pad)
        sheet.paste(_as_rgb(pixels).resize((tw, th), Image.Resampling.LANCZOS), (x, y))
        draw.text((x, y + th + 4), caption, fill="black", font=font)
    return sheet


def sweep_chart(rows: Sequence[dict], title: str, path: str | os.PathLike) -> bool:
    """Draw PSNR and file size against k into ``path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ks = [r["k"] for r in rows]
    fig, left = plt.subplots(figsize=(7, 4), dpi=120)
    left.plot(ks, [r["psnr"] for r in rows], "o-", color="tab:blue")
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_xlabel("k (palette colors)")
    left.set_ylabel("PSNR (dB)", color="tab:blue")
    right = left.twinx()
    right.plot(ks, [r["bytes"] / 1000 for r in rows], "s--", color="tab:orange")
    right.set_ylabel("file size (kB)", color="tab:orange")
    left.set_title(title)
    left.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return True


def save_image(image: Image.Image, path: Path) -> None:
    """Write a Pillow image as PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
