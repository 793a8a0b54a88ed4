import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import kmgpu.imageio
import kmgpu.pipeline
import kmgpu.records
from kmgpu.cli import app
from kmgpu.pipeline import MANIFEST, SUMMARY, read_manifest

from .conftest import SAMPLES
from .images import encoded, photo, with_alpha

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def make_tree(root: Path) -> dict:
    """A small photo tree with every kind of input and every kind of trouble."""
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "ünï cödé dir").mkdir()
    base = photo((64, 48))
    deep = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    files = {
        "a.jpg": encoded(base, "JPEG", quality=90),
        "a.png": encoded(base, "PNG"),  # same stem as a.jpg: both must survive
        "nested/b.webp": encoded(base.rotate(90, expand=True), "WEBP", lossless=True),
        "nested/rgba.png": encoded(with_alpha(base), "PNG"),
        "nested/deeper/gray.png": encoded(base.convert("L"), "PNG"),
        "nested/deeper/deep16.png": encoded(deep, "PNG"),
        "ünï cödé dir/spaced name é.png": encoded(base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"),
        "broken/truncated.png": encoded(base, "PNG")[:150],
        "broken/empty.jpg": b"",
        "broken/text.jpg": b"I am not a JPEG",
        "notes.txt": b"not an image, not even named like one",
    }  # fmt: skip
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink(root, root / "nested" / "loop")  # a link back up: must not trap the walk
    return files


def run_cli(*args):
    return runner.invoke(app, ["run", *map(str, args), "--device", "cpu", "--no-progress"])


def records(out: Path) -> list[dict]:
    return list(read_manifest(out / MANIFEST))


def test_run_end_to_end(tmp_path):
    src = tmp_path / "photos"
    make_tree(src)
    result = run_cli(src, "--k", "16", "--batch-size", "3", "--workers", "2")
    assert result.exit_code == 1, result.output  # three broken files
    out = tmp_path / "photos_kmgpu"
    recs = records(out)
    by_output = {r["output"]: r for r in recs}
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(recs) == 10 and len(ok) == 7
    assert {"a.png", "a.jpg.png", "a.png.png"} & set(by_output) == {"a.jpg.png", "a.png.png"}
    assert "ünï cödé dir/spaced name é.png" in by_output
    for r in ok:
        path = out / r["output"]
        with Image.open(path) as im:
            assert im.mode == "P" and len(im.getcolors()) <= 16
            assert im.size == (r["width"], r["height"])
        assert path.stat().st_size == r["bytes_out"]
    errors = {r["output"]: r["error"] for r in recs if r["status"] == "error"}
    assert set(errors) == {"broken/truncated.png", "broken/empty.png", "broken/text.png"}
    assert "empty file" in errors["broken/empty.png"] and "not an image" in errors["broken/text.png"]
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["images_done"] == 7 and summary["images_failed"] == 3 and summary["images_listed"] == 10
    assert summary["bytes_out"] == sum(r["bytes_out"] for r in ok)
    assert summary["bytes_in"] == sum(r["bytes_in"] for r in ok)
    assert summary["config"]["k"] == 16 and summary["versions"]["torch"]
    # the effective settings: automatic writers resolved for the CPU
    assert summary["config"]["workers"] == 2 and summary["config"]["writers"] == 2
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert on_disk == sorted(r["output"] for r in ok)
    assert result.output.count("kmgpu: error:") == 3
    assert "7 done, 3 failed" in result.output
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 1 and "7 done, 3 failed" in report.output


def test_dataset_and_modern_formats_are_walked_and_decode(tmp_path):
    """Netpbm (many classic datasets), TGA, QOI, JPEG's other names and AVIF (where Pillow reads it) are
    inputs of a folder too, each quantized from its own pixels; names Pillow does not read stay left alone."""
    from PIL import features

    src = tmp_path / "data"
    src.mkdir()
    base = photo((48, 40))
    gray = base.convert("L")
    files = {
        "rgb.ppm": (base, "PPM"),
        "gray.pgm": (gray, "PPM"),
        "any.pnm": (base, "PPM"),
        "bits.pbm": (base.convert("1"), "PPM"),
        "deep.pgm": (Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PPM"),
        "t.tga": (base, "TGA"),
        "q.qoi": (base, "QOI"),
        "j.jfif": (base, "JPEG"),
        "j.jpe": (base.rotate(90, expand=True), "JPEG"),
    }
    if features.check("avif"):
        files["a.avif"] = (base, "AVIF")
    for name, (im, fmt) in files.items():
        im.save(src / name, format=fmt)
    (src / "left.psd").write_bytes(b"8BPS not read")  # a suffix outside the list: not an input
    result = run_cli(src, "--k", "16")
    assert result.exit_code == 0, result.output
    out = tmp_path / "data_kmgpu"
    recs = {r["source"]: r for r in records(out)}
    assert sorted(Path(s).name for s in recs) == sorted(files)
    assert not (out / "left.png").exists()
    for name in files:
        with Image.open(src / name) as im:
            # what a viewer shows of the source: 16-bit gray at 8 bits, the high byte
            source = np.asarray(im.convert("RGB") if im.mode != "I" else im.point(lambda v: v / 257).convert("RGB"))
        with Image.open(out / recs[str(src / name)]["output"]) as im:
            assert im.mode == "P" and len(im.getcolors()) <= 16
            got = np.asarray(im.convert("RGB"))
        assert got.shape == source.shape, name
        err = np.mean((got.astype(float) - source) ** 2)
        psnr = float("inf") if err == 0 else 10 * np.log10(255**2 / err)
        assert psnr > 28, (name, psnr)
        recorded = recs[str(src / name)]["psnr"]
        assert (recorded is None and psnr == float("inf")) or recorded == pytest.approx(psnr, abs=0.01), name
    assert recs[str(src / "j.jfif")]["output"] == "j.jfif.png"  # two names of one stem both kept
    with Image.open(out / "bits.png") as im:  # two colors: reproduced exactly
        assert np.array_equal(np.asarray(im.convert("L")), np.asarray(base.convert("1").convert("L")))


def test_the_psnr_line_says_when_every_image_was_reproduced_exactly(tmp_path):
    """Images of at most k colors come back exactly: no PSNR to average, which the summary says in words
    (before: "mean n/a dB, worst n/a dB"); one photo beside them brings the figures back."""
    src = tmp_path / "flat"
    src.mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(src / "red.png")
    Image.fromarray(np.asarray(photo((24, 24)).convert("1")).astype(np.uint8) * 255).save(src / "bits.png")
    exact = run_cli(src, "--k", "4")
    assert exact.exit_code == 0, exact.output
    assert "PSNR    every image reproduced exactly (2 lossless)" in exact.output.splitlines()
    assert [r["psnr"] for r in records(tmp_path / "flat_kmgpu")] == [None, None]
    photo((40, 30)).save(src / "photo.png")
    mixed = run_cli(src, "--k", "4")
    (line,) = [line for line in mixed.output.splitlines() if line.startswith("PSNR")]
    (psnr,) = [r["psnr"] for r in records(tmp_path / "flat_kmgpu") if r["output"] == "photo.png"]
    assert line == f"PSNR    mean {psnr:.2f} dB, worst {psnr:.2f} dB ({src / 'photo.png'}), 2 lossless"


def test_outputs_larger_than_their_input_are_counted_and_named(tmp_path):
    """A small JPEG's palette PNG can outweigh it: the summary counts such images and names the worst."""
    src = tmp_path / "photos"
    src.mkdir()
    base = photo((160, 120))
    (src / "big.png").write_bytes(encoded(base, "PNG"))  # a lossless PNG: its palette PNG is smaller
    (src / "q70.jpg").write_bytes(encoded(base, "JPEG", quality=70))
    (src / "q20.jpg").write_bytes(encoded(base, "JPEG", quality=20))
    result = run_cli(src, "--k", "64")
    assert result.exit_code == 0, result.output
    out = tmp_path / "photos_kmgpu"
    sizes = {
        p.name: (p.stat().st_size, (out / f"{p.name.rsplit('.', 1)[0]}.png").stat().st_size) for p in src.iterdir()
    }
    larger = {name for name, (size_in, size_out) in sizes.items() if size_out > size_in}
    assert "big.png" not in larger and len(larger) >= 1  # the files themselves say which, not this test
    worst = min(larger, key=lambda name: sizes[name][0] / sizes[name][1])
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["images_larger"] == len(larger)
    assert summary["ratio_worst_image"] == str(src / worst)
    assert summary["ratio_worst"] == pytest.approx(sizes[worst][0] / sizes[worst][1])
    noun = "image" if len(larger) == 1 else "images"
    assert f"larger  {len(larger)} {noun} came out larger than" in result.output and worst in result.output
    assert f"{len(larger)} {noun} came out larger" in runner.invoke(app, ["report", str(out)]).output
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "big.png").write_bytes(encoded(base, "PNG"))
    quiet = run_cli(alone, "--k", "64")
    assert quiet.exit_code == 0 and "came out larger" not in quiet.output
    assert json.loads((tmp_path / "alone_kmgpu" / SUMMARY).read_text())["images_larger"] == 0


def test_images_with_notes_are_counted_and_the_first_is_shown(tmp_path):
    """Notes (an animated image's first frame) live in the manifest; the summary counts the images that have
    one and shows the first, in walk order, so a run of thousands does not hide them."""
    src = tmp_path / "photos"
    src.mkdir()
    frames = [photo((40, 30)), photo((40, 30)).rotate(180)]
    for name in ("b.gif", "c.gif"):
        frames[0].save(src / name, save_all=True, append_images=frames[1:])
    photo((40, 30)).save(src / "a.png")
    result = run_cli(src, "--k", "8")
    assert result.exit_code == 0, result.output
    out = tmp_path / "photos_kmgpu"
    summary = json.loads((out / SUMMARY).read_text())
    first = f"{src / 'b.gif'}: animated image: only the first of 2 frames is used"
    assert summary["images_noted"] == 2 and summary["first_note"] == first
    line = f"notes   2 images have notes in the manifest, the first: {first}"
    assert line in result.output.splitlines() and line in runner.invoke(app, ["report", str(out)]).output
    noted = [r["source"] for r in records(out) if r.get("notes")]
    assert noted == [str(src / "b.gif"), str(src / "c.gif")]
    (src / "b.gif").unlink()
    (src / "c.gif").unlink()
    quiet = run_cli(src, "--k", "8", "--out", tmp_path / "quiet")
    assert quiet.exit_code == 0 and not any(line.startswith("notes") for line in quiet.output.splitlines())
    assert json.loads((tmp_path / "quiet" / SUMMARY).read_text())["images_noted"] == 0


def test_batching_and_workers_do_not_change_a_byte(tmp_path):
    src = tmp_path / "photos"
    make_tree(src)
    one = run_cli(src, "--out", tmp_path / "one", "--k", "8", "--batch-size", "1", "--workers", "0")
    many = run_cli(src, "--out", tmp_path / "many", "--k", "8", "--batch-size", "16", "--workers", "2")
    assert one.exit_code == many.exit_code == 1
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 7
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "many" / rel).read_bytes()


def ten_photos(src: Path) -> dict[str, int]:
    """s0 to s8 (1,200 to 1,520 pixels), and s4big (10,800) between s4 and s5 in walk order; their pixels."""
    src.mkdir()
    sizes = {}
    for i in range(9):
        photo((40, 30 + i)).save(src / f"s{i}.png")
        sizes[f"s{i}.png"] = 40 * (30 + i)
    photo((120, 90)).save(src / "s4big.png")
    sizes["s4big.png"] = 120 * 90
    return sizes


def log_fits(monkeypatch, calls: Path) -> Callable[[], list[list[str]]]:
    """Log the images of each batched fit to a file in ``calls`` (the fit may run in a forked worker);
    returns what reads the log back, in the order of the calls."""
    calls.mkdir()
    real = kmgpu.pipeline._fit

    def logged(samples, config, device, clock):
        (calls / f"{time.perf_counter_ns()}").write_text(" ".join(s.item.rel for s in samples))
        return real(samples, config, device, clock)

    monkeypatch.setattr(kmgpu.pipeline, "_fit", logged)
    return lambda: [p.read_text().split() for p in sorted(calls.iterdir(), key=lambda p: int(p.name))]


def assert_as_one_at_a_time(monkeypatch, src: Path, out: Path, tmp_path: Path) -> None:
    """The files and records in ``out`` are those of the images done one at a time (the patches undone)."""
    monkeypatch.undo()
    alone = run_cli(src, "--out", tmp_path / "alone", "--k", "8", "--workers", "0", "--batch-size", "1")
    assert alone.exit_code == 0
    assert comparable(out) == comparable(tmp_path / "alone")
    for p in (tmp_path / "alone").glob("*.png"):
        assert p.read_bytes() == (out / p.name).read_bytes()


def test_workers_fit_their_images_in_groups_capped_by_count_and_pixels(tmp_path, monkeypatch):
    """On the CPU each worker fits its images a group at a time, up to --batch-size of them or until they hold
    the group's pixel target (a photo over it goes alone, or with what waited before it); the files and
    records are those of one image at a time."""
    src = tmp_path / "photos"
    ten_photos(src)
    fits = log_fits(monkeypatch, tmp_path / "calls")
    monkeypatch.setattr(kmgpu.pipeline, "_WORKER_GROUP_PIXELS", 4000)
    grouped = run_cli(src, "--out", tmp_path / "g", "--k", "8", "--workers", "1", "--batch-size", "4")
    assert grouped.exit_code == 0, grouped.output
    # in walk order; a group ends at 4 images or once it holds 4,000 pixels (the image that crosses included)
    assert fits() == [["s0.png", "s1.png", "s2.png", "s3.png"], ["s4.png", "s4big.png"],
                      ["s5.png", "s6.png", "s7.png"], ["s8.png"]]  # fmt: skip
    assert_as_one_at_a_time(monkeypatch, src, tmp_path / "g", tmp_path)


@pytest.mark.parametrize("workers", ["0", "1"], ids=["main-process", "worker"])
def test_batches_never_pass_batch_pixels(tmp_path, monkeypatch, workers):
    """The command's batches (without workers, and on CUDA) and a CPU worker's groups hold at most
    --batch-size images and --batch-pixels pixels: a batch is sent before the image that would pass the cap
    (before: after it, so that two 12 MP photos made a 23 MP batch under a 16 MP cap); an image over the
    cap goes alone. The bytes are those of one image at a time."""
    src = tmp_path / "photos"
    sizes = ten_photos(src)
    fits = log_fits(monkeypatch, tmp_path / "calls")
    args = ["--k", "8", "--workers", workers, "--batch-size", "4", "--batch-pixels", "4000"]
    assert run_cli(src, "--out", tmp_path / "b", *args).exit_code == 0
    batches = fits()
    assert batches == [["s0.png", "s1.png", "s2.png"], ["s3.png", "s4.png"], ["s4big.png"],
                       ["s5.png", "s6.png"], ["s7.png", "s8.png"]]  # fmt: skip
    for batch, after in zip(batches, batches[1:]):
        assert len(batch) == 1 or sum(sizes[n] for n in batch) <= 4000
        assert sum(sizes[n] for n in [*batch, after[0]]) > 4000  # each as full as the cap allows
    assert_as_one_at_a_time(monkeypatch, src, tmp_path / "b", tmp_path)


def test_a_group_whose_fit_fails_is_fitted_again_image_by_image(tmp_path, monkeypatch):
    """One image that breaks the batched fit fails alone: the others of its worker's group are done."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(5):
        photo((40 + i, 30)).save(src / f"p{i}.png")
    real = kmgpu.pipeline._fit

    def fails_on_p2(samples, config, device, clock):  # in the forked worker
        if any(s.item.rel == "p2.png" for s in samples):
            raise RuntimeError("no fit for p2")
        return real(samples, config, device, clock)

    monkeypatch.setattr(kmgpu.pipeline, "_fit", fails_on_p2)
    result = run_cli(src, "--out", tmp_path / "o", "--k", "8", "--workers", "1", "--batch-size", "16")
    assert result.exit_code == 1 and result.output.count("kmgpu: error:") == 1
    status = {r["output"]: (r["status"], r["error"]) for r in records(tmp_path / "o")}
    assert status["p2.png"] == ("error", f"{src / 'p2.png'}: the fit failed (no fit for p2)")
    assert all(status[f"p{i}.png"] == ("ok", None) for i in (0, 1, 3, 4))
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["p0.png", "p1.png", "p3.png", "p4.png"]


def comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "ms"} for r in records(out)]


def _ctrl_c_as_in_a_terminal() -> None:
    """Let SIGINT raise in the child even where this suite runs with it ignored (a shell's background job:
    the child would inherit the SIG_IGN, keep it, as a program started so should, and run to the end)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sig", "workers", "group"),
    [
        pytest.param(signal.SIGKILL, "0", True, id="SIGKILL"),
        pytest.param(signal.SIGINT, "0", True, id="SIGINT"),
        pytest.param(signal.SIGTERM, "2", True, id="SIGTERM-to-the-group"),
        pytest.param(signal.SIGTERM, "2", False, id="SIGTERM-to-the-command"),
    ],
)
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, sig, workers, group):
    """SIGKILL at any moment; Ctrl-C (SIGINT to the whole process group), which says so in one line;
    SIGTERM (a scheduler's or `timeout`'s stop) to the whole group or to the command alone, which says
    so in one line and exits 143 (before: silently, status -15; with workers signalled too, torch's
    traceback of their deaths under the line)."""
    src = tmp_path / "photos"
    src.mkdir()
    base = np.asarray(photo((240, 160)))
    for i in range(36):
        sub = src / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(sub / f"img{i:02d}.png")
    args = ["--k", "64", "--device", "cpu", "--batch-size", "2", "--workers", workers, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "kmgpu", "run", str(src), *args]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        manifest = killed / MANIFEST
        if manifest.exists() and manifest.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    (os.killpg if group else os.kill)(proc.pid, sig)
    _, err = proc.communicate()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.decode().splitlines() == [
            "kmgpu: error: interrupted: the images done so far are kept; the same command resumes from there"
        ]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and err.decode().splitlines() == [
            "kmgpu: error: stopped by SIGTERM; the images done so far are kept, the same command resumes"
        ]
    lines_before = (killed / MANIFEST).read_text().count("\n")
    assert 5 <= lines_before < 36

    resumed = subprocess.run([*cmd, "--out", str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((killed / SUMMARY).read_text())
    assert summary["images_skipped"] >= lines_before - 1 and summary["images_done"] == 36
    assert summary["images_processed"] == 36 - summary["images_skipped"]

    whole = tmp_path / "whole"
    subprocess.run([*cmd, "--out", str(whole)], env=env, check=True, capture_output=True)
    assert comparable(killed) == comparable(whole)  # same lines, same order, none twice
    names = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(killed) for p in killed.rglob("*") if p.is_file())
    for rel in names:
        if rel.suffix == ".png":
            assert (killed / rel).read_bytes() == (whole / rel).read_bytes(), rel


def test_a_second_run_into_a_folder_in_use_is_refused_and_touches_nothing(tmp_path):
    """While a run holds its output folder, another into it is bad usage: it would delete the first one's
    temporaries and rewrite its manifest under it."""
    import fcntl

    src = tmp_path / "photos"
    src.mkdir()
    photo().save(src / "p.png")
    out = tmp_path / "o"
    assert run_cli(src, "--out", out, "--k", "8").exit_code == 0
    (out / ".p.png.abc.tmp").write_bytes(b"the first run's write, half done")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fd = os.open(out, os.O_RDONLY)  # as the first run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = run_cli(src, "--out", out, "--k", "8", "--no-resume", "--overwrite")
    finally:
        os.close(fd)
    assert second.exit_code == 2
    assert (
        second.output.strip()
        == f"kmgpu: error: {out} is in use by another kmgpu run: let it finish, or choose another --out"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = run_cli(src, "--out", out, "--k", "8")  # the folder is free again once its holder is gone
    assert again.exit_code == 0 and "1 skipped" in again.output and not (out / ".p.png.abc.tmp").exists()


def test_the_main_process_killed_alone_leaves_the_folder_free_at_once(tmp_path):
    """The out-of-memory killer takes the main process and its DataLoader workers live on for a few seconds:
    they do not hold the output folder, so the same command resumes at once."""
    src = tmp_path / "photos"
    src.mkdir()
    base = np.asarray(photo((240, 160)))
    for i in range(40):
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(src / f"img{i:02d}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "kmgpu", "run", str(src), "--out", str(out), "--k", "64", "--device", "cpu"]
    cmd += ["--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / MANIFEST).exists() and (out / MANIFEST).read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    workers = [
        int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ]
    proc.kill()
    proc.wait()
    try:
        assert workers and all(os.path.exists(f"/proc/{pid}") for pid in workers)  # alive, for now
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads((out / SUMMARY).read_text())["images_done"] == 40
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("inside_a_kernel", [False, True])
def test_ctrl_c_is_exit_130_wherever_it_lands(tmp_path, monkeypatch, inside_a_kernel):
    """A Ctrl-C that lands while a compiled (numba) kernel runs comes back from the kernel's call as a
    SystemError caused by the KeyboardInterrupt: it is an interruption all the same (one line, exit 130;
    the test above met it about one time in five). A SystemError of any other cause still raises."""
    import kmgpu.pipeline

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            if inside_a_kernel:
                message = "CPUDispatcher(<function _distinct>) returned a result with an exception set"
                raise SystemError(message) from err
            raise

    src = tmp_path / "photos"
    make_tree(src)
    monkeypatch.setattr(kmgpu.pipeline, "run", interrupted)
    result = run_cli(src, "--out", tmp_path / "o")
    assert result.exit_code == 130
    assert result.stderr.splitlines() == [
        "kmgpu: error: interrupted: the images done so far are kept; the same command resumes from there"
    ]

    def broken(*args, **kwargs):
        raise SystemError("something else")

    monkeypatch.setattr(kmgpu.pipeline, "run", broken)
    result = run_cli(src, "--out", tmp_path / "o")
    assert isinstance(result.exception, SystemError) and result.exit_code == 1


def test_half_written_and_missing_outputs_are_redone(tmp_path):
    src = tmp_path / "photos"
    make_tree(src)
    out = tmp_path / "o"
    assert run_cli(src, "--out", out, "--k", "8").exit_code == 1
    first = {r["output"]: r for r in records(out)}
    (out / "a.png.png").unlink()  # lost output
    (out / "nested" / ".rgba.png.x1y2.tmp").write_bytes(b"half")  # a write cut short
    again = run_cli(src, "--out", out, "--k", "8")
    assert again.exit_code == 1
    summary = json.loads((out / SUMMARY).read_text())
    # 6 ok outputs skipped; the lost one and the 3 broken files are tried again
    assert summary["images_skipped"] == 6 and summary["images_processed"] == 4
    assert not list(out.rglob("*.tmp"))
    now = {r["output"]: r for r in records(out)}
    assert list(now) == list(first)
    assert now["a.png.png"]["bytes_out"] == first["a.png.png"]["bytes_out"]


def test_inputs_changed_since_they_were_done_are_done_again(tmp_path):
    """A resume redoes an image whose source now has another size or modification time (edited, replaced,
    touched), and only those: the output and its record follow the new source, one line per image."""
    src, out = tmp_path / "photos", tmp_path / "o"
    src.mkdir()
    for i, size in enumerate([(64, 48), (40, 30), (50, 50)]):
        photo(size).rotate(90 * i).save(src / f"p{i}.png")
    assert run_cli(src, "--out", out, "--k", "8").exit_code == 0
    first = {r["output"]: r for r in records(out)}
    assert first["p0.png"]["mtime_ns"] == (src / "p0.png").stat().st_mtime_ns
    old_p1 = (out / "p1.png").read_bytes()

    photo((30, 20)).save(src / "p1.png")  # replaced by another picture
    stamp = (src / "p2.png").stat()
    os.utime(src / "p2.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # touched: same bytes
    again = run_cli(src, "--out", out, "--k", "8")
    assert again.exit_code == 0, again.output
    assert "2 input(s) changed since they were done: doing them again" in again.output
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["images_skipped"] == 1 and summary["images_processed"] == 2
    now = {r["output"]: r for r in records(out)}
    assert list(now) == ["p0.png", "p1.png", "p2.png"]  # one line each, in walk order
    assert now["p0.png"] == first["p0.png"]
    assert (now["p1.png"]["width"], now["p1.png"]["height"]) == (30, 20) and now["p1.png"] != first["p1.png"]
    assert (out / "p1.png").read_bytes() != old_p1 and now["p1.png"]["bytes_out"] == (out / "p1.png").stat().st_size
    with Image.open(out / "p1.png") as im:
        assert im.size == (30, 20)
    assert now["p2.png"]["mtime_ns"] == stamp.st_mtime_ns + 10**9
    assert "input(s) changed" not in run_cli(src, "--out", out, "--k", "8").output  # and then nothing is

    # A manifest of an older kmgpu holds no mtime_ns: the size alone is compared.
    lines = [{key: v for key, v in r.items() if key != "mtime_ns"} for r in records(out)]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in lines))
    os.utime(src / "p0.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 5 * 10**9))
    assert run_cli(src, "--out", out, "--k", "8").exit_code == 0
    assert json.loads((out / SUMMARY).read_text())["images_skipped"] == 3
    (src / "p0.png").write_bytes((src / "p0.png").read_bytes() + b"\0" * 7)  # 7 more bytes: another file
    assert "1 input(s) changed" in run_cli(src, "--out", out, "--k", "8").output


def pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_an_output_renamed_by_a_new_input_moves_and_leaves_no_stale_file(tmp_path):
    """``p.png`` alone writes ``p.png``; a ``p.jpg`` added beside it renames both outputs (``p.png.png``,
    ``p.jpg.png``). The resume ends as a fresh run over the new folder: the old ``p.png`` does not stay
    behind as a file no record names, also when the run that renamed it was killed before its end."""
    src, out, fresh = tmp_path / "photos", tmp_path / "o", tmp_path / "fresh"
    src.mkdir()
    photo((64, 48)).save(src / "p.png")
    photo((40, 30)).rotate(90).save(src / "q.png")
    assert run_cli(src, "--out", out, "--k", "8").exit_code == 0
    assert set(pngs(out)) == {"p.png", "q.png"}
    first_lines = (out / MANIFEST).read_text()
    old_p = (out / "p.png").read_bytes()

    photo((50, 40)).save(src / "p.jpg", quality=90)
    again = run_cli(src, "--out", out, "--k", "8")
    assert again.exit_code == 0, again.output
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["images_skipped"] == 1 and summary["images_processed"] == 2  # q kept; p.png moved, p.jpg new
    assert run_cli(src, "--out", fresh, "--k", "8").exit_code == 0
    assert set(pngs(out)) == {"p.jpg.png", "p.png.png", "q.png"}
    assert pngs(out) == pngs(fresh) and comparable(out) == comparable(fresh)
    for rel in pngs(out):
        with Image.open(out / rel) as im:
            im.load()
            assert im.mode == "P"

    # Killed after the renamed image's record, before the manifest was put in order: the old line and
    # file are both still there. The next resume takes the newer record, redoes nothing, removes the file.
    (out / MANIFEST).write_text(first_lines + (out / MANIFEST).read_text())
    (out / "p.png").write_bytes(old_p)
    last = run_cli(src, "--out", out, "--k", "8")
    assert last.exit_code == 0, last.output
    assert json.loads((out / SUMMARY).read_text())["images_skipped"] == 3
    assert pngs(out) == pngs(fresh) and comparable(out) == comparable(fresh)


@pytest.mark.parametrize("old, new", [("b.png", "b.jpg"), ("b.jpg", "b.png")])
def test_an_input_that_takes_a_removed_inputs_output_leaves_one_record(tmp_path, old, new):
    """``old`` wrote ``b.png`` and was removed; ``new``, of the same stem, writes ``b.png`` over it. The
    manifest then holds ``new``'s record alone, as a fresh run's would: not a second one that counts a
    file that is no longer there (either order in the walk: ``b.jpg`` sorts before ``b.png``). A run
    killed before putting the manifest in order leaves both lines: the resume keeps the right one."""
    src, out, fresh = tmp_path / "photos", tmp_path / "o", tmp_path / "fresh"
    src.mkdir()
    photo((64, 48)).save(src / "a.png")
    photo((40, 30)).rotate(90).save(src / old)
    assert run_cli(src, "--out", out, "--k", "8").exit_code == 0
    first_lines = (out / MANIFEST).read_text()
    (src / old).unlink()
    photo((30, 20)).save(src / new)
    again = run_cli(src, "--out", out, "--k", "8")
    assert again.exit_code == 0, again.output
    summary = json.loads((out / SUMMARY).read_text())
    assert (summary["images_done"], summary["images_listed"], summary["images_processed"]) == (2, 2, 1)
    assert [(r["input"], r["output"], r["width"]) for r in records(out)] == [("a.png", "a.png", 64), (new, "b.png", 30)]
    assert summary["bytes_out"] == sum(len(data) for data in pngs(out).values())
    assert run_cli(src, "--out", fresh, "--k", "8").exit_code == 0
    assert pngs(out) == pngs(fresh) and comparable(out) == comparable(fresh)

    # Killed after the new record, before the manifest was put in order.
    (out / MANIFEST).write_text(first_lines + (out / MANIFEST).read_text().splitlines(keepends=True)[-1])
    last = run_cli(src, "--out", out, "--k", "8")
    assert last.exit_code == 0, last.output
    assert json.loads((out / SUMMARY).read_text())["images_skipped"] == 2
    assert pngs(out) == pngs(fresh) and comparable(out) == comparable(fresh)


def test_of_images_sharing_an_output_the_record_of_the_file_there_stays(tmp_path):
    """``_finalize_manifest(replaced=True)``: of the ok records of several images that name one output, the
    one whose ``bytes_out`` is the file's size stays. Where sizes do not tell them apart, or the file is
    gone, all stay; an error record is never taken for one; with ``replaced`` False nothing is looked at."""
    out = tmp_path / "o"
    out.mkdir()
    for name, size in [("x.png", 5), ("y.png", 7), ("z.png", 3)]:
        (out / name).write_bytes(b"p" * size)

    def rec(name, output, size, status="ok"):
        return {"src": 0, "input": name, "output": output, "status": status, "bytes_out": size}

    lines = [
        rec("x.jpg", "x.png", 5), rec("x.png", "x.png", 9),  # x.jpg's is the file there
        rec("y.jpg", "y.png", 7), rec("y.png", "y.png", 7),  # a tie: both stay
        rec("w.jpg", "w.png", 4), rec("w.png", "w.png", 6),  # no file: both stay
        rec("z.jpg", "z.png", 3), rec("z.png", "z.png", None, "error"),
    ]  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (out / MANIFEST).write_text(text)
    kmgpu.pipeline._finalize_manifest(out / MANIFEST)
    assert len(records(out)) == 8
    kmgpu.pipeline._finalize_manifest(out / MANIFEST, replaced=True)
    assert [r["input"] for r in records(out)] == ["w.jpg", "w.png", "x.jpg", "y.jpg", "y.png", "z.jpg", "z.png"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "x.png", "y.png", "z.png"]


def test_only_moved_outputs_that_no_record_names_are_removed(tmp_path):
    """The manifest's put in order (``_finalize_manifest``) removes an image's earlier output when its last
    record is ok under another name, and nothing else: not a name another image's record holds, not the
    output of an image whose last try failed, not a path outside the folder or a file that is no PNG."""
    out = tmp_path / "o"
    out.mkdir()
    for name in ["a.png", "a.png.png", "b.png", "b.png.png", "d.png", "e.txt"]:
        (out / name).write_bytes(b"png")
    (tmp_path / "outside.png").write_bytes(b"not ours")

    def rec(name, output, status="ok"):
        return {"src": 0, "input": name, "output": output, "status": status}

    lines = [
        rec("a.png", "a.png"), rec("b.png", "b.png"), rec("d.png", "d.png"), rec("e.png", "e.txt"),
        rec("f.png", "../outside.png"),
        rec("a.png", "a.png.png"), rec("b.png", "b.png.png"), rec("c.png", "b.png"),
        rec("d.png", "d.png.png", "error"), rec("e.png", "e.png"), rec("f.png", "f.png"),
    ]  # fmt: skip
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in lines))
    kmgpu.pipeline._finalize_manifest(out / MANIFEST)
    assert [(r["input"], r["output"]) for r in records(out)] == [
        ("a.png", "a.png.png"), ("b.png", "b.png.png"), ("c.png", "b.png"), ("d.png", "d.png.png"),
        ("e.png", "e.png"), ("f.png", "f.png"),
    ]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["a.png.png", "b.png", "b.png.png", "d.png", "e.txt", MANIFEST]
    assert (tmp_path / "outside.png").read_bytes() == b"not ours"


def test_a_resumed_manifest_sorted_on_disk_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    """A resume sorts the manifest in runs spilled to disk when it is long (here: longer than 2 lines):
    out of order, with an image's failure recorded before its success, a lost output and a lost line,
    it still ends as the uninterrupted run's manifest, one line per image in walk order."""
    src = tmp_path / "photos"
    make_tree(src)
    out = tmp_path / "o"
    assert run_cli(src, "--out", out, "--k", "8").exit_code == 1
    whole = comparable(out)
    lines = (out / MANIFEST).read_text().splitlines()
    assert json.loads(lines[0])["status"] == "ok"
    failed_first = {**json.loads(lines[0]), "status": "error", "error": "an earlier try", "bytes_out": None}
    ok = [line for line in lines if json.loads(line)["status"] == "ok"]
    (out / json.loads(ok[2])["output"]).unlink()  # an output lost: that image is done again
    scrambled = [json.dumps(failed_first)] + [line for line in lines[::-1] if line != ok[4]]  # and a line lost
    (out / MANIFEST).write_text("\n".join(scrambled) + "\n")
    monkeypatch.setattr(kmgpu.records, "SORT_CHUNK", 2)
    again = run_cli(src, "--out", out, "--k", "8")
    assert again.exit_code == 1
    assert comparable(out) == whole
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["images_skipped"] == 5 and summary["images_processed"] == 5  # 2 redone, 3 broken files
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_config_precedence_and_unknown_keys(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    photo().save(src / "p.png")
    cfg = tmp_path / "c.toml"
    cfg.write_text("k = 8\nlevel = 1\nbatch_size = 4\n")
    result = run_cli(src, "--config", cfg, "--k", "16")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "photos_kmgpu" / SUMMARY).read_text())
    assert summary["config"]["k"] == 16 and summary["config"]["level"] == 1 and summary["config"]["batch_size"] == 4
    assert records(tmp_path / "photos_kmgpu")[0]["k"] == 16
    cfg.write_text("k = 8\ncolours = 12\n")
    bad = run_cli(src, "--config", cfg, "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "unknown key 'colours'" in bad.output
    cfg.write_text("k = 'many'\n")
    assert "must be of type int" in run_cli(src, "--config", cfg, "--out", tmp_path / "x").output


@pytest.mark.parametrize("name", ["default", "fast", "quality"])
def test_shipped_configs_load(name):
    from kmgpu.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert 2 <= cfg.k <= 256


def test_level_reaches_the_files(tmp_path):
    """--level 10 (libdeflate's near-optimal parsing) writes smaller files of the same pixels than --level 7."""
    src = tmp_path / "photos"
    src.mkdir()
    with Image.open(SAMPLES / "coffee.png") as im:  # a photo: a synthetic one can be all runs, the same at any level
        im.crop((100, 50, 400, 250)).save(src / "p.png")
    for level in ("7", "10"):
        assert run_cli(src, "--level", level, "--out", tmp_path / level).exit_code == 0
    small, plain = (tmp_path / "10" / "p.png").read_bytes(), (tmp_path / "7" / "p.png").read_bytes()
    assert len(small) < len(plain)
    with Image.open(tmp_path / "10" / "p.png") as a, Image.open(tmp_path / "7" / "p.png") as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    assert records(tmp_path / "10")[0]["bytes_out"] == len(small)
    bad = run_cli(src, "--level", "13", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and bad.output.strip().endswith(
        "level=13 is out of range: levels are 0 to 12 (default 7; 10-12 slowest)"
    )
    assert not (tmp_path / "x").exists()


def test_usage_errors_and_empty_folder(tmp_path):
    missing = run_cli(tmp_path / "nope")
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = run_cli(empty)
    assert nothing.exit_code == 0 and "no images found" in nothing.output
    src = tmp_path / "photos"
    src.mkdir()
    photo().save(src / "p.png")
    inside = run_cli(src, "--out", src / "out")
    assert inside.exit_code == 2 and "inside the source" in inside.output
    assert run_cli(src, "--k", "1").exit_code == 2
    two = run_cli(src, empty)
    assert two.exit_code == 2 and "several sources need --out" in two.output


def test_no_progress_bar_when_there_is_nothing_to_do(tmp_path):
    """An empty folder, or a run already finished: the note or the summary, not a bar of 0 images."""
    empty = tmp_path / "empty"
    empty.mkdir()
    src = tmp_path / "photos"
    src.mkdir()
    photo((40, 30)).save(src / "p.png")
    args = ["run", "--device", "cpu", "--k", "8", "--out"]
    first = runner.invoke(app, [*args, str(tmp_path / "o"), str(src)])
    assert first.exit_code == 0 and "1/1" in first.stderr  # the bar, where there is work
    nothing = runner.invoke(app, [*args, str(tmp_path / "e"), str(empty)])
    assert nothing.exit_code == 0 and nothing.stderr.startswith("kmgpu: note: no images found")
    again = runner.invoke(app, [*args, str(tmp_path / "o"), str(src)])
    assert again.exit_code == 0 and "1 skipped" in again.output
    for result in (nothing, again):
        assert "img" not in result.stderr and "0/0" not in result.stderr, result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers are Linux's")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_are_forked_whatever_the_default_start_method(tmp_path, monkeypatch, method):
    """Python 3.14 starts processes by forkserver by default: kmgpu's workers are still forked, so they share
    the loaded torch and kernels (and a worker function patched here, which a fresh process would not see)."""
    import multiprocessing

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        photo((40 + i, 30)).save(src / f"p{i}.png")
    real = kmgpu.pipeline.quantize_in_worker
    seen = tmp_path / "seen"
    seen.mkdir()

    def marked(samples, config):
        (seen / str(os.getpid())).touch()
        return real(samples, config)

    monkeypatch.setattr(kmgpu.pipeline, "quantize_in_worker", marked)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(method, force=True)
    try:
        result = run_cli(src, "--out", tmp_path / "o", "--k", "8", "--workers", "2")
        compressed = runner.invoke(app, ["compress", *map(str, sorted(src.iterdir())), "--out-dir",
                                         str(tmp_path / "c"), "-k", "8", "--workers", "2"])  # fmt: skip
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in records(tmp_path / "o")] == ["ok"] * 3
    assert len(list(seen.iterdir())) >= 1 and str(os.getpid()) not in os.listdir(seen)
    assert compressed.exit_code == 0, compressed.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["p0.png", "p1.png", "p2.png"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers are Linux's")
def test_a_run_under_forkserver_ends_without_warnings(tmp_path):
    """The kmgpu command, with forkserver as Python's default start method (3.14's): exit 0, and nothing on
    stderr but the progress bar; tqdm's lock once left Python warning of a leaked semaphore at exit."""
    script = (
        "import multiprocessing, sys\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.set_start_method('forkserver', force=True)\n"
        "    sys.argv = ['kmgpu', *sys.argv[1:]]\n"
        "    from kmgpu.cli import console\n"
        "    console()\n"
    )
    out = tmp_path / "o"
    done = subprocess.run(
        [sys.executable, "-c", script, "run", str(SAMPLES), "--out", str(out), "--k", "8", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "4 done, 0 failed" in done.stdout
    assert sorted(r["status"] for r in records(out)) == ["ok"] * 4


def test_a_worker_killed_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch):
    """The kernel's out-of-memory killer takes a DataLoader worker: one line that says what to do, exit 1,
    the images done kept; the same command then finishes the run as an uninterrupted one."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(6):
        photo((40 + i, 30)).save(src / f"p{i}.png")
    real = kmgpu.pipeline.quantize_in_worker

    def killed_on_p3(samples, config):  # runs in the forked worker, on groups of two (--batch-size 2)
        if any(sample.item.rel == "p3.png" for sample in samples):
            # as the OOM killer does, some time into the work: the queue's feeder thread has sent what
            # the worker handed it (killed at once, p1 could still sit in its buffer and be redone)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(samples, config)

    monkeypatch.setattr(kmgpu.pipeline, "quantize_in_worker", killed_on_p3)
    out = tmp_path / "o"
    died = run_cli(src, "--out", out, "--k", "8", "--workers", "1", "--batch-size", "2")
    assert died.exit_code == 1 and "Traceback" not in died.output
    (line,) = died.output.splitlines()
    assert line.startswith("kmgpu: error: DataLoader worker (pid")
    assert line.endswith("fewer --workers, a smaller --batch-pixels or a lower --max-pixels take less; "
                         "the images done so far are kept, the same command resumes")  # fmt: skip
    kept = records(out)
    assert [r["output"] for r in kept] == ["p0.png", "p1.png"]  # p2 went with p3
    monkeypatch.setattr(kmgpu.pipeline, "quantize_in_worker", real)
    resumed = run_cli(src, "--out", out, "--k", "8", "--workers", "1", "--batch-size", "2")
    assert resumed.exit_code == 0 and "2 skipped" in resumed.output
    assert run_cli(src, "--out", tmp_path / "whole", "--k", "8", "--workers", "1", "--batch-size", "2").exit_code == 0
    assert comparable(out) == comparable(tmp_path / "whole")

    def a_bug(samples, config):
        raise RuntimeError("a bug in the worker's code")

    monkeypatch.setattr(kmgpu.pipeline, "quantize_in_worker", a_bug)
    bug = run_cli(src, "--out", tmp_path / "bug", "--k", "8", "--workers", "1")
    assert isinstance(bug.exception, RuntimeError) and not isinstance(bug.exception, kmgpu.pipeline.WorkerDied)
    assert "a bug in the worker's code" in str(bug.exception)  # torch's "Caught ... in DataLoader worker process"


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """An --out that cannot be made (under a file) is a usage error; the disk filling up mid-run is exit 1.
    One line each, no traceback, and the resumed run then ends as an uninterrupted one."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        photo((40 + i, 30)).save(src / f"p{i}.png")
    (tmp_path / "a file").write_bytes(b"x")
    bad = tmp_path / "a file" / "out"
    under_a_file = run_cli(src, "--out", bad)
    assert under_a_file.exit_code == 2
    assert under_a_file.output.splitlines() == [
        f"kmgpu: error: --out {bad}: cannot be written: Not a directory ({bad})"
    ]
    full, real = tmp_path / "full", kmgpu.pipeline.write_atomic

    def no_space(path, data):
        if Path(path).name == SUMMARY:  # the images are written, the summary is not
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(kmgpu.pipeline, "write_atomic", no_space)
    stopped = run_cli(src, "--out", full)
    assert stopped.exit_code == 1 and "Traceback" not in stopped.output
    assert stopped.output.splitlines() == [
        "kmgpu: error: cannot write: No space left on device; the images done so far are kept, the same command resumes"
    ]
    assert len(records(full)) == 3 and not (full / SUMMARY).exists()
    monkeypatch.setattr(kmgpu.pipeline, "write_atomic", real)
    resumed = run_cli(src, "--out", full)
    assert resumed.exit_code == 0 and "0 done" not in resumed.output
    assert json.loads((full / SUMMARY).read_text())["images_skipped"] == 3
    assert run_cli(src, "--out", tmp_path / "whole").exit_code == 0
    assert comparable(full) == comparable(tmp_path / "whole")


def test_a_disk_that_fills_up_stops_the_run_and_the_resume_finishes_it(tmp_path, monkeypatch):
    """No space left for an image: every later one would fail the same way after all its work, so the
    run stops (one line naming the output folder, exit 1) with what was written recorded, nothing
    half-written, and the same command then ends as an uninterrupted run."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(20):
        photo((40 + i, 30)).save(src / f"p{i:02d}.png")
    full, real = tmp_path / "full", kmgpu.pipeline.write_atomic
    tried = []

    def fills_up(path, data):
        if Path(path).suffix != ".png":
            return real(path, data)
        tried.append(Path(path).name)
        if len(tried) <= 4:
            return real(path, data)
        with kmgpu.imageio.atomic_file(path) as f:  # the disk fills half way through the file
            f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(kmgpu.pipeline, "write_atomic", fills_up)
    stopped = run_cli(src, "--out", full, "--workers", "0", "--batch-size", "1")
    assert stopped.exit_code == 1 and "Traceback" not in stopped.output
    assert stopped.output.splitlines() == [
        f"kmgpu: error: cannot write: No space left on device ({full}); the images done so far are kept, "
        "the same command resumes"
    ]
    assert len(tried) < 20  # it stopped, rather than fitting and encoding every image to fail its write
    kept = records(full)
    assert [r["output"] for r in kept] == [f"p{i:02d}.png" for i in range(4)]
    assert all(r["status"] == "ok" for r in kept)
    assert sorted(p.name for p in full.glob("*.png")) == [r["output"] for r in kept]
    assert not list(full.glob(".*.tmp"))
    report = runner.invoke(app, ["report", str(full)])
    assert report.exit_code == 0 and "images  4 done, 0 failed so far" in report.output.splitlines()
    assert "run     not finished (stopped, or still going): no summary.json yet; the same command resumes" in (
        report.output.splitlines()
    )
    monkeypatch.setattr(kmgpu.pipeline, "write_atomic", real)
    resumed = run_cli(src, "--out", full, "--workers", "0", "--batch-size", "1")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((full / SUMMARY).read_text())["images_skipped"] == 4
    assert run_cli(src, "--out", tmp_path / "whole").exit_code == 0
    assert comparable(full) == comparable(tmp_path / "whole")


def test_foreign_folder_and_start_over(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    photo().save(src / "p.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused = run_cli(src, "--out", out)
    assert refused.exit_code == 2 and "holds no kmgpu run" in refused.output
    assert run_cli(src, "--out", out, "--overwrite").exit_code == 0
    assert (out / "mine.txt").read_text() == "keep"
    again = run_cli(src, "--out", out, "--no-resume")
    assert again.exit_code == 2 and "--overwrite starts over" in again.output
    fresh = run_cli(src, "--out", out, "--no-resume", "--overwrite")
    assert fresh.exit_code == 0
    assert json.loads((out / SUMMARY).read_text())["images_processed"] == 1


def test_an_earlier_runs_output_inside_a_source_is_skipped_and_said(tmp_path):
    """A photo given alone writes its output beside it, inside the folder a later run is given: that
    output is not quantized again nor mirrored, and the note says how to do it on purpose. A folder
    that only happens to hold a run.json is walked as any other."""
    src = tmp_path / "photos"
    (src / "experiment").mkdir(parents=True)
    photo().save(src / "p.png")
    photo((40, 30)).save(src / "experiment" / "e.png")
    (src / "experiment" / "run.json").write_text(json.dumps({"k": 3, "lr": 0.1}))
    (src / "piped").mkdir()
    photo((20, 30)).save(src / "piped" / "q.png")
    os.mkfifo(src / "piped" / "run.json")  # not a run's either, and not to be opened (it would block)
    assert run_cli(src / "p.png", "--k", "8").exit_code == 0
    earlier = src / "p_kmgpu"
    assert (earlier / "p.png").is_file()
    whole = run_cli(src, "--k", "8")
    assert whole.exit_code == 0, whole.output
    assert f"{earlier}: skipped, it holds the output of a kmgpu run" in whole.output
    out = tmp_path / "photos_kmgpu"
    outputs = ["experiment/e.png", "p.png", "piped/q.png"]
    assert sorted(r["output"] for r in records(out)) == outputs
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == outputs
    assert (out / "p.png").read_bytes() == (earlier / "p.png").read_bytes()
    again = run_cli(earlier, "--out", tmp_path / "again", "--k", "4")  # given as a SRC: walked
    assert again.exit_code == 0 and [r["output"] for r in records(tmp_path / "again")] == ["p.png"]


def test_broken_links_and_pipes_named_like_images_are_failures_not_silence(tmp_path):
    """A link to a file that is gone and a named pipe called .png each get an error record (reading the pipe
    would wait forever: it is not opened); a link to a folder named like an image is neither (not followed)."""
    src = tmp_path / "photos"
    (src / "real").mkdir(parents=True)
    photo((40, 30)).save(src / "real" / "ok.png")
    os.symlink(src / "nowhere.jpg", src / "gone.jpg")
    os.mkfifo(src / "pipe.png")
    os.symlink(src / "real", src / "folder.png")
    result = run_cli(src, "--out", tmp_path / "o")
    assert result.exit_code == 1, result.output
    got = {r["output"]: r for r in records(tmp_path / "o")}
    assert set(got) == {"gone.png", "pipe.png", "real/ok.png"}
    assert got["gone.png"]["status"] == "error" and "no such file" in got["gone.png"]["error"]
    assert got["pipe.png"]["status"] == "error" and "not a regular file" in got["pipe.png"]["error"]
    assert got["real/ok.png"]["status"] == "ok" and (tmp_path / "o" / "real" / "ok.png").is_file()
    assert "Traceback" not in result.output


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(6):
        photo().save(src / f"p{i}.png")
    (src / "p2.png").write_bytes(b"broken")
    result = run_cli(src, "--fail-fast", "--batch-size", "1", "--workers", "0")
    assert result.exit_code == 1
    recs = records(tmp_path / "photos_kmgpu")
    assert [r["status"] for r in recs] == ["ok", "ok", "error"]


def test_several_sources_go_under_their_names(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        photo().save(tmp_path / name / "p.png")
    result = run_cli(tmp_path / "x", tmp_path / "y", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert sorted(r["output"] for r in records(tmp_path / "o")) == ["x/p.png", "y/p.png"]


def test_sources_of_one_name_each_keep_their_outputs(tmp_path, monkeypatch):
    """Two folders of one name (a/photos, b/photos), two files of one stem, a file beside the folders: every
    image gets its own output, numbered in the order given; "." and ".." go under the names they stand for,
    never outside --out (".." once put its images beside the output folder)."""
    sizes = {"a/photos/p.png": (40, 30), "b/photos/p.png": (50, 30), "b/p.jpg": (60, 30), "c/p.jpg": (70, 30)}
    for rel, size in sizes.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        photo(size).save(tmp_path / rel)
    out = tmp_path / "o"
    given = ["a/photos", "b/photos", "b/p.jpg", "c/p.jpg"]
    result = run_cli(*(tmp_path / g for g in given), "--out", out)
    assert result.exit_code == 0, result.output
    expected = {"photos/p.png": 40, "photos.2/p.png": 50, "p.png": 60, "p.2.png": 70}
    assert sorted(r["output"] for r in records(out)) == sorted(expected)
    for rel, width in expected.items():
        with Image.open(out / rel) as im:
            assert im.size == (width, 30)
    again = run_cli(*(tmp_path / g for g in given), "--out", out)
    assert again.exit_code == 0 and "4 skipped" in again.output
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path / "a" / "photos")
    dots = run_cli(".", "../../b", "--out", tmp_path / "dots")
    assert dots.exit_code == 0, dots.output
    assert sorted(r["output"] for r in records(tmp_path / "dots")) == ["b/p.png", "b/photos/p.png", "photos/p.png"]
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "dots" not in p.parts)
    assert after == before
    (tmp_path / "link").symlink_to(tmp_path / "a" / "photos")  # a link goes by the name it was given
    linked = run_cli(tmp_path / "link", tmp_path / "c", "--out", tmp_path / "linked")
    assert linked.exit_code == 0, linked.output
    assert sorted(r["output"] for r in records(tmp_path / "linked")) == ["c/p.png", "link/p.png"]


@pytest.mark.parametrize(
    "given, message",
    [
        (["a", "a"], "a: given twice: each image is done once"),
        (["a", "./a/../a"], "a/../a: given twice (also as a): each image is done once"),
        (["a", "a/sub"], "a/sub: inside a, which is walked already: give one of them"),
        (["a/sub/p.png", "a"], "a/sub/p.png: inside a, which is walked already: give one of them"),
    ],
)
def test_a_source_given_twice_or_inside_another_is_refused(tmp_path, monkeypatch, given, message):
    """Each image is done once: the same folder twice, or one inside another, is bad usage, before any work."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    photo().save(tmp_path / "a" / "sub" / "p.png")
    monkeypatch.chdir(tmp_path)
    result = run_cli(*given, "--out", tmp_path / "o")
    assert result.exit_code == 2 and result.output.strip() == f"kmgpu: error: {message}"
    assert not (tmp_path / "o").exists()


def test_resume_refuses_other_settings(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    photo().save(src / "p.png")
    assert run_cli(src, "--k", "8").exit_code == 0
    other = run_cli(src, "--k", "16")
    assert other.exit_code == 2 and "made with other settings (k=8)" in other.output
    assert run_cli(src, "--k", "16", "--no-resume", "--overwrite").exit_code == 0
    assert records(tmp_path / "photos_kmgpu")[0]["k"] == 16
    again = run_cli(src, "--k", "16")  # the run started over is the one a plain rerun resumes
    assert again.exit_code == 0 and "1 skipped" in again.output


def test_a_run_killed_before_its_first_image_is_resumed(tmp_path):
    """A run leaves its settings before any image: a folder holding only those is a run to resume,
    not a foreign folder, and one holding another run's settings is refused as any such run."""
    src = tmp_path / "photos"
    src.mkdir()
    photo().save(src / "p.png")
    assert run_cli(src, "--k", "8").exit_code == 0
    out = tmp_path / "photos_kmgpu"
    for path in out.iterdir():
        if path.name != "run.json":
            path.unlink()
    resumed = run_cli(src, "--k", "8")
    assert resumed.exit_code == 0 and "1 done" in resumed.output and len(records(out)) == 1
    (out / MANIFEST).unlink()
    other = run_cli(src, "--k", "16")
    assert other.exit_code == 2 and "made with other settings (k=8)" in other.output


def test_names_that_are_not_utf8_or_near_the_length_limit(tmp_path):
    """Real archives hold names in other encodings and names of up to 255 bytes: each image is done,
    its output has the same name bytes, and a rerun finds them all done."""
    src = tmp_path / "photos"
    src.mkdir()
    try:
        odd_dir = os.path.join(os.fsencode(src), b"dir\xff")
        os.mkdir(odd_dir)
        photo((40, 30)).save(os.path.join(odd_dir, b"caf\xe9.png").decode("utf-8", "surrogateescape"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    long_stem = "x" * 251  # + ".jpg": 255 bytes, the longest a name can be; the temporary must not be longer
    photo((30, 40)).save(src / f"{long_stem}.jpg")
    # The command itself, printing to a strict UTF-8 stream (as an en_US.UTF-8 locale gives): the
    # summary names the odd file, whose bytes must go out as they are, not as a traceback.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    args = [sys.executable, "-m", "kmgpu", "run", str(src), "--k", "8", "--device", "cpu", "--no-progress"]
    done = subprocess.run(args, capture_output=True, env=env)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert b"dir\xff/caf\xe9.png" in done.stdout  # the worst PSNR's image, named by its own bytes
    out = tmp_path / "photos_kmgpu"
    assert os.path.isfile(os.path.join(os.fsencode(out), b"dir\xff", b"caf\xe9.png"))
    with Image.open(out / f"{long_stem}.png") as im:
        assert im.mode == "P" and im.size == (30, 40)
    again = subprocess.run(args, capture_output=True, env=env)
    assert again.returncode == 0 and b"2 skipped" in again.stdout


ORPHAN = """
import os, signal, sys, time
import multiprocessing
from kmgpu.pipeline import map_in_workers

def big(i):
    return bytes(2_000_000)  # two fill a pipe: the workers' feeder threads wait to write the rest

it = map_in_workers(big, [(i,) for i in range(20)], 2)
next(it)
time.sleep(1)
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers' end is asked of Linux")
def test_workers_end_when_the_main_process_is_killed(tmp_path):
    """A main process killed (SIGKILL, the OOM killer, a scheduler) while its workers' results wait in the
    pipe: torch's own watch let such a worker wait forever on its pipe, an orphan holding its memory."""
    said, errors = tmp_path / "pids", tmp_path / "stderr"
    with said.open("w") as stdout, errors.open("w") as stderr:  # files: an orphan would hold a pipe open
        code = subprocess.run([sys.executable, "-c", ORPHAN], env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=stdout, stderr=stderr, timeout=120).returncode  # fmt: skip
    assert code == -signal.SIGKILL, errors.read_text()[-2000:]
    pids = [int(pid) for pid in said.read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 8  # more than torch's 5 s between looks at the parent
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphaned workers: {left}"


def test_automatic_worker_count(monkeypatch):
    from kmgpu.config import RunConfig

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("kmgpu.config.available_cores", lambda: 16)
    assert RunConfig().worker_count("cpu") == 8 and RunConfig().worker_count("cuda") == 4
    assert RunConfig().writer_count("cpu") == 2 and RunConfig().writer_count("cuda") == 8
    assert RunConfig(workers=3).worker_count("cpu") == 3 and RunConfig(workers=0).worker_count("cuda") == 0
    monkeypatch.setattr("kmgpu.config.available_cores", lambda: 2)
    assert RunConfig().worker_count("cpu") == 3 and RunConfig().worker_count("cuda") == 2


def test_automatic_counts_share_the_cores_among_torchrun_ranks(monkeypatch):
    """Each of the ranks torchrun starts on a machine counts its share of the cores (before: all of them, so
    8 ranks of a 16-core GPU host started 32 workers and 64 writer threads); a count set by hand is kept."""
    from kmgpu.config import RunConfig

    monkeypatch.setattr("kmgpu.config.available_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert RunConfig().worker_count("cuda") == 2 and RunConfig().writer_count("cuda") == 2
    assert RunConfig().worker_count("cpu") == 3 and RunConfig(workers=5, writers=3).effective("cuda").writers == 3
    assert RunConfig(workers=5).worker_count("cuda") == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert RunConfig().worker_count("cuda") == 4 and RunConfig().writer_count("cuda") == 4
    assert RunConfig().worker_count("cpu") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more ranks than cores: one each
    assert RunConfig().worker_count("cpu") == 2 and RunConfig().worker_count("cuda") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert RunConfig().worker_count("cuda") == 4


def test_the_automatic_worker_count_raises_no_torch_warning(tmp_path):
    """cores + 1 workers is kmgpu's choice: torch's oversubscription warning stays silent, unless asked for more."""
    import warnings

    from kmgpu.config import RunConfig, available_cores
    from kmgpu.pipeline import run

    cores = available_cores()  # torch suggests at most this many workers, and warns above
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(src / "a.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run([src], out=tmp_path / "auto", config=RunConfig(k=4, device="cpu"), progress=False)
    assert result.exit_code == 0 and (tmp_path / "auto" / "a.png").exists()
    assert RunConfig(k=4).worker_count("cpu") == min(cores + 1, 8)
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run([src], out=tmp_path / "many", config=RunConfig(k=4, workers=cores + 3, device="cpu"), progress=False)
    assert [w for w in caught if "DataLoader will create" in str(w.message)]


def test_automatic_writers_and_batch_size(monkeypatch):
    from kmgpu.config import ConfigError, RunConfig

    monkeypatch.setattr("kmgpu.config.available_cores", lambda: 16)
    auto = RunConfig()
    assert (auto.writer_count("cpu"), auto.writer_count("cuda")) == (2, 8)
    assert (auto.batch_count("cpu"), auto.batch_count("cuda")) == (16, 64)
    gpu = auto.effective("cuda")
    assert (gpu.workers, gpu.writers, gpu.batch_size) == (4, 8, 64) and gpu.k == auto.k
    fixed = RunConfig(writers=3, batch_size=5, workers=1).effective("cuda")
    assert (fixed.workers, fixed.writers, fixed.batch_size) == (1, 3, 5)
    monkeypatch.setattr("kmgpu.config.available_cores", lambda: 2)
    assert RunConfig().writer_count("cuda") == 2
    for bad in (dict(writers=0), dict(writers=-2), dict(batch_size=0), dict(batch_size=-3)):
        with pytest.raises(ConfigError, match="must be -1"):
            RunConfig(**bad)


def test_max_iter_zero_is_the_engine_default():
    from kmgpu.config import ConfigError, RunConfig

    assert RunConfig().fit_options()["max_iter"] is None
    assert RunConfig(max_iter=15).fit_options()["max_iter"] == 15
    with pytest.raises(ConfigError, match="max_iter=-1 must be 0"):
        RunConfig(max_iter=-1)
