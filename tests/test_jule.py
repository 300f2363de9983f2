"""Tests of jule3d.jule: config, triplet loss, the recurrent loop, checkpoints and model files."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import adjusted_rand_score

import jule3d.jule as jule
from jule3d import agdl
from jule3d.checkpoint import CHECKPOINT_NAME, load_model, save_model
from jule3d.config import jule_config, JULE_PRESETS, JuleConfig
from jule3d.jule import train_jule
from jule3d.loss import sample_triplets, weighted_triplet_loss
from jule3d.metrics import nmi
from jule3d.models import JuleNet3D
from jule3d.patches import PatchSet

W = 13  # patch side of the tiny runs: 13 -> 11 -> 5 -> 3 -> 1 with the fast layout


def _textures(n_per_class: int = 40, w: int = W, seed: int = 0, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Three easily distinct textures: fixed smooth-noise cubes (sigma 1, 2, 3) under independent noise."""
    rng = np.random.default_rng(seed)
    patches, truth = [], []
    for label, sigma in enumerate((1.0, 2.0, 3.0)):
        proto = gaussian_filter(rng.standard_normal((w, w, w)), sigma, mode="wrap")
        proto /= proto.std()
        patches.append(proto + noise * rng.standard_normal((n_per_class, w, w, w)))
        truth.append(np.full(n_per_class, label))
    return np.concatenate(patches)[:, None].astype(np.float32), np.concatenate(truth)


def _tiny(**overrides) -> JuleConfig:
    """A config that trains in about a second on 120 patches of 13³ (JULE's own merging: down to 3)."""
    base = dict(
        eta=0.9,
        raw_features="l2",
        anchor=0.0,
        stop_clusters=0,
        net_overrides={"n_filters": 8},
        k_s=8,
        epochs_per_period=1,
        final_epochs=1,
        batch_size=40,
        device="cpu",
    )
    return jule_config("fast", **{**base, **overrides})


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return _textures()


# ------------------------------------------------------------------------------------------------ config


def test_presets_are_consistent_with_network_presets() -> None:
    assert JULE_PRESETS["paper"].net == "paper" and JULE_PRESETS["fast"].net == "fast"
    paper = JULE_PRESETS["paper"]
    assert (paper.k_s, paper.k_c, paper.lam, paper.eta) == (20, 5, 1.0, 0.9)
    assert (paper.epochs_per_period, paper.batch_size, paper.lr, paper.momentum) == (20, 100, 0.01, 0.9)
    assert (paper.weight_decay, paper.margin, paper.gamma, paper.n_negatives) == (5e-5, 0.2, 2.0, 20)
    assert JULE_PRESETS["fast"].epochs_per_period < paper.epochs_per_period
    cfg = jule_config("paper", eta=0.2, net_overrides={"feature_dim": 32})
    assert cfg.eta == 0.2 and cfg.network_config(2, 27).feature_dim == 32
    assert JuleConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_clusters": 0}, "n_clusters"),
        ({"k_s": 0}, "k_s"),
        ({"eta": 0.0}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"epochs_per_period": -1}, "epochs_per_period"),
        ({"net": "huge"}, "net"),
        ({"net_overrides": {"filters": 3}}, "filters"),
        ({"device": "no-such-device"}, "device"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        JuleConfig(**kwargs)


def test_jule_config_unknown_preset_or_field() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'slow'.*\['fast', 'paper'\]"):
        jule_config("slow")
    with pytest.raises(ValueError, match=r"etaa.*valid fields"):
        jule_config("fast", etaa=0.5)


def test_errors_that_depend_on_the_patches(data) -> None:
    x, gt = data
    with pytest.raises(ValueError, match="n_clusters=500 exceeds"):
        train_jule(x, _tiny(n_clusters=500), progress=False)
    with pytest.raises(ValueError, match="k_s=120 must be smaller"):
        train_jule(x, _tiny(k_s=120), progress=False)
    with pytest.raises(ValueError, match="patches must be"):
        train_jule(x[:, 0], _tiny(), progress=False)
    with pytest.raises(ValueError, match="ground_truth"):
        train_jule(x, _tiny(), ground_truth=gt[:-1], progress=False)
    with pytest.raises(ValueError, match=r"net_overrides\['patch_size'\]"):
        train_jule(x, _tiny(net_overrides={"patch_size": 17}), progress=False)
    bad = x.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        train_jule(bad, _tiny(), progress=False)


# ------------------------------------------------------------------------------------------------ loss


def test_sample_triplets_follow_the_rules() -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 0, 1])
    gen = torch.Generator().manual_seed(0)
    a, p, q = sample_triplets(labels, n_negatives=3, generator=gen)
    assert torch.all(labels[a] == labels[p]) and torch.all(a < p)
    assert torch.all(labels[a] != labels[q])
    pairs = {(int(i), int(j)) for i, j in zip(a, p)}
    expected = {(i, j) for i, j in itertools.combinations(range(9), 2) if labels[i] == labels[j]}
    assert pairs == expected
    for i, j in pairs:
        negs = q[(a == i) & (p == j)].tolist()
        n_other = int((labels != labels[i]).sum())
        assert len(negs) == min(3, n_other) and len(set(negs)) == len(negs)
    a_all, _, q_all = sample_triplets(labels, n_negatives=20, generator=gen)
    # with more negatives asked than exist, every other-cluster sample is used once per pair
    assert len(q_all) == sum(int((labels != labels[i]).sum()) for i, _ in expected)
    empty = sample_triplets(torch.arange(5), n_negatives=20, generator=gen)
    assert all(t.numel() == 0 for t in empty)


def test_loss_on_a_hand_made_batch() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    a, p, q = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    # ||f0 - f1||² = 2, ||f0 - f2||² = 4: max(0, 2·2 - 4 + 0.2) = 0.2
    assert weighted_triplet_loss(f, a, p, q, gamma=2.0, margin=0.2).item() == pytest.approx(0.2)
    assert weighted_triplet_loss(f, a, p, q, gamma=1.0, margin=0.2).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="anchors"):
        weighted_triplet_loss(f, a[:0], p[:0], q[:0])


def test_loss_and_gradient_match_a_brute_force_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 1, 3])
    raw = torch.randn(10, 6, generator=gen)
    a, p, q = sample_triplets(labels, n_negatives=4, generator=gen)
    assert a.numel() > 20
    leaf_fast, leaf_brute = raw.clone().requires_grad_(True), raw.clone().requires_grad_(True)
    fast = weighted_triplet_loss(torch.nn.functional.normalize(leaf_fast, dim=1), a, p, q, gamma=2.0, margin=0.2)
    f2 = torch.nn.functional.normalize(leaf_brute, dim=1)
    terms = [
        torch.clamp(2.0 * ((f2[i] - f2[j]) ** 2).sum() - ((f2[i] - f2[k]) ** 2).sum() + 0.2, min=0.0)
        for i, j, k in zip(a.tolist(), p.tolist(), q.tolist())
    ]
    brute = torch.stack(terms).mean()
    assert fast.item() == pytest.approx(brute.item(), abs=1e-6)
    grad_fast = torch.autograd.grad(fast, leaf_fast)[0]
    grad_brute = torch.autograd.grad(brute, leaf_brute)[0]
    np.testing.assert_allclose(grad_fast.numpy(), grad_brute.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------ training


def test_training_reaches_the_target_with_a_well_formed_history(data) -> None:
    x, gt = data
    records: list[dict] = []
    result = train_jule(PatchSet(x, np.zeros((len(x), 3)), W), _tiny(eta=0.5), ground_truth=gt,
                        progress=False, callback=records.append)
    assert result.labels.shape == (len(x),)
    assert np.unique(result.labels).size == 3 and set(np.unique(result.labels)) == {0, 1, 2}
    assert result.features.shape == (len(x), result.model.feature_dim)
    np.testing.assert_allclose(np.linalg.norm(result.features, axis=1), 1.0, atol=1e-5)
    history = result.history
    assert records == history and len(history) >= 3
    assert [h["stage"] for h in history] == ["period"] * (len(history) - 1) + ["final"]
    periods = [h["period"] for h in history]
    assert periods[0] == 0 and periods[:-1] == list(range(len(history) - 1))
    counts = [h["n_clusters"] for h in history]
    assert all(b < a for a, b in zip(counts[:-2], counts[1:-1])) and counts[-1] == 3
    for h in history:
        assert {"period", "stage", "n_clusters", "loss", "n_triplets", "iteration", "lr", "seconds", "nmi"} <= set(h)
        assert h["seconds"] >= 0 and 0.0 <= h["nmi"] <= 1.0 and 0 < h["lr"] <= 0.01
        assert h["n_triplets"] > 0 and np.isfinite(h["loss"])
    assert [h["iteration"] for h in history] == sorted(h["iteration"] for h in history)
    assert not result.model.training


def test_training_lowers_the_loss_on_fixed_labels(data) -> None:
    x, gt = data
    trainer = jule._Trainer(x, _tiny(batch_size=30, lr=0.05), torch.device("cpu"))
    first, _ = trainer.train_epochs(gt, 1, lambda loss: None)
    later, _ = trainer.train_epochs(gt, 6, lambda loss: None)
    last, _ = trainer.train_epochs(gt, 1, lambda loss: None)
    assert last < first


def test_separable_textures_are_recovered(data) -> None:
    x, gt = data
    result = train_jule(x, _tiny(final_epochs=2), ground_truth=gt, progress=False)
    assert nmi(gt, result.labels) > 0.8
    assert result.history[-1]["nmi"] == pytest.approx(nmi(gt, result.labels))


def test_same_seed_same_result_other_seed_other_weights(data) -> None:
    x, _ = data
    r1 = train_jule(x, _tiny(), progress=False)
    r2 = train_jule(x, _tiny(), progress=False)
    r3 = train_jule(x, _tiny(seed=1), progress=False)
    np.testing.assert_array_equal(r1.labels, r2.labels)
    np.testing.assert_array_equal(r1.features, r2.features)
    for (name, p1), p2 in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
        assert torch.equal(p1, p2), name
    assert not torch.equal(r1.model.head.weight, r3.model.head.weight)


def test_epochs_zero_leaves_the_cnn_untrained(data) -> None:
    x, _ = data
    result = train_jule(x, _tiny(epochs_per_period=0, final_epochs=0), progress=False)
    fresh = JuleNet3D(result.model.config, seed=0)
    assert torch.equal(result.model.head.weight, fresh.head.weight)
    assert all(h["n_triplets"] == 0 and np.isnan(h["loss"]) for h in result.history)


# ------------------------------------------------------------------------------------------------ checkpoints


class _Stop(Exception):
    pass


def _stop_after(n_records: int):
    seen: list[dict] = []

    def callback(record: dict) -> None:
        seen.append(record)
        if len(seen) == n_records:
            raise _Stop

    return callback


@pytest.mark.parametrize("anchor", [0.0, 0.5])
def test_resume_gives_identical_results(data, tmp_path: Path, anchor: float) -> None:
    x, gt = data
    cfg = _tiny(eta=0.5, anchor=anchor)  # the anchor's period-0 features are computed again after a resume
    full = train_jule(x, cfg, ground_truth=gt, checkpoint_dir=tmp_path / "full", progress=False)
    assert len(full.history) >= 4
    with pytest.raises(_Stop):
        train_jule(x, cfg, ground_truth=gt, checkpoint_dir=tmp_path / "cut", progress=False,
                   callback=_stop_after(2))
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)
    assert len(ckpt["history"]) == 2 and ckpt["stage"] == "period"
    resumed = train_jule(x, cfg, ground_truth=gt, checkpoint_dir=tmp_path / "cut", resume=True, progress=False)
    np.testing.assert_array_equal(resumed.labels, full.labels)
    np.testing.assert_array_equal(resumed.features, full.features)
    for p1, p2 in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p1, p2)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    # a finished run resumes to the same result without training again
    again = train_jule(x, cfg, checkpoint_dir=tmp_path / "full", resume=True, progress=False)
    np.testing.assert_array_equal(again.labels, full.labels)
    np.testing.assert_array_equal(again.features, full.features)


def test_checkpoint_rules(data, tmp_path: Path) -> None:
    x, _ = data
    cfg = _tiny()
    train_jule(x, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        train_jule(x, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"config\.lr: checkpoint 0\.01, now 0\.02"):
        train_jule(x, _tiny(lr=0.02), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="patch contents differ"):
        train_jule(x + 1.0, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="patch shape"):
        train_jule(x[:-3], cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        train_jule(x, cfg, resume=True, progress=False)
    # the device is not part of the fingerprint
    train_jule(x, jule_config("fast", **{**cfg.to_dict(), "device": "auto"}), checkpoint_dir=tmp_path,
               resume=True, progress=False)


def test_corrupt_checkpoint_names_the_file(data, tmp_path: Path) -> None:
    x, _ = data
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match=CHECKPOINT_NAME):
        train_jule(x, _tiny(), checkpoint_dir=tmp_path, resume=True, progress=False)
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME} is not a"):
        train_jule(x, _tiny(), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_resume_without_a_checkpoint_starts_afresh(data, tmp_path: Path) -> None:
    x, _ = data
    a = train_jule(x, _tiny(), checkpoint_dir=tmp_path, resume=True, progress=False)
    b = train_jule(x, _tiny(), progress=False)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (tmp_path / CHECKPOINT_NAME).is_file()


def test_huge_learning_rate_stops_with_a_clear_error(data) -> None:
    x, _ = data
    with pytest.raises(FloatingPointError, match="lr"):
        train_jule(x, _tiny(lr=1e10, epochs_per_period=3), progress=False)


def test_nan_loss_keeps_the_last_good_checkpoint(data, tmp_path: Path, monkeypatch) -> None:
    x, _ = data
    cfg = _tiny(eta=0.5)
    original = jule.weighted_triplet_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(jule, "weighted_triplet_loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train_jule(x, cfg, checkpoint_dir=tmp_path, progress=False)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["stage"] == "period" and len(ckpt["history"]) >= 1
    assert all(torch.isfinite(v).all() for v in ckpt["trainer"]["model"].values() if v.is_floating_point())
    monkeypatch.setattr(jule, "weighted_triplet_loss", original)
    resumed = train_jule(x, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert np.unique(resumed.labels).size == 3


# ------------------------------------------------------------------------------------------------ model files


def test_save_and_load_model(data, tmp_path: Path) -> None:
    x, _ = data
    result = train_jule(x, _tiny(), progress=False)
    path = save_model(result, tmp_path / "net.pt")
    model = load_model(path)
    assert model.config == result.model.config and not model.training
    np.testing.assert_array_equal(model.embed(x[:10]), result.model.embed(x[:10]))
    with pytest.raises(FileExistsError, match="net.pt"):
        save_model(result.model, path)
    save_model(result.model, path, overwrite=True)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="result_or_model"):
        save_model("not a model", tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "net.pt"]  # no temporary left


# ------------------------------------------------------------------------------------------------ options [ours]


def test_period0_features_kinds() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 5, 5, 5)).astype(np.float32)
    l2 = jule.period0_features(x, "l2")
    np.testing.assert_allclose(l2, x.reshape(6, -1) / np.linalg.norm(x.reshape(6, -1), axis=1, keepdims=True), rtol=1e-5)
    # standardising ignores brightness and contrast: an affine copy of a patch gets the same feature
    shifted = x.copy()
    shifted[1] = 3.0 * x[0] + 2.0
    std = jule.period0_features(shifted, "standardize")
    np.testing.assert_allclose(std[1], std[0], atol=1e-5)
    np.testing.assert_allclose(std.reshape(6, 125).sum(axis=1), 0.0, atol=1e-4)
    assert not np.allclose(jule.period0_features(shifted, "l2")[1], jule.period0_features(shifted, "l2")[0])
    # the amplitude spectrum is shift invariant (circular shift), the raw voxels are not
    rolled = x.copy()
    rolled[2] = np.roll(x[0], (1, 2, 3), axis=(1, 2, 3))
    spec = jule.period0_features(rolled, "spectrum", chunk=4)
    np.testing.assert_allclose(spec[2], spec[0], atol=1e-5)
    assert spec.shape == (6, 5 * 5 * 3) and np.allclose(np.linalg.norm(spec, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        jule.period0_features(x, "untrained")
    with pytest.raises(ValueError, match="patches"):
        jule.period0_features(x[0], "l2")


def test_period0_spectrum_and_mean_weigh_as_they_vary() -> None:
    """The spectra's block has mean squared norm 1 and is the centred spectrum up to one factor; each channel's
    patch mean sits beside it, centred, divided by sqrt(C) but not re-standardised."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 2, 5, 5, 5)).astype(np.float32)
    x[:20] += 1.5  # half of the patches are brighter in both channels
    both = jule.period0_features(x, "spectrum+mean")
    spectra = jule.period0_features(x, "spectrum")
    assert both.shape == (40, spectra.shape[1] + 2) and both.dtype == np.float32
    block, means = both[:, :-2], both[:, -2:]
    np.testing.assert_allclose(np.mean(np.sum(block**2, axis=1)), 1.0, rtol=1e-4)
    centred = spectra - spectra.mean(axis=0)
    np.testing.assert_allclose(block, centred * (block[:, 0] @ centred[:, 0]) / (centred[:, 0] @ centred[:, 0]),
                               atol=1e-5)
    expected = (x.mean(axis=(2, 3, 4)) - x.mean(axis=(2, 3, 4)).mean(axis=0)) / np.sqrt(2)
    np.testing.assert_allclose(means, expected, atol=1e-5)
    # brightness is invisible to the spectrum of standardised patches, and the mean block separates it
    assert (means[:20].mean(axis=1) > 0.3).all() and (means[20:].mean(axis=1) < -0.3).all()  # ±0.75 / sqrt(2)
    gap = np.linalg.norm(spectra[:20].mean(axis=0) - spectra[20:].mean(axis=0))
    assert gap < 0.1 * np.linalg.norm(means[:20].mean(axis=0) - means[20:].mean(axis=0))


@pytest.mark.parametrize("kind", ["standardize", "untrained", "spectrum", "spectrum+mean"])
def test_raw_feature_options_train_and_change_period_zero(data, kind: str) -> None:
    x, gt = data
    base = train_jule(x, _tiny(epochs_per_period=0, final_epochs=0), ground_truth=gt, progress=False)
    other = train_jule(x, _tiny(epochs_per_period=0, final_epochs=0, raw_features=kind), ground_truth=gt,
                       progress=False)
    assert np.unique(other.labels).size == 3
    assert other.history[0]["n_clusters"] != base.history[0]["n_clusters"] or not np.array_equal(
        other.labels, base.labels
    )
    with pytest.raises(ValueError, match="raw_features"):
        _tiny(raw_features="fft")


def test_paper_preset_keeps_jules_choices_and_fast_uses_ours() -> None:
    paper, fast = JULE_PRESETS["paper"], JULE_PRESETS["fast"]
    assert (paper.raw_features, paper.stop_clusters, paper.merge_target) == ("l2", 0, 3)
    assert (fast.raw_features, fast.stop_clusters, fast.eta) == ("spectrum", 6, 0.5)
    assert fast.merge_target == 6 and jule_config("fast", n_clusters=8).merge_target == 8


def test_stop_clusters_stops_merging_early(data) -> None:
    x, gt = data
    result = train_jule(x, _tiny(eta=0.5, stop_clusters=6), ground_truth=gt, progress=False)
    assert np.unique(result.labels).size == 6 and result.history[-1]["n_clusters"] == 6
    assert all(h["n_clusters"] > 6 for h in result.history[:-1])
    assert _tiny(stop_clusters=2).merge_target == 3 and _tiny(stop_clusters=6).merge_target == 6
    with pytest.raises(ValueError, match="stop_clusters"):
        _tiny(stop_clusters=-1)


def test_jule_config_none_keeps_the_preset_value() -> None:
    from jule3d.config import jule_config, JULE_PRESETS

    config = jule_config("fast", eta=None, k_s=7, epochs_per_period=None)
    assert config.eta == JULE_PRESETS["fast"].eta and config.k_s == 7
    assert config.epochs_per_period == JULE_PRESETS["fast"].epochs_per_period


def test_anchor_one_merges_on_the_period_zero_features_alone(data) -> None:
    """With ``anchor=1`` every period's ``W`` is period 0's: the labels are AGDL's on the fixed spectra, whatever
    the CNN learned."""
    x, gt = data
    config = _tiny(raw_features="spectrum", eta=0.3, anchor=1.0)
    result = train_jule(x, config, ground_truth=gt, progress=False)
    W = agdl.knn_affinity(jule.period0_features(x, "spectrum"), config.k_s)
    expected = agdl.agglomerate(W, agdl.initial_clusters(W), config.merge_target, K_c=config.k_c, lam=config.lam)
    assert len(result.history) >= 4  # several periods, each on a CNN trained further
    assert adjusted_rand_score(expected, result.labels) == 1.0
    other_seed = train_jule(x, replace(config, seed=5), ground_truth=gt, progress=False)
    assert np.array_equal(other_seed.labels, result.labels)  # another CNN, the same merges
    assert not np.allclose(other_seed.features, result.features)


@pytest.mark.parametrize("bad", [{"anchor": -0.1}, {"anchor": 1.5}, {"anchor": 0.5, "raw_features": "untrained"}])
def test_anchor_is_checked(bad: dict) -> None:
    with pytest.raises(ValueError, match="anchor"):
        _tiny(**bad)
