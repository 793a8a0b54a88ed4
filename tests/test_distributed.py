"""kmgpu run under torchrun: two CPU processes with the gloo backend."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kmgpu.data import Item
from kmgpu.distributed import Dist, from_environment, pixel_shard
from kmgpu.pipeline import MANIFEST, SUMMARY, read_manifest

from .conftest import needs_cuda
from .images import photo

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ARGS = ["--k", "16", "--device", "cpu", "--workers", "0", "--batch-size", "3", "--no-progress"]


def make_photos(root: Path, count: int = 14) -> None:
    base = np.asarray(photo((160, 120)))
    for i in range(count):
        sub = root / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        side = 40 + 20 * (i % 5)  # several sizes, so pixels and file counts disagree
        Image.fromarray(np.roll(base, 11 * i, axis=0)[:side, : side + 10]).save(sub / f"p{i:02d}.png")
    (root / "d1" / "broken.png").write_bytes(b"not a png")


def single(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kmgpu", "run", str(src), "--out", str(out), *ARGS], env=ENV,
                          capture_output=True, text=True)  # fmt: skip


def torchrun(nproc: int, src: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "kmgpu", "run", str(src), "--out", str(out), *ARGS]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True)


def lines(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "ms"} for r in read_manifest(out / MANIFEST)]


def same_outputs(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*.png")) and len(names) == 14
    for rel in names:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_two_processes_equal_one(tmp_path):
    src = tmp_path / "photos"
    make_photos(src)
    one = single(src, tmp_path / "one")
    two = torchrun(2, src, tmp_path / "two")
    assert one.returncode == 1 and two.returncode == 1, two.stderr[-3000:]  # the broken file
    same_outputs(tmp_path / "one", tmp_path / "two")
    assert lines(tmp_path / "one") == lines(tmp_path / "two")  # one merged manifest, same order
    assert not list((tmp_path / "two").glob("manifest.rank*"))
    s1 = json.loads((tmp_path / "one" / SUMMARY).read_text())
    s2 = json.loads((tmp_path / "two" / SUMMARY).read_text())
    for key in ("images_done", "images_failed", "bytes_in", "bytes_out", "psnr_mean", "ssim_mean"):
        assert s1[key] == s2[key], key
    assert s2["processes"] == 2 and [r["rank"] for r in s2["ranks"]] == [0, 1]
    assert sum(r["images_processed"] for r in s2["ranks"]) == 15
    assert all(r["images_processed"] > 0 for r in s2["ranks"])
    assert "2 processes" in two.stdout and "14 done, 1 failed" in two.stdout


def test_resume_with_another_process_count(tmp_path):
    src = tmp_path / "photos"
    make_photos(src)
    whole = tmp_path / "whole"
    single(src, whole)
    half = tmp_path / "half"
    single(src, half)
    records = list(read_manifest(half / MANIFEST))
    (half / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records[:6]))  # as if killed
    for r in records[6:]:
        if r["status"] == "ok":
            (half / r["output"]).unlink()
    touched = next(r for r in records[:6] if r["status"] == "ok")  # its source changed since: done again
    stamp = os.stat(touched["source"])
    os.utime(touched["source"], ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    resumed = torchrun(2, src, half)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "1 input(s) changed since they were done" in resumed.stderr + resumed.stdout
    summary = json.loads((half / SUMMARY).read_text())
    kept_ok = sum(r["status"] == "ok" for r in records[:6]) - 1  # a failure among them is tried again
    assert summary["images_skipped"] == kept_ok and summary["images_processed"] == 15 - kept_ok
    same_outputs(whole, half)
    assert [{k: v for k, v in r.items() if k != "mtime_ns"} for r in lines(whole)] == [
        {k: v for k, v in r.items() if k != "mtime_ns"} for r in lines(half)
    ]
    assert {r["output"]: r.get("mtime_ns") for r in lines(half)}[touched["output"]] == stamp.st_mtime_ns + 10**9


def item(i: int) -> Item:
    return Item(0, Path(f"/nowhere/{i}.png"), f"{i}.png", (0, f"{i}.png"))


def test_pixel_shard_is_contiguous_balanced_and_complete(tmp_path, monkeypatch):
    sizes = [1000, 10, 10, 10, 10, 10, 10, 10, 10, 10, 500, 500]
    monkeypatch.setattr("kmgpu.distributed._pixels", lambda it: sizes[int(it.rel.split(".")[0])])
    masks = [pixel_shard([item(i) for i in range(len(sizes))], rank, 3) for rank in range(3)]
    assert np.array_equal(np.sum(masks, axis=0), np.ones(len(sizes)))  # each image exactly once
    for m in masks:
        idx = np.nonzero(m)[0]
        assert idx.size and np.all(np.diff(idx) == 1)  # contiguous: walk order per rank
    loads = [sum(s for s, keep in zip(sizes, m) if keep) for m in masks]
    assert max(loads) - min(loads) <= 1000  # within one image of even, by pixels not count
    assert masks[0].sum() == 1  # the big image alone


def test_without_torchrun_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = from_environment()
    assert not ctx.active and ctx.is_main and ctx.device("auto") == "auto"
    assert ctx.gather({"x": 1}) == [{"x": 1}]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == Dist(3, 4, 1)


def nproc(src: Path, out: Path, *more: str, env: dict = ENV, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kmgpu", "run", str(src), "--out", str(out), *ARGS, *more, "--nproc", "2"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, **popen)


def test_nproc_is_torchrun_in_short(tmp_path):
    """The job's exit code is rank 0's (1: an image failed), and only kmgpu speaks: torchrun's notices (its
    OMP_NUM_THREADS banner, a line for the rank that exited 1) would bury the failure's own line."""
    src = tmp_path / "photos"
    make_photos(src, count=6)
    done = nproc(src, tmp_path / "o")
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.splitlines() == [f"kmgpu: error: {src / 'd1' / 'broken.png'}: not an image "
                                        "(no reader recognises its contents)"]  # fmt: skip
    summary = json.loads((tmp_path / "o" / SUMMARY).read_text())
    assert summary["processes"] == 2 and summary["images_done"] == 6 and summary["images_failed"] == 1


def test_nproc_says_bad_usage_once_with_exit_code_2(tmp_path):
    """What every rank would refuse is said once, before any process starts; what rank 0 finds in the
    output folder, by rank 0 alone. Before: the line twice, torchrun's notices, exit code 1."""
    src = tmp_path / "photos"
    make_photos(src, count=2)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("not a kmgpu run")
    cases = [
        (tmp_path / "missing", tmp_path / "o", (), "missing: no such file or folder"),
        (src, tmp_path / "o", ("--k", "999"), "k=999 is out of range: palette PNGs hold 2 to 256 colors"),
        (src, src / "o", (), f"--out {src / 'o'} is inside the source {src}: choose a folder outside it"),
        (src, tmp_path / "theirs", (), "is not empty and holds no kmgpu run"),  # found by rank 0
    ]
    for source, out, more, message in cases:
        done = nproc(source, out, *more)
        assert done.returncode == 2, done.stderr[-3000:]
        (line,) = done.stderr.splitlines()
        assert line.startswith("kmgpu: error: ") and message in line
    assert not (src / "o").exists() and (tmp_path / "theirs" / "notes.txt").read_text() == "not a kmgpu run"


def test_nproc_a_rank_killed_is_one_line(tmp_path):
    """A rank killed (the out-of-memory killer, say) ends the job with exit 1 and one line naming it."""
    src = tmp_path / "photos"
    make_photos(src, count=2)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\nif os.environ.get('RANK') == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = nproc(src, tmp_path / "o", env={**ENV, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"})
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = done.stderr.splitlines()
    assert line.startswith("kmgpu: error: rank 1 (pid ") and line.endswith(
        "was killed by SIGKILL; the images done so far are kept, the same command resumes"
    )


def test_nproc_stopped_by_sigterm_is_one_line(tmp_path):
    """A scheduler stops the job (SIGTERM to the launcher): torchrun stops the ranks, and the command
    ends with one line and 128 + 15, as a shell reports a command that SIGTERM ended (before: a traceback)."""
    src = tmp_path / "photos"
    make_photos(src, count=2)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # each rank says it has started, then waits to be stopped
        "import os, pathlib, time\nif 'RANK' in os.environ:\n"
        f"    pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK']).touch()\n    time.sleep(60)\n"
    )
    env = {**ENV, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "kmgpu", "run", str(src), "--out", str(tmp_path / "o"), *ARGS, "--nproc", "2"]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"rank{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.splitlines() == [
        "kmgpu: error: stopped by SIGTERM; the images done so far are kept, the same command resumes"
    ]


def test_backend_nccl_only_with_a_gpu_per_rank(monkeypatch):
    import torch

    ctx = Dist(1, 2, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ctx.backend(torch.device("cuda", 1)) == "nccl"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # two ranks share one GPU
    assert ctx.backend(torch.device("cuda", 0)) == "gloo"
    assert ctx.backend(torch.device("cpu")) == "gloo"


@needs_cuda
@pytest.mark.cuda
def test_two_ranks_on_cuda_equal_one_cuda_process(tmp_path):
    """`--nproc 2 --device cuda`: each rank takes the GPU of its LOCAL_RANK (two ranks on one GPU share it,
    over gloo; on two GPUs, one each, over NCCL) and the job writes what one CUDA process writes, byte for
    byte, each rank's device in summary.json."""
    src = tmp_path / "photos"
    make_photos(src)
    cmd = [sys.executable, "-m", "kmgpu", "run", str(src), "--out", str(tmp_path / "one"), *ARGS, "--device", "cuda"]
    one = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    two = nproc(src, tmp_path / "two", "--device", "cuda")
    assert one.returncode == 1 and two.returncode == 1, two.stderr[-3000:]  # the broken file
    same_outputs(tmp_path / "one", tmp_path / "two")
    assert lines(tmp_path / "one") == lines(tmp_path / "two")
    summary = json.loads((tmp_path / "two" / SUMMARY).read_text())
    assert [r["device"].split(":")[0] for r in summary["ranks"]] == ["cuda", "cuda"]
