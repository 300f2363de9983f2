"""Reading and writing volumes and label maps.

Formats (chosen by the file name; folders by their content):

============================  ========================  ==================================
format                        read / write              geometry kept
============================  ========================  ==================================
NIfTI ``.nii`` ``.nii.gz``    SimpleITK / SimpleITK     spacing, origin, direction
NRRD ``.nrrd`` ``.nhdr``      SimpleITK / SimpleITK     spacing, origin, direction
MetaImage ``.mha`` ``.mhd``   SimpleITK / SimpleITK     spacing, origin, direction
DICOM series (a folder)       SimpleITK / --            spacing, origin, direction
TIFF ``.tif`` ``.tiff``       tifffile / tifffile       see below
TIFF slices (a folder)        tifffile / --             none (spacing 1, or ``spacing=``)
NumPy ``.npy``                numpy / numpy             from the sidecar ``<file>.npy.json``
Zarr ``.zarr`` (a folder)     zarr / zarr               attributes ``spacing``, ``origin``,
                                                        ``direction``
============================  ========================  ==================================

Geometry follows ITK (see :mod:`jule3d.volume`). Files read through SimpleITK therefore have
exactly the geometry 3D Slicer and ITK-SNAP show. The other formats have no standard place for
it:

* **TIFF**: jule3d writes spacing, origin and direction as JSON in the image description
  (tifffile's "shaped" metadata) and the in-plane spacing as the resolution tags; only jule3d
  reads origin and direction back. ImageJ/Fiji stacks give spacing (resolution tags plus the
  ImageJ ``spacing`` and ``unit``, converted to mm); any other TIFF gets spacing 1.
* **TIFF slice folders** (the usual micro-CT export: one 2D ``.tif`` per slice, sorted
  naturally by file name so that ``s2.tif`` comes before ``s10.tif``) carry no geometry.
* **NumPy**: ``vol.npy`` takes its geometry from an optional JSON sidecar ``vol.npy.json``
  ``{"spacing": [x, y, z], "origin": [...], "direction": [9 numbers]}`` (each key optional),
  which :func:`save_volume` writes.
* **Zarr**: a zarr array, or a group holding the array at key ``data`` (else its first array);
  geometry from the attributes of the array or of the group.

Every reader accepts ``spacing=`` to set the voxel size when the file has none. Readers load no
more than needed: ``.npy`` and uncompressed TIFF files are memory-mapped, a zarr group only has
its one array read, and SimpleITK files are checked from their header before the voxels load.

Writers write into a temporary folder next to the target and rename the result into place, so a
failure leaves nothing behind; nothing is overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import SimpleITK as sitk
import tifffile
import zarr

from jule3d.mask import foreground_mask
from jule3d.normalize import normalize_intensity
from jule3d.volume import Geometry, Volume

__all__ = [
    "read_image",
    "load_volume",
    "prepare_volume",
    "load_mask",
    "save_volume",
    "save_labels",
    "READ_FORMATS",
    "WRITE_FORMATS",
]

PathLike = Union[str, "os.PathLike[str]"]

_SITK_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_TIFF_EXTENSIONS = (".tif", ".tiff")
_FILE_FORMATS = {
    **{ext: "sitk" for ext in _SITK_EXTENSIONS},
    **{ext: "tiff" for ext in _TIFF_EXTENSIONS},
    ".npy": "npy",
    ".zarr": "zarr",
}
WRITE_FORMATS = tuple(_FILE_FORMATS)
"""File endings :func:`save_volume` and :func:`save_labels` can write."""
READ_FORMATS = WRITE_FORMATS + ("DICOM series folder", "folder of 2D TIFF slices")
"""What :func:`read_image` can read."""

_LENGTH_UNITS_MM = {"mm": 1.0, "millimeter": 1.0, "cm": 10.0, "m": 1000.0, "micron": 1e-3,
                    "um": 1e-3, "\u00b5m": 1e-3, "\\u00B5m": 1e-3, "nm": 1e-6}


# --------------------------------------------------------------------------- reading


def read_image(
    path: PathLike, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read one 3D image and its geometry.

    Parameters
    ----------
    path : str or os.PathLike
        A file or folder in one of :data:`READ_FORMATS` (see the module docstring).
    spacing : sequence of 3 float, optional
        Voxel size in mm, ``(x, y, z)``, replacing the file's (for TIFF stacks and other
        formats without geometry).

    Returns
    -------
    array : numpy.ndarray
        Voxels ``(Z, Y, X)``; a read-only memory map for ``.npy`` and uncompressed TIFF.
    geometry : Geometry
        Physical placement of the grid.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the format is unsupported, the file is unreadable or corrupt, the image is not 3D
        (2D, 4D or several components per voxel), or it holds NaN/Inf voxels; the message
        names the file.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.io import read_image, save_volume
    >>> from jule3d.volume import Geometry
    >>> array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_volume(array, Path(folder) / "scan.nii.gz",
    ...                        reference=Geometry(shape=(4, 5, 6), spacing=(0.5, 0.5, 2.0)))
    ...     data, geometry = read_image(path)
    ...     print(data.shape, data.dtype, geometry.spacing, bool(np.array_equal(data, array)))
    ...     print(read_image(path, spacing=(1, 1, 1))[1].spacing)
    (4, 5, 6) float32 (0.5, 0.5, 2.0) True
    (1.0, 1.0, 1.0)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    reader = _READERS[_read_format(path)]
    try:
        array, geometry = reader(path)
    except Exception as exc:  # every library has its own error types for corrupt files
        detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"cannot read image {path}: {detail}") from exc
    _check_finite(array, path)
    if spacing is not None:
        geometry = replace(geometry, spacing=tuple(spacing))
    return array, geometry


def read_on_grid(path: PathLike, reference: Volume | Geometry, what: str = "image") -> np.ndarray:
    """Read an image (a mask, a label map) that must lie on the voxel grid of ``reference``.

    Parameters
    ----------
    path : str or os.PathLike
        Image in any readable format.
    reference : Volume or Geometry
        The volume (or its geometry) the image belongs to.
    what : str
        What the image is, for the error message (``"mask"``, ``"ground truth"``).

    Returns
    -------
    numpy.ndarray
        The voxels ``(Z, Y, X)``.

    Raises
    ------
    ValueError
        If the image's shape, spacing, origin or direction differ from ``reference`` (the message
        names the fields).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.io import read_on_grid, save_labels
    >>> from jule3d.volume import Geometry, Volume
    >>> volume = Volume.from_array(np.zeros((4, 4, 4), np.float32), spacing=(0.5, 0.5, 2.0))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_labels(np.full((4, 4, 4), 2), Path(folder) / "labels.nii.gz", reference=volume)
    ...     print(read_on_grid(path, volume, what="labels").max())
    ...     try:
    ...         read_on_grid(path, Geometry(shape=(4, 4, 4)), what="labels")
    ...     except ValueError as error:
    ...         print(str(error).split("grid: ")[1])
    2
    spacing (0.5, 0.5, 2.0) != (1.0, 1.0, 1.0)
    """
    array, geometry = read_image(path)
    expected = _geometry_of(reference, "reference")
    if not expected.matches(geometry):
        raise ValueError(
            f"{what} {path} does not lie on the volume's grid: {expected.describe_mismatch(geometry)}"
        )
    return np.asarray(array)


def load_mask(path: PathLike, reference: Volume | Geometry) -> np.ndarray:
    """Read a mask file (non-zero = foreground) that must lie on the grid of ``reference``.

    Parameters
    ----------
    path : str or os.PathLike
        Mask image in any readable format.
    reference : Volume or Geometry
        The volume (or its geometry) the mask belongs to.

    Returns
    -------
    numpy.ndarray of bool
        Mask ``(Z, Y, X)``.

    Raises
    ------
    ValueError
        If the mask's shape, spacing, origin or direction differ from ``reference`` (the
        message names the fields), or the mask is empty.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.io import load_mask, save_volume
    >>> from jule3d.volume import Volume
    >>> volume = Volume.from_array(np.zeros((4, 4, 4), np.float32))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_volume(np.tile([0, 3], 32).reshape(4, 4, 4).astype(np.uint8),
    ...                        Path(folder) / "mask.nrrd", reference=volume)
    ...     mask = load_mask(path, volume)
    >>> mask.dtype, int(mask.sum())
    (dtype('bool'), 32)
    """
    mask = read_on_grid(path, reference, what="mask") != 0
    if not mask.any():
        raise ValueError(f"mask {path} is empty: no non-zero voxel")
    return mask


def load_volume(
    path_or_paths: PathLike | Sequence[PathLike],
    mask: PathLike | np.ndarray | None = None,
    normalize: bool = True,
    foreground: str | None = "auto",
    channel_names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
) -> Volume:
    """Load a (multi-channel) volume, its foreground mask, and normalise it.

    Parameters
    ----------
    path_or_paths : path or sequence of paths
        One image, or one image per channel (all on the same grid).
    mask : path or numpy.ndarray, optional
        Foreground mask (non-zero = foreground) on the volume's grid. Takes precedence over
        ``foreground``.
    normalize : bool
        Apply :func:`jule3d.normalize.normalize_intensity` (percentile clip and z-score inside the
        mask, background set to 0).
    foreground : {"auto", None}
        Without ``mask``: ``"auto"`` computes :func:`jule3d.mask.foreground_mask`; ``None``
        leaves the mask unset (every voxel is foreground).
    channel_names : sequence of str, optional
        One name per channel; defaults to the file names without extension (``ch0``, ``ch1``,
        ... when those are not unique).
    spacing : sequence of 3 float, optional
        Voxel size ``(x, y, z)`` in mm replacing the files' (see :func:`read_image`).

    Returns
    -------
    Volume
        Data ``(C, Z, Y, X)`` (float32 when normalised; otherwise the file's dtype, memory-mapped
        for a single ``.npy`` or uncompressed TIFF), geometry, mask, channel names and sources.

    Raises
    ------
    FileNotFoundError, ValueError
        Bad files (see :func:`read_image`), a constant image, channels on different grids (the
        message names the file and the differing fields), a mask that does not fit or is empty,
        or an invalid ``foreground`` / ``channel_names``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.io import load_volume, save_volume
    >>> rng = np.random.default_rng(0)
    >>> array = np.zeros((12, 12, 12), np.float32)
    >>> array[2:10, 2:10, 2:10] = 100 + rng.normal(size=(8, 8, 8))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_volume(array, Path(folder) / "scan.nii.gz")
    ...     volume = load_volume(path)
    ...     raw = load_volume([path, path], channel_names=["a", "b"], normalize=False, foreground=None)
    >>> volume.data.shape, volume.normalized, int(volume.mask.sum()), volume.channel_names
    ((1, 12, 12, 12), True, 512, ('scan',))
    >>> raw.data.shape, raw.channel_names, raw.mask is None
    ((2, 12, 12, 12), ('a', 'b'), True)
    """
    paths = _as_path_list(path_or_paths)
    arrays, geometry = _read_channels(paths, spacing)
    data = arrays[0][None] if len(arrays) == 1 else np.stack(arrays)
    volume = Volume(
        data,
        geometry,
        channel_names=_channel_names(channel_names, paths),
        sources=tuple(str(p) for p in paths),
    )
    volume = volume.with_mask(_resolve_mask(volume, mask, foreground))
    return normalize_intensity(volume) if normalize else volume


def prepare_volume(
    volume: Volume | PathLike | Sequence[PathLike] | np.ndarray,
    mask: PathLike | np.ndarray | None = None,
) -> Volume:
    """The input of the method, whatever its type: a masked, normalised :class:`Volume`.

    Paths are read with :func:`load_volume` (several paths = channels). An array ``(Z, Y, X)`` or
    ``(C, Z, Y, X)`` is wrapped with unit spacing. A volume that is not yet
    :attr:`~jule3d.volume.Volume.normalized` gets ``mask`` (else its own mask, else the automatic one,
    :func:`jule3d.mask.foreground_mask`) and is normalised (:func:`jule3d.normalize.normalize_intensity`), as
    :func:`load_volume` does; a normalised one is kept, with ``mask`` as its foreground when given.

    Parameters
    ----------
    volume : Volume, path, sequence of paths or numpy.ndarray
    mask : path or numpy.ndarray, optional
        Foreground mask on the volume's grid.

    Returns
    -------
    Volume

    Raises
    ------
    TypeError
        For another type of input.
    ValueError, FileNotFoundError
        Bad files, a constant image, or a mask that does not fit or is empty.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> array = np.zeros((12, 12, 12), np.float32)
    >>> array[2:10, 2:10, 2:10] = 100 + rng.normal(size=(8, 8, 8))
    >>> volume = prepare_volume(array)
    >>> volume.normalized, int(volume.mask.sum())
    (True, 512)
    >>> prepare_volume(volume) is volume
    True
    """
    if isinstance(volume, (str, os.PathLike)) or (
            isinstance(volume, Sequence) and all(isinstance(v, (str, os.PathLike)) for v in volume)):
        return load_volume(volume, mask=mask)
    if isinstance(volume, np.ndarray):
        volume = Volume.from_array(volume.astype(np.float32, copy=False))
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, a path, a list of paths or an array, got {type(volume).__name__}")
    if volume.normalized:
        return volume if mask is None else volume.with_mask(_resolve_mask(volume, mask, None))
    own = volume.mask if mask is None else mask  # the given mask, else the volume's, else the automatic one
    return normalize_intensity(volume.with_mask(_resolve_mask(volume, own, "auto")))


def _as_path_list(path_or_paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        return [Path(path_or_paths)]
    paths = [Path(p) for p in path_or_paths]
    if not paths:
        raise ValueError("path_or_paths is empty: give at least one image")
    return paths


def _read_channels(
    paths: list[Path], spacing: Sequence[float] | None
) -> tuple[list[np.ndarray], Geometry]:
    """Read every channel, checking each is non-constant and on the first channel's grid."""
    arrays: list[np.ndarray] = []
    geometry: Geometry | None = None
    for path in paths:
        array, geom = read_image(path, spacing=spacing)
        _check_not_constant(array, path)
        if geometry is None:
            geometry = geom
        elif not geometry.matches(geom):
            raise ValueError(
                f"channel image {path} does not share the grid of {paths[0]}: "
                f"{geometry.describe_mismatch(geom)}"
            )
        arrays.append(array)
    assert geometry is not None
    return arrays, geometry


def _channel_names(names: Sequence[str] | None, paths: list[Path]) -> tuple[str, ...]:
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != len(paths):
            raise ValueError(f"channel_names has {len(names)} names for {len(paths)} images")
        return names
    stems = tuple(_stem(p) for p in paths)
    return stems if len(set(stems)) == len(stems) else ()


def _resolve_mask(volume: Volume, mask: PathLike | np.ndarray | None, foreground: str | None) -> np.ndarray | None:
    if mask is not None:
        if isinstance(mask, (str, os.PathLike)):
            return load_mask(mask, volume.geometry)
        return np.asarray(mask)
    if foreground == "auto":
        return foreground_mask(volume)
    if foreground is None:
        return None
    raise ValueError(f"foreground must be 'auto' or None, got {foreground!r}")


def _check_not_constant(array: np.ndarray, path: Path) -> None:
    low, high = np.min(array), np.max(array)
    if low == high:
        raise ValueError(f"image {path} is constant (every voxel equals {low}): nothing to segment")


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Refuse NaN/Inf voxels: they are not an intensity, and a segmentation must not treat them as one.

    ITK's NIfTI reader replaces NaN and Inf by 0 (a silent "intensity 0"), so a NIfTI file is checked on its
    stored voxels, read by nibabel, not on the array SimpleITK returns.
    """
    if _extension(path) in (".nii", ".nii.gz"):
        import nibabel

        image = nibabel.load(str(path))
        if image.get_data_dtype().kind not in "fc":
            return
        array = np.asanyarray(image.dataobj)
    elif array.dtype.kind not in "fc":
        return
    refuse_nonfinite(array, path)


def refuse_nonfinite(array: np.ndarray, path: Path, where: str = "") -> None:
    """Raise the ``ValueError`` of :func:`_check_finite` if ``array`` (the voxels of ``path``, or of its part
    ``where``) holds NaN or Inf."""
    if array.dtype.kind not in "fc":
        return
    n_bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise ValueError(
            f"image {path} has {n_bad} NaN/Inf voxels (of {array.size}{where}); jule3d does not guess what they "
            "stand for: replace them with a value (e.g. the background intensity) and give a mask if they mean no "
            "data"
        )


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    ext = _extension(path)
    return path.name[: -len(ext)] if ext else path.name


def _unsupported(path: Path, what: str) -> ValueError:
    return ValueError(f"unsupported {what} {path}; supported: {', '.join(READ_FORMATS)}")


def _read_format(path: Path) -> str:
    if path.is_dir():
        if _extension(path) == ".zarr" or (path / ".zarray").exists() or (path / ".zgroup").exists():
            return "zarr"
        if _tiff_slices(path):
            return "tiff-folder"
        return "dicom"
    fmt = _FILE_FORMATS.get(_extension(path))
    if fmt is None or fmt == "zarr":
        raise _unsupported(path, "file type")
    return fmt


def _shape_error(shape: tuple[int, ...]) -> str | None:
    """Why an array of ``shape`` is not one 3D image, or ``None`` when it is."""
    if len(shape) < 3 or (len(shape) == 3 and min(shape) == 1):
        return f"the image is 2D (shape {tuple(shape)}), jule3d needs a 3D volume"
    if len(shape) == 4:
        return (
            f"the data are 4D (shape {tuple(shape)}): {shape[0]} components or time points "
            "along the first axis; give one 3D image per file (several files = channels)"
        )
    if len(shape) != 3:
        return f"the data have {len(shape)} dimensions (shape {tuple(shape)}), expected 3"
    return None


def _require_3d(shape: tuple[int, ...]) -> None:
    problem = _shape_error(tuple(shape))
    if problem:
        raise ValueError(problem)


def _geometry_from_dict(shape: tuple[int, ...], attrs: dict[str, Any]) -> Geometry:
    defaults = Geometry(shape=tuple(shape))
    return Geometry(
        shape=tuple(shape),
        spacing=tuple(attrs.get("spacing", defaults.spacing)),
        origin=tuple(attrs.get("origin", defaults.origin)),
        direction=tuple(attrs.get("direction", defaults.direction)),
    )


# SimpleITK (NIfTI, NRRD, MetaImage, DICOM) ---------------------------------------


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    _check_sitk_header(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
    return _from_sitk(reader.Execute())


def _read_dicom(path: Path) -> tuple[np.ndarray, Geometry]:
    folder = str(path)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise _unsupported(path, "folder (no DICOM series, TIFF slices or zarr data in it)")
    files = max(
        (sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid) for sid in series), key=len
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _from_sitk(reader.Execute())


def _check_sitk_header(dimension: int, size: Sequence[int], components: int) -> None:
    if components != 1:
        raise ValueError(
            f"the image has {components} components per voxel (vector/colour image), expected 1"
        )
    if dimension == 4 and size[3] > 1:
        raise ValueError(
            f"the image is 4D (size {tuple(size)}): {size[3]} time points; "
            "give one 3D image per file"
        )
    if dimension not in (3, 4):
        raise ValueError(f"the image is {dimension}D (size {tuple(size)}), jule3d needs a 3D volume")


def _from_sitk(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    _check_sitk_header(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    if image.GetDimension() == 4:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    array = sitk.GetArrayFromImage(image)
    _require_3d(array.shape)
    geometry = Geometry(
        shape=array.shape,
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=image.GetDirection(),
    )
    return array, geometry


# TIFF -----------------------------------------------------------------------------


def _tiff_header(path: Path) -> tuple[Geometry, int]:
    """Geometry of a greyscale 3D TIFF and its number of pages, from its header."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if "S" in series.axes:
            raise ValueError(
                f"the TIFF has {series.shape[series.axes.index('S')]} samples (colour channels) "
                "per pixel, expected greyscale"
            )
        _require_3d(series.shape)
        return _tiff_geometry(tif, series.shape), len(series.pages)


def _read_tiff(path: Path) -> tuple[np.ndarray, Geometry]:
    geometry, _ = _tiff_header(path)
    try:
        array = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or non-contiguous: not memory-mappable
        array = tifffile.imread(path)
    return array, geometry


def _tiff_geometry(tif: tifffile.TiffFile, shape: tuple[int, ...]) -> Geometry:
    """Geometry from jule3d's JSON description, else from ImageJ metadata, else spacing 1."""
    shaped = tif.shaped_metadata[0] if tif.shaped_metadata else {}
    if "spacing" in shaped:
        return _geometry_from_dict(shape, shaped)
    imagej = tif.imagej_metadata
    if not imagej:
        return Geometry(shape=tuple(shape))
    scale = _LENGTH_UNITS_MM.get(str(imagej.get("unit", "mm")), 1.0)
    tags = tif.pages[0].tags
    x, y = (_pixel_size(tags.get(name)) for name in ("XResolution", "YResolution"))
    z = float(imagej.get("spacing", 1.0))
    return Geometry(shape=tuple(shape), spacing=(x * scale, y * scale, z * scale))


def _pixel_size(tag: Any) -> float:
    """Pixel size from a TIFF resolution tag (pixels per unit as a rational), 1 without one."""
    if tag is None:
        return 1.0
    numerator, denominator = tag.value
    return float(denominator) / float(numerator) if numerator else 1.0


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _tiff_slices(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and _extension(p) in _TIFF_EXTENSIONS]
    return sorted(files, key=_natural_key)


def _read_tiff_folder(path: Path) -> tuple[np.ndarray, Geometry]:
    files = _tiff_slices(path)
    first = tifffile.imread(files[0])
    if first.ndim != 2:
        raise ValueError(f"slice {files[0]} has shape {first.shape}, expected a 2D greyscale image")
    _require_3d((len(files),) + first.shape)
    array = np.empty((len(files),) + first.shape, dtype=first.dtype)
    array[0] = first
    for i, file in enumerate(files[1:], start=1):
        image = tifffile.imread(file)
        if image.shape != first.shape or image.dtype != first.dtype:
            raise ValueError(
                f"slice {file} has shape {image.shape} and dtype {image.dtype}, but {files[0]} "
                f"has {first.shape} and {first.dtype}"
            )
        array[i] = image
    return array, Geometry(shape=array.shape)


# NumPy and Zarr -------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_npy(path: Path) -> tuple[np.ndarray, Geometry]:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    _require_3d(array.shape)
    sidecar = _sidecar(path)
    if not sidecar.exists():
        return array, Geometry(shape=array.shape)
    try:
        attrs = json.loads(sidecar.read_text(encoding="utf-8"))
        return array, _geometry_from_dict(array.shape, attrs)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"invalid geometry sidecar {sidecar}: {exc}") from exc


def _read_zarr(path: Path) -> tuple[np.ndarray, Geometry]:
    node, geometry = _open_zarr(path)
    return np.asarray(node[...]), geometry


def _open_zarr(path: Path) -> tuple[Any, Geometry]:
    """The zarr array of ``path`` (unread) and its geometry."""
    node = zarr.open(str(path), mode="r")
    attrs: dict[str, Any] = {}
    if isinstance(node, zarr.Group):
        attrs.update(node.attrs.asdict())
        keys = list(node.array_keys())
        if not keys:
            raise ValueError("the zarr group holds no array")
        node = node["data" if "data" in keys else keys[0]]
    attrs.update(node.attrs.asdict())
    _require_3d(node.shape)
    return node, _geometry_from_dict(node.shape, attrs)


_READERS: dict[str, Callable[[Path], tuple[np.ndarray, Geometry]]] = {
    "sitk": _read_sitk,
    "dicom": _read_dicom,
    "tiff": _read_tiff,
    "tiff-folder": _read_tiff_folder,
    "npy": _read_npy,
    "zarr": _read_zarr,
}


# --------------------------------------------------------------------------- writing


def save_volume(
    array_or_volume: np.ndarray | Volume,
    path: PathLike,
    reference: Volume | Geometry | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one 3D image with its geometry.

    Parameters
    ----------
    array_or_volume : numpy.ndarray or Volume
        Array ``(Z, Y, X)`` (or ``(1, Z, Y, X)``), or a single-channel volume.
    path : str or os.PathLike
        Target file; the format follows its ending (:data:`WRITE_FORMATS`).
    reference : Volume or Geometry, optional
        Geometry to write; defaults to the volume's own, or spacing 1 / origin 0 / identity
        direction for a bare array.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    ValueError
        Unsupported ending or dtype, several channels, or a shape that differs from
        ``reference``.
    FileNotFoundError
        If the parent folder does not exist.
    FileExistsError
        If the target exists and ``overwrite`` is false.
    OSError
        If the writer fails (nothing is left behind).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.io import save_volume
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_volume(np.zeros((4, 4, 4), np.float32), Path(folder) / "zeros.npy")
    ...     print(path.name, sorted(p.name for p in Path(folder).iterdir()))
    ...     try:
    ...         save_volume(np.ones((4, 4, 4), np.float32), path)
    ...     except FileExistsError:
    ...         print("exists")
    ...     print(save_volume(np.ones((4, 4, 4), np.float32), path, overwrite=True).name)
    zeros.npy ['zeros.npy', 'zeros.npy.json']
    exists
    zeros.npy
    """
    array, geometry = _array_and_geometry(array_or_volume, reference)
    path = Path(path)
    _write(array, geometry, path, overwrite)
    return path


def save_labels(
    labels: np.ndarray,
    path: PathLike,
    reference: Volume | Geometry | None,
    overwrite: bool = False,
) -> Path:
    """Write a label map (``0`` background, ``1..k`` classes) as uint8, or uint16 above 255.

    Parameters
    ----------
    labels : numpy.ndarray
        Non-negative integer labels ``(Z, Y, X)`` (integral floats are accepted).
    path : str or os.PathLike
        Target file (:data:`WRITE_FORMATS`).
    reference : Volume or Geometry or None
        Geometry of the volume the labels belong to, so that viewers overlay them correctly.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    ValueError
        Negative, non-integral or too large (> 65535) labels, or the errors of
        :func:`save_volume`.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.io import read_image, save_labels
    >>> from jule3d.volume import Volume
    >>> volume = Volume.from_array(np.zeros((4, 4, 4), np.float32), spacing=(0.5, 0.5, 2.0))
    >>> labels = np.zeros((4, 4, 4), dtype=np.int64)
    >>> labels[1:3] = 2
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_labels(labels, Path(folder) / "labels.nii.gz", reference=volume)
    ...     written, geometry = read_image(path)
    >>> written.dtype, sorted(np.unique(written).tolist()), geometry.spacing
    (dtype('uint8'), [0, 2], (0.5, 0.5, 2.0))
    """
    return save_volume(_label_array(labels), path, reference=reference, overwrite=overwrite)


def _label_array(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biuf":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise ValueError("labels must be integers; the float array has non-integral or NaN values")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got minimum {labels.min()}")
    top = labels.max() if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"labels go up to {top}; at most 65535 classes can be saved")
    return labels.astype(np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16)


def _geometry_of(reference: Volume | Geometry, name: str) -> Geometry:
    if isinstance(reference, Volume):
        return reference.geometry
    if isinstance(reference, Geometry):
        return reference
    raise ValueError(f"{name} must be a Volume or a Geometry, got {type(reference).__name__}")


def _array_and_geometry(
    array_or_volume: np.ndarray | Volume, reference: Volume | Geometry | None
) -> tuple[np.ndarray, Geometry]:
    if isinstance(array_or_volume, Volume):
        if array_or_volume.n_channels != 1:
            raise ValueError(
                f"array_or_volume has {array_or_volume.n_channels} channels; save one at a "
                "time, e.g. save_volume(volume.data[c], path, reference=volume)"
            )
        array, geometry = array_or_volume.data[0], array_or_volume.geometry
    else:
        array = np.asarray(array_or_volume)
        array = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
        if array.ndim != 3:
            raise ValueError(f"array_or_volume must be a 3D array (Z, Y, X), got shape {array.shape}")
        geometry = Geometry(shape=array.shape)
    if reference is not None:
        geometry = _geometry_of(reference, "reference")
        if geometry.shape != array.shape:
            raise ValueError(
                f"reference shape {geometry.shape} does not match the array shape {array.shape}"
            )
    return _writable(np.asarray(array)), geometry


def _writable(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"cannot save an array of dtype {array.dtype}")
    return array


def _write(array: np.ndarray, geometry: Geometry, path: Path, overwrite: bool) -> None:
    """Write via a temporary folder next to ``path``, then rename into place."""
    fmt = _FILE_FORMATS.get(_extension(path))
    if fmt is None:
        raise ValueError(f"cannot write {path}: unsupported ending; supported: {', '.join(WRITE_FORMATS)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    staging = Path(tempfile.mkdtemp(prefix=".jule3d-tmp-", dir=path.parent))
    try:
        try:
            _WRITERS[fmt](array, geometry, staging / path.name)
        except RuntimeError as exc:  # SimpleITK's error type
            raise OSError(f"could not write {path}: {exc}") from exc
        _move_into_place(staging, path.parent, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, folder: Path, overwrite: bool) -> None:
    """Rename every file the writer produced (header + data for ``.mhd``/``.nhdr``)."""
    produced = sorted(p for p in staging.iterdir())
    existing = [folder / p.name for p in produced if (folder / p.name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True to replace it")
    for item in produced:
        target = folder / item.name
        if target.is_dir():  # a zarr folder: move the old one aside, removed with staging
            target.rename(staging / (item.name + ".old"))
        os.replace(item, target)


def _geometry_dict(geometry: Geometry) -> dict[str, list[float]]:
    return {
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
    }


def _write_sitk(array: np.ndarray, geometry: Geometry, target: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(target), useCompression=_extension(target) != ".nii")


def _write_npy(array: np.ndarray, geometry: Geometry, target: Path) -> None:
    np.save(target, array)
    _sidecar(target).write_text(json.dumps(_geometry_dict(geometry), indent=1), encoding="utf-8")


def _write_zarr(array: np.ndarray, geometry: Geometry, target: Path) -> None:
    stored = zarr.open_array(str(target), mode="w", shape=array.shape, dtype=array.dtype)
    stored[...] = array
    stored.attrs.update(_geometry_dict(geometry))


def _write_tiff(array: np.ndarray, geometry: Geometry, target: Path) -> None:
    x, y, _ = geometry.spacing
    tifffile.imwrite(
        target,
        array,
        photometric="minisblack",
        metadata={**_geometry_dict(geometry), "unit": "mm"},
        resolution=(1.0 / x, 1.0 / y),
    )


_WRITERS: dict[str, Callable[[np.ndarray, Geometry, Path], None]] = {
    "sitk": _write_sitk,
    "npy": _write_npy,
    "zarr": _write_zarr,
    "tiff": _write_tiff,
}
