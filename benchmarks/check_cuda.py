"""Check the CUDA path on a GPU machine: training, dense features and Phase 2 give the CPU's results, faster.

Runs (needs a CUDA device; exits with a message otherwise):

1. ``device="auto"`` picks CUDA; JULE training with the ``fast`` preset on phantom patches on the GPU, and the
   same run on the CPU: seconds, final cluster count and patch-level NMI of each (cuDNN kernels are not
   bit-identical to the CPU's, so the runs are compared by quality, not equality).
2. Dense grid features of the GPU-trained model on the GPU vs on the CPU: the largest difference.
3. Phase 2 (``label_volume``) of a 256³ phantom on the GPU: seconds.
4. Training-step throughput (patches/s, batch 100) of both presets on the GPU.
5. ``jule3d segment``'s chunked Phase 2 (:func:`jule3d.chunked.segment_file`) with one trained segmenter on a
   ``--chunked-size`` specimen (default 512 × 1024 × 1024, :func:`bench_scale.write_specimen`) on the GPU: seconds;
   and on a 192³ specimen on the GPU and on the CPU: the share of voxels with the same label (ties and cuDNN
   rounding aside, 1.0).

Usage::

    python benchmarks/check_cuda.py [--patches 1500] [--size 256] [--chunked-size 512x1024x1024]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from jule3d.config import jule_config
from jule3d.jule import train_jule
from jule3d.loss import sample_triplets, weighted_triplet_loss
from jule3d.metrics import nmi
from jule3d.models import PRESETS, JuleNet3D
from jule3d.patches import sample_patches
from jule3d.phantom import make_phantom
from jule3d.segmentation import grid_features, label_volume


def train(patches, truth, device: str, seed: int) -> tuple[float, object]:
    config = jule_config("fast", device=device, seed=seed)
    start = time.perf_counter()
    result = train_jule(patches, config, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def step_rate(preset: str, batch: int = 100, iters: int = 10) -> float:
    model = JuleNet3D(PRESETS[preset]).cuda().to(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    w = PRESETS[preset].patch_size
    x = torch.randn(batch, 1, w, w, w, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    cfg = jule_config(preset)
    a, p, n = (t.cuda() for t in sample_triplets(torch.randint(0, 5, (batch,)), cfg.n_negatives))
    times = []
    for i in range(iters + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = weighted_triplet_loss(model(x), a, p, n, cfg.gamma, cfg.margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=1500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunked-size", default="512x1024x1024", help="Z x Y x X of the chunked Phase 2 run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CPU threads {torch.get_num_threads()}")
    auto = jule_config("fast", device="auto")
    print(f"device='auto' resolves to: {'cuda' if torch.cuda.is_available() else 'cpu'} (config {auto.device!r})")

    phantom = make_phantom(shape=(96, 96, 96), seed=args.seed)
    patches = sample_patches(phantom.volume, args.patches, patch_size=PRESETS["fast"].patch_size,
                             min_foreground=0.9, seed=args.seed)
    truth = phantom.labels[tuple(patches.centers.T)]
    print(f"\n## 1. JULE training, fast preset, {len(patches)} patches of the 96³ texture phantom")
    results = {}
    for device in ("cuda", "cpu"):
        seconds, result = train(patches, truth, device, args.seed)
        results[device] = result
        print(f"{device:5s}: {seconds:7.1f} s, {len(np.unique(result.labels))} clusters, "
              f"{len(result.history)} history records, patch NMI {nmi(truth, result.labels):.3f}")
    model = results["cuda"].model

    print("\n## 2. dense grid features of the GPU-trained model: GPU vs CPU")
    gpu = grid_features(model.cuda(), phantom.volume, stride=2, device="cuda")
    cpu = grid_features(model.cpu(), phantom.volume, stride=2, device="cpu")
    print(f"positions {len(gpu.features):,}; max |GPU - CPU| = {np.abs(gpu.features - cpu.features).max():.2e}")

    print(f"\n## 3. Phase 2 on a {args.size}³ phantom on the GPU")
    big = make_phantom(shape=(args.size,) * 3, seed=args.seed).volume
    model.cuda()
    label_volume(model, big.crop((0, 0, 0), (48, args.size, args.size)), 3)  # warm-up (cuDNN autotune)
    torch.cuda.synchronize()
    start = time.perf_counter()
    labels = label_volume(model, big, 3, stride=2, device="cuda")
    torch.cuda.synchronize()
    print(f"label_volume: {time.perf_counter() - start:.1f} s; labels {np.bincount(labels.ravel()).tolist()}")

    print("\n## 4. training-step throughput on the GPU (batch 100, channels_last_3d)")
    for preset in PRESETS:
        print(f"{preset:6s}: {step_rate(preset):8.0f} patches/s")

    print("\n## 5. chunked Phase 2 (jule3d segment's engine) on the GPU")
    chunked_phase2(args.chunked_size, args.seed)


def chunked_phase2(size: str, seed: int) -> None:
    """Seconds of the chunked Phase 2 on the GPU at ``size``; GPU vs CPU labels on a 192³ specimen."""
    import tempfile
    from pathlib import Path

    from bench_scale import parse_size, write_specimen

    from jule3d.chunked import segment_file
    from jule3d.estimator import JuleSegmenter
    from jule3d.io import read_image

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        small = write_specimen((192, 192, 192), root / "small.nii", seed=seed)
        segmenter = JuleSegmenter(n_clusters=3, seed=seed, device="cpu").fit(small)
        model = segmenter.save(root / "segmenter.pt")
        labels = {}
        for device in ("cuda", "cpu"):
            out = root / f"small_{device}.nii"
            start = time.perf_counter()
            segment_file(small, out, model=model, n_clusters=3, seed=seed, device=device, fit_positions=2**16)
            labels[device] = read_image(out)[0]
            print(f"192³ on {device}: {time.perf_counter() - start:.1f} s")
        print(f"192³: GPU and CPU labels agree on {np.mean(labels['cuda'] == labels['cpu']):.4f} of the voxels")
        shape = parse_size(size)
        big = write_specimen(shape, root / "big.nii", seed=seed)
        start = time.perf_counter()
        segment_file(big, root / "big_labels.nii", model=model, n_clusters=3, seed=seed, device="cuda")
        print(f"{size} on cuda: {time.perf_counter() - start:.1f} s (Phase 2 with a given model)")


if __name__ == "__main__":
    main()
