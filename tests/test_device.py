import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kmgpu.device import DeviceError, check_device, chunk_budget_bytes, exact_float32_matmul, resolve_device


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "", "tpu"])
def test_bad_device_names(spec):
    for check in (resolve_device, check_device):
        with pytest.raises(DeviceError, match="is not a device: use auto, cpu, cuda or cuda:N"):
            check(spec)


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="device='cuda' was asked for, but .*use --device cpu or auto"):
        resolve_device("cuda")


def test_missing_cuda_ordinal():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for check in (resolve_device, check_device):
        with pytest.raises(DeviceError):
            check(f"cuda:{count + 3}")


def test_the_launchers_check_accepts_what_resolves_and_starts_no_cuda():
    """``kmgpu run --nproc`` checks the device before its ranks take the GPUs, and holds no context."""
    for spec in ("auto", "cpu", None, *(["cuda", "cuda:0"] if torch.cuda.is_available() else [])):
        resolve_device(spec)
        check_device(spec)
    done = subprocess.run(
        [sys.executable, "-c", "import torch; from kmgpu.device import check_device; check_device('cuda' if "
         "torch.cuda.is_available() else 'auto'); print(torch.cuda.is_initialized())"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_cpu_budget_and_tf32_restored():
    assert chunk_budget_bytes(torch.device("cpu")) == 4 * 2**20
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_float32_matmul():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
