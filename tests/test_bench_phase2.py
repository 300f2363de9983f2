"""Smoke test of benchmarks/bench_phase2.py: the feature cache round trip and the ablation table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from jule3d.estimator import JuleSegmenter
from jule3d.models import JuleNet3D, net_config

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(_DIR))
    try:
        spec = importlib.util.spec_from_file_location("bench_phase2", _DIR / "bench_phase2.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(_DIR))


def _fake_training(trained: list):
    def train(case, seed, jule_options=None):
        trained.append(seed if jule_options is None else (seed, jule_options))
        nets = [JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=seed * 2 + i)
                for i in range(2)]
        return JuleSegmenter(n_clusters=case.n_clusters, seed=seed).with_models(nets)

    return train


def test_features_are_cached_once_and_scored_per_variant(bench, tmp_path: Path, monkeypatch, capsys) -> None:
    trained: list = []
    monkeypatch.setattr(bench, "train_default", _fake_training(trained))
    argv = ["--cases", "phantom-texture", "--seeds", "0", "--variants", "merge", "kmeans",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rows.json")]
    bench.main(argv)
    first = capsys.readouterr().out
    case = bench.suite_loaders(["phantom-texture"], "zero-background")[0]()
    assert trained == [0] and (tmp_path / "cache" / bench.cache_name(case, 0)).is_file()
    assert not list((tmp_path / "cache").glob("*.part.npz"))
    table = [line for line in first.splitlines() if line.startswith("| merge") or line.startswith("| kmeans")]
    assert len(table) == 2 and all(line.count("|") == 5 for line in table)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["variant"] for r in rows} == {"merge", "kmeans"} and all(0 <= r["nmi"] <= 1 for r in rows)
    bench.main(argv)  # from the cache: no training, the same scores
    assert trained == [0]
    again = json.loads((tmp_path / "rows.json").read_text())
    assert [r["nmi"] for r in again] == [r["nmi"] for r in rows]


def test_phase1_options_train_apart_and_are_cached_under_their_own_name(bench, tmp_path: Path, monkeypatch) -> None:
    trained: list = []
    monkeypatch.setattr(bench, "train_default", _fake_training(trained))
    options = {"raw_features": "spectrum+mean"}
    argv = ["--cases", "phantom-texture", "--seeds", "1", "--train-only", "--cache", str(tmp_path)]
    bench.main(argv)
    bench.main([*argv, "--jule-options", json.dumps(options)])
    bench.main([*argv, "--jule-options", json.dumps(options)])  # cached: not trained again
    assert trained == [1, (1, options)]
    names = sorted(p.name for p in tmp_path.iterdir())
    case = bench.suite_loaders(["phantom-texture"], "zero-background")[0]()
    assert len(names) == 2 and bench.cache_name(case, 1) in names and bench.cache_name(case, 1, options) in names


def test_a_cache_is_named_by_the_settings_that_train_it(bench, monkeypatch) -> None:
    """Networks trained under another default never stand in for the default's: the name hashes the resolved
    settings, so an option set to its default names the same networks and a changed default names others."""
    import dataclasses

    from jule3d import config

    case = bench.suite_loaders(["phantom-texture"], "zero-background")[0]()
    default = bench.cache_name(case, 0)
    assert default.startswith("phantom-texture_s0_") and default != bench.cache_name(case, 1)
    assert bench.cache_name(case, 0, {"eta": config.JULE_PRESETS["fast"].eta}) == default
    assert bench.cache_name(case, 0, {"n_networks": 2, "k_s": 20}) == default
    assert bench.cache_name(case, 0, {"k_s": 10}) != default
    monkeypatch.setitem(config.JULE_PRESETS, "fast", dataclasses.replace(config.JULE_PRESETS["fast"], eta=0.25))
    assert bench.cache_name(case, 0) != default


def test_the_best_candidate_bounds_the_default_from_above(bench, tmp_path: Path, monkeypatch) -> None:
    """The diagnostic reads the labels: no choice among the default's candidates scores above it. It refines every
    candidate, so the phantom is 48³ (on the 96³ one this test took over three minutes of the suite)."""
    import bench_quality

    monkeypatch.setattr(bench, "train_default", _fake_training([]))
    monkeypatch.setattr(bench, "suite_loaders", lambda cases, intensity: [lambda: bench_quality.phantom_case(size=48)])
    bench.main(["--cases", "phantom-texture", "--seeds", "0", "--variants", "default", "oracle-best-candidate",
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rows.json")])
    score = {r["variant"]: r["nmi"] for r in json.loads((tmp_path / "rows.json").read_text())}
    assert score["oracle-best-candidate"] >= score["default"] - 1e-12


def test_the_vote_takes_each_positions_majority_class_across_renamed_candidates(bench, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Two candidates that are the kept one with its classes renamed outvote a third that moved 20 % of the
    positions, and a candidate that lost a class has no vote."""
    import numpy as np

    from jule3d import segmentation as seg

    monkeypatch.setattr(bench, "train_default", _fake_training([]))
    case = bench.suite_loaders(["phantom-texture"], "zero-background")[0]()
    grids = bench.cached_grids(case, 0, tmp_path / "cache")
    m, k = int(grids[0].selected.sum()), case.n_clusters
    rng = np.random.default_rng(0)
    kept = rng.integers(0, k, m).astype(np.int32)
    moved = kept.copy()
    moved[rng.random(m) < 0.2] = 0
    lost = np.zeros(m, np.int32)  # one class: below the share every class must hold
    candidates = [kept, (kept + 1) % k, (kept + 2) % k, moved, lost, lost, lost]
    consensus = seg.Consensus(candidates, [((0,), 1.0, 0)] * len(candidates), np.eye(len(candidates)), 0)
    monkeypatch.setattr(seg, "consensus_segment", lambda *args, **kwargs: consensus)
    voted = bench.VARIANTS["vote-of-candidates"](grids, case, 0)
    expected = seg.refine_labels(seg.project_labels(grids[0], kept, case.volume), case.volume, grids[0].stride)
    np.testing.assert_array_equal(voted, expected)


def test_border_profile_sees_one_class_grow_into_its_neighbour(bench) -> None:
    """Two slabs of a 20-voxel bar: labels whose border is 3 voxels into class 1 err only within 3 voxels of the
    true border, and every error is class 2's."""
    import numpy as np

    from jule3d.volume import Volume

    truth = np.zeros((4, 4, 20), dtype=np.uint8)
    truth[..., :10], truth[..., 10:] = 1, 2
    mask = truth > 0
    case = bench.Case("bar", Volume.from_array(truth.astype(np.float32), mask=mask), truth, mask, 2)
    distance = bench.border_distance(truth, mask)
    assert distance[:20].tolist() == [*range(10, 0, -1), *range(1, 11)]  # the first row along x
    grown = truth.copy()
    grown[..., 7:10] = 2
    profile = bench.border_profile(3 - grown, case)  # renamed classes: matched back before counting
    assert profile["error"] == 3 / 20 and profile["near_share"] == 1.0 and profile["one_way"] == 1.0
    assert profile["error_<=2"] == 2 / 4 and profile["error_<=4"] == 1 / 4 and profile["error_>8"] == 0.0
    assert bench.border_profile(truth, case, distance)["error"] == 0.0


def test_the_border_reference_gives_border_voxels_the_nearest_other_class(bench) -> None:
    """Three slabs 1 | 2 | 3 of 10 voxels along x: every voxel next to a border (distance 1) takes the class across
    it, class 2's on each side the nearest one; nothing farther changes, and without errors the NMI is 1."""
    import numpy as np

    from jule3d.metrics import nmi
    from jule3d.volume import Volume

    truth = np.zeros((3, 3, 30), dtype=np.uint8)
    truth[..., :10], truth[..., 10:20], truth[..., 20:] = 1, 2, 3
    mask = truth > 0
    case = bench.Case("slabs", Volume.from_array(truth.astype(np.float32), mask=mask), truth, mask, 3)
    every = bench.border_reference(case, within=1, share=1.0)
    assert every["band"] == every["errors"] == 4 / 30
    expected = truth.copy()
    expected[..., 9], expected[..., 10], expected[..., 19], expected[..., 20] = 2, 1, 3, 2
    assert every["nmi"] == pytest.approx(nmi(truth[mask], expected[mask]))
    assert bench.border_reference(case, within=1, share=0.0) == {"nmi": 1.0, "errors": 0.0, "band": 4 / 30}
    half = bench.border_reference(case, within=2, share=0.5, seed=3)
    assert half == bench.border_reference(case, within=2, share=0.5, seed=3)  # seeded
    assert 0.0 < half["errors"] < half["band"] == 8 / 30 and half["nmi"] < 1.0


def test_phase1_options_reach_the_config_as_parameters_or_jule_options(bench, monkeypatch) -> None:
    """``--jule-options`` may name a JuleSegmenter parameter (which ``jule_options`` refuses) or a JuleConfig
    field; both end up in every network's config."""
    monkeypatch.setattr(JuleSegmenter, "fit", lambda self, volume: self)
    case = bench.Case("c", None, None, None, 3)
    segmenter = bench.train_default(case, 4, {"final_epochs": 0, "n_networks": 3, "raw_features": "spectrum+mean"})
    config = segmenter.jule_config(2)
    assert (config.final_epochs, config.raw_features, config.n_clusters, config.seed) == (0, "spectrum+mean", 3, 14)
    assert segmenter.jule_options == {"raw_features": "spectrum+mean"} and segmenter.resolved_networks() == 3


def test_the_ward_ablation_merges_as_before_and_leaves_the_default_as_it_was(bench, monkeypatch) -> None:
    """``merge-ward`` runs the default with Ward's cost and without the speck and surface rules."""
    import numpy as np

    from jule3d import segmentation as seg

    default = seg.merge_clusters
    contacts = np.array([[0, 400, 0], [400, 0, 60], [0, 60, 0]], float)
    sizes, centroids = np.array([1000.0, 1000.0, 60.0]), np.array([[0.0], [0.6], [2.0]])
    merged = []
    monkeypatch.setattr(bench, "_label", lambda grids, case, seed: merged.append(
        seg.merge_clusters(contacts, sizes, centroids, 2, surface=np.array([0.0, 0.0, 60.0])).tolist()) or "ok")
    assert bench.VARIANTS["merge-ward"]([], None, 0) == "ok"
    assert merged == [default(contacts, sizes, centroids, 2, min_share=0.0, linkage="ward").tolist()] == [[0, 1, 1]]
    assert seg.merge_clusters is default
    assert default(contacts, sizes, centroids, 2).tolist() == [0, 0, 1]


@pytest.mark.parametrize("variant, setting, before, now", [
    ("refine-one-gaussian", "REFINE_COMPONENTS", 1, 2),
    ("refine-no-potts", "REFINE_SMOOTHING", 0.0, 0.3),
    ("refine-box-mean", "REFINE_STATISTIC", "mean", "median"),
    ("refine-one-pass", "REFINE_PASSES", 1, 2),
])
def test_the_refinement_ablations_run_the_default_with_one_setting_as_before(bench, monkeypatch, variant, setting,
                                                                             before, now) -> None:
    """``refine-one-gaussian``, ``refine-no-potts``, ``refine-box-mean`` and ``refine-one-pass`` run the default
    with one Gaussian per class, with no Potts model between the refined voxels, from box means, or in one pass,
    and leave the default as it was."""
    from jule3d import clustering

    seen = []
    monkeypatch.setattr(bench, "_label", lambda grids, case, seed: seen.append(getattr(clustering, setting)) or "ok")
    assert bench.VARIANTS[variant]([], None, 0) == "ok"
    assert seen == [before] and getattr(clustering, setting) == now


def test_the_support_ablation_judges_candidates_by_all_the_others(bench, monkeypatch) -> None:
    """``support-all`` runs the consensus with the rule before: every other candidate counts in the support."""
    calls = []
    monkeypatch.setattr(bench, "_consensus", lambda grids, case, seed, **options: calls.append(options) or "ok")
    assert bench.VARIANTS["support-all"]([], None, 0) == "ok"
    assert calls == [{"cross_support": False}]


def test_the_choice_ablations_run_the_rules_before(bench, monkeypatch) -> None:
    """``factor-first`` and ``medoid-of-all-factors`` run the default's own path with the rules before keeping
    the consensus candidate, whatever choice the default asks for."""
    rules, calls = [], []
    monkeypatch.setattr(bench, "_label", lambda grids, case, seed: rules.append(bench.seg.choose_candidate) or "ok")
    monkeypatch.setattr(bench.seg, "choose_candidate", lambda *args, **options: calls.append(options["choice"]))
    assert bench.VARIANTS["factor-first"]([], None, 0) == bench.VARIANTS["medoid-of-all-factors"]([], None, 0) == "ok"
    for rule in rules:
        rule(None, [], 3, choice="reproduced")
    assert calls == ["factor-first", "medoid"]


def test_networks_are_scored_by_what_their_own_features_hold(bench, tmp_path: Path, monkeypatch, capsys) -> None:
    """A network whose features are the classes reads them with the probe and with k-means; one whose features
    are noise reads them with neither. ``--networks`` tabulates both networks beside the variants."""
    import numpy as np

    from jule3d import segmentation as seg

    monkeypatch.setattr(bench, "train_default", _fake_training([]))
    case = bench.suite_loaders(["phantom-texture"], "zero-background")[0]()
    grids = bench.cached_grids(case, 0, tmp_path / "cache")
    truth = case.ground_truth[tuple(grids[0].centers.T)]
    rng = np.random.default_rng(0)
    informative = (np.eye(4)[truth] + rng.normal(0, 0.2, (len(truth), 4))).astype(np.float32)
    noise = rng.normal(size=(len(truth), 4)).astype(np.float32)
    scores = bench.network_scores([seg.GridFeatures(f, grids[0].grid, grids[0].selected)
                                   for f in (informative, noise)], case, 0)
    assert scores[0]["probe"] > 0.95 and scores[0]["kmeans_nmi"] > 0.8
    assert scores[1]["probe"] < 0.45 and scores[1]["kmeans_nmi"] < 0.05

    bench.main(["--cases", "phantom-texture", "--seeds", "0", "--variants", "kmeans", "--networks",
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rows.json")])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| phantom-texture | 0 |")]
    assert len(table) == 1 and table[0].count("|") == 8  # case, seed, 2 networks x 2 scores, kmeans
    rows = json.loads((tmp_path / "rows.json").read_text())
    networks = [r for r in rows if r["variant"] == "networks"]
    assert len(networks) == 1 and len(networks[0]["networks"]) == 2
    assert all(0 <= v <= 1 for n in networks[0]["networks"] for v in n.values())
