#!/usr/bin/env python
"""Throughput and memory of ``kmgpu run`` on a folder, beside pngquant run in parallel.

Builds a folder of a few hundred PNGs from the bundled samples (crops and scales of
several sizes), or takes yours (``--folder``), then times, each in a fresh process:

- ``kmgpu run`` for each device (cpu, and cuda when present), with ``--batch-size 1
  --workers 0``, with batching and workers, and with the automatic defaults (the
  batch size and workers they chose in parentheses);
- ``pngquant --nofs --speed 3`` over the same files with as many parallel processes as
  there are CPU cores (``--pngquant-jobs``), when pngquant is on PATH. pngquant reads only
  PNG: the images of a ``--folder`` in other formats are converted for it before the timing
  (kmgpu reads them as they are).

Images/s and MP/s are over the whole process (start-up included) and, for kmgpu, also
over its loop alone (from summary.json). Peak memory is the largest process's peak RSS.
``--repeats N`` runs every configuration N times, in rounds (each round runs them all once,
so that a slow minute of a shared machine falls on all alike), and shows medians. The
ratios #4 asks for follow the table: each setting's loop and wall throughput over
``--batch-size 1 --workers 0``, with the ratio of each round, and its wall over pngquant's.
``--memory`` also runs a folder of 100 and one of 10,000 tiny images, to show that memory
does not grow with the number of images.

    python scripts/bench_run.py                 # 300 images, k=64
    python scripts/bench_run.py --images 60     # quicker
    python scripts/bench_run.py --repeats 3     # medians of 3 interleaved rounds
    python scripts/bench_run.py --devices cuda --batch-size 64 --workers 4 --more-workers 8,12
    python scripts/bench_run.py --memory
    python scripts/bench_run.py --folder ~/photos --repeats 3   # your own images
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


def describe_folder(folder: Path, png_copies: Path) -> tuple[int, float, list[Path]]:
    """The images kmgpu would take under ``folder``: their count, megapixels, and each one as a PNG for
    pngquant (a PNG itself; any other format as a copy under ``png_copies``)."""
    from kmgpu.data import IMAGE_SUFFIXES

    count, pixels, pngs = 0, 0, []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                size = im.size
                if path.suffix.lower() != ".png":
                    # NAME.png, not STEM.png: a.jpg and a.ppm of one folder keep copies of their own
                    dest = png_copies / path.relative_to(folder).with_name(path.name + ".png")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    im.convert("RGBA" if "A" in im.getbands() else "RGB").save(dest, compress_level=1)
                else:
                    dest = path
        except (OSError, ValueError):  # kmgpu records it as a failure; not counted here
            continue
        count += 1
        pixels += size[0] * size[1]
        pngs.append(dest)
    return count, pixels / 1e6, pngs


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


def run_pngquant(files: list[Path], out: Path, jobs: int, k: int) -> dict:
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


def _row(label: str, runs: list[dict], images: int, mp: float) -> str:
    """One table row: the median of ``runs`` (walls, loop MP/s; bytes and PSNR are the same in each)."""
    wall = float(np.median([r["wall"] for r in runs]))
    last = runs[-1]
    loop = f"{np.median([r['loop'] for r in runs]):>10.2f}" if "loop" in last else f"{'':>10}"
    rss = f"{max(r['rss'] for r in runs):>10.0f}" if "rss" in last else f"{'':>10}"
    spread = f"{min(r['wall'] for r in runs):.1f}-{max(r['wall'] for r in runs):.1f}" if len(runs) > 1 else ""
    return (
        f"{label:<44}{wall:>8.2f}{images / wall:>8.2f}{mp / wall:>7.2f}{loop}"
        f"{last['psnr']:>7.2f}{last['bytes']:>12,}{rss}  {spread}"
    ).rstrip()


def _ratios(device: str, results: dict, pngquant: list[dict]) -> list[str]:
    """#4's ratios from the medians: batching and workers over --batch-size 1 --workers 0, and over pngquant."""
    base = results[(device, 1, 0)]
    lines = []
    for key, runs in results.items():
        if key[0] != device or key[1:] == (1, 0):
            continue
        label = "defaults" if key[1] is None else f"--batch-size {key[1]} --workers {key[2]}"
        loop = np.median([r["loop"] for r in runs]) / np.median([r["loop"] for r in base])
        wall = np.median([r["wall"] for r in base]) / np.median([r["wall"] for r in runs])
        per_round = ", ".join(f"{r['loop'] / b['loop']:.2f}" for r, b in zip(runs, base))
        per_round = f" ({per_round} by round)" if len(runs) > 1 else ""
        line = f"  {device} {label}: {loop:.2f}x loop{per_round}, {wall:.2f}x wall over batch 1 / workers 0"
        if pngquant:
            against = np.median([q["wall"] for q in pngquant]) / np.median([r["wall"] for r in runs])
            line += f"; {against:.2f}x pngquant's wall"
        lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="images of the folder built from the samples")
    ap.add_argument("--folder", type=Path, help="time this folder of images instead of one built from the samples")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--more-workers", default="", help="comma-separated worker counts also run at --batch-size")
    ap.add_argument("--pngquant-jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every run, interleaved; medians are shown")
    ap.add_argument("--memory", action="store_true", help="also compare 100 and 10,000 tiny images")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.folder is not None and not args.folder.is_dir():
        ap.error(f"--folder {args.folder}: not a folder")

    import torch

    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    has_pngquant = shutil.which("pngquant") is not None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.folder is None:
            folder = work / "photos"
            count, mp = args.images, build_folder(folder, args.images)
            pngs = sorted(folder.rglob("*.png"))
        else:
            folder = args.folder
            count, mp, pngs = describe_folder(folder, work / "png")
            if count == 0:
                ap.error(f"--folder {folder}: no images kmgpu reads")
        print(f"{count} images, {mp:.1f} MP, k={args.k}; {os.cpu_count()} CPU cores; torch {torch.__version__}")
        # Rounds, each running every configuration once: a slow minute of a shared machine falls
        # on all of them alike, and the medians over rounds are what the table shows.
        runs = [(1, 0), (args.batch_size, 0), (1, args.workers), (args.batch_size, args.workers), (None, None)]
        runs += [(args.batch_size, int(w)) for w in args.more_workers.split(",") if w.strip()]
        results: dict[tuple, list[dict]] = {(device, *run): [] for device in devices for run in runs}
        pngquant: list[dict] = []
        for _ in range(args.repeats):
            for device, batch, workers in results:
                r = run_kmgpu(folder, work / "out", device, batch, workers, args.k)
                s = r["summary"]
                r.update(loop=s["megapixels_per_second"], psnr=s["psnr_mean"], bytes=s["bytes_out"], config=s["config"])
                results[(device, batch, workers)].append(r)
            if has_pngquant:
                pngquant.append(run_pngquant(pngs, work / "pq", args.pngquant_jobs, args.k))
        rounds = f"; median of {args.repeats} rounds (wall range at the end)" if args.repeats > 1 else ""
        print(f"kmgpu: each run a fresh process{rounds}")
        head = (
            f"{'run':<44}{'wall s':>8}{'img/s':>8}{'MP/s':>7}{'loop MP/s':>10}{'PSNR':>7}{'bytes':>12}{'peak MiB':>10}"
        )
        print(head)
        print("-" * len(head))
        for (device, batch, workers), done in results.items():
            label = f"kmgpu {device} --batch-size {batch} --workers {workers}"
            if batch is None:
                used = done[-1]["config"]
                label = f"kmgpu {device} defaults ({used['batch_size']} / {used['workers']})"
            print(_row(label, done, count, mp))
        if has_pngquant:
            print(_row(f"pngquant --nofs --speed 3, {args.pngquant_jobs} processes", pngquant, count, mp))
        else:
            print("pngquant is not on PATH: skipped (apt-get install pngquant)")
        print("ratios (medians):")
        for device in devices:
            print("\n".join(_ratios(device, results, pngquant)))

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
