"""Phase 2 ablations on cached Phase 1 networks: many clusterings of the same grid features, scored per seed.

Phase 1 (training the networks) dominates the cost of a run; Phase 2 (grid features → clustering → labels) is
seconds. This script trains the default's networks once per visible case and seed (``JuleSegmenter.fit`` with
``segment``'s defaults), caches their grid features in ``--cache`` (``<case>_s<seed>_<settings>.npz``,
:func:`cache_name`), and then scores every
named Phase 2 variant of :data:`VARIANTS` on them: voxel NMI per case and seed, the mean, sd and worst seed, and
the BraTS-ROI mean. The default's row is ``default`` (``label_volume``'s ``consensus`` with its defaults), so
the numbers sit beside it in one run; the cache is reused by later runs (a change of Phase 1's code, not its
settings, needs the cache deleted). Cells:
NMI mean ± sd over the seeds (worst seed); the last column is the mean seconds of the variant's Phase 2 after the
grid features (clustering, merging, smoothing, projection).

``--cost`` instead times the whole of ``segment()`` on the texture phantom, the default against what ``fast`` was
before: one network with JULE's own merges and a k-means Phase 2 (``n_networks=1, phase2="kmeans"``,
``jule_options={"anchor": 0}``), in this process, and prints the ratio.

Usage::

    python benchmarks/bench_phase2.py --cases phantom-texture phantom-lung --seeds 0 1 2 3 4
    python benchmarks/bench_phase2.py --variants default kmeans --out results/phase2.json
    python benchmarks/bench_phase2.py --cost --seeds 0 1
    python benchmarks/bench_phase2.py --variants default --jule-options '{"raw_features": "spectrum+mean"}'
    python benchmarks/bench_phase2.py --variants default consensus-no-refine --borders
    python benchmarks/bench_phase2.py --cases phantom-lung phantom-intensity --border-reference
    python benchmarks/bench_phase2.py --cases phantom-texture-other --variants default --networks

``--jule-options`` trains every network with these :class:`jule3d.config.JuleConfig` fields instead (a Phase 1
ablation; its features are cached under a name of their own).

``--borders`` adds where each variant's errors lie (:func:`border_profile`): the error rate of the voxels at each
distance from the true border between two classes, the share of all errors within :data:`BORDER_BANDS` ``[1]``
voxels of it, and the share of the errors that the most over-predicted class takes (1/k when errors run every
way, near 1 when one class grows into its neighbours).

``--networks`` adds how well each network's own features carry the classes (:func:`network_scores`): a linear
probe's balanced accuracy (supervised) and k-means' NMI (unsupervised), per case, seed and network, beside the
variants' scores. It tells a seed whose networks did not learn the classes from one whose choice missed them.

``--border-reference`` scores no method, and needs no network: for each case, the NMI of its ground truth
with only border errors (:func:`border_reference`), a share of the voxels within a distance of a true border given
the nearest other class (:data:`BORDER_REFERENCE`). It says how close to the border a method must place it for a
score: what a target in NMI asks of the borders.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import BRATS_CASES, CHECK_CASES, PHANTOM_CASES, SUITE_SEEDS, suite_loaders, Case  # noqa: E402
from jule3d import segmentation as seg  # noqa: E402
from jule3d.estimator import JuleSegmenter, segment  # noqa: E402
from jule3d.grid import Grid  # noqa: E402
from jule3d.metrics import match_labels, nmi  # noqa: E402

#: :class:`JuleSegmenter` parameters that ``--jule-options`` may set (all but the case's ``n_clusters`` or the run's seed).
SEGMENTER_PARAMETERS = tuple(sorted(set(inspect.signature(JuleSegmenter).parameters)
                                     - {"n_clusters", "seed", "jule_options"}))

#: Upper edges (voxels) of the distance bands of :func:`border_profile`; the last band is everything farther.
BORDER_BANDS: tuple[int, ...] = (2, 4, 8)
#: ``(distance, share)`` of every row of ``--border-reference`` (:func:`border_reference`): voxels within
#: ``distance`` voxels of a true border, and the share of them given the other side's class.
BORDER_REFERENCE: tuple[tuple[float, float], ...] = ((1, 0.25), (1, 0.5), (2, 0.25), (2, 0.5), (4, 0.25))

Variant = Callable[[Sequence[seg.GridFeatures], Case, int], np.ndarray]


def _label(grids: Sequence[seg.GridFeatures], case: Case, seed: int, **options) -> np.ndarray:
    return seg.label_grids(grids, case.volume, case.n_clusters, seed=seed, **options)


def _consensus(grids: Sequence[seg.GridFeatures], case: Case, seed: int, refine: bool = True,
               **options) -> np.ndarray:
    """The consensus with other candidates (``options`` of ``consensus_segment``), refined or not."""
    clusters = seg.consensus_segment(grids, case.volume, case.n_clusters, seed=seed, **options).labels
    labels = seg.project_labels(grids[0], clusters, case.volume)
    return seg.refine_labels(labels, case.volume, grids[0].stride) if refine else labels


def _refinement_before(setting: str, value: object) -> Variant:
    """The default with one setting of the refinement (a constant of :mod:`jule3d.clustering`) as it was before."""

    def variant(grids: Sequence[seg.GridFeatures], case: Case, seed: int) -> np.ndarray:
        from jule3d import clustering

        with mock.patch.object(clustering, setting, value):
            return _label(grids, case, seed)

    return variant


def _choice_before(grids: Sequence[seg.GridFeatures], case: Case, seed: int, choice: str) -> np.ndarray:
    """The default with a rule before keeping the consensus candidate (``choose_candidate(choice=...)``), on the
    default's own path, so that ``"factor-first"`` reproduces the default before bit for bit."""
    original = seg.choose_candidate

    def rule(*args, **options):
        return original(*args, **{**options, "choice": choice})

    with mock.patch.object(seg, "choose_candidate", rule):
        return _label(grids, case, seed)


def _best_candidate(grids: Sequence[seg.GridFeatures], case: Case, seed: int) -> np.ndarray:
    """Not a method (it reads the ground truth): the refined consensus candidate that scores best, the ceiling of
    any rule that chooses among the default's candidates."""
    candidates = seg.consensus_segment(grids, case.volume, case.n_clusters, seed=seed).candidate_labels
    refined = [seg.refine_labels(seg.project_labels(grids[0], labels, case.volume), case.volume, grids[0].stride)
               for labels in candidates]
    truth = case.ground_truth[case.evaluation_mask]
    return max(refined, key=lambda labels: nmi(truth, labels[case.evaluation_mask]))


def _vote(grids: Sequence[seg.GridFeatures], case: Case, seed: int) -> np.ndarray:
    """Tried, not adopted: a plurality vote of the consensus candidates that keep every class (all of them where
    none does), each renamed to the kept candidate's classes (Hungarian matching), then refined; ties go to the
    lower class."""
    consensus = seg.consensus_segment(grids, case.volume, case.n_clusters, seed=seed)
    k, kept = case.n_clusters, consensus.labels + 1
    votes = np.zeros((len(kept), k))
    for i in seg.complete_candidates(consensus.candidate_labels, k):
        votes[np.arange(len(kept)), match_labels(consensus.candidate_labels[i] + 1, kept) - 1] += 1
    labels = seg.project_labels(grids[0], votes.argmax(axis=1), case.volume)
    return seg.refine_labels(labels, case.volume, grids[0].stride)


def _ward_merge(grids: Sequence[seg.GridFeatures], case: Case, seed: int) -> np.ndarray:
    """The default with the merge of before: Ward's cost, and neither specks nor surface layers merged first
    (:func:`jule3d.segmentation.merge_clusters` with ``linkage="ward", min_share=0`` and no surface)."""
    merge = seg.merge_clusters

    def ward(contacts, sizes, centroids, n_clusters, surface=None):
        return merge(contacts, sizes, centroids, n_clusters, min_share=0.0, linkage="ward")

    with mock.patch.object(seg, "merge_clusters", ward):
        return _label(grids, case, seed)


#: Phase 2 variants on the same two networks: ``default`` is ``label_volume``'s default (``label_grids``, the
#: same code); ``merge-ward`` is the default with the merge of before (Ward's cost); ``support-all`` judges each
#: candidate by its agreement with all the others, the rule before, not only with the other network subsets'
#: candidates; ``factor-first`` chooses the intensity factor whose candidates agree best across networks, then its
#: medoid, the rule before each candidate was judged at its own factor; ``medoid-of-all-factors`` keeps the medoid
#: of every intensity factor's candidates, the rule before that; ``refine-no-potts`` refines every voxel alone
#: (no voxel Potts model), ``refine-one-gaussian`` with one Gaussian per class, ``refine-box-mean`` from the
#: box mean instead of the median and ``refine-one-pass`` in one pass, each the refinement before;
#: ``no-refine-*`` are consensus variants before :func:`refine_labels`; ``vote-of-candidates`` replaces the
#: choice of one candidate by a vote of them; ``oracle-best-candidate`` is a diagnostic that uses the labels.
VARIANTS: dict[str, Variant] = {
    "default": _label,
    "merge-ward": _ward_merge,
    "support-all": lambda g, c, s: _consensus(g, c, s, cross_support=False),
    "factor-first": lambda g, c, s: _choice_before(g, c, s, "factor-first"),
    "medoid-of-all-factors": lambda g, c, s: _choice_before(g, c, s, "medoid"),
    "consensus-one-restart": lambda g, c, s: _consensus(g, c, s, restarts=1),
    "consensus-no-refine": lambda g, c, s: _consensus(g, c, s, refine=False),
    "refine-one-gaussian": _refinement_before("REFINE_COMPONENTS", 1),
    "refine-no-potts": _refinement_before("REFINE_SMOOTHING", 0.0),
    "refine-box-mean": _refinement_before("REFINE_STATISTIC", "mean"),
    "refine-one-pass": _refinement_before("REFINE_PASSES", 1),
    "no-refine-plain-medoid": lambda g, c, s: _consensus(g, c, s, refine=False, min_share=0.0),
    "no-refine-weights-0.5-2": lambda g, c, s: _consensus(g, c, s, refine=False, weights=(0.5, 1.0, 2.0)),
    "no-refine-weight-1": lambda g, c, s: _consensus(g, c, s, refine=False, weights=(1.0,)),
    "no-refine-window-5": lambda g, c, s: _consensus(g, c, s, refine=False, window=5),
    "no-refine-window-9": lambda g, c, s: _consensus(g, c, s, refine=False, window=9),
    "no-refine-one-network": lambda g, c, s: _consensus(g[:1], c, s, refine=False),
    "merge": lambda g, c, s: _label(g, c, s, phase2="merge"),
    "merge-one-network": lambda g, c, s: _label(g[:1], c, s, phase2="merge"),
    "merge-refined": lambda g, c, s: seg.refine_labels(_label(g, c, s, phase2="merge"), c.volume, g[0].stride),
    "merge-no-intensity": lambda g, c, s: _label(g, c, s, phase2="merge", intensity_weight=0.0),
    "kmeans": lambda g, c, s: _label(g, c, s, phase2="kmeans"),
    "vote-of-candidates": _vote,
    "oracle-best-candidate": _best_candidate,
}


def border_neighbours(truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel of ``mask``: its distance (voxels) to the nearest voxel of another class of ``truth`` (> 0),
    and that voxel's class (0 where the case has one class only, with the distance infinite)."""
    from scipy import ndimage

    distance = np.full(truth.shape, np.inf)
    other = np.zeros_like(truth)
    for c in np.unique(truth[mask]):
        if c > 0:
            elsewhere = (truth > 0) & (truth != c)
            if elsewhere.any():
                to_other, nearest = ndimage.distance_transform_edt(~elsewhere, return_indices=True)
                here = truth == c
                distance[here], other[here] = to_other[here], truth[tuple(nearest)][here]
    return distance[mask], other[mask]


def border_distance(truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Distance (voxels) of every voxel of ``mask`` to the nearest voxel of another class of ``truth`` (> 0)."""
    return border_neighbours(truth, mask)[0]


def border_reference(case: Case, within: float, share: float, seed: int = 0,
                     neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """NMI of the case's ground truth with errors only along its borders: of the evaluation voxels within
    ``within`` voxels of a border between two classes, a seeded random ``share`` take the class of the nearest
    voxel of another class (:func:`border_neighbours`). Returns that ``nmi``, the share of the evaluation voxels
    so changed (``errors``) and the share within ``within`` voxels of a border (``band``). ``neighbours`` is
    :func:`border_neighbours` of the case, when already computed.
    """
    mask = case.evaluation_mask
    truth = case.ground_truth[mask]
    distance, other = border_neighbours(case.ground_truth, mask) if neighbours is None else neighbours
    band = distance <= within
    flip = band & (np.random.default_rng(seed).random(band.shape) < share)
    labels = truth.copy()
    labels[flip] = other[flip]
    return {"nmi": float(nmi(truth, labels)), "errors": float(flip.mean()), "band": float(band.mean())}


def border_profile(labels: np.ndarray, case: Case, distance: np.ndarray | None = None) -> dict[str, float]:
    """Where the errors of ``labels`` lie (a diagnosis: it reads the ground truth).

    The labels are renamed to the classes they match (Hungarian, :func:`jule3d.metrics.match_labels`) and
    compared voxel by voxel on the evaluation mask. Returns the error rate (``error``), the error rate of the
    voxels in each band of distance to the true border (``error_<=2``, ``error_<=4``, ``error_<=8``,
    ``error_>8``), the share of all errors within ``BORDER_BANDS[1]`` voxels of it (``near_share``), and the
    share of the errors whose predicted class is the one that takes the most errors (``one_way``).
    ``distance`` is :func:`border_distance` of the case, when already computed.
    """
    mask = case.evaluation_mask
    truth = case.ground_truth[mask]
    distance = border_distance(case.ground_truth, mask) if distance is None else distance
    matched = match_labels(labels[mask], truth)
    wrong = matched != truth
    out = {"error": float(wrong.mean())}
    lower = 0.0
    for upper in (*BORDER_BANDS, np.inf):
        band = (distance > lower) & (distance <= upper)
        key = f"error_<={upper}" if np.isfinite(upper) else f"error_>{lower:g}"
        out[key] = float(wrong[band].mean()) if band.any() else float("nan")
        lower = upper
    n_wrong = int(wrong.sum())
    near = distance <= BORDER_BANDS[1]
    out["near_share"] = float((wrong & near).sum() / n_wrong) if n_wrong else float("nan")
    taken = np.bincount(matched[wrong])
    out["one_way"] = float(taken.max() / n_wrong) if n_wrong else float("nan")
    return out


def network_scores(grids: Sequence[seg.GridFeatures], case: Case, seed: int) -> list[dict[str, float]]:
    """Each network's own features at the grid centres inside the evaluation voxels: the balanced accuracy of a
    linear probe of the classes (supervised: ``bench_features.probe_accuracy``) and the NMI of k-means with the
    case's ``k`` (unsupervised: the published Phase 2 on that network alone), one dict per network."""
    from bench_features import probe_accuracy

    centres = tuple(grids[0].centers.T)
    scored = case.evaluation_mask[centres] & (case.ground_truth[centres] > 0)
    truth = case.ground_truth[centres][scored]
    out = []
    for grid in grids:
        features = np.asarray(grid.features, dtype=np.float32)
        clusters = seg.cluster_features(features, case.n_clusters, seed=seed)
        out.append({"probe": probe_accuracy(features[scored], truth, seed),
                    "kmeans_nmi": nmi(truth, clusters[scored])})
    return out


def _segmenter(case: Case, seed: int, jule_options: dict | None = None) -> JuleSegmenter:
    """The default's segmenter (``segment()`` with nothing set, or with these ``jule_options``) for one case.

    Options that are :class:`~jule3d.estimator.JuleSegmenter` parameters (``n_networks``, ``final_epochs``,
    ``eta``, ...) are passed as such, the other :class:`~jule3d.config.JuleConfig` fields as ``jule_options``.
    """
    options = dict(jule_options or {})
    direct = {name: options.pop(name) for name in SEGMENTER_PARAMETERS if name in options}
    return JuleSegmenter(n_clusters=case.n_clusters, seed=seed, jule_options=options or None, **direct)


def train_default(case: Case, seed: int, jule_options: dict | None = None) -> JuleSegmenter:
    """Phase 1 of the default, or with these ``jule_options`` (:func:`_segmenter`), on one case."""
    return _segmenter(case, seed, jule_options).fit(case.volume)


#: Segmenter parameters left out of a cache's name: those that do not change the networks' grid features, and
#: ``jule_options``, whose effect the networks' JuleConfigs carry (an option set to its default names no other
#: networks).
CACHE_NAME_OMITS = frozenset({"phase2", "intensity_weight", "intensity_window", "smoothing", "progress", "device",
                              "jule_options"})


def cache_name(case: Case, seed: int, jule_options: dict | None = None) -> str:
    """File name of a case's and seed's cached features: tagged by a hash of every setting that trains them
    (the resolved segmenter parameters and every network's :class:`~jule3d.config.JuleConfig`), so that
    networks trained under another default, or with other options, never stand in for these."""
    import dataclasses

    segmenter = _segmenter(case, seed, jule_options)
    settings = {name: value for name, value in segmenter.resolved().items() if name not in CACHE_NAME_OMITS}
    configs = [dataclasses.asdict(segmenter.jule_config(i)) for i in range(segmenter.resolved_networks())]
    settings["networks"] = [{k: v for k, v in c.items() if k != "device"} for c in configs]
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{case.name}_s{seed}_{tag}.npz"


def cached_grids(case: Case, seed: int, cache: Path, jule_options: dict | None = None) -> list[seg.GridFeatures]:
    """The networks' grid features for one case and seed (the default's, or trained with ``jule_options``):
    from ``cache`` or trained and stored."""
    path = cache / cache_name(case, seed, jule_options)
    if path.is_file():
        with np.load(path) as data:
            n = int(data["n_networks"])
            grid = Grid(case.volume.shape, 2 * int(data["offset"]) + 1, int(data["stride"]))
            return [seg.GridFeatures(data[f"features_{i}"], grid, data["selected"]) for i in range(n)]
    grids = train_default(case, seed, jule_options).transform(case.volume)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.npz")
    np.savez(partial, n_networks=len(grids), grid_shape=grids[0].grid_shape, selected=grids[0].selected,
             offset=grids[0].offset, stride=grids[0].stride,
             **{f"features_{i}": np.asarray(g.features) for i, g in enumerate(grids)})
    partial.replace(path)
    return grids


def cost(seeds: Sequence[int]) -> None:
    """Seconds of ``segment()`` with its defaults vs ``fast`` as it was (one network with JULE's merges, k-means),
    on the texture phantom."""
    from bench_quality import phantom_case

    case = phantom_case("texture")
    before = {"n_networks": 1, "phase2": "kmeans", "jule_options": {"anchor": 0.0}}
    runs = {"one network, kmeans": before, "default": {}}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for seed in seeds:
        for name, options in runs.items():
            start = time.perf_counter()
            segment(case.volume, n_clusters=case.n_clusters, seed=seed, progress=False, **options)
            seconds[name].append(time.perf_counter() - start)
            print(f"seed {seed} {name}: {seconds[name][-1]:.1f} s", flush=True)
    base, new = np.mean(seconds["one network, kmeans"]), np.mean(seconds["default"])
    print(f"\nsegment() on the 96³ texture phantom: one network + kmeans {base:.1f} s, default {new:.1f} s, "
          f"ratio {new / base:.2f}")


def print_networks(rows: Sequence[dict], variants: Sequence[str]) -> None:
    """The ``--networks`` table: per case and seed, each network's probe and k-means NMI, then the variants'."""
    scored = [r for r in rows if r["variant"] == "networks"]
    n = max(len(r["networks"]) for r in scored)
    print("\nEach network's own features at the grid centres (probe: supervised balanced accuracy; k-means: NMI):\n")
    print("| case | seed | " + " | ".join(f"network {i} probe | network {i} k-means" for i in range(n)) + " | "
          + " | ".join(variants) + " |")
    print("|---|---:|" + "---:|" * (2 * n + len(variants)))
    for r in scored:
        cells = [f"{x[key]:.3f}" for x in r["networks"] for key in ("probe", "kmeans_nmi")]
        cells += [f"{v['nmi']:.3f}" for name in variants for v in rows
                  if v["variant"] == name and v["case"] == r["case"] and v["seed"] == r["seed"]]
        print(f"| {r['case']} | {r['seed']} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=[*PHANTOM_CASES, *BRATS_CASES],
                        choices=[*PHANTOM_CASES, *BRATS_CASES, *CHECK_CASES],
                        help=f"visible cases (default: all with labels), or the check cases {', '.join(CHECK_CASES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SUITE_SEEDS), help="run seeds (default 0-4)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="Phase 2 variants to score (default: all)")
    parser.add_argument("--cache", type=Path, default=Path("results/phase2_cache"),
                        help="folder of the cached grid features (default results/phase2_cache)")
    parser.add_argument("--out", type=Path, default=None, help="write every row as JSON to this file")
    parser.add_argument("--jule-options", type=json.loads, default=None, metavar="JSON",
                        help='Phase 1 ablation: JuleConfig fields for every network, e.g. '
                             '\'{"raw_features": "spectrum+mean"}\' (cached apart from the default\'s)')
    parser.add_argument("--train-only", action="store_true", help="fill the cache, score nothing")
    parser.add_argument("--cost", action="store_true", help="time segment() instead (see above)")
    parser.add_argument("--borders", action="store_true",
                        help="also report where the errors lie: by distance to the true border (see above)")
    parser.add_argument("--networks", action="store_true",
                        help="also score each network's own features: probe and k-means (see above)")
    parser.add_argument("--border-reference", action="store_true",
                        help="score the ground truth with errors only along its borders instead (see above)")
    args = parser.parse_args(argv)
    if args.cost:
        cost(args.seeds)
        return
    if args.border_reference:
        print("| case | within (voxels) | share given the other class | errors | NMI |\n|---|---|---|---|---|")
        for load in suite_loaders(args.cases, "zero-background"):
            case = load()
            neighbours = border_neighbours(case.ground_truth, case.evaluation_mask)
            for within, share in BORDER_REFERENCE:
                r = border_reference(case, within, share, neighbours=neighbours)
                print(f"| {case.name} | {within:g} ({r['band']:.1%} of the voxels) | {share:g} | {r['errors']:.2%} "
                      f"| {r['nmi']:.3f} |", flush=True)
        return
    rows = []
    for load in suite_loaders(args.cases, "zero-background"):
        case = load()
        distance = border_distance(case.ground_truth, case.evaluation_mask) if args.borders else None
        for seed in args.seeds:
            grids = cached_grids(case, seed, args.cache, args.jule_options)
            if args.train_only:
                print(f"{case.name} seed {seed}: cached", flush=True)
                continue
            for name in args.variants:
                start = time.perf_counter()
                labels = VARIANTS[name](grids, case, seed)
                score = nmi(case.ground_truth[case.evaluation_mask], labels[case.evaluation_mask])
                rows.append({"case": case.name, "seed": seed, "variant": name, "nmi": float(score),
                             "seconds": time.perf_counter() - start})
                print(f"{case.name} s{seed} {name}: {score:.3f}", flush=True)
                if args.borders:
                    rows[-1]["borders"] = border_profile(labels, case, distance)
            if args.networks:
                rows.append({"case": case.name, "seed": seed, "variant": "networks",
                             "networks": network_scores(grids, case, seed)})
                print(f"{case.name} s{seed} networks: " + ", ".join(
                    f"probe {n['probe']:.3f} k-means {n['kmeans_nmi']:.3f}" for n in rows[-1]["networks"]), flush=True)
    if args.train_only:
        return
    print("\n| variant | " + " | ".join(args.cases) + " | BraTS mean | Phase 2 seconds |")
    print("|---|" + "---|" * (len(args.cases) + 2))
    for name in args.variants:
        cells, brats = [], []
        for case in args.cases:
            scores = np.array([r["nmi"] for r in rows if r["variant"] == name and r["case"] == case])
            cells.append(f"{scores.mean():.3f} ± {scores.std(ddof=1) if len(scores) > 1 else 0:.3f} ({scores.min():.3f})")
            if case in BRATS_CASES:
                brats.append(scores)
        mean = f"{np.mean(np.stack(brats).mean(axis=0)):.3f}" if brats else ""
        seconds = np.mean([r["seconds"] for r in rows if r["variant"] == name])
        print(f"| {name} | " + " | ".join(cells) + f" | {mean} | {seconds:.1f} |")
    if args.borders:
        keys = list(rows[0]["borders"])
        print("\nWhere the errors lie (mean over the seeds; distances in voxels to the true border):\n")
        print("| variant | case | " + " | ".join(keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for name in args.variants:
            for case in args.cases:
                profiles = [r["borders"] for r in rows if r["variant"] == name and r["case"] == case]
                cells = [f"{np.nanmean([p[k] for p in profiles]):.3f}" for k in keys]
                print(f"| {name} | {case} | " + " | ".join(cells) + " |")
    if args.networks:
        print_networks(rows, args.variants)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
