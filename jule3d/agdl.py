"""AGDL agglomerative clustering, the clustering half of JULE's recurrent process.

This module implements the "JULE recurrent process" of the method spec (``docs/method.md``):

* :func:`knn_affinity` builds the directed sample affinity ``W`` from a K_s-nearest-neighbour graph,
  ``W_ij = exp(-d2_ij / sigma2)`` for ``j`` in kNN(i), ``sigma2`` the mean squared distance of all
  samples to their K_s neighbours (scale ``a = 1``), diagonal 0.
* :func:`initial_clusters` links every sample to its nearest neighbour and returns the connected
  components (period 0 of JULE).
* :func:`cluster_affinity` evaluates the AGDL (graph degree linkage) affinity between every pair of
  clusters with sparse products:
  ``A(a, b) = U(a, b) / |C_a|^2 + U(b, a) / |C_b|^2`` with
  ``U(a, b) = 1^T W[C_a, C_b] W[C_b, C_a] 1 = sum_{k in C_b} in_a(k) out_a(k)``,
  ``in_a(k) = sum_{i in C_a} W_ik`` and ``out_a(k) = sum_{j in C_a} W_kj``.
* :func:`agglomerate` merges clusters with JULE's criterion: for every cluster its affinities to the
  others, sorted ``a^1 >= a^2 >= ...``, give
  ``score = a^1 + lam / (K_c - 1) * sum_{k=2..K_c} (a^1 - a^k)`` while more than 100 clusters remain
  (``score = a^1`` afterwards, as in the reference code); the best-scoring cluster is merged with its
  nearest partner.
* :func:`unfolding_merges` gives the number of merges of one unfolding period.

Merge updates are exact and incremental. When ``C_a`` and ``C_b`` merge into ``C_m``,
``in_m = in_a + in_b`` and ``out_m = out_a + out_b``, so for every other cluster ``x``::

    U(x, m) = U(x, a) + U(x, b)
    U(m, x) = U(a, x) + U(b, x) + sum_{k in C_x} (in_a(k) out_b(k) + in_b(k) out_a(k))

The cross term is non-zero only on samples adjacent to the smaller of the two clusters, so it is
computed from that cluster's rows of ``W`` and ``W^T`` alone. Only the merged cluster's affinities
change; every other cluster's row changes in the merged column only. Affinities are kept as sparse
per-cluster dictionaries, each cluster caches an exact prefix of its ``2 * K_c`` largest affinities
(rescanning its row only when fewer than ``K_c`` remain known), and the best score is kept in a lazy
heap, so a merge costs time in proportion to the merged clusters' neighbourhoods, not to ``c^2``. The JULE reference code's "fast"
mode drops the cross term (an approximation); this implementation keeps it, so it agrees with
recomputing the affinities from scratch (:func:`agglomerate_reference`).

Conventions and choices, shared by :func:`agglomerate` and :func:`agglomerate_reference`:

* Ties are broken towards the lowest cluster id: the best-scoring cluster is the lowest id among
  equal scores, its partner the lowest id among equal affinities (when a cluster has no positive
  affinity at all, its partner is the lowest other live id).
* A merged cluster keeps the lower of the two ids; merges are reported as ``(low, high)`` pairs of
  input label ids.
* Where a cluster has fewer than ``K_c`` other clusters, the missing affinities count as 0.
* Output labels are ``0..c'-1`` in the order of the surviving clusters' (lowest) input ids.

Differences from the JULE Torch reference (``jwyang/JULE.torch``), all per the method spec: the
reference ranks each cluster only against lower-indexed partners (it keeps the upper triangle of the
affinity matrix) and computes initial affinities only between clusters whose centroids are
neighbours; here every cluster is ranked against all others and all affinities are exact. The
reference's initial clusters follow nearest-neighbour chains for at most 50 steps; here they are
the full connected components.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors

from jule3d.validation import check_int

__all__ = [
    "KC_CLUSTER_LIMIT",
    "FixedBlock",
    "agglomerate",
    "agglomerate_reference",
    "cluster_affinity",
    "initial_clusters",
    "knn_affinity",
    "unfolding_merges",
]

#: The K_c term of the merge score is used only while more than this many clusters remain.
KC_CLUSTER_LIMIT = 100

_D2_CHUNK_BYTES = 32 << 20  # bytes of float64 neighbour differences held at once when recomputing distances
_GRAM_BYTES = 256 << 20  # largest float64 Gram matrix a FixedBlock keeps (5,792 samples)
_CACHE_DEPTH = 2  # each cluster caches its CACHE_DEPTH * K_c largest affinities


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_features(features: Any) -> np.ndarray:
    """Validate a ``(n, d)`` finite feature matrix; keep float32/float64, cast others to float64."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"features must be a non-empty 2-D array (n, d), got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("features must be finite (found NaN or inf)")
    return x


def _as_affinity(W: Any) -> sp.csr_matrix:
    """Validate a square non-negative affinity matrix; return a float64 CSR copy without diagonal."""
    if not sp.issparse(W):
        W = np.asarray(W)
    if len(W.shape) != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be a square (n, n) matrix, got shape {W.shape}")
    coo = sp.coo_matrix(W, dtype=np.float64)
    if not np.all(np.isfinite(coo.data)) or np.any(coo.data < 0):
        raise ValueError("W must hold finite non-negative affinities")
    off = coo.row != coo.col
    csr = sp.csr_matrix((coo.data[off], (coo.row[off], coo.col[off])), shape=W.shape)
    csr.sum_duplicates()
    csr.sort_indices()
    return csr


def _check_labels(labels: Any, n: int) -> tuple[np.ndarray, int]:
    """Validate cluster labels ``0..c-1`` (every id used) for ``n`` samples; return them and ``c``."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"labels must be a 1-D array of length n={n}, got shape {lab.shape}")
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if n == 0:
        raise ValueError("labels must not be empty")
    lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise ValueError("labels must be non-negative cluster ids 0..c-1")
    c = int(lab.max()) + 1
    if np.count_nonzero(np.bincount(lab, minlength=c)) != c:
        raise ValueError("labels must use every cluster id 0..c-1 (no empty clusters)")
    return lab, c


def _check_merge_args(
    n: int, target: Any, n_merges: Any, K_c: Any, lam: Any
) -> tuple[int, int | None, int, float]:
    """Validate the arguments shared by :func:`agglomerate` and :func:`agglomerate_reference`."""
    target = check_int("target", target, 1, n)
    if n_merges is not None:
        n_merges = check_int("n_merges", n_merges, 0)
    K_c = check_int("K_c", K_c, 2)
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise ValueError(f"lam must be a number, got {lam!r}")
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    return target, n_merges, K_c, lam


def _compact(ids: np.ndarray) -> np.ndarray:
    """Relabel arbitrary ids to ``0..c-1`` in increasing id order."""
    return np.unique(ids, return_inverse=True)[1].astype(np.int64).reshape(-1)


# --------------------------------------------------------------------------------------------
# sample affinity and initial clusters
# --------------------------------------------------------------------------------------------


def _drop_self(indices: np.ndarray, k_s: int) -> np.ndarray:
    """Remove each row's own index from ``(n, k_s + 1)`` neighbour lists (else its last entry)."""
    own = indices == np.arange(indices.shape[0])[:, None]
    own[~own.any(axis=1), -1] = True
    own[np.cumsum(own, axis=1) > 1] = False  # keep only the first hit per row
    return indices[~own].reshape(indices.shape[0], k_s)


def _knn_indices(x: np.ndarray, k_s: int, approximate: bool) -> np.ndarray:
    """Indices ``(n, k_s)`` of each sample's K_s nearest neighbours, the sample itself excluded (``k_s`` checked
    to be in ``[1, n - 1]``)."""
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"k_s needs at least 2 samples, got n={n}")
    k_s = check_int("k_s", k_s, 1, n - 1)
    if not approximate:
        nn = NearestNeighbors(n_neighbors=k_s, algorithm="brute").fit(x)
        return nn.kneighbors(return_distance=False).astype(np.int64)
    try:
        from pynndescent import NNDescent
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "knn_affinity(approximate=True) needs the optional package pynndescent "
            "(pip install pynndescent); exact search (approximate=False) needs nothing extra"
        ) from err
    index = NNDescent(x, n_neighbors=k_s + 1, random_state=0, n_jobs=1)
    indices = np.asarray(index.neighbor_graph[0], dtype=np.int64)
    if np.any(indices < 0):
        raise RuntimeError("pynndescent returned incomplete neighbour lists; use approximate=False")
    return _drop_self(indices, k_s)


def _neighbour_d2(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(n, k)`` from each sample to its listed neighbours (float64)."""
    d2 = np.empty(indices.shape, dtype=np.float64)
    # (rows, k, d) float64 differences: bound their size, not the row count (d is 10^4 for raw patches)
    rows = max(1, _D2_CHUNK_BYTES // (8 * max(indices.shape[1], 1) * max(x.shape[1], 1)))
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        diff = x[indices[start:stop]].astype(np.float64) - x[start:stop, None, :].astype(np.float64)
        d2[start:stop] = np.einsum("ikd,ikd->ik", diff, diff)
    return d2


def knn_affinity(features: np.ndarray, k_s: int, approximate: bool = False) -> sp.csr_matrix:
    """Directed K_s-nearest-neighbour affinity ``W`` of JULE.

    Parameters
    ----------
    features : ndarray, shape (n, d)
        One feature vector per sample (JULE uses L2-normalised features).
    k_s : int
        Number of neighbours K_s, ``1 <= k_s < n``.
    approximate : bool, default False
        Use approximate neighbours from the optional package ``pynndescent`` (for very large
        ``n``) instead of sklearn's exact brute-force search.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n, n)
        ``W_ij = exp(-d2_ij / sigma2)`` for ``j`` among the K_s nearest neighbours of ``i`` (the sample
        itself excluded, duplicates of it included), 0 elsewhere; ``sigma2`` is the mean of ``d2`` over
        all ``n * k_s`` neighbour pairs. Not symmetrised; zero diagonal; exactly ``k_s`` stored
        entries per row. Squared distances are recomputed exactly in float64 for the chosen pairs.
        If every neighbour distance is 0 (all samples identical), ``W`` is 1 on every stored pair.

    Raises
    ------
    ValueError
        If ``features`` is not a finite 2-D array or ``k_s`` is not in ``[1, n - 1]``.
    ImportError
        If ``approximate=True`` and pynndescent is not installed.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.agdl import knn_affinity
    >>> features = np.array([[0.0], [0.1], [0.3], [5.0], [5.2], [5.3]])
    >>> W = knn_affinity(features, k_s=2)
    >>> W.shape, W.nnz
    ((6, 6), 12)
    >>> np.round(W.toarray()[0], 2).tolist()
    [0.0, 0.81, 0.15, 0.0, 0.0, 0.0]
    """
    x = _as_features(features)
    indices = _knn_indices(x, k_s, bool(approximate))
    return _affinity(indices, _neighbour_d2(x, indices))


def _affinity(indices: np.ndarray, d2: np.ndarray) -> sp.csr_matrix:
    """``W`` of :func:`knn_affinity` from the neighbour lists ``(n, k_s)`` and their squared distances."""
    n, k_s = indices.shape
    sigma2 = float(d2.mean())
    weights = np.exp(-d2 / sigma2) if sigma2 > 0 else np.ones_like(d2)
    indptr = np.arange(0, n * k_s + 1, k_s)
    W = sp.csr_matrix((weights.ravel(), indices.ravel(), indptr), shape=(n, n))
    W.sort_indices()
    return W


class FixedBlock:
    """Feature columns that stay the same from one graph to the next, beside others that change.

    :meth:`knn_affinity` is :func:`knn_affinity` of ``[varying, block]``, the columns side by side: the same
    neighbours, searched on the same features. The exact squared distances of the chosen pairs are
    recomputed in float64 as there, the block's part read from its float64 Gram matrix, computed once, rather
    than from a pass over the block's columns for every pair and every graph (JULE's later periods, anchored to
    the period-0 features: :attr:`jule3d.config.JuleConfig.anchor`). They equal those of :func:`knn_affinity` up
    to float64 rounding. A block of more than 5,792 samples keeps no Gram matrix (256 MiB; its bytes grow as
    ``n^2``), and :meth:`knn_affinity` is then :func:`knn_affinity` of the columns side by side.

    Parameters
    ----------
    block : ndarray, shape (n, m)
        The fixed columns, finite (float32 and float64 are kept, other types become float64).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.agdl import FixedBlock, knn_affinity
    >>> rng = np.random.default_rng(0)
    >>> block, varying = rng.normal(size=(50, 30)), rng.normal(size=(50, 4))
    >>> W = FixedBlock(block).knn_affinity(varying, k_s=5)
    >>> side_by_side = knn_affinity(np.hstack([varying, block]), k_s=5)
    >>> bool(np.allclose(W.toarray(), side_by_side.toarray(), rtol=1e-12, atol=0))
    True
    """

    def __init__(self, block: np.ndarray) -> None:
        self.block = _as_features(block)
        n = self.block.shape[0]
        self.gram: np.ndarray | None = None
        if 8 * n * n <= _GRAM_BYTES:
            exact = self.block.astype(np.float64)
            self.gram = exact @ exact.T
            self._norms = np.einsum("ij,ij->i", exact, exact)

    def knn_affinity(self, varying: np.ndarray, k_s: int, approximate: bool = False) -> sp.csr_matrix:
        """:func:`knn_affinity` of ``varying`` and the block side by side (``varying`` first).

        Raises
        ------
        ValueError
            If ``varying`` is not a finite 2-D array with one row per row of the block, or ``k_s`` is not in
            ``[1, n - 1]``.
        """
        v = _as_features(varying)
        n = self.block.shape[0]
        if v.shape[0] != n:
            raise ValueError(f"varying has {v.shape[0]} rows, the fixed block {n}: one row per sample in both")
        x = np.concatenate([v, self.block], axis=1)
        if self.gram is None:
            return knn_affinity(x, k_s, approximate)
        indices = _knn_indices(x, k_s, bool(approximate))
        rows = np.arange(n)[:, None]
        fixed = self._norms[:, None] + self._norms[indices] - 2.0 * self.gram[rows, indices]
        return _affinity(indices, _neighbour_d2(v, indices) + np.maximum(fixed, 0.0))


def _first_appearance(ids: np.ndarray) -> np.ndarray:
    """Relabel ids to ``0..c-1`` in order of first appearance along the array."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def initial_clusters(W: Any) -> np.ndarray:
    """Period-0 clusters of JULE: connected chains of nearest neighbours.

    Every sample is linked to its nearest neighbour, the column of the largest ``W`` in its row
    (ties: lowest column). Samples whose row has no positive entry link to nothing. The weakly
    connected components of these links are the clusters.

    Parameters
    ----------
    W : scipy.sparse matrix or ndarray, shape (n, n)
        Sample affinity, e.g. from :func:`knn_affinity`.

    Returns
    -------
    ndarray of int64, shape (n,)
        Cluster labels ``0..c-1``, numbered in order of first appearance.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.agdl import initial_clusters, knn_affinity
    >>> features = np.array([[0.0], [0.1], [0.3], [5.0], [5.2], [5.3]])
    >>> initial_clusters(knn_affinity(features, k_s=2)).tolist()
    [0, 0, 0, 1, 1, 1]
    >>> W = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    >>> initial_clusters(W).tolist()
    [0, 0, 1, 1]
    """
    Wc = _as_affinity(W)
    n = Wc.shape[0]
    coo = Wc.tocoo()
    pos = coo.data > 0
    rows, cols, vals = coo.row[pos], coo.col[pos], coo.data[pos]
    order = np.lexsort((cols, -vals, rows))
    rows, cols = rows[order], cols[order]
    first = np.r_[True, rows[1:] != rows[:-1]] if rows.size else np.zeros(0, dtype=bool)
    nearest = np.arange(n)
    nearest[rows[first]] = cols[first]
    links = sp.csr_matrix((np.ones(n), (np.arange(n), nearest)), shape=(n, n))
    _, components = connected_components(links, directed=True, connection="weak")
    return _first_appearance(components)


# --------------------------------------------------------------------------------------------
# cluster affinity
# --------------------------------------------------------------------------------------------


def _assignment(labels: np.ndarray, c: int) -> sp.csr_matrix:
    """The ``n x c`` 0/1 assignment matrix ``P`` of ``labels``."""
    n = labels.shape[0]
    return sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, c))


def _linkage_u(W: sp.csr_matrix, labels: np.ndarray, c: int) -> sp.csr_matrix:
    """Unnormalised linkage ``U(a, b) = sum_{k in C_b} in_a(k) out_a(k)`` (CSR, no diagonal)."""
    P = _assignment(labels, c)
    inflow = sp.csr_matrix(W.T @ P)  # in_a(k) at [k, a]
    outflow = sp.csr_matrix(W @ P)  # out_a(k) at [k, a]
    U = sp.csr_matrix(sp.csr_matrix(inflow.multiply(outflow)).T @ P)
    U = sp.coo_matrix(U)
    keep = (U.row != U.col) & (U.data > 0)
    U = sp.csr_matrix((U.data[keep], (U.row[keep], U.col[keep])), shape=(c, c))
    U.sort_indices()
    return U


def _normalised_affinity(U: sp.csr_matrix, sizes: np.ndarray) -> sp.csr_matrix:
    """``A = D + D^T`` with ``D(a, b) = U(a, b) / |C_a|^2``; exactly symmetric, no stored zeros."""
    rows = np.repeat(np.arange(U.shape[0]), np.diff(U.indptr))
    size = sizes.astype(np.float64)
    D = sp.csr_matrix((U.data / (size[rows] * size[rows]), U.indices, U.indptr), shape=U.shape)
    A = sp.csr_matrix(D + D.T)
    A.eliminate_zeros()
    A.sort_indices()
    return A


def cluster_affinity(W: Any, labels: Any) -> np.ndarray:
    """AGDL affinity between every pair of clusters.

    ``A(a, b) = (1/|C_a|^2) 1^T W[C_a,C_b] W[C_b,C_a] 1 + (1/|C_b|^2) 1^T W[C_b,C_a] W[C_a,C_b] 1``,
    evaluated as ``U = ((W^T P) o (W P))^T P`` with the ``n x c`` assignment matrix ``P``.

    Parameters
    ----------
    W : scipy.sparse matrix or ndarray, shape (n, n)
        Directed sample affinity (non-negative).
    labels : array of int, shape (n,)
        Cluster ids ``0..c-1``, every id used.

    Returns
    -------
    ndarray of float64, shape (c, c)
        Symmetric, zero diagonal.

    Examples
    --------
    Two pairs of samples joined by one link of weight 0.5 in each direction:
    ``A = 0.25 / 2² + 0.25 / 2²``.

    >>> import numpy as np
    >>> from jule3d.agdl import cluster_affinity
    >>> W = np.array([[0, 1, 0.5, 0], [1, 0, 0, 0], [0.5, 0, 0, 1], [0, 0, 1, 0]])
    >>> cluster_affinity(W, [0, 0, 1, 1]).tolist()
    [[0.0, 0.125], [0.125, 0.0]]
    """
    Wc = _as_affinity(W)
    lab, c = _check_labels(labels, Wc.shape[0])
    U = _linkage_u(Wc, lab, c).toarray()
    size = np.bincount(lab, minlength=c).astype(np.float64)
    D = U / (size * size)[:, None]
    return D + D.T


# --------------------------------------------------------------------------------------------
# merge criterion shared by both implementations
# --------------------------------------------------------------------------------------------


def _scores(top: np.ndarray, lam: float, use_kc: bool) -> np.ndarray:
    """Merge scores from each row's ``K_c`` largest affinities ``top`` (descending, zero-padded).

    The sum over ``k = 2..K_c`` is accumulated left to right so that both implementations produce
    bit-identical scores from identical affinities.
    """
    first = top[:, 0]
    if not use_kc or top.shape[1] < 2:
        return first.copy()
    gaps = first[:, None] - top[:, 1:]
    total = gaps[:, 0].copy()
    for k in range(1, gaps.shape[1]):
        total = total + gaps[:, k]
    return first + (lam / (top.shape[1] - 1)) * total


def unfolding_merges(n_clusters: int, eta: float, target: int) -> int:
    """Number of merges in one JULE unfolding period.

    Parameters
    ----------
    n_clusters : int
        Clusters at the start of the period, ``n_c >= 1``.
    eta : float
        Unfolding rate in ``(0, 1]``.
    target : int
        Final number of clusters ``n* >= 1``; merging never goes below it.

    Returns
    -------
    int
        ``min(ceil(eta * n_c), n_c - target)``, 0 when ``n_c <= target``. ``eta`` is taken at its
        shortest decimal form, so ``eta=0.7, n_c=100`` gives 70, not 71.

    Examples
    --------
    >>> from jule3d.agdl import unfolding_merges
    >>> unfolding_merges(100, 0.7, 10), unfolding_merges(12, 0.9, 10), unfolding_merges(5, 0.5, 10)
    (70, 2, 0)
    """
    n_clusters = check_int("n_clusters", n_clusters, 1)
    target = check_int("target", target, 1)
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise ValueError(f"eta must be a number in (0, 1], got {eta!r}")
    if not (math.isfinite(float(eta)) and 0 < float(eta) <= 1):
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    merges = math.ceil(Fraction(repr(float(eta))) * n_clusters)
    return max(0, min(merges, n_clusters - target))


def _run(engine: Any, c: int, target: int, n_merges: int | None) -> list[tuple[int, int]]:
    """Drive ``engine`` (select / merge) until ``target`` clusters or ``n_merges`` merges."""
    limit = max(0, c - target)
    if n_merges is not None:
        limit = min(limit, n_merges)
    merges = []
    for remaining in range(c, c - limit, -1):
        low, high = engine.select(remaining > KC_CLUSTER_LIMIT)
        engine.merge(low, high)
        merges.append((low, high))
    return merges


# --------------------------------------------------------------------------------------------
# fast incremental implementation
# --------------------------------------------------------------------------------------------


def _gather_rows(M: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of CSR rows ``rows``: (position of the row in ``rows``, column, value)."""
    starts = M.indptr[rows]
    lengths = M.indptr[rows + 1] - starts
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    pos = np.arange(total) - np.repeat(offsets - starts, lengths)
    return np.repeat(np.arange(rows.size), lengths), M.indices[pos], M.data[pos]


class _FastAgdl:
    """Incremental AGDL state: sparse linkage dictionaries, top-K_c caches and a lazy score heap."""

    def __init__(self, W: sp.csr_matrix, labels: np.ndarray, c: int, K_c: int, lam: float) -> None:
        self.W, self.WT = W, sp.csr_matrix(W.T)
        self.WT.sort_indices()
        self.K, self.lam = K_c, lam
        self.depth = _CACHE_DEPTH * K_c
        self.use_kc: bool | None = None
        self.size = np.bincount(labels, minlength=c).tolist()
        # clusters own "slots"; samples point to slots, so a merge relabels the smaller cluster only
        self.slot = labels.copy()
        self.slot_of = list(range(c))
        self.cluster_of_slot = np.arange(c)
        by_cluster = np.split(np.argsort(labels, kind="stable"), np.cumsum(self.size)[:-1])
        self.members: list[list[int] | None] = [part.tolist() for part in by_cluster]
        self.alive = np.ones(c, dtype=bool)
        U = _linkage_u(W, labels, c)
        self.u_out = _rows_as_dicts(U)  # u_out[a][x] = U(a, x)
        self.u_in = _rows_as_dicts(sp.csr_matrix(U.T))  # u_in[a][x] = U(x, a)
        self.aff = _rows_as_dicts(_normalised_affinity(U, np.asarray(self.size)))
        self.top = [_top_k(row, self.depth) for row in self.aff]
        self.neg_score = [0.0] * c
        self.heap: list[tuple[float, int]] = []

    # -- selection -------------------------------------------------------------------------

    def _top_values(self, ids: list[int]) -> np.ndarray:
        """``(len(ids), K)`` array of cached largest affinities, zero-padded."""
        out = np.zeros((len(ids), self.K))
        for r, x in enumerate(ids):
            cached = self.top[x][: self.K]
            out[r, : len(cached)] = [-t[0] for t in cached]
        return out

    def _push_scores(self, ids: list[int]) -> None:
        """Recompute the scores of clusters ``ids`` and push them on the heap."""
        scores = _scores(self._top_values(ids), self.lam, bool(self.use_kc))
        for x, s in zip(ids, (-scores).tolist()):
            self.neg_score[x] = s
            heapq.heappush(self.heap, (s, x))

    def _rebuild(self, use_kc: bool) -> None:
        """Score every live cluster afresh (start, and when the K_c regime changes)."""
        self.use_kc = use_kc
        self.heap = []
        self._push_scores(np.flatnonzero(self.alive).tolist())

    def _lowest_other(self, j: int) -> int:
        """Lowest live cluster id other than ``j``."""
        first = int(np.argmax(self.alive))
        return first if first != j else j + 1 + int(np.argmax(self.alive[j + 1 :]))

    def select(self, use_kc: bool) -> tuple[int, int]:
        """Best-scoring cluster and its nearest partner, as ``(low, high)``."""
        if use_kc != self.use_kc:
            self._rebuild(use_kc)
        while True:
            s, j = self.heap[0]
            if self.alive[j] and self.neg_score[j] == s:
                break
            heapq.heappop(self.heap)
        partner = self.top[j][0][1] if self.top[j] else self._lowest_other(j)
        return min(j, partner), max(j, partner)

    # -- merge -----------------------------------------------------------------------------

    def _cross_term(self, a: int, b: int) -> dict[int, float]:
        """``sum_{k in C_x} in_a(k) out_b(k) + in_b(k) out_a(k)`` for every other cluster ``x``.

        With ``s`` the smaller and ``l`` the larger of the two clusters, the summand is
        ``in_s(k) out_l(k) + out_s(k) in_l(k)``: non-zero only on the out- and in-neighbours of
        ``C_s``, read from ``C_s``'s rows of ``W`` and ``W^T``.
        """
        sa, sb = self.slot_of[a], self.slot_of[b]
        small, large = (sa, sb) if len(self.members[sa]) <= len(self.members[sb]) else (sb, sa)
        mem = np.asarray(self.members[small], dtype=np.int64)
        k_in, z_in = self._half_cross(self.W, mem, small, large)  # in_s(k) out_l(k)
        k_out, z_out = self._half_cross(self.WT, mem, small, large)  # out_s(k) in_l(k)
        ks, z = np.concatenate([k_in, k_out]), np.concatenate([z_in, z_out])
        keep = z > 0
        clusters, inverse = np.unique(self.cluster_of_slot[self.slot[ks[keep]]], return_inverse=True)
        sums = np.bincount(inverse.reshape(-1), weights=z[keep], minlength=clusters.size)
        return dict(zip(clusters.tolist(), sums.tolist()))

    def _half_cross(
        self, M: sp.csr_matrix, mem: np.ndarray, small: int, large: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``k`` outside both clusters and ``M[i, k] * sum_{j in C_large} M[k, j]``.

        One value per stored ``M[i, k]`` with ``i`` in the small cluster: ``M = W`` gives the terms
        of ``in_s(k) out_l(k)``, ``M = W^T`` those of ``out_s(k) in_l(k)``.
        """
        _, ks, vals = _gather_rows(M, mem)
        k_slot = self.slot[ks]
        outside = (k_slot != small) & (k_slot != large)
        ks, vals = ks[outside], vals[outside]
        rows, inverse = np.unique(ks, return_inverse=True)
        where, cols, row_vals = _gather_rows(M, rows)
        hit = self.slot[cols] == large
        to_large = np.bincount(where[hit], weights=row_vals[hit], minlength=rows.size)
        return ks, vals * to_large[inverse.reshape(-1)]

    def _merge_members(self, a: int, b: int) -> None:
        """Move the smaller cluster's samples into the larger one's slot, owned by ``a``."""
        sa, sb = self.slot_of[a], self.slot_of[b]
        big, small = (sa, sb) if len(self.members[sa]) >= len(self.members[sb]) else (sb, sa)
        moved = self.members[small]
        self.slot[np.asarray(moved, dtype=np.int64)] = big
        self.members[big].extend(moved)
        self.members[small] = None
        self.slot_of[a] = big
        self.cluster_of_slot[big] = a
        self.size[a] += self.size[b]
        self.size[b] = 0
        self.alive[b] = False

    def _merge_linkage(self, a: int, b: int, cross: dict[int, float]) -> tuple[dict, dict]:
        """New ``U(m, .)`` and ``U(., m)``; rewire the other clusters' entries from ``b`` to ``a``."""
        u_out, u_in = self.u_out, self.u_in
        row = _added(u_out[a], u_out[b], a, b)
        for x, v in cross.items():
            row[x] = row.get(x, 0.0) + v
        col = _added(u_in[a], u_in[b], a, b)
        for x in u_out[b]:
            u_in[x].pop(b, None)
        for x in u_in[b]:
            u_out[x].pop(b, None)
        for x, v in row.items():
            u_in[x][a] = v
        for x, v in col.items():
            u_out[x][a] = v
        u_out[a], u_in[a] = row, col
        u_out[b] = u_in[b] = {}
        return row, col

    def _merge_affinity(self, a: int, b: int, row: dict, col: dict) -> list[int]:
        """Recompute ``A(m, .)`` and update it in the other rows; return the touched clusters."""
        aff, size = self.aff, self.size
        touched = set(aff[a]) | set(aff[b])
        for x in aff[b]:
            aff[x].pop(b, None)
        sm2 = float(size[a] * size[a])
        new = {}
        for x in row.keys() | col.keys():
            v = row.get(x, 0.0) / sm2 + col.get(x, 0.0) / float(size[x] * size[x])
            if v > 0:
                new[x] = v
                aff[x][a] = v
            else:
                aff[x].pop(a, None)
        aff[a], aff[b] = new, {}
        touched |= new.keys()
        touched.discard(a)
        touched.discard(b)
        return sorted(touched)

    def _refresh_top(self, x: int, a: int, b: int, old_a: float | None, old_b: float | None) -> bool:
        """Update cluster ``x``'s cache after ``b`` merged into ``a``; True if its top K changed.

        The cache is an exact prefix (up to ``depth`` entries) of the row sorted by
        ``(-value, id)``. Dropping the old entries of ``a`` and ``b`` (``old_a``, ``old_b``) keeps it
        exact; ``a``'s new value is inserted when it ranks inside the prefix (or the prefix is the
        whole row). The row is rescanned only when fewer than ``K`` entries remain known.
        """
        cached, row = self.top[x], self.aff[x]
        kept = cached.copy()
        for old, y in ((old_a, a), (old_b, b)):
            if old is not None:
                i = bisect.bisect_left(kept, (-old, y))
                if i < len(kept) and kept[i][1] == y:
                    del kept[i]
        v = row.get(a)
        if v is not None:
            entry = (-v, a)
            if len(kept) == len(row) - 1 or (kept and entry < kept[-1]):
                bisect.insort(kept, entry)
                del kept[self.depth :]
        if len(kept) < self.K and len(kept) < len(row):
            kept = _top_k(row, self.depth)
        self.top[x] = kept
        return kept[: self.K] != cached[: self.K]

    def merge(self, a: int, b: int) -> None:
        """Merge cluster ``b`` into cluster ``a`` (``a < b``) and update affinities and scores."""
        cross = self._cross_term(a, b)
        self._merge_members(a, b)
        row, col = self._merge_linkage(a, b, cross)
        old_a, old_b = self.aff[a], self.aff[b]
        touched = self._merge_affinity(a, b, row, col)
        changed = [x for x in touched if self._refresh_top(x, a, b, old_a.get(x), old_b.get(x))]
        self.top[a] = _top_k(self.aff[a], self.depth)
        self.top[b] = []
        self._push_scores([a, *changed])

    def labels(self) -> np.ndarray:
        """Current labels, compacted to ``0..c'-1`` in order of cluster id."""
        return _compact(self.cluster_of_slot[self.slot])


def _rows_as_dicts(M: sp.csr_matrix) -> list[dict[int, float]]:
    """One ``{column: value}`` dict per row of a CSR matrix."""
    indptr, cols, vals = M.indptr, M.indices.tolist(), M.data.tolist()
    return [dict(zip(cols[s:e], vals[s:e])) for s, e in zip(indptr[:-1].tolist(), indptr[1:].tolist())]


def _top_k(row: dict[int, float], k: int) -> list[tuple[float, int]]:
    """The ``k`` largest entries of ``row`` as ``(-value, id)``, ascending (ties: lowest id first)."""
    return heapq.nsmallest(k, zip(map(operator.neg, row.values()), row.keys()))


def _added(first: dict, second: dict, a: int, b: int) -> dict:
    """Entry-wise sum ``first + second`` without the keys ``a`` and ``b``."""
    out = dict(first)
    for x, v in second.items():
        out[x] = out.get(x, 0.0) + v
    out.pop(a, None)
    out.pop(b, None)
    return out


def agglomerate(
    W: Any,
    labels: Any,
    target: int,
    n_merges: int | None = None,
    K_c: int = 5,
    lam: float = 1.0,
    return_merges: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[tuple[int, int]]]:
    """AGDL agglomerative clustering with JULE's merge criterion (fast, exact, incremental).

    Parameters
    ----------
    W : scipy.sparse matrix or ndarray, shape (n, n)
        Directed non-negative sample affinity, e.g. from :func:`knn_affinity`.
    labels : array of int, shape (n,)
        Starting clusters ``0..c-1`` (every id used), e.g. from :func:`initial_clusters`.
    target : int
        Stop when this many clusters remain, ``1 <= target <= n``. If ``target >= c`` nothing merges.
    n_merges : int, optional
        Stop after this many merges, if that comes first (one unfolding period, see
        :func:`unfolding_merges`).
    K_c : int, default 5
        Number of largest affinities in the merge score, ``>= 2``.
    lam : float, default 1.0
        Weight ``lambda >= 0`` of the K_c term (used while more than 100 clusters remain).
    return_merges : bool, default False
        Also return the merged pairs.

    Returns
    -------
    labels : ndarray of int64, shape (n,)
        Clusters after merging, ``0..c'-1`` in order of their lowest input id.
    merges : list of (int, int)
        Only with ``return_merges``: the merged ``(low, high)`` input ids, in merge order; the
        merged cluster keeps ``low``.

    Notes
    -----
    The merge sequence is the one of :func:`agglomerate_reference` (identical up to floating-point
    rounding of exact near-ties); see the module docstring for the update rule and tie-breaking.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.agdl import agglomerate, knn_affinity
    >>> features = np.array([[0.0], [0.1], [0.3], [5.0], [5.2], [5.3]])
    >>> W = knn_affinity(features, k_s=2)
    >>> labels, merges = agglomerate(W, np.arange(6), target=2, return_merges=True)
    >>> labels.tolist(), merges
    ([0, 0, 0, 1, 1, 1], [(4, 5), (0, 1), (0, 2), (3, 4)])
    >>> agglomerate(W, np.arange(6), target=2, n_merges=1).tolist()
    [0, 1, 2, 3, 4, 4]
    """
    Wc = _as_affinity(W)
    lab, c = _check_labels(labels, Wc.shape[0])
    target, n_merges, K_c, lam = _check_merge_args(Wc.shape[0], target, n_merges, K_c, lam)
    engine = _FastAgdl(Wc, lab, c, K_c, lam)
    merges = _run(engine, c, target, n_merges)
    out = engine.labels()
    return (out, merges) if return_merges else out


# --------------------------------------------------------------------------------------------
# plain reference implementation
# --------------------------------------------------------------------------------------------


class _ReferenceAgdl:
    """Straightforward AGDL: dense ``W``, per-pair dense sums, full sort of every row per merge."""

    def __init__(self, W: sp.csr_matrix, labels: np.ndarray, c: int, K_c: int, lam: float) -> None:
        self.W = W.toarray()
        self.K, self.lam = K_c, lam
        self.members = [np.flatnonzero(labels == a) for a in range(c)]
        self.alive = np.ones(c, dtype=bool)
        self.A = np.zeros((c, c))
        for a in range(c):
            for b in range(a + 1, c):
                self.A[a, b] = self.A[b, a] = self._pair(a, b)

    def _pair(self, a: int, b: int) -> float:
        """``A(a, b)`` from the definition, by dense sums over the two clusters' blocks of ``W``."""
        ca, cb = self.members[a], self.members[b]
        w_ab, w_ba = self.W[np.ix_(ca, cb)], self.W[np.ix_(cb, ca)]
        u_ab = float(w_ab.sum(axis=0) @ w_ba.sum(axis=1))  # sum_{k in C_b} in_a(k) out_a(k)
        u_ba = float(w_ba.sum(axis=0) @ w_ab.sum(axis=1))  # sum_{k in C_a} in_b(k) out_b(k)
        return u_ab / float(ca.size * ca.size) + u_ba / float(cb.size * cb.size)

    def select(self, use_kc: bool) -> tuple[int, int]:
        """Best-scoring cluster and its nearest partner, as ``(low, high)``."""
        ids = np.flatnonzero(self.alive)
        sub = self.A[np.ix_(ids, ids)]
        np.fill_diagonal(sub, -np.inf)
        ranked = -np.sort(-sub, axis=1)
        top = np.zeros((ids.size, self.K))
        width = min(self.K, ids.size - 1)
        top[:, :width] = ranked[:, :width]
        best = int(np.argmax(_scores(top, self.lam, use_kc)))
        j, partner = int(ids[best]), int(ids[np.argmax(sub[best])])
        return min(j, partner), max(j, partner)

    def merge(self, a: int, b: int) -> None:
        """Merge ``b`` into ``a`` and recompute ``a``'s affinity to every live cluster."""
        self.members[a] = np.concatenate([self.members[a], self.members[b]])
        self.alive[b] = False
        self.A[b, :] = self.A[:, b] = 0.0
        for x in np.flatnonzero(self.alive).tolist():
            if x != a:
                self.A[a, x] = self.A[x, a] = self._pair(a, x)

    def labels(self) -> np.ndarray:
        """Current labels, compacted to ``0..c'-1`` in order of cluster id."""
        out = np.empty(self.W.shape[0], dtype=np.int64)
        for a in np.flatnonzero(self.alive):
            out[self.members[a]] = a
        return _compact(out)


def agglomerate_reference(
    W: Any,
    labels: Any,
    target: int,
    n_merges: int | None = None,
    K_c: int = 5,
    lam: float = 1.0,
    return_merges: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[tuple[int, int]]]:
    """Plain, slow reference for :func:`agglomerate` (same parameters and results).

    Evaluates the AGDL affinity from its definition with a Python loop over cluster pairs and dense
    per-pair sums over a dense copy of ``W``, and fully sorts every cluster's affinities at each
    merge: ``O(n^2)`` memory and roughly ``O(c^3 log c)`` time. Meant for tests and benchmarks on a
    few thousand samples at most; use :func:`agglomerate` for real work.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.agdl import agglomerate, agglomerate_reference, knn_affinity
    >>> W = knn_affinity(np.array([[0.0], [0.1], [0.3], [5.0], [5.2], [5.3]]), k_s=2)
    >>> _, merges = agglomerate_reference(W, np.arange(6), target=2, return_merges=True)
    >>> merges == agglomerate(W, np.arange(6), target=2, return_merges=True)[1]
    True
    """
    Wc = _as_affinity(W)
    lab, c = _check_labels(labels, Wc.shape[0])
    target, n_merges, K_c, lam = _check_merge_args(Wc.shape[0], target, n_merges, K_c, lam)
    engine = _ReferenceAgdl(Wc, lab, c, K_c, lam)
    merges = _run(engine, c, target, n_merges)
    out = engine.labels()
    return (out, merges) if return_merges else out
