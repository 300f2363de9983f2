"""The 3D CNN of JULE-3D and its fully convolutional (dense) form.

One network class, :class:`JuleNet3D`, configured by a :class:`NetConfig`. Two named configurations
live in :data:`PRESETS`:

``"paper"``
    The likelier reading of Moriya et al. 2018 (see ``docs/method.md``): ``Conv3d(C→50, 5³) → BN → ReLU →
    MaxPool3d(2) → Conv3d(50→50, 5³) → BN → ReLU → Conv3d(50→50, 5³) → BN → ReLU → flatten (1350) →
    Linear(1350→160) → L2-normalise``, no padding, so a 27³ patch shrinks 27 → 23 → 11 → 7 → 3.
``"fast"``
    The same layout on 17³ patches with 3³ kernels, 16, 32 and 32 filters and a 64-d feature
    (17 → 15 → 7 → 5 → 3): about 50× fewer operations per patch, for tutorial runs on a laptop CPU.
    The first layer, which sees the largest maps, is the narrowest: its BatchNorm, ReLU and pooling
    are memory-bound and dominated the step time with 32 filters there.

The final ``Linear`` layer sees a ``k³`` block of feature maps, so it is stored as a ``Linear`` but can
be read as a ``k³`` convolution. :meth:`JuleNet3D.dense` uses that reading to compute, in one pass,
the feature of every patch whose corner lies on a grid of step :attr:`JuleNet3D.stride` (the product of
the pooling factors) inside a larger block. Output ``(i, j, k)`` of :meth:`~JuleNet3D.dense` equals
:meth:`~JuleNet3D.forward` of the patch whose corner is ``(i, j, k) * stride`` (BatchNorm in eval mode),
so the patch centre is ``(i, j, k) * stride + (patch_size - 1) / 2`` in the block's voxel coordinates.

Weights are initialised as in the JULE reference code (``jwyang/JULE.torch``, ``train.lua``,
``NetInit``): convolution and linear weights ``N(0, 0.01²)``, biases 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jule3d.validation import check_int

__all__ = ["NetConfig", "PRESETS", "net_config", "JuleNet3D"]


@dataclass(frozen=True)
class NetConfig:
    """Layout of a :class:`JuleNet3D`.

    Parameters
    ----------
    in_channels : int
        Image channels ``C`` of the input patches.
    patch_size : int
        Side ``w`` of the cubic input patches (voxels).
    n_filters : int or tuple of int
        Output channels of each convolution: one number for all, or one per convolution.
    kernel_size : int
        Side of every convolution kernel (no padding, stride 1).
    n_convs : int
        Number of ``Conv3d → (BatchNorm3d) → ReLU`` blocks.
    pool_after : tuple of int
        0-based indices of the convolution blocks followed by ``MaxPool3d(pool_size)`` (floor mode).
    pool_size : int
        Window and stride of every max-pooling layer.
    feature_dim : int
        Dimension ``D`` of the L2-normalised output feature.
    batchnorm : bool
        Whether each convolution is followed by ``BatchNorm3d``.
    init_std : float
        Standard deviation of the normal weight initialisation (JULE reference: 0.01).

    Raises
    ------
    ValueError
        If a field is out of range, or the patch shrinks to nothing before the final layer.

    Examples
    --------
    >>> from jule3d.models import NetConfig
    >>> config = NetConfig(patch_size=9, n_filters=(4, 8), kernel_size=3, n_convs=2, feature_dim=16)
    >>> config.filters, config.spatial_sizes, config.head_size, config.stride
    ((4, 8), [9, 7, 3, 1], 1, 2)
    >>> NetConfig.from_dict(config.to_dict()) == config
    True
    """

    in_channels: int = 1
    patch_size: int = 27
    n_filters: int | tuple[int, ...] = 50
    kernel_size: int = 5
    n_convs: int = 3
    pool_after: tuple[int, ...] = (0,)
    pool_size: int = 2
    feature_dim: int = 160
    batchnorm: bool = True
    init_std: float = 0.01

    def __post_init__(self) -> None:
        for name in ("in_channels", "patch_size", "kernel_size", "n_convs", "pool_size", "feature_dim"):
            object.__setattr__(self, name, check_int(f"NetConfig.{name}", getattr(self, name), 1))
        filters = self.n_filters
        if isinstance(filters, (list, tuple)):
            filters = tuple(check_int("NetConfig.n_filters", f, 1) for f in filters)
            if len(filters) != self.n_convs:
                raise ValueError(
                    f"NetConfig.n_filters has {len(filters)} entries but n_convs is {self.n_convs}"
                )
        else:
            filters = check_int("NetConfig.n_filters", filters, 1)
        object.__setattr__(self, "n_filters", filters)
        pools = self.pool_after
        if isinstance(pools, (int, np.integer)):
            pools = (pools,)
        pools = tuple(sorted({int(p) for p in pools}))
        if any(p < 0 or p >= self.n_convs for p in pools):
            raise ValueError(
                f"NetConfig.pool_after entries must lie in 0..{self.n_convs - 1}, got {self.pool_after!r}"
            )
        object.__setattr__(self, "pool_after", pools)
        object.__setattr__(self, "batchnorm", bool(self.batchnorm))
        if not (np.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"NetConfig.init_std must be a positive number, got {self.init_std!r}")
        object.__setattr__(self, "init_std", float(self.init_std))
        sizes = self.spatial_sizes
        if sizes[-1] < 1:
            raise ValueError(
                f"NetConfig.patch_size={self.patch_size} is too small for {self.n_convs} convolutions of "
                f"{self.kernel_size}³ and pooling after {list(self.pool_after)}: sizes {sizes}"
            )

    @property
    def filters(self) -> tuple[int, ...]:
        """Output channels of each convolution block."""
        if isinstance(self.n_filters, tuple):
            return self.n_filters
        return (self.n_filters,) * self.n_convs

    @property
    def spatial_sizes(self) -> list[int]:
        """Patch side after the input and after each convolution / pooling layer."""
        sizes = [self.patch_size]
        for i in range(self.n_convs):
            sizes.append(sizes[-1] - self.kernel_size + 1)
            if i in self.pool_after:
                sizes.append(sizes[-1] // self.pool_size)
        return sizes

    @property
    def head_size(self) -> int:
        """Side ``k`` of the feature-map block the final linear layer reads (its kernel as a conv)."""
        return self.spatial_sizes[-1]

    @property
    def stride(self) -> int:
        """Step between neighbouring outputs of the dense (fully convolutional) network, in voxels."""
        return self.pool_size ** len(self.pool_after)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary (lists for tuples) that :meth:`from_dict` reads back."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NetConfig":
        """Build a config from :meth:`to_dict` output.

        Raises
        ------
        ValueError
            If ``data`` holds a key that is not a field.
        """
        _check_fields(data, "data")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


PRESETS: dict[str, NetConfig] = {
    "paper": NetConfig(
        in_channels=1, patch_size=27, n_filters=50, kernel_size=5, n_convs=3, pool_after=(0,), feature_dim=160
    ),
    "fast": NetConfig(
        in_channels=1, patch_size=17, n_filters=(16, 32, 32), kernel_size=3, n_convs=3, pool_after=(0,), feature_dim=64
    ),
}
"""Named network configurations; see the module docstring."""


def _check_fields(overrides: Mapping[str, Any], what: str) -> None:
    valid = [f.name for f in fields(NetConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown NetConfig field(s) in {what}: {unknown}; valid fields: {valid}")


def net_config(preset: str = "fast", **overrides: Any) -> NetConfig:
    """A preset network configuration with some fields replaced.

    Parameters
    ----------
    preset : str
        A key of :data:`PRESETS` (``"paper"`` or ``"fast"``).
    **overrides
        :class:`NetConfig` fields to change, e.g. ``in_channels=2``.

    Returns
    -------
    NetConfig

    Raises
    ------
    ValueError
        If ``preset`` is unknown or an override is not a field (the message lists the valid ones).

    Examples
    --------
    >>> from jule3d.models import net_config
    >>> config = net_config("fast", in_channels=2)
    >>> config.in_channels, config.patch_size, config.filters, config.feature_dim
    (2, 17, (16, 32, 32), 64)
    >>> net_config("paper").spatial_sizes
    [27, 23, 11, 7, 3]
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    _check_fields(overrides, "overrides")
    return replace(PRESETS[preset], **overrides)


#: A convolution followed by ``MaxPool3d(p)`` whose input has at most this many channels times ``p³`` (the
#: image itself: 1 or 2 channels) runs as :func:`_pooled_conv`. A convolution of so few input channels reaches a
#: small fraction of the machine's arithmetic rate, and its full-resolution output dominates the memory traffic.
_UNSHUFFLE_CHANNELS = 64


def _pooled_conv(x: torch.Tensor, weight: torch.Tensor, pool: int) -> torch.Tensor:
    """``max_pool3d(conv3d(x, weight), pool)`` (no bias) as one convolution of the pool-unshuffled input.

    Each ``pool³`` block of ``x`` becomes ``pool³ × C`` channels of one voxel. A pooled output reads
    ``c = ceil((pool + k - 1) / pool)`` such voxels a side, so the convolution has a ``c³`` kernel and
    ``pool³ × C_out`` outputs, one per voxel of the pooling window (the ``k³`` kernel placed at that voxel's
    offset, zeros elsewhere); their maximum is the pooled map. This does ``(c·pool / k)³`` times the
    arithmetic (2.4× for ``k = 3``) in a shape that runs near the machine's rate, and never writes the
    full-resolution map. Input voxels beyond the last window meet only zero weights, so padding is harmless.
    """
    n, c_in = x.shape[:2]
    c_out, k = weight.shape[0], weight.shape[2]
    cells = -(-(pool + k - 1) // pool)
    n_out = [(s - k + 1) // pool for s in x.shape[2:]]
    length = [pool * (q - 1 + cells) for q in n_out]
    x = F.pad(x[:, :, : length[0], : length[1], : length[2]],
              [0, max(length[2] - x.shape[4], 0), 0, max(length[1] - x.shape[3], 0), 0, max(length[0] - x.shape[2], 0)])
    g = [s // pool for s in length]
    x = x.reshape(n, c_in, g[0], pool, g[1], pool, g[2], pool).permute(0, 3, 5, 7, 1, 2, 4, 6)
    x = x.reshape(n, pool**3 * c_in, *g).contiguous(memory_format=torch.channels_last_3d)
    side = cells * pool
    kernels = weight.new_zeros((c_out, pool, pool, pool, c_in, side, side, side))
    for a in np.ndindex(pool, pool, pool):  # the output voxel's offset inside its pooling window
        kernels[:, a[0], a[1], a[2], :, a[0]:a[0] + k, a[1]:a[1] + k, a[2]:a[2] + k] = weight
    # full-resolution offset e = pool * cell + b: the input channel is b (then C), the kernel index the cell
    kernels = kernels.reshape(c_out, pool**3, c_in, cells, pool, cells, pool, cells, pool)
    kernels = kernels.permute(0, 1, 4, 6, 8, 2, 3, 5, 7).reshape(c_out * pool**3, pool**3 * c_in, cells, cells, cells)
    z = F.conv3d(x, kernels.contiguous(memory_format=torch.channels_last_3d))
    z = z.permute(0, 2, 3, 4, 1).reshape(n, *z.shape[2:], c_out, pool**3).amax(-1)
    return z.permute(0, 4, 1, 2, 3)


@dataclass
class _LayerCost:
    name: str
    out_shape: tuple[int, ...]
    macs: int = 0


class JuleNet3D(nn.Module):
    """3D CNN mapping ``w³`` patches to L2-normalised features.

    Parameters
    ----------
    config : NetConfig, optional
        Layout; default ``PRESETS["paper"]``.
    seed : int
        Seed of the weight initialisation (a private generator; the global torch RNG is untouched).

    Attributes
    ----------
    config : NetConfig
    body : torch.nn.Sequential
        The convolution / BatchNorm / ReLU / pooling layers.
    head : torch.nn.Linear
        The final layer, ``filters[-1] * k³ → feature_dim``; :meth:`dense` applies it as a ``k³`` conv.

    Examples
    --------
    >>> import torch
    >>> from jule3d.models import JuleNet3D, net_config
    >>> net = JuleNet3D(net_config("fast"), seed=0).eval()
    >>> net.receptive_field, net.stride, net.feature_dim, net.n_parameters
    (17, 2, 64, 97504)
    >>> patches = torch.randn(2, 1, 17, 17, 17, generator=torch.Generator().manual_seed(0))
    >>> features = net(patches)
    >>> features.shape, bool(torch.allclose(features.norm(dim=1), torch.ones(2)))
    (torch.Size([2, 64]), True)

    :meth:`dense` gives the features of every patch on a ``stride`` grid of a larger block:

    >>> block = torch.randn(1, 1, 21, 21, 21, generator=torch.Generator().manual_seed(0))
    >>> with torch.no_grad():
    ...     dense = net.dense(block)
    ...     corner = net(block[:, :, 2:19, 0:17, 4:21])  # the patch at grid position (1, 0, 2)
    >>> dense.shape, bool(torch.allclose(dense[0, :, 1, 0, 2], corner[0], atol=1e-5))
    (torch.Size([1, 64, 3, 3, 3]), True)
    >>> print(JuleNet3D(net_config("fast", patch_size=9, n_convs=2, n_filters=(4, 8))).describe())
    JuleNet3D: 1×9³ patch → 64-d unit feature (stride 2, BatchNorm on)
      Conv3d     → (4, 7, 7, 7)
      MaxPool3d  → (4, 3, 3, 3)
      Conv3d     → (8, 1, 1, 1)
      Linear     → (64,)
      parameters: 1,584
      forward: 0.1 MFLOP per patch
    """

    def __init__(self, config: NetConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = PRESETS["paper"] if config is None else config
        if not isinstance(self.config, NetConfig):
            raise ValueError(f"config must be a NetConfig, got {type(config).__name__}")
        cfg = self.config
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        # torch's default initialisation draws from the global RNG; keep it untouched.
        with torch.random.fork_rng(devices=[]):
            for i, c_out in enumerate(cfg.filters):
                layers.append(nn.Conv3d(c_in, c_out, cfg.kernel_size))
                if cfg.batchnorm:
                    layers.append(nn.BatchNorm3d(c_out))
                layers.append(nn.ReLU(inplace=True))
                if i in cfg.pool_after:
                    layers.append(nn.MaxPool3d(cfg.pool_size))
                c_in = c_out
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(c_in * cfg.head_size**3, cfg.feature_dim)
        self._init_weights(seed)

    def _init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(int(seed))
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, self.config.init_std, generator=generator)
                nn.init.zeros_(module.bias)

    @property
    def stride(self) -> int:
        """Voxel step between neighbouring outputs of :meth:`dense`."""
        return self.config.stride

    @property
    def receptive_field(self) -> int:
        """Side of the patch one feature describes (``patch_size``)."""
        return self.config.patch_size

    @property
    def feature_dim(self) -> int:
        """Dimension ``D`` of the output features."""
        return self.config.feature_dim

    @property
    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _check_input(self, x: torch.Tensor, exact: bool) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != cfg.in_channels:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (N, {cfg.in_channels}, Z, Y, X), got {shape}")
        spatial = tuple(x.shape[2:])
        if exact and spatial != (cfg.patch_size,) * 3:
            raise ValueError(f"x must hold {cfg.patch_size}³ patches, got spatial shape {spatial}")
        if not exact and min(spatial) < cfg.patch_size:
            raise ValueError(f"x must be at least {cfg.patch_size} voxels along each axis, got {spatial}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a batch of patches.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, C, w, w, w)`` patches.

        Returns
        -------
        torch.Tensor
            ``(N, D)`` features of unit L2 norm.
        """
        self._check_input(x, exact=True)
        h = self.body(x).flatten(1)
        return F.normalize(self.head(h), dim=1)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Fully convolutional features of every patch on a ``stride`` grid inside ``x``.

        BatchNorm uses its running statistics (eval mode) whatever the module's mode, folded into the
        convolutions; the first convolution, if pooled, runs as :func:`_pooled_conv`, and the maps are
        channels-last. The features equal those of the layer-by-layer network up to float rounding (about
        1e-7). Wrap the call in ``torch.inference_mode()`` when no gradient is needed.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, C, Z, Y, X)`` blocks, each side at least ``patch_size``.

        Returns
        -------
        torch.Tensor
            ``(N, D, z, y, x)`` unit-norm features with ``z = (Z - patch_size) // stride + 1`` (same
            for ``y``, ``x``). Output ``(i, j, k)`` equals :meth:`forward` of the patch whose corner is
            ``(i, j, k) * stride``; its centre is that corner plus ``(patch_size - 1) / 2``.
        """
        self._check_input(x, exact=False)
        cfg = self.config
        channels_last = torch.channels_last_3d
        h = x
        for weight, bias, pool in self._inference_layers():
            if pool > 1 and weight.shape[1] * pool**3 <= _UNSHUFFLE_CHANNELS:
                h = _pooled_conv(h, weight, pool) + bias.view(1, -1, 1, 1, 1)
            else:
                h = F.conv3d(h, weight.contiguous(memory_format=channels_last), bias)
                if pool > 1:
                    h = F.max_pool3d(h, pool)
            # max-pooling commutes with the bias and the ReLU, so both act on the pooled (smaller) map
            h = h.relu_().contiguous(memory_format=channels_last)
        k = cfg.head_size
        weight = self.head.weight.view(cfg.feature_dim, -1, k, k, k).contiguous(memory_format=channels_last)
        out = F.conv3d(h, weight, self.head.bias)
        n_out = [(s - cfg.patch_size) // cfg.stride + 1 for s in x.shape[2:]]
        out = out[:, :, : n_out[0], : n_out[1], : n_out[2]]
        return F.normalize(out, dim=1)

    def _inference_layers(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """The body as ``(weight, bias, pool)`` per convolution block: BatchNorm's running statistics folded
        into the convolution, and the max-pool factor after its ReLU (1 for none)."""
        layers: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        for module in self.body:
            if isinstance(module, nn.Conv3d):
                layers.append((module.weight, module.bias, 1))
            elif isinstance(module, nn.BatchNorm3d):
                weight, bias, pool = layers[-1]
                scale = module.weight / torch.sqrt(module.running_var + module.eps)
                layers[-1] = (weight * scale.view(-1, 1, 1, 1, 1), (bias - module.running_mean) * scale + module.bias,
                              pool)
            elif isinstance(module, nn.MaxPool3d):
                layers[-1] = layers[-1][:2] + (self.config.pool_size,)
        return layers

    def embed(
        self,
        patches: np.ndarray | torch.Tensor,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        channels_last: bool = False,
    ) -> np.ndarray:
        """Eval-mode features of many patches, computed in batches without gradients.

        Parameters
        ----------
        patches : numpy.ndarray or torch.Tensor
            ``(N, C, w, w, w)`` patches (kept on the CPU; each batch is moved to ``device``).
        batch_size : int
            Patches per forward pass.
        device : str or torch.device, optional
            Where to compute; default the device of the model's parameters.
        channels_last : bool
            Feed the batches in ``torch.channels_last_3d`` memory format.

        Returns
        -------
        numpy.ndarray
            ``(N, D)`` float32 features of unit norm; the module's train/eval mode is restored.

        Examples
        --------
        >>> import numpy as np
        >>> from jule3d.models import JuleNet3D, net_config
        >>> net = JuleNet3D(net_config("fast"))
        >>> features = net.embed(np.zeros((3, 1, 17, 17, 17), dtype=np.float32), batch_size=2)
        >>> features.shape, features.dtype, net.training
        ((3, 64), dtype('float32'), True)
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        data = torch.as_tensor(patches)
        if device is None:
            device = next(self.parameters()).device
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        out = np.empty((data.shape[0], self.feature_dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, data.shape[0], batch_size):
                    batch = data[start : start + batch_size].to(device, torch.float32)
                    feats = self(batch.contiguous(memory_format=memory_format))
                    out[start : start + batch.shape[0]] = feats.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def _layer_costs(self) -> list[_LayerCost]:
        cfg = self.config
        costs: list[_LayerCost] = []
        size, channels = cfg.patch_size, cfg.in_channels
        for module in self.body:
            if isinstance(module, nn.Conv3d):
                size = size - cfg.kernel_size + 1
                macs = size**3 * cfg.kernel_size**3 * channels * module.out_channels
                channels = module.out_channels
                costs.append(_LayerCost("Conv3d", (channels, size, size, size), macs))
            elif isinstance(module, nn.MaxPool3d):
                size //= cfg.pool_size
                costs.append(_LayerCost("MaxPool3d", (channels, size, size, size)))
        costs.append(_LayerCost("Linear", (cfg.feature_dim,), self.head.in_features * cfg.feature_dim))
        return costs

    @property
    def flops_per_patch(self) -> int:
        """Multiply-add operations ×2 of one forward pass on one patch (convolutions and linear)."""
        return 2 * sum(c.macs for c in self._layer_costs())

    def describe(self) -> str:
        """Human-readable summary: layer output shapes, parameter count, forward FLOPs per patch."""
        cfg = self.config
        lines = [
            f"JuleNet3D: {cfg.in_channels}×{cfg.patch_size}³ patch → {cfg.feature_dim}-d unit feature "
            f"(stride {self.stride}, BatchNorm {'on' if cfg.batchnorm else 'off'})"
        ]
        lines += [f"  {c.name:<10s} → {c.out_shape}" for c in self._layer_costs()]
        lines.append(f"  parameters: {self.n_parameters:,}")
        lines.append(f"  forward: {self.flops_per_patch / 1e6:,.1f} MFLOP per patch")
        return "\n".join(lines)
