"""jule3d: unsupervised segmentation of 3D medical images with JULE-3D.

The public API reads like the method (Moriya et al. 2018, after Yang et al. 2016)::

    import jule3d

    volume = jule3d.load_volume("specimen.nii.gz")             # voxels + geometry + foreground mask
    patches = jule3d.sample_patches(volume, 2000, patch_size=17)
    result = jule3d.train_jule(patches, jule3d.jule_config("fast"))   # Phase 1: CNN + AGDL clustering
    labels = jule3d.label_volume(result.model, volume, n_clusters=3)  # Phase 2: dense features + k-means
    jule3d.save_labels(labels, "labels.nii.gz", reference=volume)

or all at once: ``jule3d.segment("specimen.nii.gz", n_clusters=3)``.

Names are imported lazily (PEP 562), so ``import jule3d`` and the command line start quickly and torch is
loaded only when a model is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    # data model and I/O
    "Geometry": "volume",
    "Volume": "volume",
    "read_image": "io",
    "load_volume": "io",
    "prepare_volume": "io",
    "load_mask": "io",
    "save_volume": "io",
    "save_labels": "io",
    "foreground_mask": "mask",
    "normalize_intensity": "normalize",
    # synthetic data
    "Phantom": "phantom",
    "make_phantom": "phantom",
    "write_phantom": "phantom",
    # Phase 1
    "PatchSet": "patches",
    "sample_patches": "patches",
    "grid_patches": "patches",
    "extract_patches": "patches",
    "resample_isotropic": "patches",
    "NetConfig": "models",
    "JuleNet3D": "models",
    "net_config": "models",
    "knn_affinity": "agdl",
    "cluster_affinity": "agdl",
    "initial_clusters": "agdl",
    "agglomerate": "agdl",
    "JuleConfig": "config",
    "JuleResult": "jule",
    "jule_config": "config",
    "train_jule": "jule",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    # Phase 2 and evaluation
    "grid_features": "segmentation",
    "label_volume": "segmentation",
    "segment": "estimator",
    "JuleSegmenter": "estimator",
    "evaluate": "metrics",
    "run_baseline": "baselines",
    "compare_methods": "evaluation",
    "embed": "embedding",
    # notebooks
    "RunDir": "app.rundir",
    "run_pipeline": "app.pipeline",
    "run_batch": "app.batch",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jule3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
