"""The run folder shared by the pipeline notebooks: where each stage reads its inputs and writes its results.

Notebook 01 records the inputs (volume files, mask, ground truth) in ``inputs.json``; every later notebook
reloads them from there, so one ``run_dir`` parameter is all a notebook needs to pick up the run.

A relative ``run_dir`` names the same folder for ``jule3d run`` and for a notebook opened in JupyterLab
(:func:`resolve_run_dir`), and ``run.json`` records the jule3d version that wrote the folder, so a folder
from another version is refused with a message instead of failing somewhere inside a notebook.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..volume import Volume

__all__ = ["Inputs", "RunDir", "RunFolderVersionError", "resolve_run_dir"]


class RunFolderVersionError(ValueError):
    """The run folder was written by another jule3d version (or one that recorded none)."""


def resolve_run_dir(path: str | os.PathLike) -> Path:
    """The absolute run folder that ``path`` names.

    A relative path is taken relative to the current folder, except when the current folder holds the
    pipeline notebooks: a notebook opened in JupyterLab runs in its own folder, so there the path is taken
    relative to the folder above it. ``jule3d run --out runs/demo`` in a project folder and notebook 04 with
    ``run_dir="runs/demo"`` opened from that project's ``notebooks/`` then use the same run folder.

    Parameters
    ----------
    path : path
        The ``run_dir`` parameter or ``--out`` argument.

    Examples
    --------
    >>> resolve_run_dir("/data/runs/demo").as_posix()
    '/data/runs/demo'
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    base = Path.cwd()
    from .pipeline import NOTEBOOK_PATTERN, notebook_dir

    shipped = {p.name for p in notebook_dir().glob(NOTEBOOK_PATTERN)}
    if shipped & {p.name for p in base.glob(NOTEBOOK_PATTERN)}:
        base = base.parent
    return base / path


@dataclass
class Inputs:
    """The volume of a run, its ground truth (if any) and the files they came from."""

    volume: Volume
    ground_truth: np.ndarray | None
    volume_paths: list[str]
    mask_path: str
    ground_truth_path: str
    is_phantom: bool

    @property
    def evaluation_mask(self) -> np.ndarray | None:
        """Voxels on which metrics are computed: the foreground, within labelled voxels for a phantom."""
        if self.ground_truth is None:
            return None
        if self.is_phantom:
            return self.ground_truth > 0
        return self.volume.foreground()


def _as_paths(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value if str(v)]


class RunDir:
    """Standard file names inside one run folder.

    Parameters
    ----------
    path : path
        The run folder (created on first write).
    """

    MANIFEST = "run.json"
    INPUTS = "inputs.json"
    PATCHES = "patches.npz"
    MODEL = "model.pt"
    CLUSTERS = "clusters.npz"
    HISTORY = "history.json"
    CHECKPOINTS = "checkpoints"
    EMBEDDING = "embedding.npz"
    LABELS = "labels.nii.gz"
    METRICS = "metrics.json"
    PHANTOM = "phantom.nii.gz"
    PHANTOM_LABELS = "phantom_labels.nii.gz"
    TIMINGS = "timings.json"
    FIGURES = "figures"
    PARAMS = "params.yaml"
    REPORT = "report.html"
    EXECUTED = "notebooks"
    STATUS = "status.json"
    TUNED_PARAMS = "tuned_params.yaml"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_run_dir(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """Path of a file in the run folder (the folder is created if needed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / name

    def write_manifest(self) -> None:
        """Record the jule3d version that writes this run folder (``run.json``)."""
        from .. import __version__

        _write_json(self.file(self.MANIFEST), {"jule3d_version": __version__})

    def check_version(self) -> None:
        """Refuse a run folder written by another jule3d version.

        Raises
        ------
        RunFolderVersionError
            When ``run.json`` is missing (versions before 0.2 wrote none) or names another major.minor
            version; the message says how to redo the run.
        """
        from .. import __version__

        path = self.path / self.MANIFEST
        recorded = json.loads(path.read_text(encoding="utf-8")).get("jule3d_version") if path.is_file() else None
        if recorded is None or recorded.split(".")[:2] != __version__.split(".")[:2]:
            made_by = f"jule3d {recorded}" if recorded else "a jule3d version older than 0.2"
            raise RunFolderVersionError(
                f"run folder {self.path} was written by {made_by}; this is jule3d {__version__}, whose files "
                f"differ. Redo the run into a new folder, or replace it: jule3d run --out {self.path} --overwrite"
            )

    def model_file(self, index: int) -> str:
        """File name of network ``index`` of the run: ``model.pt`` for the first, ``model_<i>.pt`` after it."""
        return self.MODEL if index == 0 else self.MODEL.replace(".pt", f"_{index}.pt")

    def save_training(self, results: Sequence) -> list[Path]:
        """Write Phase 1's results: every network, the first one's clusters and features, every history.

        ``history.json`` holds the first network's configuration, the number of networks and one record per
        period of every network (with its ``network`` index), so the run's training seconds are their sum.
        Returns the files written.
        """
        from ..checkpoint import save_model

        for i, result in enumerate(results):
            save_model(result, self.file(self.model_file(i)), overwrite=True)
        extra = len(results)  # networks left from an earlier run with more of them
        while (self.path / self.model_file(extra)).exists():
            (self.path / self.model_file(extra)).unlink()
            extra += 1
        np.savez_compressed(self.file(self.CLUSTERS), labels=results[0].labels, features=results[0].features)
        history = [dict(record, network=i) for i, r in enumerate(results) for record in r.history]
        _write_json(self.file(self.HISTORY), {"config": results[0].config.to_dict(), "n_networks": len(results),
                                              "history": history})
        return [self.path / self.model_file(i) for i in range(len(results))] + [
            self.path / self.CLUSTERS, self.path / self.HISTORY]

    def load_models(self) -> list:
        """The run's trained networks, in order (written by :meth:`save_training`)."""
        from ..checkpoint import load_model

        paths = [self.require(self.MODEL, "notebook 02_jule_training")]
        while (self.path / self.model_file(len(paths))).exists():
            paths.append(self.path / self.model_file(len(paths)))
        return [load_model(p) for p in paths]

    def load_clusters(self) -> np.ndarray:
        """The first network's final JULE cluster of every training patch (written by :meth:`save_training`)."""
        with np.load(self.require(self.CLUSTERS, "notebook 02_jule_training")) as data:
            return data["labels"]

    def training_seconds(self) -> float:
        """Seconds of Phase 1: the sum over every period of every network (``history.json``)."""
        history = json.loads(self.require(self.HISTORY, "notebook 02_jule_training").read_text(encoding="utf-8"))
        return float(sum(record["seconds"] for record in history["history"]))

    def save_patches(self, patches) -> Path:
        """Write the first network's training patches (``patches.npz``), replacing earlier ones of this run."""
        return patches.save(self.file(self.PATCHES), overwrite=True)

    def load_patches(self, required: bool = True):
        """The patches :meth:`save_patches` wrote; ``None`` when there are none and ``required`` is false."""
        from ..patches import PatchSet

        if not required and not (self.path / self.PATCHES).exists():
            return None
        return PatchSet.load(self.require(self.PATCHES, "notebook 01_patch_sampling"))

    def save_embedding(self, **arrays: np.ndarray) -> Path:
        """Write notebook 03's 2D embeddings and the indices of the embedded patches (``embedding.npz``)."""
        path = self.file(self.EMBEDDING)
        np.savez_compressed(path, **arrays)
        return path

    def save_labels(self, labels: np.ndarray, volume: Volume) -> Path:
        """Write the label map (``labels.nii.gz``) with the geometry of ``volume``."""
        from ..io import save_labels

        return save_labels(labels, self.file(self.LABELS), reference=volume, overwrite=True)

    def save_metrics(
        self,
        labels: np.ndarray,
        volume: Volume,
        seconds: float,
        peak_mb: float,
        settings: dict,
        results: Sequence = (),
    ) -> Path:
        """Write notebook 04's record (``metrics.json``).

        Parameters
        ----------
        labels : numpy.ndarray
            The segmentation.
        volume : Volume
            Its volume (for class volumes in mm³).
        seconds, peak_mb : float
            Cost of Phase 2.
        settings : dict
            The Phase 2 settings (``n_clusters``, ``stride``, ...).
        results : sequence of MethodResult
            Scores of every method against a ground truth (:func:`jule3d.evaluation.compare_methods`), with
            ``jule3d`` among them; empty without a ground truth.
        """
        from ..evaluation import class_volumes

        methods = {r.method: {**r.row(), "dice_per_class": r.metrics["dice_per_class"]} for r in results}
        record = {**settings, "seconds": seconds, "peak_mb": peak_mb,
                  "class_volumes_mm3": {k: v["mm3"] for k, v in class_volumes(labels, volume).items()},
                  "methods": methods}
        if "jule3d" in methods:
            record["jule3d"] = {k: methods["jule3d"][k] for k in ("nmi", "nmi_geometric", "ari", "dice_mean")}
        return _write_json(self.file(self.METRICS), record)

    def load_metrics(self) -> dict | None:
        """The metrics record of the run, ``None`` before notebook 04 wrote one."""
        path = self.path / self.METRICS
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @staticmethod
    def jule3d_scores(record: dict | None) -> dict:
        """JULE-3D's scores against the ground truth (``nmi``, ``ari``, ...) in a :meth:`load_metrics` record;
        empty without a ground truth or a record."""
        return dict((record or {}).get("jule3d", {}))

    def save_timings(self, rows: list[dict]) -> Path:
        """Write the pipeline's seconds per notebook (``timings.json``)."""
        return _write_json(self.file(self.TIMINGS), rows)

    def require(self, name: str, produced_by: str) -> Path:
        """Path of a file an earlier notebook must have written; a clear error when it is missing."""
        path = self.path / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: run {produced_by} with run_dir={str(self.path)!r} first"
            )
        return path

    def prepare_inputs(
        self,
        volume_path: str | Sequence[str] = "",
        mask_path: str = "",
        ground_truth_path: str = "",
        phantom_shape: int = 96,
        phantom_variant: str = "texture",
        n_classes: int = 3,
        seed: int = 0,
    ) -> Inputs:
        """Load (or, with no ``volume_path``, generate the texture phantom) and record the inputs.

        Parameters
        ----------
        volume_path : str or sequence of str
            Volume file(s); several files are channels. Empty: the bundled texture phantom, written
            into the run folder with its ground truth.
        mask_path : str
            Foreground mask file; empty for the automatic mask.
        ground_truth_path : str
            Optional label map of the same geometry, for evaluation only.
        phantom_shape : int
            Side of the phantom cube (voxels), when it is used.
        phantom_variant : str
            ``"texture"`` (classes differ in texture only), ``"intensity"`` or ``"lung"`` (see
            :func:`jule3d.phantom.make_phantom`).
        n_classes : int
            Tissue classes of the phantom.
        seed : int
            Seed of the phantom.
        """
        from ..phantom import write_phantom

        paths = _as_paths(volume_path)
        is_phantom = not paths
        phantom = dict(shape=phantom_shape, variant=phantom_variant, n_classes=n_classes, seed=seed)
        if is_phantom:
            if ground_truth_path:
                raise ValueError("ground_truth_path is given but volume_path is empty (the phantom has its own)")
            image, labels = self.path / self.PHANTOM, self.path / self.PHANTOM_LABELS
            # reuse the phantom files only when they were made with the same parameters
            if not (image.exists() and labels.exists() and self._recorded().get("phantom") == phantom):
                self.path.mkdir(parents=True, exist_ok=True)
                write_phantom(image, labels, shape=(phantom_shape,) * 3, n_classes=n_classes,
                              variant=phantom_variant, seed=seed, overwrite=True)
            paths, ground_truth_path = [str(image)], str(labels)
        record = dict(volume_paths=[str(Path(p).resolve()) for p in paths],
                      mask_path=str(Path(mask_path).resolve()) if mask_path else "",
                      ground_truth_path=str(Path(ground_truth_path).resolve()) if ground_truth_path else "",
                      is_phantom=is_phantom)
        if is_phantom:
            record["phantom"] = phantom
        inputs = self._load(record)
        self.write_manifest()
        _write_json(self.file(self.INPUTS), record)
        return inputs

    def _recorded(self) -> dict:
        """The record in ``inputs.json``, empty when there is none yet."""
        path = self.path / self.INPUTS
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def load_inputs(self) -> Inputs:
        """Reload the inputs recorded by notebook 01 (after checking the folder's jule3d version)."""
        inputs = self.require(self.INPUTS, "notebook 01_patch_sampling")
        self.check_version()
        return self._load(json.loads(inputs.read_text(encoding="utf-8")))

    @staticmethod
    def _load(record: dict) -> Inputs:
        from ..io import load_volume, read_on_grid

        volume = load_volume(record["volume_paths"], mask=record["mask_path"] or None)
        truth = None
        if record["ground_truth_path"]:
            truth = read_on_grid(record["ground_truth_path"], volume, what="ground_truth_path").astype(np.int32)
        return Inputs(volume=volume, ground_truth=truth, volume_paths=record["volume_paths"],
                      mask_path=record["mask_path"], ground_truth_path=record["ground_truth_path"],
                      is_phantom=bool(record["is_phantom"]))


def _write_json(path: Path, record: object) -> Path:
    """Write ``record`` as UTF-8 JSON atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
    return path
