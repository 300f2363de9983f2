"""Synthetic phantoms with ground truth: a texture phantom and a lung-specimen phantom.

The phantom is a blobby specimen (a rounded block) in air, divided into large regions (one or a few per tissue
class). In the ``"texture"`` and ``"intensity"`` variants every class is filled with a different *texture*:
a random field with its own power spectrum (fine grain, coarse grain, lamellae, foam walls, fibres, oblique
fine lamellae), or a field of another construction, the distance to random sites (beads, cell walls, rods;
below). In the ``"texture"`` variant every class has exactly the same intensity distribution:
each texture field is made Gaussian (rank transform) and standardised to mean 0 / std 1 inside its own
region, then mapped to a common tissue mean and standard deviation. Classes therefore differ in texture
only, and any method that looks at one voxel's intensity at a time (k-means or Otsu on intensities) cannot
separate them, while a method that looks at a neighbourhood (a 3D CNN on patches) can. The ``"intensity"``
variant also spreads the class means evenly from 1 to 2.6 (4 texture standard deviations apart for 3
classes), an easy case.

The ``"lung"`` variant has the three classes of Moriya et al. 2018, who segment micro-CT volumes of
lung-cancer specimens: normal alveolar tissue, noninvasive (lepidic) carcinoma and invasive carcinoma
(``LUNG_CLASS_NAMES``, ids 1, 2, 3). Every voxel of the specimen is either tissue (intensity ``1``) or air
(``0``), in every class alike; the classes differ only in the fraction and arrangement of the air. Each
class is an *alveolar foam* (``LUNG_FOAM``, or the ``foams`` given to :func:`make_phantom`):

- Seeds: one uniformly random point in every cube of side ``spacing`` voxels (stratified sampling), so the
  cells are irregular but of similar size.
- Walls: a voxel is tissue when its distance to the nearest bisector plane between its nearest seed and
  one of the next nearest seeds (the boundary of its Voronoi cell) is below ``wall / 2``, so the walls are
  sheets of ``wall`` voxels' thickness and the cell interiors, the alveoli, are air.
- Pores: where a smooth random field (``PORE_SMOOTHNESS``) exceeds its upper ``pores`` quantile, the wall
  is opened, so neighbouring alveoli connect as through alveolar ducts and pores of Kohn (the air of the
  normal region at 96³ is one connected network, 6-connectivity, bar a few isolated cells).

Normal tissue has large alveoli (about 10 voxels across) with thin walls (1.4 voxels) and about 70 % air;
lepidic carcinoma keeps the alveolar architecture, but tumour cells lining the walls thicken them (2.6
voxels) around smaller alveoli, about 38 % air; in invasive carcinoma the tumour fills the alveoli (walls
of 5.5 voxels in cells of 8), leaving about 3 % air in a few tiny remnant spaces. The ground truth gives
every voxel of a region its class, air spaces included; ``0`` is the air outside the specimen. Like a
real scan the image is then blurred (partial volume, Gaussian, std ``blur`` = 0.7 voxels by default)
and, by default, noisier than the texture variants (``noise`` = 0.25: a tissue/air contrast-to-noise ratio
of 4). Intensity alone is then a weak cue (k-means on the normalised intensities of the specimen), the
local mean intensity a strong one (k-means on the mean over a 9³ box inside the specimen; for the scores
see ``benchmarks/bench_quality.py`` and the README's Measured section): air fraction separates the
classes, so a method that learns structure must beat the local mean, not only the voxel intensity.
Alveoli cut open at the specimen surface are air that reaches the outside, so an automatic foreground
mask misses them (it falls a little short of the specimen); ``volume.mask`` is the specimen itself.

Intensities are in arbitrary units: air ``0``, tissue mean ``1`` (texture std ``0.2`` in the texture
variants). On top of the image come a partial-volume blur (std ``blur`` voxels; none by default in the
texture variants), a mild smooth multiplicative bias field (``1 ± bias``) and additive Gaussian noise
(std ``noise``), all over the whole volume, air included. Air is far darker than tissue, so an automatic
(Otsu) foreground mask finds the specimen (of the lung variant, bar the alveoli open to its surface).

Everything is drawn from independent streams of one ``numpy.random.SeedSequence(seed)``, so the same
arguments always give the same arrays.

References
----------
.. [1] T. Moriya et al., "Unsupervised segmentation of 3D medical images based on clustering and deep
   representation learning", SPIE Medical Imaging 2018, arXiv:1804.03830.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import ndimage, special
from scipy.spatial import cKDTree

from .volume import Volume

__all__ = [
    "Foam",
    "Phantom",
    "make_phantom",
    "write_phantom",
    "TEXTURE_NAMES",
    "LUNG_CLASS_NAMES",
    "VARIANTS",
    "DEFAULT_SPACING",
]

#: Names of the available textures, in the order classes ``1..k`` receive them.
TEXTURE_NAMES: tuple[str, ...] = (
    "fine_grain",
    "coarse_grain",
    "lamellae",
    "foam",
    "fibres",
    "oblique_lamellae",
    "beads",
    "cells",
    "rods",
)
#: Names of the ``"lung"`` variant's classes (Moriya et al. 2018), in the order of their ids ``1..3``.
LUNG_CLASS_NAMES: tuple[str, ...] = ("normal_alveolar", "lepidic_carcinoma", "invasive_carcinoma")
#: Phantom variants: classes differ in texture only, in texture and mean intensity, or (lung) in the
#: fraction and arrangement of air spaces in tissue.
VARIANTS: tuple[str, ...] = ("texture", "intensity", "lung")
#: Default voxel size in mm ``(x, y, z)``: isotropic, so 27-voxel patches are physical cubes, and not
#: 1 mm, so that code which ignores the spacing shows up in tests.
DEFAULT_SPACING: tuple[float, float, float] = (0.5, 0.5, 0.5)

AIR_MEAN = 0.0
TISSUE_MEAN = 1.0
TEXTURE_STD = 0.2
#: The ``"intensity"`` variant spreads the class means evenly from ``TISSUE_MEAN`` up to
#: ``TISSUE_MEAN + 2 * INTENSITY_SPREAD`` (4 texture standard deviations apart for 3 classes, and
#: never closer to the air than the texture variant, so the automatic mask works on both).
INTENSITY_SPREAD = 0.8
#: The specimen is a rounded block: a superellipsoid ``sum(|u_i / a_i| ** p) <= 1`` with exponent ``p``
#: (2 would be an ellipsoid; 4 fills the box better, so class regions hold many whole 27³ patches),
#: semi-axes ``a`` ``(Z, Y, X)`` as a fraction of the half-extent of the volume, and a radius modulated
#: by a smooth random field of relative amplitude ``SPECIMEN_WOBBLE``.
SPECIMEN_EXPONENT = 4.0
SPECIMEN_SEMI_AXES = (0.88, 0.92, 0.90)
SPECIMEN_WOBBLE = 0.06
#: Largest displacement (voxels) of the smooth warp that makes region boundaries gently curved.
BOUNDARY_WARP = 2.0
#: Smoothness (voxels) and strength (radians, std) of the phase perturbation that bends lamellae.
LAMELLA_WARP_SMOOTHNESS = 6.0
LAMELLA_WAVINESS = 2.0
#: Textures of another construction than filtered noise (``beads``, ``cells``, ``rods``): the distance of each
#: voxel to random sites, one site in every cube of side ``*_SPACING`` voxels (stratified sampling, as the lung
#: variant's alveoli). Beads are bright balls around points 5 voxels apart, cells bright walls of Voronoi cells 9
#: voxels across, rods bright line segments of ``ROD_LENGTH`` voxels in random directions, 7 voxels apart.
BEAD_SPACING = 5.0
CELL_SPACING = 9.0
ROD_SPACING = 7.0
ROD_LENGTH = 14.0


class Foam(NamedTuple):
    """Alveolar foam of one ``"lung"`` class (:func:`make_phantom`'s ``foams``); lengths in voxels."""

    spacing: float  #: one seed in every cube of this side: the typical alveolus size
    wall: float  #: wall thickness
    pores: float  #: share of the volume where the walls are opened


#: Alveolar foam of each ``"lung"`` class, in the order of ``LUNG_CLASS_NAMES``.
LUNG_FOAM: tuple[Foam, ...] = (Foam(10.0, 1.4, 0.15), Foam(8.0, 2.6, 0.10), Foam(8.0, 5.5, 0.0))
#: Smoothness (voxels, Gaussian std) of the random field whose peaks open pores in the alveolar walls.
PORE_SMOOTHNESS = 1.5
#: Defaults of ``noise`` and ``blur`` for each variant (:func:`make_phantom`).
DEFAULT_NOISE: dict[str, float] = {"texture": 0.05, "intensity": 0.05, "lung": 0.25}
DEFAULT_BLUR: dict[str, float] = {"texture": 0.0, "intensity": 0.0, "lung": 0.7}
#: Voxels per nearest-seed query: bounds the memory of the lung variant on large grids.
_QUERY_CHUNK = 1 << 20


@dataclass
class Phantom:
    """A synthetic volume and its ground truth.

    Parameters
    ----------
    volume : Volume
        One-channel float32 volume; ``volume.mask`` is the specimen (``labels > 0``).
    labels : numpy.ndarray
        ``uint8`` array ``(Z, Y, X)``: ``0`` air, ``1..k`` tissue classes.
    class_names : tuple of str
        ``class_names[i]`` names class ``i + 1``: its texture, or its tissue in the ``"lung"`` variant.

    Examples
    --------
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16))
    >>> phantom.n_classes, phantom.labels.dtype, phantom.volume.shape
    (3, dtype('uint8'), (16, 16, 16))
    """

    volume: Volume
    labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        """Number of tissue classes ``k``."""
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------
# Random fields
# ----------------------------------------------------------------------------------------------


def _frequency_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frequencies (cycles/voxel) of ``numpy.fft.rfftn`` bins along Z, Y, X, broadcastable."""
    fz = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None, None]
    fy = np.fft.fftfreq(shape[1]).astype(np.float32)[None, :, None]
    fx = np.fft.rfftfreq(shape[2]).astype(np.float32)[None, None, :]
    return fz, fy, fx


def _lowpass(sigma_zyx: Sequence[float]) -> Callable[..., np.ndarray]:
    """Transfer function of a Gaussian blur with the given standard deviations (voxels)."""
    sz, sy, sx = (float(s) for s in sigma_zyx)

    def transfer(fz: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
        return np.exp(-2.0 * np.pi**2 * ((sz * fz) ** 2 + (sy * fy) ** 2 + (sx * fx) ** 2))

    return transfer


def _filtered_noise(
    shape: tuple[int, int, int], transfer: Callable[..., np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """White Gaussian noise shaped by ``transfer`` in the Fourier domain (periodic, float32)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    spectrum = np.fft.rfftn(noise)
    spectrum *= transfer(*_frequency_grid(shape))
    return np.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2)).astype(np.float32)


def _lamellae(
    shape: tuple[int, int, int], period: float, direction_zyx: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Gently wavy parallel sheets: a plane wave of ``period`` voxels along ``direction_zyx``.

    The phase is perturbed by a smooth random field (std ``LAMELLA_WAVINESS`` radians), so the sheets
    bend, but the amplitude stays constant: every patch shows the same stripe contrast.
    """
    d = np.asarray(direction_zyx, dtype=np.float32)
    d /= np.linalg.norm(d)
    z, y, x = (np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
               for axis, n in enumerate(shape))
    warp = _filtered_noise(shape, _lowpass((LAMELLA_WARP_SMOOTHNESS,) * 3), rng)
    warp *= LAMELLA_WAVINESS / max(float(warp.std()), 1e-12)
    phase = (2 * np.pi / period) * (d[0] * z + d[1] * y + d[2] * x) + rng.uniform(0, 2 * np.pi) + warp
    return np.sin(phase)


def _grid_distance(shape: tuple[int, int, int], distance: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``distance(points)`` of every voxel centre of the grid, queried in z-slabs of at most ``_QUERY_CHUNK``
    voxels so that no array of the whole grid's coordinates is ever held."""
    out = np.empty(shape, dtype=np.float32)
    yx = np.argwhere(np.ones(shape[1:], dtype=bool)).astype(np.float64)
    step = max(1, _QUERY_CHUNK // len(yx))
    for z0 in range(0, shape[0], step):
        z = np.arange(z0, min(z0 + step, shape[0]), dtype=np.float64)
        points = np.column_stack([np.repeat(z, len(yx)), np.tile(yx, (len(z), 1))])
        out[z0:z0 + len(z)] = distance(points).reshape(len(z), *shape[1:])
    return out


def _beads(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Bright balls: minus the distance to the nearest of points ``BEAD_SPACING`` apart (Worley noise)."""
    tree = cKDTree(_stratified_seeds(shape, BEAD_SPACING, rng))
    return _grid_distance(shape, lambda points: -tree.query(points)[0])


def _cells(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Bright cell walls: minus the distance to the boundary of the Voronoi cells of points ``CELL_SPACING`` apart."""
    seeds = _stratified_seeds(shape, CELL_SPACING, rng)
    return _grid_distance(shape, lambda points: -_cell_wall_distance(points, seeds))


def _rods(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Bright rods: minus the distance to segments of ``ROD_LENGTH`` voxels in uniformly random directions, centred
    on points ``ROD_SPACING`` apart; each segment is sampled every half voxel (distances within 0.25 voxels)."""
    centres = _stratified_seeds(shape, ROD_SPACING, rng)
    directions = rng.standard_normal(centres.shape)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    steps = np.linspace(-ROD_LENGTH / 2, ROD_LENGTH / 2, int(2 * ROD_LENGTH) + 1)
    tree = cKDTree((centres[:, None, :] + steps[None, :, None] * directions[:, None, :]).reshape(-1, 3))
    return _grid_distance(shape, lambda points: -tree.query(points)[0])


def _texture_field(name: str, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """The raw (not yet standardised) random field of texture ``name``."""
    if name == "fine_grain":
        return _filtered_noise(shape, _lowpass((0.8, 0.8, 0.8)), rng)
    if name == "coarse_grain":
        return _filtered_noise(shape, _lowpass((2.5, 2.5, 2.5)), rng)
    if name == "lamellae":
        return _lamellae(shape, 6.0, (1.0, 0.4, 0.2), rng)
    if name == "foam":
        # Thin bright walls where a coarse field crosses zero, dark cell interiors.
        return -np.abs(_filtered_noise(shape, _lowpass((2.5, 2.5, 2.5)), rng))
    if name == "fibres":
        return _filtered_noise(shape, _lowpass((0.8, 0.8, 6.0)), rng)
    if name == "oblique_lamellae":
        return _lamellae(shape, 4.0, (0.2, 1.0, -0.8), rng)
    if name == "beads":
        return _beads(shape, rng)
    if name == "cells":
        return _cells(shape, rng)
    if name == "rods":
        return _rods(shape, rng)
    raise ValueError(f"unknown texture {name!r}; known: {TEXTURE_NAMES}")


def _gaussianise(values: np.ndarray) -> np.ndarray:
    """Map values to standard normal scores by rank: same order, exactly N(0, 1) histogram."""
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
    scores = special.ndtri((ranks + 0.5) / values.size)
    return ((scores - scores.mean()) / scores.std()).astype(np.float32)


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth random field scaled to ``[-1, 1]``: noise low-passed at an eighth of each side."""
    field = _filtered_noise(shape, _lowpass([n / 8 for n in shape]), rng)
    return field / max(float(np.abs(field).max()), 1e-12)


# ----------------------------------------------------------------------------------------------
# Alveolar foam (the "lung" variant)
# ----------------------------------------------------------------------------------------------


def _stratified_seeds(shape: tuple[int, int, int], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random point in every cube of side ``spacing`` over the grid and one cube beyond it."""
    cells = [np.arange(-1, int(np.ceil(n / spacing)) + 1, dtype=np.float64) for n in shape]
    corners = np.stack(np.meshgrid(*cells, indexing="ij"), axis=-1).reshape(-1, 3)
    return (corners + rng.uniform(0.0, 1.0, corners.shape)) * spacing


def _cell_wall_distance(points: np.ndarray, seeds: np.ndarray, neighbours: int = 8) -> np.ndarray:
    """Distance of each point to the boundary of its Voronoi cell among ``seeds``.

    For a point ``x`` with nearest seed ``a`` and another seed ``b``, the bisector plane of ``a`` and ``b``
    lies at ``(|x - b|² - |x - a|²) / (2 |a - b|)``; the minimum over the ``neighbours - 1`` next nearest
    seeds is the distance to the cell boundary (a nearer bisector of a farther seed is vanishingly rare:
    more neighbours leave the walls all but unchanged).
    """
    tree = cKDTree(seeds)
    out = np.empty(len(points))
    for start in range(0, len(points), _QUERY_CHUNK):
        chunk = points[start:start + _QUERY_CHUNK]
        dist, index = tree.query(chunk, k=neighbours)
        nearest = seeds[index[:, 0]]
        separation = np.linalg.norm(seeds[index[:, 1:]] - nearest[:, None, :], axis=2)
        out[start:start + len(chunk)] = ((dist[:, 1:] ** 2 - dist[:, :1] ** 2) / (2 * separation)).min(axis=1)
    return out


def _alveolar_tissue(labels: np.ndarray, foams: Sequence[Foam], rng: np.random.Generator) -> np.ndarray:
    """Tissue (``True``) and air of the lung variant: class ``c``'s region filled with foam ``foams[c - 1]``."""
    shape = labels.shape
    tissue = np.zeros(shape, dtype=bool)
    for c, (foam, class_rng) in enumerate(zip(foams, rng.spawn(len(foams))), start=1):
        inside = labels == c
        points = np.argwhere(inside).astype(np.float64)
        wall = _cell_wall_distance(points, _stratified_seeds(shape, foam.spacing, class_rng)) < foam.wall / 2
        if foam.pores > 0:
            field = _filtered_noise(shape, _lowpass((PORE_SMOOTHNESS,) * 3), class_rng)[inside]
            wall &= field <= special.ndtri(1.0 - foam.pores) * field.std()
        tissue[inside] = wall
    return tissue


# ----------------------------------------------------------------------------------------------
# Geometry of the specimen and of its regions
# ----------------------------------------------------------------------------------------------


def _normalised_coordinates(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Per-axis coordinates in ``[-1, 1]`` (voxel centres), broadcastable ``(Z,1,1)``, ``(1,Y,1)``, ``(1,1,X)``."""
    axes = []
    for axis, n in enumerate(shape):
        c = (np.arange(n, dtype=np.float32) - (n - 1) / 2) / max((n - 1) / 2, 1.0)
        axes.append(c.reshape([-1 if a == axis else 1 for a in range(3)]))
    return axes


def _specimen(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Blobby rounded block: a superellipsoid whose radius is modulated by a smooth random field."""
    p = SPECIMEN_EXPONENT
    radius = sum(np.abs(u / a) ** p for u, a in zip(_normalised_coordinates(shape), SPECIMEN_SEMI_AXES))
    return radius ** (1 / p) <= 1.0 + SPECIMEN_WOBBLE * _smooth_field(shape, rng)


def _lloyd_centres(coords: np.ndarray, n: int, rng: np.random.Generator, iterations: int = 30) -> np.ndarray:
    """Centres of ``n`` compact clusters of similar size among the points ``coords`` (k-means, Lloyd)."""
    sample = coords[rng.choice(len(coords), min(len(coords), 20000), replace=False)]
    centres = sample[rng.choice(len(sample), n, replace=False)]
    for _ in range(iterations):
        nearest = ((sample[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        counts = np.bincount(nearest, minlength=n)
        sums = np.stack([np.bincount(nearest, weights=sample[:, a], minlength=n) for a in range(3)], 1)
        centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
    return centres.astype(np.float32)


def _regions(specimen: np.ndarray, n_regions: int, rng: np.random.Generator) -> np.ndarray:
    """Split the grid into ``n_regions`` compact regions of similar specimen volume; ids ``0..n-1``.

    Region centres come from Lloyd (k-means) iterations on the specimen's voxel coordinates, so the
    Voronoi cells hold similar numbers of specimen voxels; the coordinates are displaced by a smooth
    random warp (at most ``BOUNDARY_WARP`` voxels) so that the boundaries are gently curved.
    """
    shape = specimen.shape
    centres = _lloyd_centres(np.argwhere(specimen).astype(np.float32), n_regions, rng)
    grid = [
        np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        + BOUNDARY_WARP * _smooth_field(shape, rng)
        for axis, n in enumerate(shape)
    ]
    best = np.full(shape, np.inf, dtype=np.float32)
    region = np.zeros(shape, dtype=np.int64)
    for i, centre in enumerate(centres):
        d = sum((g - c) ** 2 for g, c in zip(grid, centre))
        closer = d < best
        best[closer] = d[closer]
        region[closer] = i
    return region


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_arguments(
    shape: Sequence[int],
    n_classes: int,
    variant: str,
    noise: float | None,
    bias: float,
    blur: float | None,
    regions_per_class: int,
    textures: Sequence[str] | None = None,
    foams: Sequence[Sequence[float]] | None = None,
) -> tuple[tuple[int, int, int], float, float, tuple[str, ...], tuple[Foam, ...]]:
    """Validate :func:`make_phantom`'s arguments; returns the shape as a tuple of int, ``noise``, ``blur``,
    ``textures`` and ``foams`` (the variant's defaults where ``None``)."""
    if len(shape) != 3 or any(int(s) != s for s in shape) or min(shape) < 16:
        raise ValueError(f"shape must be 3 integers (Z, Y, X), each at least 16, got {tuple(shape)}")
    if isinstance(n_classes, bool) or int(n_classes) != n_classes or not 2 <= n_classes <= len(TEXTURE_NAMES):
        raise ValueError(f"n_classes must be an integer in [2, {len(TEXTURE_NAMES)}], got {n_classes!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "lung" and n_classes != len(LUNG_CLASS_NAMES):
        raise ValueError(f"n_classes must be {len(LUNG_CLASS_NAMES)} for variant 'lung' "
                         f"({', '.join(LUNG_CLASS_NAMES)}), got {n_classes!r}")
    noise = DEFAULT_NOISE[variant] if noise is None else noise
    blur = DEFAULT_BLUR[variant] if blur is None else blur
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not np.isfinite(bias) or not 0 <= bias < 1:
        raise ValueError(f"bias must be in [0, 1), got {bias!r}")
    if not np.isfinite(blur) or blur < 0:
        raise ValueError(f"blur must be a finite number >= 0, got {blur!r}")
    if isinstance(regions_per_class, bool) or int(regions_per_class) != regions_per_class or regions_per_class < 1:
        raise ValueError(f"regions_per_class must be a positive integer, got {regions_per_class!r}")
    if textures is None:
        textures = TEXTURE_NAMES[:n_classes]
    elif variant == "lung":
        raise ValueError("textures applies to the 'texture' and 'intensity' variants, not to 'lung' (its classes "
                         "are alveolar foams)")
    elif isinstance(textures, str) or len(textures) != n_classes or len(set(textures)) != len(textures) \
            or not set(textures) <= set(TEXTURE_NAMES):
        raise ValueError(f"textures must be {n_classes} different names (one per class) of {TEXTURE_NAMES}, "
                         f"got {textures!r}")
    return (tuple(int(s) for s in shape), float(noise), float(blur), tuple(textures),  # type: ignore[return-value]
            _check_foams(foams, variant))


def _check_foams(foams: Sequence[Sequence[float]] | None, variant: str) -> tuple[Foam, ...]:
    """``foams`` as :class:`Foam` tuples (``LUNG_FOAM`` where ``None``); a clear error for anything else."""
    if foams is None:
        return LUNG_FOAM
    if variant != "lung":
        raise ValueError(f"foams applies to the 'lung' variant, not to {variant!r} (its classes are textures)")
    try:
        checked = tuple(Foam(*(float(v) for v in foam)) for foam in foams)
    except (TypeError, ValueError):
        checked = ()
    if len(checked) != len(LUNG_CLASS_NAMES) or not all(
            np.isfinite(f).all() and 2 <= f.spacing and 0 < f.wall < f.spacing and 0 <= f.pores < 1
            for f in checked):
        raise ValueError(f"foams must be {len(LUNG_CLASS_NAMES)} (spacing, wall, pores) triples, one per class "
                         f"({', '.join(LUNG_CLASS_NAMES)}), with spacing >= 2 voxels, 0 < wall < spacing and "
                         f"0 <= pores < 1, got {foams!r}")
    return checked


def _class_means(n_classes: int, variant: str) -> np.ndarray:
    """Mean tissue intensity of each class (index 0 = class 1)."""
    if variant == "texture":
        return np.full(n_classes, TISSUE_MEAN)
    return TISSUE_MEAN + INTENSITY_SPREAD * np.linspace(0.0, 2.0, n_classes)


def make_phantom(
    shape: Sequence[int] = (96, 96, 96),
    n_classes: int = 3,
    variant: str = "texture",
    seed: int = 0,
    noise: float | None = None,
    bias: float = 0.05,
    spacing: Sequence[float] = DEFAULT_SPACING,
    regions_per_class: int = 1,
    blur: float | None = None,
    textures: Sequence[str] | None = None,
    foams: Sequence[Sequence[float]] | None = None,
) -> Phantom:
    """Generate a texture or lung-specimen phantom with its ground truth.

    Parameters
    ----------
    shape : sequence of 3 int, default (96, 96, 96)
        Array shape ``(Z, Y, X)``; each side at least 16.
    n_classes : int, default 3
        Number of tissue classes ``k`` (2 to 9); class ``i`` gets texture ``textures[i - 1]``.
        The ``"lung"`` variant has exactly 3 classes (``LUNG_CLASS_NAMES``) and refuses any other value.
    variant : {"texture", "intensity", "lung"}, default "texture"
        ``"texture"``: all classes share the same intensity distribution (mean ``1``, std ``0.2``,
        Gaussian) and differ in texture only. ``"intensity"``: class means are also spread evenly from
        ``1`` to ``1 + 2 * INTENSITY_SPREAD`` (2.6). ``"lung"``: normal alveolar tissue, lepidic and
        invasive carcinoma, all of tissue ``1`` and air ``0``, which differ in the fraction and
        arrangement of their air spaces (alveolar foams ``LUNG_FOAM``, see the module docstring).
    seed : int, default 0
        Seed of every random choice; the same arguments give identical arrays.
    noise : float, optional
        Standard deviation of the additive white Gaussian noise (tissue mean is 1, texture std 0.2).
        Default (``None``): ``DEFAULT_NOISE[variant]``, 0.05, or 0.25 for ``"lung"``.
    bias : float, default 0.05
        Amplitude of the smooth multiplicative bias field: intensities are scaled by ``1 ± bias``.
    spacing : sequence of 3 float, default (0.5, 0.5, 0.5)
        Voxel size in mm, ``(x, y, z)``. The origin is set so that the volume is centred on ``0``.
    regions_per_class : int, default 1
        Number of separate regions of each class. One region per class gives the largest regions
        (fewest boundary voxels), a few make the layout less regular.
    blur : float, optional
        Standard deviation (voxels) of the Gaussian blur that models the partial-volume effect, applied
        before the bias field and the noise; ``0`` for none. Default (``None``): ``DEFAULT_BLUR[variant]``,
        0, or 0.7 for ``"lung"``.
    textures : sequence of str, optional
        The texture of each class, ``n_classes`` different names of ``TEXTURE_NAMES`` (``"texture"`` and
        ``"intensity"`` variants). Default (``None``): the first ``n_classes`` of them, ``fine_grain``,
        ``coarse_grain``, ``lamellae``, ... Another choice builds a phantom of the same kind from other
        textures, for instance to check that a result does not hold for one set of textures only.
    foams : sequence of 3 :class:`Foam`, optional
        The alveolar foam of each ``"lung"`` class, ``(spacing, wall, pores)`` in voxels: one alveolus in every
        cube of side ``spacing``, walls ``wall`` thick, the walls opened on a ``pores`` share of the volume.
        Default (``None``): ``LUNG_FOAM``, alveoli of 10, 8 and 8 voxels with walls of 1.4, 2.6 and 5.5. Other
        foams build a lung phantom of the same kind, as ``textures`` does for the texture variants.

    Returns
    -------
    Phantom
        ``volume`` (float32, one channel ``"phantom"``, mask = specimen), ``labels`` (uint8,
        ``0`` air, ``1..k`` classes) and ``class_names``.

    Raises
    ------
    ValueError
        If an argument is out of range (the message names it).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), n_classes=3, variant="texture", seed=0)
    >>> phantom.volume.data.shape, phantom.volume.data.dtype, phantom.volume.channel_names
    ((1, 16, 16, 16), dtype('float32'), ('phantom',))
    >>> sorted(np.unique(phantom.labels).tolist()), phantom.class_names
    ([0, 1, 2, 3], ('fine_grain', 'coarse_grain', 'lamellae'))
    >>> bool(np.array_equal(phantom.volume.mask, phantom.labels > 0))
    True
    >>> again = make_phantom(shape=(16, 16, 16), n_classes=3, variant="texture", seed=0)
    >>> bool(np.array_equal(again.volume.data, phantom.volume.data))
    True
    >>> make_phantom(shape=(16, 16, 16), variant="lung").class_names
    ('normal_alveolar', 'lepidic_carcinoma', 'invasive_carcinoma')
    >>> make_phantom(shape=(16, 16, 16), textures=("foam", "fibres", "oblique_lamellae")).class_names
    ('foam', 'fibres', 'oblique_lamellae')
    >>> other = make_phantom(shape=(16, 16, 16), variant="lung", foams=[(12, 1.1, 0.15), (7, 2.2, 0.1), (6, 4, 0)])
    >>> other.class_names
    ('normal_alveolar', 'lepidic_carcinoma', 'invasive_carcinoma')
    """
    shape, noise, blur, textures, foams = _check_arguments(shape, n_classes, variant, noise, bias, blur,
                                                           regions_per_class, textures, foams)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    rng_specimen, rng_regions, rng_textures, rng_bias, rng_noise = streams

    specimen = _specimen(shape, rng_specimen)
    region = _regions(specimen, n_classes * regions_per_class, rng_regions)
    region_class = rng_regions.permutation(np.repeat(np.arange(n_classes), regions_per_class))
    labels = np.where(specimen, region_class[region] + 1, 0).astype(np.uint8)

    if variant == "lung":
        image = np.where(_alveolar_tissue(labels, foams, rng_textures), TISSUE_MEAN, AIR_MEAN).astype(np.float32)
        class_names = LUNG_CLASS_NAMES
    else:
        image = np.full(shape, AIR_MEAN, dtype=np.float32)
        means = _class_means(n_classes, variant)
        texture_seeds = rng_textures.spawn(n_classes)
        for c in range(n_classes):
            inside = labels == c + 1
            field = _texture_field(textures[c], shape, texture_seeds[c])
            image[inside] = means[c] + TEXTURE_STD * _gaussianise(field[inside])
        class_names = textures

    if blur > 0:
        image = ndimage.gaussian_filter(image, blur)
    image *= 1.0 + bias * _smooth_field(shape, rng_bias)
    image += rng_noise.normal(0.0, noise, size=shape).astype(np.float32) if noise > 0 else 0.0

    origin = tuple(-(n - 1) / 2 * s for n, s in zip(shape[::-1], spacing))
    volume = Volume.from_array(
        image, spacing=tuple(spacing), origin=origin, mask=labels > 0, channel_names=("phantom",)
    )
    return Phantom(volume=volume, labels=labels, class_names=class_names)


def _check_writable(path: Path, what: str, overwrite: bool) -> None:
    """Raise before anything is written if ``path`` cannot be created."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder of {what} {str(path)!r} does not exist")


def write_phantom(
    out_path: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    shape: Sequence[int] = (96, 96, 96),
    n_classes: int = 3,
    variant: str = "texture",
    seed: int = 0,
    overwrite: bool = False,
    **kwargs: float | Sequence[float] | Sequence[str] | Sequence[Sequence[float]] | int,
) -> Phantom:
    """Generate a phantom (:func:`make_phantom`) and write it, and optionally its labels, to files.

    Parameters
    ----------
    out_path : str or path-like
        Image file to write (any format SimpleITK writes, e.g. ``.nii.gz``, ``.nrrd``, ``.mha``).
    labels_path : str or path-like, optional
        Ground-truth label file, written with the same geometry; not written when ``None``.
    shape, n_classes, variant, seed
        As in :func:`make_phantom`.
    overwrite : bool, default False
        Replace existing files. Without it, an existing file raises before anything is written.
    **kwargs
        Further :func:`make_phantom` arguments (``noise``, ``bias``, ``spacing``, ``regions_per_class``,
        ``blur``, ``textures``, ``foams``).

    Returns
    -------
    Phantom
        The phantom that was written.

    Raises
    ------
    FileExistsError
        If a target file exists and ``overwrite`` is false.
    FileNotFoundError
        If the folder of a target file does not exist.
    ValueError
        If both paths are the same file, or a phantom argument is out of range.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from jule3d.io import read_image
    >>> from jule3d.phantom import write_phantom
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     image, truth = Path(folder) / "phantom.nii.gz", Path(folder) / "labels.nii.gz"
    ...     phantom = write_phantom(image, truth, shape=(16, 16, 16), variant="lung")
    ...     labels, geometry = read_image(truth)
    ...     print(sorted(p.name for p in Path(folder).iterdir()), labels.dtype, geometry.spacing)
    ['labels.nii.gz', 'phantom.nii.gz'] uint8 (0.5, 0.5, 0.5)
    """
    from .io import save_labels, save_volume

    out = Path(out_path)
    _check_writable(out, "out_path", overwrite)
    if labels_path is not None:
        labels_out = Path(labels_path)
        if labels_out.resolve() == out.resolve():
            raise ValueError(f"labels_path and out_path are the same file: {str(out)!r}")
        _check_writable(labels_out, "labels_path", overwrite)
    phantom = make_phantom(shape=shape, n_classes=n_classes, variant=variant, seed=seed, **kwargs)
    save_volume(phantom.volume, out, overwrite=overwrite)
    if labels_path is not None:
        save_labels(phantom.labels, labels_out, reference=phantom.volume, overwrite=overwrite)
    return phantom
