"""The method on volumes larger than memory: chunk by chunk, in bounded memory, resumable, on Dask.

:func:`segment_file` runs the whole method from an image file to a label file:

1. **Open** the input lazily (:func:`jule3d.lazyio.open_image`). An input of at most ``in_memory_voxels``
   voxels is read whole and prepared exactly as :func:`jule3d.io.prepare_volume` does. A larger one is
   scanned once, slab by slab (:class:`ChunkedVolume`): the strided sample :func:`jule3d.mask.foreground_mask`
   thresholds (the same voxels it would sample), a coarse image of ``factor``³ block means, from which a
   coarse mask is cleaned (closing, largest component, hole filling); a voxel is foreground where its coarse
   block is inside the coarse mask's interior, or in its border band and above the threshold. The
   normalisation statistics (:func:`jule3d.normalize.clip_stats`) come from the foreground voxels of the
   sample. Every block read afterwards is normalised and masked on the fly.
2. **Phase 1** samples its patches from the lazy volume (:meth:`ChunkedVolume.sample_patches`: centres drawn
   uniformly among the foreground voxels by rejection, each patch read on its own) and trains the networks;
   its checkpoints are kept for ``resume``.
3. **Phase 2** is fitted on a bounded sample of the grid's chunks (at most about ``fit_positions`` positions;
   all of them when the grid is that small and the volume in memory, which is exactly
   :meth:`jule3d.estimator.JuleSegmenter.predict`), :func:`jule3d.clustering.fit_phase2`. Then, chunk by
   chunk of ``chunk``³ grid positions: features of the networks the model reads → class distances, stored in
   a Zarr array (pass A); the Potts model, the projection to voxels and the refinement's first pass on each
   chunk with a halo of :func:`halo_positions` positions (pass B, :func:`jule3d.clustering.label_block`); each
   later pass of the refinement on each chunk with the halo of one pass, on the labels the pass before wrote
   (pass C, :func:`jule3d.clustering.refine_block`). Each pass labels every voxel once; its labels go straight
   into a label file in the work folder, and those of the last become the output (NIfTI, Zarr, ``.npy``, ...).
4. **Dask** (``scheduler="local"`` or ``"tcp://host:port"``): the chunks of every pass are tasks; the
   networks, the Phase 2 model and the lazy volume are broadcast once. The labels are those of the
   single-process run.
5. **Resume**: everything lives in a work folder next to the output (``<out>.jule3d-work``) until the output
   is complete: the manifest (inputs, parameters, version), the trained networks, the Phase 2 model, the
   distances, the labels of every pass and the lists of finished chunks. ``resume=True`` continues from them; a
   run killed at any point and resumed writes the labels of an uninterrupted run.

Memory is bounded by the chunk (and the coarse mask of at most ``COARSE_VOXELS`` voxels), not by the volume.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .allocator import retained_heap
from .grid import Grid
from .volume import Geometry, Volume

if TYPE_CHECKING:
    from .lazyio import LazyImage
    from .mask import ThresholdRule

__all__ = ["ChunkedVolume", "open_volume", "segment_file", "halo_positions", "connect", "disconnect", "write_nifti",
           "NpyFile", "write_output", "check_output", "WorkDir",
           "IN_MEMORY_VOXELS", "COARSE_VOXELS", "FIT_POSITIONS", "FIT_CHUNK", "CHUNK"]

#: Inputs of at most this many voxels are read whole and prepared exactly as in memory (256³).
IN_MEMORY_VOXELS = 1 << 24
#: Most voxels of the coarse image and mask of a larger input.
COARSE_VOXELS = 1 << 24
#: Grid positions Phase 2 is fitted on, at most (about).
FIT_POSITIONS = 1 << 18
#: Side, in grid positions, of the chunks Phase 2 is fitted on.
FIT_CHUNK = 32
#: Side, in grid positions, of Phase 2's chunks: 64 against 48 cut the halos' share of the work (a chunk's network
#: runs on 72³ positions, its Potts model on 80³) and made a 512 x 1024 x 1024 run 11 % faster for 0.22 GiB more.
CHUNK = 64
#: Most grid positions a side of one dense pass of the network in a chunk (its activations grow with the cube).
DENSE_CHUNK = 64
#: Bytes of input read at a time by the scan.
SLAB_BYTES = 64 << 20

PathLike = str | os.PathLike


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the volume


@dataclass
class ChunkedVolume:
    """A (multi-channel) volume read block by block, normalised and masked as :func:`jule3d.io.prepare_volume`
    would.

    Attributes
    ----------
    images : list of LazyImage
        One per channel.
    geometry : Geometry
    channel_names : tuple of str
    memory : Volume or None
        The whole prepared volume, for an input small enough to hold (then the attributes below are unused).
    stats : numpy.ndarray
        ``(C, 4)``: per channel the ``(lo, hi, mean, std)`` of :func:`jule3d.normalize.clip_stats`.
    rule : ThresholdRule or None
        The voxel rule of the automatic mask (``None`` with a mask file).
    mask_image : LazyImage or None
        A given mask.
    coarse : numpy.ndarray or None
        Bool coarse mask, one entry per ``factor``³ block.
    factor : int
        Side of a coarse block in voxels.
    """

    images: list[LazyImage]
    geometry: Geometry
    channel_names: tuple[str, ...]
    memory: Volume | None = None
    stats: np.ndarray | None = None
    rule: ThresholdRule | None = None
    mask_image: LazyImage | None = None
    coarse: np.ndarray | None = None
    factor: int = 1
    _interior: np.ndarray | None = field(default=None, repr=False)
    _band: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.coarse is not None and self.factor == 1:  # the coarse mask is the mask
            self._interior, self._band = self.coarse, np.zeros_like(self.coarse)
        elif self.coarse is not None:
            from scipy import ndimage

            self._interior = ndimage.binary_erosion(self.coarse, border_value=1)
            self._band = ndimage.binary_dilation(self.coarse) & ~self._interior

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)``."""
        return self.geometry.shape

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return len(self.channel_names)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(x, y, z)`` in mm."""
        return self.geometry.spacing

    def foreground(self, box: tuple[slice, slice, slice], reduced: np.ndarray | None = None) -> np.ndarray:
        """Bool foreground of the voxels ``box`` (``reduced``: their :func:`jule3d.mask.reduce_channels` image)."""
        if self.memory is not None:
            return self.memory.foreground()[box]

        from .mask import reduce_channels

        if self.mask_image is not None:
            return np.asarray(self.mask_image.array[box]) != 0
        if reduced is None:
            reduced = reduce_channels(np.stack([np.asarray(i.array[box]) for i in self.images]))
        f = self.factor
        index = np.ix_(*[np.arange(s.start, s.stop) // f for s in box])
        return self._interior[index] | (self._band[index] & self.rule(reduced))

    def arrays(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """The normalised voxels ``box`` ``(C, z, y, x)`` float32 (0 outside the foreground) and their foreground."""
        from .mask import reduce_channels
        from .normalize import apply_stats

        if self.memory is not None:
            return (np.ascontiguousarray(self.memory.data[(slice(None),) + box]),
                    self.memory.foreground()[box])
        raw = np.stack([np.asarray(i.array[box]) for i in self.images])
        mask = self.foreground(box, reduce_channels(raw))
        data = np.zeros(raw.shape, dtype=np.float32)
        for c in range(len(raw)):
            data[c][mask] = apply_stats(raw[c][mask], self.stats[c])
        return data, mask

    def read(self, box: tuple[slice, slice, slice]) -> Volume:
        """The normalised voxels ``box`` with their foreground, as a :class:`~jule3d.volume.Volume`.

        Raises
        ------
        ValueError
            If no voxel of ``box`` is in the foreground (a volume needs one); :meth:`arrays` does not.
        """
        box = tuple(slice(int(s.start), int(s.stop)) for s in box)  # type: ignore[assignment]
        data, mask = self.arrays(box)
        geometry = self.geometry.cropped([s.start for s in box], data.shape[1:])
        return Volume(data, geometry, mask=mask, channel_names=self.channel_names, normalized=True)

    def sample_patches(self, n_patches: int, patch_size: int = 27, min_foreground: float = 0.5,
                       seed: int = 0) -> Any:
        """Phase 1's patches: :func:`jule3d.patches.sample_patches` on the lazy volume.

        Centres are drawn uniformly among the foreground voxels whose patch fits in the volume and has at least
        ``min_foreground`` of its voxels in the foreground (by rejection among the coarse foreground blocks);
        each patch is read on its own. A volume held in memory gives exactly the patches of
        :func:`jule3d.patches.sample_patches`.
        """
        from .patches import (
            PatchSet,
            _check_min_foreground,
            _check_patch_size,
            sample_patches,
        )
        from .validation import check_int

        if self.memory is not None:
            return sample_patches(self.memory, n_patches, patch_size=patch_size, min_foreground=min_foreground,
                                  seed=seed)
        check_int("n_patches", n_patches, 1)
        w = _check_patch_size(patch_size, self.shape)
        needed = int(np.ceil(_check_min_foreground(min_foreground) * w ** 3 - 1e-9))
        r = w // 2
        blocks = np.flatnonzero(self._interior | self._band)
        most = len(blocks) * self.factor ** 3  # foreground voxels there can be, at most
        if n_patches > most:
            raise ValueError(f"the foreground has at most {most} voxels, fewer than n_patches={n_patches}; lower "
                             "n_patches")
        rng = np.random.default_rng(seed)
        chosen: dict[tuple[int, int, int], np.ndarray] = {}
        attempts, limit = 0, 50 * n_patches
        while len(chosen) < n_patches and attempts < limit:
            batch = min(4 * (n_patches - len(chosen)) + 16, limit - attempts)
            attempts += batch
            drawn = np.stack(np.unravel_index(rng.choice(blocks, size=batch), self.coarse.shape), axis=1)
            centres = drawn * self.factor + rng.integers(0, self.factor, size=(batch, 3))
            inside = np.all((centres >= r) & (centres < np.array(self.shape) - r), axis=1)
            for centre in centres[inside]:
                key = tuple(int(c) for c in centre)
                if key in chosen:
                    continue
                data, mask = self.arrays(tuple(slice(c - r, c + r + 1) for c in key))
                if mask[r, r, r] and int(mask.sum()) >= needed:
                    chosen[key] = data
                    if len(chosen) == n_patches:
                        break
        if len(chosen) < n_patches:
            raise ValueError(f"found only {len(chosen)} patch positions with their centre in the foreground and at "
                             f"least min_foreground={min_foreground:g} of their {w}^3 voxels in it after {attempts} "
                             f"draws, fewer than n_patches={n_patches}; lower n_patches, min_foreground or "
                             "patch_size")
        centers = np.array(list(chosen), dtype=np.int64)
        return PatchSet(np.stack(list(chosen.values())), centers, w, spacing=self.spacing)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_interior"] = state["_band"] = None  # recomputed from the coarse mask
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()


def _blocks(array: np.ndarray, f: int) -> np.ndarray:
    """``(Z, Y, X)`` zero-padded to multiples of ``f`` and viewed as ``(z, f, y, f, x, f)`` blocks."""
    padded = np.pad(array, [(0, -(-n // f) * f - n) for n in array.shape])
    z, y, x = (n // f for n in padded.shape)
    return padded.reshape(z, f, y, f, x, f)


def _coarse_factor(shape: Sequence[int]) -> int:
    f = 1
    while int(np.prod([-(-s // f) for s in shape])) > COARSE_VOXELS:
        f += 1
    return f


def open_volume(
    paths: PathLike | Sequence[PathLike],
    cache: PathLike | None = None,
    mask: PathLike | None = None,
    spacing: Sequence[float] | None = None,
    in_memory_voxels: int = IN_MEMORY_VOXELS,
    announce: Callable[[str], None] = _stderr,
) -> ChunkedVolume:
    """Open a volume (one file per channel) for the chunked method; scan it once if it is large.

    Parameters
    ----------
    paths : path or sequence of paths
        One image, or one per channel (on one grid).
    cache : path, optional
        Folder for Zarr caches of inputs that cannot be read in blocks (:func:`jule3d.lazyio.open_image`).
    mask : path, optional
        Foreground mask file on the volume's grid (default: the automatic mask).
    spacing : sequence of 3 float, optional
        Voxel size ``(x, y, z)`` in mm replacing the files'.
    in_memory_voxels : int
        Inputs of at most this many voxels are read whole (exactly :func:`jule3d.io.load_volume`).

    Returns
    -------
    ChunkedVolume

    Raises
    ------
    FileNotFoundError, ValueError
        Bad inputs (as :func:`jule3d.io.load_volume`), channels on different grids, NaN/Inf voxels, a constant
        image, a mask of another shape or an empty foreground.
    """
    from .io import _as_path_list, _channel_names, load_volume, refuse_nonfinite
    from .lazyio import image_shape, open_image
    from .mask import clean_mask, reduce_channels, threshold_rule, threshold_step
    from .normalize import clip_stats
    from .validation import check_int

    check_int("in_memory_voxels", in_memory_voxels, 0)
    paths = _as_path_list(paths)
    names = _channel_names(None, paths)
    try:
        shape = image_shape(paths[0])
    except Exception:  # unreadable: load_volume says why
        shape = (0, 0, 0)
    if shape is None or int(np.prod(shape)) <= in_memory_voxels:
        volume = load_volume(paths, mask=mask, spacing=spacing)
        if int(np.prod(volume.shape)) <= in_memory_voxels or shape is None:
            return ChunkedVolume([], volume.geometry, volume.channel_names, memory=volume)
    images = [open_image(p, None if cache is None else Path(cache) / f"channel{i}", spacing, announce)
              for i, p in enumerate(paths)]
    geometry = images[0].geometry
    for image in images[1:]:
        if not image.geometry.matches(geometry):
            raise ValueError(f"channel {image.path} is not on the grid of {images[0].path}: "
                             f"{image.geometry.describe_mismatch(geometry)}")
    mask_image = None
    if mask is not None:
        mask_image = open_image(mask, None if cache is None else Path(cache) / "mask", None, announce)
        if mask_image.shape != geometry.shape:
            raise ValueError(f"mask {mask} has shape {mask_image.shape}, the volume {geometry.shape}")
    shape, f, t = geometry.shape, _coarse_factor(geometry.shape), threshold_step(geometry.shape)
    coarse_shape = tuple(-(-s // f) for s in shape)
    coarse_sum = np.zeros(coarse_shape, dtype=np.float64)
    mask_blocks = np.zeros(coarse_shape, dtype=bool)  # with a mask file: blocks holding a foreground voxel
    samples, positions, sample_mask = [], [], []
    plane = int(np.prod(shape[1:])) * 4 * (len(images) + 1)
    step = max(f, (SLAB_BYTES // plane) // f * f)
    for z0 in range(0, shape[0], step):
        z1 = min(z0 + step, shape[0])
        raw = np.stack([np.asarray(i.array[z0:z1]) for i in images])
        for image, channel in zip(images, raw):
            refuse_nonfinite(channel, image.path, where=f" in slices {z0}-{z1 - 1}")
        reduced = reduce_channels(raw)
        rows = slice(z0 // f, z0 // f + -(-(z1 - z0) // f))
        coarse_sum[rows] += _blocks(reduced.astype(np.float64), f).sum(axis=(1, 3, 5))
        first = (-z0) % t
        sub = (slice(first, None, t), slice(None, None, t), slice(None, None, t))
        samples.append(np.concatenate([reduced[sub][None], raw[(slice(None),) + sub].astype(np.float32)])
                       .reshape(len(images) + 1, -1))
        grid = np.meshgrid(*[np.arange(n)[s] for n, s in zip(reduced.shape, sub)], indexing="ij")
        positions.append(np.stack([g.ravel() for g in grid], axis=1) + [z0, 0, 0])
        if mask_image is not None:
            given = np.asarray(mask_image.array[z0:z1]) != 0
            sample_mask.append(given[sub].ravel())
            mask_blocks[rows] |= _blocks(given, f).any(axis=(1, 3, 5))
    sample = np.concatenate(samples, axis=1)
    positions = np.concatenate(positions)
    # voxels per block: f³, fewer in the last block along an axis that f does not divide
    lengths = [np.minimum(f, n - f * np.arange(c)) for n, c in zip(shape, coarse_shape)]
    coarse_image = (coarse_sum / np.multiply.outer(np.multiply.outer(*lengths[:2]), lengths[2])).astype(np.float32)
    rule = None
    if mask_image is None:
        rule = threshold_rule(sample[0])
        raw_coarse = rule(coarse_image)
        if not raw_coarse.any():
            raise ValueError("the automatic foreground mask found no foreground voxel")
        coarse = clean_mask(raw_coarse, closing_radius=2 if f == 1 else 1)  # 2 voxels: foreground_mask's
    else:
        coarse = mask_blocks
    volume = ChunkedVolume(images, geometry, names, rule=rule, mask_image=mask_image, coarse=coarse, factor=f)
    if mask_image is None:
        index = tuple((positions // f).T)
        in_sample = volume._interior[index] | (volume._band[index] & rule(sample[0]))
    else:
        in_sample = np.concatenate(sample_mask)
    if not in_sample.any():
        raise ValueError("no sampled voxel is in the foreground mask; check the mask")
    volume.stats = np.stack([clip_stats(sample[1 + c][in_sample], name=names[c]) for c in range(len(images))])
    return volume


# ---------------------------------------------------------------------------------------------- the chunks


def halo_positions(stride: int, window: int, potts: bool = True) -> int:
    """Grid positions of context around a chunk in a pass that refines: the reach of one refinement pass
    (:func:`jule3d.clustering.refine_radius` voxels), plus two positions for the grid's Potts model where the pass
    runs it (pass B).

    Examples
    --------
    >>> halo_positions(2, 3), halo_positions(2, 3, potts=False)
    (10, 8)
    """
    from .clustering import refine_radius

    return -(-refine_radius(stride, window) // stride) + (2 if potts else 0)


def _box(layout: Grid, first: Sequence[int], stop: Sequence[int]) -> tuple[slice, slice, slice]:
    """The voxels the positions ``[first, stop)`` read; up to the volume's end for a block at the grid's end."""
    box = layout.halo(first, [b - 1 for b in stop])
    return tuple(slice(s.start, n if b == g else s.stop)
                 for s, b, g, n in zip(box, stop, layout.grid_shape, layout.shape))  # type: ignore[return-value]


def _owned(layout: Grid, first: Sequence[int], stop: Sequence[int]) -> tuple[slice, slice, slice]:
    """The voxels (volume indices) labelled by the positions ``[first, stop)``: their blocks, and the volume's
    border beyond the first and last positions."""
    start = layout.offset - layout.stride // 2
    return tuple(slice(0 if a == 0 else start + layout.stride * a, n if b == g else start + layout.stride * b)
                 for a, b, g, n in zip(first, stop, layout.grid_shape, layout.shape))  # type: ignore[return-value]


def _block(volume: ChunkedVolume, layout: Grid, first: Sequence[int], stop: Sequence[int],
           owned_first: Sequence[int] | None = None, owned_stop: Sequence[int] | None = None):
    from .clustering import Block

    box = _box(layout, first, stop)
    owned = _owned(layout, owned_first or first, owned_stop or stop)
    local = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(owned, box))
    grid = Grid(tuple(s.stop - s.start for s in box), layout.patch_size, layout.stride)
    data, mask = volume.arrays(box)
    if not mask.any():  # all air: no position, no volume
        return Block([], np.zeros(grid.grid_shape, dtype=bool), None, grid, local), owned
    sub = Volume(data, volume.geometry.cropped([s.start for s in box], data.shape[1:]), mask=mask,
                 channel_names=volume.channel_names, normalized=True)
    return Block([], grid.select(mask), sub, grid, local), owned


def _device(device: str) -> str:
    """``"auto"``: CUDA when available, else the CPU; any other name as it is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _features(block, models: Sequence, networks: Iterable[int], stride: int, device: Any) -> list:
    from .segmentation import grid_features

    wanted = set(networks)
    # one dense pass over the block (up to DENSE_CHUNK positions a side): sub-chunks would recompute their halos
    side = min(max(block.selected.shape), DENSE_CHUNK)
    return [grid_features(m.to(device), block.volume, stride=stride, chunk=side, device=device).features
            if i in wanted else None for i, m in enumerate(models)]


def _pass_a(volume: ChunkedVolume, models: Sequence, model: Any, layout: Grid, first: tuple, stop: tuple,
            device: Any = None, threads: int | None = None) -> np.ndarray:
    """Class distances ``(*chunk, k)`` of a chunk's positions (NaN where a position has no feature)."""
    from .clustering import block_distances

    _threads(threads)
    block, _ = _block(volume, layout, first, stop)
    out = np.full(block.selected.shape + (model.classes.n_classes,), np.nan, dtype=np.float32)
    if block.selected.any():
        block.features = _features(block, models, model.networks, layout.stride, device)
        out[block.selected] = block_distances(model, block)
    return out


def _halo_block(volume: ChunkedVolume, layout: Grid, first: tuple, stop: tuple, halo: int):
    """A chunk's block with ``halo`` positions of context, from an even position so that the parity sweeps of the
    Potts models are those of the whole volume; with what it owns and its first and last positions."""
    e0 = tuple(max(a - halo, 0) // 2 * 2 for a in first)
    e1 = tuple(min(b + halo, n) for b, n in zip(stop, layout.grid_shape))
    block, owned = _block(volume, layout, e0, e1, first, stop)
    return block, owned, e0, e1


def _stored(model: Any, classes: np.ndarray, last: bool) -> np.ndarray:
    """What a pass writes of the classes of a chunk's voxels: the output labels after the refinement's last pass
    (:func:`jule3d.clustering.output_labels`), else the classes plus one (0 outside the foreground) for the next."""
    from .clustering import output_labels

    return output_labels(model, classes) if last else (classes + 1).astype(_label_dtype(model))


def _pass_b(volume: ChunkedVolume, model: Any, layout: Grid, distances: Any, first: tuple, stop: tuple,
            halo: int, last: bool, threads: int | None = None) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """A chunk's voxels after the Potts model, the projection and the refinement's first pass, from the distances
    of the chunk and its halo (:func:`_stored`)."""
    from .clustering import label_block

    _threads(threads)
    block, owned, e0, e1 = _halo_block(volume, layout, first, stop, halo)
    rows = np.asarray(distances[e0[0]:e1[0], e0[1]:e1[1], e0[2]:e1[2]])
    block.selected = np.isfinite(rows[..., 0])
    if not block.selected.any():
        return owned, np.zeros(tuple(s.stop - s.start for s in owned), dtype=_label_dtype(model))
    classes = label_block(model, block, rows[block.selected], volume.geometry.spacing_zyx, passes=1)
    return owned, _stored(model, classes, last)


def _pass_c(volume: ChunkedVolume, model: Any, layout: Grid, previous: Path, first: tuple, stop: tuple, halo: int,
            step: int, last: bool, threads: int | None = None) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """A chunk's voxels after the refinement's pass ``step`` (from 0), from what the pass before wrote (the file
    ``previous``) on the chunk and its halo (:func:`_stored`)."""
    from .clustering import refine_block

    _threads(threads)
    block, owned, e0, e1 = _halo_block(volume, layout, first, stop, halo)
    if block.volume is None:
        return owned, np.zeros(tuple(s.stop - s.start for s in owned), dtype=_label_dtype(model))
    labels = NpyFile(previous).box(_box(layout, e0, e1)).astype(np.int32) - 1
    classes = refine_block(model.refine[step:step + 1], block, labels, volume.geometry.spacing_zyx)
    return owned, _stored(model, classes, last)


def _label_dtype(model: Any) -> type:
    return np.uint8 if len(model.order) <= 255 else np.uint16


def _cores() -> int:
    """Chunks pass B runs at a time in one process: its numpy and SciPy work runs on one core per chunk, so as
    many as torch's thread count (the cores, or ``OMP_NUM_THREADS``)."""
    import torch

    return torch.get_num_threads()


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def fit_sample(segmenter: Any, volume: ChunkedVolume, layout: Grid, fit_positions: int = FIT_POSITIONS,
               device: Any = None):
    """Fit Phase 2 (:func:`jule3d.clustering.fit_phase2`) on a seeded sample of ``FIT_CHUNK``³-position chunks
    holding about ``fit_positions`` featured positions."""
    from .clustering import fit_phase2

    values = segmenter.resolved()
    chunks = list(layout.chunks(FIT_CHUNK))
    order = np.random.default_rng(segmenter.seed).permutation(len(chunks))
    blocks, total = [], 0
    for i in order:
        if total >= fit_positions:
            break
        block, _ = _block(volume, layout, *chunks[i])
        if not block.selected.any():
            continue
        block.features = _features(block, segmenter.models_, range(len(segmenter.models_)), layout.stride, device)
        blocks.append(block)
        total += int(block.selected.sum())
    if not blocks:
        raise ValueError("no grid position has its centre in the foreground mask; lower the stride or check the mask")
    return fit_phase2(blocks, segmenter.n_clusters, seed=segmenter.seed, phase2=values["phase2"],
                      intensity_weight=values["intensity_weight"], window=segmenter.intensity_window,
                      smoothing=values["smoothing"], spacing=volume.geometry.spacing_zyx)[0]


# ---------------------------------------------------------------------------------------------- Dask


def connect(scheduler: str | None, n_workers: int = 2, timeout: float = 10.0):
    """A Dask client: ``None`` for none, ``"local"`` for a local cluster of ``n_workers`` single-threaded worker
    processes, or the address of a running scheduler (``tcp://host:8786``). ``jule3d batch`` uses it too.

    Raises
    ------
    ValueError
        If the scheduler cannot be reached within ``timeout`` seconds (a clear error, not a hang).
    """
    if scheduler is None:
        return None
    from dask.distributed import Client, LocalCluster

    if scheduler == "local":
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster)
    try:
        return Client(scheduler, timeout=f"{timeout:g}s")
    except (OSError, TimeoutError) as exc:
        raise ValueError(f"cannot reach the Dask scheduler at {scheduler!r} within {timeout:g} s: {exc}") from None


def disconnect(client: Any) -> None:
    """Close a client of :func:`connect` (and the local cluster it started)."""
    if client is None:
        return
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def _run(tasks: list, fn: Callable, shared: dict, client: Any, on_result: Callable, progress: Callable,
         desc: str, threads: int = 1) -> None:
    """``on_result(task, fn(**shared, **task))`` for every task: in this process (``threads`` at a time, for work
    that runs on one core and releases the GIL), or as Dask tasks."""
    bar = progress(total=len(tasks), desc=desc)
    try:
        if client is None and threads > 1:
            from concurrent import futures as threads_pool

            with threads_pool.ThreadPoolExecutor(threads) as pool:
                pending = {pool.submit(fn, **shared, **task): task for task in tasks}
                for future in threads_pool.as_completed(pending):
                    on_result(pending.pop(future), future.result())  # popped: a handled result is freed
                    bar.update(1)
            return
        if client is None:
            for task in tasks:
                on_result(task, fn(**shared, **task))
                bar.update(1)
            return
        from dask.distributed import as_completed

        # hash=False: a fresh key per stage, so releasing one stage's data never cancels the next stage's tasks
        scattered = {k: client.scatter(v, broadcast=True, hash=False) for k, v in shared.items()}
        futures = {client.submit(fn, **scattered, **task, threads=1, pure=False): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            on_result(tasks[futures.pop(future)], future.result())  # popped: the cluster frees a handled result
            bar.update(1)
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------- the work folder


class WorkDir:
    """The folder a run keeps its state in until the output is complete: ``<out>.jule3d-work``."""

    MANIFEST = "manifest.json"
    SEGMENTER = "segmenter.pt"
    PHASE2 = "phase2.npz"
    DISTANCES = "distances.zarr"
    LABELS = "labels.npy"
    REFINED = "refined{}.npy"  # the classes after the refinement's pass i, for pass C to read
    #: The passes and files a folder holds: a folder of another layout (a run of an older jule3d) is not resumed.
    LAYOUT = 2

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.with_name(out.name + ".jule3d-work")

    def file(self, name: str) -> Path:
        """A file of the folder."""
        return self.path / name

    def start(self, manifest: dict, resume: bool) -> None:
        """Create the folder, or check that the one there is this run's (``resume``).

        Raises
        ------
        FileExistsError
            A folder is there and ``resume`` is false.
        ValueError
            ``resume`` on a folder of another run (other inputs, parameters or version).
        """
        manifest = json.loads(json.dumps(manifest))
        if self.path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} holds an unfinished run: pass --resume to continue it, or "
                                      "remove the folder to start again")
            found_file = self.file(self.MANIFEST)
            found = json.loads(found_file.read_text()) if found_file.exists() else {}
            differ = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
            if differ:
                raise ValueError(f"cannot resume from {self.path}: it is a run with other {', '.join(differ)} "
                                 "(another input, parameters or jule3d version); remove it to start again")
            return
        self.path.mkdir()
        _write_atomic(self.file(self.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())

    def done(self, name: str) -> set[int]:
        """Indices of the finished chunks of pass ``name``."""
        path = self.file(f"done_{name}.txt")
        if not path.exists():
            return set()
        return {int(line) for line in path.read_text().split("\n")[:-1] if line.strip().isdigit()}

    def mark(self, name: str, index: int) -> None:
        """Record chunk ``index`` of pass ``name`` as finished (after its results are written)."""
        with open(self.file(f"done_{name}.txt"), "a") as handle:
            handle.write(f"{index}\n")

    def remove(self) -> None:
        """Delete the folder."""
        shutil.rmtree(self.path, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


class NpyFile:
    """A 3D array in a ``.npy`` file (a run's labels, a resampled volume), read and written with plain file I/O:
    no memory map stays open, so the pages written do not count in the process's resident memory (a map of a
    2 GiB label file would).

    Slicing reads slabs of slices (``array[z0:z1]``); :meth:`write` writes a box.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read(handle)
            self.offset = handle.tell()
        self.shape = tuple(int(s) for s in self.shape)
        self.dtype = np.dtype(self.dtype)

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...], dtype: type) -> "NpyFile":
        """A zero-filled file whose blocks are reserved now, so a full disk fails here, not later."""
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()  # the header; unmapped at once
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.path.getsize(path))
            except AttributeError:  # pragma: no cover - not on every platform
                pass
        return cls(path)

    def box(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """The voxels ``box``, read through a memory map that is closed before this returns."""
        mapped = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        values = np.array(mapped[box])
        del mapped
        return values

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.shape[0])
        plane = int(np.prod(self.shape[1:]))
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + start * plane * self.dtype.itemsize)
            data = np.fromfile(handle, dtype=self.dtype, count=max(stop - start, 0) * plane)
        return data.reshape((max(stop - start, 0),) + self.shape[1:])

    def write(self, box: tuple[slice, slice, slice], values: np.ndarray) -> None:
        """Write ``values`` into the voxels ``box`` (row by row)."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        (z0, _, _), (y0, _, _), (x0, _, _) = (s.indices(n) for s, n in zip(box, self.shape))
        _, ny, nx = self.shape
        with open(self.path, "r+b") as handle:
            for z in range(values.shape[0]):
                if values.shape[2] == nx:  # whole rows: one write per slice
                    handle.seek(self.offset + ((z0 + z) * ny + y0) * nx * self.dtype.itemsize)
                    handle.write(values[z].tobytes())
                    continue
                for y in range(values.shape[1]):
                    handle.seek(self.offset + (((z0 + z) * ny + y0 + y) * nx + x0) * self.dtype.itemsize)
                    handle.write(values[z, y].tobytes())


# ---------------------------------------------------------------------------------------------- the output


def write_output(source: Path, out: Path, geometry: Geometry, overwrite: bool,
                 save: Callable[..., Any] | None = None) -> None:
    """Turn a finished :class:`NpyFile` into the output ``out`` (its format by its ending), atomically.

    NIfTI and Zarr are written slab by slab from ``source``, and ``.npy`` by renaming it (with the geometry
    sidecar); any other ending is read whole and written by ``save`` (default :func:`jule3d.io.save_labels`).
    The output appears under its name only once complete; on any error the partial output is removed.

    Parameters
    ----------
    source : pathlib.Path
        The ``.npy`` file; it is moved, not copied, for a ``.npy`` output.
    out : pathlib.Path
        The output file.
    geometry : Geometry
        Its geometry.
    overwrite : bool
        Whether an existing ``out`` may be replaced (the caller has checked that it may).
    save : callable, optional
        ``save(array, out, reference=geometry, overwrite=overwrite)`` for the endings without a streaming writer.
    """
    from .io import _extension, save_labels

    ext = _extension(out)
    labels = NpyFile(source)
    staging = out.with_name(f".{out.name}.partial")
    try:
        if ext in (".nii", ".nii.gz"):
            write_nifti(labels, geometry, staging, compress=ext == ".nii.gz")
        elif ext == ".zarr":
            _write_zarr(labels, geometry, staging)
        elif ext == ".npy":
            source.replace(staging)
            from .io import _geometry_dict, _sidecar

            _sidecar(out).write_text(json.dumps(_geometry_dict(geometry), indent=1), encoding="utf-8")
        else:  # formats without a streaming writer: the uint8/uint16 labels are read whole
            (save or save_labels)(labels[:], out, reference=geometry, overwrite=overwrite)
            return
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()
        raise


def _nifti_header(shape: tuple[int, int, int], dtype: np.dtype, geometry: Geometry) -> bytes:
    """A NIfTI-1 header (with its 4-byte extension flag) for ``(Z, Y, X)`` labels: ITK's LPS geometry as the
    RAS affine that SimpleITK reads back."""
    import nibabel

    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(geometry.spacing)
    affine[:3, 3] = lps_to_ras @ np.asarray(geometry.origin, dtype=np.float64)
    header = nibabel.Nifti1Header()
    header.set_data_shape(tuple(reversed(shape)))
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def write_nifti(labels: np.ndarray, geometry: Geometry, target: Path, compress: bool) -> None:
    """Write a ``(Z, Y, X)`` array (a memory map: read slab by slab) as NIfTI with ``geometry``: the header, then
    the voxels (x fastest, as C order of ``(Z, Y, X)`` is), gzip-compressed for ``compress``."""
    import gzip

    opener = (lambda p: gzip.open(p, "wb", compresslevel=1)) if compress else (lambda p: open(p, "wb"))
    plane = int(np.prod(labels.shape[1:])) * labels.dtype.itemsize
    step = max(1, SLAB_BYTES // plane)
    with opener(target) as handle:
        handle.write(_nifti_header(labels.shape, labels.dtype, geometry))
        for z in range(0, labels.shape[0], step):
            handle.write(np.ascontiguousarray(labels[z:z + step]).tobytes())


def _write_zarr(labels: np.ndarray, geometry: Geometry, target: Path) -> None:
    import zarr

    from .io import _geometry_dict

    chunks = tuple(min(128, s) for s in labels.shape)
    node = zarr.open_array(str(target), mode="w", shape=labels.shape, chunks=chunks, dtype=labels.dtype)
    for z in range(0, labels.shape[0], chunks[0]):
        node[z:z + chunks[0]] = labels[z:z + chunks[0]]
    node.attrs.update(_geometry_dict(geometry))


# ---------------------------------------------------------------------------------------------- the run


class _Stage:
    """Progress of one stage without a terminal: one line when it ends."""

    def __init__(self, total: int, desc: str, log: Callable[[str], None]) -> None:
        self.total, self.desc, self.log, self.n, self.start = total, desc, log, 0, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.log(f"jule3d: {self.desc}: {self.n}/{self.total} chunks in {time.perf_counter() - self.start:.1f} s")


@dataclass
class _Progress:
    """A tqdm bar with ETA per stage on a terminal; otherwise one log line per stage."""

    enabled: bool
    log: Callable[[str], None] = _stderr

    def __call__(self, total: int, desc: str) -> Any:
        if not self.enabled:
            return _Stage(total, desc, self.log)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="chunk")


def check_output(out: Path, inputs: Sequence[PathLike], overwrite: bool, out_name: str = "out",
                 overwrite_name: str = "overwrite") -> None:
    """Refuse an output :func:`segment_file` must not write: one of the ``inputs``, an unsupported ending, a
    missing folder, or an existing file without ``overwrite``; the messages call the two settings
    ``out_name`` and ``overwrite_name`` (the command line passes its option names).

    Raises
    ------
    ValueError
        ``out`` is an input, or its ending is not one of :data:`jule3d.io.WRITE_FORMATS`.
    FileNotFoundError
        Its folder does not exist.
    FileExistsError
        It exists and ``overwrite`` is false.
    """
    from .io import WRITE_FORMATS, _extension

    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise ValueError(f"{out_name} {out} is one of the inputs; refusing to overwrite an input")
    if _extension(out) not in WRITE_FORMATS:
        raise ValueError(f"cannot write {out_name} {out}: unsupported ending; supported: {', '.join(WRITE_FORMATS)}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} of {out_name} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out_name} {out} exists; pass {overwrite_name} to replace it")


def segment_file(
    inputs: PathLike | Sequence[PathLike],
    out: PathLike,
    mask: PathLike | None = None,
    model: Any = None,
    resume: bool = False,
    scheduler: str | None = None,
    chunk: int = CHUNK,
    cache: PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    in_memory_voxels: int = IN_MEMORY_VOXELS,
    fit_positions: int = FIT_POSITIONS,
    log: Callable[[str], None] = _stderr,
    **params: Any,
) -> Path:
    """The whole method from image file(s) to a label file, in memory bounded by the chunk (module docstring).

    Parameters
    ----------
    inputs : path or sequence of paths
        The image (one file per channel).
    out : path
        The label file to write (NIfTI, Zarr, ``.npy``, or any :data:`jule3d.io.WRITE_FORMATS`).
    mask : path, optional
        Foreground mask file.
    model : path, JuleNet3D or sequence, optional
        Trained network(s), or a segmenter file (:meth:`jule3d.estimator.JuleSegmenter.save`): skips Phase 1.
    resume : bool
        Continue the unfinished run in the work folder.
    scheduler : str, optional
        ``"local"`` or a Dask scheduler address: Phase 2's chunks run as Dask tasks.
    chunk : int
        Side, in grid positions, of Phase 2's chunks.
    cache : path, optional
        Folder for the Zarr cache of a compressed input (default: in the work folder).
    overwrite : bool
        Replace an existing output.
    progress : bool, optional
        Progress bars (default: when stderr is a terminal; otherwise one line per stage).
    in_memory_voxels, fit_positions : int
        See :func:`open_volume` and :func:`fit_sample`.
    log : callable
        Receives the messages of the run.
    **params
        Parameters of :class:`jule3d.estimator.JuleSegmenter`.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    FileExistsError
        ``out`` exists (without ``overwrite``), or an unfinished run's folder is there (without ``resume``).
    ValueError, FileNotFoundError
        Bad inputs or parameters (before any work), a foreign cache, a work folder of another run, an unreachable
        Dask scheduler.
    OSError
        A full disk: the partial output is removed, the finished chunks are kept for ``resume``.
    """
    from . import __version__
    from .estimator import JuleSegmenter
    from .io import _as_path_list
    from .validation import check_int

    out = Path(out)
    paths = _as_path_list(inputs)
    check_output(out, paths + ([Path(mask)] if mask else []), overwrite)
    check_int("chunk", chunk, 1)
    check_int("fit_positions", fit_positions, 1)
    bars = _Progress(sys.stderr.isatty() if progress is None else progress, log)
    params.setdefault("progress", bars.enabled)  # Phase 1's bars too, on a terminal
    segmenter = JuleSegmenter(**params)
    segmenter.resolved()  # bad parameters fail before any work
    client = connect(scheduler)
    work = WorkDir(out)
    manifest = {"jule3d": __version__, "inputs": [_identity(p) for p in paths],
                "mask": None if mask is None else _identity(Path(mask)), "params": {k: v for k, v in segmenter.get_params().items() if k not in ("progress", "device")},
                "model": None if model is None else str(model), "chunk": chunk, "fit_positions": fit_positions,
                "in_memory_voxels": in_memory_voxels, "out": str(out.resolve()),
                "work_layout": WorkDir.LAYOUT}
    created = not work.path.exists()
    try:
        work.start(manifest, resume)
        volume = open_volume(paths, cache=cache if cache is not None else work.path / "cache", mask=mask,
                             in_memory_voxels=in_memory_voxels, announce=log)
        _phase1(segmenter, volume, model, work, resume, log)
        device = _device(segmenter.device)
        layout = Grid(volume.shape, segmenter.models_[0].config.patch_size, segmenter.stride)
        labels_path = work.file(WorkDir.LABELS)
        if not labels_path.exists():
            NpyFile.create(labels_path, volume.shape, np.uint8 if segmenter.n_clusters <= 255 else np.uint16)
        if volume.memory is not None and int(layout.select(volume.memory.foreground()).sum()) <= fit_positions:
            start = time.perf_counter()  # small: the in-memory method, exactly JuleSegmenter.predict
            labels = segmenter.predict(volume.memory)
            NpyFile(labels_path).write((slice(None),) * 3, labels)
            log(f"jule3d: Phase 2 (in memory): {time.perf_counter() - start:.1f} s")
        else:
            _phase2(segmenter, volume, layout, work, chunk, fit_positions, device, client, bars, log)
        summary = _summary(labels_path, volume.geometry)
        try:
            write_output(labels_path, out, volume.geometry, overwrite)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(exc.errno, f"the disk is full while writing {out}: removed the partial output; the "
                                         f"finished chunks are kept in {work.path}: free some space and run again "
                                         "with resume (--resume)") from exc
            raise
        work.remove()
        log(f"jule3d segment: wrote {out} ({summary})")
    except (ValueError, TypeError, FileNotFoundError):
        if created and not work.file(WorkDir.SEGMENTER).exists():
            work.remove()  # a bad input or setting: nothing worth resuming is left behind
        raise
    finally:
        disconnect(client)
    return out


def _summary(labels_path: Path, geometry: Geometry) -> str:
    """The volume of every class in mm³, counted slab by slab."""
    labels = NpyFile(labels_path)
    counts = np.zeros(int(np.iinfo(labels.dtype).max) + 1, dtype=np.int64)
    for z in range(0, labels.shape[0], 16):
        counts += np.bincount(np.asarray(labels[z:z + 16]).ravel(), minlength=len(counts))
    present = [k for k in range(1, len(counts)) if counts[k]]
    mm3 = geometry.voxel_volume
    return ", ".join(f"class {k}: {counts[k] * mm3:.1f} mm³" for k in present)


def _phase1(segmenter: Any, volume: ChunkedVolume, model: Any, work: WorkDir, resume: bool,
            log: Callable[[str], None]) -> None:
    """Train (or load) the networks; the trained segmenter is kept in the work folder."""
    from .estimator import JuleSegmenter

    saved = work.file(WorkDir.SEGMENTER)
    if saved.exists():
        segmenter.with_models(JuleSegmenter.load(saved).models_)
        return
    start = time.perf_counter()
    if model is not None:
        try:
            segmenter.with_models(JuleSegmenter.load(model).models_)
        except (ValueError, TypeError, FileNotFoundError, IsADirectoryError):
            segmenter.with_models(model)
    else:
        segmenter.fit(volume, checkpoint_dir=work.path / "phase1", resume=resume)
        log(f"jule3d: Phase 1 ({segmenter.resolved_networks()} network(s)): {time.perf_counter() - start:.1f} s")
    segmenter.save(saved, overwrite=True)


@retained_heap()
def _phase2(segmenter: Any, volume: ChunkedVolume, layout: Grid, work: WorkDir, chunk: int, fit_positions: int,
            device: Any, client: Any, bars: _Progress, log: Callable[[str], None]) -> None:
    import zarr

    from .clustering import Phase2Model

    fitted = work.file(WorkDir.PHASE2)
    if fitted.exists():
        with np.load(fitted) as saved:
            model = Phase2Model.from_dict(dict(saved))
    else:
        start = time.perf_counter()
        model = fit_sample(segmenter, volume, layout, fit_positions, device)
        partial = fitted.with_name("phase2.partial.npz")
        np.savez(partial, **model.to_dict())
        os.replace(partial, fitted)
        log(f"jule3d: Phase 2 fitted in {time.perf_counter() - start:.1f} s")
    k = model.classes.n_classes
    g = layout.grid_shape
    distances = zarr.open_array(str(work.file(WorkDir.DISTANCES)), mode="a", shape=g + (k,),
                                chunks=tuple(min(chunk, n) for n in g) + (k,), dtype=np.float32, fill_value=np.nan)
    chunks = list(layout.chunks(chunk))
    featured = [0]

    def store_distances(task: dict, result: np.ndarray) -> None:
        a, b = task["first"], task["stop"]
        distances[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = result
        featured[0] += int(np.isfinite(result[..., 0]).sum())
        work.mark("a", task["index"])

    done = work.done("a")
    tasks = [{"first": a, "stop": b, "index": i} for i, (a, b) in enumerate(chunks) if i not in done]
    _run(tasks, _pass_a_task, {"volume": volume, "models": segmenter.models_, "model": model, "layout": layout,
                               "device": device}, client, store_distances, bars, "Phase 2 features")
    if tasks:
        log(f"jule3d: Phase 2 features of {featured[0]} grid positions x {len(model.networks)} network(s) in "
            f"{len(tasks)} chunks")
    # pass B: the Potts model, the projection and the refinement's first pass; a pass C for each later pass, on
    # the labels of the one before: every chunk labels its own voxels once per pass
    targets = [work.file(WorkDir.REFINED.format(i)) for i in range(1, max(len(model.refine), 1))]
    targets.append(work.file(WorkDir.LABELS))
    for step, target in enumerate(targets):
        if not target.exists():
            NpyFile.create(target, volume.shape, _label_dtype(model))
        name, last = "b" if step == 0 else f"c{step}", step == len(targets) - 1
        done = work.done(name)
        tasks = [{"first": a, "stop": b, "index": i} for i, (a, b) in enumerate(chunks) if i not in done]
        shared: dict[str, Any] = {"volume": volume, "model": model, "layout": layout, "last": last,
                                  "halo": halo_positions(layout.stride, model.window, potts=step == 0)}
        if step == 0:
            shared["distances"] = str(work.file(WorkDir.DISTANCES))
        else:
            shared.update(previous=targets[step - 1], step=step)
        _run(tasks, _pass_b_task if step == 0 else _pass_c_task, shared, client, _store(NpyFile(target), work, name),
             bars, "Phase 2 labels" if step == 0 else f"Phase 2 refinement, pass {step + 1}", threads=_cores())


def _store(target: NpyFile, work: WorkDir, name: str) -> Callable[[dict, tuple], None]:
    """Write a chunk's voxels into ``target`` and mark the chunk finished in pass ``name``."""
    def store(task: dict, result: tuple) -> None:
        owned, values = result
        target.write(owned, values)  # in the page cache, kept if the process is killed after this line
        work.mark(name, task["index"])

    return store


def _pass_a_task(volume, models, model, layout, device, first, stop, index, threads=None):
    return _pass_a(volume, models, model, layout, tuple(first), tuple(stop), device, threads)


def _pass_b_task(volume, model, layout, distances, halo, last, first, stop, index, threads=None):
    import zarr

    return _pass_b(volume, model, layout, zarr.open_array(distances, mode="r"), tuple(first), tuple(stop), halo,
                   last, threads)


def _pass_c_task(volume, model, layout, previous, halo, step, last, first, stop, index, threads=None):
    return _pass_c(volume, model, layout, previous, tuple(first), tuple(stop), halo, step, last, threads)
