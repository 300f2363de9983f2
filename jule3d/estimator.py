"""The whole method as one scikit-learn-style estimator: :class:`JuleSegmenter`.

``fit`` is Phase 1 (patches → JULE training of ``n_networks`` networks), ``transform`` gives the networks'
grid features, ``predict`` is Phase 2 (grid features → clustering → voxel labels). Every setting is a
parameter of the estimator, declared once in :data:`jule3d.parameters.PARAMETERS`; a preset is a named set of
defaults for the ``None`` ones. :func:`segment` is ``JuleSegmenter(**params).fit_predict(volume)``.

Examples
--------
>>> from jule3d.estimator import JuleSegmenter
>>> JuleSegmenter(n_clusters=4, preset="paper").resolved()["phase2"]
'kmeans'
>>> from sklearn.base import clone
>>> clone(JuleSegmenter(k_s=10)).get_params()["k_s"]
10
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator

from .io import prepare_volume
from .parameters import PARAMETERS
from .validation import check_choice, check_int, check_range, check_weight
from .volume import Volume

__all__ = ["JuleSegmenter", "PRESET_PHASE2", "network_seeds", "segment"]

#: Networks trained by default, and the Phase 2 method, per preset [ours for ``fast``].
PRESET_PHASE2: dict[str, tuple[int, str]] = {"fast": (2, "consensus"), "paper": (1, "kmeans")}

#: Parameters that are fields of :class:`jule3d.config.JuleConfig` (``None``: the preset's value).
JULE_FIELDS = tuple(name for name, p in PARAMETERS.items() if p.stage == "phase1"
                    and name not in ("n_networks", "jule_options"))

_FORMAT = "jule3d-segmenter-v1"


def network_seeds(seed: int, n_networks: int) -> list[int]:
    """Seeds of the networks of one run: network ``i`` of ``n`` gets ``seed * n + i`` (patches, weights, batches).

    So the networks of different run seeds never coincide, and one network with seed ``s`` is the
    single-network run of seed ``s``.

    Examples
    --------
    >>> network_seeds(0, 2), network_seeds(3, 2), network_seeds(3, 1)
    ([0, 1], [6, 7], [3])
    """
    return [seed * n_networks + i for i in range(n_networks)]


class JuleSegmenter(BaseEstimator):
    """Unsupervised segmentation of a 3D volume with JULE-3D (Moriya et al. 2018).

    Parameters are those of :data:`jule3d.parameters.PARAMETERS` (``jule3d run -h`` lists them too):

    Parameters
    ----------
    n_clusters : int
        Number of tissue classes ``k`` (also JULE's target cluster count).
    preset : {"fast", "paper"}
        Network, schedule and Phase 2 preset: ``paper`` is the published method (one network, k-means);
        ``fast`` [ours] trains two small networks and uses the ``"consensus"`` Phase 2.
    seed : int
        Seed of everything random; network ``i`` of ``n`` uses :func:`network_seeds`.
    n_patches, patch_size, min_foreground : int, int or None, float
        Patch sampling of each network (:func:`jule3d.patches.sample_patches`).
    n_networks : int, optional
        [ours] Networks trained with different seeds; Phase 2 clusters them together and each alone.
    k_s, k_c, lam, eta, epochs_per_period, final_epochs, batch_size, lr : optional
        Fields of :class:`jule3d.config.JuleConfig`; ``None``: the preset's value.
    jule_options : dict, optional
        Any further :class:`jule3d.config.JuleConfig` fields (``net_overrides``, ``raw_features``, ...).
    stride : int
        Grid stride of Phase 2.
    phase2 : {"consensus", "merge", "kmeans"}, optional
        Phase 2 clustering (:func:`jule3d.segmentation.label_volume`); ``None``: the preset's.
    intensity_weight, smoothing : float, optional
        [ours] Weight of the local mean intensity and of the Potts regularisation; ``None``: the Phase 2
        method's.
    intensity_window : int
        [ours] Side of the window of the local mean intensity (and of the refinement's local median).
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    progress : bool
        Show progress bars.

    Attributes
    ----------
    results_ : list of JuleResult
        Phase 1 of every network (set by :meth:`fit`; empty after :meth:`load` or :meth:`with_models`).
    models_ : list of JuleNet3D
        The trained networks.
    model_ : JuleNet3D
        The first of them.
    patches_ : PatchSet or None
        The first network's training patches.
    history_ : list of list of dict
        The training record of every network, one dict per period.

    Examples
    --------
    Tiny settings (one 4-filter network, 40 patches of 13³, one epoch per period):

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from jule3d.estimator import JuleSegmenter
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> segmenter = JuleSegmenter(n_networks=1, n_patches=40, patch_size=13, k_s=3, epochs_per_period=1,
    ...                           final_epochs=1, jule_options={"net_overrides": {"n_filters": 4, "feature_dim": 8}},
    ...                           progress=False)
    >>> segmenter.resolved()["phase2"], segmenter.jule_config().k_s
    ('consensus', 3)
    >>> labels = segmenter.fit(phantom.volume, ground_truth=phantom.labels).predict(phantom.volume)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((24, 24, 24), dtype('uint8'), [0, 1, 2, 3])
    >>> len(segmenter.models_), segmenter.patches_.patches.shape
    (1, (40, 1, 13, 13, 13))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     loaded = JuleSegmenter.load(segmenter.save(Path(tmp) / "segmenter.pt"))
    >>> loaded.get_params() == segmenter.get_params(), bool(np.array_equal(loaded.predict(phantom.volume), labels))
    (True, True)
    """

    def __init__(
        self,
        n_clusters: int = 3,
        preset: str = "fast",
        seed: int = 0,
        n_patches: int = 2000,
        patch_size: int | None = None,
        min_foreground: float = 0.5,
        n_networks: int | None = None,
        k_s: int | None = None,
        k_c: int | None = None,
        lam: float | None = None,
        eta: float | None = None,
        epochs_per_period: int | None = None,
        final_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        jule_options: dict[str, Any] | None = None,
        stride: int = 2,
        phase2: str | None = None,
        intensity_weight: float | None = None,
        intensity_window: int = 3,
        smoothing: float | None = None,
        device: str = "auto",
        progress: bool = False,
    ) -> None:
        self.n_clusters = n_clusters
        self.preset = preset
        self.seed = seed
        self.n_patches = n_patches
        self.patch_size = patch_size
        self.min_foreground = min_foreground
        self.n_networks = n_networks
        self.k_s = k_s
        self.k_c = k_c
        self.lam = lam
        self.eta = eta
        self.epochs_per_period = epochs_per_period
        self.final_epochs = final_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.jule_options = jule_options
        self.stride = stride
        self.phase2 = phase2
        self.intensity_weight = intensity_weight
        self.intensity_window = intensity_window
        self.smoothing = smoothing
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------------------------------------
    # settings

    def jule_config(self, network: int = 0) -> Any:
        """The :class:`jule3d.config.JuleConfig` of network ``network`` (its own seed, the preset's defaults).

        Raises
        ------
        ValueError
            An unknown preset, or a field that is not one of JuleConfig's or out of range.
        """
        from .config import jule_config

        options = dict(self.jule_options or {})
        clash = sorted(set(options) & (set(JULE_FIELDS) | {"n_clusters", "seed", "device"}))
        if clash:
            raise ValueError(f"jule_options {clash} are parameters of JuleSegmenter: set them there")
        fields = {name: getattr(self, name) for name in JULE_FIELDS}
        seed = network_seeds(self.seed, self.resolved_networks())[network]
        return jule_config(self.preset, n_clusters=self.n_clusters, seed=seed, device=self.device, **fields,
                           **options)

    def resolved_networks(self) -> int:
        """``n_networks``, or the preset's (:data:`PRESET_PHASE2`)."""
        check_choice("preset", self.preset, PARAMETERS["preset"].choices)
        n = PRESET_PHASE2[self.preset][0] if self.n_networks is None else self.n_networks
        return check_int("n_networks", n, 1)

    def resolved(self) -> dict[str, Any]:
        """Every parameter with ``None`` replaced by the value the preset or the Phase 2 method gives it.

        Raises
        ------
        ValueError
            Naming the first parameter that is invalid.
        """
        from .models import net_config
        from .segmentation import phase2_weights

        check_int("n_clusters", self.n_clusters, 2)
        check_int("seed", self.seed, 0)
        check_int("n_patches", self.n_patches, 1)
        check_range("min_foreground", self.min_foreground, 0.0, 1.0)
        check_int("intensity_window", self.intensity_window, 1)
        n_networks = self.resolved_networks()
        phase2 = PRESET_PHASE2[self.preset][1] if self.phase2 is None else self.phase2
        default_weight, default_smoothing = phase2_weights(phase2)
        config = self.jule_config()
        net = net_config(config.net, **config.net_overrides)
        patch_size = net.patch_size if self.patch_size is None else check_int("patch_size", self.patch_size, 1)
        stride = check_int("stride", self.stride, 1)
        values = self.get_params()
        values.update({name: getattr(config, name) for name in JULE_FIELDS})
        values.update(n_networks=n_networks, phase2=phase2, patch_size=patch_size, stride=stride,
                      intensity_weight=check_weight("intensity_weight", default_weight if self.intensity_weight
                                                    is None else self.intensity_weight),
                      smoothing=check_weight("smoothing", default_smoothing if self.smoothing is None
                                             else self.smoothing))
        return values

    # ------------------------------------------------------------------------------------------
    # Phase 1

    def sample_patches(self, volume: Volume, network: int = 0, ground_truth: np.ndarray | None = None,
                       patch_size: int | None = None) -> Any:
        """The training patches of network ``network`` (its seed), labelled by ``ground_truth`` when given.

        ``volume`` must already be prepared (:func:`jule3d.io.prepare_volume`), or be a
        :class:`jule3d.chunked.ChunkedVolume` (patches read from disk one by one); ``patch_size`` replaces the
        resolved one (the side of patches given to :meth:`fit`).
        """
        from .patches import sample_patches

        values = self.resolved()
        seed = network_seeds(self.seed, values["n_networks"])[network]
        sampler = volume.sample_patches if hasattr(volume, "sample_patches") else partial(sample_patches, volume)
        patches = sampler(self.n_patches, patch_size=patch_size or values["patch_size"],
                          min_foreground=self.min_foreground, seed=seed)
        if ground_truth is not None:
            patches.labels = np.asarray(ground_truth)[tuple(patches.centers.T)]
        return patches

    def fit(
        self,
        volume: Volume | str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray,
        mask: np.ndarray | str | os.PathLike | None = None,
        ground_truth: np.ndarray | None = None,
        patches: Any = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
    ) -> "JuleSegmenter":
        """Phase 1: sample patches and train ``n_networks`` JULE networks, each with its own seed.

        Parameters
        ----------
        volume : Volume, path, list of paths, ndarray or ChunkedVolume
            The image (:func:`jule3d.io.prepare_volume`), or a volume read block by block
            (:func:`jule3d.chunked.open_volume`, which has its mask).
        mask : ndarray or path, optional
            Foreground mask; default: the volume's own, or the automatic one.
        ground_truth : numpy.ndarray, optional
            Labels ``(Z, Y, X)``: each network tracks the NMI of its clusters at its patch centres.
        patches : PatchSet, optional
            Patches of network 0, already sampled with its seed (notebook 01 saves them); used as they are,
            their ``labels`` (if any) being the ground truth that network 0 tracks.
        checkpoint_dir : path, optional
            Checkpoints of network ``i`` go to ``checkpoint_dir/network_i`` (see :func:`jule3d.jule.train_jule`).
        resume : bool
            Continue each network from its last checkpoint.

        Returns
        -------
        JuleSegmenter
            ``self``, fitted.
        """
        from .jule import train_jule
        from .models import net_config
        from .segmentation import check_stride

        values = self.resolved()  # bad settings fail before the volume is read
        config = self.jule_config()
        check_stride(self.stride, net_config(config.net, **config.net_overrides).stride)
        if not hasattr(volume, "sample_patches"):  # a ChunkedVolume is sampled where it is
            volume = prepare_volume(volume, mask)
        results = []
        for i in range(values["n_networks"]):
            if i > 0 or patches is None:
                patches = self.sample_patches(volume, i, ground_truth,
                                              None if i == 0 or self.patch_size else patches.patch_size)
            folder = None if checkpoint_dir is None else Path(checkpoint_dir) / f"network_{i}"
            if i == 0:
                self.patches_ = patches
            results.append(train_jule(patches, self.jule_config(i), ground_truth=patches.labels,
                                      checkpoint_dir=folder, resume=resume, progress=self.progress))
        self.results_ = results
        self._set_models([r.model for r in results], [r.history for r in results])
        return self

    def with_models(self, models: Any) -> "JuleSegmenter":
        """Use trained networks instead of :meth:`fit`: a :class:`~jule3d.models.JuleNet3D`, a model file
        (:func:`jule3d.checkpoint.save_model`) or a sequence of them. Returns ``self``."""
        from .checkpoint import load_model
        from .models import JuleNet3D

        given = [models] if isinstance(models, (JuleNet3D, str, os.PathLike)) else list(models)
        if not given:
            raise ValueError("models is empty: give at least one trained network")
        self.results_, self.patches_ = [], None
        self._set_models([load_model(m) if isinstance(m, (str, os.PathLike)) else m for m in given],
                         [[] for _ in given])
        return self

    def _set_models(self, models: list, histories: list) -> None:
        self.models_, self.model_, self.history_ = models, models[0], histories

    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise RuntimeError("this JuleSegmenter is not fitted: call fit(volume), with_models(...) or load(path)")

    # ------------------------------------------------------------------------------------------
    # Phase 2

    def transform(self, volume: Any, mask: np.ndarray | str | os.PathLike | None = None) -> list:
        """The grid features of every network on ``volume`` (:func:`jule3d.segmentation.grid_features`)."""
        from .segmentation import grid_features

        self._check_fitted()
        volume = prepare_volume(volume, mask)
        device = None if self.device == "auto" else self.device  # None: where the network is
        return [grid_features(m, volume, stride=self.stride, progress=self.progress, device=device)
                for m in self.models_]

    def predict(self, volume: Any, mask: np.ndarray | str | os.PathLike | None = None) -> np.ndarray:
        """Phase 2: labels for every voxel, 0 = background, 1..k = classes ordered by mean intensity.

        Returns
        -------
        numpy.ndarray
            ``(Z, Y, X)`` labels, ``uint8`` (``uint16`` above 255 classes).
        """
        from .segmentation import label_grids

        self._check_fitted()
        values = self.resolved()  # bad options fail before the grid features are computed
        volume = prepare_volume(volume, mask)
        return label_grids(self.transform(volume), volume, self.n_clusters, seed=self.seed,
                           phase2=values["phase2"], intensity_weight=values["intensity_weight"],
                           intensity_window=self.intensity_window, smoothing=values["smoothing"])

    def fit_predict(self, volume: Any, mask: np.ndarray | str | os.PathLike | None = None,
                    **fit_options: Any) -> np.ndarray:
        """:meth:`fit` then :meth:`predict` on the same volume (read and prepared once)."""
        self.resolved()
        volume = prepare_volume(volume, mask)
        return self.fit(volume, **fit_options).predict(volume)

    # ------------------------------------------------------------------------------------------
    # files

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the parameters and every trained network to one file (loads with ``weights_only``).

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        """
        from .checkpoint import write_atomic

        self._check_fitted()
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} of path does not exist")
        networks = [{"net_config": m.config.to_dict(),
                     "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()}} for m in self.models_]
        write_atomic({"format": _FORMAT, "params": self.get_params(), "networks": networks}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "JuleSegmenter":
        """Read a segmenter written by :meth:`save`: its parameters and networks, ready to :meth:`predict`.

        Raises
        ------
        FileNotFoundError, ValueError
            A missing, corrupt or foreign file.
        """
        from .checkpoint import read_checked
        from .models import JuleNet3D, NetConfig

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"segmenter file {path} does not exist")
        obj = read_checked(path, _FORMAT, ("params", "networks"))
        try:
            segmenter = cls(**obj["params"])
            models = []
            for net in obj["networks"]:
                model = JuleNet3D(NetConfig.from_dict(net["net_config"]))
                model.load_state_dict(net["state_dict"])
                models.append(model.eval())
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path} is corrupt: {exc}") from exc
        return segmenter.with_models(models)


def segment(
    volume: Volume | str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray,
    n_clusters: int = PARAMETERS["n_clusters"].default,
    mask: np.ndarray | str | os.PathLike | None = None,
    model: Any = None,
    progress: bool = True,
    **params: Any,
) -> np.ndarray:
    """The whole method in one call: patches → JULE training → grid features → clustering → voxel labels.

    ``JuleSegmenter(**params).fit_predict(volume, mask)``, or with ``model`` (trained network(s) or their
    files) only Phase 2.

    Parameters
    ----------
    volume : Volume, path, list of paths or ndarray
        The image (:func:`jule3d.io.prepare_volume`: masked and normalised whatever its type).
    n_clusters : int
        Number of tissue classes ``k``.
    mask : ndarray or path, optional
        Foreground mask; default: the volume's own, or the automatic one.
    model : JuleNet3D, path or a sequence of them, optional
        Trained network(s): skips Phase 1.
    progress : bool
        Show progress bars.
    **params
        Parameters of :class:`JuleSegmenter` (``n_clusters``, ``preset``, ``seed``, ``k_s``, ...); a
        :class:`jule3d.config.JuleConfig` field that is not one of them goes into ``jule_options``.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` labels, 0 = background, 1..k = classes.

    Examples
    --------
    Phase 2 only, with a given (here untrained) network:

    >>> import numpy as np
    >>> from jule3d.estimator import segment
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> labels = segment(phantom.volume, 3, model=model, progress=False)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((24, 24, 24), dtype('uint8'), [0, 1, 2, 3])
    """
    from .config import JuleConfig

    options = dict(params.pop("jule_options", None) or {})
    config_fields = set(JuleConfig.__dataclass_fields__)
    for name in [n for n in params if n not in PARAMETERS and n in config_fields]:
        options[name] = params.pop(name)
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; valid: {sorted(PARAMETERS)} and JuleConfig fields")
    segmenter = JuleSegmenter(n_clusters=n_clusters, progress=progress, jule_options=options or None, **params)
    if model is not None:
        segmenter.resolved()
        return segmenter.with_models(model).predict(volume, mask)
    return segmenter.fit_predict(volume, mask)
