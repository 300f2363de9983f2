"""benchmarks/bench_scale.py on a tiny volume: the subprocess run, its sampled memory and the FLOP count."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(_DIR))
    try:
        import bench_scale

        yield bench_scale
    finally:
        sys.path.remove(str(_DIR))


def test_sizes_and_specimen(bench, tmp_path: Path) -> None:
    from jule3d.io import read_image

    assert bench.parse_size("64") == (64, 64, 64) and bench.parse_size("32x64x48") == (32, 64, 48)
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size("8")
    array, geometry = read_image(bench.write_specimen((40, 100, 50), tmp_path / "s.nii"))
    assert array.shape == (40, 100, 50) and array.dtype == np.uint16 and array.min() < array.max()
    assert geometry.spacing == pytest.approx((0.03, 0.03, 0.03))


def test_flops_per_position_follow_the_stride(bench) -> None:
    from jule3d.models import JuleNet3D, net_config

    model = JuleNet3D(net_config("fast"), seed=0).eval()
    native = bench.flops_per_position(model, model.stride)
    # by hand, per position of the stride-2 grid: 1 -> 16 (3³) at the 8 voxels of full resolution, then
    # 16 -> 32, 32 -> 32 and the 32 -> 64 head (3³ each) at half resolution; 2 FLOPs per multiply-add
    assert native == pytest.approx(2 * 27 * (8 * 16 + 16 * 32 + 32 * 32 + 32 * 64))
    assert bench.flops_per_position(model, 1) == pytest.approx(native * model.stride**3)


def test_run_sampled_sees_a_child_process_memory_and_output(bench) -> None:
    """The sampler reads the resident memory of the whole process tree, a grandchild's included."""
    child = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
             "'import numpy, time; a = numpy.ones(200 << 17); time.sleep(1.5)'], check=True); "
             "print('done'); sys.exit(3)")
    run = bench.run_sampled([sys.executable, "-c", child], interval=0.1)
    assert run["returncode"] == 3 and run["stdout"].strip() == "done" and run["seconds"] >= 1.5
    assert run["peak_rss_bytes"] >= 200 * 2**20  # 200 MiB of ones in the grandchild


def test_each_line_of_stderr_gets_the_peak_memory_since_the_line_before(bench) -> None:
    """A stage that held 200 MiB and freed them before its line ends has that peak; the next stage has not."""
    child = ("import sys, time, numpy; print('start', file=sys.stderr, flush=True); a = numpy.ones(200 << 17); "
             "time.sleep(1.0); del a; time.sleep(0.5); print('big', file=sys.stderr, flush=True); time.sleep(1.0); "
             "print('small', file=sys.stderr, flush=True)")
    run = bench.run_sampled([sys.executable, "-c", child], interval=0.1)
    assert [line for line, _ in run["line_peaks"]] == ["start", "big", "small"] == run["stderr"].splitlines()
    peaks = dict(run["line_peaks"])
    assert peaks["big"] >= 200 * 2**20 > peaks["small"] + 100 * 2**20 and run["peak_rss_bytes"] == peaks["big"]


@pytest.mark.slow
def test_main_runs_segment_and_reports(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "scale.json"
    bench.main(["--sizes", "40", "--flop-size", "32", "--json", str(out), "--segment-args", "--n-patches", "60",
                "--epochs-per-period", "1", "--final-epochs", "1", "--k-s", "5", "--n-networks", "1"])
    record = json.loads(out.read_text())
    run = record["runs"][0]
    assert run["shape"] == [40, 40, 40] and run["seconds"] > 0 and run["peak_rss_bytes"] > 50 * 2**20
    assert len(run["stage_peak_rss_bytes"]) == len(run["log"]) and max(run["stage_peak_rss_bytes"]) > 0
    assert 0 < record["phase2"]["gflops"] and 0 < record["phase2"]["fraction_of_matmul"]
    assert "Mvoxel/s" in capsys.readouterr().out
