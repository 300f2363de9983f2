"""Tests for jule3d.agdl: kNN affinity, initial clusters, AGDL affinity and agglomeration."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import normalized_mutual_info_score

import jule3d.agdl
from jule3d.agdl import (
    KC_CLUSTER_LIMIT,
    FixedBlock,
    agglomerate,
    agglomerate_reference,
    cluster_affinity,
    initial_clusters,
    knn_affinity,
    unfolding_merges,
)


def _mixture(n: int, seed: int, n_centers: int = 6, d: int = 32, noise: float = 0.8) -> np.ndarray:
    """L2-normalised samples around random centres."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, d))
    x = centers[rng.integers(0, n_centers, n)] + noise * rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_cluster_affinity(W: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The AGDL definition, literally, with dense matrix products per pair."""
    c = labels.max() + 1
    members = [np.flatnonzero(labels == a) for a in range(c)]
    A = np.zeros((c, c))
    for a in range(c):
        for b in range(c):
            if a == b:
                continue
            ca, cb = members[a], members[b]
            first = W[np.ix_(ca, cb)] @ W[np.ix_(cb, ca)]
            second = W[np.ix_(cb, ca)] @ W[np.ix_(ca, cb)]
            A[a, b] = first.sum() / ca.size**2 + second.sum() / cb.size**2
    return A


def _expected_next_merge(A: np.ndarray, K_c: int, lam: float) -> tuple[int, int]:
    """The JULE merge criterion evaluated from a dense affinity matrix, written independently."""
    c = A.shape[0]
    scores = np.empty(c)
    for j in range(c):
        others = np.sort(np.delete(A[j], j))[::-1]
        others = np.concatenate([others, np.zeros(K_c)])[:K_c]
        scores[j] = others[0]
        if c > KC_CLUSTER_LIMIT:
            scores[j] += lam / (K_c - 1) * np.sum(others[0] - others[1:])
    j = int(np.argmax(scores))
    row = A[j].copy()
    row[j] = -np.inf
    p = int(np.argmax(row))
    return min(j, p), max(j, p)


# ------------------------------------------------------------------------------------------
# knn_affinity
# ------------------------------------------------------------------------------------------


def test_knn_affinity_matches_definition() -> None:
    x = _mixture(60, seed=1, d=8)
    k_s = 5
    W = knn_affinity(x, k_s)
    assert sp.isspmatrix_csr(W) and W.shape == (60, 60)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nn = np.argsort(d2, axis=1)[:, :k_s]
    sigma2 = np.take_along_axis(d2, nn, axis=1).mean()
    expected = np.zeros((60, 60))
    rows = np.repeat(np.arange(60), k_s)
    expected[rows, nn.ravel()] = np.exp(-d2[rows, nn.ravel()] / sigma2)
    np.testing.assert_allclose(W.toarray(), expected, rtol=1e-12, atol=0)
    assert np.all(np.diff(W.indptr) == k_s)
    assert np.all(W.diagonal() == 0)


def test_knn_affinity_duplicates_and_float32() -> None:
    x = _mixture(40, seed=2, d=8).astype(np.float32)
    x[10] = x[3]
    x[11] = x[3]
    W = knn_affinity(x, 4)
    assert np.all(W.diagonal() == 0)
    assert np.all(np.diff(W.indptr) == 4)
    row = W[3].toarray().ravel()
    assert row[10] == pytest.approx(1.0) and row[11] == pytest.approx(1.0)
    assert np.all(np.isfinite(W.data)) and np.all(W.data > 0)


def test_knn_affinity_all_identical_points() -> None:
    W = knn_affinity(np.ones((5, 3)), 2)
    assert np.all(W.data == 1.0) and W.nnz == 10 and np.all(W.diagonal() == 0)


@pytest.mark.parametrize("k_s", [0, 10, 11, 2.5])
def test_knn_affinity_rejects_bad_k_s(k_s: object) -> None:
    with pytest.raises(ValueError, match="k_s"):
        knn_affinity(np.random.default_rng(0).normal(size=(10, 3)), k_s)


def test_knn_affinity_rejects_bad_features() -> None:
    with pytest.raises(ValueError, match="features"):
        knn_affinity(np.zeros(10), 2)
    bad = np.zeros((10, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="features"):
        knn_affinity(bad, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fixed_block_is_knn_affinity_of_the_columns_side_by_side(dtype: type) -> None:
    """The same neighbours; weights equal to float64 rounding, duplicates (distance 0) included."""
    rng = np.random.default_rng(4)
    block = (_mixture(80, seed=4, d=30) / np.sqrt(2)).astype(dtype)
    block[7] = block[2]
    fixed = FixedBlock(block)
    assert fixed.gram is not None
    for _ in range(3):  # one block, the graphs of several periods
        varying = (_mixture(80, seed=int(rng.integers(100)), d=6) / np.sqrt(2)).astype(dtype)
        varying[7] = varying[2]
        W, side_by_side = fixed.knn_affinity(varying, 6), knn_affinity(np.hstack([varying, block]), 6)
        np.testing.assert_array_equal(W.indptr, side_by_side.indptr)
        np.testing.assert_array_equal(W.indices, side_by_side.indices)
        np.testing.assert_allclose(W.data, side_by_side.data, rtol=1e-12, atol=0)
        assert W[2, 7] == pytest.approx(1.0, abs=1e-12) and np.all(W.diagonal() == 0)


def test_fixed_block_without_gram_is_knn_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block too large for its Gram matrix falls back on the columns side by side, exactly."""
    monkeypatch.setattr(jule3d.agdl, "_GRAM_BYTES", 8 * 49 ** 2)
    block, varying = _mixture(50, seed=5, d=12), _mixture(50, seed=6, d=3)
    fixed = FixedBlock(block)
    assert fixed.gram is None
    expected = knn_affinity(np.hstack([varying, block]), 5)
    W = fixed.knn_affinity(varying, 5)
    assert (W != expected).nnz == 0
    assert FixedBlock(block[:49]).gram is not None


def test_fixed_block_rejects_bad_input() -> None:
    fixed = FixedBlock(_mixture(20, seed=7, d=4))
    with pytest.raises(ValueError, match="varying has 19 rows, the fixed block 20"):
        fixed.knn_affinity(_mixture(19, seed=8, d=2), 3)
    with pytest.raises(ValueError, match="k_s"):
        fixed.knn_affinity(_mixture(20, seed=8, d=2), 20)
    with pytest.raises(ValueError, match="features"):
        FixedBlock(np.full((5, 2), np.nan))


def test_knn_affinity_approximate_close_to_exact() -> None:
    pytest.importorskip("pynndescent")
    x = _mixture(300, seed=3, d=16)
    exact = knn_affinity(x, 10)
    approx = knn_affinity(x, 10, approximate=True)
    assert np.all(np.diff(approx.indptr) == 10) and np.all(approx.diagonal() == 0)
    overlap = exact.multiply(approx > 0).nnz / exact.nnz
    assert overlap > 0.9


# ------------------------------------------------------------------------------------------
# initial_clusters
# ------------------------------------------------------------------------------------------


def test_initial_clusters_follow_nearest_neighbour_chains() -> None:
    # 0 -> 1 -> 2 -> 1 forms one chain; 3 <-> 4 another; 5 has no edge; 6 -> 4 (ties -> lowest col)
    W = np.zeros((7, 7))
    W[0, 1], W[0, 3] = 0.9, 0.5
    W[1, 2] = 0.8
    W[2, 1] = 0.7
    W[3, 4] = 0.6
    W[4, 3] = 0.6
    W[6, 4] = W[6, 5] = 0.3
    labels = initial_clusters(sp.csr_matrix(W))
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2, 1])


def test_initial_clusters_from_knn_are_first_appearance_ordered() -> None:
    W = knn_affinity(_mixture(200, seed=4), 10)
    labels = initial_clusters(W)
    firsts = [np.flatnonzero(labels == a)[0] for a in range(labels.max() + 1)]
    assert firsts == sorted(firsts)
    assert 1 < labels.max() + 1 < 200
    nearest = np.asarray(W.argmax(axis=1)).ravel()
    assert np.all(labels == labels[nearest])


# ------------------------------------------------------------------------------------------
# cluster_affinity
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cluster_affinity_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 60, 12
    W = sp.random(n, n, density=0.15, random_state=seed, format="csr")
    W.setdiag(0)
    W.eliminate_zeros()
    labels = np.concatenate([np.arange(c), rng.integers(3, c, n - c)])  # 0, 1, 2 are singletons
    rng.shuffle(labels)
    A = cluster_affinity(W, labels)
    expected = _brute_cluster_affinity(W.toarray(), labels)
    assert A.shape == (c, c)
    np.testing.assert_allclose(A, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(A, A.T)
    assert np.all(np.diag(A) == 0)
    assert np.count_nonzero(A) > 0


def test_cluster_affinity_ignores_diagonal_and_accepts_dense() -> None:
    W = sp.random(20, 20, density=0.3, random_state=5).toarray()
    labels = np.arange(20) % 4
    with_diag = W + np.eye(20)
    np.fill_diagonal(W, 0)
    np.testing.assert_array_equal(cluster_affinity(with_diag, labels), cluster_affinity(W, labels))


@pytest.mark.parametrize(
    ("W", "labels", "match"),
    [
        (np.zeros((4, 3)), np.zeros(4, dtype=int), "W"),
        (np.zeros((4, 4)), np.zeros(3, dtype=int), "labels"),
        (np.zeros((4, 4)), np.array([0, 1, 3, 3]), "labels"),
        (np.zeros((4, 4)), np.array([0.0, 1.0, 1.0, 0.0]), "labels"),
        (-np.ones((4, 4)), np.array([0, 1, 1, 0]), "W"),
    ],
)
def test_cluster_affinity_validation(W: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cluster_affinity(W, labels)


# ------------------------------------------------------------------------------------------
# agglomerate versus the reference and the criterion
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("start", ["singletons", "knn_chains"])
def test_agglomerate_matches_reference(seed: int, start: str) -> None:
    x = _mixture(300, seed=seed)
    W = knn_affinity(x, 10)
    labels = np.arange(300) if start == "singletons" else initial_clusters(W)
    c = labels.max() + 1
    assert (c > KC_CLUSTER_LIMIT) == (start == "singletons")  # both regimes are covered
    fast, fast_merges = agglomerate(W, labels, target=3, return_merges=True)
    ref, ref_merges = agglomerate_reference(W, labels, target=3, return_merges=True)
    assert fast_merges == ref_merges
    assert len(fast_merges) == c - 3
    np.testing.assert_array_equal(fast, ref)
    assert fast.max() + 1 == 3 and set(np.unique(fast)) == {0, 1, 2}


def test_agglomerate_matches_reference_other_parameters() -> None:
    W = knn_affinity(_mixture(250, seed=7), 8)
    labels = np.arange(250)
    kwargs = dict(target=2, n_merges=200, K_c=3, lam=0.5, return_merges=True)
    fast, fast_merges = agglomerate(W, labels, **kwargs)
    ref, ref_merges = agglomerate_reference(W, labels, **kwargs)
    assert fast_merges == ref_merges and len(fast_merges) == 200
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("n", [130, 60])  # K_c term on (> 100 clusters) and off
def test_agglomerate_follows_criterion_step_by_step(n: int) -> None:
    W = knn_affinity(_mixture(n, seed=8), 6)
    labels = np.arange(n)
    for _ in range(4):
        expected = _expected_next_merge(cluster_affinity(W, labels), K_c=5, lam=1.0)
        new_labels, merges = agglomerate(W, labels, target=1, n_merges=1, return_merges=True)
        assert merges == [expected]
        low, high = expected
        survivor = np.where(labels == high, low, labels)
        np.testing.assert_array_equal(new_labels, np.unique(survivor, return_inverse=True)[1])
        labels = new_labels


def test_agglomerate_in_steps_equals_one_run() -> None:
    W = knn_affinity(_mixture(300, seed=9), 10)
    labels = initial_clusters(W)
    one_run = agglomerate(W, labels, target=4)
    step = agglomerate(W, labels, target=4, n_merges=unfolding_merges(labels.max() + 1, 0.5, 4))
    np.testing.assert_array_equal(agglomerate(W, step, target=4), one_run)


def test_agglomerate_separates_blobs() -> None:
    rng = np.random.default_rng(10)
    centers = rng.normal(size=(4, 160))
    truth = np.repeat(np.arange(4), 100)
    x = centers[truth] + 0.3 * rng.normal(size=(400, 160))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    W = knn_affinity(x, 20)
    labels = agglomerate(W, initial_clusters(W), target=4)
    assert labels.max() + 1 == 4
    assert normalized_mutual_info_score(truth, labels) > 0.99


# ------------------------------------------------------------------------------------------
# agglomerate edge cases
# ------------------------------------------------------------------------------------------


def test_agglomerate_no_op_when_target_reached() -> None:
    W = knn_affinity(_mixture(30, seed=11), 5)
    labels = np.arange(30)[::-1].copy()
    out, merges = agglomerate(W, labels, target=30, return_merges=True)
    assert merges == []
    np.testing.assert_array_equal(out, labels)
    chains = initial_clusters(W)
    np.testing.assert_array_equal(agglomerate(W, chains, target=chains.max() + 5), chains)
    np.testing.assert_array_equal(agglomerate(W, chains, target=2, n_merges=0), chains)


def test_agglomerate_with_isolated_samples_and_no_edges() -> None:
    W = knn_affinity(_mixture(120, seed=12), 6).tolil()
    isolated = [5, 50, 51, 119]
    for i in isolated:
        W[i, :] = 0
        W[:, i] = 0
    W = W.tocsr()
    W.eliminate_zeros()
    labels = initial_clusters(W)
    assert all(np.sum(labels == labels[i]) == 1 for i in isolated)
    fast, fast_merges = agglomerate(W, labels, target=3, return_merges=True)
    ref, ref_merges = agglomerate_reference(W, labels, target=3, return_merges=True)
    assert fast.max() + 1 == 3
    assert fast_merges == ref_merges
    empty = sp.csr_matrix((6, 6))
    out, merges = agglomerate(empty, np.arange(6), target=2, return_merges=True)
    assert merges == [(0, 1), (0, 2), (0, 3), (0, 4)]  # all ties: lowest ids first
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, 1])
    assert agglomerate_reference(empty, np.arange(6), target=2, return_merges=True)[1] == merges


def test_agglomerate_with_duplicate_points() -> None:
    x = _mixture(150, seed=13)
    x[100:] = x[:50]  # every one of the last 50 samples duplicates an earlier one
    W = knn_affinity(x, 8)
    labels = initial_clusters(W)
    fast, fast_merges = agglomerate(W, np.arange(150), target=5, return_merges=True)
    ref, ref_merges = agglomerate_reference(W, np.arange(150), target=5, return_merges=True)
    assert fast_merges == ref_merges
    assert fast.max() + 1 == 5
    assert np.all(labels[100:] == labels[:50])
    assert agglomerate(W, labels, target=5).max() + 1 == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target=0), "target"),
        (dict(target=21), "target"),
        (dict(target=2, K_c=1), "K_c"),
        (dict(target=2, n_merges=-1), "n_merges"),
        (dict(target=2, lam=float("nan")), "lam"),
    ],
)
@pytest.mark.parametrize("function", [agglomerate, agglomerate_reference])
def test_agglomerate_validation(kwargs: dict, match: str, function: object) -> None:
    W = knn_affinity(_mixture(20, seed=14), 3)
    with pytest.raises(ValueError, match=match):
        function(W, np.arange(20), **kwargs)


def test_agglomerate_rejects_mismatched_inputs() -> None:
    W = knn_affinity(_mixture(20, seed=15), 3)
    with pytest.raises(ValueError, match="labels"):
        agglomerate(W, np.arange(19), target=2)
    with pytest.raises(ValueError, match="W"):
        agglomerate(W[:, :19], np.arange(20), target=2)


# ------------------------------------------------------------------------------------------
# unfolding_merges
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_clusters", "eta", "target", "expected"),
    [
        (100, 0.9, 3, 90),
        (100, 0.7, 3, 70),
        (10, 0.9, 5, 5),
        (3, 0.9, 3, 0),
        (2, 0.9, 5, 0),
        (7, 0.2, 1, 2),
        (4, 1.0, 1, 3),
    ],
)
def test_unfolding_merges(n_clusters: int, eta: float, target: int, expected: int) -> None:
    assert unfolding_merges(n_clusters, eta, target) == expected


@pytest.mark.parametrize(
    ("args", "match"),
    [((10, 0.0, 1), "eta"), ((10, 1.5, 1), "eta"), ((10, 0.5, 0), "target"), ((0, 0.5, 1), "n_clusters")],
)
def test_unfolding_merges_validation(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unfolding_merges(*args)


def test_neighbour_distances_are_chunked_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw patches have ~10^4 dimensions: the exact recomputation must work in small chunks, same result."""
    from jule3d import agdl as agdl_module

    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 3000)).astype(np.float32)
    full = knn_affinity(x, 5)
    monkeypatch.setattr(agdl_module, "_D2_CHUNK_BYTES", 8 * 5 * 3000 * 3)  # three rows at a time
    chunked = knn_affinity(x, 5)
    assert (full != chunked).nnz == 0
