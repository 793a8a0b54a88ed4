#!/usr/bin/env python
"""Dithered palette PNGs side by side: kmgpu's Floyd-Steinberg, Pillow's on the same palette, pngquant's.

Rows, on the same files and k:

- ``kmgpu``: no dithering (the default), for reference;
- ``kmgpu-fs``: ``--dither fs``, kmgpu's compiled error diffusion;
- ``pillow-fs``: Pillow's Floyd-Steinberg remap onto kmgpu's palette, written by
  kmgpu's encoder (what ``--dither fs`` did before session 16): the same palette,
  so the difference is the diffusion alone;
- ``pngquant`` (its default dithering) and ``pngquant-nofs``, ``--speed 3``,
  when pngquant is on PATH (a reference, not a dependency);
- with ``--ablate``, ``--dither fs`` with each of its four refinements undone in
  turn (``fs-no-atten``: the whole error passed on; ``fs-no-cap``; ``fs-no-dead``;
  ``fs-no-flat``: every pixel at full strength) and all four (``fs-plain``:
  serpentine Floyd-Steinberg as the textbook has it).

Dithering trades error per pixel for error that a viewer, who sees the average
of neighbouring pixels, does not see: besides PSNR and SSIM the table gives
"blur dB", the PSNR of the two images after the same Gaussian blur (sigma 1.5),
which rewards a local average kept and ignores the pixel noise that keeps it.
Times are one run each, decoding and encoding excluded (pngquant's include its own).

    python scripts/bench_dither.py                 # samples, k = 16, 64, 256
    python scripts/bench_dither.py --extra         # also scikit-image's and scikit-learn's photos
    python scripts/bench_dither.py --quick         # coffee.png at k = 64
    python scripts/bench_dither.py --extra --ablate --k 64
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import extra_images  # noqa: E402  (a sibling script, not a package)

from kmgpu import cpu_kernels, quantize  # noqa: E402
from kmgpu.imageio import SAMPLES_DIR, load_image, palette_png_bytes  # noqa: E402
from kmgpu.metrics import _blur, _gaussian_taps, psnr, ssim  # noqa: E402
from kmgpu.quantize import _pillow_fs  # noqa: E402


def blurred_psnr(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """PSNR of ``a`` and ``b`` (H, W, C) uint8, each channel blurred by the same Gaussian ('valid' region)."""
    taps = _gaussian_taps(2 * round(3 * sigma) + 1, sigma)
    sq, n = 0.0, 0
    for ch in range(a.shape[2]):
        d = _blur(torch.from_numpy(a[:, :, ch].astype(np.float64)), taps)
        d -= _blur(torch.from_numpy(b[:, :, ch].astype(np.float64)), taps)
        sq, n = sq + float((d * d).sum()), n + d.numel()
    return float("inf") if sq == 0 else 10 * np.log10(255.0**2 * n / sq)


# The settings each ablation row undoes (cpu_kernels' module constants, read at every call).
ABLATIONS = {
    "fs-no-atten": {"_DITHER_ATTENUATION": 1.0},
    "fs-no-cap": {"_DITHER_CAP_RMS": 1e9},
    "fs-no-dead": {"_DITHER_DEAD": 0.0},
    "fs-no-flat": {"_DITHER_FLAT_BELOW": 1e9},
}
ABLATIONS["fs-plain"] = {name: value for undone in ABLATIONS.values() for name, value in undone.items()}


def ablated(src, k: int, undone: dict) -> tuple[float, bytes]:
    """``--dither fs`` with the settings ``undone``: the seconds it took (the encoding excluded) and its PNG."""
    kept = {name: getattr(cpu_kernels, name) for name in undone}
    try:
        for name, value in undone.items():
            setattr(cpu_kernels, name, value)
        seconds, result = timed(quantize, src, k, dither="fs")
        return seconds, result.png_bytes()
    finally:
        for name, value in kept.items():
            setattr(cpu_kernels, name, value)


def decoded(data: bytes, channels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("RGB"))
    return a[:, :, :1] if channels == 1 else a


def timed(fn, *args, **kwargs):
    """(seconds, fn(*args, **kwargs))."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="16,64,256")
    ap.add_argument("--images", default="astronaut.png,camera.png,coffee.png,rocket.jpg", help="names or paths")
    ap.add_argument("--extra", action="store_true", help="also the photos of bench_compress.EXTRA")
    ap.add_argument("--quick", action="store_true", help="coffee.png at k=64")
    ap.add_argument("--ablate", action="store_true", help="also --dither fs with each refinement undone")
    args = ap.parse_args()
    if args.quick:
        args.k, args.images = "64", "coffee.png"
    have_pngquant = shutil.which("pngquant") is not None
    if not have_pngquant:
        print("pngquant is not on PATH: its rows are skipped (apt-get install pngquant)")
    quantize(SAMPLES_DIR / "coffee.png", 16, dither="fs")  # warm-up: the compiled kernels load once

    head = f"{'image':<22}{'k':>4}  {'method':<14}{'s/MP':>6}{'bytes':>11}{'PSNR':>8}{'SSIM':>8}{'blur dB':>9}"
    print(head)
    print("-" * len(head))
    totals: dict[tuple[int, str], list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(n) if "/" in n else SAMPLES_DIR / n for n in args.images.split(",")]
        for path in paths + (extra_images() if args.extra else []):
            src = load_image(path)
            a, c, mp = src.pixels, src.pixels.shape[2], src.width * src.height / 1e6
            png = Path(tmp) / (path.stem + ".png")
            Image.fromarray(a if c > 1 else a[:, :, 0]).save(png)
            data_in = png.read_bytes()
            for k in (int(v) for v in args.k.split(",")):
                rows = []
                for mode in ("none", "fs"):
                    seconds, result = timed(quantize, src, k, dither=mode)
                    rows.append(("kmgpu" if mode == "none" else "kmgpu-fs", seconds, result.png_bytes()))
                if args.ablate:
                    for name, undone in ABLATIONS.items():
                        rows.append((name, *ablated(src, k, undone)))
                plain = quantize(src, k)
                seconds, indices = timed(_pillow_fs, a, plain.palette)
                rows.append(("pillow-fs", seconds + plain.seconds, palette_png_bytes(indices, plain.palette)))
                if have_pngquant:
                    for flag in ([], ["--nofs"]):
                        cmd = ["pngquant", *flag, "--speed", "3", str(k), "-"]
                        seconds, done = timed(subprocess.run, cmd, input=data_in, capture_output=True, check=True)
                        rows.append(("pngquant" + ("-nofs" if flag else ""), seconds, done.stdout))
                for method, seconds, data in rows:
                    b = decoded(data, c)
                    q, s, blur = psnr(a, b), ssim(a, b), blurred_psnr(a, b)
                    print(f"{path.name:<22}{k:>4}  {method:<14}{seconds / mp:>6.2f}{len(data):>11,}"
                          f"{q:>8.2f}{s:>8.4f}{blur:>9.2f}")  # fmt: skip
                    totals.setdefault((k, method), []).append((seconds, mp, len(data), q, s, blur))
    print("\nper k: s/MP (total time over total megapixels), total bytes, mean PSNR, SSIM and blur dB")
    for (k, method), vals in totals.items():
        finite = [v for v in vals if np.isfinite(v[3]) and np.isfinite(v[5])]
        mean = [statistics.mean(v[i] for v in finite) if finite else float("inf") for i in (3, 4, 5)]
        print(
            f"  k={k:<4}{method:<14}{sum(v[0] for v in vals) / sum(v[1] for v in vals):>6.2f} s/MP"
            f"{sum(v[2] for v in vals):>11,} B {mean[0]:>7.2f} dB {mean[1]:.4f} {mean[2]:>7.2f} blur dB"
        )


if __name__ == "__main__":
    main()
