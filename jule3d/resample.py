"""Resampling an anisotropic volume to cubic voxels slab by slab, for volumes larger than memory.

:func:`resample_file` gives the voxels of :func:`jule3d.patches.resample_isotropic` (linear or nearest
interpolation, output voxel ``i`` sampling the input at ``i * new / old``, the first voxel's centre, the direction
and the extent kept), reading and writing one slab of slices at a time, so memory is bounded by the slab.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> import numpy as np
>>> from jule3d.io import read_image, save_volume
>>> from jule3d.resample import resample_file
>>> from jule3d.volume import Geometry
>>> with tempfile.TemporaryDirectory() as folder:
...     path = save_volume(np.arange(10 * 8 * 8, dtype=np.float32).reshape(10, 8, 8), Path(folder) / "a.npy",
...                        reference=Geometry(shape=(10, 8, 8), spacing=(0.5, 0.5, 1.0)))
...     data, geometry = read_image(resample_file(path, Path(folder) / "iso.nii"))
>>> data.shape, geometry.spacing
((20, 8, 8), (0.5, 0.5, 0.5))
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import replace
from numbers import Real
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["resample_file", "SLAB_BYTES"]

#: Bytes of output computed at a time.
SLAB_BYTES = 64 << 20

PathLike = str | os.PathLike


def resample_file(
    path: PathLike,
    out: PathLike,
    spacing: float | None = None,
    order: int = 1,
    cache: PathLike | None = None,
    overwrite: bool = False,
    announce: Callable[[str], None] | None = None,
) -> Path:
    """Resample the image ``path`` to cubic voxels of ``spacing`` mm into ``out``, slab by slab.

    Parameters
    ----------
    path : path
        The image (:func:`jule3d.lazyio.open_image`).
    out : path
        Output file: ``.nii``, ``.nii.gz``, ``.npy`` or ``.zarr`` (float32, with the new geometry).
    spacing : float, optional
        Voxel size in mm; default the finest of the image's spacings.
    order : {0, 1}
        Nearest or linear interpolation (higher orders need the whole volume for their prefilter).
    cache : path, optional
        Folder for the Zarr cache of an input that cannot be read in blocks where it is (compressed NIfTI or
        TIFF, slice folders, NRRD, MetaImage, DICOM); default a temporary folder beside ``out``, removed at the end.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ValueError
        A bad ``spacing`` or ``order``, an unsupported ending of ``out``, or ``out`` being the input.
    FileExistsError
        If ``out`` exists and ``overwrite`` is false.
    """
    from scipy import ndimage

    from .chunked import NpyFile, write_output
    from .io import _extension, save_volume
    from .lazyio import open_image
    from .validation import check_int

    path, out = Path(path), Path(out)
    if spacing is not None and (isinstance(spacing, bool) or not isinstance(spacing, Real)
                                or not np.isfinite(spacing) or spacing <= 0):
        raise ValueError(f"spacing must be a positive number (mm), got {spacing!r}")
    check_int("order", order, 0, 1)
    ext = _extension(out)
    if ext not in (".nii", ".nii.gz", ".npy", ".zarr"):
        raise ValueError(f"cannot write {out}: resample_file writes .nii, .nii.gz, .npy or .zarr")
    if out.resolve() == path.resolve():
        raise ValueError(f"out {out} is the input; refusing to overwrite an input")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite to replace it")
    kwargs = {} if announce is None else {"announce": announce}
    staging = out.with_name(f".{out.name}.partial.npy")
    # a temporary cache only when none is given: open_image writes into it only for an input that needs one
    folder = (tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.cache.") if cache is None
              else contextlib.nullcontext(cache))
    with folder as cache:
        image = open_image(path, cache=cache, **kwargs)
        old = np.asarray(image.geometry.spacing_zyx)
        spacing = float(min(old) if spacing is None else spacing)
        scale = spacing / old
        shape = tuple(max(1, int(round(n / s))) for n, s in zip(image.shape, scale))
        geometry = replace(image.geometry, shape=shape, spacing=(spacing,) * 3)
        try:
            result = NpyFile.create(staging, shape, np.float32)
            step = max(1, SLAB_BYTES // (4 * shape[1] * shape[2]))
            for a in range(0, shape[0], step):
                b = min(a + step, shape[0])
                z0 = max(int(np.floor(a * scale[0])) - 1, 0)  # the input slices slab [a, b) interpolates between
                z1 = min(int(np.ceil((b - 1) * scale[0])) + 2, image.shape[0])
                source = np.asarray(image.array[z0:z1], dtype=np.float32)
                result.write((slice(a, b), slice(None), slice(None)), ndimage.affine_transform(
                    source, np.diag(scale), offset=(a * scale[0] - z0, 0.0, 0.0), output_shape=(b - a,) + shape[1:],
                    order=order, mode="nearest", output=np.float32))
            write_output(staging, out, geometry, overwrite, save=save_volume)
        finally:
            staging.unlink(missing_ok=True)
    return out
