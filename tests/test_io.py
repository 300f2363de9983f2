"""Reading and writing volumes: round trips, channels, masks, DICOM/TIFF folders and bad input."""

from __future__ import annotations

import locale
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import zarr

import jule3d.io as jio
from jule3d.io import WRITE_FORMATS, load_mask, load_volume, read_image, save_labels, save_volume
from jule3d.volume import Geometry, Volume

# Every writable format keeps spacing, origin and direction (TIFF through jule3d's JSON
# description, .npy through its sidecar, zarr through attributes).
ROUND_TRIP_ENDINGS = [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".zarr", ".tif"]


def _image(array: np.ndarray, geometry: Geometry | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    if geometry is not None:
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
    return image


def test_round_trip_endings_cover_every_write_format() -> None:
    assert set(ROUND_TRIP_ENDINGS) | {".tiff"} == set(WRITE_FORMATS)


@pytest.mark.parametrize("ending", ROUND_TRIP_ENDINGS)
def test_round_trip_keeps_voxels_dtype_and_geometry(
    tmp_path: Path, ending: str, specimen_array: np.ndarray, oblique_geometry: Geometry
) -> None:
    array = (specimen_array * 10).astype(np.int16)
    path = save_volume(array, tmp_path / f"vol{ending}", reference=oblique_geometry)
    back, geometry = read_image(path)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.int16
    assert geometry.matches(oblique_geometry, atol=1e-5), oblique_geometry.describe_mismatch(geometry)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".jule3d-tmp")]


def test_save_volume_uses_the_volume_geometry(tmp_path: Path, specimen_volume: Volume) -> None:
    back, geometry = read_image(save_volume(specimen_volume, tmp_path / "v.nrrd"))
    np.testing.assert_array_equal(back, specimen_volume.data[0])
    assert geometry.matches(specimen_volume.geometry)


def test_npy_is_memory_mapped_and_geometry_defaults_without_sidecar(tmp_path: Path) -> None:
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    np.save(tmp_path / "a.npy", array)
    back, geometry = read_image(tmp_path / "a.npy")
    assert isinstance(back, np.memmap)
    assert geometry == Geometry(shape=(3, 4, 5))
    (tmp_path / "a.npy.json").write_text('{"spacing": [0.5, 0.5, 2.0]}', encoding="utf-8")
    assert read_image(tmp_path / "a.npy")[1].spacing == (0.5, 0.5, 2.0)
    (tmp_path / "a.npy.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a\.npy\.json"):
        read_image(tmp_path / "a.npy")


def test_zarr_group_data_key_first_array_and_group_attributes(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_dataset("aaa", data=np.zeros((2, 2, 2)))
    group.create_dataset("data", data=array)
    group.attrs["spacing"] = [0.1, 0.2, 0.3]
    back, geometry = read_image(tmp_path / "g.zarr")
    np.testing.assert_array_equal(back, array)
    assert geometry.spacing == (0.1, 0.2, 0.3)

    other = zarr.open_group(str(tmp_path / "h.zarr"), mode="w")
    other.create_dataset("volume", data=array)
    np.testing.assert_array_equal(read_image(tmp_path / "h.zarr")[0], array)


def test_plain_tiff_stack_is_memory_mapped_with_unit_spacing(tmp_path: Path) -> None:
    array = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    tifffile.imwrite(tmp_path / "s.tiff", array, photometric="minisblack")
    back, geometry = read_image(tmp_path / "s.tiff")
    assert isinstance(back, np.memmap)
    np.testing.assert_array_equal(back, array)
    assert geometry.spacing == (1.0, 1.0, 1.0)
    assert read_image(tmp_path / "s.tiff", spacing=(0.2, 0.2, 0.4))[1].spacing == (0.2, 0.2, 0.4)


def test_compressed_imagej_tiff_gives_spacing_in_mm(tmp_path: Path) -> None:
    array = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    tifffile.imwrite(
        tmp_path / "ij.tif", array, imagej=True, compression="zlib",
        resolution=(1 / 20.0, 1 / 25.0), metadata={"spacing": 50.0, "unit": "micron", "axes": "ZYX"},
    )
    back, geometry = read_image(tmp_path / "ij.tif")
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(geometry.spacing, (0.02, 0.025, 0.05))


def test_tiff_slice_folder_is_sorted_naturally(tmp_path: Path) -> None:
    array = np.arange(12 * 4 * 5, dtype=np.uint16).reshape(12, 4, 5)
    for i in range(12):
        tifffile.imwrite(tmp_path / f"slice_{i + 1}.tif", array[i])
    (tmp_path / "notes.txt").write_text("export log")
    back, geometry = read_image(tmp_path)
    np.testing.assert_array_equal(back, array)
    assert geometry.spacing == (1.0, 1.0, 1.0)


def test_tiff_slice_folder_with_a_mismatching_slice_names_it(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "s1.tif", np.zeros((4, 5), np.uint8))
    tifffile.imwrite(tmp_path / "s2.tif", np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="s2.tif"):
        read_image(tmp_path)


def _write_dicom_series(folder: Path, array: np.ndarray, geometry: Geometry, uid: str, names: list[str]) -> None:
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(folder, array, geometry, uid, names)
    finally:  # GDCM's writer sets the process's locale to "C": later tests would decode text as ASCII
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder: Path, array: np.ndarray, geometry: Geometry, uid: str, names: list[str]) -> None:
    image = _image(array, geometry)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.6f}" for v in np.asarray(geometry.direction).reshape(3, 3)[:, :2].T.ravel())
    for k, name in zip(range(array.shape[0]), names):
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        piece = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0013": str(k + 1),
            "0018|0050": f"{geometry.spacing[2]:.6f}",
        }.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(piece)


def test_dicom_series_picks_the_largest_series_sorted_by_position(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    geometry = Geometry(
        shape=(6, 8, 10), spacing=(0.6, 0.7, 2.5), origin=(-5.0, 3.0, 40.0),
        direction=(1, 0, 0, 0, np.cos(0.3), -np.sin(0.3), 0, np.sin(0.3), np.cos(0.3)),
    )
    array = rng.integers(-1000, 1000, geometry.shape).astype(np.int16)
    names = [f"img{n:03d}.dcm" for n in (5, 2, 0, 4, 1, 3)]  # file order != slice order
    _write_dicom_series(tmp_path, array, geometry, "1.2.826.0.1.3680043.2.1125.1", names)
    small = Geometry(shape=(2, 8, 10))
    _write_dicom_series(tmp_path, array[:2], small, "1.2.826.0.1.3680043.2.1125.2", ["x0.dcm", "x1.dcm"])
    before = locale.setlocale(locale.LC_ALL)
    back, read_geometry = read_image(tmp_path)
    assert locale.setlocale(locale.LC_ALL) == before  # reading, unlike GDCM's writer, keeps the process's locale
    np.testing.assert_array_equal(back, array)
    assert read_geometry.matches(geometry, atol=1e-4), geometry.describe_mismatch(read_geometry)


def test_save_labels_picks_uint8_then_uint16(tmp_path: Path, oblique_geometry: Geometry) -> None:
    labels = np.zeros(oblique_geometry.shape, dtype=np.int64)
    labels[5:10] = 3
    back, geometry = read_image(save_labels(labels, tmp_path / "l.nii.gz", oblique_geometry))
    assert back.dtype == np.uint8 and back.max() == 3
    assert geometry.matches(oblique_geometry, atol=1e-5)
    labels[0, 0, 0] = 300
    back, _ = read_image(save_labels(labels.astype(float), tmp_path / "l16.nrrd", oblique_geometry))
    assert back.dtype == np.uint16 and back.max() == 300


@pytest.mark.parametrize(
    ("labels", "message"),
    [(np.full((3, 3, 3), -1), "non-negative"), (np.full((3, 3, 3), 0.5), "integers"),
     (np.full((3, 3, 3), 70000), "65535")],
)
def test_save_labels_rejects_bad_labels(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        save_labels(labels, tmp_path / "l.nii.gz", None)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_refused_then_allowed(tmp_path: Path) -> None:
    path = tmp_path / "v.nii.gz"
    save_volume(np.zeros((3, 4, 5), np.float32), path)
    with pytest.raises(FileExistsError, match="v.nii.gz"):
        save_volume(np.ones((3, 4, 5), np.float32), path)
    assert read_image(path)[0].max() == 0
    save_volume(np.ones((3, 4, 5), np.float32), path, overwrite=True)
    assert read_image(path)[0].min() == 1


def test_overwrite_replaces_a_zarr_folder(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    save_volume(np.zeros((3, 4, 5), np.float32), path)
    with pytest.raises(FileExistsError):
        save_volume(np.ones((3, 4, 5), np.float32), path)
    save_volume(np.ones((3, 4, 5), np.float32), path, overwrite=True)
    assert read_image(path)[0].min() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["v.zarr"]


def test_mhd_data_file_is_not_overwritten_silently(tmp_path: Path) -> None:
    save_volume(np.zeros((3, 4, 5), np.float32), tmp_path / "v.mhd")
    (tmp_path / "v.mhd").unlink()
    data_file = next(tmp_path.iterdir())
    with pytest.raises(FileExistsError, match=data_file.name):
        save_volume(np.zeros((3, 4, 5), np.float32), tmp_path / "v.mhd")
    assert [p.name for p in tmp_path.iterdir()] == [data_file.name]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_writer(image: sitk.Image, name: str, useCompression: bool) -> None:
        Path(name).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(jio.sitk, "WriteImage", broken_writer)
    with pytest.raises(OSError, match="v.nii.gz"):
        save_volume(np.zeros((3, 4, 5), np.float32), tmp_path / "v.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        save_volume(np.zeros((3, 4, 5)), tmp_path / "nowhere" / "v.nii.gz")


def test_save_checks_reference_shape_channels_and_ending(tmp_path: Path, specimen_volume: Volume) -> None:
    with pytest.raises(ValueError, match="reference"):
        save_volume(np.zeros((3, 4, 5)), tmp_path / "v.nii.gz", reference=specimen_volume)
    two = Volume(np.zeros((2, 3, 4, 5)), Geometry(shape=(3, 4, 5)))
    with pytest.raises(ValueError, match="2 channels"):
        save_volume(two, tmp_path / "v.nii.gz")
    with pytest.raises(ValueError, match=r"\.nii\.gz"):
        save_volume(np.zeros((3, 4, 5)), tmp_path / "v.png")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad input


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        read_image(tmp_path / "absent.nii.gz")
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        load_volume([tmp_path / "absent.nii.gz"])


def test_corrupt_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    for name in ("bad.nii.gz", "bad.nrrd", "bad.tif", "bad.npy"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ValueError, match=name):
            read_image(tmp_path / name)


def test_unsupported_ending_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=r"photo\.png.*\.nii\.gz.*\.nrrd.*DICOM"):
        read_image(tmp_path / "photo.png")


def test_folder_without_images_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing")
    with pytest.raises(ValueError, match="no DICOM series"):
        read_image(tmp_path)


def test_2d_images_are_rejected(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5), np.float32)), str(tmp_path / "flat.nii.gz"))
    np.save(tmp_path / "flat.npy", np.ones((4, 5)))
    np.save(tmp_path / "slice.npy", np.ones((1, 4, 5)))
    for name in ("flat.nii.gz", "flat.npy", "slice.npy"):
        with pytest.raises(ValueError, match=f"{name}.*2D"):
            read_image(tmp_path / name)


def test_4d_and_vector_images_say_how_many_components(tmp_path: Path) -> None:
    frames = [sitk.GetImageFromArray(np.full((3, 4, 5), t, np.float32)) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "t.nii.gz"))
    with pytest.raises(ValueError, match="3 time points"):
        read_image(tmp_path / "t.nii.gz")
    vector = sitk.GetImageFromArray(np.zeros((3, 4, 5, 2), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "v.mha"))
    with pytest.raises(ValueError, match="2 components"):
        read_image(tmp_path / "v.mha")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((6, 4, 5, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match=r"rgb\.tif.*3 samples"):
        read_image(tmp_path / "rgb.tif")
    np.save(tmp_path / "c.npy", np.zeros((4, 3, 4, 5)))
    with pytest.raises(ValueError, match="4 components or time points"):
        read_image(tmp_path / "c.npy")


def test_single_frame_4d_nifti_reads_as_3d(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(array)]), str(tmp_path / "t1.nii.gz"))
    np.testing.assert_array_equal(read_image(tmp_path / "t1.nii.gz")[0], array)


@pytest.mark.parametrize("ending", ROUND_TRIP_ENDINGS)
def test_nan_and_inf_voxels_are_refused_in_every_format(tmp_path: Path, ending: str) -> None:
    """ITK's NIfTI reader turns NaN into 0: the check must see the stored voxels, in every format."""
    array = np.ones((3, 4, 5), np.float32)
    array[0, 0, 0], array[1, 1, 1] = np.nan, np.inf
    path = tmp_path / f"nan{ending}"
    if ending in (".npy", ".zarr", ".tif"):
        save_volume(array, path)
    else:
        sitk.WriteImage(_image(array), str(path))
    with pytest.raises(ValueError, match=rf"nan{re.escape(ending)} has 2 NaN/Inf voxels"):
        read_image(path)


def test_nan_in_a_nifti_written_by_nibabel_is_refused(tmp_path: Path) -> None:
    nibabel = pytest.importorskip("nibabel")
    array = np.ones((5, 4, 3), np.float32)
    array[2, 1, 0] = np.nan
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(tmp_path / "scan.nii.gz"))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scan.nii.gz")))).any(), (
        "ITK no longer zeroes NaN: the nibabel check may be unnecessary")
    with pytest.raises(ValueError, match="scan.nii.gz has 1 NaN/Inf voxels"):
        load_volume(tmp_path / "scan.nii.gz")


def test_constant_volume_is_rejected(tmp_path: Path) -> None:
    save_volume(np.full((3, 4, 5), 7.0), tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="c.nii.gz is constant"):
        load_volume(tmp_path / "c.nii.gz")


# ----------------------------------------------------------------------------- load_volume


def test_load_volume_two_channels_with_auto_mask_and_normalisation(
    tmp_path: Path, specimen_array: np.ndarray, specimen_truth: np.ndarray, oblique_geometry: Geometry
) -> None:
    save_volume(specimen_array, tmp_path / "t1.nii.gz", reference=oblique_geometry)
    save_volume(specimen_array * 3 + 5, tmp_path / "t2.nii.gz", reference=oblique_geometry)
    volume = load_volume([tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"])
    assert volume.data.shape == (2,) + oblique_geometry.shape
    assert volume.data.dtype == np.float32
    assert volume.channel_names == ("t1", "t2")
    assert volume.sources == (str(tmp_path / "t1.nii.gz"), str(tmp_path / "t2.nii.gz"))
    assert volume.geometry.matches(oblique_geometry, atol=1e-5)
    assert np.mean(volume.mask == specimen_truth) > 0.98
    inside = volume.data[:, volume.mask]
    np.testing.assert_allclose(inside.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(inside.std(axis=1), 1.0, atol=1e-3)
    assert np.all(volume.data[:, ~volume.mask] == 0)


def test_load_volume_raw_single_npy_stays_memory_mapped(tmp_path: Path, specimen_array: np.ndarray) -> None:
    np.save(tmp_path / "v.npy", specimen_array)
    volume = load_volume(tmp_path / "v.npy", normalize=False, foreground=None, channel_names=["ct"])
    assert isinstance(volume.data.base, np.memmap) or isinstance(volume.data, np.memmap)
    assert volume.mask is None and volume.channel_names == ("ct",)
    np.testing.assert_array_equal(volume.data[0], specimen_array)


def test_load_volume_channel_on_another_grid_names_file_and_field(
    tmp_path: Path, specimen_array: np.ndarray, oblique_geometry: Geometry
) -> None:
    save_volume(specimen_array, tmp_path / "a.nrrd", reference=oblique_geometry)
    shifted = Geometry(oblique_geometry.shape, spacing=(0.7, 0.8, 3.0),
                       origin=oblique_geometry.origin, direction=oblique_geometry.direction)
    save_volume(specimen_array, tmp_path / "b.nrrd", reference=shifted)
    with pytest.raises(ValueError, match=r"b\.nrrd.*spacing"):
        load_volume([tmp_path / "a.nrrd", tmp_path / "b.nrrd"])


def test_load_volume_with_mask_file_and_array(
    tmp_path: Path, specimen_array: np.ndarray, specimen_truth: np.ndarray, oblique_geometry: Geometry
) -> None:
    save_volume(specimen_array, tmp_path / "v.nii.gz", reference=oblique_geometry)
    save_labels(specimen_truth, tmp_path / "m.nii.gz", oblique_geometry)
    from_file = load_volume(tmp_path / "v.nii.gz", mask=tmp_path / "m.nii.gz", normalize=False)
    np.testing.assert_array_equal(from_file.mask, specimen_truth)
    from_array = load_volume(tmp_path / "v.nii.gz", mask=specimen_truth, foreground=None)
    np.testing.assert_array_equal(from_array.mask, specimen_truth)
    assert np.all(from_array.data[0][~specimen_truth] == 0)


def test_load_volume_rejects_bad_masks(
    tmp_path: Path, specimen_array: np.ndarray, specimen_truth: np.ndarray, oblique_geometry: Geometry
) -> None:
    save_volume(specimen_array, tmp_path / "v.nii.gz", reference=oblique_geometry)
    save_labels(specimen_truth, tmp_path / "moved.nii.gz", Geometry(oblique_geometry.shape, origin=(0, 0, 0)))
    save_labels(np.zeros_like(specimen_truth), tmp_path / "empty.nii.gz", oblique_geometry)
    with pytest.raises(ValueError, match=r"mask .*moved\.nii\.gz.*origin.*direction"):
        load_volume(tmp_path / "v.nii.gz", mask=tmp_path / "moved.nii.gz")
    with pytest.raises(ValueError, match=r"mask .*empty\.nii\.gz.*empty"):
        load_volume(tmp_path / "v.nii.gz", mask=tmp_path / "empty.nii.gz")
    with pytest.raises(ValueError, match="mask shape"):
        load_volume(tmp_path / "v.nii.gz", mask=np.ones((2, 2, 2), bool))
    with pytest.raises(ValueError, match="mask is empty"):
        load_volume(tmp_path / "v.nii.gz", mask=np.zeros_like(specimen_truth))
    with pytest.raises(ValueError, match="foreground"):
        load_volume(tmp_path / "v.nii.gz", foreground="everything")
    with pytest.raises(ValueError, match="channel_names"):
        load_volume(tmp_path / "v.nii.gz", channel_names=["a", "b"])


def test_load_mask_accepts_a_volume_reference(tmp_path: Path, specimen_volume: Volume, specimen_truth: np.ndarray) -> None:
    save_labels(specimen_truth, tmp_path / "m.nrrd", specimen_volume)
    np.testing.assert_array_equal(load_mask(tmp_path / "m.nrrd", specimen_volume), specimen_truth)


@pytest.mark.realdata
def test_load_volume_real_brats_two_channels(shared_data: Path) -> None:
    folder = shared_data / "brats2015" / "brats_2013_pat0003_1"
    volume = load_volume(
        [folder / "Flair_subtrMeanDivStd.nii.gz", folder / "T1c_subtrMeanDivStd.nii.gz"],
        mask=folder / "brainmask.nii.gz",
    )
    assert volume.data.shape == (2, 155, 240, 240)
    assert volume.channel_names == ("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd")
    np.testing.assert_allclose(volume.data[:, volume.mask].mean(axis=1), 0.0, atol=1e-3)
