"""Shared fixtures: a small synthetic specimen with oblique geometry, the real-data folder, one tiny pipeline run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from jule3d.volume import Geometry, Volume

SHARED_DATA_ENV = "JULE3D_SHARED_DATA"
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    """Rotation about z then about x (a proper, non-identity direction matrix)."""
    a, b = np.deg2rad(z_deg), np.deg2rad(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real volumes (``$JULE3D_SHARED_DATA`` or ``../shared/data``); skips when absent."""
    folder = Path(os.environ.get(SHARED_DATA_ENV, DEFAULT_SHARED_DATA))
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (set {SHARED_DATA_ENV})")
    return folder


# Small enough for a 2-core CI machine; every notebook still runs every cell.
TINY = {
    "phantom_shape": 40,
    "n_patches": 200,
    "epochs_per_period": 1,
    "final_epochs": 1,
    "k_s": 5,
    "max_points": 200,
    "baselines": ["kmeans", "otsu"],
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """One ``run_pipeline`` of all four notebooks with :data:`TINY` parameters, shared by the tests that read it."""
    from jule3d.app.pipeline import run_pipeline

    return run_pipeline(tmp_path_factory.mktemp("tiny") / "run", parameters=TINY, progress=False)


@pytest.fixture
def oblique_geometry() -> Geometry:
    """Geometry of shape (20, 24, 28) with anisotropic spacing, an offset origin and a rotation."""
    return Geometry(
        shape=(20, 24, 28),
        spacing=(0.7, 0.8, 1.5),
        origin=(12.5, -30.25, 7.0),
        direction=tuple(_rotation(30.0, 20.0).ravel()),
    )


@pytest.fixture
def specimen_truth(oblique_geometry: Geometry) -> np.ndarray:
    """Boolean ellipsoid (the specimen) on the grid of ``oblique_geometry``."""
    z, y, x = np.ogrid[tuple(slice(0, s) for s in oblique_geometry.shape)]
    nz, ny, nx = oblique_geometry.shape
    return ((z - nz / 2) / 7.5) ** 2 + ((y - ny / 2) / 9.0) ** 2 + ((x - nx / 2) / 10.5) ** 2 <= 1.0


@pytest.fixture
def specimen_array(specimen_truth: np.ndarray) -> np.ndarray:
    """float32 specimen (two tissues around 100 and 140) in noisy air around 10."""
    rng = np.random.default_rng(0)
    image = rng.normal(10.0, 3.0, specimen_truth.shape)
    tissue = np.where(np.arange(specimen_truth.shape[2]) < specimen_truth.shape[2] // 2, 100.0, 140.0)
    image[specimen_truth] = (tissue + rng.normal(0.0, 5.0, specimen_truth.shape))[specimen_truth]
    return image.astype(np.float32)


@pytest.fixture
def specimen_volume(specimen_array: np.ndarray, oblique_geometry: Geometry) -> Volume:
    """Single-channel :class:`Volume` of ``specimen_array`` (no mask)."""
    return Volume(specimen_array[None], oblique_geometry, channel_names=("ct",))
