"""Phase 1 input: cubic patches drawn from one volume.

A patch of odd side ``w`` is identified by its centre voxel ``(z, y, x)`` (array indices) and covers
``[z - w//2, z + w//2]`` along each axis. Patches are sampled inside the volume's foreground mask and
only where at least ``min_foreground`` of the patch's voxels are foreground, so that mostly-air cubes
never reach the network.

Air inside a patch
------------------
A patch at the specimen's edge still holds some air. Left as is, the air/tissue edge is the strongest
signal in such patches and an unsupervised method learns "edge vs interior" instead of "tissue vs
tissue". ``background`` decides what the air voxels of a patch become:

``"zero"`` (default)
    0. After :func:`jule3d.normalize.normalize_intensity` (z-score inside the mask, what
    :func:`jule3d.io.load_volume` applies by default) 0 is the mean foreground intensity, so the edge's
    contrast disappears while the tissue voxels are unchanged. That normalisation already sets air to
    exactly 0, so on such volumes ``"zero"`` and ``"keep"`` give the same patches; ``"zero"`` also
    protects volumes that were not normalised.
``"mean"``
    The mean of the patch's own foreground voxels (per channel): no contrast step whatever the
    normalisation.
``"keep"``
    Unchanged voxel values (the edge stays visible).

Together with ``min_foreground`` this is the knob to measure how much the specimen boundary matters.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from numbers import Real
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from .grid import Grid
from .validation import check_int, check_mask, check_range
from .volume import Volume

__all__ = [
    "PatchSet",
    "sample_patches",
    "grid_patches",
    "extract_patches",
    "resample_isotropic",
    "patch_size_for",
    "BACKGROUND_MODES",
]

#: What air voxels inside a patch become; see the module documentation.
BACKGROUND_MODES: tuple[str, ...] = ("zero", "mean", "keep")
#: Upper bound of the temporary memory used per extraction chunk (bytes).
CHUNK_BYTES = 64 * 2**20


@dataclass
class PatchSet:
    """A set of cubic patches and where they came from.

    Parameters
    ----------
    patches : numpy.ndarray
        float32 array ``(N, C, w, w, w)``.
    centers : numpy.ndarray
        int64 array ``(N, 3)``: centre voxel of each patch, ``(z, y, x)`` array indices of the volume
        the patches were cut from.
    patch_size : int
        Side ``w`` of the cubes (odd).
    labels : numpy.ndarray, optional
        One integer per patch, e.g. the ground-truth class at the centre voxel or a cluster label.
    spacing : tuple of float, default (1, 1, 1)
        Voxel size in mm, ``(x, y, z)``, of the source volume.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.patches import PatchSet
    >>> patches = np.zeros((40, 1, 9, 9, 9), dtype=np.float32)
    >>> centers = np.tile([4, 4, 4], (40, 1))
    >>> ps = PatchSet(patches, centers, 9, labels=np.arange(40) % 3, spacing=(0.5, 0.5, 0.5))
    >>> len(ps), ps.n_channels, ps.patches.dtype, ps.centers.dtype
    (40, 1, dtype('float32'), dtype('int64'))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     again = PatchSet.load(ps.save(Path(tmp) / "patches.npz"))
    >>> again.patches.shape, again.spacing, bool(np.array_equal(again.labels, ps.labels))
    ((40, 1, 9, 9, 9), (0.5, 0.5, 0.5), True)
    """

    patches: np.ndarray
    centers: np.ndarray
    patch_size: int
    labels: np.ndarray | None = None
    spacing: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))

    def __post_init__(self) -> None:
        self.patches = np.asarray(self.patches, dtype=np.float32)
        self.centers = np.asarray(self.centers, dtype=np.int64)
        self.patch_size = int(self.patch_size)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        w = self.patch_size
        if self.patches.ndim != 5 or self.patches.shape[2:] != (w, w, w):
            raise ValueError(
                f"patches must have shape (N, C, {w}, {w}, {w}) for patch_size={w}, "
                f"got {self.patches.shape}"
            )
        n = self.patches.shape[0]
        if self.centers.shape != (n, 3):
            raise ValueError(f"centers must have shape ({n}, 3), got {self.centers.shape}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if self.labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")
        if len(self.spacing) != 3:
            raise ValueError(f"spacing must have 3 entries (x, y, z), got {self.spacing}")

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def n_channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.patches.shape[1])

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the set to an ``.npz`` file (uncompressed) at exactly ``path``.

        Parameters
        ----------
        path : str or path-like
            Target file.
        overwrite : bool, default False
            Replace an existing file.

        Returns
        -------
        pathlib.Path
            The written file.

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        FileNotFoundError
            If the folder of ``path`` does not exist.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"path {str(path)!r} exists; pass overwrite=True to replace it")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder of path {str(path)!r} does not exist")
        arrays = {
            "patches": self.patches,
            "centers": self.centers,
            "patch_size": np.int64(self.patch_size),
            "spacing": np.asarray(self.spacing, dtype=np.float64),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchSet":
        """Read a set written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a patch set.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path {str(path)!r} does not exist")
        with np.load(path, allow_pickle=False) as data:
            missing = {"patches", "centers", "patch_size", "spacing"} - set(data.files)
            if missing:
                raise ValueError(f"path {str(path)!r} is not a PatchSet file (missing {sorted(missing)})")
            return cls(
                patches=data["patches"],
                centers=data["centers"],
                patch_size=int(data["patch_size"]),
                labels=data["labels"] if "labels" in data.files else None,
                spacing=tuple(data["spacing"]),
            )


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_patch_size(patch_size: int, shape: Sequence[int] | None = None) -> int:
    """``patch_size`` must be a positive odd integer no larger than any side of ``shape``."""
    check_int("patch_size", patch_size, 1)
    if patch_size % 2 == 0:
        raise ValueError(
            f"patch_size must be odd so that the patch has a centre voxel, got {patch_size}; "
            f"use {patch_size - 1} or {patch_size + 1}"
        )
    if shape is not None and min(shape) < patch_size:
        raise ValueError(
            f"patch_size={patch_size} is larger than the volume, shape (Z, Y, X) = {tuple(shape)}; "
            "use a smaller patch_size"
        )
    return int(patch_size)


def _check_min_foreground(min_foreground: float) -> float:
    return check_range("min_foreground", min_foreground, 0.0, 1.0)


def _check_background(background: str) -> str:
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
    return background


def _foreground(volume: Volume) -> np.ndarray:
    """The volume's mask (all voxels when it has none); raises if it is empty."""
    return check_mask(volume.foreground(), volume.shape, "volume.mask")


def _check_labels(labels: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"labels shape {labels.shape} does not match the volume shape {shape}")
    return labels


# ----------------------------------------------------------------------------------------------
# Foreground fraction of every patch position
# ----------------------------------------------------------------------------------------------


def _box_counts(mask: np.ndarray, w: int) -> np.ndarray:
    """Number of foreground voxels in the ``w``³ box at every position where it fits.

    Returns an integer array of shape ``(Z-w+1, Y-w+1, X-w+1)``; entry ``i`` is the count of the box
    whose first voxel is ``i`` (whose centre is ``i + w//2``). Exact (integral image), no loop.
    """
    dtype = np.int32 if mask.size < 2**31 else np.int64
    integral = np.zeros(tuple(n + 1 for n in mask.shape), dtype=dtype)
    integral[1:, 1:, 1:] = mask.cumsum(0, dtype=dtype).cumsum(1).cumsum(2)
    lo = slice(None, -w)
    hi = slice(w, None)
    s = integral
    return (
        s[hi, hi, hi] - s[lo, hi, hi] - s[hi, lo, hi] - s[hi, hi, lo]
        + s[lo, lo, hi] + s[lo, hi, lo] + s[hi, lo, lo] - s[lo, lo, lo]
    )


def _eligible(mask: np.ndarray, w: int, min_foreground: float) -> np.ndarray:
    """Boolean ``(Z-w+1, Y-w+1, X-w+1)``: box fits, centre is foreground, enough foreground."""
    r = w // 2
    needed = math.ceil(min_foreground * w**3 - 1e-9)
    centre_in_mask = mask[r : mask.shape[0] - r, r : mask.shape[1] - r, r : mask.shape[2] - r]
    return centre_in_mask & (_box_counts(mask, w) >= needed)


def _nth_true(flags: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Indices ``(n, 3)`` of the ``ranks``-th true entries of ``flags`` (in C order).

    Works slab by slab along the first axis, so no index array of all true entries is built.
    """
    per_slab = flags.reshape(flags.shape[0], -1).sum(1)
    first_rank = np.concatenate([[0], np.cumsum(per_slab)])
    slab = np.searchsorted(first_rank, ranks, side="right") - 1
    out = np.empty((len(ranks), 3), dtype=np.int64)
    for z in np.unique(slab):
        sel = np.flatnonzero(slab == z)
        flat = np.flatnonzero(flags[z])[ranks[sel] - first_rank[z]]
        out[sel, 0] = z
        out[sel, 1:] = np.stack(np.unravel_index(flat, flags.shape[1:]), axis=1)
    return out


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


def _check_centers(centers: np.ndarray, shape: tuple[int, int, int], w: int) -> np.ndarray:
    centers = np.asarray(centers)
    if centers.ndim != 2 or centers.shape[1] != 3 or not np.issubdtype(centers.dtype, np.integer):
        raise ValueError(f"centers must be an integer array of shape (N, 3), got {centers.dtype} {centers.shape}")
    r = w // 2
    inside = (centers >= r) & (centers <= np.asarray(shape) - 1 - r)
    if not inside.all():
        bad = centers[~inside.all(1)][0]
        raise ValueError(
            f"centers must keep the whole {w}³ patch inside the volume of shape {shape}: "
            f"centre {tuple(int(c) for c in bad)} is closer than {r} voxels to the border"
        )
    return centers.astype(np.int64)


def _apply_background(patches: np.ndarray, fg: np.ndarray, background: str) -> None:
    """Replace air voxels of ``patches`` (n, C, w, w, w) in place; ``fg`` is (n, w, w, w) bool."""
    if background == "keep":
        return
    air = ~fg[:, None]
    if background == "zero":
        np.copyto(patches, 0.0, where=air)
        return
    counts = np.maximum(fg.reshape(len(fg), -1).sum(1), 1)
    sums = np.einsum("ncv,nv->nc", patches.reshape(*patches.shape[:2], -1), fg.reshape(len(fg), -1))
    means = (sums / counts[:, None]).astype(np.float32)
    np.copyto(patches, np.broadcast_to(means[:, :, None, None, None], patches.shape), where=air)


def _extract(
    data: np.ndarray,
    mask: np.ndarray | None,
    centers: np.ndarray,
    w: int,
    background: str,
) -> np.ndarray:
    """Patches ``(N, C, w, w, w)`` float32 at valid ``centers``, in chunks of bounded memory."""
    n, c = len(centers), data.shape[0]
    out = np.empty((n, c, w, w, w), dtype=np.float32)
    windows = sliding_window_view(data, (w, w, w), axis=(1, 2, 3))
    mask_windows = None if mask is None else sliding_window_view(mask, (w, w, w))
    starts = centers - w // 2
    chunk = max(1, CHUNK_BYTES // (c * w**3 * 4))
    for i in range(0, n, chunk):
        z, y, x = starts[i : i + chunk].T
        for ch in range(c):
            out[i : i + chunk, ch] = windows[ch, z, y, x]
        if mask_windows is not None and background != "keep":
            _apply_background(out[i : i + chunk], mask_windows[z, y, x], background)
    return out


def extract_patches(
    volume: Volume, centers: np.ndarray, patch_size: int, background: str = "keep"
) -> np.ndarray:
    """Cut the patches centred on ``centers`` out of ``volume``.

    Parameters
    ----------
    volume : Volume
        Source volume.
    centers : numpy.ndarray
        Integer ``(N, 3)`` centre voxels, ``(z, y, x)``; each whole patch must lie inside the volume.
    patch_size : int
        Odd side ``w`` of the cubes.
    background : {"keep", "zero", "mean"}, default "keep"
        What voxels outside ``volume.mask`` become (see the module documentation); ``"keep"`` returns
        the voxels exactly as they are in the volume.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, C, w, w, w)``.

    Raises
    ------
    ValueError
        If ``patch_size`` is not a positive odd integer or exceeds the volume, or a centre is too close
        to the border.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.patches import extract_patches
    >>> from jule3d.phantom import make_phantom
    >>> volume = make_phantom(shape=(24, 24, 24), seed=0).volume
    >>> patches = extract_patches(volume, np.array([[12, 12, 12], [8, 10, 14]]), 9)
    >>> patches.shape, patches.dtype
    ((2, 1, 9, 9, 9), dtype('float32'))
    >>> bool(np.array_equal(patches[0, 0], volume.data[0, 8:17, 8:17, 8:17]))
    True
    """
    w = _check_patch_size(patch_size, volume.shape)
    background = _check_background(background)
    centers = _check_centers(centers, volume.shape, w)
    return _extract(volume.data, volume.mask, centers, w, background)


def _padded(volume: Volume, r: int) -> Volume:
    """``volume`` padded by ``r`` voxels on every side: mirrored values, mask false in the margin."""
    pad = ((0, 0),) + ((r, r),) * 3
    data = np.pad(np.asarray(volume.data, dtype=np.float32), pad, mode="symmetric")
    mask = np.pad(volume.foreground(), r, mode="constant", constant_values=False)
    return Volume.from_array(data, spacing=volume.spacing, mask=mask)


def _patchset(
    source: Volume,
    centers: np.ndarray,
    w: int,
    background: str,
    labels: np.ndarray | None,
    offset: int = 0,
) -> PatchSet:
    """Extract patches at ``centers + offset`` of ``source``; ``centers`` and labels index the original."""
    patches = _extract(source.data, source.mask, centers + offset, w, background)
    patch_labels = None if labels is None else labels[tuple(centers.T)]
    return PatchSet(patches, centers, w, labels=patch_labels, spacing=source.spacing)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def sample_patches(
    volume: Volume,
    n_patches: int,
    patch_size: int = 27,
    min_foreground: float = 0.5,
    seed: int = 0,
    exclude_border: bool = True,
    background: str = "zero",
    labels: np.ndarray | None = None,
) -> PatchSet:
    """Draw ``n_patches`` distinct random patches inside the volume's foreground.

    Every candidate centre is a foreground voxel whose ``w``³ patch has at least ``min_foreground`` of
    its voxels in the mask; the fractions of all positions are computed at once from an integral image.
    Centres are drawn uniformly without replacement.

    Parameters
    ----------
    volume : Volume
        Source volume; its ``mask`` is the foreground (the whole volume when it has none).
    n_patches : int
        Number of patches ``N`` (positive).
    patch_size : int, default 27
        Odd side ``w`` of the cubes.
    min_foreground : float, default 0.5
        Least fraction of a patch's voxels that must be foreground, in ``[0, 1]``.
    seed : int, default 0
        Seed of the draw: the same seed gives the same centres in the same order.
    exclude_border : bool, default True
        Only centres whose whole patch lies inside the volume. With ``False``, centres may lie up to the
        border: the volume is padded by ``w//2`` (mirrored values, mask false), so padded voxels count
        as air and are treated by ``background``; ``centers`` stay in the original volume's indices.
    background : {"zero", "mean", "keep"}, default "zero"
        What air voxels inside a patch become (see the module documentation).
    labels : numpy.ndarray, optional
        Integer ``(Z, Y, X)`` map (e.g. ground truth); its value at each centre becomes ``PatchSet.labels``.

    Returns
    -------
    PatchSet

    Raises
    ------
    ValueError
        On a bad argument (named in the message), an empty mask, a volume smaller than a patch, or fewer
        eligible positions than ``n_patches`` (the message says how many there are).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.patches import sample_patches
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> ps = sample_patches(phantom.volume, 40, patch_size=9, seed=0, labels=phantom.labels)
    >>> ps.patches.shape, ps.centers.shape, ps.spacing
    ((40, 1, 9, 9, 9), (40, 3), (0.5, 0.5, 0.5))
    >>> sorted(set(ps.labels.tolist())), bool(phantom.volume.mask[tuple(ps.centers.T)].all())
    ([1, 2, 3], True)
    >>> again = sample_patches(phantom.volume, 40, patch_size=9, seed=0)
    >>> bool(np.array_equal(again.centers, ps.centers))
    True
    """
    check_int("n_patches", n_patches, 1)
    w = _check_patch_size(patch_size, volume.shape)
    min_foreground = _check_min_foreground(min_foreground)
    background = _check_background(background)
    labels = _check_labels(labels, volume.shape)
    _foreground(volume)
    r = w // 2
    source = volume if exclude_border else _padded(volume, r)
    eligible = _eligible(source.foreground(), w, min_foreground)
    available = int(eligible.sum())
    if available < n_patches:
        raise ValueError(
            f"only {available} patch positions have their centre in the mask and at least "
            f"min_foreground={min_foreground:g} of their {w}^3 voxels in it, fewer than "
            f"n_patches={n_patches}; lower n_patches, min_foreground or patch_size"
            + (", or pass exclude_border=False" if exclude_border else "")
        )
    ranks = np.random.default_rng(seed).choice(available, size=n_patches, replace=False)
    starts = _nth_true(eligible, ranks)
    # Box start i has its centre at i + r in ``source``: that is i + r in the volume itself, or i
    # when ``source`` is the volume padded by r.
    centers = starts + r if exclude_border else starts
    return _patchset(source, centers, w, background, labels, offset=0 if exclude_border else r)


def grid_patches(
    volume: Volume,
    stride: int,
    patch_size: int = 27,
    min_foreground: float = 0.5,
    background: str = "zero",
    labels: np.ndarray | None = None,
) -> PatchSet:
    """All patches on a regular grid of step ``stride`` that pass the foreground test.

    The positions are those of :class:`jule3d.grid.Grid` (the whole patch inside the volume), kept where the
    centre is foreground and at least ``min_foreground`` of the patch is. Order: C order of
    the grid (z slowest).

    Parameters
    ----------
    volume : Volume
        Source volume; its ``mask`` is the foreground (the whole volume when it has none).
    stride : int
        Grid step in voxels (positive).
    patch_size, min_foreground, background, labels
        As in :func:`sample_patches`.

    Returns
    -------
    PatchSet

    Raises
    ------
    ValueError
        On a bad argument (named in the message), an empty mask, a volume smaller than a patch, or no
        grid position passing the foreground test.

    Examples
    --------
    >>> from jule3d.patches import grid_patches
    >>> from jule3d.phantom import make_phantom
    >>> volume = make_phantom(shape=(24, 24, 24), seed=0).volume
    >>> ps = grid_patches(volume, stride=4, patch_size=9)
    >>> len(ps), ps.patches.shape[1:], ps.centers[:3].tolist()
    (62, (1, 9, 9, 9), [[4, 4, 8], [4, 4, 12], [4, 4, 16]])
    """
    w = _check_patch_size(patch_size, volume.shape)
    grid = Grid(volume.shape, w, stride)  # checks the stride
    min_foreground = _check_min_foreground(min_foreground)
    background = _check_background(background)
    labels = _check_labels(labels, volume.shape)
    eligible = _eligible(_foreground(volume), w, min_foreground)[::stride, ::stride, ::stride]
    if not eligible.any():
        raise ValueError(
            f"no grid position (stride={stride}) has its centre in the mask and at least "
            f"min_foreground={min_foreground:g} of its {w}^3 voxels in it; lower min_foreground, "
            "patch_size or stride"
        )
    centers = grid.centers(np.argwhere(eligible))
    return _patchset(volume, centers, w, background, labels)


# ----------------------------------------------------------------------------------------------
# Resampling and physical patch sizes
# ----------------------------------------------------------------------------------------------


def resample_isotropic(volume: Volume, spacing: float | None = None, order: int = 1) -> Volume:
    """Resample a volume to cubic voxels.

    The first voxel's centre, the direction and the physical extent are kept: along each axis the new
    grid has ``round(n * old / new)`` voxels of size ``new``, and output voxel ``i`` samples the input at
    index ``i * new / old`` (exact geometry, unlike a corner-aligned zoom).

    Parameters
    ----------
    volume : Volume
        Source volume.
    spacing : float, optional
        Target voxel size in mm; default the finest of the volume's spacings (no detail is lost).
    order : int, default 1
        Spline order for intensities (0 nearest, 1 linear, 3 cubic). The mask is always resampled by
        nearest neighbour.

    Returns
    -------
    Volume
        float32 volume with ``spacing`` on all axes and the mask resampled alike; the volume itself
        when it already has that spacing.

    Raises
    ------
    ValueError
        If ``spacing`` is not a positive number or ``order`` not in 0..5.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.patches import resample_isotropic
    >>> from jule3d.volume import Volume
    >>> volume = Volume.from_array(np.zeros((10, 20, 20), dtype=np.float32), spacing=(0.5, 0.5, 1.0))
    >>> iso = resample_isotropic(volume)
    >>> iso.shape, iso.spacing
    ((20, 20, 20), (0.5, 0.5, 0.5))
    >>> resample_isotropic(iso) is iso
    True
    """
    if spacing is None:
        spacing = min(volume.spacing)
    if isinstance(spacing, bool) or not isinstance(spacing, Real) or not np.isfinite(spacing) or spacing <= 0:
        raise ValueError(f"spacing must be a positive number (mm), got {spacing!r}")
    check_int("order", order, 0, 5)
    old = np.asarray(volume.geometry.spacing_zyx)
    if np.allclose(old, spacing, rtol=1e-6, atol=0):
        return volume
    scale = float(spacing) / old
    shape = tuple(max(1, int(round(n / s))) for n, s in zip(volume.shape, scale))

    def resample(array: np.ndarray, spline_order: int, dtype: type) -> np.ndarray:
        return ndimage.affine_transform(
            array, scale, output_shape=shape, order=spline_order, mode="nearest", output=dtype
        )

    data = np.stack([resample(np.asarray(ch, dtype=np.float32), order, np.float32) for ch in volume.data])
    mask = None if volume.mask is None else resample(volume.mask.astype(np.uint8), 0, np.uint8) > 0
    geometry = replace(volume.geometry, shape=shape, spacing=(float(spacing),) * 3)
    return replace(volume, data=data, geometry=geometry, mask=mask)


def patch_size_for(volume: Volume, physical_size_mm: float) -> int:
    """Odd patch side (voxels) closest to ``physical_size_mm`` on this volume's isotropic grid.

    Parameters
    ----------
    volume : Volume
        Volume with cubic voxels (use :func:`resample_isotropic` first otherwise).
    physical_size_mm : float
        Wanted side of the patch in mm.

    Returns
    -------
    int
        The odd number of voxels ``w >= 1`` whose physical size ``w * spacing`` is closest to
        ``physical_size_mm``.

    Raises
    ------
    ValueError
        If ``physical_size_mm`` is not positive or the voxels are not cubic.

    Examples
    --------
    On 0.5 mm voxels, 5 mm is 10 voxels, which lies between the odd sides 9 and 11:

    >>> import numpy as np
    >>> from jule3d.patches import patch_size_for
    >>> from jule3d.volume import Volume
    >>> volume = Volume.from_array(np.zeros((20, 20, 20), dtype=np.float32), spacing=(0.5, 0.5, 0.5))
    >>> patch_size_for(volume, 5.0), patch_size_for(volume, 4.0), patch_size_for(volume, 0.1)
    (11, 9, 1)
    """
    if isinstance(physical_size_mm, bool) or not isinstance(physical_size_mm, Real) or not (
        np.isfinite(physical_size_mm) and physical_size_mm > 0
    ):
        raise ValueError(f"physical_size_mm must be a positive number, got {physical_size_mm!r}")
    spacing = np.asarray(volume.spacing)
    if not np.allclose(spacing, spacing[0], rtol=1e-3, atol=0):
        raise ValueError(
            f"volume spacing {tuple(spacing)} is not isotropic: a cube of voxels is not a physical cube; "
            "call resample_isotropic(volume) first"
        )
    voxels = physical_size_mm / spacing[0]
    return max(1, 2 * int(math.floor((voxels - 1) / 2 + 0.5)) + 1)
