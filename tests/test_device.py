import pytest
import torch

from kmgpu.device import DeviceError, chunk_budget_bytes, exact_float32_matmul, resolve_device


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "", "tpu"])
def test_bad_device_names(spec):
    with pytest.raises(DeviceError, match="is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


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
    with pytest.raises(DeviceError):
        resolve_device(f"cuda:{count + 3}")


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
