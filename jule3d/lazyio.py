"""Volumes on disk read block by block, for volumes larger than memory.

:func:`open_image` gives an array-like ``(Z, Y, X)`` whose slicing reads only the voxels asked for, and the
image's geometry (the same as :func:`jule3d.io.read_image` gives):

====================================  =====================================================================
input                                 how it is read
====================================  =====================================================================
``.npy``                              memory-mapped
uncompressed NIfTI ``.nii``           memory-mapped through nibabel (geometry from SimpleITK's header read)
Zarr / OME-Zarr folder                zarr, chunk by chunk
uncompressed contiguous TIFF          memory-mapped (tifffile)
compressed ``.nii.gz``, other TIFF,   converted once into a chunked Zarr *cache* (slab by slab for
TIFF slice folders, NRRD, MetaImage,  ``.nii.gz``, page by page for TIFF, file by file for slice folders;
DICOM                                 NRRD, MetaImage and DICOM are read whole once), said on stderr
====================================  =====================================================================

A cache records the file it was made from (absolute path, size, modification time) and the jule3d version;
one made from another input or by another version is refused, never silently reused.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> import numpy as np
>>> from jule3d.io import save_volume
>>> from jule3d.lazyio import open_image
>>> array = np.arange(6 * 7 * 8, dtype=np.uint16).reshape(6, 7, 8)
>>> with tempfile.TemporaryDirectory() as folder:
...     path = save_volume(array, Path(folder) / "scan.nii")
...     image = open_image(path)
...     print(image.shape, image.dtype, image.how, bool(np.array_equal(image.array[1:3, 2:5, 4:], array[1:3, 2:5, 4:])))
(6, 7, 8) uint16 memory-mapped True
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .volume import Geometry

__all__ = ["LazyImage", "open_image", "image_shape", "CACHE_FORMAT", "SLAB_BYTES"]

#: Format tag of a conversion cache.
CACHE_FORMAT = "jule3d-cache-v1"

#: Bytes of input converted at a time.
SLAB_BYTES = 64 << 20

PathLike = str | os.PathLike


@dataclass
class LazyImage:
    """One 3D image on disk.

    Attributes
    ----------
    array : array-like
        ``(Z, Y, X)``; slicing it with three slices returns a numpy array of those voxels only.
    geometry : Geometry
    path : pathlib.Path
        The file or folder given.
    how : str
        ``"memory-mapped"``, ``"zarr"`` or ``"cache"``.
    """

    array: Any
    geometry: Geometry
    path: Path
    how: str
    cache: Path | None = None

    def __getstate__(self) -> dict:
        """Pickled as where to read it from (a memory map would be pickled as its data)."""
        return {"geometry": self.geometry, "path": self.path, "how": self.how, "cache": self.cache}

    def __setstate__(self, state: dict) -> None:
        reopened = open_image(state["path"], state["cache"], announce=lambda message: None)
        self.__dict__.update(state, array=reopened.array)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """The stored voxel type."""
        return np.dtype(self.array.dtype)


class _NiftiZYX:
    """A nibabel array proxy ``(X, Y, Z[, 1])`` seen as ``(Z, Y, X)``: slicing reads only those voxels."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.shape = tuple(int(s) for s in reversed(proxy.shape[:3]))
        self.ndim = 3
        self.dtype = np.asarray(proxy[(slice(0, 1),) * 3 + ((0,) if len(proxy.shape) == 4 else ())]).dtype

    def __getitem__(self, key: slice | tuple[slice, ...]) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        z, y, x = key + (slice(None),) * (3 - len(key))
        extra = (0,) if len(self.proxy.shape) == 4 else ()
        return np.asarray(self.proxy[(x, y, z) + extra]).transpose(2, 1, 0)


class _Mapped:
    """A memory-mapped array opened anew for every read, so the pages read do not stay in the process's resident
    memory (a map held open for the whole run would grow to the whole file)."""

    def __init__(self, opener: Callable[[], np.ndarray]) -> None:
        self.opener = opener
        first = opener()
        self.shape, self.dtype, self.ndim = tuple(first.shape), first.dtype, first.ndim
        del first

    def __getitem__(self, key: Any) -> np.ndarray:
        mapped = self.opener()
        try:
            return np.array(mapped[key])
        finally:
            del mapped


def _sitk_geometry(path: Path) -> Geometry:
    """Geometry of a SimpleITK-readable file from its header alone (what :func:`jule3d.io.read_image` gives)."""
    import SimpleITK as sitk

    from .io import _check_sitk_header

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    dim = reader.GetDimension()
    _check_sitk_header(dim, reader.GetSize(), reader.GetNumberOfComponents())
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3].ravel()
    return Geometry(shape=tuple(int(s) for s in reversed(reader.GetSize()[:3])), spacing=reader.GetSpacing()[:3],
                    origin=reader.GetOrigin()[:3], direction=tuple(float(d) for d in direction))


def _open_nifti(path: Path) -> tuple[Any, Geometry]:
    import nibabel

    proxy = nibabel.load(str(path), mmap=True).dataobj
    return _NiftiZYX(proxy), _sitk_geometry(path)


def _open_tiff_memmap(path: Path) -> tuple[Any, Geometry] | None:
    """A memory-mappable (uncompressed, contiguous) TIFF as :func:`jule3d.io.read_image` reads it, else ``None``."""
    import tifffile

    from .io import _tiff_header

    geometry, _ = _tiff_header(path)
    try:
        return _Mapped(lambda: tifffile.memmap(path, mode="r")), geometry
    except ValueError:  # compressed or not contiguous
        return None


def _converter(path: Path, fmt: str) -> tuple[tuple[int, int, int], np.dtype, Geometry,
                                                Callable[[int, int], np.ndarray], str]:
    """Shape, dtype, geometry of an input to convert, a function giving its slabs ``[z0, z1)``, and how."""
    import tifffile

    from .io import (
        _extension,
        _read_tiff,
        _require_3d,
        _tiff_header,
        _tiff_slices,
        read_image,
    )

    if _extension(path) == ".nii.gz":
        array, geometry = _open_nifti(path)
        return array.shape, array.dtype, geometry, lambda a, b: array[a:b, :, :], "slab by slab"
    if fmt == "tiff":
        geometry, n_pages = _tiff_header(path)
        shape = geometry.shape
        if n_pages != shape[0]:  # not one page per slice: read it whole
            data = _read_tiff(path)[0]
            return shape, data.dtype, geometry, lambda a, b: np.asarray(data[a:b]), "read whole"

        def pages(a: int, b: int) -> np.ndarray:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return np.stack([series.pages[i].asarray() for i in range(a, b)])

        with tifffile.TiffFile(path) as tif:
            dtype = np.dtype(tif.series[0].dtype)
        return shape, dtype, geometry, pages, "page by page"
    if fmt == "tiff-folder":
        files = _tiff_slices(path)
        first = tifffile.imread(files[0])
        if first.ndim != 2:
            raise ValueError(f"slice {files[0]} has shape {first.shape}, expected a 2D greyscale image")
        shape = (len(files),) + first.shape
        _require_3d(shape)

        def slices(a: int, b: int) -> np.ndarray:
            out = np.stack([tifffile.imread(f) for f in files[a:b]])
            if out.shape[1:] != first.shape or out.dtype != first.dtype:
                raise ValueError(f"the slices of {path} differ in shape or dtype (first: {first.shape} "
                                 f"{first.dtype})")
            return out

        return shape, first.dtype, Geometry(shape=shape), slices, "file by file"
    data, geometry = read_image(path)
    return data.shape, data.dtype, geometry, lambda a, b: np.asarray(data[a:b]), "read whole"


def _identity(path: Path) -> dict:
    from . import __version__

    stat = path.stat()
    size = stat.st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"format": CACHE_FORMAT, "jule3d": __version__, "source": str(path.resolve()), "size": int(size),
            "mtime_ns": int(stat.st_mtime_ns)}


def _cached(path: Path, fmt: str, cache: Path, announce: Callable[[str], None]) -> tuple[Any, Geometry]:
    """The Zarr cache of ``path`` in folder ``cache``, made now if it does not exist, refused if foreign."""
    import zarr

    from .io import _geometry_dict, _geometry_from_dict

    target = cache / "input.zarr"
    expected = _identity(path)
    if target.exists():
        try:
            found = dict(zarr.open_array(str(target), mode="r").attrs.get("jule3d_cache", {}))
        except Exception:  # not a zarr array at all
            found = {}
        if found != expected:
            what = (f"made from {found.get('source')} by jule3d {found.get('jule3d')}" if found
                    else "not a jule3d cache")
            raise ValueError(f"the chunk cache {target} is {what}, not from {expected['source']} "
                             f"(size {expected['size']}, jule3d {expected['jule3d']}) as it is now; remove it or "
                             "use another cache folder")
        node = zarr.open_array(str(target), mode="r")
        return node, _geometry_from_dict(node.shape, node.attrs.asdict())
    shape, dtype, geometry, slab, how = _converter(path, fmt)
    announce(f"jule3d: converting {path} into a chunked cache {target} ({how}; once, reused on --resume)")
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / "input.zarr.partial"
    shutil.rmtree(partial, ignore_errors=True)
    chunks = (min(64, shape[0]), min(256, shape[1]), min(256, shape[2]))
    node = zarr.open_array(str(partial), mode="w", shape=shape, chunks=chunks, dtype=dtype)
    plane = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    step = max(chunks[0], (SLAB_BYTES // plane) // chunks[0] * chunks[0])
    for a in range(0, shape[0], step):
        b = min(a + step, shape[0])
        block = np.asarray(slab(a, b))
        if block.shape != (b - a,) + tuple(shape[1:]):
            raise ValueError(f"{path}: slab {a}:{b} has shape {block.shape}, expected {(b - a,) + tuple(shape[1:])}")
        node[a:b] = block
    node.attrs.update({**_geometry_dict(geometry), "jule3d_cache": expected})
    os.replace(partial, target)
    node = zarr.open_array(str(target), mode="r")
    return node, geometry


def image_shape(path: PathLike) -> tuple[int, int, int] | None:
    """``(Z, Y, X)`` of an image from its header (nothing converted or read), ``None`` where that is not known
    without reading it (DICOM series).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.io import save_volume
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     print(image_shape(save_volume(np.zeros((3, 4, 5), np.uint8), Path(folder) / "a.nii.gz")))
    (3, 4, 5)
    """
    import tifffile

    from .io import _extension, _read_format, _tiff_header, _tiff_slices

    path = Path(path)
    fmt = _read_format(path)
    if fmt in ("npy", "zarr") or _extension(path) == ".nii":
        return open_image(path).shape
    if fmt == "sitk":
        return _sitk_geometry(path).shape
    if fmt == "tiff":
        return _tiff_header(path)[0].shape
    if fmt == "tiff-folder":
        files = _tiff_slices(path)
        with tifffile.TiffFile(files[0]) as tif:
            return (len(files),) + tuple(tif.pages[0].shape[:2])  # type: ignore[return-value]
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_image(
    path: PathLike,
    cache: PathLike | None = None,
    spacing: Sequence[float] | None = None,
    announce: Callable[[str], None] = _stderr,
) -> LazyImage:
    """Open one 3D image for reading block by block (the table in the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        A file or folder :func:`jule3d.io.read_image` reads.
    cache : str or os.PathLike, optional
        Folder for the Zarr cache of an input that cannot be read in blocks where it is (it holds
        ``input.zarr``). Required for such inputs.
    spacing : sequence of 3 float, optional
        Voxel size ``(x, y, z)`` in mm replacing the file's.
    announce : callable
        Receives the message that a conversion starts (default: stderr).

    Returns
    -------
    LazyImage

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        An unsupported or corrupt input, no ``cache`` for one that needs it, or a cache made from another input
        or version.
    """
    from .io import _extension, _open_zarr, _read_format, _read_npy

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    fmt = _read_format(path)
    try:
        if fmt == "npy":
            geometry = _read_npy(path)[1]
            array, how = _Mapped(lambda: np.load(path, mmap_mode="r", allow_pickle=False)), "memory-mapped"
        elif fmt == "zarr":
            (array, geometry), how = _open_zarr(path), "zarr"
        elif _extension(path) == ".nii":
            (array, geometry), how = _open_nifti(path), "memory-mapped"
        else:
            mapped = _open_tiff_memmap(path) if fmt == "tiff" else None
            if mapped is not None:
                (array, geometry), how = mapped, "memory-mapped"
            else:
                if cache is None:
                    raise ValueError(f"{path} cannot be read block by block where it is (compressed or "
                                     "sliced): give a cache folder to convert it into")
                (array, geometry), how = _cached(path, fmt, Path(cache), announce), "cache"
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # every library has its own error types for corrupt files
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if spacing is not None:
        geometry = replace(geometry, spacing=tuple(float(s) for s in spacing))
    return LazyImage(array, geometry, path, how, None if cache is None else Path(cache))

