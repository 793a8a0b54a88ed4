import importlib.util
import json
import math

from typer.testing import CliRunner

from kmgpu.cli import app

runner = CliRunner()


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_cpu_bench_json(tmp_path, monkeypatch):
    # Peers that are missing are skipped, not failed: hide scikit-learn and pngquant.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("sklearn", "faiss") else real_find_spec(name, *a)
    )
    monkeypatch.setattr("shutil.which", lambda name: None)
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app, ["bench", "--quick", "--device", "cpu", "--k", "16", "--json", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert {"machine", "peaks", "engine", "end_to_end", "peers"} <= set(r)
    assert r["machine"]["cpu_cores"] >= 1 and r["machine"]["torch"]
    assert all(finite_positive(v) for v in r["peaks"]["cpu"].values())
    assert len(r["engine"]) == 2
    for row in r["engine"]:
        for key in ("pixel_iterations_per_second", "gflops", "gbps", "fits_per_second", "fraction_of_fma_peak"):
            assert finite_positive(row[key]), (key, row)
    (e2e,) = r["end_to_end"]
    assert e2e["images"] == 12 and finite_positive(e2e["megapixels_per_second"])
    assert {"decode", "colors", "fit", "assign", "encode", "metrics", "write"} <= set(e2e["stage_seconds"])
    assert abs(sum(e2e["stage_fractions"].values()) - 1) < 1e-9
    peers = {p["method"]: p for p in r["peers"]}
    for skipped in ("sklearn KMeans", "sklearn MiniBatchKMeans", "faiss Kmeans", "pngquant --nofs"):
        assert peers[skipped]["status"] == "skipped" and peers[skipped]["reason"] == "not installed"
    for ran in ("kmgpu", "Pillow median cut", "Pillow fast octree"):
        assert peers[ran]["status"] == "ok" and finite_positive(peers[ran]["seconds_per_megapixel"])
        assert finite_positive(peers[ran]["psnr"])
    assert peers["kmgpu"]["psnr"] > peers["Pillow median cut"]["psnr"]
    assert "skipped (not installed)" in result.output and "end to end" in result.output
    assert "fused kernel" not in result.output  # the CUDA caveat only where there are CUDA rows
    from kmgpu.bench import format_report

    r["engine"].append({**r["engine"][0], "device": "cuda"})
    assert "fused kernel runs the step" in format_report(r)


def test_bench_without_a_device(tmp_path):
    result = runner.invoke(app, ["bench", "--device", "tpu", "--quick"])
    assert result.exit_code == 2 and "is not a device" in result.output


def test_peers_print_no_warnings_of_their_own():
    """scikit-learn warns when an image has fewer distinct colors than k (the gray camera sample at k=256); its
    result stands, as kmgpu's does, so the bench's output is the table, not a warning between its lines."""
    import warnings

    import pytest
    import torch

    pytest.importorskip("sklearn")
    from kmgpu.bench import bench_peers
    from kmgpu.imageio import SAMPLES_DIR

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = bench_peers([SAMPLES_DIR / "camera.png"], 256, 1, torch.device("cpu"), quick=True)
    by_method = {r["method"]: r for r in rows}
    for method in ("kmgpu", "sklearn KMeans"):  # 255 gray levels, 256 colors: each reproduced exactly
        assert by_method[method]["status"] == "ok" and by_method[method]["psnr"] is None, by_method[method]


def test_bench_run_takes_a_folder_of_any_images_and_gives_pngquant_pngs(tmp_path):
    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("bench_run", "scripts/bench_run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    jpeg = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    jpeg.save(folder / "sub" / "a.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(folder / "sub" / "a.ppm")  # a's stem too
    Image.fromarray(rng.integers(0, 256, (10, 20, 4), dtype=np.uint8)).save(folder / "b.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not looked at")
    count, mp, pngs = bench_run.describe_folder(folder, tmp_path / "png")
    assert (count, mp) == (3, (30 * 40 + 6 * 8 + 10 * 20) / 1e6)
    copies = tmp_path / "png"
    # walk order; a PNG as it is, the others each as a copy of its own (a.jpg and a.ppm share a stem)
    assert pngs == [folder / "b.png", copies / "sub" / "a.jpg.png", copies / "sub" / "a.ppm.png"]
    assert sorted(p.relative_to(copies).as_posix() for p in copies.rglob("*.png")) == ["sub/a.jpg.png", "sub/a.ppm.png"]
    for source, copy in zip([folder / "sub" / "a.jpg", folder / "sub" / "a.ppm"], pngs[1:]):
        with Image.open(source) as src, Image.open(copy) as png:
            assert np.array_equal(np.asarray(src.convert("RGB")), np.asarray(png))
    assert sorted(p.name for p in folder.rglob("*")) == ["a.jpg", "a.ppm", "b.png", "broken.jpg", "notes.txt", "sub"]
    # A folder of PNGs is handed to pngquant as it is, an unreadable one left out as kmgpu fails it.
    only_png = tmp_path / "pngs"
    only_png.mkdir()
    (folder / "b.png").rename(only_png / "B.PNG")
    (only_png / "broken.png").write_bytes(b"not a PNG")
    assert bench_run.describe_folder(only_png, tmp_path / "png2") == (1, 200 / 1e6, [only_png / "B.PNG"])
    assert not (tmp_path / "png2").exists()
