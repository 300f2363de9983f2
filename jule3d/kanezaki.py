"""Kim & Kanezaki 2020 in 3D: unsupervised segmentation by differentiable feature clustering.

The closest deep peer of JULE-3D, with the signature of the baselines (:mod:`jule3d.baselines`)::

    kanezaki_segment(volume, n_classes, mask=None, seed=0, **options) -> labels

Method (Kim, Kanezaki & Tanaka 2020; the authors' ``demo.py``)
--------------------------------------------------------------
A small fully convolutional network is trained on the one image it segments. ``n_conv`` blocks of a
3³ convolution with ``n_channels`` filters, ReLU and batch normalisation (in this order, as in the
authors' code) are followed by a 1³ convolution to ``q = n_channels`` response channels and a batch
normalisation of the responses. Each iteration takes the argmax of the responses as the voxels'
labels (the differentiable clustering: normalisation + argmax) and makes one SGD step on

    L = CE(responses, argmax labels) + mu * (mean |r[z+1] - r[z]| + mean |r[y+1] - r[y]| + mean |r[x+1] - r[x]|)

the cross-entropy of the responses with their own argmax (feature similarity) plus ``mu`` times the
spatial continuity loss (L1 of the response differences between neighbours), here along the three
axes. Training stops when the argmax uses at most ``n_classes`` labels (the authors' ``minLabels``)
or after ``max_iter`` iterations.

What differs from the 2D original [ours]
----------------------------------------
* **Mask.** Voxels outside the mask are set to 0 (the foreground mean after
  :func:`jule3d.normalize.normalize_intensity`) before the network sees them, both losses are taken
  over mask voxels only (continuity: neighbour pairs with both voxels in the mask), and the label
  count of the stopping rule is taken over mask voxels.
* **Crops.** A volume larger than ``crop_size`` along any axis is trained on one random
  ``crop_size``³ crop per iteration, centred on a random mask voxel (the original trains on the whole
  image); the stopping rule then counts the labels of the crop. After training the batch-norm
  statistics are re-estimated over 16 crops (the whole volume when it fits) and
  the volume is labelled fully convolutionally in 64³ chunks with a halo of ``n_conv`` voxels,
  so the result does not depend on the chunking.
* **Exactly k classes.** The original returns however many labels remain. Here, when the argmax over
  the mask holds more than ``n_classes`` labels, they are merged by k-means (``n_classes`` clusters,
  weighted by voxel count) on their mean response vectors; when it holds fewer (the network
  collapsed), the mask voxels are re-labelled by k-means on their response vectors (fitted on a
  seeded sample of at most 50,000 voxels).
* **Budget.** ``max_iter`` defaults to 100 instead of the authors' 1000, with ``crop_size = 32``,
  which keeps a 96³ volume on a CPU within the budget of JULE-3D's ``fast`` preset.

Defaults and their sources: ``n_channels = 100`` (paper and authors' code: q = 100), ``n_conv = 2``
(authors' code, ``nConv``), ``lr = 0.1`` with momentum 0.9 (authors' code), ``mu = 5`` (the paper's
continuity weight for unsupervised segmentation as we read it; the authors' ``demo.py`` defaults
to ``stepsize_con = 1``), ``max_iter = 100`` and ``crop_size = 32`` [ours, the CPU budget above].

Measured quality (NMI per case and seed, next to k-means and JULE-3D): see
``benchmarks/bench_quality.py`` and the README's Measured section. With the defaults, training usually
ends by the stopping rule before ``max_iter``; with ``mu = 1`` (the authors' code) it tends to run every
iteration.

Labels follow the baselines' convention: ``uint8`` ``(Z, Y, X)``, ``0`` outside the mask, ``1..k``
ordered by the mean intensity of the first channel (:func:`jule3d.labels.order_labels_by_intensity`).
Deterministic for a given seed on the CPU: the weights are drawn from a forked torch RNG seeded with
``seed``, the crops from ``numpy.random.default_rng(seed)``, and deterministic algorithms are enforced
while it runs (the global torch state is restored afterwards).

References
----------
W. Kim, A. Kanezaki and M. Tanaka, "Unsupervised Learning of Image Segmentation Based on
Differentiable Feature Clustering", IEEE Transactions on Image Processing 29, 8055-8068 (2020),
arXiv:2007.09990. Code: https://github.com/kanezaki/pytorch-unsupervised-segmentation-tip
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from .validation import check_int, check_range, check_weight
from .volume import Volume

__all__ = ["kanezaki_segment"]

_CHUNK = 64  # side of the chunks labelled at once after training (bounds the inference memory)
_CALIBRATION_CROPS = 16  # crops over which the batch-norm statistics are re-estimated after training
_MAX_FIT = 50_000  # voxels sampled for the k-means fallback when fewer than k labels remain
_KMEANS_INIT = 10  # k-means restarts of the label merging


class _ResponseNet(nn.Module):
    """Kim & Kanezaki's network in 3D: ``n_conv`` x (3³ conv, ReLU, BN), then 1³ conv and BN."""

    def __init__(self, in_channels: int, n_channels: int, n_conv: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(n_conv):
            layers += [nn.Conv3d(c_in, n_channels, 3, padding=1), nn.ReLU(), nn.BatchNorm3d(n_channels)]
            c_in = n_channels
        layers += [nn.Conv3d(n_channels, n_channels, 1), nn.BatchNorm3d(n_channels)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Responses ``(N, q, z, y, x)`` of an input ``(N, C, z, y, x)``."""
        return self.layers(x)


def kanezaki_segment(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    n_channels: int = 100,
    n_conv: int = 2,
    mu: float = 5.0,
    lr: float = 0.1,
    max_iter: int = 100,
    crop_size: int = 32,
) -> np.ndarray:
    """Segment a volume with Kim & Kanezaki's self-trained CNN (3D, masked, exactly ``k`` classes).

    See the module docstring for the method and for what differs from the 2D original.

    Parameters
    ----------
    volume : Volume
        Input image (all channels are the network's input); give channels comparable scales
        (:func:`jule3d.normalize.normalize_intensity` z-scores them).
    n_classes : int
        Number of classes ``k`` (>= 2); also the label count at which training stops.
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the network weights and of the training crops.
    n_channels : int
        Filters per convolution and number ``q`` of response channels, i.e. the most labels the
        argmax can use (paper: 100). Must exceed ``n_classes``.
    n_conv : int
        Number of 3³ conv + ReLU + BN blocks (authors' code: 2); the receptive field is
        ``2 * n_conv + 1`` voxels wide.
    mu : float
        Weight of the spatial continuity loss (>= 0; paper: 5). Larger values give fewer, smoother
        regions and make training stop earlier.
    lr : float
        SGD learning rate (momentum 0.9; authors' code: 0.1).
    max_iter : int
        Most training iterations (one SGD step on one crop each; authors' code: 1000) [ours: 100].
    crop_size : int
        Side of the training crops (>= 3) [ours: 32]; a volume that fits is trained whole.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.

    Raises
    ------
    ValueError
        If ``n_classes`` is not an integer >= 2, the mask is empty or misshapen, the mask holds
        non-finite intensities or fewer distinct ones than ``n_classes``, or an option is out of
        range (the message names it).

    References
    ----------
    W. Kim, A. Kanezaki and M. Tanaka, "Unsupervised Learning of Image Segmentation Based on
    Differentiable Feature Clustering", IEEE Trans. Image Process. 29, 8055-8068 (2020).

    Examples
    --------
    A tiny budget on a 16³ phantom (the defaults train for up to 100 iterations):

    >>> import numpy as np
    >>> from jule3d.kanezaki import kanezaki_segment
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = kanezaki_segment(volume, 3, max_iter=5, n_channels=8)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(np.all(labels[~volume.mask] == 0))
    True
    >>> bool(np.array_equal(labels, kanezaki_segment(volume, 3, max_iter=5, n_channels=8)))
    True
    """
    # imported here, not at the top: jule3d.baselines registers this method, so it may import this module
    from .baselines import _prepare
    from .labels import order_labels_by_intensity

    mask, _ = _prepare(volume, n_classes, mask)
    check_int("n_channels", n_channels, n_classes + 1)
    check_int("n_conv", n_conv, 1)
    check_int("max_iter", max_iter, 0)
    check_int("crop_size", crop_size, 3)
    check_weight("mu", mu)
    check_range("lr", lr, 0.0, math.inf, low_open=True)

    image = np.where(mask, np.asarray(volume.data, dtype=np.float32), np.float32(0))
    x = torch.from_numpy(image)[None]
    m = torch.from_numpy(mask)[None, None]
    rng = np.random.default_rng(seed)
    with _seeded_torch(seed):
        net = _ResponseNet(x.shape[1], n_channels, n_conv)
        crops = _CropSampler(mask, crop_size, rng)
        _train(net, x, m, crops, n_classes, float(mu), float(lr), max_iter)
        _calibrate_batch_norm(net, x, crops)
        net.eval()
        codes = _label_mask(net, x, mask, n_conv, n_classes, seed, rng)
    labels = np.zeros(volume.shape, dtype=np.int64)
    labels[mask] = codes
    return order_labels_by_intensity(labels, volume.data[0], mask)


@contextmanager
def _seeded_torch(seed: int) -> Iterator[None]:
    """Seed a forked CPU RNG and enforce deterministic algorithms; restore both afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)


class _CropSampler:
    """Random ``crop_size``³ boxes centred on mask voxels (the whole volume when it fits)."""

    def __init__(self, mask: np.ndarray, crop_size: int, rng: np.random.Generator) -> None:
        self.shape = mask.shape
        self.size = tuple(min(crop_size, s) for s in self.shape)
        self.whole = self.size == self.shape
        self.centres = None if self.whole else np.flatnonzero(mask)
        self.rng = rng

    def __call__(self) -> tuple[slice, ...]:
        """Slices ``(z, y, x)`` of the next crop."""
        if self.whole:
            return tuple(slice(0, s) for s in self.shape)
        centre = np.unravel_index(self.centres[self.rng.integers(self.centres.size)], self.shape)
        starts = [min(max(c - w // 2, 0), s - w) for c, w, s in zip(centre, self.size, self.shape)]
        return tuple(slice(a, a + w) for a, w in zip(starts, self.size))


def _train(
    net: _ResponseNet,
    x: torch.Tensor,
    m: torch.Tensor,
    crops: _CropSampler,
    n_classes: int,
    mu: float,
    lr: float,
    max_iter: int,
) -> None:
    """SGD on self-labelling cross-entropy + ``mu`` x continuity until <= ``n_classes`` labels remain."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(max_iter):
        box = (slice(None), slice(None)) + crops()
        inside = m[box]  # never empty: a crop is centred on a mask voxel
        responses = net(x[box])
        flat = responses.permute(0, 2, 3, 4, 1)[inside[:, 0]]
        target = flat.argmax(dim=1)
        if torch.unique(target).numel() <= n_classes:
            break
        loss = F.cross_entropy(flat, target) + mu * _continuity(responses, inside)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _continuity(responses: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Sum over z, y, x of the mean |difference| of neighbouring responses, both voxels in the mask."""
    total = responses.new_zeros(())
    for axis in (2, 3, 4):
        n = responses.shape[axis]
        if n < 2:
            continue
        diff = (responses.narrow(axis, 1, n - 1) - responses.narrow(axis, 0, n - 1)).abs()
        pairs = inside.narrow(axis, 1, n - 1) & inside.narrow(axis, 0, n - 1)
        count = pairs.sum()
        if count > 0:
            total = total + (diff * pairs).sum() / (count * responses.shape[1])
    return total


@torch.no_grad()
def _calibrate_batch_norm(net: _ResponseNet, x: torch.Tensor, crops: _CropSampler) -> None:
    """Re-estimate every BN layer's running statistics as the average over training-like crops."""
    norms = [layer for layer in net.modules() if isinstance(layer, nn.BatchNorm3d)]
    for layer in norms:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average
    net.train()
    for _ in range(1 if crops.whole else _CALIBRATION_CROPS):
        net(x[(slice(None), slice(None)) + crops()])


@torch.no_grad()
def _chunk_responses(
    net: _ResponseNet, x: torch.Tensor, mask: np.ndarray, halo: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (flat mask-voxel indices, their responses ``(n, q)``) chunk by chunk, in a fixed order."""
    shape = mask.shape
    for z in range(0, shape[0], _CHUNK):
        for y in range(0, shape[1], _CHUNK):
            for xx in range(0, shape[2], _CHUNK):
                core = tuple(slice(a, min(a + _CHUNK, s)) for a, s in zip((z, y, xx), shape))
                inside = mask[core]
                if not inside.any():
                    continue
                outer = tuple(
                    slice(max(c.start - halo, 0), min(c.stop + halo, s)) for c, s in zip(core, shape)
                )
                inner = tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(core, outer))
                responses = net(x[(slice(None), slice(None)) + outer])[0]
                core_responses = responses[(slice(None),) + inner]
                where = tuple(w + c.start for w, c in zip(np.nonzero(inside), core))
                yield np.ravel_multi_index(where, shape), core_responses[:, torch.from_numpy(inside)].T


def _label_mask(
    net: _ResponseNet,
    x: torch.Tensor,
    mask: np.ndarray,
    halo: int,
    n_classes: int,
    seed: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Labels ``0..k-1`` of the mask voxels (in ``mask``'s C order): argmax, merged or re-split to ``k``."""
    q = net.layers[-1].num_features
    flat_mask = np.flatnonzero(mask)
    sample = np.zeros(mask.size, dtype=bool)
    sample[rng.choice(flat_mask, size=min(_MAX_FIT, flat_mask.size), replace=False)] = True
    argmax = np.zeros(mask.size, dtype=np.int32)
    sums = torch.zeros(q, q, dtype=torch.float64)
    counts = torch.zeros(q, dtype=torch.float64)
    fit: list[np.ndarray] = []
    for index, responses in _chunk_responses(net, x, mask, halo):
        best = responses.argmax(dim=1)
        argmax[index] = best.numpy()
        sums.index_add_(0, best, responses.double())
        counts += torch.bincount(best, minlength=q).double()
        fit.append(responses[torch.from_numpy(sample[index])].numpy())
    used = torch.nonzero(counts).flatten()
    if used.numel() == n_classes:
        return argmax[flat_mask]
    if used.numel() > n_classes:
        means = (sums[used] / counts[used, None]).numpy()
        groups = KMeans(n_clusters=n_classes, n_init=_KMEANS_INIT, random_state=seed).fit(
            means, sample_weight=counts[used].numpy()
        ).labels_
        lookup = np.zeros(q, dtype=np.int64)
        lookup[used.numpy()] = groups
        return lookup[argmax[flat_mask]]
    model = KMeans(n_clusters=n_classes, n_init=_KMEANS_INIT, random_state=seed).fit(np.concatenate(fit))
    for index, responses in _chunk_responses(net, x, mask, halo):
        argmax[index] = model.predict(responses.numpy())
    return argmax[flat_mask]
