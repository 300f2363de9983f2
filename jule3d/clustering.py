"""Phase 2's clustering as a fitted model: fit it once, then label any block of grid positions with it.

:func:`jule3d.segmentation.label_grids` fits the model on the whole grid and applies it to the same grid;
:mod:`jule3d.chunked` fits it on a bounded sample of the grid's chunks and applies it chunk by chunk, so the
memory of Phase 2 is bounded by the chunk, not by the volume. The model is everything a chunk needs to be
labelled the way the whole grid would be:

* :class:`FeatureScaling`: how the networks' features and the local mean intensity are put on one scale
  (:func:`jule3d.segmentation.joint_features`);
* :class:`ClassModel`: the k-means centres, the class each centre belongs to (after
  :func:`jule3d.segmentation.merge_clusters`), the Potts weight and scale of
  :func:`jule3d.segmentation.smooth_labels`;
* :class:`RefineModel`: the per-class densities (Gaussian mixtures) of the local median intensity of
  :func:`jule3d.segmentation.refine_labels`, and the Potts weight between the refined voxels, for each of the
  refinement's passes (:data:`REFINE_PASSES`);
* ``order``: the output id of every class (ascending mean intensity of the first channel over the fitted
  voxels, :func:`jule3d.labels.order_labels_by_intensity`).

Examples
--------
>>> import numpy as np
>>> from jule3d.clustering import FeatureScaling
>>> scaling = FeatureScaling.fit([np.eye(3, dtype=np.float32)], (0,), None, None, 0.0)
>>> scaling.transform([np.eye(3, dtype=np.float32)], None).shape
(3, 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from .grid import Grid
    from .volume import Volume

__all__ = ["FeatureScaling", "ClassModel", "RefineModel", "Phase2Model", "Block", "fit_phase2", "label_block",
           "refine_block", "output_labels", "block_distances", "box_means", "local_evidence", "fit_refinement",
           "refine_classes", "ROWS"]

#: Rows of features turned into distances at a time (bounds the temporary memory of one block).
ROWS = 262_144


@dataclass
class FeatureScaling:
    """The joint features of a Phase 2 candidate: which networks, centred and scaled how, and the intensity block.

    Attributes
    ----------
    networks : tuple of int
        Indices of the networks whose features are used, side by side.
    means, scales : tuple
        Per used network: the column means subtracted and the divisor of the centred block (``scale`` 0: none).
    local_center, local_divisor : numpy.ndarray or None
        ``(C,)`` centring and divisor of the local mean intensity of every channel (``None``: no intensity
        block; a divisor of 0 gives a zero column).
    local_factor : float
        Factor on the intensity block.
    """

    networks: tuple[int, ...]
    means: tuple[np.ndarray, ...]
    scales: tuple[float, ...]
    local_center: np.ndarray | None
    local_divisor: np.ndarray | None
    local_factor: float

    @classmethod
    def fit(
        cls,
        features: Sequence[np.ndarray],
        networks: tuple[int, ...],
        local: np.ndarray | None,
        local_divisor: np.ndarray | None,
        local_factor: float,
        centre: bool = True,
    ) -> "FeatureScaling":
        """Fit on ``features`` (one ``(M, D)`` array per network) and the raw local means ``local`` ``(M, C)``.

        ``centre``: centre every network's block and give the learnt part total variance 1
        (:func:`jule3d.segmentation.joint_features`); otherwise the features are used as they are.
        ``local_divisor`` ``None`` standardises each local-mean column by its own standard deviation.
        """
        means, scales = [], []
        for i in networks:
            block = np.asarray(features[i], dtype=np.float32)
            if not centre:
                means.append(np.zeros(block.shape[1], dtype=np.float32))
                scales.append(1.0)
                continue
            mean = block.mean(axis=0)
            centred = block - mean
            means.append(mean)
            scales.append(float(np.sqrt(np.mean(np.einsum("ij,ij->i", centred, centred)) * len(networks))))
        center = divisor = None
        if local is not None and local_factor > 0:
            columns = [np.ascontiguousarray(local[:, c], dtype=np.float32) for c in range(local.shape[1])]
            center = np.array([col.mean() for col in columns], dtype=np.float32)
            divisor = (np.array([col.std() for col in columns], dtype=np.float32) if local_divisor is None
                       else np.asarray(local_divisor, dtype=np.float32))
        return cls(tuple(networks), tuple(means), tuple(scales), center, divisor, float(local_factor))

    @property
    def uses_intensity(self) -> bool:
        """Whether the features have an intensity block."""
        return self.local_center is not None

    def transform(self, features: Sequence[np.ndarray], local: np.ndarray | None) -> np.ndarray:
        """``(M, D')`` float32 joint features of rows of every network's features and their raw local means.

        Every block is written in place into the one output array: a block-wise ``hstack`` held each block twice
        (at a chunk's 10⁵–10⁶ rows of 129 columns, 50–500 MB more at the peak); the values are the same to the
        bit.
        """
        blocks = [np.asarray(features[i], dtype=np.float32) for i in self.networks]
        if self.local_center is not None:
            local = np.asarray(local, dtype=np.float32)
        width = sum(b.shape[1] for b in blocks) + (0 if self.local_center is None else local.shape[1])
        out = np.empty((len(blocks[0]) if blocks else len(local), width), dtype=np.float32)
        start = 0
        for block, mean, scale in zip(blocks, self.means, self.scales):
            view = out[:, start:start + block.shape[1]]
            np.subtract(block, mean, out=view)
            if scale > 0:
                np.divide(view, scale, out=view)
            start += block.shape[1]
        if self.local_center is not None:
            for c in range(local.shape[1]):
                column = out[:, start + c]
                if self.local_divisor[c] > 0:
                    np.subtract(local[:, c], self.local_center[c], out=column)
                    np.divide(column, self.local_divisor[c], out=column)
                    np.multiply(column, np.float32(self.local_factor), out=column)
                else:
                    column[:] = 0
        return out


@dataclass
class ClassModel:
    """Distances of joint features to the classes, and the Potts model that turns them into labels.

    Attributes
    ----------
    centers : numpy.ndarray
        ``(K, D')`` float32 k-means centres.
    group : numpy.ndarray
        ``(K,)`` class ``0..k-1`` of every centre; a position's distance to a class is its squared distance to
        the nearest centre of the class.
    margin : float or None
        ``"merge"``: every row's distances are shifted so that its nearest class is at ``margin`` (the median
        margin of the fitted positions); ``None``: unshifted.
    beta : float
        Potts weight of :func:`jule3d.segmentation.smooth_labels` (0: the nearest class).
    scale : float
        Its unit of the data term.
    """

    centers: np.ndarray
    group: np.ndarray
    margin: float | None
    beta: float
    scale: float

    @property
    def n_classes(self) -> int:
        """Number of classes ``k``."""
        return int(self.group.max()) + 1

    def distances(self, joint: np.ndarray) -> np.ndarray:
        """``(M, k)`` float32 data term of every row of joint features.

        Squared distances come from one float32 matrix product per ``ROWS`` rows,
        ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2``, after shifting rows and centres by the centres' mean so that the
        norms are of the size of the distances (their rounding is then about 1e-7 of a distance, against
        scikit-learn's float64-upcast ``euclidean_distances``, three to four times slower here).
        """
        out = np.empty((len(joint), self.n_classes), dtype=np.float32)
        shift = self.centers.mean(axis=0, dtype=np.float64).astype(np.float32)
        centers = np.asarray(self.centers, dtype=np.float32) - shift
        squares = np.einsum("ij,ij->i", centers, centers)
        single = np.array_equal(self.group, np.arange(len(self.group)))
        order = np.argsort(self.group, kind="stable")
        starts = np.searchsorted(self.group[order], np.arange(self.n_classes))
        for start in range(0, len(joint), ROWS):
            rows = np.asarray(joint[start:start + ROWS], dtype=np.float32) - shift
            d2 = rows @ centers.T
            d2 *= -2
            d2 += squares
            d2 += np.einsum("ij,ij->i", rows, rows)[:, None]
            np.maximum(d2, 0, out=d2)
            out[start:start + len(d2)] = d2 if single else np.minimum.reduceat(d2[:, order], starts, axis=1)
        if self.margin is not None and out.shape[1] > 1:
            out -= out.min(axis=1, keepdims=True)
            out += np.float32(self.margin)
        return out

    def labels(self, distances: np.ndarray, selected: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """``(M,)`` int32 classes of the positions ``selected`` (a bool grid block, rows in C order)."""
        from .segmentation import smooth_labels

        return smooth_labels(selected, distances, self.beta, spacing=spacing, scale=self.scale)


#: Gaussians in each class's density of the local median intensity in :class:`RefineModel` [ours]. A class of
#: tissue with air or fluid spaces at the scale of the box (lung, a specimen with cavities) has two modes there;
#: one Gaussian, stretched over both, gives its tissue voxels to a tighter all-tissue neighbour (``docs/method.md`` 3).
REFINE_COMPONENTS = 2
#: Voxels of a class that its mixture is fitted on (a seeded sample above it).
REFINE_FIT_ROWS = 50_000
#: Potts weight, in nats per face neighbour, that couples the refined labels of neighbouring voxels [ours]:
#: Atropos' default MRF smoothing factor (``-m [0.3,1x1x1]``; Avants et al. 2011), the method whose use of prior
#: maps the refinement follows. Without it each voxel decides alone, and where its evidence is weak (a voxel
#: of air inside a foam, a texture) the border is a speckle (``docs/method.md`` 5.7).
REFINE_SMOOTHING = 0.3
#: The statistic of every channel over the foreground voxels of a voxel's ``window``³ box that is the refinement's
#: evidence [ours]: ``"median"`` (the default) or ``"mean"`` (the refinement before; an ablation,
#: ``bench_phase2.py --variants refine-box-mean``). A mean over a box that straddles a border is a mixture of the
#: two sides, far in the tails of both classes' Gaussians, so the blocky prior placed such borders; a median takes
#: the value of the side that holds most of the box, so the border follows the intensity edge
#: (``docs/method.md`` 5.10).
REFINE_STATISTIC = "median"
#: The statistics :class:`RefineModel` reads (:func:`local_evidence`).
REFINE_STATISTICS = ("median", "mean")
#: Voxels beyond a block's own voxels that the voxel Potts model of :meth:`RefineModel.apply` also labels,
#: so that the labels it keeps see their neighbours' labels as the whole volume would (up to ICM's reach).
REFINE_CONTEXT = 4
#: Passes of the refinement [ours]. The first pass's prior is the coarse labels, blocks of a grid step whose
#: borders are uncertain by about a patch, and each class's density is fitted to them, so the band along every
#: border lends each class its neighbour's voxels. The second pass takes the first's voxel labels as its prior
#: and refits the densities to them (:func:`fit_refinement`; ``docs/method.md`` 5.11). 1 is the refinement
#: before (an ablation, ``bench_phase2.py --variants refine-one-pass``).
REFINE_PASSES = 2


def refine_radius(stride: int, window: int) -> int:
    """Voxels of context a block needs around its own voxels for one pass of :meth:`RefineModel.apply`: the Potts
    model's context (:data:`REFINE_CONTEXT`), the prior's Gaussian (4 standard deviations of ``stride`` voxels)
    and the ``window``³ box of the local statistics.

    Examples
    --------
    >>> refine_radius(2, 3)
    15
    """
    return REFINE_CONTEXT + int(4.0 * stride + 0.5) + window


@dataclass
class RefineModel:
    """Per-class densities of the local median (or mean) intensity, for :func:`jule3d.segmentation.refine_labels`.

    Each class's density is a mixture of Gaussians (:data:`REFINE_COMPONENTS`; one where the class has too few
    voxels to fit more); neighbouring voxels' labels are coupled by a Potts model of weight ``beta``.

    Attributes
    ----------
    means : numpy.ndarray
        ``(k, m, C)`` means of the ``m`` Gaussians of every class (unused components have weight 0).
    inverses : numpy.ndarray
        ``(k, m, C, C)`` inverse covariances (with the ridge).
    logdets : numpy.ndarray
        ``(k, m)`` log-determinants of the covariances.
    log_weights : numpy.ndarray
        ``(k, m)`` log mixing weights (``-inf`` for an unused component).
    stride : int
        Standard deviation (voxels) of the Gaussian that smooths the coarse labels into a prior.
    window : int
        Side of the intensity box.
    floor : float
        Least prior probability.
    beta : float
        Potts weight between neighbouring voxels' labels, in nats (:data:`REFINE_SMOOTHING`; 0: every voxel
        takes its own most probable class, the refinement of models saved before it).
    statistic : {"median", "mean"}
        The box statistic the densities describe (:data:`REFINE_STATISTIC`; ``"mean"`` for models saved before it).
    """

    means: np.ndarray
    inverses: np.ndarray
    logdets: np.ndarray
    log_weights: np.ndarray
    stride: int
    window: int
    floor: float
    beta: float = REFINE_SMOOTHING
    statistic: str = REFINE_STATISTIC

    @property
    def radius(self) -> int:
        """Voxels of context a block needs around the voxels this pass labels (:func:`refine_radius`)."""
        return refine_radius(self.stride, self.window)

    @classmethod
    def fit(cls, local: np.ndarray, labels: np.ndarray, n_classes: int, stride: int, window: int,
            floor: float, components: int | None = None, beta: float | None = None,
            statistic: str | None = None) -> "RefineModel":
        """Fit on the local statistics ``(N, C)`` of foreground voxels (:func:`local_evidence`) and their coarse
        classes ``(N,)`` (``0..k-1``).

        ``beta`` (the Potts weight of :meth:`apply`) defaults to :data:`REFINE_SMOOTHING`; ``statistic``, the
        statistic ``local`` holds and :meth:`apply` reads, to :data:`REFINE_STATISTIC`.

        ``components`` defaults to :data:`REFINE_COMPONENTS`. With 1, each class is one Gaussian of its voxels'
        mean and (unbiased) covariance, the pooled covariance where a class has no more voxels than ``C + 1``.
        Otherwise each class with at least ``10 * components * (C + 1)`` voxels and ``components`` distinct local
        means is a Gaussian mixture fitted by EM (scikit-learn, full covariances, k-means initialisation, seeded,
        on at most :data:`REFINE_FIT_ROWS` voxels, a sample drawn afresh for each class so that the fit does not depend
        on the order of the classes); the others are one Gaussian. Every covariance gets the same
        ridge, a millionth of the pooled mean variance.
        """
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        from .validation import check_int, check_weight

        statistic = _refine_statistic(statistic)
        components = REFINE_COMPONENTS if components is None else check_int("components", components, 1)
        beta = REFINE_SMOOTHING if beta is None else check_weight("beta", beta)
        local = np.asarray(local, dtype=np.float64)
        n_channels = local.shape[1]
        pooled = np.atleast_2d(np.cov(local, rowvar=False))
        ridge = 1e-6 * max(float(np.trace(pooled)) / len(pooled), 1e-12)
        means = np.zeros((n_classes, components, n_channels))
        covariances = np.tile(np.eye(n_channels), (n_classes, components, 1, 1))
        log_weights = np.full((n_classes, components), -np.inf)
        for c in range(n_classes):
            members = local[labels == c]
            if len(members) > REFINE_FIT_ROWS and components > 1:  # a sample that is the same whatever c is
                sample = np.random.default_rng(0).choice(len(members), REFINE_FIT_ROWS, replace=False)
                members = members[np.sort(sample)]
            if (components > 1 and len(members) >= 10 * components * (n_channels + 1)
                    and len(np.unique(members, axis=0)) >= components):
                mixture = GaussianMixture(components, covariance_type="full", reg_covar=ridge, random_state=0)
                with warnings.catch_warnings():  # an EM stopped at its iteration limit is still a density
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    mixture.fit(members)
                means[c], covariances[c] = mixture.means_, mixture.covariances_
                log_weights[c] = np.log(mixture.weights_)
                continue
            cov = np.atleast_2d(np.cov(members, rowvar=False)) if len(members) > n_channels + 1 else pooled
            means[c, 0] = members.mean(axis=0) if len(members) else local.mean(axis=0)
            covariances[c, 0], log_weights[c, 0] = cov + ridge * np.eye(n_channels), 0.0
        return cls(means, np.linalg.inv(covariances), np.linalg.slogdet(covariances)[1], log_weights, int(stride),
                   int(window), float(floor), float(beta), statistic)

    def apply(self, coarse: np.ndarray, volume: "Volume", keep: np.ndarray, local: np.ndarray | None = None,
              spacing: Sequence[float] | None = None) -> np.ndarray:
        """Refined classes ``(N,)`` of the voxels ``keep`` of a block.

        Every foreground voxel within :data:`REFINE_CONTEXT` voxels of ``keep`` gets its log posterior
        ``log max(prior_c, floor) + log p_c(m)``; their labels then minimise

        ``E(l) = - sum_i log P(l_i | x_i) + beta * sum_(i~j) w_ij [l_i != l_j]``

        over the 26 neighbours with ``w_ij = h / |i - j|_mm`` (:func:`jule3d.segmentation.smooth_labels`, ICM from
        the most probable classes; ``beta = 0``: those classes). This is Atropos' MRF prior on the refinement's
        posterior; the voxels ``keep`` are returned.

        Parameters
        ----------
        coarse : numpy.ndarray
            ``(Z, Y, X)`` coarse classes ``0..k-1`` of the block (any value outside the foreground), with
            :attr:`radius` voxels of context around the voxels that are kept.
        volume : Volume
            The block's voxels with their foreground.
        keep : numpy.ndarray
            Bool: the foreground voxels to refine.
        local : numpy.ndarray, optional
            ``(N, C)`` local statistics (:func:`local_evidence`) of the voxels ``keep`` (C order), where the caller
            has them (they are reused when no context is needed, e.g. ``keep`` is the whole foreground).
        spacing : sequence of 3 float, optional
            Voxel spacing ``(z, y, x)``; default ``volume``'s.
        """
        return _refine_pass(self, coarse, volume, keep, 0, _Evidence(volume, keep, local), spacing)[keep]

    def _labels(self, coarse: np.ndarray, foreground: np.ndarray, keep: np.ndarray, region: np.ndarray,
                local: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """:meth:`apply` on the voxels ``region`` (``keep`` with its Potts context) of a block whose evidence
        there is ``local``: the classes of the voxels ``keep``."""
        from .segmentation import smooth_labels

        k = len(self.log_weights)
        priors = np.stack([ndimage.gaussian_filter(((coarse == c) & foreground).astype(np.float32),
                                                   sigma=float(self.stride), mode="nearest")[region]
                           for c in range(k)], axis=1)
        priors /= np.maximum(priors.sum(axis=1, keepdims=True), np.float32(1e-30))
        log_posterior = np.log(np.maximum(priors, self.floor)).astype(np.float64) + self.log_likelihood(local)
        if self.beta == 0:
            return np.argmax(log_posterior, axis=1)[keep[region]]
        cost = log_posterior.max(axis=1, keepdims=True) - log_posterior
        box = _crop_box(region, 0)  # ICM on the voxels it labels: the prior's margin holds none
        return smooth_labels(region[box], cost, self.beta, spacing, scale=1.0)[keep[box][region[box]]]

    def log_likelihood(self, local: np.ndarray) -> np.ndarray:
        """``(N, k)`` log density of every class at the local statistics ``(N, C)``, up to a constant shared by all."""
        local = np.asarray(local, dtype=np.float64)
        out = np.empty((len(local), len(self.log_weights)))
        for c, log_weights in enumerate(self.log_weights):
            terms = []
            for j in np.flatnonzero(np.isfinite(log_weights)):
                diff = local - self.means[c, j]
                if diff.shape[1] == 1:  # one channel: the same products without the matrix machinery
                    square = (diff[:, 0] * self.inverses[c, j, 0, 0]) * diff[:, 0]
                else:
                    square = np.einsum("ij,ij->i", diff @ self.inverses[c, j], diff)
                terms.append(log_weights[j] - 0.5 * (square + self.logdets[c, j]))
            out[:, c] = np.logaddexp.reduce(terms, axis=0)  # scipy's logsumexp takes 5x as long here
        return out


def _within_reach(keep: np.ndarray, reach: int, foreground: np.ndarray) -> np.ndarray:
    """The foreground voxels within ``reach`` voxels (a cube) of ``keep``; ``keep`` itself for ``reach`` 0 or a
    ``keep`` that is the whole foreground."""
    if reach == 0 or np.array_equal(keep, foreground):
        return keep
    return ndimage.maximum_filter(keep, size=2 * reach + 1, mode="constant") & foreground


def _crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` (not empty) grown by ``margin`` voxels, within the array, from even indices: a
    pass run on it labels as on the whole block, since the Gaussian prior and the box statistics reach ``margin``
    voxels at most, and the Potts model's parity classes (:func:`jule3d.segmentation.smooth_labels`) stay the
    block's."""
    box = []
    for axis, size in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0) // 2 * 2, min(int(hit[-1]) + margin + 1, size)))
    return tuple(box)  # type: ignore[return-value]


class _Evidence:
    """The local statistics (:func:`local_evidence`) of a block's voxels, computed once for every pass of the
    refinement that reads them: the first pass reads the widest region and later passes read within it (a region
    that reaches further is computed then). ``local``, where given, are those of the voxels ``keep``."""

    def __init__(self, volume: "Volume", keep: np.ndarray | None = None, local: np.ndarray | None = None) -> None:
        self.volume, self.keep, self.local = volume, keep, local
        self.maps: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}  # known voxels, their statistics

    def at(self, region: np.ndarray, window: int, statistic: str) -> np.ndarray:
        """``(N, C)`` statistics of the voxels ``region``."""
        if self.local is not None and (region is self.keep or np.array_equal(region, self.keep)):
            return self.local
        key = (int(window), statistic)
        known, values = self.maps.get(key, (None, None))
        if known is None or (region & ~known).any():
            known = region if known is None else known | region
            box = _crop_box(known, int(window))
            crop = self.volume.crop([b.start for b in box], [b.stop for b in box])
            statistics = local_evidence(crop, window, np.nonzero(known[box]), statistic)
            values = np.zeros((*known.shape, statistics.shape[1]), dtype=statistics.dtype)
            values[known] = statistics
            self.maps[key] = known, values
        return values[region]


def _refine_pass(model: RefineModel, labels: np.ndarray, volume: "Volume", keep: np.ndarray, reach: int,
                 evidence: _Evidence, spacing: Sequence[float] | None) -> np.ndarray:
    """One pass on the voxels within ``reach`` of ``keep``: ``(Z, Y, X)`` classes there, -1 elsewhere. It runs
    on the bounding box of the voxels it reads (:func:`_crop_box`), and labels as it would on the whole block."""
    foreground = volume.foreground()
    region = _within_reach(keep, reach, foreground)
    context = _within_reach(region, REFINE_CONTEXT if model.beta > 0 else 0, foreground)
    out = np.full(keep.shape, -1, dtype=np.int64)
    if not context.any():
        return out
    box = _crop_box(context, int(4.0 * model.stride + 0.5))  # the prior's Gaussian, truncated at 4 sd
    out[region] = model._labels(labels[box], foreground[box], region[box], context[box],
                                evidence.at(context, model.window, model.statistic),
                                volume.geometry.spacing_zyx if spacing is None else spacing)
    return out


def refine_classes(passes: Sequence[RefineModel], coarse: np.ndarray, volume: "Volume", keep: np.ndarray,
                   local: np.ndarray | None = None, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Refined classes ``(N,)`` of the voxels ``keep`` of a block: every pass of the refinement in turn, each
    with the labels of the pass before as its prior (:data:`REFINE_PASSES`).

    A pass before the last labels every foreground voxel within the later passes' reach of ``keep``
    (:attr:`RefineModel.radius` each), so that the later passes see, around the voxels they keep, the labels
    the whole volume would give them; ``coarse`` (classes ``0..k-1`` of the block's voxels) carries
    ``len(passes)`` radii of context. ``local`` is the evidence of the voxels ``keep`` (:func:`local_evidence`),
    where the caller has it; the passes read the evidence of their voxels from one computation.
    """
    evidence, labels = _Evidence(volume, keep, local), coarse
    for i, model in enumerate(passes):
        labels = _refine_pass(model, labels, volume, keep, sum(later.radius for later in passes[i + 1:]), evidence,
                              spacing)
    return labels[keep]


def fit_refinement(volumes: Sequence["Volume"], coarse: Sequence[np.ndarray], kept: Sequence[np.ndarray],
                   local: Sequence[np.ndarray], n_classes: int, stride: int, window: int, floor: float,
                   spacing: Sequence[float] | None = None) -> tuple[tuple[RefineModel, ...], list[np.ndarray]]:
    """Fit the refinement's passes (:data:`REFINE_PASSES`, read now) on the voxels ``kept`` of one or more blocks.

    Each pass's densities are fitted (:meth:`RefineModel.fit`) on the labels of the pass before (the first's on
    ``coarse``, classes ``0..k-1`` of each block's voxels) at the voxels ``kept``, whose evidence is ``local``;
    a pass before the last labels those voxels' neighbourhood too (:func:`refine_classes`). A pass that would
    empty a class that the labels before it hold is not kept, nor any after it.

    Returns
    -------
    passes : tuple of RefineModel
        The passes kept; empty where the coarse labels hold fewer than two classes or the first pass would
        empty one.
    classes : list of numpy.ndarray
        Per block, the classes of its voxels ``kept`` after the passes kept (the coarse ones where none is).
    """
    final = [c[keep] for c, keep in zip(coarse, kept)]
    present = len(np.unique(np.concatenate(final)))
    passes: tuple[RefineModel, ...] = ()
    if present < 2:
        return passes, final
    labels, fitted = list(coarse), np.concatenate(local)
    n_passes = REFINE_PASSES
    evidence = [_Evidence(v, keep, loc) for v, keep, loc in zip(volumes, kept, local)]
    for p in range(n_passes):
        model = RefineModel.fit(fitted, np.concatenate(final), n_classes, stride, window, floor)
        reach = (n_passes - 1 - p) * model.radius
        refined = [_refine_pass(model, c, v, keep, reach, ev, spacing)
                   for v, c, keep, ev in zip(volumes, labels, kept, evidence)]
        classes = [r[keep] for r, keep in zip(refined, kept)]
        if len(np.unique(np.concatenate(classes))) < present:
            break
        passes, labels, final = passes + (model,), refined, classes
    return passes, final


@dataclass
class Phase2Model:
    """A fitted Phase 2: joint features → class distances → Potts labels → (refined) voxel labels → output ids.

    Attributes
    ----------
    scaling : FeatureScaling
    classes : ClassModel
    refine : tuple of RefineModel
        The passes of the refinement to voxel-level borders (the ``"consensus"`` Phase 2,
        :func:`fit_refinement`); empty otherwise, or where the first pass emptied a class of the fitted voxels.
    order : numpy.ndarray
        ``(k,)`` output id ``1..k`` of every class.
    window : int
        Side of the box of the local mean intensity.
    candidates, agreement, chosen
        ``"consensus"``: every candidate ``(networks, intensity factor)``, their NMI agreement and the one kept.
    """

    scaling: FeatureScaling
    classes: ClassModel
    refine: tuple[RefineModel, ...]
    order: np.ndarray
    window: int
    candidates: list = field(default_factory=list)
    agreement: np.ndarray | None = None
    chosen: int = 0

    @property
    def networks(self) -> tuple[int, ...]:
        """The networks whose features this model reads (the others need not be computed)."""
        return self.scaling.networks

    def to_dict(self) -> dict:
        """Plain arrays and numbers (for :func:`numpy.savez` or ``torch.save(weights_only=True)``)."""
        s, c, r = self.scaling, self.classes, self.refine
        out = {"networks": np.array(s.networks), "means": np.stack(s.means), "scales": np.array(s.scales),
               "local_factor": s.local_factor, "centers": c.centers, "group": c.group,
               "margin": np.nan if c.margin is None else c.margin, "beta": c.beta, "scale": c.scale,
               "order": self.order, "window": self.window}
        if s.local_center is not None:
            out.update(local_center=s.local_center, local_divisor=s.local_divisor)
        if r:  # the passes share their settings; their arrays are stacked on a first axis
            out.update(refine_passes=len(r), refine_means=np.stack([m.means for m in r]),
                       refine_inverses=np.stack([m.inverses for m in r]),
                       refine_logdets=np.stack([m.logdets for m in r]),
                       refine_log_weights=np.stack([m.log_weights for m in r]), refine_stride=r[0].stride,
                       refine_floor=r[0].floor, refine_beta=r[0].beta, refine_statistic=r[0].statistic)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Phase2Model":
        """The inverse of :meth:`to_dict`."""
        get = {k: np.asarray(v) for k, v in d.items()}
        scaling = FeatureScaling(tuple(int(i) for i in get["networks"]), tuple(get["means"]),
                                 tuple(float(v) for v in get["scales"]), get.get("local_center"),
                                 get.get("local_divisor"), float(get["local_factor"]))
        margin = float(get["margin"])
        classes = ClassModel(get["centers"].astype(np.float32), get["group"].astype(np.int64),
                             None if np.isnan(margin) else margin, float(get["beta"]), float(get["scale"]))
        refine: tuple[RefineModel, ...] = ()
        if "refine_means" in get:
            means, inverses, logdets = get["refine_means"], get["refine_inverses"], get["refine_logdets"]
            if "refine_log_weights" in get:
                log_weights = get["refine_log_weights"]
            else:  # saved before the mixtures: one Gaussian per class
                means, inverses, logdets = means[:, None], inverses[:, None], logdets[:, None]
                log_weights = np.zeros(logdets.shape)
            if "refine_passes" not in get:  # saved before the second pass: one
                means, inverses, logdets, log_weights = means[None], inverses[None], logdets[None], log_weights[None]
            beta = float(get["refine_beta"]) if "refine_beta" in get else 0.0  # saved before the voxel Potts model
            statistic = str(get["refine_statistic"]) if "refine_statistic" in get else "mean"  # saved before medians
            refine = tuple(RefineModel(*arrays, int(get["refine_stride"]), int(get["window"]),
                                       float(get["refine_floor"]), beta, statistic)
                           for arrays in zip(means, inverses, logdets, log_weights))
        return cls(scaling, classes, refine, get["order"].astype(np.int64), int(get["window"]))


@dataclass
class Block:
    """Grid positions of one block, their features, and the voxels their patches read.

    Attributes
    ----------
    features : list of numpy.ndarray or None
        Per network: ``(M, D)`` features of the ``selected`` positions in C order (``None`` for a network the
        model does not read).
    selected : numpy.ndarray
        Bool grid block: the positions with a feature.
    volume : Volume
        The normalised voxels the block's patches read, with their foreground; its :class:`~jule3d.grid.Grid`
        is ``grid``.
    grid : Grid
        ``Grid(volume.shape, patch_size, stride)``; its ``grid_shape`` is ``selected.shape``.
    owned : tuple of slice
        The voxels of ``volume`` whose labels this block decides.
    """

    features: list
    selected: np.ndarray
    volume: "Volume"
    grid: "Grid"
    owned: tuple[slice, slice, slice] = (slice(None),) * 3

    @property
    def centers(self) -> np.ndarray:
        """``(M, 3)`` voxel indices of the featured positions' centres, in C order (of ``selected`` as it is now:
        pass B of the chunked engine replaces it)."""
        return self.grid.centers(np.argwhere(self.selected))

    def local(self, window: int) -> np.ndarray:
        """``(M, C)`` raw local mean intensity at the featured positions."""
        return box_means(self.volume, window, tuple(self.centers.T))

    def surface(self) -> np.ndarray:
        """``(M,)`` bool: the featured positions within one grid step of the background
        (:func:`jule3d.segmentation.surface_positions`); the block's voxels reach that far around every position."""
        from .segmentation import surface_positions

        return surface_positions(self.volume.foreground(), self.centers, self.grid.stride)

    @cached_property
    def kept(self) -> np.ndarray:
        """Bool voxels of ``volume``: the foreground voxels it owns (computed once)."""
        keep = np.zeros(self.volume.shape, dtype=bool)
        keep[self.owned] = True
        return keep & self.volume.foreground()


def box_means(volume: "Volume", window: int, positions: tuple[np.ndarray, ...]) -> np.ndarray:
    """``(N, C)`` float32 mean of every channel over the foreground voxels of the ``window``³ box at ``positions``."""
    from .labels import masked_box_mean

    return masked_box_mean(volume.data, volume.foreground(), int(window), positions).T


def local_evidence(volume: "Volume", window: int, positions: tuple[np.ndarray, ...],
                   statistic: str | None = None) -> np.ndarray:
    """``(N, C)`` float32 median (or mean) of every channel over the foreground voxels of the ``window``³ box at
    ``positions``: the refinement's evidence (``statistic``, default :data:`REFINE_STATISTIC`)."""
    from .labels import masked_box_median

    if _refine_statistic(statistic) == "mean":
        return box_means(volume, window, positions)
    return masked_box_median(volume.data, volume.foreground(), int(window), positions).T


def _refine_statistic(statistic: str | None) -> str:
    """``statistic``, or :data:`REFINE_STATISTIC` (read now, so that a patched default reaches every caller) for
    ``None``; a ``ValueError`` naming ``statistic`` for one not in :data:`REFINE_STATISTICS`."""
    from .validation import check_choice

    return REFINE_STATISTIC if statistic is None else check_choice("statistic", statistic, REFINE_STATISTICS)


def _composite(selected: Sequence[np.ndarray]) -> np.ndarray:
    """The blocks' positions side by side along z, one empty plane apart (no neighbour across blocks); the
    C order of its true entries is the blocks' rows one block after the other."""
    if len(selected) == 1:
        return selected[0]
    ny = max(s.shape[1] for s in selected)
    nx = max(s.shape[2] for s in selected)
    planes = []
    for s in selected:
        padded = np.zeros((s.shape[0] + 1, ny, nx), dtype=bool)
        padded[:s.shape[0], :s.shape[1], :s.shape[2]] = s
        planes.append(padded)
    return np.concatenate(planes)


def _stacked(blocks: Sequence[Block], network: int) -> np.ndarray:
    arrays = [b.features[network] for b in blocks]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _coarse_classes(block: Block, labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Classes ``0..k-1`` of the grid positions painted on the block's voxels (the projection rule)."""
    coarse = np.zeros(block.selected.shape, dtype=np.int32)
    coarse[block.selected] = np.asarray(labels) + 1
    return block.grid.to_voxels(coarse, spacing, missing=0) - 1


def fit_phase2(
    blocks: Sequence[Block],
    n_clusters: int,
    seed: int = 0,
    phase2: str = "consensus",
    intensity_weight: float = 1.0,
    window: int = 3,
    smoothing: float = 0.25,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    weights: Sequence[float] | None = None,
) -> tuple[Phase2Model, list[np.ndarray]]:
    """Fit the Phase 2 ``phase2`` on ``blocks`` (the whole grid as one block, or a sample of its chunks).

    Parameters are those of :func:`jule3d.segmentation.label_grids`; ``weights`` are the consensus factors
    (default :data:`jule3d.segmentation.CONSENSUS_WEIGHTS`).

    Returns
    -------
    model : Phase2Model
    labels : list of numpy.ndarray
        Per block, the output labels of its ``owned`` voxels (``uint8``, ``uint16`` above 255 classes).
    """
    from .segmentation import REFINE_FLOOR

    scaling, classes, candidate_labels, candidates, agreement, chosen = fit_classes(
        blocks, n_clusters, seed=seed, phase2=phase2, intensity_weight=intensity_weight, window=window,
        smoothing=smoothing, spacing=spacing, weights=weights)
    labels = candidate_labels[chosen]
    kept = [b.kept for b in blocks]
    k = classes.n_classes
    splits = np.cumsum([int(b.selected.sum()) for b in blocks])[:-1]
    coarse = [_coarse_classes(b, part, spacing) for b, part in zip(blocks, np.split(labels, splits))]
    final = [c[keep] for c, keep in zip(coarse, kept)]
    refine: tuple[RefineModel, ...] = ()
    if phase2 == "consensus":
        voxel_local = [local_evidence(b.volume, window, np.nonzero(keep)) for b, keep in zip(blocks, kept)]
        refine, final = fit_refinement([b.volume for b in blocks], coarse, kept, voxel_local, k,
                                       blocks[0].grid.stride, window, REFINE_FLOOR, spacing)
    first = np.concatenate([np.asarray(b.volume.data[0], dtype=np.float64)[keep] for b, keep in zip(blocks, kept)])
    order = _intensity_order(np.concatenate(final), first, k)
    model = Phase2Model(scaling, classes, refine, order, int(window), candidates, agreement, chosen)
    return model, [output_labels(model, _owned_classes(f, keep, b.owned))
                   for f, keep, b in zip(final, kept, blocks)]


def fit_classes(
    blocks: Sequence[Block],
    n_clusters: int,
    seed: int = 0,
    phase2: str = "consensus",
    intensity_weight: float = 1.0,
    window: int = 3,
    smoothing: float = 0.25,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    weights: Sequence[float] | None = None,
    min_share: float | None = None,
    restarts: int | None = None,
    cross_support: bool = True,
    choice: str = "reproduced",
) -> tuple[FeatureScaling, ClassModel, list[np.ndarray], list, np.ndarray | None, int]:
    """The grid stage of :func:`fit_phase2`: the joint features and class model of the kept candidate.

    ``min_share`` is that of :func:`jule3d.segmentation.choose_candidate` (default its default); ``restarts``
    the k-means restarts of every consensus candidate (default :data:`jule3d.segmentation.CONSENSUS_RESTARTS`);
    ``cross_support`` whether a candidate's support counts only the other network subsets' candidates
    (:func:`jule3d.segmentation.support`; ``False``: all of them, an ablation); ``choice`` the rule that keeps
    a candidate (:data:`jule3d.segmentation.CONSENSUS_CHOICES`, :func:`jule3d.segmentation.choose_candidate`).

    Returns
    -------
    tuple
        ``(scaling, classes, candidate_labels, candidates, agreement, chosen)``: ``scaling`` and ``classes``
        of the kept candidate; ``candidate_labels`` every candidate's ``(M,)`` int32 labels of the blocks'
        positions, one block after the other (one array for ``"kmeans"`` and ``"merge"``); ``candidates``,
        ``agreement`` and ``chosen`` describe the ``"consensus"`` candidates (empty, ``None`` and 0 otherwise).
    """
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    import torch
    from threadpoolctl import threadpool_limits

    from .metrics import pairwise_nmi
    from .segmentation import (
        CONSENSUS_RESTARTS,
        CONSENSUS_WEIGHTS,
        MIN_CLASS_SHARE,
        RESTART_SEED_STEP,
        choose_candidate,
        fit_kmeans,
        fit_merge,
        network_subsets,
    )
    from .validation import check_int

    n_restarts = 1 if phase2 == "merge" else check_int(
        "restarts", CONSENSUS_RESTARTS if restarts is None else restarts, 1)
    n_networks = len(blocks[0].features)
    features = [_stacked(blocks, i) for i in range(n_networks)]
    selected = _composite([b.selected for b in blocks])
    local = np.concatenate([b.local(window) for b in blocks]) if intensity_weight > 0 else None
    surface = np.concatenate([b.surface() for b in blocks]) if phase2 != "kmeans" else None
    n_channels = blocks[0].volume.n_channels
    channel_std = None  # the intensity block's divisor: only the merge candidates with intensity use it
    if phase2 != "kmeans" and intensity_weight > 0:
        channel_std = np.array([np.concatenate([np.asarray(b.volume.data[c], dtype=np.float32)[b.kept]
                                                for b in blocks]).std() for c in range(n_channels)],
                               dtype=np.float32)
    candidates, agreement, chosen = [], None, 0
    if phase2 == "kmeans":
        scaling = FeatureScaling.fit(features, tuple(range(n_networks)), local, None, intensity_weight,
                                     centre=n_networks > 1)
        classes, labels = fit_kmeans(scaling.transform(features, local), selected, n_clusters, seed=seed,
                                     smoothing=smoothing, spacing=spacing)
        return scaling, classes, [labels], candidates, agreement, chosen
    factors = [intensity_weight] if phase2 == "merge" else (
        [0.0] if intensity_weight == 0 else [float(w) * intensity_weight for w in (weights or CONSENSUS_WEIGHTS)])
    subsets = [tuple(range(n_networks))] if phase2 == "merge" else network_subsets(n_networks)
    pairs = [(subset, w) for subset in subsets for w in factors]
    candidates = [(subset, w, r) for subset, w in pairs for r in range(n_restarts)]
    scalings = {(subset, w): FeatureScaling.fit(features, subset, local, channel_std, w / np.sqrt(n_channels))
                for subset, w in pairs}

    def fit_candidate(candidate: tuple) -> tuple:
        subset, w, r = candidate
        scaling = scalings[subset, w]
        return (scaling, *fit_merge(scaling.transform(features, local), selected, n_clusters,
                                    seed=seed + RESTART_SEED_STEP * r, smoothing=smoothing, spacing=spacing,
                                    n_init=3 if phase2 == "merge" else 1, surface=surface))

    # Every candidate is a task of its own, run side by side, one core each (k-means, the bulk of the work,
    # releases the GIL): a task computes its joint features (tens of milliseconds), so that no more of them are
    # held than tasks run, and no core waits for another pair's restarts. Each candidate is seeded on its own,
    # so the result does not depend on the number of workers.
    workers = min(len(candidates), torch.get_num_threads())
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers > 1 else None
        if pool is not None:  # one thread per worker: set here, so that no worker restores another's setting
            stack.enter_context(threadpool_limits(limits=1))
        fits = list(pool.map(fit_candidate, candidates) if pool is not None else map(fit_candidate, candidates))
    candidate_labels = [fit[2] for fit in fits]
    agreement = pairwise_nmi(candidate_labels)
    if len(fits) > 1:
        chosen = choose_candidate(agreement, candidate_labels, n_clusters,
                                  MIN_CLASS_SHARE if min_share is None else min_share,
                                  groups=[c[0] for c in candidates] if cross_support else None,
                                  factors=[c[1] for c in candidates], choice=choice)
    scaling, classes, _ = fits[chosen]
    return scaling, classes, candidate_labels, candidates, agreement, chosen


def _intensity_order(classes: np.ndarray, intensity: np.ndarray, k: int) -> np.ndarray:
    """Output id ``1..k`` of every class: ascending mean intensity, ties and absent classes in class order."""
    counts = np.bincount(classes, minlength=k)
    sums = np.bincount(classes, weights=intensity, minlength=k)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    order = np.empty(k, dtype=np.int64)
    order[np.argsort(means, kind="stable")] = np.arange(1, k + 1)
    return order


def output_labels(model: Phase2Model, classes: np.ndarray) -> np.ndarray:
    """Output labels of classes ``0..k-1`` (``-1`` outside the foreground): ``1..k`` ordered by intensity
    (``model.order``), ``0`` outside; ``uint8``, ``uint16`` above 255 classes."""
    out = np.zeros(classes.shape, dtype=np.uint8 if len(model.order) <= 255 else np.uint16)
    inside = classes >= 0
    out[inside] = model.order[classes[inside]]
    return out


def _owned_classes(classes: np.ndarray, keep: np.ndarray, owned: tuple[slice, ...]) -> np.ndarray:
    """The classes of the voxels ``keep`` painted on the block, ``-1`` elsewhere, at the voxels ``owned``."""
    out = np.full(keep.shape, -1, dtype=np.int32)
    out[keep] = classes
    return out[owned]


def label_block(model: Phase2Model, block: Block, distances: np.ndarray, spacing: Sequence[float],
                passes: int | None = None) -> np.ndarray:
    """Classes ``0..k-1`` of the ``owned`` voxels of a block (``-1`` outside the foreground) from the class
    distances of its ``selected`` positions: the Potts model on the grid, the projection to voxels and the
    refinement's first ``passes`` passes (default: all of them; :func:`refine_block` runs the others).

    The block carries context around what it owns (grid positions for the Potts model, voxels for the
    refinement's prior), so a block labels its voxels as the whole grid would, up to the reach of that context:
    two grid positions for the Potts model and each pass's :attr:`RefineModel.radius` in voxels
    (:func:`jule3d.chunked.halo_positions` for one pass). :func:`output_labels` makes them output labels.
    """
    classes = model.classes.labels(distances, block.selected, spacing)
    coarse = _coarse_classes(block, classes, spacing)
    return refine_block(model.refine[:passes], block, coarse, spacing)


def refine_block(passes: Sequence[RefineModel], block: Block, labels: np.ndarray, spacing: Sequence[float],
                 ) -> np.ndarray:
    """Classes ``0..k-1`` of the ``owned`` voxels of a block (``-1`` outside the foreground) after the refinement
    ``passes`` (:func:`refine_classes`) on ``labels``, the classes of the block's voxels before them (any value
    outside the foreground), which reach ``passes``' radii (:attr:`RefineModel.radius`) around what it owns."""
    keep = block.kept
    final = refine_classes(passes, labels, block.volume, keep, spacing=spacing) if passes and keep.any() \
        else labels[keep]
    return _owned_classes(final, keep, block.owned)


def block_distances(model: Phase2Model, block: Block) -> np.ndarray:
    """``(M, k)`` class distances of a block's featured positions."""
    local = block.local(model.window) if model.scaling.uses_intensity else None
    return model.classes.distances(model.scaling.transform(block.features, local))
