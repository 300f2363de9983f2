"""Classical unsupervised segmenters run side by side with JULE-3D.

Every method has the signature of :func:`jule3d.estimator.segment`::

    method(volume, n_classes, mask=None, seed=0, **options) -> labels

and returns a ``(Z, Y, X)`` label map (``uint8``; ``uint16`` above 255 classes) with ``0`` outside the
mask and ``1..k`` inside it, the classes ordered by the mean intensity of the first channel (ascending)
so that ids are stable across methods, seeds and runs (see :func:`order_labels_by_intensity`). The
mask defaults to ``volume.mask``, or every voxel when the volume has none.

Methods (``BASELINES`` maps the benchmark names to them):

* ``"kmeans"`` -- :func:`kmeans_intensity`: k-means on the voxel intensity vectors (all channels).
* ``"otsu"`` -- :func:`multi_otsu`: multi-threshold Otsu on the first channel (the paper's baseline).
* ``"gmm"`` -- :func:`gmm_intensity`: Gaussian mixture (full covariance) on the intensity vectors.
* ``"slic"`` -- :func:`slic_kmeans`: 3D SLIC supervoxels, then k-means on their mean intensities.
* ``"localmean"`` -- :func:`local_mean_kmeans`: k-means on the mean intensity of the foreground in a 9³ box
  around each voxel (the bar a structure-learning method must clear on the lung phantom).
* ``"atropos"`` -- :func:`atropos_segmentation`: ANTs Atropos (Gaussian mixture, k-means initialisation,
  MRF prior) on every channel; needs ``antspyx``.
* ``"hmrf"`` -- :func:`hmrf_segmentation`: dipy's hidden Markov random field tissue classifier on the first
  channel; needs ``dipy``.
* ``"kanezaki"`` -- :func:`kanezaki`: Kim & Kanezaki 2020 in 3D, a CNN trained on the one volume by argmax
  self-labelling and spatial continuity (:mod:`jule3d.kanezaki`); needs torch, like JULE-3D.

``antspyx`` and ``dipy`` are optional: they are imported when their method runs, and
:func:`missing_package` tells whether a method can run here.

The intensity methods fit on a seeded random sample of at most ``max_samples`` mask voxels (200,000 by
default) and then label every mask voxel, so their cost on 10^7 voxels is one pass of prediction.
Intensities are used as given: give channels comparable scales (``jule3d.normalize`` z-scores them).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import numpy as np
from skimage.filters import threshold_multiotsu
from skimage.segmentation import slic
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from .labels import masked_box_mean, order_labels_by_intensity
from .validation import check_int, check_mask, check_weight
from .volume import Volume

__all__ = [
    "BASELINES",
    "OPTIONAL_PACKAGES",
    "atropos_segmentation",
    "gmm_intensity",
    "kanezaki",
    "hmrf_segmentation",
    "kmeans_intensity",
    "local_mean_kmeans",
    "missing_package",
    "multi_otsu",
    "run_baseline",
    "slic_kmeans",
]

_PREDICT_CHUNK = 1 << 20  # voxels per prediction call (bounds the memory of predict on big volumes)
_DISTINCT_PROBE = 10_000  # rows looked at before counting distinct values over the whole mask
_MAX_DEFAULT_SEGMENTS = 2000  # cap of slic_kmeans' default n_segments (see its docstring)
_HMRF_BACKGROUND = 0.01  # value of the voxels outside the mask in hmrf_segmentation's input (see there)


def kmeans_intensity(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    max_samples: int = 200_000,
    n_init: int = 4,
) -> np.ndarray:
    """k-means on the intensity vectors (all channels) of the mask voxels.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the voxel sample and of the k-means initialisation.
    max_samples : int
        k-means is fitted on at most this many mask voxels drawn at random (seeded), then every
        mask voxel gets the label of its nearest centre.
    n_init : int
        Number of k-means restarts (the best inertia is kept).

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.baselines import kmeans_intensity
    >>> from jule3d.metrics import nmi
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = kmeans_intensity(volume, 3, seed=0)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(nmi(phantom.labels, labels, mask=phantom.labels > 0) > 0.7)
    True
    """
    mask, features = _prepare(volume, n_classes, mask)
    _check_positive(max_samples=max_samples, n_init=n_init)
    return _finish(_kmeans_codes(features, n_classes, max_samples, n_init, seed), volume, mask)


def gmm_intensity(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    max_samples: int = 200_000,
    n_init: int = 1,
    reg_covar: float = 1e-6,
) -> np.ndarray:
    """Gaussian mixture (full covariance) on the intensity vectors of the mask voxels.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of mixture components ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the voxel sample and of the mixture initialisation (k-means).
    max_samples : int
        The mixture is fitted by EM on at most this many mask voxels drawn at random (seeded);
        every mask voxel then gets its most probable component.
    n_init : int
        Number of EM restarts (the best likelihood is kept).
    reg_covar : float
        Added to the covariance diagonals, keeps them invertible on quantised intensities.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.baselines import gmm_intensity
    >>> from jule3d.metrics import nmi
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = gmm_intensity(volume, 3, seed=0)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(nmi(phantom.labels, labels, mask=phantom.labels > 0) > 0.7)
    True
    """
    mask, features = _prepare(volume, n_classes, mask)
    _check_positive(max_samples=max_samples, n_init=n_init, reg_covar=reg_covar)
    sample = _sample_rows(features, max_samples, seed).astype(np.float64)
    model = GaussianMixture(
        n_components=n_classes,
        covariance_type="full",
        n_init=n_init,
        reg_covar=reg_covar,
        random_state=seed,
    ).fit(sample)
    return _finish(_predict(model, features, dtype=np.float64), volume, mask)


def multi_otsu(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    nbins: int = 256,
) -> np.ndarray:
    """Multi-threshold Otsu on the first channel of the mask voxels (the paper's baseline).

    ``skimage.filters.threshold_multiotsu`` picks ``k - 1`` thresholds on the histogram of the mask
    voxels; a multi-channel volume is thresholded on its first channel only. Its search grows as
    ``nbins ** (k - 1)``, so keep ``k`` small (<= 5) or lower ``nbins``.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Unused (the method is deterministic); accepted for the common baseline signature.
    nbins : int
        Histogram bins.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` from the darkest to the brightest class; a class left
        empty by coinciding thresholds gets no id.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.baselines import multi_otsu
    >>> from jule3d.metrics import nmi
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = multi_otsu(volume, 3)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(nmi(phantom.labels, labels, mask=phantom.labels > 0) > 0.7)
    True
    """
    mask, features = _prepare(volume, n_classes, mask, channels=1)
    _check_positive(nbins=nbins)
    values = features[:, 0]
    thresholds = threshold_multiotsu(values, classes=n_classes, nbins=nbins)
    # skimage returns the centre of the last bin of each lower class; the optimal partition puts that
    # whole bin below the cut, so cut at its upper edge (else voxels in it above the centre move up).
    thresholds = thresholds + (values.max() - values.min()) / (2 * nbins)
    return _finish(np.digitize(values, thresholds), volume, mask)


def slic_kmeans(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    n_segments: int | None = None,
    compactness: float = 0.1,
    max_num_iter: int = 10,
    n_init: int = 4,
) -> np.ndarray:
    """3D SLIC supervoxels inside the mask, then k-means on their mean intensities.

    Each channel is rescaled to ``[0, 1]`` between its 0.5th and 99.5th percentiles inside the mask
    (clipped) before SLIC, so ``compactness`` has the same meaning on any intensity scale and a few
    outliers do not flatten the contrast; the voxel spacing of the volume is passed to SLIC. The
    supervoxel means are then clustered by k-means in the original intensities, each supervoxel
    weighted by its voxel count, and every voxel takes its supervoxel's cluster.

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the k-means initialisation (SLIC itself is deterministic).
    n_segments : int, optional
        Approximate number of supervoxels. By default one per 512 mask voxels (about 8^3), at least
        ``10 * n_classes`` and at most 2000: scikit-image seeds SLIC inside a mask by k-means over
        ``100 * n_segments`` mask coordinates, whose time and memory grow as ``n_segments ** 2``;
        the cap keeps that seeding from outgrowing the cost of SLIC itself on large volumes.
    compactness : float
        SLIC's balance of intensity (rescaled to [0, 1]) against space: larger values give more
        regular, cube-like supervoxels; smaller ones follow intensity edges more closely.
    max_num_iter : int
        SLIC iterations.
    n_init : int
        Number of k-means restarts.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.

    Raises
    ------
    ValueError
        Besides the common checks, if SLIC yields fewer supervoxels than ``n_classes``.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.baselines import slic_kmeans
    >>> from jule3d.metrics import nmi
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = slic_kmeans(volume, 3, n_segments=60, seed=0)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(nmi(phantom.labels, labels, mask=phantom.labels > 0) > 0.7)
    True
    """
    mask, features = _prepare(volume, n_classes, mask)
    if n_segments is None:
        n_segments = max(10 * n_classes, min(_MAX_DEFAULT_SEGMENTS, features.shape[0] // 512))
    _check_positive(
        n_segments=n_segments, compactness=compactness, max_num_iter=max_num_iter, n_init=n_init
    )
    image = np.zeros(volume.shape + (features.shape[1],), dtype=np.float32)
    image[mask] = _rescale_unit(features)
    spacing = np.asarray(volume.geometry.spacing_zyx)
    segments = slic(
        image,
        n_segments=n_segments,
        compactness=compactness,
        max_num_iter=max_num_iter,
        spacing=spacing / spacing.min(),
        mask=mask,
        channel_axis=-1,
        convert2lab=False,
        enforce_connectivity=True,
        start_label=1,
    )[mask]
    ids, codes = np.unique(segments, return_inverse=True)
    if ids.size < n_classes:
        raise ValueError(
            f"SLIC produced {ids.size} supervoxels, fewer than n_classes={n_classes}; "
            "raise n_segments"
        )
    sizes = np.bincount(codes).astype(np.float64)
    means = np.stack(
        [np.bincount(codes, weights=features[:, c]) / sizes for c in range(features.shape[1])],
        axis=1,
    )
    model = KMeans(n_clusters=n_classes, n_init=n_init, random_state=seed)
    clusters = model.fit(means, sample_weight=sizes).labels_
    return _finish(clusters[codes], volume, mask)


def local_mean_kmeans(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    window: int = 9,
    max_samples: int = 200_000,
    n_init: int = 4,
) -> np.ndarray:
    """k-means on the local mean intensity: each channel averaged over the mask voxels of a box.

    Every mask voxel is described by the mean of each channel over the mask voxels of the ``window``³ box
    centred on it (:func:`masked_box_mean`: voxels outside the mask do not count, so the specimen or brain
    border is not pulled towards the background), and these vectors are clustered as in
    :func:`kmeans_intensity`. On the lung phantom, whose classes differ in the fraction of air in the
    tissue rather than in the intensity of a voxel, this is the bar a structure-learning method must
    clear (``benchmarks.md``).

    Parameters
    ----------
    volume : Volume
        Input image.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Seed of the voxel sample and of the k-means initialisation.
    window : int
        Side of the box in voxels (9 by the benchmark protocol).
    max_samples : int
        k-means is fitted on at most this many mask voxels drawn at random (seeded), then every mask voxel
        gets the label of its nearest centre.
    n_init : int
        Number of k-means restarts.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by the mean first-channel intensity (of the voxels, not
        of their boxes); a class that k-means leaves empty gets no id.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.baselines import local_mean_kmeans
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = local_mean_kmeans(volume, 3, window=5, seed=0)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    """
    mask, _ = _prepare(volume, n_classes, mask)
    for name, value in (("window", window), ("max_samples", max_samples), ("n_init", n_init)):
        check_int(name, value, 1)
    features = np.ascontiguousarray(masked_box_mean(volume.data, mask, window, np.nonzero(mask)).T)
    return _finish(_kmeans_codes(features, n_classes, max_samples, n_init, seed), volume, mask)


def atropos_segmentation(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    mrf_smoothing: float = 0.1,
    mrf_radius: int = 1,
    n_iterations: int = 5,
) -> np.ndarray:
    """ANTs Atropos: Gaussian mixture with k-means initialisation and an MRF prior, on every channel.

    Every channel becomes one Atropos intensity image (with the volume's voxel spacing, which weighs the
    MRF neighbours by their inverse distance in mm) and the mask is Atropos' mask image; the likelihood is
    Gaussian (full covariance over the channels). The defaults are those of ``ants.kmeans_segmentation``
    (ANTsR's ``kmeansSegmentation``): MRF ``[0.1, 1x1x1]`` and convergence ``[5, 0]``, i.e. exactly five
    iterations; ANTs' own default smoothing factor is 0.3.

    Atropos' k-means initialisation runs on the first channel only (ANTs documents the initial centres
    "for first intensity image only"; the multivariate second pass in its source does not reach the
    labels), with centres starting evenly spaced over that channel's range. The mixture then uses every
    channel, but classes that only a later channel separates stay merged (tested): put the most
    discriminating channel first. The initialisation is not random; the order in which the ICM updates
    visit the voxels is, and Atropos cannot take a seed, only a constant one (``--use-random-seed 0``,
    seed 19650218), which is used so that runs are reproducible.

    Needs ``antspyx``. Atropos is called through the library function that ``ants.atropos`` wraps,
    because ``ants.atropos`` (antspyx 0.6) drops every extra option (``--use-random-seed`` included) when
    given several images, and writes its posterior probability images to temporary files.

    Parameters
    ----------
    volume : Volume
        Input image; channels enter Atropos' k-means and its mixture as given, so give them comparable
        scales (``jule3d.normalize`` z-scores them).
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Unused (Atropos takes no seed; see above); accepted for the common baseline signature.
    mrf_smoothing : float
        Atropos' MRF smoothing factor (>= 0; 0 turns the prior off): larger values smooth more.
    mrf_radius : int
        Radius of the MRF neighbourhood in voxels along each axis (1: the 26 neighbours).
    n_iterations : int
        Number of EM/ICM iterations, all of them run (convergence threshold 0).

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` ordered by mean first-channel intensity.

    Raises
    ------
    ImportError
        If ``antspyx`` is not installed.
    RuntimeError
        If Atropos fails, e.g. on a class whose covariance is singular (determinant below 1e-6).

    Examples
    --------
    >>> import pytest
    >>> _ = pytest.importorskip("ants")  # antspyx: skip the example without it
    >>> import numpy as np
    >>> from jule3d.baselines import atropos_segmentation
    >>> from jule3d.metrics import nmi
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = atropos_segmentation(volume, 3)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(nmi(phantom.labels, labels, mask=phantom.labels > 0) > 0.7)
    True
    """
    mask, features = _prepare(volume, n_classes, mask)
    check_weight("mrf_smoothing", mrf_smoothing)
    check_int("mrf_radius", mrf_radius, 1)
    check_int("n_iterations", n_iterations, 1)
    ants = _import_optional("atropos", "ants")
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    spacing = tuple(float(s) for s in volume.geometry.spacing_zyx[::-1])  # ITK order (x, y, z)

    def image(values: np.ndarray) -> Any:  # an ANTs image on the volume's grid, indexed (x, y, z)
        return ants.from_numpy(np.ascontiguousarray(values.T), spacing=spacing)

    channel = np.zeros(volume.shape, dtype=np.float32)
    args: dict[str, Any] = {"d": 3}
    for c in range(features.shape[1]):
        channel[mask] = features[:, c]
        args[f"a-MULTINAME-{c}"] = image(channel)  # from_numpy copies
    labels = image(mask.astype(np.uint32)).clone("unsigned int")  # overwritten by Atropos' output
    args.update(
        {
            "i": f"KMeans[{n_classes}]",
            "m": f"[{float(mrf_smoothing)!r},{'x'.join([str(int(mrf_radius))] * 3)}]",
            "c": f"[{int(n_iterations)},0]",
            "x": labels.clone("unsigned int"),
            "r": 0,
            "o": get_pointer_string(labels),
        }
    )
    status = get_lib_fn("Atropos")(process_arguments(args))
    if status != 0:
        raise RuntimeError(
            f"Atropos exited with status {status} (a singular class covariance is the usual cause: "
            "a constant channel, or a class of too few distinct intensity vectors)"
        )
    codes = labels.numpy().T[mask]
    return _finish(codes, volume, mask)


def hmrf_segmentation(
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    beta: float = 0.1,
    max_iter: int = 100,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """dipy's hidden Markov random field tissue classifier (``TissueClassifierHMRF``) on the first channel.

    dipy fits Gaussian classes by EM with a Potts prior on the 6-neighbourhood (ICM), on a whole array,
    and always adds a background class for the darkest voxels (its input is a skull-stripped T1 with a
    zero background). So the mask's bounding box, padded by one voxel, is handed to it with the mask
    intensities mapped linearly onto ``[1/(k+1), 1]`` and every other voxel set to one constant below
    them (0.01): dipy's uniform initial means then put its background class on that constant and its
    ``k`` tissue classes evenly over the mask's range, as they would be on the mask alone, and the
    background class, of zero variance, cannot take a mask voxel (the background voxels can still lend a
    little weight to the darkest tissue class's mean and variance when that class is wide, as on dipy's
    own zero-background input). A background of exactly 0 is avoided because dipy replaces zeros by noise
    from an unseeded generator. Voxel spacing is ignored, as dipy does. The defaults are dipy's (``beta`` 0.1 as in its tissue-classification tutorial, which calls 0 to
    0.5 the useful range; ``max_iter`` 100 and ``tolerance`` 1e-5 are ``classify``'s). Deterministic.

    Needs ``dipy``. Memory: about ``6 (k + 1)`` float64 arrays the size of the bounding box.

    Parameters
    ----------
    volume : Volume
        Input image; only its first channel is used.
    n_classes : int
        Number of classes ``k`` (>= 2).
    mask : numpy.ndarray of bool, optional
        Voxels to segment; defaults to ``volume.mask``, or all voxels.
    seed : int
        Unused (the method is deterministic); accepted for the common baseline signature.
    beta : float
        Weight of the Potts prior (>= 0): larger values give smoother labels.
    max_iter : int
        Maximum number of EM/ICM iterations.
    tolerance : float
        dipy's stopping rule (>= 0): stop once the energy of the last 5 iterations varies by less than
        this fraction of its whole range (after at least 7 iterations); 0 runs ``max_iter`` iterations.

    Returns
    -------
    numpy.ndarray of uint8, shape (Z, Y, X)
        ``0`` outside the mask, ``1..k`` from the darkest to the brightest class; a class left empty
        gets no id.

    Raises
    ------
    ImportError
        If ``dipy`` is not installed.

    Examples
    --------
    >>> import pytest
    >>> _ = pytest.importorskip("dipy")  # skip the example without dipy
    >>> import numpy as np
    >>> from jule3d.baselines import hmrf_segmentation
    >>> from jule3d.metrics import nmi
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = hmrf_segmentation(volume, 3)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(nmi(phantom.labels, labels, mask=phantom.labels > 0) > 0.7)
    True
    """
    mask, features = _prepare(volume, n_classes, mask, channels=1)
    check_weight("beta", beta)
    check_weight("tolerance", tolerance)
    check_int("max_iter", max_iter, 1)
    tissue = _import_optional("hmrf", "dipy.segment.tissue")

    corner = np.argwhere(mask)
    box = tuple(slice(a, b + 1) for a, b in zip(corner.min(axis=0), corner.max(axis=0)))
    inside = np.pad(mask[box], 1)
    values = features[:, 0].astype(np.float64)
    lo, hi = values.min(), values.max()  # hi > lo: _prepare found >= 2 distinct values
    image = np.full(inside.shape, _HMRF_BACKGROUND)
    image[inside] = (1.0 + n_classes * (values - lo) / (hi - lo)) / (n_classes + 1)
    _, classes, _ = tissue.TissueClassifierHMRF(verbose=False).classify(
        image, n_classes, beta, tolerance=tolerance, max_iter=max_iter
    )
    return _finish(classes[inside], volume, mask)


def kanezaki(
    volume: Volume, n_classes: int, mask: np.ndarray | None = None, seed: int = 0, **options: Any
) -> np.ndarray:
    """Kim & Kanezaki 2020 in 3D, the closest deep peer (:func:`jule3d.kanezaki.kanezaki_segment`).

    Imported on first use, so the classical baselines load without torch.

    Examples
    --------
    With a tiny training budget (the defaults train for up to 100 iterations):

    >>> import numpy as np
    >>> from jule3d.baselines import kanezaki
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = kanezaki(volume, 3, max_iter=5, n_channels=8)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    """
    from .kanezaki import kanezaki_segment

    return kanezaki_segment(volume, n_classes, mask=mask, seed=seed, **options)


BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "kmeans": kmeans_intensity,
    "otsu": multi_otsu,
    "gmm": gmm_intensity,
    "slic": slic_kmeans,
    "localmean": local_mean_kmeans,
    "atropos": atropos_segmentation,
    "hmrf": hmrf_segmentation,
    "kanezaki": kanezaki,
}

#: Baselines that need an optional package: name -> (module imported, package to ``pip install``).
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {"atropos": ("ants", "antspyx"), "hmrf": ("dipy", "dipy")}


def missing_package(name: str) -> str | None:
    """The package to ``pip install`` before the baseline ``name`` can run here, or ``None`` if none is missing.

    Raises
    ------
    ValueError
        If ``name`` is not a registered baseline.

    Examples
    --------
    >>> from jule3d.baselines import OPTIONAL_PACKAGES, missing_package
    >>> missing_package("kmeans") is None
    True
    >>> missing_package("atropos") in (None, "antspyx"), OPTIONAL_PACKAGES["atropos"]
    (True, ('ants', 'antspyx'))
    """
    if name not in BASELINES:
        raise ValueError(f"name must be one of {sorted(BASELINES)}, got {name!r}")
    if name not in OPTIONAL_PACKAGES:
        return None
    module, package = OPTIONAL_PACKAGES[name]
    return package if importlib.util.find_spec(module) is None else None


def run_baseline(
    name: str,
    volume: Volume,
    n_classes: int,
    mask: np.ndarray | None = None,
    seed: int = 0,
    **options: Any,
) -> np.ndarray:
    """Run the baseline registered under ``name`` in :data:`BASELINES`.

    Parameters
    ----------
    name : str
        One of ``BASELINES`` (``"kmeans"``, ``"otsu"``, ``"gmm"``, ``"slic"``, ``"localmean"``,
        ``"atropos"``, ``"hmrf"``).
    volume, n_classes, mask, seed
        As for every baseline.
    **options
        Method-specific keyword arguments (e.g. ``n_segments`` for ``"slic"``).

    Returns
    -------
    numpy.ndarray
        The method's label map.

    Raises
    ------
    ValueError
        If ``name`` is not a registered baseline (the message lists the valid names).
    ImportError
        If the baseline needs a package that is not installed (see :func:`missing_package`).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.baselines import run_baseline
    >>> from jule3d.metrics import nmi
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> labels = run_baseline("otsu", volume, 3)
    >>> labels.shape, labels.dtype, sorted(np.unique(labels).tolist())
    ((16, 16, 16), dtype('uint8'), [0, 1, 2, 3])
    >>> bool(nmi(phantom.labels, labels, mask=phantom.labels > 0) > 0.7)
    True
    """
    if name not in BASELINES:
        raise ValueError(f"name must be one of {sorted(BASELINES)}, got {name!r}")
    return BASELINES[name](volume, n_classes, mask=mask, seed=seed, **options)


def _prepare(
    volume: Volume, n_classes: int, mask: np.ndarray | None, channels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Check the common arguments; return the mask and the ``(n_voxels, C)`` float32 features."""
    check_int("n_classes", n_classes, 2)
    mask = check_mask(volume.mask if mask is None else mask, volume.shape)
    features = np.ascontiguousarray(volume.data[:channels, mask].T, dtype=np.float32)
    if not np.isfinite(features).all():
        raise ValueError("volume holds NaN or infinite intensities inside the mask")
    distinct = _count_distinct_rows(features[:_DISTINCT_PROBE])
    if distinct < n_classes:
        distinct = _count_distinct_rows(features)
    if distinct < n_classes:
        what = "intensity values" if features.shape[1] == 1 else "intensity vectors"
        raise ValueError(
            f"n_classes={n_classes} exceeds the {distinct} distinct {what} inside the mask"
        )
    return mask, features


def _count_distinct_rows(rows: np.ndarray) -> int:
    """Number of distinct rows of a 2D array."""
    if rows.shape[1] == 1:
        return int(np.unique(rows[:, 0]).size)
    return int(np.unique(rows, axis=0).shape[0])


def _kmeans_codes(features: np.ndarray, n_classes: int, max_samples: int, n_init: int, seed: int) -> np.ndarray:
    """k-means fitted on a seeded sample of at most ``max_samples`` rows, then every row's cluster."""
    sample = _sample_rows(features, max_samples, seed)
    model = KMeans(n_clusters=n_classes, n_init=n_init, random_state=seed).fit(sample)
    return _predict(model, features)


def _check_positive(**values: float) -> None:
    """Raise ValueError naming the first option that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _import_optional(method: str, module: str) -> Any:
    """Import ``module`` for the baseline ``method``, or raise ImportError saying what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = OPTIONAL_PACKAGES[method][1]
        raise ImportError(
            f"the {method!r} baseline needs the optional package {package}: pip install {package}"
        ) from error


def _sample_rows(rows: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """At most ``max_samples`` rows drawn without replacement (seeded), in their original order."""
    if rows.shape[0] <= max_samples:
        return rows
    rng = np.random.default_rng(seed)
    return rows[np.sort(rng.choice(rows.shape[0], size=int(max_samples), replace=False))]


def _predict(model: Any, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``model.predict`` over ``rows`` in chunks, so memory stays bounded on 10^7 voxels."""
    return np.concatenate(
        [
            model.predict(rows[start : start + _PREDICT_CHUNK].astype(dtype, copy=False))
            for start in range(0, rows.shape[0], _PREDICT_CHUNK)
        ]
    )


def _rescale_unit(features: np.ndarray) -> np.ndarray:
    """Per channel, map the 0.5th..99.5th percentile range to [0, 1] (clipped)."""
    lo, hi = np.percentile(features, [0.5, 99.5], axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((features - lo) / span, 0.0, 1.0).astype(np.float32)


def _finish(codes: np.ndarray, volume: Volume, mask: np.ndarray) -> np.ndarray:
    """Scatter the per-mask-voxel cluster codes into a volume and order them by intensity."""
    labels = np.zeros(volume.shape, dtype=np.int32)
    labels[mask] = codes
    return order_labels_by_intensity(labels, volume.data[0], mask)
