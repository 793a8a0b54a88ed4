"""The fused CUDA kernel (kmgpu/kernels.py): under Triton's interpreter on the CPU, and on a GPU where there is one."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kmgpu import kernels

from .conftest import needs_cuda

ROOT = Path(__file__).resolve().parents[1]

# Checks shared by the interpreter run (CPU tensors) and the GPU run. Integer data: every
# distance is exact in float32, so labels and distances must equal torch's exactly, and ties
# (common with integers) must go to the lowest center index.
CHECKS = """
import torch
from kmgpu import kernels

def reference(x, c, ok, w):
    d = ((x[:, :, None].double() - c[:, None].double()) ** 2).sum(-1).float()
    d = d.masked_fill(~ok[:, None], float("inf"))
    dist, labels = d.min(-1)  # the first minimum: the lowest index among ties
    B, K, D = c.shape
    sx = torch.zeros(B, K, D, dtype=torch.float64, device=x.device)
    sx.scatter_add_(1, labels[..., None].expand(-1, -1, D), x.double() * w.double()[..., None])
    sw = torch.zeros(B, K, dtype=torch.float64, device=x.device).scatter_add_(1, labels, w.double())
    return labels, dist, sx, sw

def check_nearest(device):
    g = torch.Generator().manual_seed(0)
    ties = 0
    for D, K, N in ((1, 9, 300), (2, 40, 257), (3, 70, 600), (4, 33, 513)):
        x = torch.randint(0, 12, (2, N, D), generator=g).float().to(device)  # few values: many ties
        c = torch.randint(0, 12, (2, K, D), generator=g).float().to(device)
        ok = (torch.rand(2, K, generator=g) > 0.25).to(device)
        w = torch.randint(1, 50, (2, N), generator=g).float().to(device)
        labels, dist, sx, sw = kernels.nearest(x, c, ok, w)
        ref = reference(x, c, ok, w)
        assert torch.equal(labels, ref[0]) and torch.equal(dist, ref[1]), (D, K, N)
        torch.testing.assert_close(sx, ref[2], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sw, ref[3], rtol=0, atol=0)  # integer weights: exact
        only = kernels.nearest(x, c, ok)
        assert torch.equal(only[0], labels) and only[2] is None
        d = ((x[:, :, None] - c[:, None]) ** 2).sum(-1).masked_fill(~ok[:, None], float("inf"))
        ties += int(((d == dist[..., None]).sum(-1) > 1).sum())
    assert ties > 100  # the tie-break was exercised
"""

INTERPRETED = CHECKS + textwrap.dedent("""
    import os
    import numpy as np
    from kmgpu import kmeans
    from kmgpu.kmeans import assign

    assert kernels.usable(torch.zeros(1, 1, 3))
    try:
        kernels.nearest(torch.zeros(1, 3, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    except kernels.KernelUnavailable:  # older Tritons' interpreters cannot run it (3.6 could not)
        print("interpreter cannot run the kernel")
        raise SystemExit(0)
    check_nearest("cpu")

    # The engine runs through the kernel here; the generic path is the reference.
    rng = np.random.default_rng(3)
    pts = np.concatenate([rng.normal(m, 6, size=(120, 3)) for m in (30, 90, 160, 220)]).astype(np.float32)
    init = pts[::60][:8].copy()
    fits = {}
    for flag in ("1", "0"):
        os.environ["KMGPU_TRITON"] = flag
        fits[flag] = kmeans(pts, 8, init=init, max_iter=6, device="cpu")
    a, b = fits["1"], fits["0"]
    assert abs(float(a.inertia) - float(b.inertia)) <= 1e-3 * float(b.inertia)
    assert (a.labels == b.labels).float().mean() > 0.99
    colors = torch.randint(0, 256, (400, 3), dtype=torch.uint8).float()
    palette = torch.randint(0, 256, (20, 3), dtype=torch.uint8).float()
    os.environ["KMGPU_TRITON"] = "1"
    fused = assign(colors, palette)
    os.environ["KMGPU_TRITON"] = "0"
    generic = assign(colors, palette)
    assert torch.equal(fused[0], generic[0]) and torch.equal(fused[1], generic[1])
    print("interpreted kernel ok")
""")


def test_kernel_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "KMGPU_TRITON": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    if "interpreter cannot run the kernel" in done.stdout:
        pytest.skip("this Triton's interpreter cannot run the kernel (the GPU test covers it)")
    assert done.returncode == 0 and "interpreted kernel ok" in done.stdout, done.stderr[-3000:]


def test_falls_back_where_the_kernel_cannot_start(monkeypatch, coffee_small):
    """A Triton that cannot build the kernel (no compiler, say) leaves the generic path, same result."""
    from kmgpu import kmeans

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise kernels.KernelUnavailable("no C compiler")

    monkeypatch.setattr(kernels, "usable", lambda x: True)
    monkeypatch.setattr(kernels, "nearest", broken)
    a = kmeans(coffee_small, 8, seed=0, max_iter=5, device="cpu")
    monkeypatch.undo()
    b = kmeans(coffee_small, 8, seed=0, max_iter=5, device="cpu")
    assert calls and torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    # Refused before Triton is imported (under the interpreter flag, a CPU tensor could run it).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels.usable(torch.zeros(1, 1, 5))  # five channels
    monkeypatch.setenv("KMGPU_TRITON", "0")
    assert not kernels.usable(torch.zeros(1, 1, 3))


def test_kernel_shapes_refused():
    x = torch.zeros(1, 4, 5)
    with pytest.raises(ValueError, match="1 to 4 channels"):
        kernels.nearest(x, torch.zeros(1, 2, 5), torch.ones(1, 2, dtype=torch.bool))


@needs_cuda
@pytest.mark.cuda
def test_kernel_on_the_gpu():
    namespace: dict = {}
    exec(CHECKS, namespace)
    assert kernels.usable(torch.zeros(1, 1, 3, device="cuda"))
    namespace["check_nearest"]("cuda")


@needs_cuda
@pytest.mark.cuda
def test_cuda_quantize_measures_on_the_gpu():
    """PSNR and SSIM measured on the GPU equal the CPU's measure of the same result."""
    from PIL import Image

    from kmgpu.metrics import psnr, ssim
    from kmgpu.quantize import quantize_batch

    from .conftest import SAMPLES

    with Image.open(SAMPLES / "coffee.png") as im:
        rgb = im.convert("RGB")
    images = [rgb, rgb.convert("L"), rgb.convert("RGBA")]
    for r in quantize_batch(images, 16, device="cuda"):
        assert r.measured is not None
        rebuilt = r.palette[r.indices]
        assert r.measured[0] == pytest.approx(psnr(r.source.pixels, rebuilt), rel=1e-12)
        assert r.measured[1] == pytest.approx(ssim(r.source.pixels, rebuilt), abs=1e-12)
    assert np.isfinite(r.measured[0])
