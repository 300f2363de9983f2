"""Foreground masks on synthetic specimens and on the real BraTS, CT and micro-CT volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from jule3d.mask import foreground_mask
from jule3d.volume import Volume


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_otsu_mask_recovers_the_specimen(specimen_array: np.ndarray, specimen_truth: np.ndarray) -> None:
    mask = foreground_mask(specimen_array)
    assert mask.dtype == bool and mask.shape == specimen_truth.shape
    assert _dice(mask, specimen_truth) > 0.97


def test_accepts_volumes_and_averages_channels(specimen_volume: Volume, specimen_truth: np.ndarray) -> None:
    two = Volume(np.stack([specimen_volume.data[0], specimen_volume.data[0] * 0.5]), specimen_volume.geometry)
    assert _dice(foreground_mask(specimen_volume), specimen_truth) > 0.97
    assert _dice(foreground_mask(two), specimen_truth) > 0.97


def test_cavity_is_filled_and_debris_dropped(specimen_array: np.ndarray, specimen_truth: np.ndarray) -> None:
    image = specimen_array.copy()
    image[8:12, 10:14, 12:16] = 10.0  # air pocket inside the specimen
    image[0:2, 0:2, 0:2] = 120.0  # dust in a corner
    mask = foreground_mask(image)
    assert mask[8:12, 10:14, 12:16].all()
    assert not mask[0:2, 0:2, 0:2].any()
    raw = foreground_mask(image, closing_radius=0, keep_largest=False, fill_holes=False)
    assert raw[0:2, 0:2, 0:2].all()
    assert not raw[9:11, 11:13, 13:15].any()


def test_in_slice_holes_open_to_the_border_in_3d_are_filled(specimen_truth: np.ndarray) -> None:
    image = np.where(specimen_truth, 100.0, 0.0)
    image[:, 11:13, 13:15] = 0.0  # a tube through the whole specimen along Z (like an airway)
    assert foreground_mask(image)[:, 11:13, 13:15][specimen_truth[:, 11:13, 13:15]].all()
    holed = foreground_mask(image, fill_holes=False, closing_radius=0)
    assert not holed[:, 11:13, 13:15].any()


def test_closing_bridges_a_thin_gap_up_to_the_array_edge() -> None:
    image = np.zeros((12, 16, 16))
    image[:, 2:7, 2:14] = 1.0
    image[:, 8:14, 2:14] = 1.0  # one-voxel slit at row 7, specimen cut by the Z faces
    image[:, 7, 4] = 1.0  # the two halves join at one point, so both survive keep_largest
    mask = foreground_mask(image, closing_radius=2, fill_holes=False)
    assert mask[:, 7, 3:13].all()
    assert not mask[:, 7, 1].any() and not mask[:, 15, :].any()
    unclosed = foreground_mask(image, closing_radius=0, fill_holes=False)
    assert unclosed[:, 7, 5:12].sum() == 0


def test_premasked_background_value_inside_the_range(specimen_truth: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    image = np.zeros(specimen_truth.shape, np.float32)  # z-scored inside, exactly 0 outside
    image[specimen_truth] = rng.normal(0.0, 1.0, specimen_truth.sum())
    np.testing.assert_array_equal(foreground_mask(image), specimen_truth)


def test_premasked_background_at_the_minimum(specimen_truth: np.ndarray) -> None:
    rng = np.random.default_rng(4)
    image = np.full(specimen_truth.shape, -3.2, np.float32)
    image[specimen_truth] = rng.uniform(-3.1, 8.0, specimen_truth.sum())
    np.testing.assert_array_equal(foreground_mask(image), specimen_truth)


def test_nonzero_method(specimen_truth: np.ndarray) -> None:
    image = np.where(specimen_truth, 1.0, 0.0)
    np.testing.assert_array_equal(foreground_mask(image, method="nonzero"), specimen_truth)


@pytest.mark.parametrize(
    ("kwargs", "array", "message"),
    [
        ({"method": "magic"}, np.zeros((4, 4, 4)), "method"),
        ({"closing_radius": -1}, np.zeros((4, 4, 4)), "closing_radius"),
        ({}, np.zeros((4, 4)), "volume_or_array"),
        ({}, np.full((4, 4, 4), 3.0), "constant"),
        ({"method": "nonzero"}, np.zeros((4, 4, 4)), "no foreground"),
    ],
)
def test_bad_input(kwargs: dict, array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        foreground_mask(array, **kwargs)


@pytest.mark.realdata
def test_brats_flair_mask_matches_the_brainmask(shared_data: Path) -> None:
    folder = shared_data / "brats2015" / "brats_2013_pat0004_1"
    mask = foreground_mask(_read(folder / "Flair_subtrMeanDivStd.nii.gz"))
    assert _dice(mask, _read(folder / "brainmask.nii.gz") > 0) > 0.98


@pytest.mark.realdata
def test_ct_body_mask_covers_the_labelled_organs(shared_data: Path) -> None:
    ct = _read(shared_data / "totalseg" / "example_ct.nii.gz")
    organs = _read(shared_data / "totalseg" / "example_seg_fast_force_split.nii.gz") > 0
    mask = foreground_mask(ct)
    assert mask[organs].mean() > 0.99
    air = ct < -900
    assert mask[air].mean() < 0.15  # only air inside the body (lungs, bowel gas) is kept
    assert 0.3 < mask.mean() < 0.8


@pytest.mark.realdata
def test_microct_iguana_mask_holds_the_specimen(shared_data: Path) -> None:
    image = _read(shared_data / "microct" / "Iguana.nii.gz")
    mask = foreground_mask(image)
    assert mask[image > 60].mean() > 0.99
    assert mask[image == 0].mean() < 0.05
    assert 0.3 < mask.mean() < 0.5
