import csv
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from kmgpu import __version__
from kmgpu.cli import app
from kmgpu.imageio import load_image, sample_paths
from kmgpu.metrics import psnr, ssim

from .conftest import SAMPLES
from .images import encoded, photo, png_info

runner = CliRunner()


def rows_of(output: str) -> dict:
    """Table rows of a command's output, keyed by their first cell."""
    return {line.split()[0]: line.split() for line in output.splitlines() if line and not line.startswith("kmgpu")}


def test_table_cells_never_run_together():
    """A value as wide as its column (a 1x1 image's 656.00 bits per pixel) or a long first cell still splits
    into its fields; the others keep their columns."""
    from kmgpu.report import Table

    table = Table([("image", 8, "s"), ("ratio", 7, ".2f"), ("bpp", 6, ".2f")])
    assert table.row("a.png", 0.84, 656.0) == "a.png      0.84 656.00"
    assert table.row("a.png", 0.84, 3.5) == "a.png      0.84  3.50"
    assert table.row("a-long-name.png", 12345.5, 1.0).split() == ["a-long-name.png", "12345.50", "1.00"]
    assert table.header() == "image     ratio   bpp"


def test_two_inputs_that_would_write_one_output_are_named(tmp_path):
    """a/x.png and b/x.png into one --out-dir, or one input twice: bad usage that names both, before any work."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        photo().save(tmp_path / folder / "x.png")
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    result = runner.invoke(app, ["compress", str(a), str(b), "--out-dir", str(tmp_path / "o"), "--overwrite"])
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert result.output.strip() == (
        f"kmgpu: error: {a} and {b} would both write {tmp_path / 'o' / 'x.png.png'}: "
        "give them in separate commands or rename one"
    )
    twice = runner.invoke(app, ["compress", str(a), str(a)])
    assert twice.exit_code == 2 and f"would both write {tmp_path / 'a' / 'x-k64.png'}" in twice.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"kmgpu {__version__} (torch ")


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "report", "compress", "sweep"):
        assert command in result.output


def test_run_help_gives_every_exit_code():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})  # rich reads the width there
    assert result.exit_code == 0
    codes = "0 all done, 1 some failed (in the manifest), 2 bad usage, 130 interrupted, 143 stopped by SIGTERM."
    # on one line where the terminal is wide enough: the help keeps a docstring's line breaks
    assert [line.strip() for line in result.output.splitlines() if "Exit codes" in line] == [f"Exit codes: {codes}"]


def test_run_on_the_samples_prints_each_image(tmp_path):
    """What scripts/demo runs: kmgpu run on the bundled photos, with --images."""
    out = tmp_path / "demo"
    args = ["run", str(SAMPLES), "--out", str(out), "--k", "16", "--device", "cpu", "--images", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = rows_of(result.output)
    for src in sample_paths():
        written = out / f"{src.stem}.png"
        with Image.open(written) as im:
            assert im.mode == "P" and len(im.getcolors()) <= 16
            decoded = np.asarray(im.convert("RGB"))
        original = load_image(src).pixels
        if original.shape[2] == 1:
            assert np.all(decoded == decoded[:, :, :1])
            decoded = decoded[:, :, :1]
        row = rows[written.name]
        assert int(row[3].replace(",", "")) == written.stat().st_size
        assert float(row[6]) == pytest.approx(psnr(original, decoded), abs=0.006)
        assert float(row[7]) == pytest.approx(ssim(original, decoded), abs=6e-5)
    assert "4 done, 0 failed" in result.output
    assert not list(out.glob(".*.tmp"))


def test_compress_writes_beside_the_input(tmp_path):
    src = tmp_path / "coffee.png"
    shutil.copy(SAMPLES / "coffee.png", src)
    result = runner.invoke(app, ["compress", str(src), "--k", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "coffee-k32.png"
    info = png_info(out.read_bytes())
    assert info["color_type"] == 3 and info["bit_depth"] == 8 and info["palette_len"] <= 32
    row = rows_of(result.output)["coffee.png"]
    assert int(row[3].replace(",", "")) == out.stat().st_size
    assert float(row[4]) == pytest.approx(src.stat().st_size / out.stat().st_size, abs=0.006)
    assert src.read_bytes() == (SAMPLES / "coffee.png").read_bytes()


def test_compress_many_with_a_name_clash_and_fs_dither(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(photo(), "PNG"))
    (tmp_path / "a.jpg").write_bytes(encoded(photo(), "JPEG"))
    out = tmp_path / "out"
    args = ["compress", str(tmp_path / "a.png"), str(tmp_path / "a.jpg"), "--out-dir", str(out), "--device", "cpu"]
    plain = runner.invoke(app, [*args, "-k", "8"])
    assert plain.exit_code == 0, plain.output
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png"]
    assert "total" in plain.output
    dithered = runner.invoke(app, [*args, "-k", "8", "--dither", "fs", "--overwrite"])
    assert dithered.exit_code == 0, dithered.output
    with Image.open(out / "a.png.png") as im:
        assert len(im.getcolors()) <= 8
    assert float(rows_of(dithered.output)["a.png"][6]) < float(rows_of(plain.output)["a.png"][6])


def test_compress_in_worker_processes_prints_and_writes_what_one_process_does(tmp_path):
    """Several inputs on the CPU go to DataLoader worker processes, one image each: the same bytes, the
    same rows in the order given (but their milliseconds), the same error lines, and an output already
    there is kept."""
    names = []
    for i, size in enumerate([(120, 80), (33, 47), (200, 150), (64, 64), (90, 31)]):
        names.append(f"p{i}.png")
        photo(size).save(tmp_path / names[-1])
    (tmp_path / "cut.jpg").write_bytes(encoded(photo(), "JPEG")[:300])
    (tmp_path / "gray.png").write_bytes(encoded(photo().convert("L"), "PNG"))
    inputs = [str(tmp_path / n) for n in [*names[:2], "cut.jpg", *names[2:], "gray.png"]]
    outputs = {}
    for workers in ("0", "3"):
        out = tmp_path / f"out{workers}"
        out.mkdir()
        (out / "p3.png").write_bytes(b"keep me")
        result = runner.invoke(app, ["compress", *inputs, "--out-dir", str(out), "-k", "16", "--workers", workers])
        assert result.exit_code == 1, result.output
        assert (out / "p3.png").read_bytes() == b"keep me"
        lines = result.output.splitlines()
        assert [line.split()[0] for line in lines] == [
            "image", "p0.png", "p1.png", "kmgpu:", "p2.png", "kmgpu:", "p4.png", "gray.png", "total",
        ]  # fmt: skip
        assert lines[3].startswith(f"kmgpu: error: {tmp_path / 'cut.jpg'}")
        kept = f"{tmp_path / 'p3.png'}: {out / 'p3.png'}: exists (use --overwrite to replace it)"
        assert lines[5] == f"kmgpu: error: {kept}"
        rows = [line.replace(str(out), "OUT").split()[:-1] for line in lines]  # less each row's milliseconds
        outputs[workers] = ({p.name: p.read_bytes() for p in out.iterdir()}, rows)
    assert outputs["3"] == outputs["0"]
    written, _ = outputs["3"]
    for name in ("p0.png", "p2.png", "gray.png"):
        with Image.open(tmp_path / "out3" / name) as im:
            original = Image.open(tmp_path / name)
            assert im.size == original.size and im.mode == "P" and len(im.getcolors()) <= 16


def test_a_compress_worker_killed_is_one_line(tmp_path, monkeypatch):
    """The out-of-memory killer takes a compress worker: one line that says what to do, exit 1, no traceback;
    the images printed before it are written."""
    import kmgpu.cli

    real = kmgpu.cli._compress_one

    def killed_on_p2(src, dest, **options):  # runs in the forked worker
        if src.name == "p2.png":
            time.sleep(0.5)  # the queue's feeder thread sends p1's record first
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dest, **options)

    monkeypatch.setattr(kmgpu.cli, "_compress_one", killed_on_p2)
    for i in range(4):
        photo((40 + i, 30)).save(tmp_path / f"p{i}.png")
    inputs = [str(tmp_path / f"p{i}.png") for i in range(4)]
    result = runner.invoke(app, ["compress", *inputs, "--out-dir", str(tmp_path / "o"), "-k", "8", "--workers", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["image", "p0.png", "p1.png"]
    assert lines[3].startswith("kmgpu: error: DataLoader worker (pid") and len(lines) == 4
    assert lines[3].endswith("fewer --workers, a lower --max-pixels take less; the images printed above are written")
    for name in ("p0.png", "p1.png"):
        assert (tmp_path / "o" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_too_large_for_memory_is_one_line_and_the_rest_is_done(tmp_path, monkeypatch, workers):
    module = importlib.import_module("kmgpu.quantize")  # kmgpu.quantize is the function kmgpu exports
    real = module.quantize

    def short_of_memory_on_big(src, *args, **options):
        if src.name == "big.png":
            raise MemoryError
        return real(src, *args, **options)

    monkeypatch.setattr(module, "quantize", short_of_memory_on_big)
    for name in ("a.png", "big.png", "c.png"):
        photo().save(tmp_path / name)
    inputs = [str(tmp_path / n) for n in ("a.png", "big.png", "c.png")]
    result = runner.invoke(app, ["compress", *inputs, "--out-dir", str(tmp_path / "o"), "--workers", workers])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"kmgpu: error: {tmp_path / 'big.png'}: out of memory (a lower --max-pixels" in result.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "c.png"]


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "p.png"
    photo().save(src)
    dest = tmp_path / "o.png"
    dest.write_bytes(b"keep me")
    result = runner.invoke(app, ["compress", str(src), "-o", str(dest), "--device", "cpu"])
    assert result.exit_code == 1
    assert "exists (use --overwrite" in result.output and dest.read_bytes() == b"keep me"
    again = runner.invoke(app, ["compress", str(src), "-o", str(dest), "--device", "cpu", "--overwrite"])
    assert again.exit_code == 0 and dest.read_bytes()[:4] == b"\x89PNG"


def test_broken_files_fail_cleanly_and_the_rest_is_done(tmp_path):
    good = tmp_path / "good.png"
    photo().save(good)
    broken = {
        "empty.jpg": b"",
        "text.jpg": b"hello, I am text",
        "cut.png": encoded(photo(), "PNG")[:200],
    }
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    inputs = [str(tmp_path / n) for n in [*broken, "good.png"]]
    result = runner.invoke(app, ["compress", *inputs, "--out-dir", str(out), "--device", "cpu", "-k", "8"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("kmgpu: error:")]
    assert len(errors) == 3 and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]
    assert result.output.count("bytes in") == 1  # the table's header, once, above the one row


def test_inputs_that_all_fail_print_their_errors_alone(tmp_path):
    (tmp_path / "photos").mkdir()
    result = runner.invoke(app, ["compress", str(tmp_path / "photos"), str(tmp_path / "gone.jpg"), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"kmgpu: error: {tmp_path / 'photos'}: is a folder, not an image (kmgpu run takes folders)",
        f"kmgpu: error: {tmp_path / 'gone.jpg'}: no such file",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "300"], "k=300 is out of range: palette PNGs hold 2 to 256 colors"),
        (["--k", "1"], "k=1 is out of range"),
        (["--device", "gpu"], "device='gpu' is not a device"),
        (["--level", "13"], "level=13 is out of range: levels are 0 to 12"),
        (["-o", "x.png", "--out-dir", "d"], "-o/--output takes exactly one input"),
    ],
)
def test_bad_flags_are_one_clear_line(tmp_path, args, message):
    src = tmp_path / "p.png"
    photo().save(src)
    result = runner.invoke(app, ["compress", str(src), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmgpu: error: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--frames", "2"], ["No such option: --frames", "(see kmgpu run --help)"]),
        (["run"], ["Missing argument 'SRC", "(see kmgpu run --help)"]),
        (["report"], ["Missing argument 'OUT_DIR'", "(see kmgpu report --help)"]),
        (["compres", "p.png"], ["No such command 'compres'", "(see kmgpu --help)"]),
        (["run", ".", "--k", "many"], ["Invalid value for '--k'"]),
        (["run", ".", "--dither", "ordered"], ["dither='ordered' is not a dithering mode: use none or fs"]),
    ],
)
def test_usage_errors_are_one_line_too(tmp_path, args, message):
    """An unknown option or command, a missing argument or a value of the wrong type: one line on stderr and
    exit 2 from the installed command, like kmgpu's own checks, not typer's box of usage and message."""
    (tmp_path / "p.png").write_bytes(b"untouched")
    done = subprocess.run(
        [sys.executable, "-c", "from kmgpu.cli import console; console()", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmgpu: error: "), done.stderr
    assert all(part in lines[0] for part in message), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"] and (tmp_path / "p.png").read_bytes() == b"untouched"
    assert runner.invoke(app, args).exit_code == 2  # the app itself, as the tests call it


def test_no_arguments_still_print_the_help():
    result = runner.invoke(app, [])
    assert "Usage: kmgpu [OPTIONS] COMMAND" in result.output and "run" in result.output
    assert "kmgpu: error" not in result.output


def test_output_onto_the_input_is_refused(tmp_path):
    src = tmp_path / "p.png"
    photo().save(src)
    before = src.read_bytes()
    result = runner.invoke(app, ["compress", str(src), "-o", str(src), "--overwrite"])
    assert result.exit_code == 2 and "would overwrite an input" in result.output
    assert src.read_bytes() == before


@pytest.mark.parametrize("command", ["compress", "sweep"])
def test_unknown_dither_is_a_usage_error(tmp_path, command):
    """Checked by kmgpu before any work, in its own words (not typer's, which vary by version)."""
    src = tmp_path / "p.png"
    photo((40, 30)).save(src)
    result = runner.invoke(app, [command, str(src), "--dither", "FS", "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip() == "kmgpu: error: dither='FS' is not a dithering mode: use none or fs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_sweep_writes_table_csv_sheet_and_pngs(tmp_path):
    src = tmp_path / "p.png"
    photo((120, 80)).save(src)
    out = tmp_path / "sw"
    result = runner.invoke(app, ["sweep", str(src), "--k", "4,16,2", "--out-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["k"]) for r in rows] == [2, 4, 16]
    for r in rows:
        png = out / f"p-k{r['k']}.png"
        assert int(r["bytes"]) == png.stat().st_size
        assert png_info(png.read_bytes())["palette_len"] <= int(r["k"])
    psnrs = [float(r["psnr"]) for r in rows]
    assert psnrs == sorted(psnrs)
    with Image.open(out / "sheet.png") as sheet:
        assert sheet.width > 3 * 100 and sheet.mode == "RGB"
    chart = out / "chart.png"
    try:
        import matplotlib  # noqa: F401

        assert chart.exists() and chart.stat().st_size > 1000
    except ImportError:
        assert not chart.exists() and "pip install 'kmgpu[plot]'" in result.output


def test_sweep_never_writes_over_the_input_nor_unasked_over_a_file(tmp_path):
    """An image named like one of sweep's own files (sheet.png) swept into its own folder would have been
    replaced by the contact sheet; a user's sweep.csv there, by the table. Both refused before any work."""
    src = tmp_path / "sheet.png"
    photo((60, 40)).save(src)
    before = src.read_bytes()
    for extra in ([], ["--overwrite"]):
        into_own = runner.invoke(app, ["sweep", str(src), "--k", "4", "--out-dir", str(tmp_path), *extra])
        assert into_own.exit_code == 2 and src.read_bytes() == before
        assert into_own.output.strip().endswith("the output would overwrite the input; choose another --out-dir")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.csv").write_text("the user's own\n")
    args = ["sweep", str(src), "--k", "4", "--out-dir", str(mine), "--device", "cpu"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and refused.output.strip() == (
        f"kmgpu: error: {mine / 'sweep.csv'}: exists (use --overwrite to replace it)"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["sweep.csv"]
    assert (mine / "sweep.csv").read_text() == "the user's own\n"
    replaced = runner.invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (mine / "sweep.csv").read_text().startswith("k,colors,bytes") and (mine / "sheet-k4.png").exists()


def test_sweep_of_a_name_that_is_not_utf8_draws_its_chart(tmp_path):
    """The chart's title names the image: bytes of another encoding are drawn as U+FFFD, not a crash."""
    pytest.importorskip("matplotlib")
    try:
        src = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png").decode("utf-8", "surrogateescape")
        photo((60, 40)).save(src)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    out = tmp_path / "sw"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "kmgpu", "sweep", src, "--k", "4", "--out-dir", str(out), "--device", "cpu"]
    done = subprocess.run(args, capture_output=True, env=env)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert (out / "chart.png").stat().st_size > 1000 and (out / "sheet.png").exists()
    assert os.path.isfile(os.path.join(os.fsencode(out), b"caf\xe9-k4.png"))


def test_sweep_says_so_when_matplotlib_is_missing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    src = tmp_path / "p.png"
    photo().save(src)
    result = runner.invoke(app, ["sweep", str(src), "--k", "4", "--out-dir", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 0
    assert "matplotlib is not installed, so chart.png was not drawn: pip install 'kmgpu[plot]'" in result.output
    assert (tmp_path / "o" / "sheet.png").exists() and not (tmp_path / "o" / "chart.png").exists()


@pytest.mark.parametrize("ks", ["4,x", "0,4", ""])
def test_sweep_bad_k_list(tmp_path, ks):
    src = tmp_path / "p.png"
    photo().save(src)
    result = runner.invoke(app, ["sweep", str(src), "--k", ks])
    assert result.exit_code == 2 and result.output.startswith("kmgpu: error:")


def test_sweep_of_a_broken_file(tmp_path):
    src = tmp_path / "bad.png"
    src.write_bytes(b"nope")
    result = runner.invoke(app, ["sweep", str(src), "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not an image" in result.output
    assert not (tmp_path / "o").exists()


def test_outputs_that_cannot_be_written_are_one_line(tmp_path):
    """A folder for outputs under a file is a usage error before any work; a write that fails later (a full
    disk) ends the command with one line and exit 1, not a traceback."""
    src = tmp_path / "p.png"
    photo().save(src)
    (tmp_path / "a file").write_bytes(b"x")
    bad = tmp_path / "a file" / "o"
    swept = runner.invoke(app, ["sweep", str(src), "--k", "4", "--out-dir", str(bad)])
    assert swept.exit_code == 2
    assert swept.output.splitlines() == [f"kmgpu: error: --out-dir {bad}: cannot be written: Not a directory ({bad})"]
    compressed = runner.invoke(app, ["compress", str(src), "--out-dir", str(bad), "--device", "cpu"])
    assert compressed.exit_code == 1
    assert compressed.output.splitlines()[-1] == f"kmgpu: error: {src}: cannot write: Not a directory ({bad})"
    report = tmp_path / "a file" / "b.json"
    benched = runner.invoke(app, ["bench", "--device", "cpu", "--quick", "--json", str(report)])
    assert benched.exit_code == 2
    assert benched.output.splitlines() == [
        f"kmgpu: error: --json {report}: cannot be written: {report.parent} is not a folder"
    ]
    code = "\n".join([
        "import sys, kmgpu.cli as cli, kmgpu.report as report",
        "def full(*args, **kwargs):",
        "    raise OSError(28, 'No space left on device')",
        "report.write_csv = full",
        "sys.argv = ['kmgpu', 'sweep', sys.argv[1], '--k', '4', '--out-dir', sys.argv[2], '--device', 'cpu']",
        "cli.console()",
    ])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == ["kmgpu: error: No space left on device"]
    assert (out / "p-k4.png").is_file() and not (out / "sweep.csv").exists()


def test_the_console_command_exits_with_the_app_code_and_flushed_output(tmp_path):
    """``kmgpu`` (``cli.console``) ends with os._exit: the output must be complete and the codes the app's."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def kmgpu(*args):
        return subprocess.run([sys.executable, "-m", "kmgpu", *args], env=env, capture_output=True, text=True)

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLES / "rocket.jpg", src / "a.jpg")
    (src / "b.jpg").write_bytes(b"not an image")
    done = kmgpu("run", str(src), "--out", str(tmp_path / "out"), "--k", "16", "--device", "cpu", "--no-progress")
    assert done.returncode == 1  # one image failed
    assert "1 done, 1 failed" in done.stdout and done.stdout.rstrip().endswith("(manifest.jsonl, summary.json)")
    assert (tmp_path / "out" / "a.png").exists() and (tmp_path / "out" / "summary.json").exists()
    wrong = kmgpu("compress", str(src / "a.jpg"), "--k", "300")
    assert wrong.returncode == 2 and "k=300 is out of range" in wrong.stderr
    version = kmgpu("--version")
    assert version.returncode == 0 and version.stdout.startswith(f"kmgpu {__version__}")


def test_the_console_command_lets_openmp_threads_sleep_before_torch_loads():
    """OpenMP's threads spin between parallel regions unless told otherwise, taking a core from the encoding
    threads: the command sets OMP_WAIT_POLICY=PASSIVE before torch (and its libgomp) is loaded, unless the
    user set a policy of their own."""
    code = "\n".join([
        "import os, sys, kmgpu.cli as cli",
        "def app(**kwargs):",
        "    print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)",
        "cli.app = app",
        "cli.console()",
    ])  # fmt: skip
    env = {key: v for key, v in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    for given, expected in ((None, "PASSIVE False"), ("ACTIVE", "ACTIVE False")):
        run_env = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env)
        assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr


def test_help_and_report_answer_without_loading_torch(tmp_path):
    """--help and report only parse and read JSON: they must not pay torch's and numba's seconds of import."""
    src = tmp_path / "in"
    src.mkdir()
    photo().save(src / "a.png")
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(src), "--out", str(out), "--device", "cpu", "--no-progress"]).exit_code == 0
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from kmgpu.cli import app\n"
        "runner = CliRunner()\n"
        "helped = runner.invoke(app, ['--help'])\n"
        "report = runner.invoke(app, ['report', sys.argv[1], '--images'])\n"
        "print(helped.exit_code, report.exit_code, 'a.png' in report.output, '1 done' in report.output)\n"
        "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", probe, str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0 0 True True", "[]"]


def test_report_of_what_is_not_a_run_is_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "summary.json").write_text('{"images_done": 3')
    cases = {
        "missing": "no such folder",
        "file.png": "not a folder",
        "folder": "no summary.json or manifest.jsonl here: not the output folder of a kmgpu run",
        "torn": "cannot be read (Expecting ',' delimiter: line 1 column 18 (char 17))",
    }
    for name, reason in cases.items():
        result = runner.invoke(app, ["report", str(tmp_path / name)])
        said = f"{tmp_path / name / 'summary.json'}" if name == "torn" else f"{tmp_path / name}"
        assert result.exit_code == 2 and result.output.splitlines() == [f"kmgpu: error: {said}: {reason}"], name


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("inside_a_kernel", [False, True])
def test_ctrl_c_or_sigterm_ends_any_command_with_one_line(tmp_path, sig, inside_a_kernel):
    """Outside `kmgpu run` (which says more), a Ctrl-C ends a command with exit 130 and one line, not a
    traceback nor silence: a plain one (typer's answer is a silent 130), or one that a numba kernel's
    call returns as a SystemError. A SIGTERM likewise, with exit 143 (before: silence, status -15)."""
    code = "\n".join([
        "import importlib, os, signal, sys, time, kmgpu.cli as cli",
        "q = importlib.import_module('kmgpu.quantize')  # the module: kmgpu.quantize is also a function",
        "sig, in_kernel = sys.argv[3], sys.argv[4] == 'True'",
        "def interrupted(*args, **kwargs):",
        "    try:",
        "        if sig == 'SIGTERM':",
        "            os.kill(os.getpid(), signal.SIGTERM)",
        "            time.sleep(30)  # the signal's handler raises here",
        "        raise KeyboardInterrupt",
        "    except KeyboardInterrupt as err:",
        "        if in_kernel:",
        "            raise SystemError('returned a result with an exception set') from err",
        "        raise",
        "q.quantize = interrupted",
        "sys.argv = ['kmgpu', 'compress', sys.argv[1], '-o', sys.argv[2]]",
        "cli.console()",
    ])  # fmt: skip
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (8, 8), (200, 30, 40)).save(src)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-c", code, str(src), str(out), sig, str(inside_a_kernel)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    said = {"SIGINT": (130, "kmgpu: error: interrupted"), "SIGTERM": (143, "kmgpu: error: stopped by SIGTERM")}
    assert done.returncode == said[sig][0], done.stderr
    assert done.stderr.splitlines() == [said[sig][1]] and not out.exists()


def test_ctrl_c_in_run_is_said_once(tmp_path):
    """`kmgpu run` says what it kept on a Ctrl-C; the command line adds no second line."""
    code = "\n".join([
        "import sys, kmgpu.cli as cli, kmgpu.pipeline as pipeline",
        "def interrupted(*args, **kwargs):",
        "    raise KeyboardInterrupt",
        "pipeline.run = interrupted",
        "sys.argv = ['kmgpu', 'run', sys.argv[1], '--device', 'cpu']",
        "cli.console()",
    ])  # fmt: skip
    src = tmp_path / "photos"
    src.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 40)).save(src / "a.png")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, env=env)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [
        "kmgpu: error: interrupted: the images done so far are kept; the same command resumes from there"
    ]


def test_nproc_compiles_the_missing_kernels_once_before_it_starts_the_ranks(tmp_path, monkeypatch):
    """Each rank would otherwise compile every kernel at once (the first run of the samples with
    --nproc 2 on 2 cores took 34.9 s, 20.5 once the launcher did it): the launcher compiles what the
    cache lacks, says so once, loads nothing else, and then starts the ranks."""
    import kmgpu.cli
    from kmgpu import cpu_kernels

    if not cpu_kernels.compiled():
        pytest.skip("the compiled CPU kernels are off here (no numba, or KMGPU_NUMBA=0)")
    events = []
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: group in ("quality", "seeds", "dither"))
    monkeypatch.setattr(cpu_kernels, "_compile_side_by_side", lambda groups: events.append(("compile", groups)))
    monkeypatch.setattr(cpu_kernels, "_warm", lambda groups: events.append(("compile here", groups)))
    monkeypatch.setattr(cpu_kernels, "available_cores", lambda: 2)

    def ranks(nproc):
        events.append(("ranks", nproc))
        raise typer.Exit(0)

    monkeypatch.setattr(kmgpu.cli, "_relaunch_under_torchrun", ranks)
    args = ["run", str(SAMPLES), "--out", str(tmp_path / "o"), "--device", "cpu", "--nproc", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("kmgpu: note: compiling kmgpu's CPU kernels") == 1
    assert events == [("compile", ["seeds", "quality"]), ("ranks", 2)]  # no dithering asked for
    events.clear()
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: group == "dither")
    assert runner.invoke(app, [*args, "--dither", "fs"]).exit_code == 0
    assert events == [("compile here", ["dither"]), ("ranks", 2)]
    events.clear()
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: False)
    quiet = runner.invoke(app, args)
    assert quiet.exit_code == 0 and "compiling" not in quiet.output and events == [("ranks", 2)]


@pytest.mark.parametrize("dither", ["none", "fs"])
@pytest.mark.parametrize("command", ["run", "compress"])
def test_compiling_the_kernels_is_announced_before_the_first_image(tmp_path, monkeypatch, command, dither):
    """Where numba's cache lacks a kernel, the command says so before it waits; then does its work.
    It loads every group of kernels once, but the dithering one where nothing is dithered."""
    from kmgpu import cpu_kernels

    if not cpu_kernels.compiled():
        pytest.skip("the compiled CPU kernels are off here (no numba, or KMGPU_NUMBA=0)")
    loaded = []
    monkeypatch.setattr(cpu_kernels, "_ready", False)
    monkeypatch.setattr(cpu_kernels, "_left", frozenset())
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: group == "quality")
    monkeypatch.setattr(cpu_kernels, "_warm", lambda groups: loaded.append(groups))
    src = SAMPLES / "coffee.png"
    out = tmp_path / "out"
    args = [str(src), "--out" if command == "run" else "--out-dir", str(out), "--k", "8", "--device", "cpu"]
    args += ["--dither", dither, *(["--no-progress"] if command == "run" else [])]
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 0, result.output
    said = result.output.index("kmgpu: note: compiling kmgpu's CPU kernels for this machine")
    assert said < result.output.index("coffee")  # before any line about the image
    assert loaded == [[group for group in cpu_kernels._WARM_GROUPS if dither == "fs" or group != "dither"]]
    with Image.open(out / "coffee.png") as im:
        assert im.mode == "P"
