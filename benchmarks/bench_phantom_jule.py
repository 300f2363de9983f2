"""JULE-3D on the texture phantom: per-period history, voxel NMI / ARI / Dice vs intensity baselines.

The phantom (:func:`jule3d.make_phantom`, 96³, seed 0, ``"texture"`` variant) has three classes with the
same intensity distribution, so k-means and multi-Otsu on intensities score near 0 and only texture
features can separate the classes. The script normalises the volume, samples ``--n-patches`` training
patches (at least ``--min-foreground`` of each in the specimen, default 0.5), runs
:func:`jule3d.train_jule` with the chosen preset and overrides, segments the volume with
:func:`jule3d.segmentation.label_volume` (grid features, k-means, projection) and scores the voxel labels
on the specimen voxels. Patch-level NMI per period comes from the history
(the patches' true classes are the phantom labels at their centres).

``--sweep`` runs the main ablations one after the other (each a few minutes on a 2-core CPU, seconds to a
minute on a GPU) and prints one table row per configuration.

Examples::

    python benchmarks/bench_phantom_jule.py                       # the fast preset
    python benchmarks/bench_phantom_jule.py --preset paper --device cuda
    python benchmarks/bench_phantom_jule.py --set eta=0.9 --set raw_features=l2 --min-foreground 0.9
    python benchmarks/bench_phantom_jule.py --sweep
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from jule3d.baselines import kmeans_intensity, multi_otsu
from jule3d.config import jule_config
from jule3d.jule import train_jule
from jule3d.metrics import evaluate
from jule3d.models import PRESETS as NET_PRESETS
from jule3d.normalize import normalize_intensity
from jule3d.patches import sample_patches
from jule3d.phantom import make_phantom
from jule3d.segmentation import label_volume

#: Ablations of ``--sweep``: (name, preset, JuleConfig overrides, min_foreground of the training patches).
#: In brackets the voxel NMI measured with seed 0 on the 2-core CPU or (marked GPU) an H100 machine.
_UNTUNED = {"eta": 0.9, "raw_features": "l2", "stop_clusters": 0}
SWEEP: list[tuple[str, str, dict[str, Any], float]] = [
    ("fast [0.842]", "fast", {}, 0.5),
    ("fast, border patches left out [0.434]", "fast", {}, 0.9),
    ("fast, merge on to 3 clusters [0.599]", "fast", {"stop_clusters": 0}, 0.5),
    ("fast, raw L2 period-0 features [0.589]", "fast", {"raw_features": "l2"}, 0.5),
    ("fast, eta 0.9 [0.815]", "fast", {"eta": 0.9}, 0.5),
    ("untuned fast [0.560]", "fast", _UNTUNED, 0.5),
    ("untuned fast, border left out [0.547 GPU]", "fast", _UNTUNED, 0.9),
    ("untuned fast, eta 0.2, border left out [0.132 GPU]", "fast", {**_UNTUNED, "eta": 0.2}, 0.9),
    ("untuned fast, gamma 1, border left out [0.147 GPU]", "fast", {**_UNTUNED, "gamma": 1.0}, 0.9),
    ("paper, border left out [0.219 GPU]", "paper", {}, 0.9),
]


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs with JSON values (bare words are taken as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(
    preset: str, overrides: dict[str, Any], min_foreground: float, args: argparse.Namespace, verbose: bool
) -> dict[str, Any]:
    """Train and segment once; return the scores and timings."""
    phantom = make_phantom((args.size,) * 3, seed=args.phantom_seed)
    volume = normalize_intensity(phantom.volume)
    truth, mask = phantom.labels, phantom.labels > 0
    config = jule_config(preset, n_clusters=phantom.n_classes, seed=args.seed, device=args.device, **overrides)
    patch_size = config.net_overrides.get("patch_size", NET_PRESETS[config.net].patch_size)
    t0 = time.perf_counter()
    patches = sample_patches(volume, args.n_patches, patch_size=patch_size, min_foreground=min_foreground,
                             seed=args.seed, labels=truth)
    result = train_jule(patches, config, ground_truth=patches.labels, progress=False)
    t_train = time.perf_counter() - t0
    labels = label_volume(result.model, volume, phantom.n_classes, stride=args.stride, seed=args.seed)
    t_total = time.perf_counter() - t0
    scores = evaluate(truth, labels, mask)
    if verbose:
        print(f"{preset} {json.dumps(overrides)}: {patch_size}³ patches, {args.n_patches} of them")
        print("  period  stage   clusters   loss    patch NMI")
        for h in result.history:
            print(f"  {h['period']:6d}  {h['stage']:6s}  {h['n_clusters']:8d}  {h['loss']:6.3f}   {h['nmi']:.3f}")
    return {"scores": scores, "train_s": t_train, "total_s": t_total, "periods": len(result.history) - 1,
            "patch_nmi": result.history[-1]["nmi"]}


def _baselines(args: argparse.Namespace) -> None:
    phantom = make_phantom((args.size,) * 3, seed=args.phantom_seed)
    volume = normalize_intensity(phantom.volume)
    mask = phantom.labels > 0
    for name, method in (("k-means (intensity)", kmeans_intensity), ("multi-Otsu", multi_otsu)):
        t0 = time.perf_counter()
        labels = method(volume, phantom.n_classes, mask=mask, seed=args.seed)
        s = evaluate(phantom.labels, labels, mask)
        print(f"{name:<22s} NMI {s['nmi']:.3f}  ARI {s['ari']:.3f}  Dice {s['dice_mean']:.3f}  "
              f"{time.perf_counter() - t0:6.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast", help="JULE preset (fast or paper)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="JuleConfig override, e.g. --set eta=0.5 --set net_overrides='{\"patch_size\": 17}'")
    parser.add_argument("--size", type=int, default=96, help="phantom side in voxels")
    parser.add_argument("--phantom-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the patches, the CNN and k-means")
    parser.add_argument("--n-patches", type=int, default=2000)
    parser.add_argument("--stride", type=int, default=2, help="Phase 2 grid stride")
    parser.add_argument("--min-foreground", type=float, default=0.5,
                        help="least specimen fraction of a training patch (0.9 leaves the border out of training)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sweep", action="store_true", help="run the ablation table instead of one run")
    args = parser.parse_args()

    _baselines(args)
    if not args.sweep:
        out = run(args.preset, _parse_sets(args.set), args.min_foreground, args, verbose=True)
        s = out["scores"]
        print(f"JULE-3D ({args.preset})  NMI {s['nmi']:.3f}  ARI {s['ari']:.3f}  Dice {s['dice_mean']:.3f}  "
              f"training {out['train_s']:.1f} s, total {out['total_s']:.1f} s")
        return
    print(f"{'configuration':<52s} {'periods':>7s} {'patch NMI':>9s} {'NMI':>6s} {'ARI':>6s} {'Dice':>6s} {'s':>7s}")
    for name, preset, overrides, min_foreground in SWEEP:
        out = run(preset, overrides, min_foreground, args, verbose=False)
        s = out["scores"]
        print(f"{name:<52s} {out['periods']:7d} {out['patch_nmi']:9.3f} {s['nmi']:6.3f} {s['ari']:6.3f} "
              f"{s['dice_mean']:6.3f} {out['total_s']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
