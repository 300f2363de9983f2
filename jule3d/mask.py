"""Foreground (specimen / body / brain) versus air or background.

Every later stage only looks inside the foreground mask, so the mask decides what the clustering
sees. :func:`foreground_mask` works on the three kinds of data jule3d is used with:

* raw scans with air around the specimen (CT in HU, micro-CT in uint8): an Otsu threshold
  separates air from tissue, refined downwards while the part below it is still clearly bimodal
  (several tissue classes of different brightness would otherwise pull it between two tissues);
* *pre-masked* scans whose background was set to one constant value that lies inside the
  intensity range (BraTS MRI, z-scored inside the brain with the background exactly 0): there
  an intensity threshold would cut through the tissue, so the foreground is every voxel that
  differs from that constant. This case is detected automatically by ``method="otsu"``;
* anything else through ``method="nonzero"`` (voxels different from 0).

The raw mask is then cleaned: a binary closing with a ball, keeping the largest 6-connected
component, and hole filling (3D cavities and in-plane holes of each ``Z`` slice, so that lungs
and airways, which reach the image border through the trachea, belong to the body).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import ball

from jule3d.volume import Volume

__all__ = ["foreground_mask", "METHODS", "ThresholdRule", "threshold_rule", "clean_mask", "threshold_step", "reduce_channels"]

METHODS = ("otsu", "nonzero")
"""Names accepted by ``foreground_mask(method=...)``."""

_MAX_THRESHOLD_SAMPLES = 1_000_000
_PREMASKED_MIN_FRACTION = 0.2
_PREMASKED_MIN_ABOVE_FRACTION = 0.01
_BIMODAL_SEPARABILITY = 0.8
_MIN_TISSUE_FRACTION = 0.02


def foreground_mask(
    volume_or_array: Volume | np.ndarray,
    method: str = "otsu",
    closing_radius: int = 2,
    keep_largest: bool = True,
    fill_holes: bool = True,
) -> np.ndarray:
    """Boolean foreground mask of a volume: specimen versus air / background.

    Parameters
    ----------
    volume_or_array : Volume or numpy.ndarray
        A :class:`~jule3d.volume.Volume` or an array ``(Z, Y, X)`` or ``(C, Z, Y, X)``. Several
        channels are averaged before thresholding.
    method : {"otsu", "nonzero"}
        ``"otsu"``: Otsu threshold (computed on a strided sample of at most about a million
        voxels), foreground above it; when a single value fills at least 20 % of the volume and
        lies strictly inside the intensity range (pre-masked data such as BraTS), the foreground
        is every voxel differing from that value instead. ``"nonzero"``: voxels different from 0.
    closing_radius : int
        Radius in voxels of the ball used for the binary closing (0 disables it).
    keep_largest : bool
        Keep only the largest 6-connected component (drops the CT table, dust, noise).
    fill_holes : bool
        Fill enclosed cavities in 3D and holes enclosed within each ``Z`` slice.

    Returns
    -------
    numpy.ndarray of bool
        Mask of shape ``(Z, Y, X)``.

    Raises
    ------
    ValueError
        If ``method`` is unknown, ``closing_radius`` is negative, the array is not 3D/4D, the
        volume is constant, or no voxel ends up in the foreground.

    Examples
    --------
    A bright 8³ block in noisy air, with a dark 2³ cavity that hole filling closes:

    >>> import numpy as np
    >>> from jule3d.mask import foreground_mask
    >>> rng = np.random.default_rng(0)
    >>> image = rng.normal(0.0, 1.0, size=(16, 16, 16)).astype(np.float32)
    >>> image[4:12, 4:12, 4:12] += 20.0
    >>> image[7:9, 7:9, 7:9] = 0.0
    >>> mask = foreground_mask(image)
    >>> mask.shape, mask.dtype, int(mask.sum())
    ((16, 16, 16), dtype('bool'), 512)
    >>> int(foreground_mask(image, closing_radius=0, fill_holes=False).sum())
    504

    Pre-masked data (background exactly 0, inside the intensity range) keep every non-zero voxel:

    >>> premasked = np.zeros((16, 16, 16), np.float32)
    >>> premasked[4:12, 4:12, 4:12] = rng.normal(size=(8, 8, 8))
    >>> int(foreground_mask(premasked).sum())
    512
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if int(closing_radius) != closing_radius or closing_radius < 0:
        raise ValueError(f"closing_radius must be a non-negative integer, got {closing_radius!r}")
    image = reduce_channels(volume_or_array)
    rule = ThresholdRule(background=0.0) if method == "nonzero" else threshold_rule(_threshold_sample(image))
    mask = rule(image)
    if not mask.any():
        raise ValueError(f"foreground_mask(method={method!r}) found no foreground voxel")
    return clean_mask(mask, closing_radius, keep_largest, fill_holes)


def clean_mask(mask: np.ndarray, closing_radius: int = 2, keep_largest: bool = True,
               fill_holes: bool = True) -> np.ndarray:
    """The cleaning of :func:`foreground_mask`: closing, largest component, hole filling (each optional).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.mask import clean_mask
    >>> mask = np.zeros((9, 9, 9), dtype=bool)
    >>> mask[2:7, 2:7, 2:7] = True
    >>> mask[4, 4, 4] = False  # a cavity
    >>> mask[0, 0, 0] = True  # dust
    >>> int(clean_mask(mask, closing_radius=0).sum())
    125
    """
    if closing_radius:
        mask = _closing(mask, int(closing_radius))
    if keep_largest:
        mask = _largest_component(mask)
    if fill_holes:
        mask = _fill_holes(mask)
    return mask


@dataclass(frozen=True)
class ThresholdRule:
    """The voxel-wise part of :func:`foreground_mask`: differs from a constant ``background`` (pre-masked data),
    or lies above ``threshold``.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.mask import ThresholdRule
    >>> ThresholdRule(threshold=1.5)(np.array([1.0, 2.0])).tolist(), ThresholdRule(background=0.0)(np.array([0, 3])).tolist()
    ([False, True], [False, True])
    """

    background: float | None = None
    threshold: float | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Bool array: the voxels of ``image`` this rule keeps."""
        image = np.asarray(image)
        return image != self.background if self.background is not None else image > self.threshold


def threshold_step(shape: tuple[int, ...]) -> int:
    """Stride of the regular sample :func:`foreground_mask` thresholds (at most about a million voxels).

    Examples
    --------
    >>> threshold_step((100, 100, 100)), threshold_step((512, 1024, 1024))
    (1, 9)
    """
    return max(1, int(np.ceil((int(np.prod(shape)) / _MAX_THRESHOLD_SAMPLES) ** (1 / 3))))


def threshold_rule(sample: np.ndarray) -> ThresholdRule:
    """The rule ``method="otsu"`` derives from a sample of the voxels (see :func:`foreground_mask`).

    Raises
    ------
    ValueError
        If the sample is constant.
    """
    sample = np.asarray(sample).ravel()
    if sample.min() == sample.max():
        raise ValueError(
            "cannot compute a foreground mask of a constant volume "
            f"(every sampled voxel equals {sample.min()})"
        )
    background = _premasked_background(sample)
    if background is not None:
        return ThresholdRule(background=background)
    return ThresholdRule(threshold=_air_threshold(sample))


def reduce_channels(volume_or_array: Volume | np.ndarray) -> np.ndarray:
    """The one image to threshold: the single channel as it is, or the float32 mean over channels."""
    data = volume_or_array.data if isinstance(volume_or_array, Volume) else volume_or_array
    data = np.asarray(data)
    if data.ndim == 3:
        return data
    if data.ndim == 4:
        return data[0] if data.shape[0] == 1 else data.mean(axis=0, dtype=np.float32)
    raise ValueError(
        f"volume_or_array must be (Z, Y, X) or (C, Z, Y, X), got shape {data.shape}"
    )


def _threshold_sample(image: np.ndarray) -> np.ndarray:
    """A regular strided sample of at most about ``_MAX_THRESHOLD_SAMPLES`` voxels."""
    step = threshold_step(image.shape)
    return np.asarray(image[::step, ::step, ::step]).ravel()


def _premasked_background(sample: np.ndarray) -> float | None:
    """The constant background value of pre-masked data, or ``None`` when there is none."""
    values, counts = np.unique(sample, return_counts=True)
    mode = values[np.argmax(counts)]
    if counts.max() < _PREMASKED_MIN_FRACTION * sample.size:
        return None
    if np.count_nonzero(sample > mode) < _PREMASKED_MIN_ABOVE_FRACTION * sample.size:
        return None
    return float(mode)


def _separability(values: np.ndarray, threshold: float) -> float:
    """Otsu's separability: between-class variance over total variance of a two-class split (0..1)."""
    below = values <= threshold
    w0 = below.mean()
    if w0 in (0.0, 1.0) or values.var() == 0:
        return 0.0
    between = w0 * (1 - w0) * (values[below].mean() - values[~below].mean()) ** 2
    return float(between / values.var())


def _air_threshold(sample: np.ndarray) -> float:
    """Threshold between air and the darkest tissue.

    Otsu's threshold splits the histogram where the between-class variance is largest; when the tissue
    itself has several well separated intensity classes (fat / muscle / bone, or a bright and a dim
    tissue), that can fall between two tissues and leave the darker one out. So the split is repeated
    on the part below the threshold while that part is clearly bimodal: a separability above
    ``_BIMODAL_SEPARABILITY`` (a single Gaussian mode split at its mean scores 2/π ≈ 0.64), with at least
    ``_MIN_TISSUE_FRACTION`` of all voxels between the new and the old threshold.
    """
    threshold = threshold_otsu(sample)
    for _ in range(3):
        lower = sample[sample <= threshold]
        if lower.size < 100 or lower.min() == lower.max():
            break
        candidate = threshold_otsu(lower)
        moved = np.count_nonzero((sample > candidate) & (sample <= threshold))
        if _separability(lower, candidate) < _BIMODAL_SEPARABILITY or moved < _MIN_TISSUE_FRACTION * sample.size:
            break
        threshold = candidate
    return float(threshold)


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a ball, computed in the bounding box of the mask grown by ``radius``.

    Where the grown box passes the array edge it is padded by repeating the edge voxels, so a
    specimen cut by the field of view is closed there as if it went on beyond the edge.
    """
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    starts = [max(s.start - radius, 0) for s in box]
    stops = [min(s.stop + radius, n) for s, n in zip(box, mask.shape)]
    grown = tuple(slice(a, b) for a, b in zip(starts, stops))
    pads = [(radius - (s.start - a), radius - (b - s.stop)) for s, a, b in zip(box, starts, stops)]
    sub = np.pad(mask[grown], pads, mode="edge")
    closed = ndi.binary_closing(sub, structure=ball(radius))
    inner = tuple(slice(before, before + b - a) for (before, _), a, b in zip(pads, starts, stops))
    out = mask.copy()
    out[grown] |= closed[inner]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask``."""
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions enclosed in 3D, then those enclosed within each ``Z`` slice."""
    mask = ~_border_connected(~mask, ndi.generate_binary_structure(3, 1), axes=(0, 1, 2))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndi.generate_binary_structure(2, 1)
    return ~_border_connected(~mask, in_plane, axes=(1, 2))


def _border_connected(background: np.ndarray, structure: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Voxels of ``background`` connected (by ``structure``) to the array faces along ``axes``."""
    labels, n = ndi.label(background, structure=structure)
    if n == 0:
        return background
    on_border = np.zeros(n + 1, dtype=bool)
    for axis in axes:
        on_border[np.take(labels, 0, axis=axis)] = True
        on_border[np.take(labels, -1, axis=axis)] = True
    on_border[0] = False
    return on_border[labels]
