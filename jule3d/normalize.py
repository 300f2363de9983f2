"""Intensity normalisation inside the foreground mask.

Each channel is clipped to its ``[lower, upper]`` percentiles and z-scored, with both the
percentiles and the mean / standard deviation computed over the foreground voxels only, so air
and padding do not shift the statistics. Background voxels (outside the mask) are set to ``0``
after normalisation, i.e. to the foreground mean: patches that reach past the specimen boundary
then see neutral values rather than a strong air/tissue edge.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from jule3d.volume import Volume

__all__ = ["normalize_intensity", "clip_stats", "apply_stats"]


def normalize_intensity(volume: Volume, lower: float = 0.5, upper: float = 99.5) -> Volume:
    """Per-channel percentile clipping and z-scoring inside the foreground mask.

    Parameters
    ----------
    volume : Volume
        Input volume; its mask (all voxels when ``volume.mask`` is ``None``) defines the voxels
        the statistics are computed on. Not modified.
    lower, upper : float
        Percentiles (0-100, ``lower < upper``) of the foreground intensities to clip to.

    Returns
    -------
    Volume
        A new volume with ``float32`` data: inside the mask, ``(clip(x) - mean) / std``; outside
        the mask, exactly ``0``; ``normalized`` is true. Geometry, mask, channel names and sources are kept.

    Raises
    ------
    ValueError
        If the percentiles are out of range or ``lower >= upper``, or a channel is constant
        inside the mask (the message names the channel).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.volume import Volume
    >>> rng = np.random.default_rng(0)
    >>> data = rng.normal(100.0, 10.0, size=(8, 8, 8)).astype(np.float32)
    >>> mask = np.zeros((8, 8, 8), dtype=bool)
    >>> mask[2:6, 2:6, 2:6] = True
    >>> out = normalize_intensity(Volume.from_array(data, mask=mask))
    >>> out.normalized, out.data.dtype, out.data.shape
    (True, dtype('float32'), (1, 8, 8, 8))
    >>> inside = out.data[0][mask]
    >>> bool(abs(inside.mean()) < 1e-6), round(float(inside.std()), 3), bool(np.all(out.data[0][~mask] == 0))
    (True, 1.0, True)
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(
            f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
        )
    mask = volume.foreground()
    out = np.zeros(volume.data.shape, dtype=np.float32)
    for c, name in enumerate(volume.channel_names):
        out[c][mask] = _normalized_values(np.asarray(volume.data[c])[mask], lower, upper, name)
    return replace(volume, data=out, normalized=True)


def _normalized_values(values: np.ndarray, lower: float, upper: float, name: str) -> np.ndarray:
    """Clip ``values`` to their percentiles and z-score them (float32)."""
    return apply_stats(values, clip_stats(values, lower, upper, name))


def clip_stats(values: np.ndarray, lower: float = 0.5, upper: float = 99.5, name: str = "") -> np.ndarray:
    """``(lo, hi, mean, std)``: the percentiles of ``values`` and the mean and sd of the values clipped to them.

    :func:`normalize_intensity` is :func:`apply_stats` with the statistics of the foreground voxels; a volume
    too large to hold estimates them from a sample (:mod:`jule3d.chunked`).

    Raises
    ------
    ValueError
        If the values are constant between the percentiles (the message names the channel ``name``).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.normalize import apply_stats, clip_stats
    >>> values = np.arange(1000, dtype=np.float32)
    >>> stats = clip_stats(values, 1, 99)
    >>> stats.round(2).tolist()
    [9.99, 989.01, 499.5, 288.49]
    >>> bool(np.isclose(apply_stats(values, stats).mean(), 0, atol=1e-6))
    True
    """
    values = values.astype(np.float64, copy=False)
    lo, hi = np.percentile(values, [lower, upper])
    clipped = np.clip(values, lo, hi)
    std = clipped.std()
    if hi <= lo or not std > 0:
        raise ValueError(
            f"channel {name!r} is constant inside the foreground mask "
            f"(value {lo:g} between the {lower} and {upper} percentiles); cannot z-score it"
        )
    return np.array([lo, hi, clipped.mean(), std])


def apply_stats(values: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """``(clip(values, lo, hi) - mean) / std`` as float32, for the statistics of :func:`clip_stats`."""
    lo, hi, mean, std = stats
    return ((np.clip(values.astype(np.float64, copy=False), lo, hi) - mean) / std).astype(np.float32)
