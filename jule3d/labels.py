"""Label maps: the id convention every segmenter of jule3d follows, and the masked box means they share.

Labels are ``0`` outside the foreground and ``1..k`` inside, ordered by the mean intensity of the first channel
(:func:`order_labels_by_intensity`), so ids are stable across methods, seeds and runs. Phase 2
(:mod:`jule3d.segmentation`) and the peers (:mod:`jule3d.baselines`, :mod:`jule3d.kanezaki`) all end with it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .validation import check_mask

__all__ = ["masked_box_mean", "masked_box_median", "order_labels_by_intensity"]


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

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.labels import order_labels_by_intensity
    >>> labels = np.array([5, 5, 9, 9, 7, 7]).reshape(1, 2, 3)
    >>> intensity = np.array([3.0, 3.0, 1.0, 1.0, 2.0, 2.0]).reshape(1, 2, 3)
    >>> order_labels_by_intensity(labels, intensity).ravel().tolist()
    [3, 3, 1, 1, 2, 2]
    >>> order_labels_by_intensity(labels, intensity, mask=labels != 7).ravel().tolist()
    [2, 2, 1, 1, 0, 0]
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
    mask = check_mask(mask, labels.shape)
    ids, codes = np.unique(labels[mask], return_inverse=True)
    if ids.size > np.iinfo(np.uint16).max:
        raise ValueError(f"labels hold {ids.size} clusters inside the mask; at most 65535 fit uint16")
    means = np.bincount(codes, weights=intensity[mask].astype(np.float64)) / np.bincount(codes)
    rank = np.empty(ids.size, dtype=np.int64)
    rank[np.argsort(means, kind="stable")] = np.arange(1, ids.size + 1)
    out = np.zeros(labels.shape, dtype=np.uint8 if ids.size <= 255 else np.uint16)
    out[mask] = rank[codes]
    return out


def masked_box_mean(
    data: np.ndarray, mask: np.ndarray, window: int, positions: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Mean of each channel over the mask voxels of the ``window``³ box centred on each position.

    Voxels outside ``mask`` (and outside the volume) do not enter the mean, whatever their values.

    Parameters
    ----------
    data : numpy.ndarray, shape (C, Z, Y, X)
        Channels.
    mask : numpy.ndarray of bool, shape (Z, Y, X)
        Voxels that count.
    window : int
        Side of the box in voxels.
    positions : tuple of three integer arrays
        ``(z, y, x)`` indices of the ``M`` box centres; they must lie inside the mask.

    Returns
    -------
    numpy.ndarray of float32, shape (C, M)
        Row ``c``: the mean of channel ``c`` in each position's box.

    Examples
    --------
    The boxes around ``(1, 1, 1)`` and ``(2, 1, 1)`` both hold the mask voxels of slices 1 and 2
    (values 9 to 26):

    >>> import numpy as np
    >>> from jule3d.labels import masked_box_mean
    >>> data = np.arange(27, dtype=np.float32).reshape(1, 3, 3, 3)
    >>> mask = np.ones((3, 3, 3), dtype=bool)
    >>> mask[0] = False
    >>> masked_box_mean(data, mask, 3, (np.array([1, 2]), np.array([1, 1]), np.array([1, 1]))).tolist()
    [[17.5, 17.5]]
    """
    share = ndimage.uniform_filter(mask.astype(np.float32), size=window, mode="constant")[positions]
    return np.stack(
        [
            ndimage.uniform_filter(
                np.where(mask, channel, 0).astype(np.float32, copy=False), size=window, mode="constant"
            )[positions]
            / share
            for channel in data
        ]
    )


#: Box centres per pass of :func:`masked_box_median` where a box reaches past the mask: bounds its memory
#: (``window³ · C`` float32 values each).
MEDIAN_CHUNK = 1 << 17


def masked_box_median(
    data: np.ndarray, mask: np.ndarray, window: int, positions: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Median of each channel over the mask voxels of the ``window``³ box centred on each position.

    The box is that of :func:`masked_box_mean` (for an even ``window``, one more voxel before the centre than
    after it), and voxels outside ``mask`` (and outside the volume) do not count. Where a box holds an even
    number ``n`` of mask voxels, the median is the upper of the two middle values (rank ``n // 2`` from 0), as in
    :func:`scipy.ndimage.median_filter`. Parameters and the ``(C, M)`` float32 result are those of
    :func:`masked_box_mean`, with the median in place of the mean.

    Examples
    --------
    Across a step from 0 to 9 the mean of a box mixes both sides; the median keeps the side that holds most of
    the box (at the second centre, 9 of the 18 mask voxels are 9: the upper middle value). Outside the mask, the
    100 in the last column does not count.

    >>> import numpy as np
    >>> from jule3d.labels import masked_box_mean, masked_box_median
    >>> data = np.zeros((1, 3, 3, 4), dtype=np.float32)
    >>> data[0, :, :, 2:] = 9.0
    >>> data[0, :, :, 3] = 100.0
    >>> mask = np.ones((3, 3, 4), dtype=bool)
    >>> mask[:, :, 3] = False
    >>> at = (np.array([1, 1]), np.array([1, 1]), np.array([1, 2]))
    >>> masked_box_mean(data, mask, 3, at).tolist(), masked_box_median(data, mask, 3, at).tolist()
    ([[3.0, 4.5]], [[0.0, 9.0]])
    """
    data = np.asarray(data)
    mask = np.asarray(mask, dtype=bool)
    window = int(window)
    # A box wholly inside the mask and the volume is scipy's median filter there (the same box); only the boxes
    # that reach past the mask are gathered voxel by voxel.
    whole = ndimage.minimum_filter(mask, size=window, mode="constant", cval=False)[positions]
    out = np.empty((len(data), len(whole)), dtype=np.float32)
    if whole.any():
        inner = tuple(np.asarray(p)[whole] for p in positions)
        out[:, whole] = [ndimage.median_filter(np.asarray(channel, dtype=np.float32), size=window)[inner]
                         for channel in data]
    if not whole.all():
        edge = tuple(np.asarray(p)[~whole] for p in positions)
        out[:, ~whole] = _gathered_median(data, mask, window, np.stack(edge, axis=1).astype(np.int64))
    return out


def _gathered_median(data: np.ndarray, mask: np.ndarray, window: int, centres: np.ndarray) -> np.ndarray:
    """:func:`masked_box_median` at the ``(M, 3)`` ``centres``, each box's mask voxels gathered one offset at a time."""
    half = window // 2
    steps = np.arange(-half, window - half)
    offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    shape = np.array(mask.shape)
    out = np.empty((len(data), len(centres)), dtype=np.float32)
    for start in range(0, len(centres), MEDIAN_CHUNK):
        chunk = centres[start:start + MEDIAN_CHUNK]
        values = np.full((len(data), len(chunk), len(offsets)), np.nan, dtype=np.float32)
        for j, offset in enumerate(offsets):
            near = chunk + offset
            counts = np.all((near >= 0) & (near < shape), axis=1)
            counts[counts] = mask[tuple(near[counts].T)]
            where = tuple(near[counts].T)
            for c, channel in enumerate(data):
                values[c, counts, j] = channel[where]
        values.sort(axis=2)  # NaN (no mask voxel) last
        n = np.count_nonzero(~np.isnan(values[0]), axis=1)
        out[:, start:start + len(chunk)] = np.take_along_axis(values, (n // 2)[None, :, None], axis=2)[..., 0]
    return out
