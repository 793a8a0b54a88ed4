#!/usr/bin/env python
"""Peak memory of ``kmgpu compress`` against the size of one image.

Builds photos of growing size from a bundled sample (scaled up, with mild noise so that
their distinct colors grow as a real photo's do), compresses each in a fresh process, and
prints the peak RSS, the RSS of a process that only imports torch and kmgpu, and the bytes
per pixel above that baseline. Bounded memory means that last column stays flat (a few
bytes a pixel: the decoded image and its palette indices), not that it grows.

    python scripts/bench_memory.py                  # 3, 12 and 48 MP, k=64
    python scripts/bench_memory.py --megapixels 3,12
    python scripts/bench_memory.py --megapixels "" --manifests 10000,100000,400000

``--manifests``: the memory of resuming a run of that many images. A folder of that many
(empty) outputs and a manifest of their records in two sorted runs, as a killed and resumed
run leaves it; a fresh process then prepares the resume (drops what is not done, sorts) and
finalizes the manifest, as ``kmgpu run`` does, and its peak RSS above one that only imports
kmgpu's run loop is printed. Flat means the sort spills to disk rather than hold the records.
"""

from __future__ import annotations

import argparse
import json
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


def build_run(out: Path, n: int) -> None:
    """``n`` outputs (empty files) under ``out`` and a manifest of their records, odd ones after even ones."""
    lines = []
    for i in range(n):
        rel = f"d{i // 1000:05d}/img_{i:08d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).touch()
        record = {"source": f"/data/photos/{rel[:-4]}.jpg", "output": rel, "src": 0, "input": f"{rel[:-4]}.jpg",
                  "width": 640, "height": 480, "k": 64, "colors": 64, "bytes_in": 123456, "bytes_out": 65432,
                  "ratio": 1.8868, "bpp": 1.7039, "psnr": 38.1234, "ssim": 0.961234, "ms": 71.23, "status": "ok",
                  "error": None, "notes": None}  # fmt: skip
        lines.append(json.dumps(record) + "\n")
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(lines[::2] + lines[1::2])


def resume_child(out: Path, n: int) -> None:
    """What a resumed ``kmgpu run`` does to the records of ``out`` before and after its loop."""
    from kmgpu import pipeline
    from kmgpu.config import RunConfig

    config = RunConfig()
    (out / pipeline.SETTINGS).write_text(json.dumps({key: getattr(config, key) for key in pipeline.OUTPUT_SETTINGS}))
    done = pipeline._prepare_output(out, config, resume=True, overwrite=False)
    pipeline._finalize_manifest(out / pipeline.MANIFEST)
    if len(done) != n or sum(1 for _ in pipeline.read_manifest(out / pipeline.MANIFEST)) != n:
        sys.exit(f"expected {n} images done and recorded, found {len(done)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megapixels", default="3,12,48")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--manifests", default="", help="comma-separated image counts of resumed runs")
    ap.add_argument("--resume-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.resume_child:
        return resume_child(args.resume_child, args.images)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    if args.manifests:
        _, base, _ = peak_rss_of([sys.executable, "-c", "import kmgpu.pipeline"], env)
        print(f"resuming a run: baseline (kmgpu.pipeline imported) {base:,.0f} MiB")
        print(f"{'images':>10} {'peak MiB':>10} {'above base':>11} {'wall s':>7}")
        for n in (int(v) for v in args.manifests.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                build_run(Path(tmp), n)
                wall, rss, _ = peak_rss_of([sys.executable, __file__, "--resume-child", tmp, "--images", str(n)], env)
                print(f"{n:>10,} {rss:>10,.0f} {rss - base:>11,.0f} {wall:>7.1f}")
    if not args.megapixels:
        return
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
