"""The ``jule3d segment`` subcommand: output geometry, determinism, and one-line errors with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jule3d.app.cli import main
from jule3d.io import read_image, save_labels, save_volume
from jule3d.checkpoint import save_model
from jule3d.models import JuleNet3D, net_config
from jule3d.phantom import write_phantom
from jule3d.volume import Geometry, Volume

ROTATION = (0.8660254, -0.5, 0.0, 0.4698463, 0.8137977, -0.3420201, 0.1710101, 0.2961981, 0.9396926)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 40³ phantom, the same voxels with an oblique geometry, and tiny saved models."""
    root = tmp_path_factory.mktemp("cli")
    phantom = write_phantom(root / "phantom.nii.gz", root / "truth.nii.gz", shape=(40, 40, 40), seed=0)
    oblique = Geometry((40, 40, 40), spacing=(0.5, 0.7, 1.2), origin=(3.0, -4.5, 10.25), direction=ROTATION)
    save_volume(Volume(phantom.volume.data, oblique), root / "oblique.nrrd")
    save_volume(Volume.from_array(np.asarray(phantom.volume.data[0, :16, :20, :24])), root / "small.nii.gz")
    tiny = dict(n_filters=4, feature_dim=8)
    save_model(JuleNet3D(net_config("fast", patch_size=13, **tiny), seed=1), root / "tiny.pt")
    save_model(JuleNet3D(net_config("fast", patch_size=13, in_channels=2, **tiny), seed=1), root / "two.pt")
    save_model(JuleNet3D(net_config("fast", patch_size=17, **tiny), seed=1), root / "p17.pt")
    return {p.name.split(".")[0]: p for p in root.iterdir()}


def _errors(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, f"expected one line, got {err!r}"
    assert err.startswith("jule3d segment: error: ")
    return err


def test_segment_with_model_keeps_geometry(files, tmp_path: Path, capsys) -> None:
    out = tmp_path / "labels.nii.gz"
    code = main(["segment", str(files["oblique"]), "--out", str(out), "--model", str(files["tiny"]),
                 "--stride", "4", "--n-clusters", "3"])
    assert code == 0
    labels, geometry = read_image(out)
    _, reference = read_image(files["oblique"])
    assert geometry.shape == reference.shape
    np.testing.assert_allclose(geometry.spacing, reference.spacing, atol=1e-6)
    np.testing.assert_allclose(geometry.origin, reference.origin, atol=1e-5)
    np.testing.assert_allclose(geometry.direction, reference.direction, atol=1e-6)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2, 3}
    # the summary reports the class volumes in mm³
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith(f"jule3d segment: wrote {out}")
    mm3 = [float(v) for v in re.findall(r"class \d: ([0-9.]+) mm³", summary)]
    expected = np.bincount(labels.ravel(), minlength=4)[1:] * np.prod(reference.spacing)
    np.testing.assert_allclose(mm3, expected, atol=0.1)
    # same arguments, same labels; --overwrite replaces the file
    assert main(["segment", str(files["oblique"]), "--out", str(out), "--model", str(files["tiny"]),
                 "--stride", "4", "--overwrite"]) == 0
    np.testing.assert_array_equal(read_image(out)[0], labels)


def test_segment_with_mask(files, tmp_path: Path) -> None:
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[8:32, 8:32, 8:32] = 1
    mask_file = save_labels(mask, tmp_path / "mask.nii.gz", reference=read_image(files["phantom"])[1])
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(files["phantom"]), "--mask", str(mask_file), "--out", str(out),
                 "--model", str(files["tiny"]), "--stride", "4"]) == 0
    np.testing.assert_array_equal(read_image(out)[0] > 0, mask > 0)


def test_segment_subprocess(files, tmp_path: Path) -> None:
    out = tmp_path / "labels.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "jule3d.app.cli", "segment", str(files["phantom"]), "--out", str(out),
                           "--model", str(files["tiny"]), "--stride", "4", "--n-clusters", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    labels, geometry = read_image(out)
    assert geometry.matches(read_image(files["phantom"])[1])
    assert set(np.unique(labels)) == {0, 1, 2}


@pytest.mark.slow
def test_segment_trains_with_small_settings(files, tmp_path: Path) -> None:
    """Training through the CLI: the fast preset on 150 patches (~10 s)."""
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(files["phantom"]), "--out", str(out), "--n-patches", "150", "--n-clusters", "3"]) == 0
    labels, geometry = read_image(out)
    truth, _ = read_image(files["truth"])
    assert geometry.matches(read_image(files["phantom"])[1])
    assert np.mean((labels == 0) == (truth == 0)) > 0.999  # the automatic mask is the specimen
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_missing_input(files, tmp_path: Path, capsys) -> None:
    assert main(["segment", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "l.nii.gz"),
                 "--model", str(files["tiny"])]) == 2
    assert "nope.nii.gz" in _errors(capsys)
    assert not (tmp_path / "l.nii.gz").exists()


def test_nan_voxels_in_a_nifti_exit_2_and_write_nothing(files, tmp_path: Path, capsys) -> None:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(files["phantom"]), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[10, 10, 10] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(tmp_path / "nan.nii.gz"))
    assert main(["segment", str(tmp_path / "nan.nii.gz"), "--out", str(tmp_path / "l.nii.gz"),
                 "--model", str(files["tiny"])]) == 2
    assert "nan.nii.gz has 1 NaN/Inf voxels" in _errors(capsys)
    assert not (tmp_path / "l.nii.gz").exists()


def test_missing_model(files, tmp_path: Path, capsys) -> None:
    assert main(["segment", str(files["phantom"]), "--out", str(tmp_path / "l.nii.gz"),
                 "--model", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in _errors(capsys)


def test_out_is_an_input(files, capsys) -> None:
    before = files["phantom"].read_bytes()
    assert main(["segment", str(files["phantom"]), "--out", str(files["phantom"]), "--overwrite",
                 "--model", str(files["tiny"])]) == 2
    assert "--out" in (message := _errors(capsys)) and "is one of the inputs" in message
    assert files["phantom"].read_bytes() == before


def test_out_is_the_mask(files, capsys) -> None:
    assert main(["segment", str(files["phantom"]), "--mask", str(files["truth"]), "--out", str(files["truth"]),
                 "--overwrite", "--model", str(files["tiny"])]) == 2
    assert "is one of the inputs" in _errors(capsys)


def test_out_folder_missing(files, tmp_path: Path, capsys) -> None:
    assert main(["segment", str(files["phantom"]), "--out", str(tmp_path / "no" / "l.nii.gz"),
                 "--model", str(files["tiny"])]) == 2
    assert "folder" in (message := _errors(capsys)) and "of --out does not exist" in message


def test_existing_out_untouched(files, tmp_path: Path, capsys) -> None:
    out = tmp_path / "l.nii.gz"
    out.write_bytes(b"keep me")
    assert main(["segment", str(files["phantom"]), "--out", str(out), "--model", str(files["tiny"])]) == 2
    assert "--overwrite" in _errors(capsys)
    assert out.read_bytes() == b"keep me"


def test_one_cluster_rejected_before_training(files, tmp_path: Path, capsys, monkeypatch) -> None:
    import jule3d.jule

    monkeypatch.setattr(jule3d.jule, "train_jule", lambda *a, **k: pytest.fail("trained before checking"))
    assert main(["segment", str(files["phantom"]), "--out", str(tmp_path / "l.nii.gz"), "--n-clusters", "1"]) == 2
    assert "n_clusters" in _errors(capsys)
    assert not (tmp_path / "l.nii.gz").exists()


def test_smoothing_option(files, tmp_path: Path, capsys, monkeypatch) -> None:
    import jule3d.jule

    # 0, not a larger beta: the untrained net's classes are so small that beta = 2 is halved back to the default's
    out = tmp_path / "l.nii.gz"
    assert main(["segment", str(files["phantom"]), "--out", str(out), "--model", str(files["tiny"]),
                 "--smoothing", "0"]) == 0
    plain = tmp_path / "plain.nii.gz"
    assert main(["segment", str(files["phantom"]), "--out", str(plain), "--model", str(files["tiny"])]) == 0
    smooth_labels, plain_labels = read_image(out)[0], read_image(plain)[0]
    assert not np.array_equal(smooth_labels, plain_labels)
    assert set(np.unique(smooth_labels)) == set(np.unique(plain_labels))
    capsys.readouterr()
    monkeypatch.setattr(jule3d.jule, "train_jule", lambda *a, **k: pytest.fail("trained before checking"))
    assert main(["segment", str(files["phantom"]), "--out", str(tmp_path / "bad.nii.gz"),
                 "--smoothing", "-1"]) == 2
    assert "smoothing" in _errors(capsys)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_phase2_option_reaches_the_published_kmeans(files, tmp_path: Path, capsys) -> None:
    merged, kmeans = tmp_path / "merge.nii.gz", tmp_path / "kmeans.nii.gz"
    assert main(["segment", str(files["phantom"]), "--out", str(merged), "--model", str(files["tiny"])]) == 0
    assert main(["segment", str(files["phantom"]), "--out", str(kmeans), "--model", str(files["tiny"]),
                 "--phase2", "kmeans"]) == 0
    assert not np.array_equal(read_image(merged)[0], read_image(kmeans)[0])
    with pytest.raises(SystemExit) as info:
        main(["segment", str(files["phantom"]), "--out", str(tmp_path / "x.nii.gz"), "--phase2", "spectral"])
    assert info.value.code == 2 and "--phase2" in capsys.readouterr().err


def test_segment_options_are_the_parameter_surface() -> None:
    from jule3d.app.cli import build_parser
    from jule3d.parameters import PARAMETERS
    from jule3d.segmentation import PHASE2_METHODS

    segment = build_parser()._subparsers._group_actions[0].choices["segment"]
    options = {a.dest: a for a in segment._actions if a.option_strings}
    expected = {name for name, p in PARAMETERS.items() if p.cli}
    assert expected <= set(options)
    run_options = {"resume", "scheduler", "chunk", "cache", "in_memory_voxels", "fit_positions"}
    assert set(options) - expected == {"help", "out", "mask", "model", "overwrite"} | run_options
    import inspect

    from jule3d.chunked import segment_file

    signature = inspect.signature(segment_file).parameters  # the run options are segment_file's, same defaults
    for name in run_options | {"mask", "model", "overwrite"}:
        assert options[name].default == signature[name].default, name
    for name in expected:
        assert options[name].default == PARAMETERS[name].default, name
        assert options[name].option_strings == [PARAMETERS[name].option]
    assert tuple(options["phase2"].choices) == PHASE2_METHODS


def test_bad_stride(files, tmp_path: Path, capsys) -> None:
    assert main(["segment", str(files["phantom"]), "--out", str(tmp_path / "l.nii.gz"),
                 "--model", str(files["tiny"]), "--stride", "3"]) == 2
    assert "stride=3" in _errors(capsys)


def test_model_of_other_channel_count(files, tmp_path: Path, capsys) -> None:
    assert main(["segment", str(files["phantom"]), "--out", str(tmp_path / "l.nii.gz"),
                 "--model", str(files["two"])]) == 2
    assert "2 channel(s) but the volume has 1" in _errors(capsys)
    assert not (tmp_path / "l.nii.gz").exists()


def test_patch_larger_than_volume(files, tmp_path: Path, capsys) -> None:
    assert main(["segment", str(files["small"]), "--out", str(tmp_path / "l.nii.gz"),
                 "--model", str(files["p17"])]) == 2
    assert "patch size 17" in _errors(capsys)


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["segment", "x.nii.gz"])  # --out is required
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
