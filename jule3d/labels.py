"""Label maps: the id convention every segmenter of jule3d follows, and the masked box means they share.

Labels are ``0`` outside the foreground and ``1..k`` inside, ordered by the mean intensity of the first channel
(:func:`order_labels_by_intensity`), so ids are stable across methods, seeds and runs. Phase 2
(:mod:`jule3d.segmentation`) and the peers (:mod:`jule3d.baselines`, :mod:`jule3d.kanezaki`) all end with it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .validation import check_mask

__all__ = ["masked_box_mean", "order_labels_by_intensity"]


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
