#!/usr/bin/env python
"""Compress the sample photos with kmgpu and its peers; print size, quality and time side by side.

Methods, each timed end to end (decode, quantize, encode) on the same files:

- ``kmgpu``: ``kmgpu.quantize`` + its palette PNG encoder, in this process, with the
  allocator setting the ``kmgpu`` command makes (``kmgpu.allocator``);
- ``pngquant``: ``pngquant --nofs --speed 3`` as a subprocess, when it is on PATH
  (Debian package ``pngquant``; a reference, not a dependency). It reads PNG only, so a JPEG
  is first converted to a lossless PNG, outside the timing;
- ``pillow-mc``: Pillow's median cut, saved by Pillow with ``optimize``;
- ``sklearn``: scikit-learn ``KMeans(n_init=1)`` on all pixels, the full fit that is the
  quality reference (PSNR only: its palette PNG is written by kmgpu's encoder).

PSNR and SSIM are measured on the decoded output files against the decoded input.

    python scripts/bench_compress.py            # samples, k = 16, 64, 256
    python scripts/bench_compress.py --quick    # one photo, k = 64
    python scripts/bench_compress.py --extra    # also the photos and graphics that ship with
                                                # scikit-image and scikit-learn (dev extra)
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kmgpu import quantize
from kmgpu.allocator import keep_freed_memory
from kmgpu.imageio import SAMPLES_DIR, load_image, palette_png_bytes
from kmgpu.metrics import psnr, ssim


def decoded(data: bytes, channels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("RGB"))
    return a[:, :, :1] if channels == 1 else a


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_kmgpu(path: Path, k: int, repeats: int, device: str) -> tuple[float, bytes]:
    def job():
        return quantize(path, k, device=device).png_bytes()

    job()  # warm-up
    return timed(job, repeats)


def run_pngquant(png: Path, k: int, repeats: int, work: Path) -> tuple[float, bytes]:
    out = work / "pngquant-out.png"
    cmd = ["pngquant", "--nofs", "--speed", "3", "--force", "--output", str(out), str(k), str(png)]
    return timed(lambda: (subprocess.run(cmd, check=True, capture_output=True), out.read_bytes())[1], repeats)


def run_pillow(path: Path, k: int, repeats: int) -> tuple[float, bytes]:
    def job():
        with Image.open(path) as im:
            q = im.convert("RGB").quantize(k, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        q.save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    return timed(job, repeats)


def run_sklearn(pixels: np.ndarray, k: int) -> bytes:
    from sklearn.cluster import KMeans

    h, w, c = pixels.shape
    flat = pixels.reshape(-1, c)
    centers = KMeans(k, n_init=1, random_state=0).fit(flat.astype(np.float32)).cluster_centers_
    palette = np.clip(np.round(centers), 0, 255).astype(np.uint8)
    d = ((flat[:, None, :].astype(np.int64) - palette[None].astype(np.int64)) ** 2).sum(-1)
    return palette_png_bytes(d.argmin(1).reshape(h, w).astype(np.uint8), palette)


# Images kmgpu is not tuned on: they ship with scikit-image and scikit-learn (the dev extra).
EXTRA = {
    "skimage": ["chelsea.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "motorcycle_left.png",
                "color.png", "logo.png"],
    "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
}  # fmt: skip


def extra_images() -> list[Path]:
    """The paths of ``EXTRA`` that are installed here."""
    import importlib.util

    found = []
    for package, names in EXTRA.items():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            print(f"{package} is not installed: its images are skipped")
            continue
        root = Path(spec.origin).parent
        found += [p for p in (root / ("data/" + n if package == "skimage" else n) for n in names) if p.exists()]
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="16,64,256")
    ap.add_argument(
        "--images",
        default="astronaut.png,camera.png,coffee.png,rocket.jpg",
        help="sample names or paths, comma-separated",
    )
    ap.add_argument("--extra", action="store_true", help="also the images of EXTRA (scikit-image, scikit-learn)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--quick", action="store_true", help="coffee.png at k=64, one repeat, no scikit-learn")
    args = ap.parse_args()
    if args.quick:
        args.k, args.images, args.repeats, args.no_sklearn = "64", "coffee.png", 1, True
    keep_freed_memory()  # as the kmgpu command does
    have_pngquant = shutil.which("pngquant") is not None
    if not have_pngquant:
        print("pngquant is not on PATH: its rows are skipped (apt-get install pngquant)")

    head = f"{'image':<22}{'k':>4}  {'method':<10}{'s':>7}{'s/MP':>7}{'bytes':>10}{'ratio':>7}"
    head += f"{'PSNR':>8}{'SSIM':>8}{'vs full':>9}{'vs pq':>8}"
    print(head)
    print("-" * len(head))
    totals: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = [Path(n) if "/" in n else SAMPLES_DIR / n for n in args.images.split(",")]
        for path in paths + (extra_images() if args.extra else []):
            name = path.name
            src = load_image(path)
            mp = src.width * src.height / 1e6
            png = path if path.suffix == ".png" else work / (path.stem + ".png")
            if png != path:
                Image.open(path).save(png)
            for k in (int(v) for v in args.k.split(",")):
                rows = [("kmgpu",) + run_kmgpu(path, k, args.repeats, args.device)]
                if have_pngquant:
                    rows.append(("pngquant",) + run_pngquant(png, k, args.repeats, work))
                rows.append(("pillow-mc",) + run_pillow(path, k, args.repeats))
                full = None
                if not args.no_sklearn:
                    full = psnr(src.pixels, decoded(run_sklearn(src.pixels, k), src.pixels.shape[2]))
                pq_bytes = len(rows[1][2]) if have_pngquant else None
                for method, seconds, data in rows:
                    out = decoded(data, src.pixels.shape[2])
                    q, s = psnr(src.pixels, out), ssim(src.pixels, out)
                    vs_full = f"{q - full:+.3f}" if full is not None and math.isfinite(full) else ""
                    vs_pq = f"{len(data) / pq_bytes:.3f}" if pq_bytes else ""
                    print(
                        f"{name:<22}{k:>4}  {method:<10}{seconds:>7.3f}{seconds / mp:>7.2f}{len(data):>10,}"
                        f"{src.bytes_in / len(data):>7.2f}{q:>8.2f}{s:>8.4f}{vs_full:>9}{vs_pq:>8}"
                    )
                    totals.setdefault((method, k), []).append((seconds, mp, len(data), q, full))
    print(
        "\nper k, over the images: s/MP (total time over total megapixels), total bytes, "
        "mean PSNR and mean vs full over the images not reproduced losslessly"
    )
    for (method, k), vals in sorted(totals.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        s_mp = sum(v[0] for v in vals) / sum(v[1] for v in vals)
        lossy = [v for v in vals if math.isfinite(v[3])]
        vs = [v[3] - v[4] for v in lossy if v[4] is not None and math.isfinite(v[4])]
        vs_text = f"{statistics.mean(vs):+.3f}" if vs else ""
        mean_psnr = statistics.mean(v[3] for v in lossy) if lossy else math.inf
        print(
            f"  k={k:<4}{method:<10}{s_mp:>7.3f} s/MP {sum(v[2] for v in vals):>10,} B "
            f"{mean_psnr:>7.2f} dB {vs_text:>8}"
        )


if __name__ == "__main__":
    main()
