"""The regular grid of patch positions over a volume: one geometry for sampling, dense features and projection.

In the spirit of TorchIO's ``GridSampler`` / ``GridAggregator``: a :class:`Grid` knows where the patches of a
stride-``s`` grid lie, which of them have their centre in the foreground, how to cut the grid into chunks with
the halo of voxels their patches read, and how to paint per-position values back onto the voxels.

Geometry (tested in ``tests/test_grid.py`` and, through Phase 2, ``tests/test_segmentation.py``):

* Grid index ``i`` along an axis has its patch corner at ``i * stride`` and its centre at
  ``i * stride + offset`` with ``offset = (patch_size - 1) // 2``; only whole patches inside the volume count,
  so an axis of ``n`` voxels has ``(n - patch_size) // stride + 1`` positions.
* :meth:`Grid.to_voxels`: every centre ``c`` labels its ``stride³`` block ``[c - stride // 2, c - stride // 2 +
  stride)``; on a full grid that is the nearest centre in mm. Blocks at the volume border (within
  ``patch_size // 2`` voxels, where no whole patch fits) extend the outermost blocks. A position without a value
  first takes the value of the nearest position with one (in mm, so anisotropic spacing counts).

Examples
--------
>>> import numpy as np
>>> grid = Grid((10, 10, 10), patch_size=5, stride=2)
>>> grid.grid_shape, grid.offset
((3, 3, 3), 2)
>>> grid.centers(np.array([[0, 1, 2]])).tolist()
[[2, 4, 6]]
>>> [tuple(box) for box in grid.chunks(2)][:2]
[((0, 0, 0), (2, 2, 2)), ((0, 0, 2), (2, 2, 3))]
>>> int(grid.to_voxels(np.arange(27).reshape(3, 3, 3))[4, 4, 4])  # centre (4, 4, 4) is position (1, 1, 1)
13
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .validation import check_int

__all__ = ["Grid"]


@dataclass(frozen=True)
class Grid:
    """Patch positions of step ``stride`` over a volume of ``shape`` voxels.

    Parameters
    ----------
    shape : tuple of 3 int
        Volume shape ``(Z, Y, X)``.
    patch_size : int
        Patch side ``w`` (odd for a centre voxel; at most the smallest side).
    stride : int
        Voxels between neighbouring positions.

    Raises
    ------
    ValueError
        A non-positive size or stride, or a patch larger than the volume.
    """

    shape: tuple[int, int, int]
    patch_size: int
    stride: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        check_int("patch_size", self.patch_size, 1)
        check_int("stride", self.stride, 1)
        if len(self.shape) != 3 or min(self.shape) < self.patch_size:
            raise ValueError(f"the volume {self.shape} is smaller than the patch size {self.patch_size} "
                             "along some axis")

    @property
    def offset(self) -> int:
        """Voxel index of the first centre along every axis, ``(patch_size - 1) // 2``."""
        return (self.patch_size - 1) // 2

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Number of positions along ``(Z, Y, X)``."""
        return tuple((s - self.patch_size) // self.stride + 1 for s in self.shape)  # type: ignore[return-value]

    def centers(self, positions: np.ndarray | None = None) -> np.ndarray:
        """``(M, 3)`` voxel coordinates of the centres of ``positions`` (grid indices; default: all, C order)."""
        if positions is None:
            positions = np.argwhere(np.ones(self.grid_shape, dtype=bool))
        return np.asarray(positions) * self.stride + self.offset

    def select(self, mask: np.ndarray) -> np.ndarray:
        """Bool ``grid_shape`` array: the positions whose centre lies in ``mask`` (``(Z, Y, X)``)."""
        o, s = self.offset, self.stride
        stop = [o + (g - 1) * s + 1 for g in self.grid_shape]
        return np.asarray(mask, dtype=bool)[o:stop[0]:s, o:stop[1]:s, o:stop[2]:s]

    def chunks(self, chunk: int) -> Iterator[tuple[tuple[int, int, int], tuple[int, int, int]]]:
        """Boxes ``(start, stop)`` of at most ``chunk`` positions per side that tile the grid, in C order."""
        check_int("chunk", chunk, 1)
        g = self.grid_shape
        for a in range(0, g[0], chunk):
            for b in range(0, g[1], chunk):
                for c in range(0, g[2], chunk):
                    start = (a, b, c)
                    yield start, tuple(min(start[i] + chunk, g[i]) for i in range(3))  # type: ignore[misc]

    def halo(self, first: Sequence[int], last: Sequence[int]) -> tuple[slice, slice, slice]:
        """The voxels the patches of positions ``first..last`` (inclusive, per axis) read: their box with halo."""
        return tuple(slice(int(a) * self.stride, int(b) * self.stride + self.patch_size)
                     for a, b in zip(first, last))  # type: ignore[return-value]

    def to_voxels(self, values: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
                  missing: int = 0) -> np.ndarray:
        """Paint per-position ``values`` (``grid_shape``) onto the voxels (the rule in the module docstring).

        Positions whose value is ``missing`` first take the value of the nearest other position, in mm.

        Returns
        -------
        numpy.ndarray
            ``shape`` array of ``values``' dtype.
        """
        from scipy import ndimage

        values = np.asarray(values)
        if values.shape != self.grid_shape:
            raise ValueError(f"values must have the grid shape {self.grid_shape}, got {values.shape}")
        holes = values == missing
        if holes.any() and not holes.all():
            nearest = ndimage.distance_transform_edt(holes, sampling=np.asarray(spacing_zyx) * self.stride,
                                                     return_distances=False, return_indices=True)
            values = values[tuple(nearest)]
        s = self.stride
        fine = np.repeat(np.repeat(np.repeat(values, s, 0), s, 1), s, 2)
        # centre c labels the block [c - s//2, c - s//2 + s); pad with edge values to cover the border
        start = self.offset - s // 2
        pad = [(max(start, 0), max(self.shape[i] - (start + fine.shape[i]), 0)) for i in range(3)]
        crop = tuple(slice(max(-start, 0), max(-start, 0) + self.shape[i]) for i in range(3))
        return np.pad(fine, pad, mode="edge")[crop]
