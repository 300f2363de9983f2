"""The method chunk by chunk (jule3d.chunked) and lazy reading (jule3d.lazyio), on small volumes with tiny settings.

The chunked path is forced on small volumes with ``in_memory_voxels=0`` (the lazy scan), ``fit_positions`` (Phase 2
fitted on a sample) and a small ``chunk``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from jule3d import chunked
from jule3d.chunked import WorkDir, open_volume, segment_file
from jule3d.estimator import JuleSegmenter
from jule3d.io import load_volume, read_image, save_volume
from jule3d.lazyio import open_image
from jule3d.mask import foreground_mask
from jule3d.phantom import write_phantom
from jule3d.volume import Geometry, Volume

TINY = dict(n_patches=150, epochs_per_period=1, final_epochs=1, k_s=5, n_clusters=3, seed=0,
            jule_options=dict(net_overrides=dict(n_filters=8, feature_dim=16)))
TINY_CLI = ["--n-patches", "150", "--epochs-per-period", "1", "--final-epochs", "1", "--k-s", "5",
            "--n-clusters", "3", "--seed", "0"]
QUIET = dict(log=lambda message: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 48³ phantom as an uncompressed NIfTI and a segmenter trained on it (tiny)."""
    root = tmp_path_factory.mktemp("chunked")
    image = root / "phantom.nii"
    write_phantom(image, shape=(48, 48, 48), seed=0)
    segmenter = JuleSegmenter(progress=False, **TINY).fit(load_volume(image))
    model = segmenter.save(root / "segmenter.pt")
    return {"image": image, "model": model, "segmenter": segmenter, "root": root}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- lazy reading


@pytest.fixture()
def stack(tmp_path: Path) -> tuple[np.ndarray, Geometry]:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 4000, size=(12, 13, 14)).astype(np.uint16)
    geometry = Geometry(shape=array.shape, spacing=(0.5, 0.6, 0.7), origin=(1.0, -2.0, 3.0))
    return array, geometry


@pytest.mark.parametrize("name, how", [("a.npy", "memory-mapped"), ("a.nii", "memory-mapped"), ("a.zarr", "zarr"),
                                       ("a.tif", "memory-mapped"), ("a.nii.gz", "cache"), ("a.nrrd", "cache"),
                                       ("z.tif", "cache"), ("slices", "cache")])
def test_open_image_reads_blocks_like_read_image(stack, tmp_path: Path, name: str, how: str) -> None:
    array, geometry = stack
    path = tmp_path / name
    if name == "z.tif":
        tifffile.imwrite(path, array, compression="zlib")
    elif name == "slices":
        path.mkdir()
        for i, plane in enumerate(array):
            tifffile.imwrite(path / f"s{i}.tif", plane)
    else:
        save_volume(Volume.from_array(array), path, reference=geometry)
    image = open_image(path, cache=tmp_path / "cache")
    assert image.how == how and image.shape == array.shape and image.dtype == array.dtype
    box = (slice(2, 9), slice(1, 12), slice(3, 10))
    np.testing.assert_array_equal(np.asarray(image.array[box]), array[box])
    expected = read_image(path)[1]
    assert image.geometry.matches(expected), image.geometry.describe_mismatch(expected)
    if how == "cache":  # reused, not converted again
        messages: list[str] = []
        assert open_image(path, cache=tmp_path / "cache", announce=messages.append).how == "cache" and not messages


def test_a_cache_from_another_input_is_refused(stack, tmp_path: Path) -> None:
    array, geometry = stack
    path = save_volume(Volume.from_array(array), tmp_path / "a.nii.gz", reference=geometry)
    open_image(path, cache=tmp_path / "cache")
    save_volume(Volume.from_array(array[:, :, ::-1].copy()), path, reference=geometry, overwrite=True)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ValueError, match="chunk cache .* made from .*remove it"):
        open_image(path, cache=tmp_path / "cache")
    foreign = tmp_path / "other" / "input.zarr"
    foreign.mkdir(parents=True)
    (foreign / "x").write_text("not zarr")
    with pytest.raises(ValueError, match="not a jule3d cache"):
        open_image(path, cache=tmp_path / "other")
    with pytest.raises(ValueError, match="give a cache folder"):
        open_image(path)


def test_a_lazy_image_pickles_as_where_to_read_it(stack, tmp_path: Path) -> None:
    array, geometry = stack
    path = save_volume(Volume.from_array(array), tmp_path / "a.npy", reference=geometry)
    image = open_image(path)
    blob = pickle.dumps(image)
    assert len(blob) < array.nbytes / 4  # not the voxels
    np.testing.assert_array_equal(np.asarray(pickle.loads(blob).array[1:3]), array[1:3])


# ---------------------------------------------------------------------------------------------- the lazy volume


def test_lazy_scan_at_full_resolution_is_the_in_memory_preparation(trained) -> None:
    lazy = open_volume(trained["image"], in_memory_voxels=0)
    assert lazy.memory is None and lazy.factor == 1
    memory = load_volume(trained["image"])
    whole = lazy.read(tuple(slice(0, n) for n in lazy.shape))
    np.testing.assert_array_equal(whole.mask, memory.mask)
    np.testing.assert_allclose(whole.data, memory.data, atol=1e-5)
    small = open_volume(trained["image"])
    assert small.memory is not None and np.array_equal(small.memory.data, memory.data)


def test_coarse_mask_and_sampled_statistics_of_a_large_volume(trained, monkeypatch) -> None:
    monkeypatch.setattr(chunked, "COARSE_VOXELS", 20 ** 3)  # 48³ → coarse blocks of 3³
    lazy = open_volume(trained["image"], in_memory_voxels=0)
    assert lazy.factor == 3 and lazy.coarse.shape == (16, 16, 16)
    memory = load_volume(trained["image"])
    box = tuple(slice(0, n) for n in lazy.shape)
    mask = lazy.read(box).mask
    assert np.mean(mask == foreground_mask(read_image(trained["image"])[0])) > 0.99
    inside = mask & memory.mask
    difference = np.abs(lazy.read(box).data[0][inside] - memory.data[0][inside])
    assert difference.max() < 0.1 and difference.mean() < 0.01  # statistics of a slightly different foreground
    # the mask of any block is that block of the whole mask (it is voxel-wise)
    sub = (slice(5, 30), slice(17, 40), slice(0, 23))
    np.testing.assert_array_equal(lazy.read(sub).mask, mask[sub])


def test_patches_are_sampled_from_the_lazy_volume(trained) -> None:
    lazy = open_volume(trained["image"], in_memory_voxels=0)
    patches = lazy.sample_patches(60, patch_size=9, min_foreground=0.5, seed=3)
    assert patches.patches.shape == (60, 1, 9, 9, 9) and len({tuple(c) for c in patches.centers}) == 60
    whole = lazy.read(tuple(slice(0, n) for n in lazy.shape))
    for centre, patch in zip(patches.centers[:10], patches.patches[:10]):
        box = tuple(slice(c - 4, c + 5) for c in centre)
        np.testing.assert_array_equal(patch, whole.data[(slice(None),) + box])
        assert whole.mask[tuple(centre)] and whole.mask[box].mean() >= 0.5
    again = lazy.sample_patches(60, patch_size=9, min_foreground=0.5, seed=3)
    np.testing.assert_array_equal(again.centers, patches.centers)
    with pytest.raises(ValueError, match="fewer than n_patches"):
        lazy.sample_patches(10**6, patch_size=9, seed=0)
    with pytest.raises(ValueError, match="fewer than n_patches"):  # enough voxels, too few eligible patches
        lazy.sample_patches(2000, patch_size=45, min_foreground=0.9, seed=0)


# ---------------------------------------------------------------------------------------------- Phase 2 in chunks


def test_chunked_phase2_labels_the_volume_as_the_whole_grid_does(trained, tmp_path: Path) -> None:
    reference = trained["segmenter"].predict(load_volume(trained["image"]))
    out = segment_file(trained["image"], tmp_path / "l.nii.gz", model=trained["model"], chunk=5, fit_positions=1,
                       **QUIET, **TINY)
    labels, geometry = read_image(out)
    assert geometry.matches(read_image(trained["image"])[1])
    assert np.mean(labels == reference) > 0.99  # the same model; chunks see a halo of the Potts model's context
    assert not (tmp_path / "l.nii.gz.jule3d-work").exists()
    whole = segment_file(trained["image"], tmp_path / "w.npy", model=trained["model"], **QUIET, **TINY)
    np.testing.assert_array_equal(np.load(whole), reference)  # small enough: exactly the in-memory method


def test_pass_b_then_pass_c_label_a_block_as_every_pass_at_once(trained) -> None:
    """Pass B runs the refinement's first pass (``label_block(..., passes=1)``), pass C the second on what the
    first wrote (``refine_block``): on a block of the whole volume, the labels of every pass at once."""
    from jule3d.clustering import block_distances, label_block, refine_block
    from jule3d.grid import Grid

    segmenter = trained["segmenter"]
    volume = open_volume(trained["image"], in_memory_voxels=0, announce=lambda message: None)
    layout = Grid(volume.shape, segmenter.models_[0].config.patch_size, segmenter.stride)
    model = chunked.fit_sample(segmenter, volume, layout)
    assert len(model.refine) == 2
    block, owned = chunked._block(volume, layout, (0, 0, 0), layout.grid_shape)
    assert owned == tuple(slice(0, n) for n in volume.shape)
    block.features = chunked._features(block, segmenter.models_, model.networks, layout.stride, "cpu")
    distances, spacing = block_distances(model, block), volume.geometry.spacing_zyx
    first = label_block(model, block, distances, spacing, passes=1)
    assert first.shape == volume.shape and np.array_equal(first >= 0, block.kept)
    both = label_block(model, block, distances, spacing)
    assert not np.array_equal(first, both)  # the second pass moves some voxels
    np.testing.assert_array_equal(refine_block(model.refine[1:], block, first, spacing), both)


def test_dask_local_cluster_gives_the_single_process_labels(trained, tmp_path: Path) -> None:
    options = dict(model=trained["model"], in_memory_voxels=0, chunk=6, **QUIET, **TINY)
    single = segment_file(trained["image"], tmp_path / "single.zarr", **options)
    dask = segment_file(trained["image"], tmp_path / "dask.zarr", scheduler="local", **options)
    np.testing.assert_array_equal(read_image(dask)[0], read_image(single)[0])


def test_an_unreachable_scheduler_is_a_clear_error_within_seconds(trained, tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot reach the Dask scheduler"):
        segment_file(trained["image"], tmp_path / "l.nii.gz", model=trained["model"], scheduler="tcp://127.0.0.1:9",
                     **QUIET, **TINY)
    assert time.perf_counter() - start < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_resume_after_sigkill_writes_the_uninterrupted_labels(trained, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "jule3d.app.cli", "segment", str(trained["image"]), "--model",
               str(trained["model"]), "--in-memory-voxels", "0", "--chunk", "3", *TINY_CLI]
    out = tmp_path / "killed.nii.gz"
    work = WorkDir(out)
    proc = subprocess.Popen(command + ["--out", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(work.done("c1")) < 10 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(work.done("c1")) and not out.exists(), "the run must be killed during the second refinement pass"
    again = subprocess.run(command + ["--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # an unfinished run is not silently replaced
    resumed = subprocess.run(command + ["--out", str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not work.path.exists()
    plain = tmp_path / "plain.nii.gz"
    assert subprocess.run(command + ["--out", str(plain)], capture_output=True).returncode == 0
    np.testing.assert_array_equal(read_image(out)[0], read_image(plain)[0])


def test_resume_refuses_a_work_folder_of_another_run(trained, tmp_path: Path) -> None:
    out = tmp_path / "l.nii.gz"
    WorkDir(out).start({"params": {"seed": 7}}, resume=False)
    with pytest.raises(ValueError, match="cannot resume .* other"):
        segment_file(trained["image"], out, model=trained["model"], resume=True, **QUIET, **TINY)


def test_resume_refuses_a_work_folder_the_engine_before_laid_out(trained, tmp_path: Path, monkeypatch) -> None:
    """A folder of the engine before (its manifest without ``work_layout``) holds labels of another meaning."""
    import json

    out = tmp_path / "l.npy"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chunked, "_phase2", killed)
    with pytest.raises(KeyboardInterrupt):
        segment_file(trained["image"], out, model=trained["model"], in_memory_voxels=0, **QUIET, **TINY)
    monkeypatch.undo()
    manifest = WorkDir(out).file(WorkDir.MANIFEST)
    found = json.loads(manifest.read_text())
    assert found.pop("work_layout") == WorkDir.LAYOUT
    manifest.write_text(json.dumps(found))
    with pytest.raises(ValueError, match="cannot resume .* other work_layout"):
        segment_file(trained["image"], out, model=trained["model"], in_memory_voxels=0, resume=True, **QUIET, **TINY)


def test_a_full_disk_removes_the_partial_output_and_keeps_the_input(trained, tmp_path: Path, monkeypatch) -> None:
    before = _digest(trained["image"])

    def full(labels, geometry, target, compress):
        target.write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chunked, "write_nifti", full)
    out = tmp_path / "l.nii.gz"
    with pytest.raises(OSError, match="disk is full .* removed the partial output"):
        segment_file(trained["image"], out, model=trained["model"], in_memory_voxels=0, chunk=8, **QUIET, **TINY)
    assert not out.exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert _digest(trained["image"]) == before
    assert WorkDir(out).done("b")  # the finished chunks are kept for --resume


def test_bad_chunk_and_output_are_refused_before_any_work(trained, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk"):
        segment_file(trained["image"], tmp_path / "l.nii.gz", chunk=0, **QUIET, **TINY)
    with pytest.raises(ValueError, match="unsupported ending"):
        segment_file(trained["image"], tmp_path / "l.png", **QUIET, **TINY)
    with pytest.raises(ValueError, match="one of the inputs"):
        segment_file(trained["image"], trained["image"], overwrite=True, **QUIET, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_chunks_and_patches_in_air_are_skipped(trained, tmp_path: Path) -> None:
    """A specimen with a wide margin of air: whole chunks, halos and candidate patches without foreground."""
    data = read_image(trained["image"])[0]
    padded = np.pad(data, ((0, 0), (0, 0), (0, 60)), constant_values=float(data.min()))
    image = save_volume(Volume.from_array(padded), tmp_path / "wide.npy")
    out = segment_file(image, tmp_path / "l.npy", in_memory_voxels=0, chunk=4, fit_positions=2000, **QUIET, **TINY)
    labels = np.load(out)
    assert labels.shape == padded.shape and not labels[:, :, 52:].any()
    assert {1, 2, 3} <= set(np.unique(labels[:, :, :48]).tolist())


def test_resample_file_gives_the_voxels_of_resample_isotropic(tmp_path: Path, monkeypatch) -> None:
    from jule3d import resample
    from jule3d.app.cli import main
    from jule3d.patches import resample_isotropic

    rng = np.random.default_rng(0)
    array = rng.normal(size=(9, 16, 17)).astype(np.float32)
    geometry = Geometry(shape=array.shape, spacing=(0.4, 0.4, 1.0), origin=(1.0, 2.0, 3.0))
    path = save_volume(Volume.from_array(array), tmp_path / "a.nii", reference=geometry)
    expected = resample_isotropic(load_volume(path, normalize=False, foreground=None))
    monkeypatch.setattr(resample, "SLAB_BYTES", 4 * 16 * 17 * 3)  # three output slices per slab
    for name in ("iso.nii.gz", "iso.npy", "iso.zarr"):
        out = resample.resample_file(path, tmp_path / name)
        data, written = read_image(out)
        np.testing.assert_allclose(data, expected.data[0], atol=1e-5)
        assert written.matches(expected.geometry)
    assert main(["resample", str(path), "--out", str(tmp_path / "iso.nii.gz")]) == 2  # exists
    with pytest.raises(ValueError, match="order"):
        resample.resample_file(path, tmp_path / "x.nii", order=3)
    # a compressed input is converted into a temporary cache, removed at the end
    (tmp_path / "in").mkdir()
    compressed = save_volume(Volume.from_array(array), tmp_path / "in" / "a.nii.gz", reference=geometry)
    assert main(["resample", str(compressed), "--out", str(tmp_path / "from_gz.nii")]) == 0
    np.testing.assert_allclose(read_image(tmp_path / "from_gz.nii")[0], expected.data[0], atol=1e-5)
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*cache*"))
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.nii.gz"]
