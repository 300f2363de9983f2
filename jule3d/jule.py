"""JULE: joint training of the 3D CNN and AGDL agglomerative clustering on patches (Phase 1).

The recurrent process follows the JULE reference code (``jwyang/JULE.torch``, ``train.lua``) and
``docs/method.md``:

1. Period 0: features ``F`` = L2-normalised raw patches (or, [ours], another descriptor chosen by
   :attr:`JuleConfig.raw_features`); ``W = knn_affinity(F, k_s)``; the initial
   clusters follow each sample's nearest neighbour (:func:`jule3d.agdl.initial_clusters`); the CNN is
   trained ``epochs_per_period`` epochs on those labels.
2. Each later period: features from the CNN (eval mode, batched, no gradient); ``W`` rebuilt on them
   ([ours] beside the period-0 features, with the share :attr:`JuleConfig.anchor`);
   ``T = unfolding_merges(n_c, eta, n_clusters)`` AGDL merges; if ``n_c`` is still above the target,
   the CNN is trained ``epochs_per_period`` epochs on the new labels. The loop stops when
   ``n_c <= n_clusters`` (after ``max_periods`` periods the last one merges straight to the target;
   [ours] :attr:`JuleConfig.stop_clusters` can stop it earlier).
3. Final update (Moriya 2018): the CNN is trained ``final_epochs`` more epochs on the final labels,
   and the final features are computed.

Minibatches (``train.lua``, ``updateCNN``): each epoch is a fresh random permutation of all patches cut
into batches of ``batch_size``. In a batch every same-cluster pair ``(a, p)``, ``a`` before ``p``, is
an anchor-positive pair and gets ``min(n_negatives, #other-cluster samples in the batch)`` distinct
negatives drawn uniformly from the batch (``organize_samples``; the reference loops per triplet, here
it is one top-k over random keys). The weighted triplet loss (``criterions/TripletEmbedding.lua``) is
``mean over triplets of max(0, gamma·‖f_a − f_p‖² − ‖f_a − f_n‖² + margin)``. A batch without any
same-cluster pair has no loss: it is skipped (no forward pass, no optimiser step) but still counts
as an iteration of the learning-rate schedule, as in the reference.

Optimiser: SGD with momentum 0.9, *dampening* 0.9 (Lua ``optim.sgd`` defaults the dampening to the
momentum, which torch's SGD does not), weight decay 5e-5 on every parameter, learning rate
``lr · (1 + lr_gamma · it) ** -lr_power`` with ``it`` the global batch counter (``train.lua``'s
"inv" policy).

Known failure on texture data (``docs/method.md`` has the measurements, from
``benchmarks/bench_phantom_jule.py``): once clusters grow past ``k_s`` members, the CNN trained on them maps
each cluster to a tight ball, so the rebuilt kNN graph has almost no edges between clusters. AGDL's affinities
then rest on a handful of edges and small clusters are absorbed by the largest one; sometimes it swallows
everything in one period. Slower unfolding (small ``eta``) and ``gamma = 1`` give the CNN more chances to
memorise the clusters and make this more frequent.

Checkpoints (``checkpoint_dir``) are written after every period and after the final update; they hold
only tensors and plain containers so they load with ``torch.load(weights_only=True)``. Resuming
restores the model, optimiser, iteration counter, labels, history and sampling RNG, so a resumed run
ends with exactly the same labels and weights as an uninterrupted one (on the CPU).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from jule3d import agdl
from jule3d.allocator import retained_heap
from jule3d.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    load_checkpoint,
    write_atomic,
)
from jule3d.config import RAW_FEATURES, JuleConfig
from jule3d.loss import sample_triplets, weighted_triplet_loss
from jule3d.metrics import nmi
from jule3d.models import JuleNet3D

__all__ = ["JuleResult", "period0_features", "train_jule"]

# fields that do not change the result, left out of the checkpoint fingerprint
_NON_RESULT_FIELDS = ("device", "feature_batch_size")


@dataclass
class JuleResult:
    """Output of :func:`train_jule`.

    Attributes
    ----------
    model : JuleNet3D
        The trained network (eval mode, on the training device).
    labels : numpy.ndarray
        ``(N,)`` int64 cluster of each patch, ``0..c-1``.
    history : list of dict
        One record per period, then one for the final update (``stage == "final"``): ``period``,
        ``stage`` (``"period"`` / ``"final"``), ``n_clusters``, ``loss`` (mean over the period's
        triplets; NaN when there was none), ``n_triplets``, ``iteration`` (batches so far), ``lr``,
        ``seconds``, and ``nmi`` (arithmetic-mean NMI of the labels against ``ground_truth``, when given).
    config : JuleConfig
    features : numpy.ndarray
        ``(N, D)`` float32 final features of the patches.

    Examples
    --------
    With no CNN epochs (``epochs_per_period=0, final_epochs=0``) only the clustering runs:

    >>> from jule3d.config import jule_config
    >>> from jule3d.jule import train_jule
    >>> from jule3d.patches import sample_patches
    >>> from jule3d.phantom import make_phantom
    >>> patches = sample_patches(make_phantom(shape=(24, 24, 24), seed=0).volume, 40, patch_size=13)
    >>> config = jule_config("fast", epochs_per_period=0, final_epochs=0, k_s=3,
    ...                      net_overrides={"n_filters": 4, "feature_dim": 8})
    >>> result = train_jule(patches, config, progress=False)
    >>> result.features.shape, result.features.dtype, result.labels.shape, result.labels.dtype
    ((40, 8), dtype('float32'), (40,), dtype('int64'))
    >>> result.config is config, result.model.training, len(set(result.labels.tolist())) == config.merge_target
    (True, False, True)
    """

    model: JuleNet3D
    labels: np.ndarray
    history: list[dict[str, Any]]
    config: JuleConfig
    features: np.ndarray




# --------------------------------------------------------------------------------------------------
# input handling


def _patch_array(patches: Any) -> np.ndarray:
    """The ``(N, C, w, w, w)`` float32 array of a PatchSet or array, validated."""
    array = np.asarray(getattr(patches, "patches", patches))
    if array.ndim != 5 or len(set(array.shape[2:])) != 1:
        raise ValueError(f"patches must be a PatchSet or an (N, C, w, w, w) array, got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"patches must hold at least 2 patches, got {array.shape[0]}")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise ValueError("patches must be finite numbers (found NaN/inf or a non-numeric dtype)")
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_against_data(config: JuleConfig, n: int) -> None:
    if config.n_clusters > n:
        raise ValueError(f"JuleConfig.n_clusters={config.n_clusters} exceeds the number of patches ({n})")
    if config.k_s >= n:
        raise ValueError(f"JuleConfig.k_s={config.k_s} must be smaller than the number of patches ({n})")


def _ground_truth(ground_truth: Any, n: int) -> np.ndarray | None:
    if ground_truth is None:
        return None
    gt = np.asarray(ground_truth).reshape(-1)
    if gt.shape != (n,):
        raise ValueError(f"ground_truth must hold one label per patch ({n}), got shape {np.shape(ground_truth)}")
    return gt


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


#: The ``kind`` of :func:`period0_features` (every :attr:`JuleConfig.raw_features` but ``"untrained"``).
PERIOD0_KINDS: tuple[str, ...] = tuple(kind for kind in RAW_FEATURES if kind != "untrained")


def period0_features(patches: np.ndarray, kind: str = "l2", chunk: int = 1024) -> np.ndarray:
    """Period-0 features of patches computed from their voxels (see :attr:`JuleConfig.raw_features`).

    Parameters
    ----------
    patches : numpy.ndarray
        ``(N, C, w, w, w)`` patches.
    kind : {"l2", "standardize", "spectrum", "spectrum+mean"}
        ``"l2"``: the flattened patch, L2-normalised [jule]. ``"standardize"``: zero mean and unit
        variance per patch (all channels together), then L2 [ours]. ``"spectrum"``: the amplitude of
        the 3D real FFT of each standardised channel, L2-normalised [ours]. ``"spectrum+mean"`` [ours]:
        the spectra, centred over the patches and scaled to a mean squared norm of 1, beside each
        channel's patch mean, centred and divided by ``sqrt(C)`` but not re-standardised. The patches
        come from a volume normalised to unit voxel variance, so the mean block's variance is the share
        of the voxel variance that survives averaging over a patch: it weighs as much as brightness
        varies at the scale of a patch (as in :func:`jule3d.segmentation.joint_features`), little
        where every class has the same intensity distribution.
    chunk : int
        Patches per FFT call (bounds the memory of ``"spectrum"``).

    Returns
    -------
    numpy.ndarray
        ``(N, F)`` float32 rows, of unit norm (zero rows stay zero) but for ``"spectrum+mean"``.

    Raises
    ------
    ValueError
        If ``patches`` is not 5-D or ``kind`` is not one of these three.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.jule import period0_features
    >>> patches = np.random.default_rng(0).normal(size=(40, 1, 9, 9, 9)).astype(np.float32)
    >>> period0_features(patches, "l2").shape, period0_features(patches, "spectrum").shape
    ((40, 729), (40, 405))
    >>> features = period0_features(patches, "standardize")
    >>> features.dtype, round(float(np.linalg.norm(features, axis=1).min()), 3)
    (dtype('float32'), 1.0)
    """
    x = np.asarray(patches, dtype=np.float32)
    if x.ndim != 5:
        raise ValueError(f"patches must be an (N, C, w, w, w) array, got shape {x.shape}")
    if kind not in PERIOD0_KINDS:
        raise ValueError(f"kind must be one of {PERIOD0_KINDS}, got {kind!r}")
    flat = x.reshape(x.shape[0], -1)
    if kind == "l2":
        return _l2_rows(flat)
    flat = flat - flat.mean(axis=1, keepdims=True)
    flat = flat / np.maximum(flat.std(axis=1, keepdims=True), 1e-12)
    if kind == "standardize":
        return _l2_rows(flat)
    cubes = flat.reshape(x.shape)
    parts = [
        np.abs(np.fft.rfftn(cubes[i : i + chunk], axes=(2, 3, 4))).reshape(min(chunk, len(x) - i), -1)
        for i in range(0, len(x), chunk)
    ]
    spectra = _l2_rows(np.concatenate(parts).astype(np.float32))
    if kind == "spectrum":
        return spectra
    centred = spectra - spectra.mean(axis=0)
    spread = float(np.sqrt(np.mean(np.einsum("ij,ij->i", centred, centred))))
    means = x.mean(axis=(2, 3, 4))
    return np.concatenate([centred / max(spread, 1e-12), (means - means.mean(axis=0)) / np.sqrt(x.shape[1])],
                          axis=1).astype(np.float32)


def _fingerprint(config: JuleConfig, data: np.ndarray) -> dict[str, Any]:
    """What a checkpoint must agree on: the result-relevant config and the patch set."""
    flat = data.reshape(-1)
    step = max(1, flat.size // (1 << 20))
    digest = hashlib.blake2b(np.ascontiguousarray(flat[::step]).tobytes(), digest_size=16)
    digest.update(str(data.shape).encode())
    cfg = {k: v for k, v in config.to_dict().items() if k not in _NON_RESULT_FIELDS}
    return {"config": cfg, "patch_shape": list(data.shape), "patch_hash": digest.hexdigest()}


# --------------------------------------------------------------------------------------------------
# the CNN trainer


class _Trainer:
    """Model, optimiser, sampling RNG and iteration counter of one JULE run."""

    def __init__(self, data: np.ndarray, config: JuleConfig, device: torch.device) -> None:
        self.data = torch.from_numpy(data)
        self.config = config
        self.device = device
        self.memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
        net = config.network_config(in_channels=data.shape[1], patch_size=data.shape[2])
        self.model = JuleNet3D(net, seed=config.seed).to(device, memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            dampening=config.dampening,
            weight_decay=config.weight_decay,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0

    def learning_rate(self, iteration: int) -> float:
        """The "inv" schedule of the JULE reference code."""
        cfg = self.config
        return cfg.lr * (1.0 + cfg.lr_gamma * iteration) ** (-cfg.lr_power)

    def train_epochs(self, labels: np.ndarray, n_epochs: int, on_epoch: Callable[[float], None]) -> tuple[float, int]:
        """Train ``n_epochs`` epochs on ``labels``; return (mean loss over triplets, triplet count).

        Raises
        ------
        FloatingPointError
            If the loss or a parameter stops being finite.
        """
        cfg = self.config
        labels_t = torch.as_tensor(labels, dtype=torch.int64)
        n = labels_t.numel()
        total, count = 0.0, 0
        self.model.train()
        for _ in range(n_epochs):
            for batch in torch.randperm(n, generator=self.generator).split(cfg.batch_size):
                iteration = self.iteration
                self.iteration += 1
                a, p, q = sample_triplets(labels_t[batch], cfg.n_negatives, self.generator)
                if a.numel() == 0:
                    continue
                loss = self._step(batch, a, p, q, iteration)
                total += loss * a.numel()
                count += a.numel()
            on_epoch(total / count if count else math.nan)
        self._check_parameters()
        return (total / count if count else math.nan), count

    def _step(self, batch: torch.Tensor, a: torch.Tensor, p: torch.Tensor, q: torch.Tensor, iteration: int) -> float:
        lr = self.learning_rate(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = self.data[batch].to(self.device).contiguous(memory_format=self.memory_format)
        dev = self.device
        loss = weighted_triplet_loss(
            self.model(x), a.to(dev), p.to(dev), q.to(dev), gamma=self.config.gamma, margin=self.config.margin
        )
        value = float(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the triplet loss became {value} at iteration {iteration} (lr={lr:.3g}); "
                "training stopped (try a smaller JuleConfig.lr)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value

    def _check_parameters(self) -> None:
        for name, param in self.model.named_parameters():
            if not torch.isfinite(param).all():
                raise FloatingPointError(
                    f"parameter {name} is no longer finite after iteration {self.iteration}; "
                    "training stopped (try a smaller JuleConfig.lr)"
                )

    def features(self) -> np.ndarray:
        """Eval-mode CNN features of all patches.

        Raises
        ------
        FloatingPointError
            If a feature is not finite.
        """
        feats = self.model.embed(
            self.data,
            batch_size=self.config.feature_batch_size,
            device=self.device,
            channels_last=self.config.channels_last,
        )
        if not np.isfinite(feats).all():
            raise FloatingPointError("the CNN produced non-finite features; training stopped")
        return feats

    def state(self) -> dict[str, Any]:
        """Checkpointable state (tensors and plain containers only)."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "rng": self.generator.get_state(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.generator.set_state(state["rng"])


# --------------------------------------------------------------------------------------------------
# checkpoints




# --------------------------------------------------------------------------------------------------
# the recurrent process


@dataclass
class _RunState:
    """Where a JULE run stands between periods."""

    period: int
    stage: str  # "period" (merging goes on) or "done" (final update finished)
    labels: np.ndarray
    history: list[dict[str, Any]]


class _Run:
    """One call of :func:`train_jule`: data, trainer, bookkeeping and checkpoints."""

    def __init__(
        self,
        data: np.ndarray,
        config: JuleConfig,
        ground_truth: np.ndarray | None,
        checkpoint: Path | None,
        bar: Any,
        callback: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.data = data
        self.config = config
        self.ground_truth = ground_truth
        self.checkpoint = checkpoint
        self.bar = bar
        self.callback = callback
        self.trainer = _Trainer(data, config, _resolve_device(config.device))
        self.fingerprint = _fingerprint(config, data)
        self._anchor: agdl.FixedBlock | None = None

    def affinity(self, features: np.ndarray) -> Any:
        return agdl.knn_affinity(features, self.config.k_s, approximate=self.config.approximate_knn)

    def period0(self) -> np.ndarray:
        """The patches' period-0 features from their voxels (:func:`period0_features`). Where later merges are
        anchored to them, their block is kept, so they are computed once a run (once more after a resume)."""
        features = period0_features(self.data, self.config.raw_features)
        if self.config.anchor > 0:
            self._anchor = agdl.FixedBlock(math.sqrt(self.config.anchor) * _l2_rows(features))
        return features

    def merge_affinity(self) -> Any:
        """``W`` of a later period: on the CNN's features, or on them beside the period-0 ones
        (:attr:`JuleConfig.anchor`)."""
        features = self.trainer.features()
        share = self.config.anchor
        if share == 0:
            return self.affinity(features)
        if self._anchor is None:  # resumed after period 0
            self.period0()
        learnt = math.sqrt(1 - share) * _l2_rows(features)
        return self._anchor.knn_affinity(learnt, self.config.k_s, approximate=self.config.approximate_knn)

    def start(self) -> _RunState:
        """Period 0: raw-patch features, initial clusters, first training."""
        t0 = time.perf_counter()
        raw = self.trainer.features() if self.config.raw_features == "untrained" else self.period0()
        labels = np.asarray(agdl.initial_clusters(self.affinity(raw)), dtype=np.int64)
        state = _RunState(period=0, stage="period", labels=labels, history=[])
        if _n_clusters(labels) > self.config.merge_target:
            self.train_and_record(state, "period", self.config.epochs_per_period, t0)
        return state

    def next_period(self, state: _RunState) -> bool:
        """Merge once more; train unless the target is reached. Returns whether merging goes on."""
        t0 = time.perf_counter()
        cfg = self.config
        period = state.period + 1
        n_c = _n_clusters(state.labels)
        if period >= cfg.max_periods:
            n_merges = n_c - cfg.merge_target
        else:
            n_merges = agdl.unfolding_merges(n_c, cfg.eta, cfg.merge_target)
        W = self.merge_affinity()
        labels = agdl.agglomerate(W, state.labels, cfg.merge_target, n_merges=n_merges, K_c=cfg.k_c, lam=cfg.lam)
        state.period, state.labels = period, np.asarray(labels, dtype=np.int64)
        if _n_clusters(state.labels) <= cfg.merge_target:
            return False
        self.train_and_record(state, "period", cfg.epochs_per_period, t0)
        return True

    def finish(self, state: _RunState) -> None:
        """The final update on the final labels."""
        self.train_and_record(state, "final", self.config.final_epochs, time.perf_counter())
        state.stage = "done"
        self.save(state)

    def train_and_record(self, state: _RunState, stage: str, n_epochs: int, t0: float) -> None:
        n_c = _n_clusters(state.labels)

        def on_epoch(loss: float) -> None:
            self.bar.update(1)
            self.bar.set_postfix(period=state.period, clusters=n_c, loss=f"{loss:.4f}")

        loss, n_triplets = self.trainer.train_epochs(state.labels, n_epochs, on_epoch)
        record: dict[str, Any] = {
            "period": state.period,
            "stage": stage,
            "n_clusters": n_c,
            "loss": loss,
            "n_triplets": n_triplets,
            "iteration": self.trainer.iteration,
            "lr": self.trainer.learning_rate(self.trainer.iteration),
            "seconds": time.perf_counter() - t0,
        }
        if self.ground_truth is not None:
            record["nmi"] = nmi(self.ground_truth, state.labels)
        state.history.append(record)
        if stage == "period":
            self.save(state)
        if self.callback is not None:
            self.callback(dict(record))

    def save(self, state: _RunState) -> None:
        if self.checkpoint is None:
            return
        write_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "trainer": self.trainer.state(),
                "labels": torch.from_numpy(state.labels),
                "history": state.history,
                "period": state.period,
                "stage": state.stage,
                "fingerprint": self.fingerprint,
            },
            self.checkpoint,
        )

    def restore(self) -> _RunState:
        ckpt = load_checkpoint(self.checkpoint, self.fingerprint)
        try:
            self.trainer.load_state(ckpt["trainer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint {self.checkpoint} is corrupt: {exc}") from exc
        labels = ckpt["labels"].numpy().astype(np.int64)
        if labels.shape != (self.data.shape[0],):
            raise ValueError(f"checkpoint {self.checkpoint} is corrupt: labels of shape {labels.shape}")
        return _RunState(int(ckpt["period"]), str(ckpt["stage"]), labels, list(ckpt["history"]))


def _n_clusters(labels: np.ndarray) -> int:
    return int(np.unique(labels).size)


def _checkpoint_path(checkpoint_dir: str | os.PathLike | None, resume: bool) -> Path | None:
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs a checkpoint_dir")
        return None
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint_dir {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_NAME
    if path.exists() and not resume:
        raise FileExistsError(
            f"{path} already exists: pass resume=True to continue that run, or use another checkpoint_dir"
        )
    return path


@retained_heap()
def train_jule(
    patches: Any,
    config: JuleConfig | None = None,
    ground_truth: np.ndarray | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> JuleResult:
    """Learn CNN features and clusters of patches with JULE (see the module docstring).

    Parameters
    ----------
    patches : PatchSet or numpy.ndarray
        A :class:`jule3d.patches.PatchSet` or an ``(N, C, w, w, w)`` array of patches.
    config : JuleConfig, optional
        Hyperparameters; default ``JuleConfig()`` (the paper's). ``in_channels`` and ``patch_size`` of
        the network come from the patches.
    ground_truth : numpy.ndarray, optional
        ``(N,)`` true class of each patch; when given, each history record holds the NMI.
    checkpoint_dir : path, optional
        Folder for ``jule_checkpoint.pt``, rewritten after every period and after the final update.
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` (start afresh when there is none). The result
        is identical to that of an uninterrupted run with the same config on the CPU.
    progress : bool
        Show a tqdm progress bar (epochs, with period, cluster count and loss).
    callback : callable, optional
        Called with a copy of each history record as it is added.

    Returns
    -------
    JuleResult

    Raises
    ------
    ValueError
        Bad patches, ground truth or config for these patches; a checkpoint from another configuration
        or patch set, or a corrupt one (the message names the file).
    FileExistsError
        If ``checkpoint_dir`` already holds a checkpoint and ``resume`` is false.
    FloatingPointError
        If the loss, a parameter or a feature stops being finite; the last checkpoint (written before
        the failing period) is kept.

    Examples
    --------
    A tiny run: 40 patches of 13³, a 4-filter network, one epoch per period and one final epoch:

    >>> import tempfile
    >>> from jule3d.config import jule_config
    >>> from jule3d.jule import train_jule
    >>> from jule3d.patches import sample_patches
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> patches = sample_patches(phantom.volume, 40, patch_size=13, seed=0, labels=phantom.labels)
    >>> config = jule_config("fast", epochs_per_period=1, final_epochs=1, k_s=3,
    ...                      net_overrides={"n_filters": 4, "feature_dim": 8})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     result = train_jule(patches, config, ground_truth=patches.labels, checkpoint_dir=tmp,
    ...                         progress=False)
    >>> result.features.shape, len(set(result.labels.tolist())) == config.merge_target
    ((40, 8), True)
    >>> result.history[-1]["stage"], sorted(result.history[-1])
    ('final', ['iteration', 'loss', 'lr', 'n_clusters', 'n_triplets', 'nmi', 'period', 'seconds', 'stage'])
    """
    config = JuleConfig() if config is None else config
    if not isinstance(config, JuleConfig):
        raise ValueError(f"config must be a JuleConfig, got {type(config).__name__}")
    data = _patch_array(patches)
    _check_against_data(config, data.shape[0])
    config.network_config(in_channels=data.shape[1], patch_size=data.shape[2])
    gt = _ground_truth(ground_truth, data.shape[0])
    checkpoint = _checkpoint_path(checkpoint_dir, resume)
    with tqdm(desc="JULE", unit="epoch", disable=not progress) as bar:
        run = _Run(data, config, gt, checkpoint, bar, callback)
        state = run.restore() if checkpoint is not None and checkpoint.exists() else run.start()
        if state.stage != "done":
            while _n_clusters(state.labels) > config.merge_target and run.next_period(state):
                pass
            run.finish(state)
        features = run.trainer.features()
    # Trained in channels-last; handed back contiguous, as a saved model loads, so both give the same
    # features bit for bit (the convolutions pick other kernels for other weight layouts).
    model = run.trainer.model.to(memory_format=torch.contiguous_format).eval()
    return JuleResult(model, state.labels, state.history, config, features)
