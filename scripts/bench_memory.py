#!/usr/bin/env python
"""Peak memory of ``kmgpu compress`` against the size of one image.

Builds photos of growing size from a bundled sample (scaled up, with mild noise so that
their distinct colors grow as a real photo's do), compresses each in a fresh process, and
prints the peak RSS, the RSS of a process that only imports torch and kmgpu, and the bytes
per pixel above that baseline. Bounded memory means that last column stays flat (a few
bytes a pixel: the decoded image and its palette indices), not that it grows.

    python scripts/bench_memory.py                  # 3, 12 and 48 MP, k=64
    python scripts/bench_memory.py --megapixels 3,12
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_run import peak_rss_of  # noqa: E402

from kmgpu.imageio import SAMPLES_DIR  # noqa: E402


def build_photo(path: Path, megapixels: float, seed: int = 0) -> tuple[int, int]:
    with Image.open(SAMPLES_DIR / "coffee.png") as im:
        src = im.convert("RGB")
    scale = (megapixels * 1e6 / (src.width * src.height)) ** 0.5
    size = (round(src.width * scale), round(src.height * scale))
    a = np.asarray(src.resize(size, Image.Resampling.BICUBIC)).astype(np.int16)
    a += np.random.default_rng(seed).integers(-2, 3, a.shape, dtype=np.int16)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, compress_level=1)
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megapixels", default="3,12,48")
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    _, base, _ = peak_rss_of([sys.executable, "-c", "import torch, kmgpu.quantize"], env)
    print(f"baseline (python + torch + kmgpu imported): {base:,.0f} MiB")
    print(f"{'image':>14} {'MP':>6} {'peak MiB':>10} {'above base':>11} {'bytes/pixel':>12} {'wall s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in (float(v) for v in args.megapixels.split(",")):
            src, out = Path(tmp) / f"photo{mp:g}.png", Path(tmp) / f"photo{mp:g}_k.png"
            w, h = build_photo(src, mp)
            cmd = [sys.executable, "-m", "kmgpu", "compress", str(src), "--k", str(args.k), "-o", str(out)]
            wall, rss, _ = peak_rss_of(cmd, env)
            above = rss - base
            print(f"{f'{w}x{h}':>14} {w * h / 1e6:>6.1f} {rss:>10,.0f} {above:>11,.0f} "
                  f"{above * 2**20 / (w * h):>12.1f} {wall:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
