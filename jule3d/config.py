"""JULE's training configuration: every hyperparameter of Phase 1, and the named presets.

The defaults are the spec's (``docs/method.md``, where every field's source is given: [paper], [jule] or
[ours]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

import torch

from jule3d.models import PRESETS as NET_PRESETS
from jule3d.models import NetConfig, net_config
from jule3d.validation import check_int, check_range

__all__ = ["JULE_PRESETS", "RAW_FEATURES", "JuleConfig", "jule_config"]

RAW_FEATURES: tuple[str, ...] = ("l2", "standardize", "untrained", "spectrum", "spectrum+mean")
"""Valid :attr:`JuleConfig.raw_features` (period-0 features); ``"l2"`` is JULE's."""


@dataclass(frozen=True)
class JuleConfig:
    """Every hyperparameter of :func:`train_jule`; defaults are the spec's (``docs/method.md``).

    Parameters
    ----------
    n_clusters : int
        Target number of clusters ``n*`` (3 tissue classes in Moriya 2018).
    k_s : int
        Neighbours per sample in the affinity graph ``W`` (JULE ``K_s``).
    k_c : int
        Clusters in the AGDL merge criterion's local term (JULE ``K_c``).
    lam : float
        Weight ``λ`` of that local term.
    eta : float
        Unfolding rate: each period merges ``ceil(eta · n_c)`` times (0.9; 0.2 for many small classes).
    epochs_per_period : int
        CNN epochs after each period's merges (0 leaves the CNN untrained, as JULE's ``updateCNN=0``).
    final_epochs : int
        CNN epochs of the final update on the final labels [ours: the paper gives no number].
    batch_size : int
        Patches per minibatch.
    lr, momentum, dampening, weight_decay : float
        SGD settings (JULE reference: 0.01, 0.9, 0.9, 5e-5).
    lr_gamma, lr_power : float
        Schedule ``lr · (1 + lr_gamma · it) ** -lr_power``.
    margin, gamma : float
        Triplet margin and weight of the positive distance (0.2 and 2).
    n_negatives : int
        Negatives per anchor-positive pair (at most; fewer when the batch holds fewer).
    net : str
        Network preset, a key of :data:`jule3d.models.PRESETS`.
    net_overrides : dict
        :class:`~jule3d.models.NetConfig` fields to change; ``in_channels`` and ``patch_size`` are taken
        from the patches.
    max_periods : int
        Safety cap: the period with this index merges straight to :attr:`merge_target`.
    stop_clusters : int
        [ours] Stop merging at ``max(n_clusters, stop_clusters)`` clusters (0: at ``n_clusters``, as
        JULE). The final update then trains on those labels, and Phase 2's k-means groups the features
        into ``n_clusters`` classes. Late AGDL merges between a few large clusters are the least
        reliable ones: once the CNN has pulled every cluster into a tight ball, the kNN graph has
        almost no edges between clusters and the merge order becomes arbitrary (one giant cluster).
    approximate_knn : bool
        Passed to :func:`jule3d.agdl.knn_affinity`.
    channels_last : bool
        Train and embed with ``torch.channels_last_3d`` tensors (faster on CPUs; measured by
        ``benchmarks/bench_training.py``).
    feature_batch_size : int
        Patches per forward pass when computing features.
    raw_features : {"l2", "standardize", "untrained", "spectrum", "spectrum+mean"}
        Features of period 0, from which the first ``W`` and the initial clusters come. ``"l2"`` [jule]:
        the L2-normalised raw patches. The others are [ours]: ``"standardize"`` removes each patch's
        mean and scales it to unit variance before the L2 normalisation (so brightness and contrast
        differences, e.g. a bias field, do not decide the neighbours); ``"untrained"`` uses the
        features of the freshly initialised CNN (random convolutions, BatchNorm, ReLU and pooling);
        ``"spectrum"`` uses the L2-normalised amplitude spectrum ``|FFT|`` of each standardised patch, a
        shift-invariant texture descriptor (raw voxels of two patches of one random texture are
        nearly uncorrelated unless the patches overlap, their spectra are alike).
        ``"spectrum+mean"`` puts each patch's mean intensity beside its spectrum, each block weighing as
        much as it varies (:func:`jule3d.jule.period0_features`): the spectrum discards brightness, the
        first cue where tissues differ in intensity or, as in lung, in their share of air.
    anchor : float
        [ours] Share ``a`` in ``[0, 1]`` of the period-0 features in the affinity of every later
        period's merges: ``W`` is built on ``[sqrt(1 - a) · f_CNN, sqrt(a) · f_0]``, both L2-normalised
        rows, so the squared distance is ``(1 - a)`` times the CNN's plus ``a`` times period 0's. 0 is
        JULE (merges on the CNN features alone). The CNN is trained on few epochs per cluster set, and
        the merges are decided on its features: a distinction the CNN has not yet learned (or has
        unlearned while pulling its clusters apart) is then lost for good, though period 0 held it.
        The anchor keeps what the fixed, untrained descriptor separates in every merge. Needs
        ``raw_features`` computed from the voxels (not ``"untrained"``).
    seed : int
        Seed of the weight initialisation and of the minibatch / negative sampling.
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Raises
    ------
    ValueError
        Naming the first field that is out of range.

    Examples
    --------
    >>> from jule3d.config import JuleConfig
    >>> config = JuleConfig(n_clusters=3, stop_clusters=5, net="fast", net_overrides={"n_filters": 4})
    >>> config.merge_target
    5
    >>> net = config.network_config(in_channels=1, patch_size=13)
    >>> net.patch_size, net.filters
    (13, (4, 4, 4))
    >>> JuleConfig.from_dict(config.to_dict()) == config
    True
    """

    n_clusters: int = 3
    k_s: int = 20
    k_c: int = 5
    lam: float = 1.0
    eta: float = 0.9
    epochs_per_period: int = 20
    final_epochs: int = 20
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 5e-5
    lr_gamma: float = 1e-4
    lr_power: float = 0.75
    margin: float = 0.2
    gamma: float = 2.0
    n_negatives: int = 20
    net: str = "paper"
    net_overrides: dict[str, Any] = field(default_factory=dict)
    max_periods: int = 100
    stop_clusters: int = 0
    approximate_knn: bool = False
    channels_last: bool = True
    feature_batch_size: int = 256
    raw_features: str = "l2"
    anchor: float = 0.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("n_clusters", "k_s", "k_c", "batch_size", "n_negatives", "max_periods", "feature_batch_size"):
            check_int(f"JuleConfig.{name}", getattr(self, name), minimum=1)
        for name in ("epochs_per_period", "final_epochs", "seed", "stop_clusters"):
            check_int(f"JuleConfig.{name}", getattr(self, name), minimum=0)
        check_range("JuleConfig.eta", self.eta, 0.0, 1.0, low_open=True)
        check_range("JuleConfig.momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("JuleConfig.dampening", self.dampening, 0.0, 1.0)
        check_range("JuleConfig.lr", self.lr, 0.0, math.inf, low_open=True)
        check_range("JuleConfig.gamma", self.gamma, 0.0, math.inf, low_open=True)
        for name in ("lam", "weight_decay", "lr_gamma", "lr_power", "margin"):
            check_range(f"JuleConfig.{name}", getattr(self, name), 0.0, math.inf)
        if self.raw_features not in RAW_FEATURES:
            raise ValueError(f"JuleConfig.raw_features must be one of {RAW_FEATURES}, got {self.raw_features!r}")
        check_range("JuleConfig.anchor", self.anchor, 0.0, 1.0)
        if self.anchor > 0 and self.raw_features == "untrained":
            raise ValueError(f"JuleConfig.anchor = {self.anchor} (> 0) needs period-0 features computed from the "
                             "voxels, and raw_features='untrained' has none: set anchor=0, or raw_features to "
                             "'spectrum', 'l2', ...")
        if self.net not in NET_PRESETS:
            raise ValueError(f"JuleConfig.net must be one of {sorted(NET_PRESETS)}, got {self.net!r}")
        if not isinstance(self.net_overrides, Mapping):
            raise ValueError(f"JuleConfig.net_overrides must be a dict, got {type(self.net_overrides).__name__}")
        object.__setattr__(self, "net_overrides", dict(self.net_overrides))
        net_config(self.net, **self.net_overrides)  # validates the override names and values
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"JuleConfig.device {self.device!r} is not a torch device: {exc}") from exc

    @property
    def merge_target(self) -> int:
        """Number of clusters at which merging stops: ``max(n_clusters, stop_clusters)``."""
        return max(self.n_clusters, self.stop_clusters)

    def network_config(self, in_channels: int, patch_size: int) -> NetConfig:
        """The :class:`~jule3d.models.NetConfig` for patches of ``in_channels × patch_size³``.

        Raises
        ------
        ValueError
            If ``net_overrides`` sets ``in_channels`` or ``patch_size`` to other values.
        """
        for name, value in (("in_channels", in_channels), ("patch_size", patch_size)):
            if name in self.net_overrides and self.net_overrides[name] != value:
                raise ValueError(
                    f"JuleConfig.net_overrides[{name!r}]={self.net_overrides[name]} does not match the "
                    f"patches ({name}={value})"
                )
        overrides = {**self.net_overrides, "in_channels": in_channels, "patch_size": patch_size}
        return net_config(self.net, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary that :meth:`from_dict` reads back (JSON- and checkpoint-safe)."""
        out = asdict(self)
        out["net_overrides"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.net_overrides.items()
        }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JuleConfig":
        """Build a config from :meth:`to_dict` output (unknown keys raise ``ValueError``)."""
        _check_config_fields(data, "data")
        return cls(**data)


JULE_PRESETS: dict[str, JuleConfig] = {
    "paper": JuleConfig(net="paper"),
    "fast": JuleConfig(
        net="fast", epochs_per_period=3, final_epochs=10, eta=0.5, raw_features="spectrum", stop_clusters=6,
        anchor=0.5,
    ),
}
"""Named training configurations; ``net`` names the :data:`jule3d.models.PRESETS` entry of the same name.

``"paper"`` is the spec's JULE (``docs/method.md``). ``"fast"`` [ours] is tuned on the texture phantom
(``benchmarks/bench_phantom_jule.py``): 3 epochs per period, 10 final epochs, ``eta=0.5``, period-0 features
from the amplitude spectrum, merging stopped at 6 clusters. The spectrum and the stop were both needed: with
JULE's raw L2 features the first graph is worse and one cluster soon holds most patches, and merging on to
``n_clusters`` let one cluster swallow two classes in the last period. Its merges after period 0 are
anchored to the period-0 spectra (``anchor=0.5``, an equal share, not tuned): merged on the CNN features
alone, the networks lost one of three textures on a phantom of another construction (NMI 0.505 against 0.822
anchored, seeds 0-4, with the default Phase 2). ``docs/method.md`` gives the measurements.
"""


def jule_config(preset: str = "fast", **overrides: Any) -> JuleConfig:
    """A preset training configuration with some fields replaced.

    Parameters
    ----------
    preset : str
        A key of :data:`JULE_PRESETS` (``"paper"`` or ``"fast"``).
    **overrides
        :class:`JuleConfig` fields to change. ``None`` keeps the preset's value, so callers (the notebooks,
        the tuning panel) can pass every field and leave unset ones to the preset.

    Raises
    ------
    ValueError
        If ``preset`` is unknown or an override is not a field (the message lists the valid ones).

    Examples
    --------
    >>> from jule3d.config import jule_config
    >>> config = jule_config("fast", epochs_per_period=1, final_epochs=1, k_s=3, eta=None)
    >>> config.net, config.k_s, config.epochs_per_period, config.eta
    ('fast', 3, 1, 0.5)
    """
    if preset not in JULE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(JULE_PRESETS)}")
    _check_config_fields(overrides, "overrides")
    return replace(JULE_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def _check_config_fields(values: Mapping[str, Any], what: str) -> None:
    valid = [f.name for f in fields(JuleConfig)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown JuleConfig field(s) in {what}: {unknown}; valid fields: {valid}")
