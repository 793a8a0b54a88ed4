#!/usr/bin/env python
"""Throughput and memory of ``kmgpu run`` on a folder, beside pngquant run in parallel.

Builds a folder of a few hundred PNGs from the bundled samples (crops and scales of
several sizes), then times, each in a fresh process:

- ``kmgpu run`` for each device (cpu, and cuda when present), with ``--batch-size 1
  --workers 0``, with batching and workers, and with the automatic defaults (the
  batch size and workers they chose in parentheses);
- ``pngquant --nofs --speed 3`` over the same files with as many parallel processes as
  there are CPU cores (``--pngquant-jobs``), when pngquant is on PATH.

Images/s and MP/s are over the whole process (start-up included) and, for kmgpu, also
over its loop alone (from summary.json). Peak memory is the largest process's peak RSS.
``--memory`` also runs a folder of 100 and one of 10,000 tiny images, to show that memory
does not grow with the number of images.

    python scripts/bench_run.py                 # 300 images, k=64
    python scripts/bench_run.py --images 60     # quicker
    python scripts/bench_run.py --memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kmgpu import bench  # noqa: E402
from kmgpu.metrics import psnr  # noqa: E402


def build_folder(folder: Path, count: int, tiny: bool = False) -> float:
    return bench.build_folder(folder, count, size=(32, 24) if tiny else None)


def peak_rss_of(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd``; return its wall time, the peak RSS (MiB) of its largest process, and the result."""
    wrapper = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " r.returncode, r.stderr[-2000:]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True, check=True)
    wall, rss_kib, code, err = json.loads(done.stdout.strip().splitlines()[-1])
    if code not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {err}")
    return wall, rss_kib / 1024, done


def run_kmgpu(folder: Path, out: Path, device: str, batch: int | None, workers: int | None, k: int) -> dict:
    """One ``kmgpu run``; ``batch`` and ``workers`` None leave them automatic."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "kmgpu", "run", str(folder), "--out", str(out), "--k", str(k), "--device", device]
    if batch is not None:
        cmd += ["--batch-size", str(batch), "--workers", str(workers)]
    cmd += ["--no-progress", "--no-resume", "--overwrite"]
    wall, rss, _ = peak_rss_of(cmd, env)
    summary = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "rss": rss, "summary": summary}


def run_pngquant(folder: Path, out: Path, jobs: int, k: int) -> dict:
    files = sorted(folder.rglob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    # pngquant is built with OpenMP: each of ``jobs`` processes would start a thread per core and
    # they would spin against each other (on 16 cores, 16 processes ran 0.6 MP/s). One each.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(i_path):
        i, path = i_path
        dest = out / f"{i:05d}.png"
        cmd = ["pngquant", "--nofs", "--speed", "3", "--force", "--output", str(dest), str(k), str(path)]
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        return path, dest

    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        pairs = list(pool.map(one, enumerate(files)))
    wall = time.perf_counter() - t0
    scores = []
    for src, dest in pairs:
        with Image.open(src) as a, Image.open(dest) as b:
            mode = "L" if a.mode == "L" else "RGB"
            scores.append(psnr(np.asarray(a.convert(mode)), np.asarray(b.convert(mode))))
    finite = [s for s in scores if np.isfinite(s)]
    return {"wall": wall, "psnr": float(np.mean(finite)), "bytes": sum(d.stat().st_size for _, d in pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pngquant-jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--memory", action="store_true", help="also compare 100 and 10,000 tiny images")
    args = ap.parse_args()

    import torch

    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "photos"
        mp = build_folder(folder, args.images)
        print(f"{args.images} images, {mp:.1f} MP, k={args.k}; {os.cpu_count()} CPU cores; torch {torch.__version__}")
        head = (
            f"{'run':<44}{'wall s':>8}{'img/s':>8}{'MP/s':>7}{'loop MP/s':>10}{'PSNR':>7}{'bytes':>12}{'peak MiB':>10}"
        )
        print(head)
        print("-" * len(head))
        for device in devices:
            runs = ((1, 0), (args.batch_size, 0), (1, args.workers), (args.batch_size, args.workers), (None, None))
            for batch, workers in runs:
                r = run_kmgpu(folder, work / "out", device, batch, workers, args.k)
                s = r["summary"]
                label = f"kmgpu {device} --batch-size {batch} --workers {workers}"
                if batch is None:
                    used = s["config"]
                    label = f"kmgpu {device} defaults ({used['batch_size']} / {used['workers']})"
                print(
                    f"{label:<44}{r['wall']:>8.2f}{args.images / r['wall']:>8.2f}{mp / r['wall']:>7.2f}"
                    f"{s['megapixels_per_second']:>10.2f}{s['psnr_mean']:>7.2f}{s['bytes_out']:>12,}{r['rss']:>10.0f}"
                )
        if shutil.which("pngquant"):
            q = run_pngquant(folder, work / "pq", args.pngquant_jobs, args.k)
            label = f"pngquant --nofs --speed 3, {args.pngquant_jobs} processes"
            print(
                f"{label:<44}{q['wall']:>8.2f}{args.images / q['wall']:>8.2f}{mp / q['wall']:>7.2f}"
                f"{'':>10}{q['psnr']:>7.2f}{q['bytes']:>12,}{'':>10}"
            )
        else:
            print("pngquant is not on PATH: skipped (apt-get install pngquant)")

        if args.memory:
            print("\npeak memory against folder size (tiny 32x24 images, cpu):")
            for count in (100, 10_000):
                tiny = work / f"tiny{count}"
                build_folder(tiny, count, tiny=True)
                r = run_kmgpu(tiny, work / f"tiny_out{count}", "cpu", args.batch_size, args.workers, 16)
                s = r["summary"]
                print(f"  {count:>6} images: peak {r['rss']:.0f} MiB, {s['images_done']} done, {r['wall']:.1f} s")


if __name__ == "__main__":
    main()
