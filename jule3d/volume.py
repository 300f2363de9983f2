"""The in-memory volume: voxels, physical geometry and foreground mask.

Conventions (the same everywhere in jule3d):

* ``Volume.data`` has shape ``(C, Z, Y, X)``: channels first, then the array axes in the order
  SimpleITK's ``GetArrayFromImage`` returns them (slowest axis first).
* Geometry follows ITK: ``spacing`` and ``origin`` are in physical ``(x, y, z)`` order (mm), and
  ``direction`` is the row-major 3x3 direction cosine matrix. This is what NIfTI/NRRD/MHA headers
  hold once read by ITK, and what 3D Slicer and ITK-SNAP use, so a label map written with the
  volume's geometry opens aligned with it.
* ``Volume.mask`` is a boolean ``(Z, Y, X)`` foreground mask (``None`` until one is computed or given);
  every downstream stage (patch sampling, segmentation, evaluation) only looks inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from jule3d.validation import check_mask

__all__ = ["Geometry", "Volume"]


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a voxel grid.

    Parameters
    ----------
    shape : tuple of int
        Array shape ``(Z, Y, X)``.
    spacing : tuple of float
        Voxel size in mm, physical ``(x, y, z)`` order.
    origin : tuple of float
        Physical position of voxel ``(0, 0, 0)`` in mm, ``(x, y, z)`` order.
    direction : tuple of float
        Row-major 3x3 direction cosines (9 numbers).

    Examples
    --------
    >>> from jule3d.volume import Geometry
    >>> geom = Geometry((10, 20, 30), spacing=(0.5, 0.5, 2.0))
    >>> geom.spacing_zyx, geom.voxel_volume
    ((2.0, 0.5, 0.5), 0.5)
    >>> sub = geom.cropped((1, 0, 4), (5, 20, 10))
    >>> sub.shape, sub.origin
    ((5, 20, 10), (2.0, 0.0, 2.0))
    >>> geom.matches(sub), geom.describe_mismatch(sub)
    (False, 'shape (5, 20, 10) != (10, 20, 30); origin (2.0, 0.0, 2.0) != (0.0, 0.0, 0.0)')
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))
        if len(self.shape) != 3:
            raise ValueError(f"Geometry.shape must have 3 entries (Z, Y, X), got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0 or not np.all(np.isfinite(self.spacing)):
            raise ValueError(f"Geometry.spacing must be 3 positive finite numbers, got {self.spacing}")
        if len(self.origin) != 3:
            raise ValueError(f"Geometry.origin must have 3 entries, got {self.origin}")
        if len(self.direction) != 9:
            raise ValueError(f"Geometry.direction must have 9 entries, got {len(self.direction)}")

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in array-axis order ``(Z, Y, X)``."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm³."""
        return float(np.prod(self.spacing))

    def matches(self, other: "Geometry", atol: float = 1e-4) -> bool:
        """Whether ``other`` describes the same voxel grid (shape exact, the rest within ``atol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def describe_mismatch(self, other: "Geometry", atol: float = 1e-4) -> str:
        """Human-readable list of the fields in which ``other`` differs (empty when they match)."""
        parts = []
        if self.shape != other.shape:
            parts.append(f"shape {other.shape} != {self.shape}")
        for name in ("spacing", "origin", "direction"):
            a, b = getattr(self, name), getattr(other, name)
            if not np.allclose(a, b, atol=atol):
                parts.append(f"{name} {tuple(round(v, 6) for v in b)} != {tuple(round(v, 6) for v in a)}")
        return "; ".join(parts)

    def cropped(self, start_zyx: Sequence[int], shape_zyx: Sequence[int]) -> "Geometry":
        """Geometry of the sub-grid starting at array index ``start_zyx`` with shape ``shape_zyx``."""
        start_xyz = np.asarray(start_zyx[::-1], dtype=float)
        d = np.asarray(self.direction).reshape(3, 3)
        origin = np.asarray(self.origin) + d @ (start_xyz * np.asarray(self.spacing))
        return replace(self, shape=tuple(int(s) for s in shape_zyx), origin=tuple(origin))


@dataclass
class Volume:
    """A (possibly multi-channel) 3D image with its geometry and foreground mask.

    Parameters
    ----------
    data : numpy.ndarray
        Voxels, shape ``(C, Z, Y, X)``. May be a read-only memory map.
    geometry : Geometry
        Physical placement of the grid; ``geometry.shape == data.shape[1:]``.
    mask : numpy.ndarray of bool, optional
        Foreground, shape ``(Z, Y, X)``.
    channel_names : tuple of str, optional
        One name per channel (defaults to ``ch0``, ``ch1``, ...).
    sources : tuple of str, optional
        Files the channels were read from (empty for in-memory volumes).
    normalized : bool
        Whether the intensities are ready for the method (set by
        :func:`jule3d.normalize.normalize_intensity`); :func:`jule3d.io.prepare_volume` normalises a volume
        that is not.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.volume import Volume
    >>> vol = Volume.from_array(np.zeros((4, 6, 8), dtype=np.float32), spacing=(1.0, 1.0, 2.5))
    >>> vol.shape, vol.n_channels, vol.spacing, vol.channel_names
    ((4, 6, 8), 1, (1.0, 1.0, 2.5), ('ch0',))
    >>> mask = np.zeros(vol.shape, dtype=bool)
    >>> mask[1:3, 2:4, 2:6] = True
    >>> vol = vol.with_mask(mask)
    >>> int(vol.foreground().sum())
    16
    >>> sub = vol.crop((1, 2, 2), (3, 4, 6))
    >>> sub.shape, sub.geometry.origin, bool(sub.mask.all())
    ((2, 2, 4), (2.0, 2.0, 2.5), True)
    >>> sub
    Volume(channels=['ch0'], shape=(2, 2, 4), spacing=(1.0, 1.0, 2.5), dtype=float32, mask=100.0%)
    """

    data: np.ndarray
    geometry: Geometry
    mask: np.ndarray | None = None
    channel_names: tuple[str, ...] = ()
    sources: tuple[str, ...] = field(default_factory=tuple)
    normalized: bool = False

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ValueError(f"Volume.data must have shape (C, Z, Y, X), got ndim={self.data.ndim}")
        if tuple(self.data.shape[1:]) != self.geometry.shape:
            raise ValueError(
                f"Volume.data spatial shape {tuple(self.data.shape[1:])} does not match "
                f"geometry.shape {self.geometry.shape}"
            )
        if not self.channel_names:
            self.channel_names = tuple(f"ch{i}" for i in range(self.data.shape[0]))
        if len(self.channel_names) != self.data.shape[0]:
            raise ValueError(
                f"{len(self.channel_names)} channel names for {self.data.shape[0]} channels"
            )
        if self.mask is not None:
            self.mask = check_mask(self.mask, self.shape)

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        direction: Sequence[float] | None = None,
        mask: np.ndarray | None = None,
        channel_names: Sequence[str] = (),
    ) -> "Volume":
        """Wrap a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array; spacing/origin in ``(x, y, z)`` order."""
        array = np.asarray(array)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(
                f"array must be 3D (Z, Y, X) or 4D (C, Z, Y, X), got shape {array.shape}"
            )
        geom = Geometry(
            shape=array.shape[1:],
            spacing=tuple(spacing),
            origin=tuple(origin),
        )
        if direction is not None:
            geom = replace(geom, direction=tuple(direction))
        return cls(array, geom, mask=mask, channel_names=tuple(channel_names))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(Z, Y, X)``."""
        return self.geometry.shape

    @property
    def n_channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.data.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, ``(x, y, z)``."""
        return self.geometry.spacing

    def with_mask(self, mask: np.ndarray | None) -> "Volume":
        """A copy sharing the voxels, with ``mask`` as foreground (checked for shape and emptiness)."""
        return replace(self, mask=None if mask is None else check_mask(mask, self.shape))

    def foreground(self) -> np.ndarray:
        """The mask, or an all-true array when none is set."""
        return self.mask if self.mask is not None else np.ones(self.shape, dtype=bool)

    def crop(self, start_zyx: Sequence[int], stop_zyx: Sequence[int]) -> "Volume":
        """Sub-volume ``[start, stop)`` along (Z, Y, X), geometry and mask cropped alike."""
        sl = tuple(slice(int(a), int(b)) for a, b in zip(start_zyx, stop_zyx))
        data = self.data[(slice(None),) + sl]
        geom = self.geometry.cropped(start_zyx, data.shape[1:])
        mask = None if self.mask is None else self.mask[sl]
        if mask is not None and not mask.any():
            raise ValueError(f"crop {start_zyx}..{stop_zyx} contains no foreground voxel")
        return replace(self, data=data, geometry=geom, mask=mask)

    def __repr__(self) -> str:
        fg = "none" if self.mask is None else f"{self.mask.mean():.1%}"
        return (
            f"Volume(channels={list(self.channel_names)}, shape={self.shape}, "
            f"spacing={tuple(round(s, 4) for s in self.spacing)}, dtype={self.data.dtype}, mask={fg})"
        )
