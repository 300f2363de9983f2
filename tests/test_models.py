"""Tests of jule3d.models: presets, overrides, shapes and the dense == patch-wise identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jule3d.models import PRESETS, JuleNet3D, NetConfig, net_config


def _warm_batchnorm(model: JuleNet3D, seed: int = 0) -> None:
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    w = model.config.patch_size
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(2.0 + 3.0 * torch.randn(6, model.config.in_channels, w, w, w, generator=gen))
    with torch.no_grad():  # some negative BatchNorm scales: max-pooling must not be moved past a sign flip
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.copy_(torch.linspace(-1.0, 1.5, module.num_features))
    model.eval()


def _patchwise(model: JuleNet3D, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Features by cropping each patch whose corner is on the stride grid (the slow reference)."""
    s, w = model.stride, model.receptive_field
    idx = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3) * s
    crops = torch.stack([x[0, :, z : z + w, y : y + w, q : q + w] for z, y, q in idx])
    return model(crops).T.reshape(-1, *grid)


def test_paper_preset_layout() -> None:
    cfg = PRESETS["paper"]
    assert cfg.spatial_sizes == [27, 23, 11, 7, 3]
    assert cfg.stride == 2 and cfg.head_size == 3
    model = JuleNet3D(cfg)
    assert model.head.in_features == 1350 and model.head.out_features == 160
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(5, 5, 5)] * 3
    assert [c.padding for c in convs] == [(0, 0, 0)] * 3
    assert [c.out_channels for c in convs] == [50, 50, 50]
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.body) == 3
    assert 3.5e8 < model.flops_per_patch < 4.2e8  # method.md: about 0.38 GFLOP forward
    assert "parameters" in model.describe()


def test_fast_preset_is_much_cheaper() -> None:
    fast, paper = JuleNet3D(net_config("fast")), JuleNet3D(net_config("paper"))
    assert fast.config.head_size >= 1
    assert fast.flops_per_patch * 10 < paper.flops_per_patch
    assert type(fast) is type(paper)


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_forward_shape_and_unit_norm(preset: str) -> None:
    model = JuleNet3D(net_config(preset, in_channels=2), seed=3)
    w = model.receptive_field
    out = model(torch.randn(4, 2, w, w, w))
    assert out.shape == (4, model.feature_dim)
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "overrides", "extra"),
    [
        ("paper", {}, (5, 2, 3)),
        ("fast", {}, (7, 4, 1)),
        ("fast", {"in_channels": 2, "n_filters": 8}, (3, 6, 5)),
        ("fast", {"patch_size": 21, "n_filters": (6, 8, 10), "pool_after": (0, 1), "n_convs": 3}, (9, 4, 0)),
        ("fast", {"batchnorm": False, "n_filters": 8}, (2, 3, 4)),
        ("fast", {"patch_size": 23, "pool_size": 3, "n_filters": 6}, (4, 0, 5)),
        ("fast", {"in_channels": 9, "n_filters": 4}, (1, 2, 0)),  # too many input channels to unshuffle
    ],
)
def test_dense_equals_patchwise(preset: str, overrides: dict, extra: tuple[int, int, int]) -> None:
    model = JuleNet3D(net_config(preset, **overrides), seed=7)
    _warm_batchnorm(model)
    model.train()  # dense() must use eval-mode BatchNorm whatever the module's mode
    w, c, s = model.receptive_field, model.config.in_channels, model.stride
    gen = torch.Generator().manual_seed(1)
    x = 2.0 + 3.0 * torch.randn(1, c, w + extra[0], w + extra[1], w + extra[2], generator=gen)
    with torch.no_grad():
        dense = model.dense(x)
        assert model.training  # mode restored
        model.eval()
        grid = tuple((w + e - w) // s + 1 for e in extra)
        assert dense.shape == (1, model.feature_dim, *grid)
        ref = _patchwise(model, x, grid)
    np.testing.assert_allclose(dense[0].numpy(), ref.numpy(), atol=1e-5)


def test_stride_with_two_pools() -> None:
    cfg = net_config("fast", patch_size=21, pool_after=(0, 1))
    assert cfg.stride == 4
    assert JuleNet3D(cfg).stride == 4


def test_embed_matches_forward_in_eval_mode() -> None:
    model = JuleNet3D(net_config("fast", n_filters=8), seed=0)
    _warm_batchnorm(model)
    model.train()
    w = model.receptive_field
    x = torch.randn(7, 1, w, w, w)
    feats = model.embed(x.numpy(), batch_size=3)
    assert model.training
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(feats, model(x).numpy(), atol=1e-6)


def test_seeded_init_is_deterministic_and_leaves_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b = JuleNet3D(net_config("fast"), seed=5), JuleNet3D(net_config("fast"), seed=5)
    c = JuleNet3D(net_config("fast"), seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_net_config_overrides_and_errors() -> None:
    cfg = net_config("paper", in_channels=3, feature_dim=32)
    assert cfg.in_channels == 3 and cfg.feature_dim == 32 and cfg.kernel_size == 5
    assert PRESETS["paper"].in_channels == 1  # presets are not mutated
    with pytest.raises(ValueError, match="unknown preset 'huge'.*fast.*paper"):
        net_config("huge")
    with pytest.raises(ValueError, match=r"n_filterz.*valid fields.*n_filters"):
        net_config("fast", n_filterz=3)
    with pytest.raises(ValueError, match="patch_size=9 is too small"):
        net_config("paper", patch_size=9)
    with pytest.raises(ValueError, match="n_filters has 2 entries"):
        net_config("fast", n_filters=(4, 4))
    with pytest.raises(ValueError, match="pool_after"):
        net_config("fast", pool_after=(3,))
    with pytest.raises(ValueError, match="kernel_size"):
        net_config("fast", kernel_size=0)


def test_config_dict_round_trip() -> None:
    cfg = net_config("fast", n_filters=(4, 5, 6), pool_after=(0, 1), patch_size=21)
    assert NetConfig.from_dict(cfg.to_dict()) == cfg
    assert all(not isinstance(v, tuple) for v in cfg.to_dict().values())
    with pytest.raises(ValueError, match="bogus"):
        NetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_input_shape_errors() -> None:
    model = JuleNet3D(net_config("fast", n_filters=4))
    with pytest.raises(ValueError, match="x must hold 17"):
        model(torch.zeros(1, 1, 15, 15, 15))
    with pytest.raises(ValueError, match=r"shape \(N, 1, Z, Y, X\)"):
        model(torch.zeros(1, 2, 17, 17, 17))
    with pytest.raises(ValueError, match="at least 17"):
        model.dense(torch.zeros(1, 1, 30, 16, 30))
