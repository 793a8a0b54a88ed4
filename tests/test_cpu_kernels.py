"""The compiled CPU kernels (kmgpu/cpu_kernels.py): the search against brute force, with and without its
bounds; Lloyd's passes against the torch loop; the histograms against the sorts they replace; the PNG
filters against the NumPy formulation."""

import importlib
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kmgpu import cpu_kernels, png
from kmgpu.kmeans import kmeans
from kmgpu.quantize import color_histogram, quantize_pixels

from .conftest import SAMPLES, sample_pixels

km = importlib.import_module("kmgpu.kmeans")  # the module, not the function kmgpu exports
q = importlib.import_module("kmgpu.quantize")

pytestmark = pytest.mark.skipif(
    not cpu_kernels.usable(torch.zeros(1, 1, 3)),
    reason="the compiled CPU kernels are off here (no numba, or KMGPU_NUMBA=0)",
)


def brute(x, c, k):
    """Nearest of the first k[b] centers by a float64 broadcast; the first index among equals."""
    d = ((x[:, :, None, :].double() - c[:, None, :, :].double()) ** 2).sum(-1)
    d[:, :, :][torch.arange(c.shape[1]).expand_as(d) >= k.view(-1, 1, 1)] = float("inf")
    return d.min(-1)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_full_search_is_exact_on_integers(d):
    """8-bit points and an integer palette: exact distances, so the first nearest center, bit for bit."""
    g = torch.Generator().manual_seed(d)
    x = torch.randint(0, 256, (3, 500, d), generator=g).float()
    c = torch.randint(0, 256, (3, 70, d), generator=g).float()
    c[:, 5] = c[:, 2]  # equal centers: the first wins
    k = torch.tensor([70, 33, 2])
    labels, dist, _, _ = cpu_kernels.nearest(x, None, c, k)
    best, idx = brute(x, c, k)
    assert torch.equal(labels, idx) and torch.equal(dist.double(), best)
    assert not bool((labels == 5).any())


@pytest.mark.parametrize("d", [1, 3, 4])
def test_search_geometry_is_each_centers_nearest_other_exactly(d):
    """What the bounds rest on: each center's squared distance to its nearest other one (the pair's float64
    sum, as float32) and the two largest moves, for problems padded to the batch's k, with duplicate
    centers and a problem of one center."""
    rng = np.random.default_rng(d)
    B, k_max = 4, 64
    c = (rng.random((B, k_max, d)) * 255).astype(np.float32)
    c[0, 5] = c[0, 9]  # two centers on one color: nearest other at 0
    c[1] = np.round(c[1])  # integers: many ties
    kb = np.array([64, 64, 17, 1], dtype=np.int64)
    prev = c + rng.normal(0, 2, c.shape).astype(np.float32)
    ct, nn_sq, d_max, d_arg, d_second = cpu_kernels._search_buffers(B, k_max, d)
    active = np.ones(B, dtype=np.bool_)
    cpu_kernels._prepare_search(c, prev, ct, kb, active, nn_sq, d_max, d_arg, d_second)
    for b in range(B):
        k = kb[b]
        assert np.array_equal(ct[b][:, :k], c[b, :k].T)
        pairs = ((c[b, :k, None, :].astype(np.float64) - c[b, None, :k, :]) ** 2).sum(-1)
        np.fill_diagonal(pairs, np.inf)
        want = pairs.min(1).astype(np.float32) if k > 1 else np.full(1, cpu_kernels._BIG)
        assert np.array_equal(nn_sq[b, :k], want), b
        moves = np.sqrt(((c[b, :k].astype(np.float64) - prev[b, :k]) ** 2).sum(-1))
        order = np.argsort(-moves, kind="stable")
        assert d_arg[b] == order[0] and d_max[b] == np.float32(moves[order[0]])
        assert d_second[b] == np.float32(moves[order[1]] if k > 1 else 0.0)
    assert nn_sq[0, 5] == nn_sq[0, 9] == 0.0


@pytest.mark.parametrize("k", [40, 70])
def test_runner_up_bound_is_the_second_distance(k):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 300, 3, generator=g) * 100
    c = torch.rand(1, k, 3, generator=g) * 100
    c[0, 7] = c[0, 3]  # a shared minimum: the runner-up is the minimum itself
    x[0, :20] = c[0, 3]
    bounds = cpu_kernels.Bounds(x)
    cpu_kernels.nearest(x, torch.ones(1, 300), c, torch.tensor([k]), bounds=bounds, sums=True)
    d = ((x[:, :, None].double() - c[:, None].double()) ** 2).sum(-1).sqrt()
    second = d.sort(-1).values[..., 1].float()
    torch.testing.assert_close(bounds.lower, second, rtol=1e-5, atol=1e-4)


def lloyd(x, w, centers, k, steps, bounds):
    """Plain over-relaxed Lloyd steps through nearest(); returns the labels of every step."""
    out = []
    labels = None
    for _ in range(steps):
        labels, dist, sx, sw = cpu_kernels.nearest(x, w, centers, k, bounds=bounds, previous=labels, sums=True)
        out.append((labels.clone(), dist.clone()))
        mean = torch.where(sw.unsqueeze(-1) > 0, sx / sw.clamp_min(1e-300).unsqueeze(-1), centers.double())
        centers = (centers + 1.8 * (mean.float() - centers)).contiguous()
    return out


def test_bounds_change_the_work_not_the_labels():
    """Lloyd steps that skip searches by Hamerly's bounds label every point as a full search does."""
    colors = torch.from_numpy(np.unique(sample_pixels("coffee.png"), axis=0)).float()
    x = colors.unsqueeze(0) - 128.0
    w = torch.ones(x.shape[:2])
    fit = kmeans(colors, 64, seed=0, max_iter=2, device="cpu")
    centers = (fit.centers - 128.0).unsqueeze(0).contiguous()
    k = torch.tensor([64])
    searched = []
    real = cpu_kernels._search
    spy = lambda *a: searched.append(real(*a)) or searched[-1]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "_search", spy)
        mp.setattr(cpu_kernels, "_THREAD_WORK", 2**40)  # one thread: one count per pass
        bounded = lloyd(x, w, centers, k, 8, cpu_kernels.Bounds(x))
    full = lloyd(x, w, centers, k, 8, None)
    for (lb, db), (lf, df) in zip(bounded, full):
        assert torch.equal(lb, lf)
        torch.testing.assert_close(db, df, rtol=1e-6, atol=1e-6)
    assert searched[0] == x.shape[1] and sum(searched[1:]) < 0.5 * 7 * x.shape[1]


@pytest.mark.parametrize("move", [0.0, 0.5, 6.0])
def test_a_fits_bounds_spare_the_assignment_to_its_palette_not_its_labels(monkeypatch, move):
    """kmeans hands its last bounds on (KMeansResult.bounds) for the assignment of the same points to
    the rounded palette: fewer points searched, the same labels and distances, whatever the centers'
    frame (the fit works about each problem's mean) and however far they then move."""
    rng = np.random.default_rng(1)
    photos = [np.unique(sample_pixels(name, step), axis=0) for name, step in (("coffee.png", 2), ("rocket.jpg", 3))]
    n = max(len(p) for p in photos)
    x = torch.zeros(2, n, 3)
    w = torch.zeros(2, n)
    for b, p in enumerate(photos):
        x[b, : len(p)] = torch.from_numpy(p).float()
        w[b, : len(p)] = torch.from_numpy(rng.integers(1, 9, len(p))).float()
    k = torch.tensor([64, 23])
    fit = kmeans(x, k, w, seed=0, max_iter=4, final_labels=False, device="cpu")
    assert fit.bounds is not None
    palette = fit.centers.round() + torch.from_numpy(rng.normal(0, move, fit.centers.shape)).float().round()
    palette = palette.clamp(0, 255)
    searched = []
    real = cpu_kernels._search
    monkeypatch.setattr(cpu_kernels, "_search", lambda *a: searched.append(real(*a)) or searched[-1])
    monkeypatch.setattr(cpu_kernels, "_THREAD_WORK", 2**40)  # one thread: one count per search
    plain = km.assign(x, palette, n_clusters=k, guess=fit.labels)
    bounded = km.assign(x, palette, n_clusters=k, guess=fit.labels, bounds=fit.bounds)
    assert torch.equal(plain[0], bounded[0]) and torch.equal(plain[1], bounded[1])
    best, _ = brute(x, palette, k)
    assert torch.equal(bounded[1].double(), best)
    if move <= 0.5:
        assert searched[1] < 0.6 * searched[0]
    assert kmeans(x, k, w, seed=0, max_iter=4, device="cpu").bounds is None  # final labels: nothing to hand on


def test_threads_do_not_change_the_result(monkeypatch):
    colors = torch.from_numpy(sample_pixels("coffee.png")[::5].copy()).float()
    x = torch.stack([colors[:20000], colors[20000:40000]])
    w = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1))
    c = x[:, ::400].contiguous()
    k = torch.tensor([50, 37])
    runs = []
    for threads, work in ((1, 2**40), (2, 1), (3, 1)):
        monkeypatch.setattr(cpu_kernels, "_THREAD_WORK", work)
        with torch.no_grad():
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                runs.append(cpu_kernels.nearest(x, w, c, k, sums=True))
            finally:
                torch.set_num_threads(old)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    best, idx = brute(x, c, k)
    assert torch.equal(runs[0][0], idx)
    sx = torch.zeros(2, 50, 3, dtype=torch.float64).index_put_(
        (torch.arange(2).view(-1, 1).expand_as(idx), idx), x.double() * w.double().unsqueeze(-1), accumulate=True
    )
    torch.testing.assert_close(runs[0][2], sx)


def _histograms(names, step):
    """Distinct colors and counts of a few samples, padded to one batch (weight 0 pads)."""
    parts = [color_histogram(torch.from_numpy(sample_pixels(n, step))) for n in names]
    width = max(p.colors.shape[0] for p in parts)
    x = torch.zeros(len(parts), width, 3)
    w = torch.zeros(len(parts), width)
    for b, p in enumerate(parts):
        x[b, : p.colors.shape[0]] = p.colors.float()
        w[b, : p.colors.shape[0]] = p.counts.float()
    return x, w


@pytest.mark.parametrize("relax", [1.0, 1.8])
def test_compiled_passes_are_the_torch_loop(monkeypatch, relax):
    """Lloyd's passes compiled (cpu_kernels.lloyd) do what kmeans._lloyd does in torch, pass for pass.

    Three problems of different sizes and k in one padded batch, as the image path fits them;
    some far-away initial centers start empty, so the repair of empty clusters runs too.
    """
    x, w = _histograms(["coffee.png", "astronaut.png", "rocket.jpg"], 4)
    k = torch.tensor([16, 40, 64])
    init = x[:, :: max(1, x.shape[1] // 64)][:, :64].clone()
    init[:, 1:4] = torch.tensor([[900.0, 900.0, 900.0], [-900.0, 0.0, 0.0], [0.0, 950.0, -900.0]])
    runs = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(km, "_compiled_passes", lambda asg, slot_ok: False)
        runs.append(kmeans(x, k, w, init=init, max_iter=40, relax=relax, device="cpu"))
    fast, slow = runs
    assert all(h.empty_repaired > 0 for h in fast.history[:1]) and fast.n_iter.min() > 3
    assert torch.equal(fast.centers, slow.centers) and torch.equal(fast.labels, slow.labels)
    assert torch.equal(fast.n_iter, slow.n_iter) and torch.equal(fast.converged, slow.converged)
    torch.testing.assert_close(fast.inertia, slow.inertia, rtol=1e-12, atol=0)
    assert [(h.active, h.empty_repaired) for h in fast.history] == [(h.active, h.empty_repaired) for h in slow.history]
    for a, b in zip(fast.history, slow.history):
        torch.testing.assert_close(a.inertia, b.inertia, rtol=1e-12, atol=0, equal_nan=True)
        torch.testing.assert_close(a.center_shift, b.center_shift, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_compiled_passes_do_not_depend_on_threads_or_batch():
    x, w = _histograms(["coffee.png", "rocket.jpg"], 3)
    k = torch.tensor([48, 20])
    c = x[:, ::300][:, :48].contiguous()
    tol = torch.tensor([30.0, 30.0], dtype=torch.float64)
    runs = []
    for split, threads in ((False, 1), (True, 2)):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(cpu_kernels.lloyd(x, w, c, k, tol, 30, bounds=cpu_kernels.Bounds(x), relax=1.8, split=split))
        finally:
            torch.set_num_threads(old)
    alone = cpu_kernels.lloyd(x[1:], w[1:], c[1:], k[1:], tol[1:], 30, bounds=cpu_kernels.Bounds(x[1:]), relax=1.8)
    one, split = runs
    for a, b in zip(one, split):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert [p[:2] + p[4:5] for p in one[3]] == [p[:2] + p[4:5] for p in split[3]]
    centers, n_iter, converged, _, labels, inertia, sum_w = one
    assert torch.equal(alone[0][0], centers[1]) and torch.equal(alone[4][0], labels[1])
    assert int(alone[1][0]) == int(n_iter[1]) and float(alone[5][0]) == float(inertia[1])
    # Both converged, after different numbers of passes: one problem went on alone in its batch.
    assert bool(converged.all()) and int(n_iter[0]) != int(n_iter[1])
    assert torch.equal(sum_w.sum(1), w.double().sum(1))


def test_compiled_and_generic_fits_agree_in_quality(monkeypatch):
    """The two CPU searches round near-ties apart, so fits differ in bits but not in quality."""
    pixels = torch.from_numpy(sample_pixels("coffee.png").copy()).float()
    compiled = kmeans(pixels, 32, seed=0, max_iter=10, device="cpu")
    monkeypatch.setenv("KMGPU_NUMBA", "0")
    generic = kmeans(pixels, 32, seed=0, max_iter=10, device="cpu")
    assert float(compiled.inertia) == pytest.approx(float(generic.inertia), rel=2e-3)


def test_a_numba_that_cannot_compile_falls_back_with_a_warning(monkeypatch):
    def broken(note=None, without=()):
        raise RuntimeError("LLVM ERROR: no target")

    monkeypatch.setattr(cpu_kernels, "_ready", False)
    monkeypatch.setattr(cpu_kernels, "_broken", None)
    monkeypatch.setattr(cpu_kernels, "warm_up", broken)
    with pytest.warns(RuntimeWarning, match="numba could not compile kmgpu's CPU kernels .*LLVM ERROR"):
        assert not cpu_kernels.compiled()
    assert not cpu_kernels.usable(torch.zeros(1, 1, 3))  # once: no second warning, no second try
    pixels = torch.from_numpy(sample_pixels("coffee.png", step=4).copy()).float()
    fit = kmeans(pixels, 8, seed=0, max_iter=5, device="cpu")  # the torch path
    assert torch.isfinite(fit.centers).all() and int(fit.labels.max()) < 8


CACHE_PROBE = """
import json, sys
from kmgpu import cpu_kernels as c
groups = sys.argv[1:] or sorted(c._WARM_GROUPS)
missing = [g for g in groups if c._uncached(g)]
if sys.argv[1:]:
    c._compile_side_by_side(groups)
print(json.dumps([missing, [g for g in groups if c._uncached(g)]]))
"""


def test_kernels_missing_from_the_cache_compile_side_by_side_into_it(tmp_path):
    """A fresh cache: the groups compile in this process and a child, each into numba's disk cache,
    which a new process then finds (and no half-written file is left)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def probe(*groups):
        done = subprocess.run([sys.executable, "-c", CACHE_PROBE, *groups], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    groups = ["quality", "seeds"]  # the two quickest to compile: one here, one in a child on 2 cores
    assert probe(*groups) == [groups, []]
    cached = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert {"cpu_kernels._quality", "cpu_kernels._kmeans_plusplus"} <= cached
    assert not [p for p in tmp_path.rglob("*") if ".tmp." in p.name]
    missing, _ = probe()  # a new process: only the others are missing
    assert set(missing) == set(cpu_kernels._WARM_GROUPS) - set(groups)


def test_a_cold_cache_is_announced_and_only_its_missing_kernels_compiled_apart(monkeypatch):
    calls, notes = [], []
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: group in ("png", "dither"))
    monkeypatch.setattr(cpu_kernels, "_compile_side_by_side", calls.append)
    monkeypatch.setattr(cpu_kernels, "available_cores", lambda: 2)
    cpu_kernels.warm_up(notes.append)
    assert calls == [["png", "dither"]] and len(notes) == 1 and "compiling" in notes[0]
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: False)
    cpu_kernels.warm_up(notes.append)  # all cached: loaded here, nothing said
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: group == "png")
    cpu_kernels.warm_up(notes.append)  # one group: compiled here, no child to wait for
    assert calls == [["png", "dither"]] and len(notes) == 2


def test_kernels_a_command_will_not_run_load_only_when_a_later_one_will(monkeypatch):
    """compiled(without=...) leaves those groups out; the kernels' own calls (no ``without``) load
    nothing more; a later command that runs them loads them then, before it forks its workers."""
    loaded = []
    monkeypatch.setattr(cpu_kernels, "_ready", False)
    monkeypatch.setattr(cpu_kernels, "_left", frozenset())
    monkeypatch.setattr(cpu_kernels, "_uncached", lambda group: False)
    monkeypatch.setattr(cpu_kernels, "_warm", loaded.append)
    everything = list(cpu_kernels._WARM_GROUPS)
    assert cpu_kernels.compiled(without=("dither", "not a group"))
    assert loaded == [[group for group in everything if group != "dither"]]
    assert cpu_kernels.compiled() and cpu_kernels.compiled(without=("dither",)) and len(loaded) == 1
    assert cpu_kernels.compiled(without=())
    assert loaded[1:] == [["dither"]]
    assert cpu_kernels.compiled(without=()) and cpu_kernels.compiled(without=("dither",)) and len(loaded) == 2


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 4),
    k=st.integers(1, 90),  # both ways of taking the runner-up (cpu_kernels._ONE_SWEEP_BELOW)
    n=st.integers(1, 300),
    moves=st.lists(st.floats(0.0, 60.0), min_size=1, max_size=6),
    seed=st.integers(0, 2**31),
)
def test_bounded_search_matches_brute_force_however_centers_move(d, k, n, moves, seed):
    """Points on integers, centers moved by random steps of any size: labels and distances as brute force."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, n, d), generator=g).float()
    c = torch.randint(0, 64, (2, k, d), generator=g).float()
    kb = torch.tensor([k, max(1, k // 2)])
    bounds, labels = cpu_kernels.Bounds(x), None
    for step in moves:
        c = (c + (torch.rand(c.shape, generator=g) - 0.5) * step).contiguous()
        labels, dist, _, _ = cpu_kernels.nearest(x, torch.ones(2, n), c, kb, bounds=bounds, previous=labels, sums=True)
        best, _ = brute(x, c, kb)
        d_mine = ((x - c.gather(1, labels.unsqueeze(-1).expand(-1, -1, d))) ** 2).sum(-1).double()
        torch.testing.assert_close(d_mine, best, rtol=1e-5, atol=1e-4)  # the label is a nearest center
        torch.testing.assert_close(dist.double(), best, rtol=1e-5, atol=1e-4)
        assert bool((labels < kb.view(-1, 1)).all())


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(1, 3),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    levels=st.sampled_from([2, 5, 256]),
    seed=st.integers(0, 2**16),
)
def test_distinct_colors_and_count_colors_are_a_sort_of_the_keys(channels, sizes, levels, seed):
    """Each image's keys and counts as torch.unique gives them, by either table, and from the small
    one each pixel's row; through the large table, each pixel's label is its color's. The large table
    is left clean."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.randint(0, levels, (sum(sizes), channels), generator=g) * (255 // max(1, levels - 1))).to(
        torch.uint8
    )
    keys, counts, inverse, per_image = cpu_kernels.distinct_colors(pixels, sizes)
    keys2, counts2, per_image2 = cpu_kernels.count_colors(pixels, sizes)
    assert per_image.tolist() == per_image2.tolist() == [len(torch.unique(p, dim=0)) for p in pixels.split(sizes)]
    assert inverse.dtype == keys.dtype == keys2.dtype == torch.int32  # half the bytes of int64
    packed = sum(pixels[:, ch].long() << (8 * ch) for ch in range(channels))
    start = row = 0
    for size, m in zip(sizes, per_image.tolist()):
        want, want_inverse, want_counts = torch.unique(
            packed[start : start + size], return_inverse=True, return_counts=True
        )
        assert torch.equal(keys[row : row + m].long(), want) and torch.equal(counts[row : row + m], want_counts)
        assert torch.equal(keys2[row : row + m].long(), want) and torch.equal(counts2[row : row + m], want_counts)
        assert torch.equal(inverse[start : start + size], want_inverse + row)
        start, row = start + size, row + m
    labels = torch.randint(0, 256, (keys2.numel(),), generator=g).to(torch.uint8)
    got = cpu_kernels.label_pixels(pixels, sizes, keys2, per_image2.tolist(), labels)
    assert got.dtype == torch.uint8 and torch.equal(got, labels[inverse.long()])
    assert not cpu_kernels._tables.table.any()


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(1, 3),
    bits=st.integers(1, 8),
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_grid_bins_are_the_sorted_bins(channels, bits, sizes, seed):
    """The coarse grid's bins, counts, means and each color's bin as the torch path makes them, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    colors, counts, distinct = [], [], []
    for size in sizes:  # each image's distinct colors, sorted by packed key, as the histogram gives them
        packed = torch.unique(torch.randint(0, 1 << (8 * channels), (size,), generator=g))
        colors.append(torch.stack([(packed >> (8 * ch)) & 255 for ch in range(channels)], 1).to(torch.uint8))
        counts.append(torch.randint(1, 10_000, (packed.numel(),), generator=g))
        distinct.append(packed.numel())
    colors, counts, n = torch.cat(colors), torch.cat(counts), len(sizes)
    of = q._Ragged(torch.repeat_interleave(torch.arange(n), torch.tensor(distinct)), n)
    fast = q._coarse_bins(colors, counts, of, bits, n)
    with mock.patch.dict(os.environ, {"KMGPU_NUMBA": "0"}):
        slow = q._coarse_bins(colors, counts, of, bits, n)
    assert fast[1].host_sizes == slow[1].host_sizes
    for a, b in zip(fast[:1] + fast[2:], slow[:1] + slow[2:]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert not cpu_kernels._tables.table.any()


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 40),
    levels=st.sampled_from([2, 5, 256]),
    packed=st.booleans(),
    has_above=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_png_filters_are_the_numpy_filters(h, w, levels, packed, has_above, seed):
    """Rows with few levels tie often (the first filter of equal cost must win); with all 256 the
    differences wrap, and Paeth meets every branch."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, levels, (h, w), dtype=np.uint8)
    rows[rng.random((h, w)) < 0.3] = 255 if levels == 256 else 0
    above = rng.integers(0, levels, (1, w), dtype=np.uint8) if has_above else None
    filters = png._PACKED_FILTERS if packed else png._ALL_FILTERS
    ours = cpu_kernels.filter_rows(rows, above, filters)
    assert ours.dtype == np.uint8 and ours.shape == (h, w + 1)
    np.testing.assert_array_equal(ours, png._filtered_numpy(rows, above, filters))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 256), channels=st.integers(1, 4), levels=st.sampled_from([3, 256]), seed=st.integers(0, 2**32 - 1)
)
def test_palette_chain_is_the_numpy_chain(k, channels, levels, seed):
    """png.smooth_order's nearest-neighbour chain, compiled, is the NumPy one index for index: with 3 levels
    a channel, distances tie all the time and the lowest index must win."""
    palette = np.random.default_rng(seed).integers(0, levels, (k, channels), dtype=np.uint8)
    ours = png.smooth_order(palette)
    with mock.patch.dict(os.environ, {"KMGPU_NUMBA": "0"}):
        theirs = png.smooth_order(palette)
    np.testing.assert_array_equal(ours, theirs)
    assert sorted(ours.tolist()) == list(range(k))


def test_png_files_are_the_same_with_either_filter_code(monkeypatch):
    """The whole file, from a quantized photo, at 8 bits and packed: the compiled filters change no byte."""
    with Image.open(SAMPLES / "rocket.jpg") as im:
        photo = np.ascontiguousarray(np.asarray(im.convert("RGB"))[::2, ::2])
    files = {}
    for compiled in (True, False):
        monkeypatch.setattr(cpu_kernels, "compiled", lambda compiled=compiled: compiled)
        for k in (16, 64):
            palette, indices, _ = quantize_pixels(photo, k, device="cpu")
            files[compiled, k] = png.encode_palette_png(indices, palette)
    assert files[True, 16] == files[False, 16] and files[True, 64] == files[False, 64]
    assert files[True, 16] != files[True, 64]


def dither_reference(px: np.ndarray, palette: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``cpu_kernels.dither`` written out plainly, float32 as the kernel computes, with a brute-force nearest."""
    h, w, c = px.shape
    pal = palette.astype(np.float32)
    f32 = np.float32
    rms = np.sqrt(((px.astype(np.float64) - palette[labels].astype(np.float64)) ** 2).sum() / (h * w))
    cap = f32(max(cpu_kernels._DITHER_CAP_LEAST, cpu_kernels._DITHER_CAP_RMS * rms))
    # contrast: the largest second difference over channels and axes, borders repeated; then its 3 x 3 maximum
    p = np.pad(px.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    second = np.maximum(np.abs(p[1:-1, :-2] + p[1:-1, 2:] - 2 * p[1:-1, 1:-1]),
                        np.abs(p[:-2, 1:-1] + p[2:, 1:-1] - 2 * p[1:-1, 1:-1])).max(2)  # fmt: skip
    q = np.pad(second, 1, mode="edge")
    most = np.max([q[i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)
    gain = (cpu_kernels._DITHER_ATTENUATION * np.maximum(0.0, 1.0 - most / cpu_kernels._DITHER_FLAT_BELOW)).astype(f32)
    err = np.zeros((h + 1, w + 2, c), np.float32)  # err[r, i + 1]: the error pixel (r, i) receives
    out = np.empty((h, w), np.uint8)
    for r in range(h):
        cols = range(w) if r % 2 == 0 else range(w - 1, -1, -1)
        step = 1 if r % 2 == 0 else -1
        for i in cols:
            e = err[r, i + 1] * gain[r, i]
            length = np.sqrt(f32((e * e).sum(dtype=np.float32)))
            scale = f32(0) if length < cpu_kernels._DITHER_DEAD else (cap / length if length > cap else f32(1))
            x = np.clip(px[r, i].astype(np.float32) + e * scale, f32(0), f32(255))
            d = np.zeros(len(pal), np.float32)
            for ch in range(c):  # summed channel by channel, as the kernel does
                d += (x[ch] - pal[:, ch]) ** 2
            best = int(d.argmin())
            out[r, i] = best
            qe = x - pal[best]
            err[r, i + 1 + step] += qe * f32(7 / 16)
            err[r + 1, i + 1 + step] += qe * f32(1 / 16)
            err[r + 1, i + 1] += qe * f32(5 / 16)
            err[r + 1, i + 1 - step] += qe * f32(3 / 16)
    return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("k", [2, 16, 256])
def test_dither_does_what_it_says(channels, k):
    """The compiled error diffusion equals a plain loop with a brute-force nearest, pixel for pixel:
    a photo's corner (edges, texture), a gradient, and a palette with a repeated entry (ties)."""
    rng = np.random.default_rng(k)
    with Image.open(SAMPLES / "coffee.png") as im:
        photo = np.asarray(im.convert("RGB"))[150:174, 200:230, :channels]
    ramp = np.linspace(0, 255, 30, dtype=np.float64)[None, :, None] + np.zeros((18, 1, channels))
    for px in (photo, (ramp + rng.normal(0, 2, ramp.shape)).clip(0, 255).astype(np.uint8)):
        px = np.ascontiguousarray(px)
        palette = rng.integers(0, 256, (k, channels), dtype=np.uint8)
        palette[-1] = palette[0]  # a tie: the lower index must win
        d = ((px.reshape(-1, 1, channels).astype(np.int64) - palette[None].astype(np.int64)) ** 2).sum(-1)
        labels = d.argmin(1).reshape(px.shape[:2]).astype(np.uint8)
        np.testing.assert_array_equal(cpu_kernels.dither(px, palette, labels), dither_reference(px, palette, labels))


def test_dither_without_error_is_the_exact_nearest(monkeypatch):
    """With nothing diffused, every pixel takes its exactly nearest entry (the grid cells' candidate lists
    miss none), the lowest index among equals, for 1 to 4 channels and up to 256 entries."""
    monkeypatch.setattr(cpu_kernels, "_DITHER_ATTENUATION", 0.0)
    rng = np.random.default_rng(0)
    for channels in (1, 2, 3, 4):
        for k in (2, 17, 256):
            px = rng.integers(0, 256, (40, 50, channels), dtype=np.uint8)
            palette = rng.integers(0, 256, (k, channels), dtype=np.uint8)
            palette[k // 2] = palette[0]
            d = ((px.reshape(-1, 1, channels).astype(np.int64) - palette[None].astype(np.int64)) ** 2).sum(-1)
            nearest = d.argmin(1).reshape(40, 50).astype(np.uint8)
            np.testing.assert_array_equal(cpu_kernels.dither(px, palette, nearest), nearest)
