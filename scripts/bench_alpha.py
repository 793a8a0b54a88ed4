#!/usr/bin/env python
"""Images with transparency: what the palette does to opaque and transparent pixels, and to the picture seen.

Five RGBA images made from the samples: three photo cut-outs with soft edges (a
mask blurred by 1, 2 and 4 pixels), anti-aliased text with a glow, and a photo
under a radial vignette of alpha. Each is quantized at k = 16, 64, 256:

- ``kmgpu``: as ``kmgpu run`` does it;
- ``mean-alpha``: without the rule that gives an entry the alpha of most of its
  pixels where those are opaque or fully transparent (``quantize._exact_alpha_extremes``),
  every entry's alpha the mean of its pixels';
- ``kmgpu-fs``: ``--dither fs``.

Columns: the PNG's bytes; PSNR over the four channels; "seen dB", the PSNR of the
two images composited on black, white and magenta (the mean of the three), which is
what a viewer sees; and the share of the opaque pixels that stay opaque and of the
fully transparent ones that stay fully transparent.

    python scripts/bench_alpha.py
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from kmgpu import quantize
from kmgpu.imageio import SAMPLES_DIR
from kmgpu.metrics import psnr

q = importlib.import_module("kmgpu.quantize")  # the module, not the function kmgpu exports


def cut_out(name: str, blur: float) -> np.ndarray:
    with Image.open(SAMPLES_DIR / name) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse([w * 0.15, h * 0.1, w * 0.85, h * 0.9], fill=255)
    draw.rectangle([w * 0.05, h * 0.6, w * 0.5, h * 0.95], fill=255)
    return np.dstack([rgb, np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)))])


def glowing_text() -> np.ndarray:
    im = Image.new("RGBA", (600, 300), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=72)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        font = ImageFont.load_default()
    for i, color in enumerate([(220, 40, 40), (40, 160, 60), (30, 80, 220)]):
        draw.text((20 + i * 10, 20 + i * 80), "kmgpu alpha", font=font, fill=color + (255,))
    return np.asarray(Image.alpha_composite(im.filter(ImageFilter.GaussianBlur(6)), im))


def vignette() -> np.ndarray:
    with Image.open(SAMPLES_DIR / "coffee.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((y - h / 2) / (h / 2), (x - w / 2) / (w / 2))
    return np.dstack([rgb, np.clip((1.2 - r) / 0.4 * 255, 0, 255).astype(np.uint8)])


def images() -> dict[str, np.ndarray]:
    return {
        "astronaut cut-out": cut_out("astronaut.png", 2),
        "rocket cut-out": cut_out("rocket.jpg", 1),
        "coffee cut-out": cut_out("coffee.png", 4),
        "text with glow": glowing_text(),
        "coffee vignette": vignette(),
    }


def seen_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of ``a`` and ``b`` (H, W, 4) composited on black, white and magenta, averaged."""
    out = []
    for bg in (np.zeros(3), np.full(3, 255.0), np.array([255.0, 0.0, 255.0])):
        ca, cb = (x[..., :3] * (x[..., 3:] / 255.0) + bg * (1 - x[..., 3:] / 255.0) for x in (a / 1.0, b / 1.0))
        out.append(10 * np.log10(255.0**2 / max(float(((ca - cb) ** 2).mean()), 1e-12)))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="16,64,256")
    args = ap.parse_args()
    rule = q._exact_alpha_extremes
    head = f"{'image':<20}{'k':>4}  {'method':<11}{'bytes':>9}{'PSNR':>8}{'seen dB':>9}{'opaque':>8}{'clear':>8}"
    print(head)
    print("-" * len(head))
    totals: dict[tuple[int, str], list] = {}
    for name, a in images().items():
        for k in (int(v) for v in args.k.split(",")):
            for method in ("kmgpu", "mean-alpha", "kmgpu-fs"):
                q._exact_alpha_extremes = (lambda *_: False) if method == "mean-alpha" else rule
                try:
                    result = quantize(a, k, dither="fs" if method == "kmgpu-fs" else "none")
                finally:
                    q._exact_alpha_extremes = rule
                b = result.reconstruct()
                opaque, clear = a[..., 3] == 255, a[..., 3] == 0
                row = (
                    len(result.png_bytes()),
                    psnr(result.source.pixels, b),  # the invisible color of transparent pixels zeroed
                    seen_psnr(a, b),
                    float((b[opaque][:, 3] == 255).mean()) if opaque.any() else 1.0,
                    float((b[clear][:, 3] == 0).mean()) if clear.any() else 1.0,
                )
                totals.setdefault((k, method), []).append(row)
                print(f"{name:<20}{k:>4}  {method:<11}{row[0]:>9,}{row[1]:>8.2f}{row[2]:>9.2f}"
                      f"{row[3]:>8.1%}{row[4]:>8.1%}")  # fmt: skip
    print("\nper k: total bytes; mean PSNR, seen dB, opaque kept and transparent kept")
    for (k, method), rows in totals.items():
        m = np.mean(rows, axis=0)
        print(f"  k={k:<4}{method:<11}{sum(r[0] for r in rows):>10,} B {m[1]:>7.2f} dB {m[2]:>7.2f} seen dB"
              f"{m[3]:>8.1%}{m[4]:>8.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
