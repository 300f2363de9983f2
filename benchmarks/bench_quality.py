"""Segmentation quality of JULE-3D and the baselines, side by side (protocol: ``../shared/docs/benchmarks.md``).

Every method runs in the same process, one after another, on the same input, foreground mask and ``k``, and is
scored on the same evaluation voxels. One markdown table per dataset: every method on every case, then the mean
over the cases; columns NMI (arithmetic), NMI (geometric), ARI, matched Dice, seconds and peak resident-memory
growth (MB). The machine's core count is printed with it.

Datasets
--------
``phantom``
    The default texture phantom (``make_phantom()``: 96³, seed 0, k = 3), optionally also its intensity variant
    (``--phantom-variants texture intensity``). Input: the phantom z-scored inside the specimen
    (:func:`jule3d.normalize.normalize_intensity`, air set to 0). Evaluation voxels: the specimen.
``brats``
    BraTS-ROI on ``../shared/data/brats2015`` (or ``$JULE3D_SHARED_DATA/brats2015``). Input: FLAIR and T1c as stored
    (already z-scored inside the brain), read with ``normalize=False`` and the brain mask as foreground. The
    stored background outside the brain is the image minimum (about -3); it is set to 0, the brain mean, which is
    what :func:`jule3d.normalize.normalize_intensity` does to the background, so JULE's patches at the brain edge
    see neutral values instead of an artificial edge (``--brats-intensity stored-background`` keeps the stored
    values; ``renormalized`` applies ``normalize_intensity`` instead: percentile clip and a new z-score). The
    baselines only see brain voxels, so this choice changes JULE-3D alone. Region: the bounding box of
    ``OTMultiClass > 0`` grown by 16 voxels and clipped to the volume; the crop is every method's input.
    Evaluation voxels: the crop ∩ the brain mask. Ground truth: 1 = normal (label 0), 2 = oedema (label 2),
    3 = tumour core (labels 1, 3, 4); k = 3.

``--suite visible``
    Every visible case of ``benchmarks.md``: the texture, intensity and lung phantoms (96³, seed 0), BraTS-ROI
    (4 cases) and the Iguana micro-CT (no labels: the share of multi-Otsu's bone, soft-tissue and cavity voxels
    that fall in one class, cavities counted away from the surface (:data:`SURFACE_RIM`), and whether the three
    fall in different classes), every method with its defaults
    (``jule3d`` = ``jule3d.segment()`` with nothing set, ``jule3d-paper`` = the ``paper`` preset, and every
    peer), seeds 0-4 (methods that ignore the seed run once). One table: mean, sd and worst seed per case and
    method, with seconds and peak memory; ``suite_visible.json`` beside it. ``--cases`` and ``--methods``
    narrow it (``--cases phantom-texture iguana``). ``--cases`` also runs the check cases outside the suite,
    phantoms of the visible kinds built to check the defaults away from the cases they were chosen on
    (:data:`CHECK_CASES`): the texture phantom
    built from its other three textures (foam, fibres, oblique lamellae) with generator seed 2
    (``phantom-texture-other``), the texture phantom of generator seed 3 (``phantom-texture-seed3``), the
    lung phantom of other alveolar foams, generator seed 2 (``phantom-lung-other``), and the texture phantom of
    textures of another construction (beads, cell walls, rods: distances to random sites, not filtered noise),
    generator seed 4 (``phantom-texture-cellular``).

Usage::

    python benchmarks/bench_quality.py --dataset brats                      # 4 cases, fast preset
    python benchmarks/bench_quality.py --dataset brats --seeds 0 1 2 --intensity-weight 2 --smoothing 1
    python benchmarks/bench_quality.py --dataset phantom --phantom-variants texture intensity
    python benchmarks/bench_quality.py --suite visible --out results/suite     # everything, seeds 0-4
    python benchmarks/bench_quality.py --suite visible --cases iguana --methods jule3d otsu atropos
    python benchmarks/bench_quality.py --dataset brats --cases brats_2013_pat0004_1 \\
        --n-patches 4000 -o 'net_overrides={"patch_size": 13}' --out results/quality_p13 --overwrite

With several ``--seeds`` every method runs once per seed; the table shows the mean over seeds and the NMI's
sample sd over seeds (JULE-3D's NMI on one BraTS case moves by up to 0.3 between seeds, the case mean by
about 0.05, so one seed is not enough to rank methods).

Writes ``<out>/quality_<dataset>.md`` (the table and the settings) and ``<out>/quality_<dataset>.json`` (every
row, with its seed, the Dice of each class and the settings).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jule3d.app.batch import safe_name
from jule3d.estimator import segment
from jule3d.evaluation import MethodResult, compare_methods
from jule3d.normalize import normalize_intensity
from jule3d.phantom import Foam, make_phantom
from jule3d.volume import Volume

BRATS_CASES = ("brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1", "brats_2013_pat0006_1")
BRATS_CHANNELS = ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz")
BRATS_INTENSITIES = ("zero-background", "stored-background", "renormalized")
#: BraTS ``OTMultiClass`` label -> benchmark class: 1 normal, 2 oedema, 3 tumour core.
BRATS_CLASSES = np.array([1, 3, 2, 3, 3], dtype=np.uint8)
BRATS_CLASS_NAMES = ("normal", "oedema", "core")
CROP_MARGIN = 16
#: The peers of ``benchmarks.md``; ``atropos`` (antspyx) and ``hmrf`` (dipy) are skipped, with a note, when
#: their optional package is missing.
DEFAULT_METHODS = ("jule3d", "kmeans", "otsu", "gmm", "slic", "localmean", "atropos", "hmrf")
COLUMNS = (("nmi", "NMI"), ("nmi_sd", "NMI sd over seeds"), ("nmi_worst", "worst seed NMI"),
           ("nmi_geometric", "NMI (geom.)"), ("ari", "ARI"), ("dice_mean", "matched Dice"),
           ("bone_share", "bone in one class"), ("soft_share", "soft tissue in one class"),
           ("cavity_share", "cavities in one class"), ("distinct", "tissues in distinct classes"),
           ("seconds", "seconds"), ("peak_mb", "peak MB"))
PHANTOM_CASES = ("phantom-texture", "phantom-intensity", "phantom-lung")
IGUANA = "iguana"
SUITE_CASES = (*PHANTOM_CASES, *BRATS_CASES, IGUANA)
#: The texture phantom's construction with the other three textures (``make_phantom(textures=...)``) and another
#: generator seed: it checks that the texture result is not one of the default textures only (its failure led to
#: the anchor of Phase 1's merges, ``docs/method.md`` 5.6, so it is no longer unseen).
OTHER_TEXTURES = ("foam", "fibres", "oblique_lamellae")
OTHER_TEXTURE_CASE = "phantom-texture-other"
OTHER_TEXTURE_SEED = 2
#: The visible texture phantom's textures from generator seed 3 (the visible one is seed 0): other regions and
#: other fields, built after the defaults were chosen.
TEXTURE_SEED3_CASE = "phantom-texture-seed3"
#: The lung phantom of other alveolar foams (``make_phantom(foams=...)``): alveoli of 12, 7 and 6 voxels with
#: walls of 1.1, 2.2 and 4.0 (the visible one: 10, 8 and 8 with 1.4, 2.6 and 5.5), generator seed 2, built after
#: the defaults were chosen.
OTHER_LUNG_FOAMS = (Foam(12.0, 1.1, 0.15), Foam(7.0, 2.2, 0.10), Foam(6.0, 4.0, 0.0))
OTHER_LUNG_CASE = "phantom-lung-other"
OTHER_LUNG_SEED = 2
#: The texture phantom built from textures of another construction, the distance to random sites (beads, Voronoi
#: cell walls, rods; ``jule3d.phantom``) instead of filtered noise, generator seed 4: built after the defaults
#: were chosen, as the held-out texture phantoms of another construction are.
CELLULAR_TEXTURES = ("beads", "cells", "rods")
CELLULAR_TEXTURE_CASE = "phantom-texture-cellular"
CELLULAR_TEXTURE_SEED = 4
#: Phantoms of the visible kinds outside the visible suite, which check the defaults away from the cases they were
#: chosen on; ``--cases`` runs them.
CHECK_CASES = (OTHER_TEXTURE_CASE, TEXTURE_SEED3_CASE, OTHER_LUNG_CASE, CELLULAR_TEXTURE_CASE)
#: Every method of the visible suite: the two jule3d presets with their defaults and every peer.
SUITE_METHODS = ("jule3d", "jule3d-paper", "kmeans", "otsu", "gmm", "slic", "localmean", "atropos", "hmrf",
                 "kanezaki")
#: Methods that are deterministic and take no seed: the suite runs them once, not once per seed.
SEEDLESS = frozenset({"otsu", "atropos", "hmrf"})
SUITE_SEEDS = (0, 1, 2, 3, 4)


@dataclass
class Case:
    """One benchmark input: the volume every method sees, its ground truth and the voxels that are scored."""

    name: str
    volume: Volume
    ground_truth: np.ndarray
    evaluation_mask: np.ndarray
    n_clusters: int


@dataclass
class JuleSettings:
    """How :func:`jule3d.segment` is called (the ``jule3d`` method); ``None`` leaves ``segment``'s default."""

    preset: str = "fast"
    n_patches: int | None = None
    min_foreground: float | None = None
    stride: int | None = None
    overrides: dict[str, Any] | None = None
    intensity_weight: float | None = None
    smoothing: float | None = None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``segment`` that differ from its defaults."""
        named = {k: getattr(self, k) for k in ("n_patches", "min_foreground", "stride", "intensity_weight",
                                               "smoothing")}
        return {"preset": self.preset, **{k: v for k, v in named.items() if v is not None},
                **(self.overrides or {})}

    def label(self) -> str:
        """Method name in the table, e.g. ``jule3d (fast)`` or ``jule3d (fast, intensity 2, smoothing 1)``."""
        extra = f", intensity {self.intensity_weight:g}" if self.intensity_weight is not None else ""
        extra += f", smoothing {self.smoothing:g}" if self.smoothing is not None else ""
        return f"jule3d ({self.preset}{extra})"


def data_root() -> Path:
    """``$JULE3D_SHARED_DATA`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("JULE3D_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------
# cases


def lesion_box(labels: np.ndarray, margin: int = CROP_MARGIN) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box ``[start, stop)`` (Z, Y, X) of ``labels > 0`` grown by ``margin`` voxels, clipped to the array.

    Raises
    ------
    ValueError
        If ``labels`` has no positive voxel or ``margin`` is negative.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    idx = np.argwhere(np.asarray(labels) > 0)
    if idx.size == 0:
        raise ValueError("labels has no positive voxel: no lesion to crop around")
    start = np.maximum(idx.min(axis=0) - margin, 0)
    stop = np.minimum(idx.max(axis=0) + 1 + margin, labels.shape)
    return tuple(int(s) for s in start), tuple(int(s) for s in stop)


def brats_ground_truth(labels: np.ndarray) -> np.ndarray:
    """Map ``OTMultiClass`` labels (0..4) to the 3 benchmark classes: 1 normal, 2 oedema, 3 core (``uint8``).

    Raises
    ------
    ValueError
        If a label is not an integer in 0..4.
    """
    labels = np.asarray(labels)
    codes = np.rint(labels).astype(np.int64)
    if not np.array_equal(codes, labels) or codes.min() < 0 or codes.max() >= len(BRATS_CLASSES):
        raise ValueError(f"labels must be integers in 0..{len(BRATS_CLASSES) - 1} (OTMultiClass)")
    return BRATS_CLASSES[codes]


def brats_roi(
    volume: Volume, labels: np.ndarray, margin: int = CROP_MARGIN, name: str = "brats"
) -> Case:
    """The BraTS-ROI case of a loaded volume (its mask = the brain) and its ``OTMultiClass`` labels."""
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the volume's {volume.shape}")
    start, stop = lesion_box(labels, margin)
    crop = volume.crop(start, stop)
    sl = tuple(slice(a, b) for a, b in zip(start, stop))
    return Case(name, crop, brats_ground_truth(labels[sl]), crop.foreground().copy(), len(BRATS_CLASS_NAMES))


def brats_input(case_dir: Path, intensity: str = "zero-background") -> Volume:
    """FLAIR + T1c of one BraTS case with the brain mask as foreground (see the module docstring)."""
    from jule3d.io import load_volume  # SimpleITK: only needed for real data

    if intensity not in BRATS_INTENSITIES:
        raise ValueError(f"intensity must be one of {BRATS_INTENSITIES}, got {intensity!r}")
    paths = [case_dir / f for f in BRATS_CHANNELS]
    mask = case_dir / "brainmask.nii.gz"
    volume = load_volume(paths, mask=mask, normalize=intensity == "renormalized", channel_names=("FLAIR", "T1c"))
    if intensity == "zero-background":
        data = np.where(volume.foreground(), np.asarray(volume.data, dtype=np.float32), np.float32(0))
        volume = Volume(data, volume.geometry, mask=volume.mask, channel_names=volume.channel_names,
                        sources=volume.sources)
    # the protocol's intensities are used as they are: marked normalised, so that segment() keeps them
    return replace(volume, normalized=True)


def load_brats_case(case_dir: Path, intensity: str = "zero-background", margin: int = CROP_MARGIN) -> Case:
    """Read one BraTS case folder and return its BraTS-ROI case.

    Raises
    ------
    FileNotFoundError
        If the folder or one of its files is missing.
    """
    from jule3d.io import load_mask, read_image

    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise FileNotFoundError(f"BraTS case folder {case_dir} does not exist")
    volume = brats_input(case_dir, intensity)
    labels, _ = read_image(case_dir / "OTMultiClass.nii.gz")
    load_mask(case_dir / "OTMultiClass.nii.gz", volume)  # checks that the labels lie on the image grid
    return brats_roi(volume, np.asarray(labels), margin, name=case_dir.name)


def phantom_case(variant: str = "texture", size: int = 96, seed: int = 0, n_classes: int = 3,
                 textures: Sequence[str] | None = None, name: str | None = None,
                 foams: Sequence[Foam] | None = None) -> Case:
    """The phantom (z-scored inside the specimen), its labels, evaluated on the specimen; ``textures``,
    ``foams`` and the case ``name`` (default ``phantom-<variant>``) as given."""
    phantom = make_phantom(shape=(size,) * 3, n_classes=n_classes, variant=variant, seed=seed, textures=textures,
                           foams=foams)
    volume = normalize_intensity(phantom.volume)
    return Case(name or f"phantom-{variant}", volume, phantom.labels, phantom.labels > 0, n_classes)


def check_case(name: str) -> Case:
    """One of :data:`CHECK_CASES`, 96³ like the visible phantoms."""
    if name == OTHER_TEXTURE_CASE:
        return phantom_case(seed=OTHER_TEXTURE_SEED, textures=OTHER_TEXTURES, name=name)
    if name == TEXTURE_SEED3_CASE:
        return phantom_case(seed=3, name=name)
    if name == OTHER_LUNG_CASE:
        return phantom_case("lung", seed=OTHER_LUNG_SEED, foams=OTHER_LUNG_FOAMS, name=name)
    if name == CELLULAR_TEXTURE_CASE:
        return phantom_case(seed=CELLULAR_TEXTURE_SEED, textures=CELLULAR_TEXTURES, name=name)
    raise ValueError(f"name must be one of the check cases {CHECK_CASES}, got {name!r}")


#: Voxels inside the mask's border whose dark voxels are the specimen surface's partial volume, not cavities:
#: 72 % of multi-Otsu's dark foreground voxels of the Iguana lie within 2 voxels of the border, 80 % within 3,
#: and only 85 % within 8 (the rest are the cavities).
SURFACE_RIM = 3


def iguana_case() -> Case:
    """The Iguana micro-CT as a user loads it (automatic mask, normalised), k = 3, with multi-Otsu's tissues.

    There is no ground truth: ``ground_truth`` holds multi-Otsu's three intensity classes of the foreground
    (1 cavities, 2 soft tissue, 3 bone), used only by :func:`structure_shares`, never as a score. Dark voxels
    within :data:`SURFACE_RIM` voxels of the mask's border are the air-tissue partial volume of the surface,
    not cavities: they are 0 (left out), so that "cavities" are the air spaces inside the specimen.
    """
    from scipy import ndimage

    from jule3d.io import load_volume
    from jule3d.baselines import multi_otsu

    path = data_root() / "microct" / "Iguana.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (set JULE3D_SHARED_DATA)")
    volume = load_volume(path)
    tissues = multi_otsu(volume, 3)
    mask = volume.foreground()
    tissues[(tissues == 1) & (ndimage.distance_transform_edt(mask) <= SURFACE_RIM)] = 0
    return Case(IGUANA, volume, tissues, mask, 3)


def structure_shares(tissues: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """For each of multi-Otsu's tissues, the share of its voxels in the method's most common class among them.

    Also ``distinct``: how many different classes those three majorities are (3 = cavities, soft tissue and
    bone each mostly in a class of their own; 2 = two of them merged).
    """
    out: dict[str, float] = {}
    majorities = []
    for tissue, name in zip((1, 2, 3), ("cavity", "soft", "bone")):
        counts = np.bincount(labels[tissues == tissue].ravel())
        counts[0] = 0  # background (outside the method's mask) is never a class
        out[f"{name}_share"] = float(counts.max() / max(int((tissues == tissue).sum()), 1))
        majorities.append(int(counts.argmax()))
    out["distinct"] = float(len(set(majorities)))
    return out


# --------------------------------------------------------------------------------------------------
# running


def jule_method(case: Case, settings: JuleSettings, seed: int) -> Callable[[], np.ndarray]:
    """Zero-argument callable running :func:`jule3d.segment` on the case (timed by ``compare_methods``)."""

    def run() -> np.ndarray:
        return segment(case.volume, n_clusters=case.n_clusters, seed=seed, progress=False, **settings.options())
    return run


def run_case(case: Case, methods: Sequence[str], settings: JuleSettings, seed: int) -> list[MethodResult]:
    """Every method on one case, one after another in this process, scored on the case's evaluation voxels."""
    extra = {settings.label(): jule_method(case, settings, seed)} if "jule3d" in methods else {}
    baselines = [m for m in methods if m != "jule3d"]
    return compare_methods(case.volume, case.n_clusters, baselines, case.ground_truth, case.evaluation_mask,
                           extra=extra, seed=seed)


def records(case: str, results: Sequence[MethodResult], seed: int = 0) -> list[dict[str, Any]]:
    """Flat JSON-ready rows (with the seed and the Dice of every class) of one case's results."""
    out = []
    for r in results:
        dice = {str(k): float(v) for k, v in r.metrics.get("dice_per_class", {}).items()}
        out.append({"case": case, "seed": seed, **r.row(), "dice_per_class": dice})
    return out


def _mean_columns(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in rows])) for key, _ in COLUMNS
            if key not in ("nmi_sd", "nmi_worst") and key in rows[0]}


def seed_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case and method: the mean over its seeds, with ``nmi_sd`` (sample sd) when there are several."""
    out = []
    for case, method in dict.fromkeys((r["case"], r["method"]) for r in rows):
        mine = [r for r in rows if r["case"] == case and r["method"] == method]
        nmis = [r["nmi"] for r in mine if "nmi" in r]
        extra = {"nmi_sd": float(np.std(nmis, ddof=1)), "nmi_worst": float(min(nmis))} if len(nmis) > 1 else {}
        out.append({"case": case, "method": method, **_mean_columns(mine), **extra})
    return out


def mean_records(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``case = "mean of N"`` row per method: the mean of every numeric column over the cases (and seeds).

    With several seeds, ``nmi_sd`` is the sample sd over seeds of the mean NMI over the cases: how much the
    headline number moves with the seed.
    """
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = list(dict.fromkeys(r.get("seed", 0) for r in mine))
        per_seed = [np.mean([r["nmi"] for r in mine if r.get("seed", 0) == s]) for s in seeds]
        extra = {"nmi_sd": float(np.std(per_seed, ddof=1))} if len(seeds) > 1 else {}
        n_cases = len({r["case"] for r in mine})
        out.append({"case": f"mean of {n_cases}", "method": method, **_mean_columns(mine), **extra})
    return out


def markdown_table(rows: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """Markdown table: case, method and the metric/cost columns present in the rows."""
    columns = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    lines = ["| case | method | " + " | ".join(h for _, h in columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = [f"{r[k]:.{digits}f}" if k in r else "" for k, _ in columns]
        lines.append(f"| {r['case']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """The machine's core count (and the ones this process may use) and torch's thread count."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{os.cpu_count()} CPU cores ({usable} usable), torch threads {torch.get_num_threads()}, " \
           f"CUDA {'yes' if torch.cuda.is_available() else 'no'}"


def run_dataset(
    cases: Sequence[Callable[[], Case]], methods: Sequence[str], settings: JuleSettings, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Load and run the cases one at a time (one case in memory), every method once per seed; print each
    case's table as it finishes."""
    rows: list[dict[str, Any]] = []
    for load in cases:
        case = load()
        for seed in seeds:
            case_rows = records(case.name, run_case(case, methods, settings, seed), seed)
            print(f"seed {seed}\n" + markdown_table(case_rows), flush=True)
            rows += case_rows
    return rows


def write_report(out: Path, dataset: str, rows: list[dict[str, Any]], settings: dict[str, Any],
                 overwrite: bool, table: str | None = None) -> str:
    """Write ``quality_<dataset>.md`` and ``.json`` into ``out``; returns the markdown.

    ``table`` replaces the default table (the mean over seeds per case, then the mean over the cases).
    """
    md_path, json_path = out / f"quality_{dataset}.md", out / f"quality_{dataset}.json"
    for path in (md_path, json_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if table is None:
        table = markdown_table(seed_means(rows) + (mean_records(rows) if len({r['case'] for r in rows}) > 1 else []))
    text = (f"# Quality benchmark: {dataset}\n\n{table}\n\nMachine: {settings['machine']}.\n\n"
            f"Command: `{settings['command']}`\n\nSettings: `{json.dumps(settings['jule'])}`\n")
    out.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text, encoding="utf-8")
    json_path.write_text(json.dumps({"dataset": dataset, "settings": settings, "rows": rows}, indent=1), encoding="utf-8")
    return text


def suite_loaders(cases: Sequence[str], brats_intensity: str) -> list[Callable[[], Case]]:
    """Loaders of the named visible-suite (or check) cases, in the given order (one case in memory at a time)."""
    loads: list[Callable[[], Case]] = []
    for name in cases:
        if name in CHECK_CASES:
            loads.append(lambda c=name: check_case(c))
        elif name in PHANTOM_CASES:
            loads.append(lambda v=name.split("-", 1)[1]: phantom_case(v))
        elif name in BRATS_CASES:
            loads.append(lambda c=name: load_brats_case(data_root() / "brats2015" / c, brats_intensity))
        else:
            loads.append(iguana_case)
    return loads


def suite_methods(methods: Sequence[str]) -> dict[str, JuleSettings | str]:
    """Table name -> what runs it: a :class:`JuleSettings` (defaults only) or a baseline name."""
    out: dict[str, JuleSettings | str] = {}
    for m in methods:
        if m == "jule3d":
            out["jule3d (default)"] = JuleSettings()
        elif m == "jule3d-paper":
            out["jule3d (paper)"] = JuleSettings(preset="paper")
        else:
            out[m] = m
    return out


def run_suite(cases: Sequence[str], methods: Sequence[str], seeds: Sequence[int], brats_intensity: str,
              figures: Path | None = None) -> list[dict[str, Any]]:
    """Every method on every case, once per seed (once for :data:`SEEDLESS` methods); rows as :func:`records`.

    Iguana rows carry :func:`structure_shares` instead of metrics; with ``figures``, seed 0's Iguana labels are
    saved there as slice images (PNG, through kaleido) for a person to look at.
    """
    rows: list[dict[str, Any]] = []
    runners = suite_methods(methods)
    for load in suite_loaders(cases, brats_intensity):
        case = load()
        truth = None if case.name == IGUANA else case.ground_truth
        for name, how in runners.items():
            for seed in (seeds[:1] if isinstance(how, str) and how in SEEDLESS else seeds):
                extra = {name: jule_method(case, how, seed)} if isinstance(how, JuleSettings) else {}
                results = compare_methods(case.volume, case.n_clusters, [] if extra else [how], truth,
                                          case.evaluation_mask, extra=extra, seed=seed)
                row = records(case.name, results, seed)[0]
                if case.name == IGUANA:
                    row.update(structure_shares(case.ground_truth, results[0].labels))
                    if figures is not None and seed == seeds[0]:
                        save_slices(case, results[0].labels, figures / f"iguana_{safe_name(name)}.png", name)
                print(markdown_table([row]).splitlines()[-1], flush=True)
                rows.append(row)
    return rows


def save_slices(case: Case, labels: np.ndarray, path: Path, title: str) -> None:
    """Orthogonal slices of the case with ``labels`` overlaid, as an image file (needs kaleido's browser)."""
    from jule3d.app.plotting import plot_label_slices

    path.parent.mkdir(parents=True, exist_ok=True)
    plot_label_slices(case.volume, labels, slider_axis=None, title=f"{case.name}: {title}").write_image(
        str(path), width=1300, height=480, scale=1.5)


def suite_table(rows: Sequence[dict[str, Any]]) -> str:
    """The suite's markdown: per case and method the mean, sd and worst seed, then the BraTS-ROI mean."""
    per_case = seed_means(rows)
    brats = [r for r in rows if r["case"] in BRATS_CASES]
    means = mean_records(brats) if len({r["case"] for r in brats}) > 1 else []
    for r in means:
        r["case"] = f"BraTS-ROI {r['case']}"
    return markdown_table(per_case + means)


# --------------------------------------------------------------------------------------------------
# command line


def parse_override(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE a Python literal (``3``, ``0.5``, ``{"patch_size": 11}``) or a bare string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"-o expects NAME=VALUE, got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("phantom", "brats", "all"), default="all")
    p.add_argument("--suite", choices=("visible",), help="run the visible suite (overrides --dataset; seeds 0-4 "
                   "unless --seeds, every suite method unless --methods, every suite case unless --cases)")
    p.add_argument("--figures", action="store_true", help="suite: save the Iguana label slices as PNG files")
    p.add_argument("--preset", choices=("fast", "paper"), default="fast")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="run every method once per seed; the tables show the mean and the NMI's sd over seeds")
    p.add_argument("--cases", nargs="+", default=None,
                   help="BraTS case folders (with --suite: suite cases, e.g. phantom-lung iguana)")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--out", type=Path, default=Path("results/quality"))
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    p.add_argument("--n-patches", type=int, default=None, help="JULE training patches (default: segment's)")
    p.add_argument("--min-foreground", type=float, default=None,
                   help="foreground fraction of a training patch (default: jule3d.segment's)")
    p.add_argument("--stride", type=int, default=None, help="Phase 2 grid stride (default: segment's)")
    p.add_argument("--intensity-weight", type=float, default=None,
                   help="[ours] local mean intensity appended to the features before k-means (default: segment's)")
    p.add_argument("--smoothing", type=float, default=None,
                   help="[ours] Potts weight regularising jule3d's labels (default: segment's)")
    p.add_argument("-o", dest="overrides", action="append", type=parse_override, default=[],
                   metavar="NAME=VALUE", help="JuleConfig field, e.g. -o epochs_per_period=5 (repeatable)")
    p.add_argument("--phantom-variants", nargs="+", choices=("texture", "intensity", "lung"), default=["texture"])
    p.add_argument("--brats-intensity", choices=BRATS_INTENSITIES, default="zero-background")
    args = p.parse_args(argv)
    default = SUITE_CASES if args.suite else BRATS_CASES
    valid = (*default, *CHECK_CASES) if args.suite else default
    args.cases = list(args.cases or default)
    args.methods = list(args.methods or (SUITE_METHODS if args.suite else DEFAULT_METHODS))
    args.seeds = list(args.seeds or (SUITE_SEEDS if args.suite else (0,)))
    unknown = [c for c in args.cases if c not in valid]
    if unknown:
        p.error(f"--cases {unknown} are not {'suite' if args.suite else 'BraTS'} cases; valid: {list(valid)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the selected datasets (or the suite) and write their reports."""
    from jule3d.baselines import BASELINES, missing_package

    args = parse_args(argv)
    jule_names = ("jule3d", "jule3d-paper") if args.suite else ("jule3d",)
    bad = [m for m in args.methods if m not in jule_names and m not in BASELINES]
    missing = {m: missing_package(m) for m in args.methods if m not in jule_names and m not in bad
               and missing_package(m)}
    if bad:
        raise ValueError(f"--methods {bad} are unknown; valid: {list(jule_names)} + {sorted(BASELINES)}")
    for method, package in missing.items():
        print(f"note: skipping {method}: pip install {package} to run it", flush=True)
    args.methods = [m for m in args.methods if m not in missing]
    settings = JuleSettings(args.preset, args.n_patches, args.min_foreground, args.stride, dict(args.overrides),
                            args.intensity_weight, args.smoothing)
    info = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "jule": {**vars(settings), "seeds": args.seeds}, "brats_intensity": args.brats_intensity}
    print(info["machine"], flush=True)
    if args.suite:
        figures = args.out / "figures" if args.figures else None
        rows = run_suite(args.cases, args.methods, args.seeds, args.brats_intensity, figures)
        print("\n" + write_report(args.out, "suite_visible", rows, info, args.overwrite, suite_table(rows)),
              flush=True)
        return
    datasets = ("brats", "phantom") if args.dataset == "all" else (args.dataset,)
    for dataset in datasets:
        if dataset == "brats":
            root = data_root() / "brats2015"
            if not root.is_dir():
                raise FileNotFoundError(f"BraTS data folder {root} does not exist (set JULE3D_SHARED_DATA)")
            loads = [lambda c=c: load_brats_case(root / c, args.brats_intensity) for c in args.cases]
        else:
            loads = [lambda v=v: phantom_case(v) for v in args.phantom_variants]  # the default phantom: seed 0
        print(f"\n## {dataset}", flush=True)
        rows = run_dataset(loads, args.methods, settings, args.seeds)
        print("\n" + write_report(args.out, dataset, rows, info, args.overwrite), flush=True)


if __name__ == "__main__":
    main()
