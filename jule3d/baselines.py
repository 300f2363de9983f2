"""Classical unsupervised segmenters run side by side with JULE-3D.

Every method has the signature of :func:`jule3d.segmentation.segment`::

    method(volume, n_classes, mask=None, seed=0, **options) -> labels

and returns a ``(Z, Y, X)`` label map (``uint8``; ``uint16`` above 255 classes) with ``0`` outside the
mask and ``1..k`` inside it, the classes ordered by the mean intensity of the first channel (ascending)
so that ids are stable across methods, seeds and runs (see :func:`order_labels_by_intensity`). The
mask defaults to ``volume.mask``, or every voxel when the volume has none.

Methods (``BASELINES`` maps the benchmark names to them):

* ``"kmeans"`` -- :func:`kmeans_intensity`: k-means on the voxel intensity vectors (all channels).
* ``"otsu"`` -- :func:`multi_otsu`: multi-threshold Otsu on the first channel (the paper's baseline).
* ``"gmm"`` -- :func:`gmm_intensity`: Gaussian mixture (full covariance) on the intensity vectors.
* ``"slic"`` -- :func:`slic_kmeans`: 3D SLIC supervoxels, then k-means on their mean intensities.

The intensity methods fit on a seeded random sample of at most ``max_samples`` mask voxels (200,000 by
default) and then label every mask voxel, so their cost on 10^7 voxels is one pass of prediction.
Intensities are used as given: give channels comparable scales (``jule3d.normalize`` z-scores them).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Callable

import numpy as np
from skimage.filters import threshold_multiotsu
from skimage.segmentation import slic
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from .volume import Volume

__all__ = [
    "BASELINES",
    "gmm_intensity",
    "kmeans_intensity",
    "multi_otsu",
    "order_labels_by_intensity",
    "run_baseline",
    "slic_kmeans",
]

_PREDICT_CHUNK = 1 << 20  # voxels per prediction call (bounds the memory of predict on big volumes)
_DISTINCT_PROBE = 10_000  # rows looked at before counting distinct values over the whole mask
_MAX_DEFAULT_SEGMENTS = 2000  # cap of slic_kmeans' default n_segments (see its docstring)


def order_labels_by_intensity(
    labels: np.ndarray, intensity: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Relabel clusters ``1..k`` by ascending mean intensity, with ``0`` outside the mask.

    Parameters
    ----------
    labels : numpy.ndarray of int, shape (Z, Y, X)
        Cluster ids (any values); only the voxels inside ``mask`` are read.
    intensity : numpy.ndarray, shape (Z, Y, X) or (C, Z, Y, X)
        Image whose mean per cluster orders the clusters; the first channel when 4D.
    mask : numpy.ndarray of bool, shape (Z, Y, X), optional
        Voxels to label; every voxel when ``None``.

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels (``uint16`` when there are more than 255 clusters): ``0`` outside the mask,
        ``1`` for the cluster with the lowest mean intensity, ..., ``k`` for the highest; ties keep
        the order of the original ids. Clusters absent from the mask get no id, so the ids are
        always ``1..k`` with ``k`` the number of clusters present.

    Raises
    ------
    ValueError
        If the shapes disagree, the mask is empty, or there are more than 65535 clusters.
    """
    labels = np.asarray(labels)
    intensity = np.asarray(intensity)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D (Z, Y, X), got shape {labels.shape}")
    if intensity.ndim == 4:
        intensity = intensity[0]
    if intensity.shape != labels.shape:
        raise ValueError(
            f"intensity shape {intensity.shape} does not match labels shape {labels.shape}"
        )
    mask = _checked_mask(mask, labels.shape)
    ids, codes = np.unique(labels[mask], return_inverse=True)
    if ids.size > np.iinfo(np.uint16).max:
        raise ValueError(f"labels hold {ids.size} clusters inside the mask; at most 65535 fit uint16")
    means = np.bincount(codes, weights=intensity[mask].astype(np.float64)) / np.bincount(codes)
    rank = np.empty(ids.size, dtype=np.int64)
    rank[np.argsort(means, kind="stable")] = np.arange(1, ids.size + 1)
    out = np.zeros(labels.shape, dtype=np.uint8 if ids.size <= 255 else np.uint16)
    out[mask] = rank[codes]
    return out


def kmeans_intensity(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    max_samples: int = 200_000,
    n_init: int = 4,
) -> np.ndarray:
    """k-means on the intensity vectors (all channels) of the mask voxels.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the voxel sample and of the k-means initialisation.
    max_samples : int
        k-means is fitted on at most this many mask voxels drawn at random (seeded), then every
        mask voxel gets the label of its nearest centre.
    n_init : int
        Number of k-means restarts (the best inertia is kept).

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.
    """
    mask, features = _prepare(volume, n_classes, mask)
    _check_positive(max_samples=max_samples, n_init=n_init)
    sample = _sample_rows(features, max_samples, seed)
    model = KMeans(n_clusters=n_classes, n_init=n_init, random_state=seed).fit(sample)
    return _finish(_predict(model, features), volume, mask)


def gmm_intensity(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    max_samples: int = 200_000,
    n_init: int = 1,
    reg_covar: float = 1e-6,
) -> np.ndarray:
    """Gaussian mixture (full covariance) on the intensity vectors of the mask voxels.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of mixture components ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the voxel sample and of the mixture initialisation (k-means).
    max_samples : int
        The mixture is fitted by EM on at most this many mask voxels drawn at random (seeded);
        every mask voxel then gets its most probable component.
    n_init : int
        Number of EM restarts (the best likelihood is kept).
    reg_covar : float
        Added to the covariance diagonals, keeps them invertible on quantised intensities.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.
    """
    mask, features = _prepare(volume, n_classes, mask)
    _check_positive(max_samples=max_samples, n_init=n_init, reg_covar=reg_covar)
    sample = _sample_rows(features, max_samples, seed).astype(np.float64)
    model = GaussianMixture(
        n_components=n_classes,
        covariance_type="full",
        n_init=n_init,
        reg_covar=reg_covar,
        random_state=seed,
    ).fit(sample)
    return _finish(_predict(model, features, dtype=np.float64), volume, mask)


def multi_otsu(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    nbins: int = 256,
) -> np.ndarray:
    """Multi-threshold Otsu on the first channel of the mask voxels (the paper's baseline).

    ``skimage.filters.threshold_multiotsu`` picks ``k - 1`` thresholds on the histogram of the mask
    voxels; a multi-channel volume is thresholded on its first channel only. Its search grows as
    ``nbins ** (k - 1)``, so keep ``k`` small (<= 5) or lower ``nbins``.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Unused (the method is deterministic); accepted for the common baseline signature.
    nbins : int
        Histogram bins.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` from the darkest to the brightest class; a class left
        empty by coinciding thresholds gets no id.
    """
    mask, features = _prepare(volume, n_classes, mask, channels=1)
    _check_positive(nbins=nbins)
    values = features[:, 0]
    thresholds = threshold_multiotsu(values, classes=n_classes, nbins=nbins)
    # skimage returns the centre of the last bin of each lower class; the optimal partition puts that
    # whole bin below the cut, so cut at its upper edge (else voxels in it above the centre move up).
    thresholds = thresholds + (values.max() - values.min()) / (2 * nbins)
    return _finish(np.digitize(values, thresholds), volume, mask)


def slic_kmeans(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    n_segments: int | None = None,
    compactness: float = 0.1,
    max_num_iter: int = 10,
    n_init: int = 4,
) -> np.ndarray:
    """3D SLIC supervoxels inside the mask, then k-means on their mean intensities.

    Each channel is rescaled to ``[0, 1]`` between its 0.5th and 99.5th percentiles inside the mask
    (clipped) before SLIC, so ``compactness`` has the same meaning on any intensity scale and a few
    outliers do not flatten the contrast; the voxel spacing of the volume is passed to SLIC. The
    supervoxel means are then clustered by k-means in the original intensities, each supervoxel
    weighted by its voxel count, and every voxel takes its supervoxel's cluster.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the k-means initialisation (SLIC itself is deterministic).
    n_segments : int, optional
        Approximate number of supervoxels. By default one per 512 mask voxels (about 8^3), at least
        ``10 * n_classes`` and at most 2000: scikit-image seeds SLIC inside a mask by k-means over
        ``100 * n_segments`` mask coordinates, whose time and memory grow as ``n_segments ** 2``
        (about 7 s for 2000 seeds, 4 min and 3 GB for 15,600 on 8e6 voxels). SLIC itself costs about
        7 s per 10^6 voxels on one core.
    compactness : float
        SLIC's balance of intensity (rescaled to [0, 1]) against space: larger values give more
        regular, cube-like supervoxels; smaller ones follow intensity edges more closely.
    max_num_iter : int
        SLIC iterations.
    n_init : int
        Number of k-means restarts.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.

    Raises
    ------
    ValueError
        Besides the common checks, if SLIC yields fewer supervoxels than ``n_classes``.
    """
    mask, features = _prepare(volume, n_classes, mask)
    if n_segments is None:
        n_segments = max(10 * n_classes, min(_MAX_DEFAULT_SEGMENTS, features.shape[0] // 512))
    _check_positive(
        n_segments=n_segments, compactness=compactness, max_num_iter=max_num_iter, n_init=n_init
    )
    image = np.zeros(volume.shape + (features.shape[1],), dtype=np.float32)
    image[mask] = _rescale_unit(features)
    spacing = np.asarray(volume.geometry.spacing_zyx)
    segments = slic(
        image,
        n_segments=n_segments,
        compactness=compactness,
        max_num_iter=max_num_iter,
        spacing=spacing / spacing.min(),
        mask=mask,
        channel_axis=-1,
        convert2lab=False,
        enforce_connectivity=True,
        start_label=1,
    )[mask]
    ids, codes = np.unique(segments, return_inverse=True)
    if ids.size < n_classes:
        raise ValueError(
            f"SLIC produced {ids.size} supervoxels, fewer than n_classes={n_classes}; "
            "raise n_segments"
        )
    sizes = np.bincount(codes).astype(np.float64)
    means = np.stack(
        [np.bincount(codes, weights=features[:, c]) / sizes for c in range(features.shape[1])],
        axis=1,
    )
    model = KMeans(n_clusters=n_classes, n_init=n_init, random_state=seed)
    clusters = model.fit(means, sample_weight=sizes).labels_
    return _finish(clusters[codes], volume, mask)


BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "kmeans": kmeans_intensity,
    "otsu": multi_otsu,
    "gmm": gmm_intensity,
    "slic": slic_kmeans,
}


def run_baseline(
    name: str,
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    **options: Any,
) -> np.ndarray:
    """Run the baseline registered under ``name`` in :data:`BASELINES`.

    Parameters
    ----------
    name : str
        One of ``BASELINES`` (``"kmeans"``, ``"otsu"``, ``"gmm"``, ``"slic"``).
    volume, n_classes, mask, seed
        As for every baseline.
    **options
        Method-specific keyword arguments (e.g. ``n_segments`` for ``"slic"``).

    Returns
    -------
    numpy.ndarray
        The method's label map.

    Raises
    ------
    ValueError
        If ``name`` is not a registered baseline (the message lists the valid names).
    """
    if name not in BASELINES:
        raise ValueError(f"name must be one of {sorted(BASELINES)}, got {name!r}")
    return BASELINES[name](volume, n_classes, mask=mask, seed=seed, **options)


def _checked_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` as bool of ``shape`` (all true when ``None``), refusing an empty one."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} does not match the volume shape {tuple(shape)}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("mask is empty: no voxel to segment")
    return mask


def _prepare(
    volume: Volume, n_classes: int, mask: np.ndarray | None, channels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Check the common arguments; return the mask and the ``(n_voxels, C)`` float32 features."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, Integral) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    mask = _checked_mask(volume.mask if mask is None else mask, volume.shape)
    features = np.ascontiguousarray(volume.data[:channels, mask].T, dtype=np.float32)
    if not np.isfinite(features).all():
        raise ValueError("volume holds NaN or infinite intensities inside the mask")
    distinct = _count_distinct_rows(features[:_DISTINCT_PROBE])
    if distinct < n_classes:
        distinct = _count_distinct_rows(features)
    if distinct < n_classes:
        what = "intensity values" if features.shape[1] == 1 else "intensity vectors"
        raise ValueError(
            f"n_classes={n_classes} exceeds the {distinct} distinct {what} inside the mask"
        )
    return mask, features


def _count_distinct_rows(rows: np.ndarray) -> int:
    """Number of distinct rows of a 2D array."""
    if rows.shape[1] == 1:
        return int(np.unique(rows[:, 0]).size)
    return int(np.unique(rows, axis=0).shape[0])


def _check_positive(**values: float) -> None:
    """Raise ValueError naming the first option that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _sample_rows(rows: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """At most ``max_samples`` rows drawn without replacement (seeded), in their original order."""
    if rows.shape[0] <= max_samples:
        return rows
    rng = np.random.default_rng(seed)
    return rows[np.sort(rng.choice(rows.shape[0], size=int(max_samples), replace=False))]


def _predict(model: Any, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``model.predict`` over ``rows`` in chunks, so memory stays bounded on 10^7 voxels."""
    return np.concatenate(
        [
            model.predict(rows[start : start + _PREDICT_CHUNK].astype(dtype, copy=False))
            for start in range(0, rows.shape[0], _PREDICT_CHUNK)
        ]
    )


def _rescale_unit(features: np.ndarray) -> np.ndarray:
    """Per channel, map the 0.5th..99.5th percentile range to [0, 1] (clipped)."""
    lo, hi = np.percentile(features, [0.5, 99.5], axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((features - lo) / span, 0.0, 1.0).astype(np.float32)


def _finish(codes: np.ndarray, volume: Volume, mask: np.ndarray) -> np.ndarray:
    """Scatter the per-mask-voxel cluster codes into a volume and order them by intensity."""
    labels = np.zeros(volume.shape, dtype=np.int32)
    labels[mask] = codes
    return order_labels_by_intensity(labels, volume.data[0], mask)
