"""Do JULE-3D's features carry the tissue classes, and does k-means find them? (diagnosis for issue 4)

For every case, JULE-3D is trained as :func:`jule3d.segment` trains it and its Phase 2 grid features are
computed. At the grid centres inside the evaluation voxels, three representations are compared:

* ``features``: the network's unit-norm features,
* ``intensity``: the standardised local mean intensity of every channel (:func:`jule3d.segmentation.local_intensity`),
* ``both``: the two side by side (``intensity_weight = 1``).

Two numbers per representation:

* **probe**: balanced accuracy of a *supervised* linear classifier (logistic regression, 3-fold
  cross-validation on a seeded sample of centres). It only measures whether the classes are linearly
  recoverable from the representation; no segmentation uses the labels.
* **k-means NMI**: the NMI, against the ground truth at the same centres, of k-means with the case's ``k`` on
  the representation: what Phase 2 actually recovers without labels.

A high probe with a low k-means NMI means the information is in the features but is not where k-means looks
(the largest directions of variance belong to something else, e.g. normal tissue's own structure).

``--ceiling`` asks instead how well a classifier of local statistics does when it is given the labels to learn
from: :func:`supervised_ceiling` trains a gradient-boosted classifier on every voxel's :func:`local_statistics`
(the mean and standard deviation of every channel in boxes of :data:`CEILING_WINDOWS` voxels) with the ground
truth of one half of the case, and scores voxel NMI on the other half (both ways round, averaged), each voxel on
its own and, as the default's refinement does with a Potts model, with its neighbours: the most probable class
after the class probabilities are smoothed by a Gaussian of each of :data:`CEILING_SMOOTHING` voxels. No network is
trained. It is a reference for what brightness and its local spread say, learnt with the labels, not a bound on
a network that reads structure: on the texture phantom, where the classes share their intensity distribution, it
reads 0.50 and the default 0.90. On the intensity and lung phantoms and on BraTS-ROI, where the classes differ in
brightness or in their share of air, it reads more than the default (README, Measured).

``--learnable`` asks whether the default's network can learn a case's classes at all when it is told them:
:func:`learnable` trains it on the true class of every sampled patch (the labels, not JULE's clusters) with the
weighted triplet loss at each γ of ``--gammas``, and reports the mean triplet loss and the linear probe of the
training patches' features every :data:`LEARNABLE_EVERY` epochs. A loss that stays at the margin (0.2) with a probe
near chance means the features collapsed to one point: the loss's pull on the positives outweighs its push on the
negatives (``docs/method.md`` 5.14).

Usage::

    python benchmarks/bench_features.py                          # BraTS-ROI, 4 cases, seed 0
    python benchmarks/bench_features.py --dataset phantom --seeds 0 1
    python benchmarks/bench_features.py --out results/features.json
    python benchmarks/bench_features.py --ceiling --dataset phantom
    python benchmarks/bench_features.py --learnable --dataset check --gammas 2 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench_quality import (BRATS_CASES, CHECK_CASES, Case, check_case, data_root,  # the script's folder
                           load_brats_case, phantom_case)

from jule3d.config import jule_config
from jule3d.jule import _Trainer, train_jule
from jule3d.metrics import nmi
from jule3d.models import net_config
from jule3d.patches import sample_patches
from jule3d.segmentation import cluster_features, grid_features, local_intensity

REPRESENTATIONS = ("features", "intensity", "both")
#: Box sides (voxels) of :func:`local_statistics`: from a few voxels to about the extent of a ``fast`` patch and beyond.
CEILING_WINDOWS: tuple[int, ...] = (3, 5, 7, 9, 13, 17, 25)
#: Standard deviations (voxels) of the Gaussians that smooth :func:`supervised_ceiling`'s class probabilities.
CEILING_SMOOTHING: tuple[float, ...] = (2.0, 4.0, 8.0)
#: Epochs of :func:`learnable`'s training on the true classes, and how often it reports.
LEARNABLE_EPOCHS = 20
LEARNABLE_EVERY = 5


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int, n_max: int = 8000) -> float:
    """Balanced accuracy of a linear classifier of ``y`` from ``x`` (3-fold cross-validation, seeded sample)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), size=min(n_max, len(y)), replace=False)
    with threadpool_limits(limits=1):
        scores = cross_val_score(LogisticRegression(max_iter=1000, class_weight="balanced"), x[idx], y[idx],
                                 cv=3, scoring="balanced_accuracy")
    return float(scores.mean())


def local_statistics(case: Case, windows: Sequence[int] = CEILING_WINDOWS) -> np.ndarray:
    """``(V, C·(1 + 2·len(windows)))`` float32 statistics of the ``V`` evaluation voxels of ``case``: every
    channel's intensity, and its mean and standard deviation over the foreground voxels of each ``w``³ box
    (:func:`jule3d.labels.masked_box_mean`, the boxes of Phase 2's local intensity)."""
    from jule3d.labels import masked_box_mean

    data = np.asarray(case.volume.data, dtype=np.float32)
    positions = np.nonzero(case.evaluation_mask)
    n_channels = len(data)
    both = np.concatenate([data, data * data])
    columns = [data[(slice(None), *positions)]]
    for w in windows:
        moments = masked_box_mean(both, case.volume.foreground(), w, positions)
        mean = moments[:n_channels]
        columns += [mean, np.sqrt(np.maximum(moments[n_channels:] - mean ** 2, 0.0))]
    return np.concatenate(columns).T


def supervised_ceiling(case: Case, seed: int = 0, n_train: int = 40_000,
                       windows: Sequence[int] = CEILING_WINDOWS,
                       smoothing: Sequence[float] = CEILING_SMOOTHING) -> dict[str, float]:
    """NMI of a classifier of the truth from :func:`local_statistics`, trained on one half of the case and scored
    on the other (a diagnosis, not a method: it learns from the labels).

    The halves are the evaluation voxels below and above the median of the first axis. A
    ``HistGradientBoostingClassifier`` is fitted on a seeded sample of ``n_train`` voxels of one half and scored on
    every voxel of the other, then the other way round; ``nmi`` is the mean of the two, ``accuracy`` likewise.
    ``nmi_smoothed_<sigma>`` is the same with every held-out voxel given the most probable class after each class's
    probability map over the held-out half (0 elsewhere) is smoothed by a Gaussian of standard deviation ``sigma``
    voxels, for each ``sigma`` of ``smoothing``.
    """
    from scipy import ndimage
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, y = local_statistics(case, windows), case.ground_truth[case.evaluation_mask]
    positions = np.nonzero(case.evaluation_mask)
    lower = positions[0] < np.median(positions[0])
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {"nmi": [], "accuracy": [], **{f"nmi_smoothed_{s:g}": [] for s in smoothing}}
    for train in (lower, ~lower):
        rows = rng.choice(np.flatnonzero(train), size=min(n_train, int(train.sum())), replace=False)
        model = HistGradientBoostingClassifier(random_state=seed).fit(x[rows], y[rows])
        probability = model.predict_proba(x[~train])
        predicted = model.classes_[probability.argmax(axis=1)]
        scores["nmi"].append(nmi(y[~train], predicted))
        scores["accuracy"].append(float(np.mean(predicted == y[~train])))
        held_out = tuple(p[~train] for p in positions)
        planes = np.zeros((probability.shape[1], *case.evaluation_mask.shape), dtype=np.float32)
        planes[(slice(None), *held_out)] = probability.T  # each class's probability map, built once per fold
        for sigma in smoothing:
            smoothed = np.stack([ndimage.gaussian_filter(plane, sigma)[held_out] for plane in planes], axis=1)
            scores[f"nmi_smoothed_{sigma:g}"].append(nmi(y[~train], model.classes_[smoothed.argmax(axis=1)]))
    return {key: float(np.mean(values)) for key, values in scores.items()}


def diagnose(case: Case, seed: int, n_patches: int = 2000, preset: str = "fast") -> dict[str, dict[str, float]]:
    """Probe accuracy and k-means NMI of each representation at the grid centres of one case."""
    config = jule_config(preset, n_clusters=case.n_clusters, seed=seed)
    patch_size = net_config(config.net, **config.net_overrides).patch_size
    patches = sample_patches(case.volume, n_patches, patch_size=patch_size, min_foreground=0.5, seed=seed)
    model = train_jule(patches, config, progress=False).model
    grid = grid_features(model, case.volume, stride=2)
    centres = tuple(grid.centers.T)
    scored = case.evaluation_mask[centres] & (case.ground_truth[centres] > 0)
    truth = case.ground_truth[centres][scored]
    features = np.asarray(grid.features, dtype=np.float32)
    intensity = local_intensity(case.volume, grid)
    reps = {"features": features, "intensity": intensity, "both": np.hstack([features, intensity])}
    out = {}
    for name in REPRESENTATIONS:
        x = reps[name]
        clusters = cluster_features(x, case.n_clusters, seed=seed)
        out[name] = {"probe": probe_accuracy(x[scored], truth, seed),
                     "kmeans_nmi": nmi(truth, clusters[scored])}
    return out


def learnable(case: Case, seed: int, gamma: float, n_patches: int = 2000,
              epochs: int = LEARNABLE_EPOCHS) -> list[dict[str, float]]:
    """Train the default's network on the true classes of its patches with the triplet loss's weight ``gamma``.

    The patches are sampled as Phase 1 samples them; each is labelled with the ground truth at its centre (patches
    centred on an unlabelled voxel are left out), and the network of the ``fast`` preset, with every other setting
    of it, is trained on those labels instead of JULE's clusters. Every :data:`LEARNABLE_EVERY` epochs: the mean
    triplet loss of the epoch and the probe (:func:`probe_accuracy`) of the training patches' features.
    """
    import torch

    config = jule_config("fast", n_clusters=case.n_clusters, seed=seed, gamma=gamma)
    patch_size = net_config(config.net, **config.net_overrides).patch_size
    patches = sample_patches(case.volume, n_patches, patch_size=patch_size, min_foreground=0.5, seed=seed,
                             labels=case.ground_truth)
    labelled = patches.labels > 0
    classes = patches.labels[labelled] - 1
    trainer = _Trainer(np.ascontiguousarray(patches.patches[labelled]), config, torch.device("cpu"))
    rows = []
    for epoch in range(1, epochs + 1):
        loss, _ = trainer.train_epochs(classes, 1, lambda _: None)
        if epoch % LEARNABLE_EVERY == 0:
            rows.append({"epoch": epoch, "loss": loss, "probe": probe_accuracy(trainer.features(), classes, seed)})
    return rows


def write_rows(out: Path | None, rows: list[dict], argv: Sequence[str] | None) -> None:
    """Write ``rows`` and the command line as JSON to ``out`` (nothing when ``out`` is ``None``)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"argv": list(argv or sys.argv[1:]), "rows": rows}, indent=1), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the diagnosis on the chosen cases and seeds; print one table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("brats", "phantom", "check"), default="brats",
                   help="BraTS-ROI, the three visible phantoms, or bench_quality's check cases")
    p.add_argument("--cases", nargs="+", default=list(BRATS_CASES), help="BraTS case folders")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--n-patches", type=int, default=2000)
    p.add_argument("--out", type=Path, help="JSON file for the rows (not overwritten)")
    p.add_argument("--ceiling", action="store_true",
                   help="the supervised local-statistics ceiling of each case instead (see above)")
    p.add_argument("--learnable", action="store_true",
                   help="train the network on the true classes at each --gammas instead (see above)")
    p.add_argument("--gammas", nargs="+", type=float, default=[2.0, 1.0],
                   help="weights of the positives in the triplet loss for --learnable (default 2 1)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.exists():
        p.error(f"--out {args.out} exists")
    if args.dataset == "brats":
        root = data_root() / "brats2015"
        if not root.is_dir():
            p.error(f"BraTS data folder {root} does not exist (set JULE3D_SHARED_DATA)")
        loads = [lambda c=c: load_brats_case(root / c) for c in args.cases]
    elif args.dataset == "phantom":
        loads = [lambda v=v: phantom_case(v) for v in ("texture", "intensity", "lung")]
    else:
        loads = [lambda c=c: check_case(c) for c in CHECK_CASES]
    if args.ceiling:
        ceiling(loads, args.seeds, args.out, argv)
        return
    if args.learnable:
        learn(loads, args.seeds, args.gammas, args.n_patches, args.out, argv)
        return
    rows = []
    print("| case | seed | " + " | ".join(f"{r} probe | {r} k-means NMI" for r in REPRESENTATIONS) + " | s |")
    print("|---|---:|" + "---:|" * (2 * len(REPRESENTATIONS) + 1))
    for load in loads:
        case = load()
        for seed in args.seeds:
            start = time.perf_counter()
            result = diagnose(case, seed, args.n_patches)
            seconds = time.perf_counter() - start
            rows.append({"case": case.name, "seed": seed, **result, "seconds": seconds})
            cells = " | ".join(f"{result[r]['probe']:.3f} | {result[r]['kmeans_nmi']:.3f}" for r in REPRESENTATIONS)
            print(f"| {case.name} | {seed} | {cells} | {seconds:.0f} |", flush=True)
    means = " | ".join(f"{np.mean([r[k]['probe'] for r in rows]):.3f} | {np.mean([r[k]['kmeans_nmi'] for r in rows]):.3f}"
                       for k in REPRESENTATIONS)
    print(f"| mean | | {means} | |")
    write_rows(args.out, rows, argv)


def ceiling(loads: Sequence, seeds: Sequence[int], out: Path | None, argv: Sequence[str] | None) -> None:
    """Print (and with ``out`` write) :func:`supervised_ceiling` of every case and seed."""
    rows = []
    smoothed = "".join(f" smoothed {s:g} |" for s in CEILING_SMOOTHING)
    print(f"| case | seed | supervised local-statistics NMI |{smoothed} accuracy | s |")
    print("|---|---:|---:|" + "---:|" * len(CEILING_SMOOTHING) + "---:|---:|")
    for load in loads:
        case = load()
        for seed in seeds:
            start = time.perf_counter()
            result = supervised_ceiling(case, seed)
            rows.append({"case": case.name, "seed": seed, **result, "seconds": time.perf_counter() - start})
            cells = "".join(f" {result[f'nmi_smoothed_{s:g}']:.3f} |" for s in CEILING_SMOOTHING)
            print(f"| {case.name} | {seed} | {result['nmi']:.3f} |{cells} {result['accuracy']:.4f} | "
                  f"{rows[-1]['seconds']:.0f} |", flush=True)
    write_rows(out, rows, argv)


def learn(loads: Sequence, seeds: Sequence[int], gammas: Sequence[float], n_patches: int, out: Path | None,
          argv: Sequence[str] | None) -> None:
    """Print (and with ``out`` write) :func:`learnable` of every case, seed and γ."""
    rows = []
    epochs = range(LEARNABLE_EVERY, LEARNABLE_EPOCHS + 1, LEARNABLE_EVERY)
    print("| case | seed | γ | " + " | ".join(f"loss, probe after {e}" for e in epochs) + " | s |")
    print("|---|---:|---:|" + "---|" * len(epochs) + "---:|")
    for load in loads:
        case = load()
        for seed in seeds:
            for gamma in gammas:
                start = time.perf_counter()
                result = learnable(case, seed, gamma, n_patches)
                rows.append({"case": case.name, "seed": seed, "gamma": gamma, "epochs": result,
                             "seconds": time.perf_counter() - start})
                cells = " | ".join(f"{r['loss']:.3f}, {r['probe']:.3f}" for r in result)
                print(f"| {case.name} | {seed} | {gamma:g} | {cells} | {rows[-1]['seconds']:.0f} |", flush=True)
    write_rows(out, rows, argv)


if __name__ == "__main__":
    main()
