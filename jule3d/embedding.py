"""2D embeddings of patch features (openTSNE's t-SNE; UMAP when installed) and their scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Embedding", "embed", "embedding_scores"]


@dataclass
class Embedding:
    """A 2D layout of ``N`` feature vectors.

    Attributes
    ----------
    coords : numpy.ndarray
        ``(N, 2)`` float32 coordinates.
    method : str
        ``"tsne"`` or ``"umap"``.
    seconds : float
        Wall time of the embedding.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.embedding import Embedding
    >>> layout = Embedding(np.zeros((3, 2), np.float32), method="tsne", seconds=0.5)
    >>> layout.coords.shape, layout.method
    ((3, 2), 'tsne')
    """

    coords: np.ndarray
    method: str
    seconds: float


def embed(
    features: np.ndarray,
    method: str = "tsne",
    seed: int = 0,
    perplexity: float = 30.0,
    n_iter: int = 250,
    n_jobs: int = -1,
    pca_dims: int = 50,
) -> Embedding:
    """Embed features in 2D.

    Parameters
    ----------
    features : numpy.ndarray
        ``(N, D)`` features.
    method : {"tsne", "umap"}
        openTSNE (PCA initialisation; Barnes-Hut gradients below 10,000 points, FFT-interpolated ones
        above, openTSNE's own rule: FFT has a fixed cost that dominates on few points) or umap-learn
        (optional dependency).
    seed : int
        Random seed.
    perplexity : float
        t-SNE perplexity (lowered automatically for tiny ``N``).
    n_iter : int
        Iterations after openTSNE's 250 early-exaggeration ones. 250 instead of openTSNE's 500: on
        trained-network features of the phantom the layout's silhouette of the true classes was the same
        in much less time (see ``benchmarks/bench_tsne.py`` and the README's Measured section).
    n_jobs : int
        Threads of openTSNE (-1 = all cores; on a machine busy with other work 1 can be faster).
    pca_dims : int
        Reduce to this many principal components first when ``D`` is larger (speeds up the kNN search).

    Returns
    -------
    Embedding

    Examples
    --------
    A few iterations on 30 points (the coordinates depend on the platform, their shape does not):

    >>> import numpy as np
    >>> from jule3d.embedding import embed
    >>> rng = np.random.default_rng(0)
    >>> features = np.concatenate([rng.normal(0, 1, (15, 4)), rng.normal(6, 1, (15, 4))])
    >>> layout = embed(features, n_iter=10, n_jobs=1)
    >>> layout.coords.shape, layout.coords.dtype, layout.method
    ((30, 2), dtype('float32'), 'tsne')
    """
    import time

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) < 5:
        raise ValueError(f"features must be an (N, D) array with N >= 5, got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or Inf values")
    if method not in ("tsne", "umap"):
        raise ValueError(f"method must be 'tsne' or 'umap', got {method!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    start = time.perf_counter()
    if features.shape[1] > pca_dims:
        from sklearn.decomposition import PCA

        features = PCA(n_components=pca_dims, random_state=seed).fit_transform(features).astype(np.float32)
    if method == "tsne":
        from openTSNE import TSNE

        perplexity = float(min(perplexity, (len(features) - 1) / 3))
        coords = TSNE(perplexity=perplexity, n_iter=n_iter, initialization="pca", random_state=seed, n_jobs=n_jobs,
                      neighbors="auto", negative_gradient_method="auto", verbose=False).fit(features)
    else:
        try:
            import umap
        except ImportError:
            raise ValueError("method='umap' needs umap-learn: pip install umap-learn") from None
        coords = umap.UMAP(random_state=seed, n_jobs=1).fit_transform(features)
    return Embedding(np.asarray(coords, dtype=np.float32), method, time.perf_counter() - start)


def embedding_scores(coords: np.ndarray, labels: np.ndarray, seed: int = 0, max_points: int = 5000) -> float:
    """Silhouette score of ``labels`` in the 2D layout (on a seeded sample of at most ``max_points``).

    Returns NaN when fewer than two labels are present.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.embedding import embedding_scores
    >>> coords = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> round(embedding_scores(coords, np.array([0, 0, 1, 1])), 3)
    0.9
    >>> embedding_scores(coords, np.zeros(4))
    nan
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    n = len(coords)
    sample = min(max_points, n)
    return float(silhouette_score(coords, labels, sample_size=sample if sample < n else None, random_state=seed))
