import functools
import importlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans as SKKMeans
from sklearn.datasets import make_blobs

from kmgpu import KMeans, KMeansWarning, cpu_kernels, kmeans
from kmgpu.kmeans import NotFittedError, assign
from kmgpu.quantize import color_histogram

from .conftest import needs_cuda, sample_pixels

# the module, not the function of the same name that kmgpu exports
km = importlib.import_module("kmgpu.kmeans")


@pytest.fixture(autouse=True, params=["compiled", "generic"])
def cpu_search(request, monkeypatch):
    """Every test here runs with both CPU searches: numba's (cpu_kernels.py) and torch's."""
    if request.param == "generic":
        monkeypatch.setenv("KMGPU_NUMBA", "0")
    elif not cpu_kernels.usable(torch.zeros(1, 1, 3)):
        pytest.skip("the compiled CPU kernels are off here (no numba, or KMGPU_NUMBA=0)")
    return request.param


# ---------------------------------------------------------------- exact fixtures
def test_hand_computed_two_clusters():
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    r = kmeans(x, 2, init=torch.tensor([[1.0, 1.0], [9.0, 1.0]]), device="cpu")
    assert torch.equal(r.centers, torch.tensor([[0.0, 1.0], [10.0, 1.0]]))
    assert r.labels.tolist() == [0, 0, 1, 1]
    assert float(r.inertia) == 4.0
    assert bool(r.converged)


def test_hand_computed_weighted_1d():
    # centers {0.75, 10}: inertia 1 * 0.75^2 + 3 * 0.25^2 + 2 * 0 = 0.75
    r = kmeans(torch.tensor([[0.0], [1.0], [10.0]]), 2, torch.tensor([1.0, 3.0, 2.0]), seed=0, device="cpu")
    order = r.centers[:, 0].argsort()
    assert r.centers[order, 0].tolist() == [0.75, 10.0]
    assert float(r.inertia) == pytest.approx(0.75, abs=1e-6)
    assert r.labels[0] == r.labels[1] != r.labels[2]


# ---------------------------------------------------------------- properties
def test_inertia_never_rises_on_photo(coffee_small):
    r = kmeans(coffee_small, 32, seed=1, device="cpu")
    inertias = [float(h.inertia) for h in r.history] + [float(r.inertia)]
    assert len(inertias) > 3
    for before, after in zip(inertias, inertias[1:]):
        assert after <= before * (1 + 1e-6)


@pytest.mark.parametrize("final_labels, tol", [(True, 1e-4), (False, 1e-4), (False, 3e-2)])
def test_batched_equals_one_by_one(final_labels, tol):
    gen = np.random.default_rng(0)
    sizes, ks = [500, 1200, 80], [5, 12, 3]
    problems = [gen.normal(size=(n, 3)).astype(np.float32) * 40 + 100 for n in sizes]
    inits = [p[gen.choice(len(p), k, replace=False)] for p, k in zip(problems, ks)]
    n_max, k_max = max(sizes), max(ks)
    x = np.zeros((3, n_max, 3), np.float32)
    w = np.zeros((3, n_max), np.float32)
    c0 = np.zeros((3, k_max, 3), np.float32)
    for b, (p, c) in enumerate(zip(problems, inits)):
        x[b, : len(p)] = p
        w[b, : len(p)] = 1
        c0[b, : len(c)] = c
    options = dict(device="cpu", final_labels=final_labels, tol=tol)
    batched = kmeans(x, ks, w, init=c0, **options)
    for b, (p, c, k) in enumerate(zip(problems, inits, ks)):
        alone = kmeans(p, k, init=c, **options)
        n = len(p)
        assert torch.equal(batched.labels[b, :n], alone.labels)
        torch.testing.assert_close(batched.centers[b, :k], alone.centers, rtol=1e-5, atol=1e-4)
        assert torch.all(batched.centers[b, k:] == 0)
        assert int(batched.n_iter[b]) == int(alone.n_iter)
        assert float(batched.inertia[b]) == pytest.approx(float(alone.inertia), rel=1e-5)


def test_kmeanspp_in_a_batch_equals_alone():
    """Each problem draws from its own stream: a batch (or a resumed pipeline) changes nothing."""
    gen = np.random.default_rng(1)
    problems = [gen.uniform(0, 255, size=(n, 3)).astype(np.float32) for n in (3000, 700, 25000)]
    n_max = max(len(p) for p in problems)
    x = np.zeros((3, n_max, 3), np.float32)
    w = np.zeros((3, n_max), np.float32)
    for b, p in enumerate(problems):
        x[b, : len(p)], w[b, : len(p)] = p, 1
    keys = [101, 202, 303]
    batched = kmeans(x, 16, w, seed=5, problem_keys=keys, init_size=20000, device="cpu")
    for b, p in enumerate(problems):
        alone = kmeans(p, 16, seed=5, problem_keys=[keys[b]], init_size=20000, device="cpu")
        assert torch.equal(batched.labels[b, : len(p)], alone.labels)
        torch.testing.assert_close(batched.centers[b], alone.centers, rtol=1e-6, atol=1e-4)
    other_key = kmeans(problems[0], 16, seed=5, problem_keys=[999], device="cpu")
    assert not torch.equal(other_key.centers, kmeans(problems[0], 16, seed=5, problem_keys=[101], device="cpu").centers)


def test_kmeanspp_host_loop_equals_batched_version(coffee_small):
    """The CPU's one-problem-at-a-time k-means++ draws the same centers as the batched one CUDA runs."""
    gen = np.random.default_rng(4)
    x = torch.zeros(4, 3000, 3)
    w = torch.zeros(4, 3000)
    x[0], w[0] = torch.from_numpy(coffee_small[:3000]).float() - 120, 1  # repeated colors: ties in distance
    x[1, :2000], w[1, :2000] = torch.from_numpy(gen.normal(0, 40, (2000, 3))).float(), 1
    w[1, :2000] *= torch.from_numpy(gen.uniform(0.5, 5, 2000)).float()
    x[2, :5], w[2, :5] = torch.arange(15.0).view(5, 3), 1  # fewer points than k: draws fall back to weights
    x[3] = torch.from_numpy(gen.uniform(-128, 128, (3000, 3))).float()
    w[3] = 1
    k = torch.tensor([64, 30, 64, 12])
    streams = km._Streams(7, torch.tensor([1, 2, 3, 4]), torch.device("cpu"))
    batched = km._kmeans_plusplus(x, w, k, 64, streams, 1)
    host = km._kmeans_plusplus_host(x, w, k, 64, streams, 1)
    for b in range(4):
        kb = int(k[b])
        assert torch.equal(host[b, :kb], batched[b, :kb])
        assert len({tuple(c) for c in host[b, :kb].tolist()}) == min(kb, int((w[b] > 0).sum()))


@pytest.mark.parametrize("d", [1, 2, 4])
def test_kmeanspp_host_loop_equals_batched_version_in_other_dimensions(d):
    """Gray, gray + alpha and RGBA points: the same centers from both versions."""
    gen = np.random.default_rng(d)
    x = torch.from_numpy(gen.integers(0, 256, (2, 2000, d))).float() - 128
    w = torch.from_numpy(gen.integers(1, 50, (2, 2000))).float()
    k = torch.tensor([40, 17])
    streams = km._Streams(3, torch.tensor([5, 6]), torch.device("cpu"))
    batched = km._kmeans_plusplus(x, w, k, 40, streams, 1)
    host = km._kmeans_plusplus_host(x, w, k, 40, streams, 1)
    assert torch.equal(host[0], batched[0]) and torch.equal(host[1, :17], batched[1, :17])


@pytest.mark.parametrize("d", [1, 3, 4, 16])
@pytest.mark.parametrize("extent", [1e-3, 255.0, 3e7])
def test_kmeanspp_grid_distances_are_exact_in_float32(d, extent):
    """k-means++'s grid points make the float32 product exact: it cannot depend on kernels or threads."""
    gen = np.random.default_rng(d)
    x = torch.from_numpy(gen.uniform(-extent, extent, (2, 500, d))).float()
    w = torch.ones(2, 500)
    w[1, 400:] = 0  # padding does not set the scale
    x[1, 400:] = 1e9 * extent
    g = km._kpp_grid(x, w)
    assert torch.equal(g, g.round())
    reach = 2048 / d**0.5
    assert float(g.abs().max()) <= reach and float(g[:, :400].abs().max()) > reach / 2  # the grid is used
    g_sq = (g * g).sum(-1, keepdim=True)
    rows = torch.cat([g, g_sq, torch.ones_like(g_sq)], -1)
    cols = torch.cat([-2 * g, torch.ones_like(g_sq), g_sq], -1).transpose(1, 2)
    exact = (g.double().unsqueeze(2) - g.double().unsqueeze(1)).square().sum(-1)
    assert torch.equal(torch.bmm(rows, cols).double(), exact)


def test_each_problem_converges_on_its_own():
    easy = np.repeat(np.array([[0.0, 0.0], [50.0, 50.0]]), 100, axis=0)
    hard = np.random.default_rng(3).uniform(0, 100, size=(200, 2))
    r = kmeans(np.stack([easy, hard]).astype(np.float32), [2, 8], seed=0, device="cpu", tol=0)
    assert int(r.n_iter[0]) < int(r.n_iter[1])
    assert r.history[0].active == 2 and r.history[-1].active == 1
    assert torch.isnan(r.history[-1].inertia[0])  # problem 0 no longer iterated
    assert bool(r.converged.all())
    # Every iteration's record stays as it was made: both problems' inertias while both ran,
    # never rising, and the final inertia of problem 0 is that of its last iteration.
    first = int(r.n_iter[0])
    for h in r.history[:first]:
        assert not torch.isnan(h.inertia).any()
    hard_inertia = [float(h.inertia[1]) for h in r.history]
    assert all(b <= a + 1e-6 for a, b in zip(hard_inertia, hard_inertia[1:]))
    assert float(r.history[first - 1].inertia[0]) == pytest.approx(float(r.inertia[0]), abs=1e-6)


def test_over_relaxed_lloyd_never_rises_and_stops_at_a_lloyd_fixed_point(coffee_small):
    x = torch.from_numpy(coffee_small).float()
    r = kmeans(x, 32, seed=0, relax=1.8, tol=1e-9, max_iter=500, device="cpu")
    assert bool(r.converged) and int(r.n_iter) > 10
    inertias = [float(h.inertia) for h in r.history]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(inertias, inertias[1:]))  # float32 distances are rounded
    # A plain Lloyd step from where it stopped moves nothing: the centers are their clusters' means.
    step = kmeans(x, 32, init=r.centers, max_iter=1, tol=0, device="cpu")
    torch.testing.assert_close(step.centers, r.centers, rtol=0, atol=1e-3)


def test_over_relaxation_fits_better_in_few_steps(coffee_small):
    """From the same start, 8 over-relaxed steps leave a lower inertia than 8 of Lloyd's, at several k."""
    x = torch.from_numpy(coffee_small).float()
    for k in (16, 64):
        start = kmeans(x, k, seed=1, max_iter=1, device="cpu").centers
        plain = kmeans(x, k, init=start, max_iter=8, tol=0, device="cpu")
        relaxed = kmeans(x, k, init=start, max_iter=8, tol=0, relax=1.8, device="cpu")
        assert float(relaxed.inertia) < float(plain.inertia)


def test_histogram_equals_all_pixels(coffee_small):
    pixels = torch.from_numpy(coffee_small)
    hist = color_histogram(pixels)
    assert int(hist.counts.sum()) == pixels.shape[0]
    init = hist.colors[torch.randperm(hist.colors.shape[0], generator=torch.Generator().manual_seed(0))[:24]]
    full = kmeans(pixels, 24, init=init.float(), device="cpu")
    compact = kmeans(hist.colors, 24, hist.counts, init=init.float(), device="cpu")
    torch.testing.assert_close(full.centers, compact.centers, rtol=1e-4, atol=1e-3)
    assert float(compact.inertia) == pytest.approx(float(full.inertia), rel=1e-5)
    assert torch.equal(compact.labels[hist.inverse], full.labels)


def test_small_blocks_give_the_same_fit(coffee_small):
    big = kmeans(coffee_small, 16, seed=4, device="cpu")
    small = kmeans(coffee_small, 16, seed=4, device="cpu", chunk_bytes=4096)
    torch.testing.assert_close(big.centers, small.centers, rtol=1e-5, atol=1e-3)
    assert float(small.inertia) == pytest.approx(float(big.inertia), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(10, 120),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_one_more_cluster_never_fits_worse(n, k, seed):
    x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    k = min(k, n - 1)
    fit_k = kmeans(x, k, seed=seed, device="cpu")
    # Start k + 1 from the k centers plus the worst-fitted point: Lloyd can only improve on it.
    _, dist = assign(torch.from_numpy(x), fit_k.centers)
    init = torch.cat([fit_k.centers, torch.from_numpy(x)[dist.argmax()][None]])
    fit_k1 = kmeans(x, k + 1, init=init, device="cpu")
    assert float(fit_k1.inertia) <= float(fit_k.inertia) * (1 + 1e-5) + 1e-4


# ---------------------------------------------------------------- references
def test_inertia_near_sklearn_on_photo_pixels():
    pixels = sample_pixels("astronaut.png", step=2).astype(np.float32)
    ours = KMeans(16, n_init=3, seed=0, device="cpu").fit(pixels)
    ref = SKKMeans(16, n_init=3, random_state=0).fit(pixels)
    assert ours.inertia_ <= ref.inertia_ * 1.01


def test_inertia_near_sklearn_on_blobs():
    x, _ = make_blobs(n_samples=5000, centers=10, n_features=5, cluster_std=2.0, random_state=0)
    x = x.astype(np.float32)
    ours = KMeans(10, n_init=1, seed=0, device="cpu").fit(x)
    ref = SKKMeans(10, n_init=1, random_state=0).fit(x)
    assert ours.inertia_ <= ref.inertia_ * 1.01
    # sklearn's inertia is the same objective: recompute it from our centers.
    d = ((x[:, None, :] - ours.cluster_centers_[None]) ** 2).sum(-1).min(1).sum()
    assert ours.inertia_ == pytest.approx(d, rel=1e-4)


# ---------------------------------------------------------------- degenerate input
def test_fewer_distinct_points_than_k_warns_and_stays_valid():
    x = np.array([[1.0, 1.0]] * 5 + [[4.0, 4.0]] * 5 + [[9.0, 0.0]] * 2, np.float32)
    with pytest.warns(KMeansWarning, match="only 3 distinct points for n_clusters=5"):
        r = kmeans(x, 5, seed=0, device="cpu")
    assert torch.isfinite(r.centers).all()
    assert float(r.inertia) == 0.0
    # every point sits on its own center, and the 3 distinct points are all centers
    torch.testing.assert_close(r.centers[r.labels], torch.from_numpy(x))
    assert {tuple(c) for c in r.centers.tolist()} == {(1.0, 1.0), (4.0, 4.0), (9.0, 0.0)}


def test_all_points_equal():
    x = np.full((50, 3), 7.0, np.float32)
    with pytest.warns(KMeansWarning):
        r = kmeans(x, 4, seed=0, device="cpu")
    assert torch.all(r.centers == 7.0)
    assert float(r.inertia) == 0.0
    assert torch.all(r.labels == 0)


def test_single_point():
    r = kmeans(np.array([[3.0, -1.0]]), 1, device="cpu")
    assert r.centers.tolist() == [[3.0, -1.0]] and r.labels.tolist() == [0] and float(r.inertia) == 0.0


@pytest.mark.parametrize(
    "points, k, kwargs, message",
    [
        (np.array([[0.0, np.nan], [1.0, 1.0]]), 1, {}, r"NaN or inf \(first at index \(0, 0, 1\)\)"),
        (np.array([[0.0, np.inf], [1.0, 1.0]]), 1, {}, "NaN or inf"),
        (np.array([[np.inf, 0.0], [-np.inf, 1.0]]), 1, {}, r"points contain NaN or inf \(first at index \(0, 0, 0\)\)"),
        (np.zeros((4, 2)), 2, {"weights": [1, np.nan, 1, 1]}, r"weights contain NaN or inf \(first at index \(0, 1"),
        (np.zeros((4, 2)), 2, {"init": [[0.0, 0.0], [np.inf, 0.0]]}, "init centers contain NaN or inf"),
        (np.eye(4, 2), 2, {"init": np.eye(2), "init_labels": [0, 1, 2, 0]}, "init_labels must lie in 0 to 1"),
        (np.eye(4, 2), 2, {"init": np.eye(2), "init_labels": [0, -1, 1, 0]}, "init_labels must lie in 0 to 1"),
        (np.zeros((4, 2)), 2, {"weights": [1.0, 1.0, -0.5, 1.0]}, "weights must be >= 0"),
        (np.zeros((4, 2)), 0, {}, "n_clusters=0 is out of range"),
        (np.zeros((4, 2)), 5, {}, "n_clusters=5 exceeds the 4 points"),
        (np.zeros(4), 1, {}, r"shape \(N, d\) or \(B, N, d\), got shape \(4,\)"),
        (np.zeros((4, 2)), 2, {"weights": -np.ones(4)}, "weights must be >= 0"),
        (np.zeros((4, 2)), 2, {"weights": np.ones(3)}, "weights must have shape"),
        (np.zeros((4, 2)), 2, {"init": "kmeans||"}, "init='kmeans\\|\\|' is not an initialisation"),
        (np.zeros((4, 2)), 2, {"init": np.zeros((1, 2))}, "init centers must have shape"),
        (np.zeros((4, 2)), 2, {"device": "gpu"}, "device='gpu' is not a device"),
        (np.zeros((4, 2)), 2, {"max_iter": 0}, "max_iter=0"),
        (np.zeros((4, 2)), 2, {"relax": 2.0}, "relax=2.0 is out of range"),
        (np.zeros((4, 2)), 2, {"relax": float("nan")}, "relax=nan is out of range"),
    ],
)
def test_bad_input_names_the_value(points, k, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kmeans(points, k, **kwargs)


def test_the_finite_check_is_exact_where_the_sum_overflows():
    from kmgpu.kmeans import _check_finite

    _check_finite(torch.full((4, 2), 3e38), "points")  # the float32 sum is inf; every value is finite
    with pytest.raises(ValueError, match=r"points contain NaN or inf \(first at index \(3, 1\)\)"):
        _check_finite(torch.tensor([[3e38, 3e38]] * 3 + [[3e38, float("nan")]]), "points")


def test_padding_never_counts_toward_k():
    x = np.zeros((1, 6, 2), np.float32)
    x[0, :2] = [[1, 1], [2, 2]]
    w = np.array([[1, 1, 0, 0, 0, 0]], np.float32)
    with pytest.raises(ValueError, match="exceeds the 2 points with positive weight of problem 0"):
        kmeans(x, 3, w)


# ---------------------------------------------------------------- empty clusters
def test_empty_clusters_are_repaired():
    x = np.random.default_rng(0).uniform(0, 255, size=(2000, 3)).astype(np.float32)
    init = np.repeat(x[:1], 8, axis=0)  # 8 identical centers: 7 start empty
    r = kmeans(x, 8, init=init, device="cpu")
    assert r.history[0].empty_repaired == 7
    assert torch.isfinite(r.centers).all()
    assert len({tuple(c) for c in r.centers.tolist()}) == 8
    assert torch.bincount(r.labels, minlength=8).min() > 0


def test_random_init_uses_every_cluster():
    pixels = sample_pixels("camera.png", step=4)
    r = kmeans(pixels, 64, init="random", seed=0, device="cpu")
    assert torch.bincount(r.labels, minlength=64).min() > 0


# ---------------------------------------------------------------- determinism
def test_same_seed_same_bits(coffee_small):
    a = kmeans(coffee_small, 32, seed=7, device="cpu")
    b = kmeans(coffee_small, 32, seed=7, device="cpu")
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    c = kmeans(coffee_small, 32, seed=8, device="cpu")
    assert not torch.equal(a.centers, c.centers)


def test_n_init_keeps_the_best_run(coffee_small):
    runs = [float(kmeans(coffee_small, 8, seed=s, device="cpu", init="random").inertia) for s in range(3)]
    gen = torch.Generator().manual_seed(0)
    best = kmeans(coffee_small, 8, generator=gen, n_init=5, device="cpu", init="random")
    assert float(best.inertia) <= max(runs)
    _, dist = assign(torch.from_numpy(coffee_small), best.centers)
    assert float(dist.double().sum()) == pytest.approx(float(best.inertia), rel=1e-5)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_starts_side_by_side_equal_one_after_another(coffee_small, monkeypatch, init):
    batched = kmeans(coffee_small[:6000], 12, seed=2, n_init=3, init=init, device="cpu")
    monkeypatch.setattr(km, "_BATCHED_STARTS_POINTS", 0)  # force the one-by-one loop
    sequential = kmeans(coffee_small[:6000], 12, seed=2, n_init=3, init=init, device="cpu")
    assert torch.equal(batched.centers, sequential.centers) and torch.equal(batched.labels, sequential.labels)
    assert float(batched.inertia) == float(sequential.inertia) and int(batched.n_iter) == int(sequential.n_iter)


# ---------------------------------------------------------------- passes saved: guesses, no final pass
def test_init_labels_guess_changes_nothing_but_the_work(coffee_small, monkeypatch, cpu_search):
    x = torch.from_numpy(coffee_small).float()
    coarse = kmeans(x, 48, seed=3, max_iter=4, device="cpu")
    plain = kmeans(x, 48, init=coarse.centers, max_iter=6, device="cpu")
    guessed, searched = [], []
    if cpu_search == "generic":
        real = km._nearest_into

        def spy(part, best, lab, guess):
            guessed.append(guess)
            return real(part, best, lab, guess)

        monkeypatch.setattr(km, "_nearest_into", spy)
    else:
        real = cpu_kernels._search

        def spy(*args):
            guessed.append(args[-3])
            searched.append(real(*args))
            return searched[-1]

        monkeypatch.setattr(cpu_kernels, "_search", spy)
        monkeypatch.setattr(cpu_kernels, "_THREAD_WORK", 2**40)  # one thread: one count per pass
        # Lloyd's passes call the search from compiled code; run it apart, where the spy sees it.
        monkeypatch.setattr(cpu_kernels, "lloyd", functools.partial(cpu_kernels.lloyd, split=True))
    # The coarse fit's labels against its own final centers: a good guess; then a poor one (all 0).
    for guess in (coarse.labels, torch.zeros_like(coarse.labels)):
        guessed.clear()
        searched.clear()
        hinted = kmeans(x, 48, init=coarse.centers, max_iter=6, device="cpu", init_labels=guess)
        assert guessed and all(guessed)  # every pass, the first included, started from labels
        assert torch.equal(hinted.centers, plain.centers) and torch.equal(hinted.labels, plain.labels)
        if searched:  # the compiled search: the good guess spares most of the first pass's search
            assert (searched[0] < len(x) // 2) == (guess is coarse.labels)
    with pytest.raises(ValueError, match="init_labels must lie in 0 to 47"):
        kmeans(x, 48, init=coarse.centers, device="cpu", init_labels=torch.full_like(coarse.labels, 48))
    with pytest.raises(ValueError, match="init_labels must be integers"):
        kmeans(x, 48, init=coarse.centers, device="cpu", init_labels=coarse.labels[:10])


def test_without_final_labels_one_pass_less_same_centers(coffee_small, monkeypatch):
    x = torch.from_numpy(coffee_small[:20000]).float()
    passes = []
    real = km._Assigner.run
    monkeypatch.setattr(km._Assigner, "run", lambda self, *a, **kw: passes.append(1) or real(self, *a, **kw))
    full = kmeans(x, 16, seed=1, tol=0.0, device="cpu")
    n_full = len(passes)
    passes.clear()
    short = kmeans(x, 16, seed=1, tol=0.0, device="cpu", final_labels=False)
    assert len(passes) == n_full - 1
    assert torch.equal(short.centers, full.centers) and int(short.n_iter) == int(full.n_iter)
    # Converged with tol=0: the last iteration did not move the centers, so its labels are the final ones.
    assert bool(full.converged) and torch.equal(short.labels, full.labels)
    assert float(short.inertia) == pytest.approx(float(full.inertia), rel=1e-6)


def test_assign_guess_keeps_ties_and_finds_the_nearest():
    points = torch.tensor([[0.0], [5.0], [9.0], [10.0]])
    centers = torch.tensor([[0.0], [10.0], [10.0]])  # 5 is as near to 0 as to 10; 10 sits on two equal centers
    assert assign(points, centers)[0].tolist() == [0, 0, 1, 1]
    labels, dist = assign(points, centers, guess=torch.tensor([1, 1, 0, 2]))
    assert labels.tolist() == [0, 1, 1, 2]  # a wrong guess is searched again; a tie keeps the guess
    assert dist.tolist() == [0.0, 25.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="guess must lie in 0 to 2"):
        assign(points, centers, guess=torch.tensor([0, 0, 0, 3]))


# ---------------------------------------------------------------- memory: OOM retry
def test_out_of_memory_retries_with_smaller_blocks(monkeypatch, coffee_small):
    real_run = km._Assigner.run
    budgets = []

    def flaky(self, *args, **kwargs):
        budgets.append(self.budget)
        if len(budgets) == 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(km._Assigner, "run", flaky)
    r = kmeans(coffee_small, 8, seed=0, device="cpu", chunk_bytes=2**22)
    assert budgets[:2] == [2**22, 2**21]
    assert torch.isfinite(r.centers).all()


# ---------------------------------------------------------------- estimator
def test_estimator_contract(coffee_small):
    x = coffee_small.astype(np.float32)
    model = KMeans(12, seed=0, device="cpu")
    with pytest.raises(NotFittedError, match="not fitted"):
        model.predict(x)
    labels = model.fit_predict(x)
    assert isinstance(labels, np.ndarray) and labels.shape == (len(x),)
    assert model.cluster_centers_.shape == (12, 3) and model.n_iter_ >= 1
    np.testing.assert_array_equal(model.predict(x), model.labels_)
    dist = model.transform(x[:100])
    ref = np.sqrt(((x[:100, None, :] - model.cluster_centers_[None]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, ref, rtol=1e-4, atol=1e-3)
    assert model.score(x) == pytest.approx(-model.inertia_, rel=1e-5)
    t = model.predict(torch.from_numpy(x[:10]))
    assert isinstance(t, torch.Tensor) and t.tolist() == model.labels_[:10].tolist()
    with pytest.raises(ValueError, match="X has 2 features, but KMeans was fitted with 3"):
        model.predict(x[:, :2])


def test_one_hot_cluster_sums_agree_with_scatter_sums(coffee_small, monkeypatch, cpu_search):
    """CUDA's per-block one-hot product sums (deterministic there), run on the CPU, fit the same."""
    if cpu_search == "compiled":
        pytest.skip("the compiled search sums its clusters itself")
    x = torch.from_numpy(coffee_small).float()
    scatter = kmeans(x, 24, seed=1, max_iter=8, device="cpu", chunk_bytes=2**16)  # many blocks
    real_init = km._Assigner.__init__

    def one_hot_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.one_hot_sums = True

    monkeypatch.setattr(km._Assigner, "__init__", one_hot_init)
    one_hot = kmeans(x, 24, seed=1, max_iter=8, device="cpu", chunk_bytes=2**16)
    torch.testing.assert_close(one_hot.centers, scatter.centers, rtol=0, atol=1e-3)
    assert (one_hot.labels == scatter.labels).float().mean() > 0.999


# ---------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu(coffee_small):
    """The same answers where the arithmetic is exact; the same quality where rounding differs."""
    colors = torch.from_numpy(coffee_small).float()
    palette = colors[:: len(colors) // 40][:40]
    # 8-bit colors and an integer palette: exact distances on both devices, the same labels
    # (ties to the lowest index) and the same distances.
    cpu_labels, cpu_dist = assign(colors, palette)
    gpu_labels, gpu_dist = assign(colors.cuda(), palette.cuda())
    assert torch.equal(gpu_labels.cpu(), cpu_labels) and torch.equal(gpu_dist.cpu(), cpu_dist)
    # A fit centres the data (no longer integers), and the devices round their distances
    # differently (a fused kernel on CUDA, a matrix product on the CPU): a few points on a
    # boundary go the other way and the paths part, so they must end as good, not identical.
    init = coffee_small[:: len(coffee_small) // 32][:32].astype(np.float32)
    cpu = kmeans(coffee_small, 32, init=init, device="cpu")
    gpu = kmeans(coffee_small, 32, init=init, device="cuda")
    assert float(gpu.inertia) == pytest.approx(float(cpu.inertia), rel=1e-2)


@needs_cuda
@pytest.mark.cuda
def test_cuda_same_seed_same_bits(coffee_small):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KMeansWarning)
        a = kmeans(coffee_small, 64, seed=3, device="cuda")
        b = kmeans(coffee_small, 64, seed=3, device="cuda")
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)


@needs_cuda
@pytest.mark.cuda
def test_cuda_batched_ragged(coffee_small):
    x = torch.from_numpy(coffee_small).float()
    batch = torch.stack([x, x.flip(0)])
    w = torch.ones(2, len(x))
    w[1, len(x) // 2 :] = 0
    r = kmeans(batch, [16, 4], w, seed=0, device="cuda")
    assert r.centers.device.type == "cuda" and torch.isfinite(r.centers).all()
    assert int(r.labels[1, : len(x) // 2].max()) < 4
