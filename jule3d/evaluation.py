"""Side-by-side evaluation of segmentation methods: metrics, seconds and peak memory, one row per method.

Protocol (``benchmarks.md``): every method sees the same volume, mask and ``k``, runs in the same process
one after another, and is scored on the same evaluation voxels.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .baselines import run_baseline
from .metrics import evaluate
from .volume import Volume

__all__ = [
    "Measured", "measure", "MethodResult", "compare_methods", "results_frame", "results_table", "class_volumes",
]


@dataclass
class Measured:
    """Return value, wall time and peak resident-memory growth of one call.

    Examples
    --------
    >>> from jule3d.evaluation import Measured
    >>> Measured(value=[1, 2], seconds=0.5, peak_mb=3.0)
    Measured(value=[1, 2], seconds=0.5, peak_mb=3.0)
    """

    value: Any
    seconds: float
    peak_mb: float


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(fn: Callable[..., Any], *args: Any, interval: float = 0.02, **kwargs: Any) -> Measured:
    """Call ``fn`` and measure its wall time and peak memory.

    Peak memory is the largest resident set size sampled every ``interval`` seconds during the call,
    minus the resident set size just before it: the extra memory the call needed, including memory
    allocated by native libraries (torch, BLAS), which ``tracemalloc`` does not see.

    Examples
    --------
    >>> from jule3d.evaluation import measure
    >>> measured = measure(sorted, [3, 1, 2], reverse=True)
    >>> measured.value, measured.seconds >= 0, isinstance(measured.peak_mb, float)
    ([3, 2, 1], True, True)
    """
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return Measured(value, seconds, (peak[0] - before) / 2**20)


@dataclass
class MethodResult:
    """One method's labels, metrics and cost.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.evaluation import MethodResult
    >>> result = MethodResult("kmeans", np.zeros((2, 2, 2), np.uint8), seconds=0.5, peak_mb=12.0,
    ...                       metrics={"nmi": 0.8, "dice_per_class": {1: 0.9}})
    >>> result.row()
    {'method': 'kmeans', 'nmi': 0.8, 'seconds': 0.5, 'peak_mb': 12.0}
    """

    method: str
    labels: np.ndarray
    seconds: float
    peak_mb: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """Flat record for a table: method, metrics (without per-class Dice), seconds, peak_mb."""
        flat = {k: v for k, v in self.metrics.items() if not isinstance(v, dict)}
        return {"method": self.method, **flat, "seconds": self.seconds, "peak_mb": self.peak_mb}


def compare_methods(
    volume: Volume,
    n_clusters: int,
    methods: Sequence[str] = ("kmeans", "otsu", "gmm", "slic"),
    ground_truth: np.ndarray | None = None,
    evaluation_mask: np.ndarray | None = None,
    extra: Mapping[str, Callable[[], np.ndarray] | Measured | np.ndarray] | None = None,
    seed: int = 0,
    skip_missing: bool = False,
) -> list[MethodResult]:
    """Run baselines (and any extra methods) on one volume and score them against the ground truth.

    Parameters
    ----------
    volume : Volume
        Normalised volume with its mask (every method uses the same mask).
    n_clusters : int
        ``k`` for every method.
    methods : sequence of str
        Names from :data:`jule3d.baselines.BASELINES`.
    ground_truth : ndarray, optional
        Labels ``(Z, Y, X)``; without it only labels and costs are returned.
    evaluation_mask : ndarray, optional
        Voxels to score (default: the volume's foreground).
    extra : mapping, optional
        More methods: name -> a zero-argument callable returning labels (timed here), a :class:`Measured`
        result of :func:`measure` (labels timed elsewhere, e.g. JULE-3D), or bare labels (cost unknown: NaN).
    seed : int
        Seed passed to every baseline.
    skip_missing : bool
        Leave out, with a warning that names the package to install, the baselines whose optional package
        (antspyx, dipy) is not installed; otherwise they raise ``ImportError``.

    Raises
    ------
    ValueError
        If a name in ``methods`` is not a baseline, or a name is both in ``methods`` and in ``extra``
        (checked before any method runs).

    Examples
    --------
    >>> from jule3d.evaluation import compare_methods
    >>> from jule3d.normalize import normalize_intensity
    >>> from jule3d.phantom import make_phantom
    >>> phantom = make_phantom(shape=(16, 16, 16), variant="intensity")
    >>> volume = normalize_intensity(phantom.volume)
    >>> results = compare_methods(volume, 3, methods=("kmeans", "otsu"), ground_truth=phantom.labels,
    ...                           extra={"truth": phantom.labels})
    >>> [(r.method, round(r.metrics["nmi"], 1)) for r in results]
    [('truth', 1.0), ('kmeans', 0.8), ('otsu', 0.8)]
    >>> results[1].labels.shape, results[1].seconds >= 0
    ((16, 16, 16), True)
    """
    results: list[MethodResult] = []
    runs: dict[str, Callable[[], np.ndarray] | Measured | np.ndarray] = dict(extra or {})
    _check_method_names(methods, runs)
    if skip_missing:
        from .baselines import missing_package

        for name in [m for m in methods if missing_package(m)]:
            warnings.warn(f"baseline {name!r} skipped: pip install {missing_package(name)} to compare with it",
                          stacklevel=2)
        methods = [m for m in methods if not missing_package(m)]
    for name in methods:
        runs[name] = (lambda n=name: run_baseline(n, volume, n_clusters, mask=volume.mask, seed=seed))
    eval_mask = volume.foreground() if evaluation_mask is None else evaluation_mask
    for name, run in runs.items():
        if callable(run):
            run = measure(run)
        if isinstance(run, Measured):
            labels, seconds, peak = run.value, run.seconds, run.peak_mb
        else:
            labels, seconds, peak = np.asarray(run), float("nan"), float("nan")
        metrics = evaluate(ground_truth, labels, eval_mask) if ground_truth is not None else {}
        results.append(MethodResult(name, labels, seconds, peak, metrics))
    return results


def _check_method_names(methods: Sequence[str], extra: Mapping[str, Any]) -> None:
    from .baselines import BASELINES

    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"methods {unknown} are not baselines; valid names: {sorted(BASELINES)}")
    clash = sorted(set(methods) & set(extra))
    if clash:
        raise ValueError(f"methods {clash} are named both in methods and in extra; rename the extra ones")


_COLUMNS = (("method", "method"), ("nmi", "NMI"), ("nmi_geometric", "NMI (geom.)"), ("ari", "ARI"),
            ("dice_mean", "matched Dice"), ("seconds", "seconds"), ("peak_mb", "peak MB"))


def _present_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [(k, h) for k, h in _COLUMNS if any(k in row for row in rows)]


def results_table(results: Sequence[MethodResult], digits: int = 3) -> str:
    """A markdown table of :class:`MethodResult` rows (NMI, geometric NMI, ARI, matched Dice, cost).

    Only the columns some row has are shown.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.evaluation import MethodResult, results_table
    >>> results = [MethodResult("kmeans", np.zeros(0), 0.5, 12.0, {"nmi": 0.8, "ari": 0.75}),
    ...            MethodResult("otsu", np.zeros(0), 0.25, float("nan"), {"nmi": 0.7, "ari": 0.6})]
    >>> print(results_table(results))
    | method | NMI | ARI | seconds | peak MB |
    |---|---|---|---|---|
    | kmeans | 0.800 | 0.750 | 0.500 | 12.000 |
    | otsu | 0.700 | 0.600 | 0.250 | nan |
    """
    rows = [r.row() for r in results]
    present = _present_columns(rows)
    lines = ["| " + " | ".join(h for _, h in present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        cells = []
        for key, _ in present:
            value = row.get(key, "")
            cells.append(f"{value:.{digits}f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_frame(results: Sequence[MethodResult], digits: int = 3) -> "pandas.DataFrame":
    """The rows of :func:`results_table` as a pandas DataFrame indexed by method (an HTML table in notebooks).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.evaluation import MethodResult, results_frame
    >>> results = [MethodResult("kmeans", np.zeros(0), 0.5, 12.0, {"nmi": 0.8, "ari": 0.75}),
    ...            MethodResult("otsu", np.zeros(0), 0.25, 3.0, {"nmi": 0.7, "ari": 0.6})]
    >>> frame = results_frame(results)
    >>> list(frame.columns), frame.index.tolist(), float(frame.loc["otsu", "NMI"])
    (['NMI', 'ARI', 'seconds', 'peak MB'], ['kmeans', 'otsu'], 0.7)
    """
    import pandas as pd

    rows = [r.row() for r in results]
    present = _present_columns(rows)
    frame = pd.DataFrame([{h: row.get(k) for k, h in present} for row in rows]).set_index("method")
    return frame.round(digits)


def class_volumes(labels: np.ndarray, volume: Volume) -> dict[int, dict[str, float]]:
    """Voxel count, physical volume (mm³) and fraction of the foreground per label ``1..k``.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.evaluation import class_volumes
    >>> from jule3d.volume import Volume
    >>> labels = np.tile([0, 1, 1, 2], 16).reshape(4, 4, 4)
    >>> volume = Volume.from_array(np.zeros((4, 4, 4), np.float32), spacing=(0.5, 0.5, 2.0))
    >>> volumes = class_volumes(labels, volume)
    >>> {k: (v["voxels"], v["mm3"], round(v["fraction"], 3)) for k, v in volumes.items()}
    {1: (32, 16.0, 0.667), 2: (16, 8.0, 0.333)}
    """
    counts = np.bincount(np.asarray(labels).ravel())
    total = counts[1:].sum()
    mm3 = volume.geometry.voxel_volume
    return {
        int(k): {"voxels": int(c), "mm3": float(c * mm3), "fraction": float(c / total) if total else 0.0}
        for k, c in enumerate(counts) if k > 0 and c > 0
    }
