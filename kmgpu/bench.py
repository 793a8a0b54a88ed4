"""``kmgpu bench``: CPU against GPU, against the hardware's limit and against the peers.

Three sections, measured in one process and one run:

1. **engine**: the assignment step (nearest of k centers for every point) and whole fits
   on batches of problems (B images x N pixels x k), on each device, with the fraction of
   the device's measured limits (a large copy for bandwidth; a large matrix product and an
   FP32 multiply-add loop for arithmetic);
2. **end_to_end**: the ``kmgpu run`` path over a folder, images/s and MP/s per device, and
   where the time goes (decode, colors, fit, assign, encode, metrics, write);
3. **peers**: scikit-learn's KMeans and MiniBatchKMeans, Pillow's median cut and fast
   octree, faiss's Kmeans and pngquant, when installed, on the same images at the same k:
   time and PSNR side by side. A peer that is not installed is marked skipped.

Times are medians of several repeats after a warm-up, with the spread (half the range);
CUDA work is synchronised around every timed region.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__
from .imageio import SAMPLES_DIR, load_image

__all__ = ["machine", "peak_rates", "bench_engine", "bench_end_to_end", "bench_peers", "build_folder", "run_bench"]

# Per point and center of the assignment step as kmgpu runs it (d = 3 color channels):
# the product [x, 1] . [-2c; |c|^2] is 2 (d + 1) flops, and the minimum over centers one
# more; bytes: the (n x k) float32 block written by the product and read by the minimum.
D = 3
FLOPS_PER_POINT_CENTER = 2 * (D + 1) + 1
BYTES_PER_POINT_CENTER = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median and spread (half the range) of ``repeats`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "spread": (max(times) - min(times)) / 2, "repeats": repeats}


def machine() -> dict:
    """CPU model and cores, GPU name and memory, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "kmgpu": __version__,
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


def peak_rates(device: torch.device, quick: bool) -> dict:
    """Measured limits of the device: copy bandwidth, matrix-product and multiply-add FP32 rates."""
    big = (64 if quick else 256) * 2**20 // 4 if device.type == "cpu" else 2**28
    src = torch.ones(big, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, 3 if quick else 5)
    copy = 2 * big * 4 / t["seconds"]
    n = 1024 if device.type == "cpu" and quick else (2048 if device.type == "cpu" else 8192)
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    from .device import exact_float32_matmul

    with exact_float32_matmul():
        t = timed(lambda: a @ b, device, 3)
    matmul = 2 * n**3 / t["seconds"]
    # A multiply-add loop on data that stays in cache (CPU) or in registers/L2 (GPU).
    m = 2**16 if device.type == "cpu" else 2**24
    x = torch.rand(m, device=device)
    y = torch.rand(m, device=device)
    steps = 200 if device.type == "cpu" else 100

    def fma_loop():
        z = x
        for _ in range(steps):
            z = torch.addcmul(y, z, y)
        return z

    t = timed(fma_loop, device, 3)
    fma = 2 * m * steps / t["seconds"]
    return {"copy_gbps": copy / 1e9, "matmul_tflops": matmul / 1e12, "fma_tflops": fma / 1e12}


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(1, 65536), (8, 16384)]
    if device.type == "cuda":
        return [(1, 1_000_000), (16, 262_144), (64, 1_000_000)]
    return [(1, 262_144), (16, 65_536)]


def bench_engine(device: torch.device, ks: list[int], quick: bool, peaks: dict, repeats: int) -> list[dict]:
    """Assignment-step rate and fits per second for a few batch shapes."""
    from .device import chunk_budget_bytes
    from .kmeans import _Assigner, kmeans

    rows = []
    gen = torch.Generator().manual_seed(0)
    for b, n in _shapes(device, quick):
        points = torch.randint(0, 256, (b, n, D), generator=gen).float().to(device)
        weights = torch.ones(b, n, device=device)
        for k in ks:
            centers = torch.randint(0, 256, (b, k, D), generator=gen).float().to(device)
            slot_ok = torch.ones(b, k, dtype=torch.bool, device=device)
            asg = _Assigner(points, weights, chunk_budget_bytes(device))
            t = timed(functools.partial(asg.run, centers, slot_ok, sums=True), device, repeats)
            point_iters = b * n / t["seconds"]
            flops = point_iters * k * FLOPS_PER_POINT_CENTER
            bytes_moved = point_iters * k * BYTES_PER_POINT_CENTER
            iters = 10
            fit_once = functools.partial(
                kmeans, points, k, weights, init=centers, max_iter=iters, tol=0.0, device=device
            )
            fit = timed(fit_once, device, max(1, repeats // 2))
            rows.append({
                "device": device.type,
                "batch": b,
                "points": n,
                "k": k,
                "assign_seconds": t["seconds"],
                "assign_spread": t["spread"],
                "pixel_iterations_per_second": point_iters,
                "gflops": flops / 1e9,
                "gbps": bytes_moved / 1e9,
                "fraction_of_fma_peak": flops / (peaks["fma_tflops"] * 1e12),
                "fraction_of_matmul_peak": flops / (peaks["matmul_tflops"] * 1e12),
                "fraction_of_copy_bandwidth": bytes_moved / (peaks["copy_gbps"] * 1e9),
                "fit_seconds": fit["seconds"],
                "fit_iterations": iters,
                "fits_per_second": b / fit["seconds"],
            })  # fmt: skip
    return rows


def build_folder(folder: Path, count: int, seed: int = 0, size: tuple[int, int] | None = None) -> float:
    """``count`` PNGs cut from the bundled samples at several scales (or all of ``size``); returns their megapixels."""
    rng = random.Random(seed)
    sources = []
    for name in ("astronaut.png", "coffee.png", "rocket.jpg", "camera.png"):
        with Image.open(SAMPLES_DIR / name) as im:
            sources.append(im.convert("L") if name == "camera.png" else im.convert("RGB"))
    pixels = 0
    for i in range(count):
        im = sources[i % len(sources)]
        scale = rng.choice([0.35, 0.5, 0.7, 1.0])
        w, h = size or (int(im.width * scale), int(im.height * scale))
        left, top = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        crop = im.crop((left, top, left + w, top + h))
        if size is None and rng.random() < 0.5:
            crop = crop.resize((int(w * 1.3), int(h * 1.3)), Image.Resampling.BICUBIC)
        sub = folder / f"set{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        crop.save(sub / f"img{i:05d}.png", compress_level=1)
        pixels += crop.width * crop.height
    return pixels / 1e6


def bench_end_to_end(device: torch.device, folder: Path, k: int, work: Path) -> dict:
    """The ``kmgpu run`` path over ``folder`` on ``device``: throughput and stage times."""
    from .config import RunConfig
    from .pipeline import run

    out = work / f"out-{device.type}"
    config = RunConfig(k=k, device=str(device))
    workers = config.worker_count(device.type)
    t0 = time.perf_counter()
    result = run([folder], out, config, resume=False, overwrite=True, progress=False, note=lambda m: None)
    wall = time.perf_counter() - t0
    s = result.summary
    stages = s.get("stage_seconds") or {}
    total = sum(stages.values()) or 1.0
    return {
        "device": device.type,
        "images": s["images_done"],
        "megapixels": s["megapixels"],
        "wall_seconds": wall,
        "images_per_second": s["images_per_second"],
        "megapixels_per_second": s["megapixels_per_second"],
        "psnr_mean": s["psnr_mean"],
        "bytes_in": s["bytes_in"],
        "bytes_out": s["bytes_out"],
        "workers": workers,
        "stage_seconds": stages,
        "stage_fractions": {name: value / total for name, value in stages.items()},
    }


def _peer_images(folder: Path | None, limit: int) -> list[Path]:
    if folder is None:
        return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in (".png", ".jpg"))
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]


def _rebuild(pixels: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The image made of a fitted palette (rounded to uint8), every pixel on its nearest color."""
    from .kmeans import assign

    palette = np.clip(np.round(centers), 0, 255).astype(np.uint8)
    labels, _ = assign(torch.from_numpy(pixels.reshape(-1, pixels.shape[2])), torch.from_numpy(palette).float())
    return palette[labels.numpy()].reshape(pixels.shape)


def bench_peers(images: list[Path], k: int, repeats: int, device: torch.device, quick: bool) -> list[dict]:
    """Time and PSNR of kmgpu and each installed peer, image by image, at the same k.

    PSNR is that of the mean squared error over all the images together, so that an image
    one method reproduces exactly does not drop out of its mean.
    """
    from .quantize import quantize

    def rgb_of(path: Path) -> np.ndarray:
        px = load_image(path).pixels
        px = np.ascontiguousarray(np.repeat(px, 3, axis=2) if px.shape[2] == 1 else px[:, :, :3])
        if quick:  # a tenth of a megapixel is enough to compare, and keeps --quick quick
            im = Image.fromarray(px)
            scale = min(1.0, (1e5 / (im.width * im.height)) ** 0.5)
            px = np.array(im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale)))))  # writable
        return px

    def sklearn(cls_name: str):
        def go(px):
            from sklearn import cluster
            from sklearn.exceptions import ConvergenceWarning

            model = getattr(cluster, cls_name)(k, n_init=1, random_state=0)
            with warnings.catch_warnings():  # fewer distinct colors than k: its result stands, as kmgpu's does
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(px.reshape(-1, 3).astype(np.float32))
            return _rebuild(px, model.cluster_centers_)

        return go

    def pillow(method):
        def go(px):
            return np.asarray(Image.fromarray(px).quantize(k, method=method, dither=Image.Dither.NONE).convert("RGB"))

        return go

    def faiss_kmeans(px):
        import faiss

        km = faiss.Kmeans(3, k, niter=20, seed=0, verbose=False)
        km.train(px.reshape(-1, 3).astype(np.float32))
        return _rebuild(px, km.centroids)

    def pngquant(px):
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.png", Path(tmp) / "out.png"
            Image.fromarray(px).save(src, compress_level=1)
            subprocess.run(["pngquant", "--nofs", "--speed", "3", "--force", "--output", str(dst), str(k), str(src)],
                           check=True, capture_output=True)  # fmt: skip
            with Image.open(dst) as im:
                return np.asarray(im.convert("RGB"))

    def ours(px):
        return quantize(px, k, device=device).reconstruct()

    has_sklearn = importlib.util.find_spec("sklearn") is not None
    peers = [
        ("kmgpu", True, ours),
        ("sklearn KMeans", has_sklearn, sklearn("KMeans")),
        ("sklearn MiniBatchKMeans", has_sklearn, sklearn("MiniBatchKMeans")),
        ("Pillow median cut", True, pillow(Image.Quantize.MEDIANCUT)),
        ("Pillow fast octree", True, pillow(Image.Quantize.FASTOCTREE)),
        ("faiss Kmeans", importlib.util.find_spec("faiss") is not None, faiss_kmeans),
        ("pngquant --nofs", shutil.which("pngquant") is not None, pngquant),
    ]
    pictures = [rgb_of(p) for p in images]
    megapixels = sum(p.shape[0] * p.shape[1] for p in pictures) / 1e6
    rows = []
    for name, available, fn in peers:
        if not available:
            rows.append({"method": name, "k": k, "status": "skipped", "reason": "not installed"})
            continue
        seconds, squared, values = 0.0, 0.0, 0
        for px in pictures:
            holder: dict = {}

            def once(px=px, holder=holder, fn=fn):
                holder["out"] = fn(px)

            seconds += timed(once, device, repeats, warmup=0)["seconds"]
            diff = px.astype(np.float64) - holder["out"].astype(np.float64)
            squared += float((diff * diff).sum())
            values += diff.size
        mse = squared / values
        rows.append({
            "method": name, "k": k, "status": "ok", "images": len(pictures), "megapixels": megapixels,
            "seconds": seconds, "seconds_per_megapixel": seconds / megapixels,
            "psnr": 10 * math.log10(255**2 / mse) if mse > 0 else None,
        })  # fmt: skip
    return rows


def run_bench(
    devices: list[torch.device],
    ks: list[int],
    *,
    images: Path | None = None,
    quick: bool = False,
    progress: bool = True,
) -> dict:
    """Every section, for every device; the JSON-ready result."""
    from tqdm import tqdm

    repeats = 3 if quick else 5
    steps = len(devices) * 3 + len(ks)
    bar = tqdm(total=steps, desc="kmgpu bench", disable=not progress, unit="step")
    result: dict = {"machine": machine(), "quick": quick, "ks": ks, "peaks": {}, "engine": [], "end_to_end": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = images
        if folder is None:
            folder = work / "images"
            build_folder(folder, 12 if quick else 300)
        for dev in devices:
            bar.set_postfix_str(f"{dev.type}: limits")
            result["peaks"][dev.type] = peak_rates(dev, quick)
            bar.update()
            bar.set_postfix_str(f"{dev.type}: engine")
            result["engine"] += bench_engine(dev, ks, quick, result["peaks"][dev.type], repeats)
            bar.update()
            bar.set_postfix_str(f"{dev.type}: end to end")
            result["end_to_end"].append(bench_end_to_end(dev, folder, 64 if 64 in ks else ks[0], work))
            bar.update()
        result["peers"] = []
        peer_images = _peer_images(images, 8)[: (2 if quick else 8)]
        for k in ks:
            bar.set_postfix_str(f"peers k={k}")
            result["peers"] += bench_peers(peer_images, k, 1 if quick else 3, devices[-1], quick)
            bar.update()
    bar.close()
    return result


def format_report(r: dict) -> str:
    """The tables a person reads."""
    m = r["machine"]
    lines = [f"machine: {m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads); "
             f"torch {m['torch']}, CUDA {m['cuda']}; kmgpu {m['kmgpu']}"]  # fmt: skip
    for gpu in m["gpus"]:
        lines.append(f"gpu: {gpu['name']}, {gpu['memory_gib']} GiB")
    lines.append(
        "\nmeasured limits: copy GB/s, FP32 matrix product TFLOP/s, FP32 multiply-add loop TFLOP/s\n"
        "  (the multiply-add loop runs eager PyTorch operations: on a CPU it is bound by memory and per-operation\n"
        "  overhead, so there the matrix product is the arithmetic limit to read against)"
    )
    for dev, p in r["peaks"].items():
        lines.append(
            f"  {dev:<5} copy {p['copy_gbps']:8.1f}   matmul {p['matmul_tflops']:7.3f}   fma {p['fma_tflops']:7.3f}"
        )
    lines.append(
        f"\nengine: assignment step ({FLOPS_PER_POINT_CENTER} flops and {BYTES_PER_POINT_CENTER} bytes per point "
        "and center), fits of 10 Lloyd steps"
    )
    if any(e["device"] == "cuda" for e in r["engine"]):
        lines.append(
            "  (on CUDA the fused kernel runs the step and writes no distance block: its GB/s and %copy\n"
            "  count the product path's traffic for the same work, a like-for-like rate, not bytes moved)"
        )
    lines.append(f"  {'dev':<5}{'B':>4}{'N':>9}{'k':>5}{'Gpix-it/s':>11}{'GFLOP/s':>9}{'%fma':>6}{'%matmul':>8}"
                 f"{'GB/s':>8}{'%copy':>6}{'fits/s':>9}")  # fmt: skip
    for e in r["engine"]:
        rate = e["pixel_iterations_per_second"] / 1e9
        lines.append(
            f"  {e['device']:<5}{e['batch']:>4}{e['points']:>9}{e['k']:>5}{rate:>11.3f}"
            f"{e['gflops']:>9.1f}{100 * e['fraction_of_fma_peak']:>6.1f}{100 * e['fraction_of_matmul_peak']:>8.1f}"
            f"{e['gbps']:>8.1f}{100 * e['fraction_of_copy_bandwidth']:>6.1f}{e['fits_per_second']:>9.2f}"
        )
    lines.append("\nend to end (kmgpu run): throughput and where the time goes (share of summed stage time)")
    for e in r["end_to_end"]:
        shares = ", ".join(
            f"{name} {100 * v:.0f}%" for name, v in sorted(e["stage_fractions"].items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"  {e['device']:<5} {e['images']} images, {e['megapixels']:.1f} MP: {e['images_per_second']:.2f} "
            f"images/s, {e['megapixels_per_second']:.2f} MP/s, PSNR {e['psnr_mean']:.2f} dB"
        )
        lines.append(f"        {shares}")
    lines.append(
        "\npeers on the same images: seconds per megapixel and PSNR of the pooled squared error\n"
        "  (in-process methods start from decoded pixels; pngquant's time includes its process start and PNG I/O)"
    )
    for p in r["peers"]:
        if p["status"] == "skipped":
            lines.append(f"  k={p['k']:<4}{p['method']:<26}skipped ({p['reason']})")
        else:
            q = "lossless" if p["psnr"] is None else f"{p['psnr']:.2f} dB"
            lines.append(f"  k={p['k']:<4}{p['method']:<26}{p['seconds_per_megapixel']:8.3f} s/MP  {q}")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=float)
