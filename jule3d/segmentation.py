"""Phase 2 of JULE-3D: features on a grid over the whole volume → k-means → labels for every voxel.

The trained network is applied *fully convolutionally* (its final linear layer read as a convolution), chunk
by chunk with the overlap one patch needs, so memory stays bounded whatever the volume size and each grid
position costs a fraction of cropping its patch and running the network on it (Moriya et al. 2018, §2.3;
``docs/method.md``).

Projection rule (tested in ``tests/test_segmentation.py``); the positions and blocks are those of
:class:`jule3d.grid.Grid`:

* Only positions whose centre lies in the foreground mask are clustered.
* Every grid centre labels its ``stride³`` block (:meth:`jule3d.grid.Grid.to_voxels`); a grid position whose
  centre is outside the mask first takes the cluster of the nearest clustered position (in mm), so foreground
  voxels in its block are labelled too.
* [ours] With ``smoothing > 0`` the k-means labels of the grid positions are first regularised by a Potts
  model (:func:`smooth_labels`), before they are projected.
* Voxels outside the mask are 0 (background). Cluster ids ``1..k`` are ordered by the mean intensity of the
  first channel (ascending), so the same seed gives the same ids.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import numpy as np
import torch

from .allocator import retained_heap
from .grid import Grid
from .models import JuleNet3D
from .parameters import PARAMETERS
from .validation import check_choice, check_int, check_weight
from .volume import Volume

if TYPE_CHECKING:
    from .clustering import Block, ClassModel

__all__ = [
    "PHASE2_METHODS", "GridFeatures", "grid_features", "cluster_features", "smooth_labels", "local_intensity",
    "joint_features", "grid_contacts", "merge_clusters", "merge_segment", "CONSENSUS_WEIGHTS", "CONSENSUS_RESTARTS",
    "CONSENSUS_CHOICES", "Consensus", "support", "weight_agreement", "choose_candidate",
    "network_subsets", "consensus_segment", "REFINE_FLOOR", "refine_labels", "project_labels", "label_volume", "label_grids",
    "phase2_weights",
]

#: Grid features above this many bytes are kept in a temporary memory-mapped file instead of RAM.
IN_MEMORY_BYTES = 1 << 30


@dataclass
class GridFeatures:
    """Features of the foreground positions of a regular grid.

    Attributes
    ----------
    features : numpy.ndarray
        ``(M, D)`` float32 unit-norm features of the positions whose centre is in the foreground
        (a memory map for very large volumes).
    grid : Grid
        The positions (:class:`jule3d.grid.Grid`).
    selected : numpy.ndarray
        Bool ``grid.grid_shape`` array: which grid positions have a feature (row order of ``features``).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> grid.features.shape, grid.features.dtype, grid.grid_shape, grid.offset, grid.stride
    ((216, 8), dtype('float32'), (6, 6, 6), 6, 2)
    >>> grid.centers.shape, int(grid.selected.sum())
    ((216, 3), 216)
    """

    features: np.ndarray
    grid: Grid
    selected: np.ndarray

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Number of grid positions along ``(Z, Y, X)``."""
        return self.grid.grid_shape

    @property
    def offset(self) -> int:
        """Voxel index of the first centre along every axis."""
        return self.grid.offset

    @property
    def stride(self) -> int:
        """Voxels between neighbouring centres."""
        return self.grid.stride

    @property
    def centers(self) -> np.ndarray:
        """``(M, 3)`` voxel coordinates ``(z, y, x)`` of the featured positions."""
        return self.grid.centers(np.argwhere(self.selected))


def _check_model_volume(model: JuleNet3D, volume: Volume, stride: int) -> None:
    cfg = model.config
    if cfg.in_channels != volume.n_channels:
        raise ValueError(
            f"the model was trained on {cfg.in_channels} channel(s) but the volume has {volume.n_channels}: "
            "use a model trained on the same channels"
        )
    check_stride(stride, model.stride)  # the volume's size against the patch: Grid


def check_stride(stride: int, native: int) -> None:
    """``stride`` must be a positive integer that divides, or is a multiple of, the network's own stride.

    Examples
    --------
    >>> from jule3d.segmentation import check_stride
    >>> check_stride(1, 2), check_stride(4, 2)
    (None, None)
    >>> check_stride(3, 2)
    Traceback (most recent call last):
        ...
    ValueError: stride=3 must divide or be a multiple of the network's own stride 2
    """
    check_int("stride", stride, 1)
    if stride % native and native % stride:
        raise ValueError(f"stride={stride} must divide or be a multiple of the network's own stride {native}")


def _feature_store(n: int, dim: int) -> np.ndarray:
    if n * dim * 4 <= IN_MEMORY_BYTES:
        return np.empty((n, dim), dtype=np.float32)
    handle, path = tempfile.mkstemp(suffix=".features.npy")
    os.close(handle)
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    os.unlink(path)  # the mapping stays valid; the file disappears with it
    return store


@retained_heap()
def grid_features(
    model: JuleNet3D,
    volume: Volume,
    stride: int = 2,
    method: str = "dense",
    chunk: int = 24,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> GridFeatures:
    """Features of the network at every foreground position of a stride-``stride`` grid.

    Parameters
    ----------
    model : JuleNet3D
        Trained network (used in eval mode).
    volume : Volume
        The (normalised) volume; positions whose centre is outside ``volume.mask`` are skipped.
    stride : int
        Voxels between grid positions; a divisor or a multiple of ``model.stride``.
    method : {"dense", "patchwise"}
        ``"dense"`` runs the fully convolutional network chunk by chunk; ``"patchwise"`` crops every patch
        and runs the network on it (the slow reference that ``dense`` must agree with).
    chunk : int
        Grid positions per chunk side for ``"dense"`` (memory grows with its cube).
    batch_size : int
        Patches per forward pass for ``"patchwise"``.
    device : str or torch.device, optional
        Where to compute; default: the model's device.
    progress : bool
        Show a progress bar over chunks.

    Returns
    -------
    GridFeatures

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> type(grid).__name__, grid.features.shape, grid.grid_shape
    ('GridFeatures', (216, 8), (6, 6, 6))
    >>> slow = grid_features(model, phantom.volume, stride=2, method="patchwise")
    >>> bool(np.allclose(slow.features, grid.features, atol=1e-5))
    True
    """
    from tqdm.auto import tqdm

    _check_model_volume(model, volume, stride)
    if method not in ("dense", "patchwise"):
        raise ValueError(f"method must be 'dense' or 'patchwise', got {method!r}")
    w = model.config.patch_size
    layout = Grid(volume.shape, w, stride)
    grid = layout.grid_shape
    selected = layout.select(volume.foreground())
    if not selected.any():
        raise ValueError("no grid position has its centre in the foreground mask; lower the stride or check the mask")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    store = _feature_store(int(selected.sum()), model.feature_dim)
    row_of = np.cumsum(selected.ravel()).reshape(grid) - 1  # row in `store` of each selected position

    if method == "patchwise":
        from .patches import extract_patches

        pos = np.argwhere(selected)
        for start in tqdm(range(0, len(pos), batch_size * 8), disable=not progress, desc="patch-wise features"):
            batch_pos = pos[start:start + batch_size * 8]
            patches = extract_patches(volume, layout.centers(batch_pos), w)
            store[start:start + len(batch_pos)] = model.embed(patches, batch_size=batch_size, device=device)
        return GridFeatures(store, layout, selected)

    # Dense: the network's native grid has step model.stride; finer strides interleave shifted passes,
    # coarser ones subsample.
    native = model.stride
    shifts = range(0, native, stride) if stride < native else [0]
    step = max(stride // native, 1)  # subsampling of the native grid
    blocks = list(layout.chunks(chunk))
    data = volume.data
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for g0, g1 in tqdm(blocks, disable=not progress, desc="dense features"):
                sel = selected[g0[0]:g1[0], g0[1]:g1[1], g0[2]:g1[2]]
                if not sel.any():
                    continue
                # the network runs on the featured positions' bounding box only (a chunk at a specimen's edge
                # is partly air)
                span = [np.flatnonzero(sel.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
                g0, g1 = (tuple(a + s[0] for a, s in zip(g0, span)), tuple(a + s[-1] + 1 for a, s in zip(g0, span)))
                sel = selected[g0[0]:g1[0], g0[1]:g1[1], g0[2]:g1[2]]
                out = np.empty(tuple(g1[i] - g0[i] for i in range(3)) + (model.feature_dim,), dtype=np.float32)
                for sz in shifts:
                    for sy in shifts:
                        for sx in shifts:
                            shift = (sz, sy, sx)
                            # grid indices of this block served by this shift
                            idx = [np.arange(g0[i], g1[i]) for i in range(3)]
                            idx = [ix[(ix * stride) % native == shift[i]] if stride < native else ix
                                   for i, ix in enumerate(idx)]
                            if any(len(ix) == 0 for ix in idx):
                                continue
                            box = layout.halo([ix[0] for ix in idx], [ix[-1] for ix in idx])
                            block = np.asarray(data[(slice(None),) + box], dtype=np.float32)
                            feats = model.dense(torch.from_numpy(block)[None].to(device))[0]
                            feats = feats[:, ::step, ::step, ::step].permute(1, 2, 3, 0).float().cpu().numpy()
                            local = [ix - g0[i] for i, ix in enumerate(idx)]
                            out[np.ix_(*local)] = feats[: len(local[0]), : len(local[1]), : len(local[2])]
                store[row_of[g0[0]:g1[0], g0[1]:g1[1], g0[2]:g1[2]][sel]] = out[sel]
    finally:
        model.train(was_training)
    return GridFeatures(store, layout, selected)


def cluster_features(
    features: np.ndarray, n_clusters: int, seed: int = 0, max_fit: int = 100_000, return_distances: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """k-means on features: fit on a seeded sample of at most ``max_fit`` rows, assign every row.

    Parameters
    ----------
    features : numpy.ndarray
        ``(M, D)`` features (a memory map is read in chunks).
    n_clusters : int
        Number of clusters ``k``.
    seed : int
        Seed of the sample and of k-means.
    max_fit : int
        Rows k-means is fitted on.
    return_distances : bool
        Also return the squared distance of every row to every centroid (the data term of
        :func:`smooth_labels`).

    Returns
    -------
    labels : numpy.ndarray
        ``(M,)`` cluster index ``0..k-1`` per row (the nearest centroid).
    distances : numpy.ndarray
        Only with ``return_distances``: ``(M, k)`` float32 squared Euclidean distances to the centroids.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> from jule3d.segmentation import cluster_features
    >>> labels, distances = cluster_features(grid.features, 3, seed=0, return_distances=True)
    >>> labels.shape, labels.dtype, sorted(set(labels.tolist())), distances.shape
    ((216,), dtype('int32'), [0, 1, 2], (216, 3))
    >>> bool((distances.argmin(axis=1) == labels).all())
    True
    """
    from .clustering import ClassModel

    _check_clusters(n_clusters, len(features))
    model = ClassModel(_fit_kmeans(features, n_clusters, seed, max_fit, 10), np.arange(n_clusters), None, 0.0, 1.0)
    distances = model.distances(features)
    labels = distances.argmin(axis=1).astype(np.int32)
    return (labels, distances) if return_distances else labels


_NEIGHBOURS = np.array([(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                        if (dz, dy, dx) != (0, 0, 0)])
#: ICM evaluates a parity class by slices of the whole class when more than this share of it is to be evaluated,
#: else by gathering the positions (about ten times the cost per position, and the same sums).
_SPARSE_SWEEP = 0.1


def smooth_labels(
    grid: GridFeatures | np.ndarray,
    distances: np.ndarray,
    beta: float,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    max_iter: int = 20,
    scale: float | None = None,
) -> np.ndarray:
    """[ours] Potts-model regularisation of the cluster labels of the grid positions (ICM).

    Minimises, over the labels ``l`` of the featured positions,

    ``E(l) = sum_i d_i(l_i) / s + beta * sum_(i~j) w_ij [l_i != l_j]``

    where ``d_i(l)`` is the squared distance of position ``i``'s feature to centroid ``l``, ``s`` the median
    over positions of the distance to their own centroid (so ``beta`` does not depend on the feature scale),
    ``i~j`` runs over the 26 grid neighbours that have a feature and ``w_ij = h / |i - j|_mm`` (``h`` the
    smallest grid spacing: 1 for face neighbours of an isotropic grid, ``1/sqrt(2)`` for edge neighbours,
    ``1/sqrt(3)`` for corner neighbours). ``beta = 0`` gives back the k-means labels.

    The minimiser is iterated conditional modes (Besag 1986) started from the k-means labels, run
    sequentially over the 8 parity classes of the grid (no two neighbours share one), so the energy never
    increases and the result is deterministic. It stops when a sweep changes nothing, or after ``max_iter``
    sweeps.

    Parameters
    ----------
    grid : GridFeatures or numpy.ndarray
        The grid the distances belong to (its ``selected`` positions, in row order), or that bool array.
    distances : numpy.ndarray
        ``(M, k)`` squared distances to the centroids, e.g. from
        ``cluster_features(..., return_distances=True)``.
    beta : float
        Weight of the smoothness term, ``>= 0`` (its measured effect: ``benchmarks/README.md``).
    spacing : sequence of 3 float
        Voxel spacing ``(z, y, x)`` in mm; only the ratios matter (the grid stride is the same on every axis).
    max_iter : int
        Most ICM sweeps.
    scale : float, optional
        The divisor ``s`` of the data term; default: the median computed from ``distances`` (a model fitted on
        other positions passes its own, :class:`jule3d.clustering.ClassModel`).

    Returns
    -------
    numpy.ndarray
        ``(M,)`` int32 labels ``0..k-1``.

    Raises
    ------
    ValueError
        If ``distances`` does not have one row per featured position, ``beta`` is negative or not finite, or
        ``spacing`` is not three positive numbers.

    Notes
    -----
    Memory: two float32 arrays of the grid's full shape times ``k``.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> from jule3d.segmentation import cluster_features, smooth_labels
    >>> labels, distances = cluster_features(grid.features, 3, seed=0, return_distances=True)
    >>> bool(np.array_equal(smooth_labels(grid, distances, beta=0.0), labels))
    True
    >>> smoothed = smooth_labels(grid, distances, beta=1.0, spacing=phantom.volume.geometry.spacing_zyx)
    >>> smoothed.shape, smoothed.dtype, sorted(set(smoothed.tolist()))
    ((216,), dtype('int32'), [0, 1, 2])
    """
    check_weight("smoothing", beta)
    distances = np.asarray(distances, dtype=np.float32)
    sel = grid.selected if isinstance(grid, GridFeatures) else np.asarray(grid, dtype=bool)
    if distances.ndim != 2 or distances.shape[0] != int(sel.sum()):
        raise ValueError(f"distances must be an (M, k) array with M = {int(sel.sum())} featured positions, "
                         f"got shape {distances.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be three positive numbers, got {spacing.tolist()}")
    check_int("max_iter", max_iter, 0)
    labels = distances.argmin(axis=1).astype(np.int32)
    if beta == 0 or max_iter == 0:
        return labels
    k = distances.shape[1]
    if scale is None:
        scale = float(np.median(distances.min(axis=1)))
        scale = scale if scale > 0 else max(float(distances.mean()), 1.0)
    unary = np.zeros(sel.shape + (k,), dtype=np.float32)
    unary[sel] = distances / scale
    current = np.zeros(sel.shape, dtype=np.int32)
    current[sel] = labels
    votes_of = np.zeros(tuple(n + 2 for n in sel.shape) + (k,), dtype=np.float32)  # one-hot, padded by 1
    inner = votes_of[1:-1, 1:-1, 1:-1]
    inner[sel, labels] = 1.0
    # A position is evaluated again only once a neighbour has moved: otherwise its best label is the one it was
    # given when last evaluated. This skips most of the work after the first sweeps and changes no label.
    dirty_of = np.zeros(tuple(n + 2 for n in sel.shape), dtype=bool)
    dirty = dirty_of[1:-1, 1:-1, 1:-1]
    dirty[sel] = True
    padded = dirty_of.shape
    flat_votes, flat_dirty = votes_of.reshape(-1, k), dirty_of.reshape(-1)
    steps = [int(np.ravel_multi_index(tuple(o + 1), padded)) - int(np.ravel_multi_index((1, 1, 1), padded))
             for o in _NEIGHBOURS]  # flat offsets of the neighbours in the padded arrays
    weights = [np.float32(w) for w in spacing.min() / np.linalg.norm(_NEIGHBOURS * spacing, axis=1)]
    beta = np.float32(beta)
    for _ in range(max_iter):
        changed = 0
        for parity in np.ndindex(2, 2, 2):
            sub = tuple(slice(p, None, 2) for p in parity)
            todo = dirty[sub] & sel[sub]
            n_todo = int(np.count_nonzero(todo))
            if n_todo == 0:
                continue
            where = np.nonzero(todo)
            full = tuple(p + 2 * w for p, w in zip(parity, where))
            if n_todo > _SPARSE_SWEEP * todo.size:  # most of the class: slices of the whole class
                votes = np.zeros(todo.shape + (k,), dtype=np.float32)
                for offset, w in zip(_NEIGHBOURS, weights):
                    window = tuple(slice(p + 1 + o, p + 1 + o + 2 * (c - 1) + 1, 2)
                                   for p, o, c in zip(parity, offset, todo.shape))
                    votes += w * votes_of[window]
                best = (unary[sub] - beta * votes).argmin(axis=-1)[where]
            else:  # the same sums, gathered at the positions to evaluate
                flat = np.ravel_multi_index(tuple(f + 1 for f in full), padded)
                votes = np.zeros((n_todo, k), dtype=np.float32)
                for step, w in zip(steps, weights):
                    votes += w * flat_votes[flat + step]
                best = (unary[full] - beta * votes).argmin(axis=-1)
            dirty[full] = False
            moved = best != current[full]
            if not moved.any():
                continue
            changed += int(moved.sum())
            full = tuple(f[moved] for f in full)
            best = best[moved]
            inner[full + (current[full],)] = 0.0
            current[full] = best
            inner[full + (best,)] = 1.0
            flat = np.ravel_multi_index(tuple(f + 1 for f in full), padded)
            for step in steps:
                flat_dirty[flat + step] = True
        if changed == 0:
            break
    return current[sel]


def project_labels(grid: GridFeatures, clusters: np.ndarray, volume: Volume) -> np.ndarray:
    """Voxel labels from the clusters of the grid positions (the rule in the module docstring).

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` ``uint8`` labels (``uint16`` above 255 classes): ``1..k`` in the foreground
        (ordered by intensity), 0 outside.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> from jule3d.segmentation import cluster_features, project_labels
    >>> voxels = project_labels(grid, cluster_features(grid.features, 3, seed=0), phantom.volume)
    >>> voxels.shape, voxels.dtype, sorted(np.unique(voxels).tolist())
    ((24, 24, 24), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(np.array_equal(voxels > 0, phantom.volume.mask))
    True
    """
    from .labels import order_labels_by_intensity

    coarse = np.zeros(grid.grid_shape, dtype=np.int32)
    coarse[grid.selected] = np.asarray(clusters) + 1  # 0: no feature, filled from the nearest featured one
    fine = grid.grid.to_voxels(coarse, volume.geometry.spacing_zyx, missing=0)
    mask = volume.foreground()
    return order_labels_by_intensity(fine, np.asarray(volume.data[0]), mask)


def local_intensity(volume: Volume, grid: GridFeatures, window: int = 3) -> np.ndarray:
    """Mean intensity of each channel over the foreground voxels of a ``window``³ box at every featured grid
    centre, standardised.

    Only voxels inside ``volume``'s foreground mask (and inside the volume) enter the mean, so a position at
    the border of the specimen or brain describes its tissue, not a mix of tissue and background (a plain box
    mean pulls the border positions towards the background value).

    Parameters
    ----------
    volume : Volume
        The volume the grid was computed on.
    grid : GridFeatures
        Its grid features (only the centres are used).
    window : int
        Side of the box in voxels (3 covers the voxels a stride-2 grid position labels, and their border).

    Returns
    -------
    numpy.ndarray
        ``(M, C)`` float32, each column with mean 0 and standard deviation 1 over the ``M`` positions
        (a constant column stays 0).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> from jule3d.segmentation import local_intensity
    >>> local = local_intensity(phantom.volume, grid)
    >>> local.shape, local.dtype, round(float(local.mean()), 3), round(float(local.std()), 3)
    ((216, 1), dtype('float32'), 0.0, 1.0)
    """
    from .clustering import FeatureScaling, box_means

    check_int("intensity_window", window, 1)
    local = box_means(volume, window, tuple(grid.centers.T))
    return FeatureScaling.fit([], (), local, None, 1.0).transform([], local)


PHASE2_METHODS: tuple[str, ...] = PARAMETERS["phase2"].choices
"""Phase 2 clusterings: ``"consensus"`` [ours, the default of ``fast``], ``"merge"`` [ours, one of its
candidates] and ``"kmeans"`` (Moriya 2018)."""

#: Clusters of the over-segmentation that :func:`merge_clusters` merges down to ``k`` [ours].
N_OVERCLUSTERS = 32

#: Default Potts weight of the ``"merge"`` and ``"consensus"`` Phase 2, in units of the median class margin:
#: a position whose margin is the median one changes its label only when its neighbours outvote it by 4
#: (a face neighbour counts 1, of 19.1 in all). [ours]
MERGE_SMOOTHING = 0.25

#: Least share of the featured positions that a class must hold [ours]: :func:`merge_clusters` merges a smaller
#: group before any other pair, and a consensus candidate takes part in the choice only when every class holds it
#: (:func:`choose_candidate`). NMI does not see a class that has all but vanished: a candidate whose third class
#: holds 0.1 % of the positions is in effect a split into two, agrees with the others on that split and was chosen
#: (a 512 x 1024 x 1024 micro-CT specimen came out with classes of 0.1, 3001 and 6637 mm³).
MIN_CLASS_SHARE = 0.01

#: How :func:`merge_clusters` weighs the distance of two clusters: ``"centroid"`` [ours, the default] or
#: ``"ward"`` (the default before; an ablation of ``benchmarks/bench_phase2.py``).
MERGE_LINKAGES: tuple[str, ...] = ("centroid", "ward")


def phase2_weights(phase2: str) -> tuple[float, float]:
    """The default ``(intensity_weight, smoothing)`` of a Phase 2 method.

    ``"consensus"`` and ``"merge"`` [ours]: the intensity block at weight 1 and a Potts weight of
    :data:`MERGE_SMOOTHING`; ``"kmeans"``: both 0, the published method.

    Examples
    --------
    >>> phase2_weights("consensus"), phase2_weights("kmeans")
    ((1.0, 0.25), (0.0, 0.0))
    """
    check_choice("phase2", phase2, PHASE2_METHODS)
    return (0.0, 0.0) if phase2 == "kmeans" else (1.0, MERGE_SMOOTHING)


#: Times :func:`merge_segment` halves a Potts weight that empties a class before it gives up smoothing.
MAX_SMOOTHING_HALVINGS = 4


def joint_features(
    grids: Sequence[GridFeatures], volume: Volume, intensity_weight: float = 1.0, window: int = 3
) -> np.ndarray:
    """[ours] The features of one or more networks side by side with the local mean intensity, on one scale.

    Every network's features are centred and scaled so that their mean squared norm is ``1 / n`` (``n``
    networks: the learnt block has total variance 1 whatever their number). The local mean intensity of
    each channel (the mean over the foreground voxels of a ``window``³ box, as in :func:`local_intensity`) is
    centred but *not* re-standardised: it is divided by the standard deviation of that channel's foreground
    voxels and by ``sqrt(C)``, times ``intensity_weight``. Its variance is thus the share of the voxel
    variance that survives averaging over the box: near 1 when classes differ in brightness (0.8-0.9 on
    the intensity phantom and BraTS-ROI's FLAIR), about 0.5 when every class has the same intensity
    distribution (the texture phantom: the box mean there is noise, and standardising it, as
    :func:`local_intensity` does, gave noise the same weight as the classes). So intensity weighs as much
    as it varies at the scale of a label, with no per-dataset setting.

    Parameters
    ----------
    grids : sequence of GridFeatures
        Features of each network on the same grid (same ``selected`` positions).
    volume : Volume
        The volume the grids were computed on.
    intensity_weight : float
        Factor on the intensity block (0: the learnt features alone).
    window : int
        Side of the intensity box in voxels.

    Returns
    -------
    numpy.ndarray
        ``(M, n·D + C)`` float32 (``n·D`` columns when ``intensity_weight`` is 0).

    Raises
    ------
    ValueError
        If the grids do not share their positions, or ``intensity_weight`` / ``window`` are invalid.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> other = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=1)
    >>> grids = [grid, grid_features(other, phantom.volume, stride=2)]
    >>> from jule3d.segmentation import joint_features
    >>> joint_features(grids[:1], phantom.volume).shape, joint_features(grids, phantom.volume).shape
    ((216, 9), (216, 17))
    >>> joint_features(grids, phantom.volume, intensity_weight=0).shape
    (216, 16)
    """
    from .clustering import FeatureScaling

    check_weight("intensity_weight", intensity_weight)
    check_int("intensity_window", window, 1)
    block = whole_block(grids, volume)
    local = block.local(window) if intensity_weight > 0 else None
    std = np.array([np.asarray(c, dtype=np.float32)[volume.foreground()].std() for c in volume.data],
                   dtype=np.float32)
    scaling = FeatureScaling.fit(block.features, tuple(range(len(grids))), local, std,
                                 intensity_weight / np.sqrt(volume.n_channels))
    return scaling.transform(block.features, local)


def _check_shared_positions(grids: Sequence[GridFeatures]) -> None:
    if not grids or any(g.selected.shape != grids[0].selected.shape or not np.array_equal(g.selected, grids[0].selected)
                        for g in grids):
        raise ValueError("the networks' grid features must share their positions (same patch size and stride)")


def grid_contacts(grid: GridFeatures | np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Number of face-neighbour pairs of featured grid positions between every two labels.

    ``grid``: the grid features, or their bool ``selected`` array (``labels`` in its C order).

    Returns
    -------
    numpy.ndarray
        ``(n_labels, n_labels)`` symmetric float64 counts, zero diagonal.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> from jule3d.segmentation import grid_contacts
    >>> labels = (grid.centers[:, 0] > 12).astype(int)  # two slabs along z
    >>> contacts = grid_contacts(grid, labels, 2)
    >>> contacts.shape, contacts.dtype, contacts.tolist()
    ((2, 2), dtype('float64'), [[0.0, 36.0], [36.0, 0.0]])
    """
    sel = grid.selected if isinstance(grid, GridFeatures) else np.asarray(grid, dtype=bool)
    full = np.full(sel.shape, -1, dtype=np.int64)
    full[sel] = labels
    contacts = np.zeros((n_labels, n_labels))
    for axis in range(3):
        a = np.delete(full, -1, axis=axis).ravel()
        b = np.delete(full, 0, axis=axis).ravel()
        pair = (a >= 0) & (b >= 0) & (a != b)
        np.add.at(contacts, (a[pair], b[pair]), 1.0)
    return contacts + contacts.T


def surface_positions(foreground: np.ndarray, centers: np.ndarray, depth: float) -> np.ndarray:
    """Which positions lie on the surface of the foreground: their centre is within ``depth`` voxels of a
    background voxel (the edges of the array are not background).

    Parameters
    ----------
    foreground : numpy.ndarray
        ``(Z, Y, X)`` bool foreground.
    centers : numpy.ndarray
        ``(M, 3)`` int voxel indices of the positions' centres.
    depth : float
        Largest distance (voxels) from a background voxel of a surface position.

    Returns
    -------
    numpy.ndarray
        ``(M,)`` bool.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.segmentation import surface_positions
    >>> foreground = np.ones((1, 1, 9), dtype=bool)
    >>> foreground[0, 0, 0] = False  # one background voxel at the left end; the right end is the array's edge
    >>> centers = np.array([[0, 0, x] for x in range(1, 9)])
    >>> surface_positions(foreground, centers, 2).tolist()
    [True, True, False, False, False, False, False, False]
    """
    foreground = np.asarray(foreground, dtype=bool)
    centers = np.asarray(centers, dtype=np.int64).reshape(-1, 3)
    # look up the voxels of the ball around every centre, one offset at a time: memory of the positions, not of
    # the volume (a Euclidean distance transform of the Iguana took 47 bytes a voxel)
    r = int(np.floor(depth))
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    offsets = offsets[(offsets**2).sum(axis=1) <= depth**2]
    shape = np.array(foreground.shape)
    surface = np.zeros(len(centers), dtype=bool)
    for offset in offsets:
        near = centers + offset
        ask = np.nonzero(~surface & np.all((near >= 0) & (near < shape), axis=1))[0]
        surface[ask] = ~foreground[tuple(near[ask].T)]
    return surface


def merge_clusters(
    contacts: np.ndarray,
    sizes: np.ndarray,
    centroids: np.ndarray,
    n_clusters: int,
    surface: np.ndarray | None = None,
    min_share: float = MIN_CLASS_SHARE,
    linkage: str = "centroid",
) -> np.ndarray:
    """[ours] Merge an over-segmentation down to ``n_clusters`` clusters by likeness, discounted by contact.

    Greedy agglomeration; at every step the pair with the smallest

    ``cost(a, b) = |m_a - m_b|² / (1 + c_ab / min(n_a, n_b))``

    merges, where ``n`` are the clusters' sizes, ``m`` their centroids and ``c_ab`` the number of grid-neighbour
    pairs between the two clusters. The numerator is the squared distance of the centroids (small for clusters
    that look alike); the discount is the share of the smaller cluster that touches the other (up to about 3-5
    for a thin band along a border, or for fragments of one tissue that interleave; 0 for clusters that never
    meet). A band of border patches between two tissues, whose features mix both and which k-means makes a class
    of its own, touches both sides everywhere and joins the side it resembles; clusters that never touch can
    still merge when they look alike (air cavities in different places). Dividing by the contact instead
    (``touch / distance``) chains tissues through a partial-volume band and never joins separate cavities (seen
    on the Iguana micro-CT); the discount keeps them apart.

    Two kinds of group are not tissues, and merge before any pair of other groups does (as long as some group is
    of neither kind):

    * a group more than half of whose positions lie on the surface of the foreground (``surface``): the
      partial-volume layer where the specimen meets the air, whose patches mix tissue and background, the border
      class that k-means makes at the specimen's own border. It joins the group it touches most, the tissue
      beneath it, and not the one it resembles (the darkest, where the background is air);
    * a group holding less than ``min_share`` of the positions, a speck (:data:`MIN_CLASS_SHARE`, the least class
      share the consensus accepts), which joins its cheapest partner.

    The cost does not grow with the clusters' sizes. Ward's cost (``linkage="ward"``, the default before, with
    neither rule) weighs the distance by ``n_a n_b / ((n_a + n_b) N)`` (``N`` positions in all), the increase of
    the within-cluster sum of squares, and so shares k-means' preference for classes of equal size: a small
    tissue that differs clearly from its neighbour (a tumour core of 3 % of a BraTS-ROI crop) merged into it
    before two large parts of one tissue did. ``docs/method.md`` 5.5 has the measurements.

    Parameters
    ----------
    contacts : numpy.ndarray
        ``(K, K)`` contact counts (:func:`grid_contacts`).
    sizes : numpy.ndarray
        ``(K,)`` positions per cluster (all positive).
    centroids : numpy.ndarray
        ``(K, D)`` cluster means.
    n_clusters : int
        Clusters to keep.
    surface : numpy.ndarray, optional
        ``(K,)`` positions of every cluster on the surface of the foreground (:func:`surface_positions`);
        ``None``: none.
    min_share : float
        Least share of the positions of a group that is not a speck (0: no specks).
    linkage : {"centroid", "ward"}
        The distance of the cost: the centroids' squared distance, or Ward's increase of the sum of squares
        (:data:`MERGE_LINKAGES`).

    Returns
    -------
    numpy.ndarray
        ``(K,)`` int64 merged cluster ``0..n_clusters-1`` of every input cluster, numbered in order of the
        lowest input cluster of each group. Deterministic: ties go to the lowest pair.

    Examples
    --------
    Clusters 1 and 2 have the same centroid and touch: they merge first.

    >>> import numpy as np
    >>> from jule3d.segmentation import merge_clusters
    >>> contacts = np.array([[0, 5, 0], [5, 0, 1], [0, 1, 0]], dtype=float)
    >>> merge_clusters(contacts, np.array([10, 10, 10]), np.array([[0.0], [1.0], [1.0]]), 2).tolist()
    [0, 1, 1]

    A small, distinct cluster (2: 3 % of the positions, inside cluster 1) stays a class, and the two large
    halves of one tissue merge; Ward's cost merges the small cluster instead. Where most of its positions lie on
    the surface, it is the specimen's border layer, and joins the cluster it touches.

    >>> contacts = np.array([[0, 400, 0], [400, 0, 60], [0, 60, 0]], dtype=float)
    >>> sizes, centroids = np.array([1000, 1000, 60]), np.array([[0.0], [0.6], [2.0]])
    >>> merge_clusters(contacts, sizes, centroids, 2).tolist()
    [0, 0, 1]
    >>> merge_clusters(contacts, sizes, centroids, 2, linkage="ward").tolist()
    [0, 1, 1]
    >>> merge_clusters(contacts, sizes, centroids, 2, surface=np.array([50, 20, 40])).tolist()
    [0, 1, 1]
    """
    check_choice("linkage", linkage, MERGE_LINKAGES)
    contacts = np.array(contacts, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64).copy()
    centroids = np.array(centroids, dtype=np.float64)
    on_surface = np.zeros(len(sizes)) if surface is None else np.asarray(surface, dtype=np.float64).copy()
    n_total = sizes.sum()
    group = np.arange(len(sizes))
    alive = np.ones(len(sizes), dtype=bool)
    while alive.sum() > n_clusters:
        idx = np.nonzero(alive)[0]
        n, touching = sizes[idx], contacts[np.ix_(idx, idx)]
        layer = on_surface[idx] > 0.5 * n
        marginal = (n < min_share * n_total) | layer
        layer_contacts = np.where(layer[:, None], touching, 0.0)
        if not marginal.all() and layer_contacts.max() > 0:
            # a border layer joins the group it touches most: the tissue beneath it, not the one it resembles
            i, j = sorted(np.unravel_index(int(np.argmax(layer_contacts)), layer_contacts.shape))
        else:
            cost = ((centroids[idx, None, :] - centroids[None, idx, :]) ** 2).sum(-1)
            cost /= 1.0 + touching / np.minimum.outer(n, n)
            if linkage == "ward":
                cost *= np.outer(n, n) / np.add.outer(n, n) / n_total
            if marginal.any() and not marginal.all():
                cost[~np.logical_or.outer(marginal, marginal)] = np.inf
            cost[np.tril_indices(len(idx))] = np.inf
            i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        a, b = idx[i], idx[j]
        centroids[a] = (centroids[a] * sizes[a] + centroids[b] * sizes[b]) / (sizes[a] + sizes[b])
        sizes[a] += sizes[b]
        on_surface[a] += on_surface[b]
        contacts[a] += contacts[b]
        contacts[:, a] += contacts[:, b]
        contacts[a, a] = 0.0
        contacts[b] = 0.0
        contacts[:, b] = 0.0
        alive[b] = False
        group[group == b] = a
    _, out = np.unique(group, return_inverse=True)
    return out.astype(np.int64)


def merge_segment(
    features: np.ndarray,
    grid: GridFeatures,
    n_clusters: int,
    seed: int = 0,
    smoothing: float = MERGE_SMOOTHING,
    n_overclusters: int = N_OVERCLUSTERS,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    max_fit: int = 50_000,
    n_init: int = 3,
    surface: np.ndarray | None = None,
) -> np.ndarray:
    """[ours] Over-cluster, merge by spatial contact and likeness, then Potts-regularise: labels of the grid.

    1. k-means with ``n_overclusters`` clusters (``n_init`` restarts, fitted on a seeded sample of ``max_fit``
       rows).
    2. :func:`merge_clusters` merges them to ``n_clusters`` groups.
    3. Each position's distance to a group is its squared distance to the nearest centroid of the group's
       over-clusters (a group may hold several modes, e.g. the enhancing rim and the necrosis of a tumour
       core); :func:`smooth_labels` regularises the labels with weight ``smoothing`` (0: the nearest group).
       Where that empties a class, the weight is halved (at most :data:`MAX_SMOOTHING_HALVINGS` times, then
       the nearest group is kept).

    Parameters
    ----------
    features : numpy.ndarray
        ``(M, D)`` features of the featured grid positions, e.g. :func:`joint_features`.
    grid : GridFeatures
        The grid (positions in row order of ``features``).
    n_clusters : int
        Number of classes ``k``.
    seed : int
        Seed of the sample and of k-means.
    smoothing : float
        Potts weight ``beta`` of :func:`smooth_labels`, in units of the median margin between a position's
        nearest and second-nearest group (:data:`MERGE_SMOOTHING`).
    n_overclusters : int
        Clusters of step 1 (at least ``n_clusters``; fewer when there are fewer positions).
    spacing : sequence of 3 float
        Voxel spacing, for the Potts weights.
    max_fit : int
        Rows k-means is fitted on.
    n_init : int
        k-means restarts of step 1 (the one with the lowest inertia is kept).
    surface : numpy.ndarray, optional
        ``(M,)`` bool: the positions on the surface of the foreground (:func:`surface_positions`), for
        :func:`merge_clusters`; ``None``: none.

    Returns
    -------
    numpy.ndarray
        ``(M,)`` int32 labels ``0..n_clusters-1``.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> from jule3d.segmentation import joint_features, merge_segment
    >>> features = joint_features([grid], phantom.volume)
    >>> labels = merge_segment(features, grid, 3, seed=0, spacing=phantom.volume.geometry.spacing_zyx)
    >>> labels.shape, labels.dtype, sorted(set(labels.tolist()))
    ((216,), dtype('int32'), [0, 1, 2])
    """
    return fit_merge(features, grid.selected, n_clusters, seed=seed, smoothing=smoothing,
                     n_overclusters=n_overclusters, spacing=spacing, max_fit=max_fit, n_init=n_init,
                     surface=surface)[1]


def _check_clusters(n_clusters: int, n: int) -> None:
    check_int("n_clusters", n_clusters, 2)
    if n_clusters > n:
        raise ValueError(f"n_clusters={n_clusters} exceeds the {n} grid positions with a feature; lower the stride")


def _plusplus_float64(features: np.ndarray, n_clusters: int, random_state: np.random.RandomState) -> np.ndarray:
    """scikit-learn's greedy k-means++ seeding of ``features``, computed in float64 (``KMeans``'s ``init``).

    On float32 rows scikit-learn seeds through its chunked "upcast" distances: every one of the ``k`` steps
    converts the whole sample to float64 chunk by chunk, and keeps the distances it samples from, and their
    cumulative sum, in float32. On 50,000 rows of 70 columns and 32 centres that took 0.25 s against 0.11 s for
    the same seeding in float64; in a profile of the 45 consensus candidates of a run, the seeding took 16 s of
    their 37 s of k-means. The Lloyd/Elkan iterations stay in float32.
    """
    from sklearn.cluster import kmeans_plusplus

    return kmeans_plusplus(np.asarray(features, dtype=np.float64), n_clusters, random_state=random_state)[0]


def _fit_kmeans(features: np.ndarray, n_clusters: int, seed: int, max_fit: int, n_init: int) -> np.ndarray:
    """Centres ``(k, D)`` of k-means (``n_init`` restarts, k-means++ seeding in float64) on a seeded sample of at
    most ``max_fit`` rows."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n = len(features)
    rng = np.random.default_rng(seed)
    fit = features if n <= max_fit else features[np.sort(rng.choice(n, size=max_fit, replace=False))]
    # One thread (OpenMP and BLAS): on 2 cores shared with torch or other processes, sklearn's threaded Lloyd
    # iterations spin and ran 20x slower than one thread (measured: 7.7 s vs 0.38 s for 14k x 64).
    # Elkan's algorithm: the same Lloyd iterations, with triangle-inequality bounds skipping most distances;
    # 1.5x faster than plain Lloyd on 50,000 joint features and 32 centres (same iterations, labels equal but
    # for rounding: 0.9998-1 of the rows).
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=n_clusters, init=_plusplus_float64, n_init=n_init, random_state=seed,
                    algorithm="elkan").fit(np.asarray(fit, dtype=np.float32))
    return km.cluster_centers_.astype(np.float32)


def fit_kmeans(
    features: np.ndarray, selected: np.ndarray, n_clusters: int, seed: int = 0, smoothing: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0), max_fit: int = 100_000,
) -> tuple[ClassModel, np.ndarray]:
    """The ``"kmeans"`` Phase 2 as a model: k-means centres, and the Potts weight ``smoothing`` with the scale
    of the fitted positions. Returns the model and the labels of ``features`` (positions ``selected``)."""
    from .clustering import ClassModel

    check_weight("smoothing", smoothing)
    _check_clusters(n_clusters, len(features))
    model = ClassModel(_fit_kmeans(features, n_clusters, seed, max_fit, 10), np.arange(n_clusters), None,
                       float(smoothing), 1.0)
    distances = model.distances(features)
    scale = float(np.median(distances.min(axis=1)))
    model.scale = scale if scale > 0 else max(float(distances.mean()), 1.0)
    return model, model.labels(distances, selected, spacing)


def fit_merge(
    features: np.ndarray,
    selected: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    smoothing: float = MERGE_SMOOTHING,
    n_overclusters: int = N_OVERCLUSTERS,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    max_fit: int = 50_000,
    n_init: int = 3,
    surface: np.ndarray | None = None,
) -> tuple[ClassModel, np.ndarray]:
    """:func:`merge_segment` as a model that labels other positions the same way.

    Parameters are those of :func:`merge_segment`, with the grid's bool ``selected`` positions (rows of
    ``features`` in its C order) instead of the grid.

    Returns
    -------
    model : ClassModel
        The centres, their classes after merging, the median margin and the Potts weight that kept every class.
    labels : numpy.ndarray
        ``(M,)`` int32 labels of ``features``.
    """
    from .clustering import ClassModel

    check_weight("smoothing", smoothing)
    n = len(features)
    _check_clusters(n_clusters, n)
    check_int("n_overclusters", n_overclusters, n_clusters)  # at least n_clusters
    n_over = min(int(n_overclusters), n)
    centers = _fit_kmeans(features, n_over, seed, max_fit, n_init)
    nearest = ClassModel(centers, np.arange(n_over), None, 0.0, 1.0).distances(features)
    over = nearest.argmin(axis=1)
    used, over = np.unique(over, return_inverse=True)  # over-clusters that received no position are dropped
    nearest = nearest[:, used]
    sizes = np.bincount(over, minlength=len(used))
    means = np.stack([np.asarray(features[over == c], dtype=np.float64).mean(axis=0) for c in range(len(used))])
    on_surface = None if surface is None else np.bincount(over, weights=surface, minlength=len(used))
    group = merge_clusters(grid_contacts(selected, over, len(used)), sizes, means, min(n_clusters, len(used)),
                           surface=on_surface)
    distances = np.stack([nearest[:, group == g].min(axis=1) for g in range(group.max() + 1)], axis=1)
    merged = group[over].astype(np.int32)
    margin = None
    if distances.shape[1] > 1:
        # A constant per row changes no decision of the Potts model; this one makes the scale of
        # smooth_labels the median margin between a position's nearest and second-nearest group, so
        # ``smoothing`` is in units of how clearly positions belong to their class.
        ordered = np.partition(distances, 1, axis=1)
        margin = float(np.median(ordered[:, 1] - ordered[:, 0]))
        margin = margin if margin > 0 else 1.0
        distances = distances - ordered[:, :1] + np.float32(margin)
    model = ClassModel(centers[used], group, margin, 0.0, margin if margin is not None else 1.0)
    # The Potts term regularises borders; it must not decide the number of classes (on a grid of a few
    # hundred positions it can absorb a whole class): the weight is halved until every class survives.
    n_classes = len(np.unique(merged))
    for halving in range(MAX_SMOOTHING_HALVINGS + 1):
        model.beta = smoothing / 2 ** halving
        smoothed = model.labels(distances, selected, spacing)
        if len(np.unique(smoothed)) == n_classes:
            return model, smoothed
    model.beta = 0.0
    return model, merged


#: Factors on the intensity block of the candidates of the ``"consensus"`` Phase 2: a geometric range around
#: the variance-matched scale of :func:`joint_features` [ours].
CONSENSUS_WEIGHTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

#: k-means restarts of every ``"consensus"`` candidate, each one more member of the ensemble [ours]. With one
#: k-means initialisation per candidate, the kept candidate depended on that initialisation: on BraTS-ROI
#: pat0003 the one-restart medoid scored 0.624, 0.668 or 0.682 (mean of seeds 0-4) with k-means seeds shifted
#: by 0, 1000 or 2000, and nothing else changed.
CONSENSUS_RESTARTS = 3

#: Restart ``r`` of a consensus candidate seeds its k-means with ``seed + RESTART_SEED_STEP * r`` (restart 0 is
#: the candidate's single run, so a one-restart consensus is a subset of the default's ensemble).
RESTART_SEED_STEP = 1000

#: The rules :func:`choose_candidate` keeps a consensus candidate by: ``"reproduced"`` (the default [ours]: the
#: candidate the other networks reproduce best at its own intensity factor), and the rules before it, as
#: ablations: ``"factor-first"`` (the factor whose candidates agree best across networks, then its medoid) and
#: ``"medoid"`` (the medoid of all factors' candidates).
CONSENSUS_CHOICES = ("reproduced", "factor-first", "medoid")


@dataclass
class Consensus:
    """The candidate segmentations of :func:`consensus_segment` and the one it keeps.

    Attributes
    ----------
    candidate_labels : list of numpy.ndarray
        ``(M,)`` int32 labels of the featured grid positions, one array per candidate (before refinement).
    candidates : list of tuple
        ``(networks, intensity_weight, restart)`` of every candidate: which networks' features it clusters
        (indices into the grids), the factor on the intensity block, and which k-means restart it is
        (:data:`RESTART_SEED_STEP`).
    agreement : numpy.ndarray
        ``(R, R)`` NMI between every two candidates' labels (diagonal 1).
    chosen : int
        Index of the kept candidate (:func:`choose_candidate`): of the candidates that keep every class, the
        one with the highest mean NMI to the candidates of the other network subsets at its own intensity
        factor (:func:`support`).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> other = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=1)
    >>> grids = [grid, grid_features(other, phantom.volume, stride=2)]
    >>> from jule3d.segmentation import consensus_segment
    >>> consensus = consensus_segment(grids, phantom.volume, 3, seed=0, weights=(0.5, 1.0), restarts=2)
    >>> type(consensus).__name__, consensus.labels.shape, len(consensus.candidates), consensus.agreement.shape
    ('Consensus', (216,), 12, (12, 12))
    >>> consensus.candidates[:3], consensus.support.shape
    ([((0, 1), 0.5, 0), ((0, 1), 0.5, 1), ((0, 1), 1.0, 0)], (12,))
    >>> bool(np.array_equal(consensus.labels, consensus.candidate_labels[consensus.chosen]))
    True
    """

    candidate_labels: list[np.ndarray]
    candidates: list[tuple[tuple[int, ...], float]]
    agreement: np.ndarray
    chosen: int

    @property
    def labels(self) -> np.ndarray:
        """``(M,)`` int32 labels of the featured grid positions: those of the chosen candidate."""
        return self.candidate_labels[self.chosen]

    @property
    def support(self) -> np.ndarray:
        """``(R,)`` mean NMI of every candidate to the candidates of the other network subsets (to all the
        other candidates where there is one subset; 1 when there is one candidate): :func:`support`, over every
        factor. The default choice scores a candidate among its own factor's only
        (``support(agreement, groups, factors)``, :func:`choose_candidate`), so :attr:`chosen` need not be the
        highest of these."""
        return support(self.agreement, [c[0] for c in self.candidates])


def support(agreement: np.ndarray, groups: Sequence[Hashable] | None = None,
            factors: Sequence[float] | None = None) -> np.ndarray:
    """[ours] How well each consensus candidate is reproduced by the others: its mean NMI to the candidates of
    the *other* groups (network subsets), or to all other candidates where there is one group (or ``groups``
    is ``None``); where ``factors`` are given, only to those of the same intensity factor.

    The candidates that cluster one feature space (one network subset, with several intensity factors and
    k-means restarts) share that space's errors and agree with each other for that reason alone. Counted
    among the supporters, they let whichever space yields the most self-consistent candidates win by its
    numbers: on BraTS-ROI pat0003 seed 3 of the cached networks (with Ward's merge of then), 11 near-identical
    candidates of the two-network space merged the tumour core into the oedema, and one of them was the medoid,
    while most candidates of network 0 alone kept the core. Counting only the other
    spaces' candidates asks which segmentation networks trained apart reproduce (``docs/method.md`` 5.5).

    Parameters
    ----------
    agreement : numpy.ndarray
        ``(R, R)`` NMI between every two candidates (diagonal 1).
    groups : sequence, optional
        ``R`` hashable group ids (the network subset of each candidate); ``None``: one group.
    factors : sequence of float, optional
        ``R`` factors on the intensity block: count only the candidates of a candidate's own factor
        (:func:`choose_candidate`).

    Returns
    -------
    numpy.ndarray
        ``(R,)`` mean NMI; 1 where there is one candidate, NaN where a candidate has no other to count.

    Examples
    --------
    Candidates 0 and 1 cluster one space and agree closely; candidate 2, of another space, agrees better with
    candidate 1 than with candidate 0.

    >>> import numpy as np
    >>> from jule3d.segmentation import support
    >>> agreement = np.array([[1.0, 0.9, 0.3], [0.9, 1.0, 0.7], [0.3, 0.7, 1.0]])
    >>> support(agreement).round(2).tolist(), support(agreement, ["a", "a", "b"]).round(2).tolist()
    ([0.6, 0.8, 0.5], [0.3, 0.7, 0.5])

    Where candidate 1 alone is of factor 2, it has no candidate of its factor in another space to count.

    >>> support(agreement, ["a", "a", "b"], [1.0, 2.0, 1.0]).round(2).tolist()
    [0.3, nan, 0.3]
    """
    agreement = np.asarray(agreement, dtype=np.float64)
    r = len(agreement)
    if r == 1:
        return np.ones(1)
    ids = _group_ids(groups, r)
    counted = ids[:, None] != ids[None, :]
    if not counted.any():  # one group: every other candidate counts
        counted = ~np.eye(r, dtype=bool)
    if factors is not None:
        factors = np.asarray(factors, dtype=np.float64)
        counted &= factors[:, None] == factors[None, :]
    n = counted.sum(axis=1)
    return np.where(n > 0, (agreement * counted).sum(axis=1) / np.maximum(n, 1), np.nan)


def weight_agreement(agreement: np.ndarray, factors: Sequence[float],
                     groups: Sequence[Hashable] | None = None) -> dict[float, float]:
    """[ours] How well each intensity factor's candidates reproduce one another across feature spaces: for every
    factor, the mean NMI between two of its candidates of *different* ``groups`` (network subsets). The
    ``"factor-first"`` rule of :func:`choose_candidate` (the rule before, an ablation) keeps the medoid of the
    factor where it is highest.

    A factor that leaves the partition to what the networks learnt apart, or to the intensity they share, gives
    the same segmentation from every network when that is what the volume holds, and a spread of them when
    it is not: on the intensity phantom (seed 2), with networks that learnt texture, the factors 2 and 4 agree
    at 0.97-0.98 across networks and the factors up to 1 at 0.76-0.83 (``docs/method.md`` 5.6). This is
    clustering stability (Lange et al. 2004, Neural Computation 16: 1299-1323) used to choose a parameter of the
    clustering, with independently trained networks as the perturbation. Candidates of one group (one network, or ``groups``
    ``None``) have no such perturbation: k-means restarts on the same features agree for that reason alone,
    and keeping the most restart-stable candidate lost to the medoid (``docs/method.md`` 5.6), so no pair of
    one group counts.

    Parameters
    ----------
    agreement : numpy.ndarray
        ``(R, R)`` NMI between every two candidates (diagonal 1).
    factors : sequence of float
        The ``R`` candidates' factors on the intensity block.
    groups : sequence, optional
        ``R`` hashable group ids (the network subset of each candidate); ``None``: one group.

    Returns
    -------
    dict
        Factor -> mean NMI, for the factors with at least one pair of candidates of different groups (empty
        where there is one group).

    Examples
    --------
    Two networks' candidates at two factors: at factor 2 they agree (0.9), at factor 0.5 they do not (0.4).

    >>> import numpy as np
    >>> from jule3d.segmentation import weight_agreement
    >>> agreement = np.array([[1.0, 0.4, 0.7, 0.6], [0.4, 1.0, 0.5, 0.6],
    ...                       [0.7, 0.5, 1.0, 0.9], [0.6, 0.6, 0.9, 1.0]])
    >>> weight_agreement(agreement, [0.5, 0.5, 2.0, 2.0], ["a", "b", "a", "b"])
    {0.5: 0.4, 2.0: 0.9}
    >>> weight_agreement(agreement, [0.5, 0.5, 2.0, 2.0], None)
    {}
    """
    agreement = np.asarray(agreement, dtype=np.float64)
    factors = np.asarray(factors, dtype=np.float64)
    ids = _group_ids(groups, len(agreement))
    counted = ids[:, None] != ids[None, :]
    result = {}
    for factor in np.unique(factors):
        members = factors == factor
        pairs = counted & members[:, None] & members[None, :]
        if pairs.any():
            result[float(factor)] = float(agreement[pairs].mean())
    return result


def _group_ids(groups: Sequence[Hashable] | None, r: int) -> np.ndarray:
    """Integer ids of hashable group ids, in order of first appearance; zeros where ``groups`` is ``None``."""
    if groups is None:
        return np.zeros(r, dtype=np.int64)
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)


def choose_candidate(agreement: np.ndarray, labels: Sequence[np.ndarray], n_clusters: int,
                     min_share: float = MIN_CLASS_SHARE, groups: Sequence[Hashable] | None = None,
                     factors: Sequence[float] | None = None, choice: str = "reproduced") -> int:
    """[ours] The consensus candidate to keep: of the candidates that keep all ``n_clusters`` classes, the one
    that networks trained apart reproduce best with its own intensity factor.

    A candidate keeps its classes when each holds at least ``min_share`` of its positions; the others take no
    part (where none keeps all its classes, all of them take part). With ``choice="reproduced"`` (the default),
    each remaining candidate is scored by its :func:`support` among the remaining candidates of the other
    ``groups`` *and of its own factor*: its mean NMI to the segmentations that the other feature spaces give
    under the same clustering. This is clustering stability (Lange et al. 2004, Neural Computation 16:
    1299-1323) judged candidate by candidate, with independently trained networks as the perturbation. A
    candidate with nothing to count (its factor's candidates in the other groups all lost a class) is passed
    over, unless no candidate has anything to count. Ties go to the first.

    The other choices are the rules before, kept as ablations. ``"factor-first"``: the factor of the highest
    :func:`weight_agreement` first, then its candidate of the highest :func:`support` among *all* the remaining
    candidates. It averages a factor over all its candidates and so decides between two factors by a hair: on
    the lung phantom (seed 0) factor 0.25 beat factor 2 by 0.817 to 0.816, and its medoid scored 0.768 where
    the candidate reproduced best at its own factor scores 0.879 (``docs/method.md`` 5.8). ``"medoid"``: the
    candidate of the highest :func:`support` among all the remaining, whatever its factor; where the networks
    learnt texture and the classes differ in intensity it fell between the large factors' tight group (0.95)
    and the small factors' spread, on a middle factor's candidate (0.87, ``docs/method.md`` 5.6). Without
    ``factors``, or with one group (one network: k-means restarts on one feature space are no perturbation),
    every choice is the medoid.

    Parameters
    ----------
    agreement : numpy.ndarray
        ``(R, R)`` NMI between every two candidates' labels (diagonal 1).
    labels : sequence of numpy.ndarray
        The ``R`` candidates' ``(M,)`` labels ``0..n_clusters-1`` of the same positions.
    n_clusters : int
        Number of classes asked for.
    min_share : float
        Least share of the positions in every class (default :data:`MIN_CLASS_SHARE`; 0: the plain medoid).
    groups : sequence, optional
        ``R`` hashable ids of the feature space (network subset) each candidate clusters (:func:`support`);
        ``None``: one group, the medoid over all candidates.
    factors : sequence of float, optional
        The ``R`` candidates' factors on the intensity block; ``None``: the medoid of all the candidates.
    choice : {"reproduced", "factor-first", "medoid"}
        The rule (:data:`CONSENSUS_CHOICES`): the default, or one of the rules before (ablations).

    Returns
    -------
    int
        Index of the kept candidate.

    Examples
    --------
    Candidate 0 is a split into two with one position in 1000 left in class 2: it agrees best with the
    others, and is passed over.

    >>> import numpy as np
    >>> from jule3d.metrics import nmi
    >>> from jule3d.segmentation import choose_candidate
    >>> labels = [np.repeat([0, 1, 2], [500, 499, 1]), np.repeat([0, 1, 2], [500, 400, 100]),
    ...           np.repeat([0, 2, 1], [400, 100, 500])]
    >>> agreement = np.array([[nmi(a, b) for b in labels] for a in labels])
    >>> agreement.round(2)
    array([[1.  , 0.85, 0.84],
           [0.85, 1.  , 0.73],
           [0.84, 0.73, 1.  ]])
    >>> choose_candidate(agreement, labels, 3), choose_candidate(agreement, labels[:1] * 3, 3)
    (1, 0)

    Where candidates 1 and 2 are of one group, each is judged by candidate 0 alone, and candidate 1's 0.85 beats
    candidate 0's mean of 0.845.

    >>> choose_candidate(agreement, labels, 3, min_share=0.0), choose_candidate(agreement, labels, 3, 0.0, "abb")
    (0, 1)

    Six candidates, one per network (``"a"``, ``"b"``) and factor (0.5, 1, 2): the two of factor 2 reproduce each
    other across the networks (0.95), those of factor 1 agree moderately with everything (0.7-0.75), and the
    medoid of all six is one of the middle factor's. The candidates of factor 2 are the ones the other network
    reproduces best.

    >>> agreement = np.array([[1.0, 0.6, 0.75, 0.75, 0.4, 0.4], [0.6, 1.0, 0.75, 0.75, 0.4, 0.4],
    ...                       [0.75, 0.75, 1.0, 0.7, 0.75, 0.75], [0.75, 0.75, 0.7, 1.0, 0.75, 0.75],
    ...                       [0.4, 0.4, 0.75, 0.75, 1.0, 0.95], [0.4, 0.4, 0.75, 0.75, 0.95, 1.0]])
    >>> labels, groups, factors = [np.repeat([0, 1, 2], 10)] * 6, "ababab", [0.5, 0.5, 1, 1, 2, 2]
    >>> choose_candidate(agreement, labels, 3, groups=groups), choose_candidate(agreement, labels, 3,
    ...                                                                         groups=groups, factors=factors)
    (2, 4)
    """
    check_choice("choice", choice, CONSENSUS_CHOICES)
    pool = complete_candidates(labels, n_clusters, min_share)
    pool_groups = None if groups is None else [groups[i] for i in pool]
    pool_agreement = agreement[np.ix_(pool, pool)]
    scores = support(pool_agreement, pool_groups)
    if factors is not None and pool_groups is not None and len(set(pool_groups)) > 1 and choice != "medoid":
        pool_factors = np.asarray(factors, dtype=np.float64)[pool]
        if choice == "reproduced":
            own = support(pool_agreement, pool_groups, pool_factors)
            if np.isfinite(own).any():
                scores = np.where(np.isfinite(own), own, -np.inf)
        else:
            stability = weight_agreement(pool_agreement, pool_factors, pool_groups)
            if stability:
                best = max(stability, key=lambda f: (stability[f], -f))  # ties: the smaller factor
                scores = np.where(pool_factors == best, scores, -np.inf)
    return int(pool[np.argmax(scores)])


def complete_candidates(labels: Sequence[np.ndarray], n_clusters: int,
                        min_share: float = MIN_CLASS_SHARE) -> np.ndarray:
    """[ours] Indices of the candidates whose every class holds ``min_share`` of the positions (all of them
    where none does): the pool :func:`choose_candidate` chooses from.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.segmentation import complete_candidates
    >>> labels = [np.repeat([0, 1, 2], [500, 499, 1]), np.repeat([0, 1, 2], [500, 400, 100])]
    >>> complete_candidates(labels, 3).tolist(), complete_candidates(labels[:1], 3).tolist()
    ([1], [0])
    """
    complete = np.array([np.bincount(np.asarray(lab), minlength=n_clusters).min() >= min_share * len(lab)
                         for lab in labels])
    return np.flatnonzero(complete) if complete.any() else np.arange(len(labels))


def network_subsets(n_networks: int) -> list[tuple[int, ...]]:
    """The networks whose features each consensus candidate clusters: all of them together, then each alone.

    Examples
    --------
    >>> network_subsets(2), network_subsets(1)
    ([(0, 1), (0,), (1,)], [(0,)])
    """
    together = [tuple(range(n_networks))]
    return together if n_networks == 1 else together + [(i,) for i in range(n_networks)]


def consensus_segment(
    grids: Sequence[GridFeatures],
    volume: Volume,
    n_clusters: int,
    seed: int = 0,
    intensity_weight: float = 1.0,
    window: int = 3,
    smoothing: float = MERGE_SMOOTHING,
    weights: Sequence[float] = CONSENSUS_WEIGHTS,
    min_share: float = MIN_CLASS_SHARE,
    restarts: int = CONSENSUS_RESTARTS,
    cross_support: bool = True,
    choice: str = "reproduced",
) -> Consensus:
    """[ours] Several :func:`merge_segment` candidates; keep the one that agrees best with the others.

    How much the local intensity should count against the learnt structure depends on the data (much on
    an MRI lesion, little on a texture), and one network can learn a worse feature space than another. With
    no labels to decide, every combination of the networks (:func:`network_subsets`) with every factor of
    ``weights`` (times ``intensity_weight``) on the intensity block of :func:`joint_features` is segmented
    by :func:`merge_segment` ``restarts`` times, each from its own k-means initialisation (one k-means run
    each: every restart is a member of the ensemble). The candidate with the highest mean NMI to the candidates
    that the *other* network subsets give at the same factor (:func:`support`, :func:`choose_candidate`) is
    kept: the "best of" consensus of Strehl & Ghosh (2002, JMLR 3: 583-617), counted across feature spaces so
    that a space's own near-identical candidates do not outvote the others, and within one clustering setting
    so that it asks which segmentation networks trained apart reproduce under it. The restarts make the
    choice rest on the ensemble, not on one k-means initialisation. A candidate that collapsed (a network that
    merged two tissues, an intensity factor that drowns a texture) agrees little with the rest and is not
    chosen.
    NMI does not see a class that has all but vanished, so only the candidates whose every class holds
    ``min_share`` of the positions take part (:func:`choose_candidate`).

    Parameters
    ----------
    grids : sequence of GridFeatures
        Features of each network on the same grid.
    volume : Volume
        The volume the grids were computed on.
    n_clusters : int
        Number of classes ``k``.
    seed : int
        Seed of every candidate's k-means.
    intensity_weight : float
        Factor on all of ``weights`` (0: the learnt features alone, one candidate per network subset).
    window : int
        Side of the intensity box of :func:`joint_features`.
    smoothing : float
        Potts weight of :func:`merge_segment`.
    weights : sequence of float
        Factors on the intensity block, one candidate each per network subset.
    min_share : float
        Least share of the positions in every class of a candidate that takes part in the choice
        (:func:`choose_candidate`; 0: the plain medoid, an ablation).
    restarts : int
        k-means restarts of every (networks, weight) pair (:data:`CONSENSUS_RESTARTS`; 1: one candidate each,
        an ablation).
    cross_support : bool
        Judge a candidate by its agreement with the candidates of the other network subsets only
        (:func:`support`); ``False``: with all other candidates, the rule before (an ablation).
    choice : {"reproduced", "factor-first", "medoid"}
        How the candidate is kept (:func:`choose_candidate`): the default, or one of the rules before (ablations).
        With one network, or ``cross_support=False``, there are no subsets to compare, and every choice is the
        medoid.

    Returns
    -------
    Consensus
        The chosen labels, the candidates and their agreement.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> other = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=1)
    >>> grids = [grid, grid_features(other, phantom.volume, stride=2)]
    >>> from jule3d.segmentation import consensus_segment
    >>> consensus = consensus_segment(grids, phantom.volume, 3, seed=0, weights=(1.0,), restarts=1)
    >>> consensus.candidates
    [((0, 1), 1.0, 0), ((0,), 1.0, 0), ((1,), 1.0, 0)]
    >>> consensus.labels.shape, sorted(set(consensus.labels.tolist()))
    ((216,), [0, 1, 2])
    """
    from .clustering import fit_classes

    check_weight("intensity_weight", intensity_weight)
    if not weights or any(isinstance(w, bool) or not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be a non-empty sequence of non-negative numbers, got {weights!r}")
    _, _, candidate_labels, candidates, agreement, chosen = fit_classes(
        [whole_block(grids, volume)], n_clusters, seed=seed, phase2="consensus", intensity_weight=intensity_weight,
        window=window, smoothing=smoothing, spacing=volume.geometry.spacing_zyx, weights=weights, min_share=min_share,
        restarts=restarts, cross_support=cross_support, choice=choice)
    return Consensus(candidate_labels, candidates, agreement, chosen)


def whole_block(grids: Sequence[GridFeatures], volume: Volume) -> Block:
    """The networks' grid features over the whole volume as one :class:`jule3d.clustering.Block`."""
    from .clustering import Block

    _check_shared_positions(grids)
    return Block([g.features for g in grids], grids[0].selected, volume, grids[0].grid)


#: Least prior probability of a class at a voxel in :func:`refine_labels`: deep inside a region of the coarse
#: labels a voxel changes class only when its local intensity is 1000 times likelier under another [ours].
REFINE_FLOOR = 1e-3


def refine_labels(
    labels: np.ndarray, volume: Volume, stride: int, window: int = 3, floor: float = REFINE_FLOOR
) -> np.ndarray:
    """[ours] Voxel-level borders for labels of a grid: the grid labels as a spatial prior, intensity as evidence.

    Labels projected from a grid are blocks of ``stride`` voxels from features of whole patches, so their
    borders are uncertain by about a block. Each voxel takes the class of highest posterior

    ``log P(c | x) = log max(prior_c(x), floor) + log p_c(m(x))``

    where ``prior_c`` is the share of class ``c`` among the coarse labels, smoothed by a Gaussian of standard
    deviation ``stride`` voxels (renormalised over the foreground), ``m(x)`` the median of every channel over
    the foreground voxels of the ``window``³ box at ``x`` (:data:`jule3d.clustering.REFINE_STATISTIC`: a
    median does not mix the two sides of a border, as a mean does), and ``p_c`` the density of ``m`` over the voxels
    of class ``c``, a mixture of :data:`jule3d.clustering.REFINE_COMPONENTS` Gaussians
    (:class:`jule3d.clustering.RefineModel`): Atropos' use of prior probability maps (Avants et al. 2011,
    Neuroinformatics 9: 381-400) with the network's segmentation as the prior. Where the classes differ in
    brightness the border moves to the intensity edge; where they do not (textures), the likelihoods are
    alike and the prior keeps the labels. A class of tissue and air spaces has a mode for each, and a
    Gaussian for each keeps its tissue voxels from a tighter all-tissue neighbour. As in Atropos, a Potts
    model couples neighbouring voxels' labels (weight :data:`jule3d.clustering.REFINE_SMOOTHING` nats,
    :meth:`jule3d.clustering.RefineModel.apply`), so that a border where one voxel's evidence is weak is placed
    by its neighbourhood's, not left as a speckle.

    The refinement runs :data:`jule3d.clustering.REFINE_PASSES` times (:func:`jule3d.clustering.fit_refinement`):
    each pass after the first takes the labels of the pass before as its prior and refits the densities to
    them, so that the second reads its prior and densities from borders placed to the voxel, not from blocks of a
    grid step.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(Z, Y, X)`` labels ``1..k`` inside the foreground, 0 outside (:func:`project_labels`).
    volume : Volume
        The volume with its foreground mask.
    stride : int
        Grid stride the labels were projected from: the prior's smoothing in voxels.
    window : int
        Side of the intensity box in voxels.
    floor : float
        Least prior probability, in ``(0, 1)``.

    Returns
    -------
    numpy.ndarray
        Labels of the same dtype, ``1..k`` ordered by mean intensity of the first channel; the input labels
        when the first pass would empty a class, and the first pass's labels when the second would.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> from jule3d.segmentation import label_volume, refine_labels
    >>> coarse = label_volume(model, phantom.volume, 3, stride=2, phase2="kmeans")
    >>> refined = refine_labels(coarse, phantom.volume, stride=2)
    >>> refined.shape, refined.dtype, sorted(np.unique(refined).tolist())
    ((24, 24, 24), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(np.array_equal(refined > 0, phantom.volume.mask))
    True
    """
    from .clustering import _intensity_order, fit_refinement, local_evidence

    check_int("intensity_window", window, 1)
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor!r}")
    foreground = volume.foreground()
    classes, inside = np.unique(labels[foreground], return_inverse=True)
    if len(classes) < 2:
        return labels
    coarse = np.zeros(labels.shape, dtype=np.int64)
    coarse[foreground] = inside
    local = local_evidence(volume, window, np.nonzero(foreground))
    passes, (refined,) = fit_refinement([volume], [coarse], [foreground], [local], len(classes), stride, window,
                                        floor)
    if not passes:
        return labels
    order = _intensity_order(refined, np.asarray(volume.data[0], dtype=np.float64)[foreground], len(classes))
    out = np.zeros_like(labels)
    out[foreground] = order[refined]
    return out


def label_volume(
    model: JuleNet3D | Sequence[JuleNet3D],
    volume: Volume,
    n_clusters: int,
    stride: int = 2,
    seed: int = 0,
    phase2: str = "consensus",
    intensity_weight: float | None = None,
    intensity_window: int = 3,
    smoothing: float | None = None,
    progress: bool = False,
    **feature_options: Any,
) -> np.ndarray:
    """Segment a volume with one or more trained networks: grid features → clustering → labels for every voxel.

    Parameters
    ----------
    model : JuleNet3D or sequence of JuleNet3D
        Trained network(s), same channels as the volume and the same patch size. Several networks (an
        ensemble, e.g. trained with different seeds) are clustered on their features side by side.
    volume : Volume
        Normalised volume with its foreground mask.
    n_clusters : int
        Number of classes ``k``.
    stride : int
        Grid stride in voxels.
    seed : int
        Seed of k-means.
    phase2 : {"consensus", "merge", "kmeans"}
        ``"merge"`` [ours]: :func:`joint_features` (the networks' features and the local mean intensity on
        one scale) → 32 k-means clusters → :func:`merge_clusters` to ``k`` by spatial contact and likeness →
        Potts regularisation (:func:`merge_segment`). It keeps a band of border patches from becoming a class
        of its own. ``"consensus"`` [ours, default]: ``"merge"`` on every combination of the networks with
        five weights of the intensity block, from three k-means initialisations each, keeping the candidate
        that agrees best with those of the other network subsets (:func:`consensus_segment`), so neither one
        network's training nor one balance of intensity and structure decides the result; then voxel-level
        borders (:func:`refine_labels`). ``"kmeans"``: k-means with ``k`` clusters on the features, Moriya
        2018's Phase 2 (with ``intensity_weight`` and ``smoothing`` left at 0, the published method).
        ``benchmarks/README.md`` has the measured ablations.
    intensity_weight : float, optional
        [ours] Weight of the local mean intensity. ``"merge"`` and ``"consensus"``: factor on the intensity
        block of :func:`joint_features` (default 1; for ``"consensus"`` it scales all of
        :data:`CONSENSUS_WEIGHTS`). ``"kmeans"``: the standardised local mean intensity
        (:func:`local_intensity`) times this weight is appended to the features (default 0, the published
        method).
    intensity_window : int
        Side (voxels) of the box over which the local mean intensity of the foreground is taken (and, for
        ``"consensus"``, the median of the refinement's evidence).
    smoothing : float, optional
        [ours] Weight ``beta`` of the Potts term that regularises the labels of the grid positions
        (:func:`smooth_labels`). Default :data:`MERGE_SMOOTHING` for ``"merge"`` and ``"consensus"`` (there
        in units of the median margin between a position's nearest and second-nearest class, see
        :func:`merge_segment`), 0 (the published method) for ``"kmeans"``.
    progress : bool
        Show progress bars.
    **feature_options
        Passed to :func:`grid_features` (``chunk``, ``device``, ...).

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` labels, ``uint8`` (``uint16`` above 255 classes): 0 background, 1..k classes.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import label_volume
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> labels = label_volume(model, phantom.volume, 3, stride=2, phase2="kmeans")
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((24, 24, 24), dtype('uint8'), [0, 1, 2, 3])
    """
    models = [model] if isinstance(model, JuleNet3D) else list(model)
    if not models:
        raise ValueError("label_volume needs at least one model")
    # bad options fail before the grid features are computed
    intensity_weight, smoothing = _phase2_options(phase2, intensity_weight, smoothing)
    grids = [grid_features(m, volume, stride=stride, progress=progress, **feature_options) for m in models]
    return label_grids(grids, volume, n_clusters, seed=seed, phase2=phase2, intensity_weight=intensity_weight,
                       intensity_window=intensity_window, smoothing=smoothing)


def _phase2_options(phase2: str, intensity_weight: float | None, smoothing: float | None) -> tuple[float, float]:
    """``intensity_weight`` and ``smoothing``, the method's defaults where ``None``, checked."""
    default_weight, default_smoothing = phase2_weights(phase2)
    intensity_weight = default_weight if intensity_weight is None else intensity_weight
    smoothing = default_smoothing if smoothing is None else smoothing
    check_weight("intensity_weight", intensity_weight)
    check_weight("smoothing", smoothing)
    return intensity_weight, smoothing


@retained_heap()
def label_grids(
    grids: Sequence[GridFeatures],
    volume: Volume,
    n_clusters: int,
    seed: int = 0,
    phase2: str = "consensus",
    intensity_weight: float | None = None,
    intensity_window: int = 3,
    smoothing: float | None = None,
) -> np.ndarray:
    """The clustering of :func:`label_volume`, from the networks' grid features: labels for every voxel.

    Parameters are those of :func:`label_volume`; ``grids`` are the networks' :func:`grid_features` on one
    grid.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` labels, ``uint8`` (``uint16`` above 255 classes): 0 background, 1..k classes.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.models import JuleNet3D, net_config
    >>> from jule3d.phantom import make_phantom
    >>> from jule3d.segmentation import grid_features
    >>> phantom = make_phantom(shape=(24, 24, 24), seed=0)
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> grid = grid_features(model, phantom.volume, stride=2)
    >>> other = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=1)
    >>> grids = [grid, grid_features(other, phantom.volume, stride=2)]
    >>> from jule3d.segmentation import label_grids
    >>> labels = label_grids(grids, phantom.volume, 3, phase2="merge")
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((24, 24, 24), dtype('uint8'), [0, 1, 2, 3])
    """
    from .clustering import fit_phase2

    intensity_weight, smoothing = _phase2_options(phase2, intensity_weight, smoothing)
    check_int("intensity_window", intensity_window, 1)
    return fit_phase2([whole_block(grids, volume)], n_clusters, seed=seed, phase2=phase2,
                      intensity_weight=intensity_weight, window=intensity_window, smoothing=smoothing,
                      spacing=volume.geometry.spacing_zyx)[1][0]
