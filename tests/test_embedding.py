"""2D embeddings of features: shapes, determinism, errors, silhouette scores, raw patch features."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from jule3d.embedding import Embedding, embed, embedding_scores


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated 60-d Gaussian blobs of 40 points each."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(3, 60))
    labels = np.repeat(np.arange(3), 40)
    return (centres[labels] + rng.normal(0, 0.5, size=(120, 60))).astype(np.float32), labels


@pytest.fixture(scope="module")
def embedded(blobs) -> Embedding:
    return embed(blobs[0], seed=3)


def test_embed_shape_and_metadata(embedded: Embedding) -> None:
    assert embedded.coords.shape == (120, 2) and embedded.coords.dtype == np.float32
    assert embedded.method == "tsne"
    assert embedded.seconds > 0
    assert np.all(np.isfinite(embedded.coords))


def test_embed_deterministic(blobs, embedded: Embedding) -> None:
    np.testing.assert_array_equal(embed(blobs[0], seed=3).coords, embedded.coords)


def test_embed_separates_blobs(blobs, embedded: Embedding) -> None:
    assert embedding_scores(embedded.coords, blobs[1]) > 0.6
    shuffled = np.random.default_rng(1).permutation(blobs[1])
    assert embedding_scores(embedded.coords, shuffled) < 0.1


def test_embed_tiny_and_low_dimensional() -> None:
    rng = np.random.default_rng(2)
    out = embed(rng.normal(size=(6, 3)), seed=0)  # perplexity lowered to (N - 1) / 3, no PCA
    assert out.coords.shape == (6, 2)


@pytest.mark.parametrize("features, match", [
    (np.zeros((4, 3)), "N >= 5"),
    (np.zeros(10), "N >= 5"),
    (np.zeros((10, 2, 2)), "N >= 5"),
])
def test_embed_bad_shapes(features: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        embed(features)


def test_embed_non_finite_and_unknown_method() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        embed(x)
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match="Inf"):
        embed(x)
    with pytest.raises(ValueError, match="method"):
        embed(np.ones((10, 3)), method="pca")


def test_embed_umap_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    with pytest.raises(ValueError, match="umap-learn"):
        embed(np.random.default_rng(0).normal(size=(10, 3)), method="umap")


def test_embedding_scores_single_label_and_sampling(embedded: Embedding, blobs) -> None:
    assert np.isnan(embedding_scores(embedded.coords, np.zeros(120, int)))
    sampled = embedding_scores(embedded.coords, blobs[1], max_points=60, seed=0)
    assert sampled > 0.6
    assert sampled == embedding_scores(embedded.coords, blobs[1], max_points=60, seed=0)


