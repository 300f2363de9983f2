"""The parameter surface: every setting of a JULE-3D segmentation, declared once.

:data:`PARAMETERS` lists each setting of :class:`jule3d.estimator.JuleSegmenter` with its default, type and
meaning. Everything else derives from it or is checked against it by a test: the estimator's signature,
``jule3d segment``'s options (:func:`add_cli_options`), the notebooks' ``parameters`` cells
(:func:`notebook_line`), the tuning panel's controls (:data:`TUNABLE`) and the benchmarks.

This module imports nothing heavy, so building the command line stays fast.

Examples
--------
>>> PARAMETERS["n_clusters"].default, PARAMETERS["phase2"].choices
(3, ('consensus', 'merge', 'kmeans'))
>>> notebook_line("seed")
'seed: int = 0                           # seed of everything random'
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Parameter", "PARAMETERS", "STAGES", "TUNABLE", "add_cli_options", "cli_values", "notebook_line"]

#: The pipeline stages a parameter belongs to, in the order the method runs them.
STAGES = ("problem", "sampling", "phase1", "phase2", "runtime")


@dataclass(frozen=True)
class Parameter:
    """One setting of the segmentation.

    Parameters
    ----------
    name : str
        Its name everywhere (estimator, notebooks, ``-p NAME VALUE``); ``--name-with-dashes`` on the CLI.
    default : object
        Its default; ``None`` means a value the preset or the Phase 2 method decides (``none_means``).
    type : type
        ``int``, ``float``, ``str`` or ``dict`` (of the value when it is not ``None``).
    help : str
        What it means, in one line.
    stage : str
        One of :data:`STAGES`.
    none_means : str
        What ``None`` stands for, when the default is ``None``.
    choices : tuple, optional
        The valid values of a ``str`` setting.
    widget : tuple of (min, max, step), optional
        Slider range in the tuning panel; ``None``: not tunable there (a ``str`` with choices is a dropdown
        when ``widget`` is ``()``).
    metavar : str, optional
        Placeholder of the value in ``jule3d segment -h``.
    cli : bool
        Whether ``jule3d segment`` has an option for it.
    """

    name: str
    default: Any
    type: type
    help: str
    stage: str
    none_means: str = ""
    choices: tuple[str, ...] | None = None
    widget: tuple[float, ...] | None = None
    metavar: str | None = None
    cli: bool = True

    @property
    def annotation(self) -> str:
        """The type as a notebook's parameters cell declares it (``int``, ``Optional[float]``, ...)."""
        name = self.type.__name__
        return f"Optional[{name}]" if self.default is None else name

    @property
    def option(self) -> str:
        """The command-line option, ``--n-clusters`` for ``n_clusters``."""
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """The meaning with what ``None`` stands for."""
        return f"{self.help}; None means {self.none_means}" if self.default is None else self.help


_PRESET = "the preset's value"
_PHASE2 = "the Phase 2 method's value"

PARAMETERS: dict[str, Parameter] = {p.name: p for p in (
    Parameter("n_clusters", 3, int, "number of tissue classes k (also JULE's target cluster count n*)", "problem",
              widget=(2, 10, 1), metavar="K"),
    Parameter("preset", "fast", str, "network and schedule preset: fast [ours] (minutes on a CPU) or paper "
              "(the published network, schedule and Phase 2)", "problem", choices=("fast", "paper"), widget=()),
    Parameter("seed", 0, int, "seed of everything random", "problem"),
    Parameter("n_patches", 2000, int, "training patches sampled per network", "sampling", widget=(100, 20_000, 100)),
    Parameter("patch_size", None, int, "patch side in voxels (odd)", "sampling", _PRESET, widget=(5, 41, 2),
              metavar="W"),
    Parameter("min_foreground", 0.5, float, "minimum foreground fraction of a training patch; border patches "
              "must be learnt too", "sampling", metavar="F"),
    Parameter("n_networks", None, int, "[ours] JULE networks trained with different seeds (network i: seed x n "
              "+ i)", "phase1", _PRESET, metavar="N"),
    Parameter("k_s", None, int, "neighbours per patch in the affinity graph (K_s)", "phase1", _PRESET,
              widget=(2, 50, 1)),
    Parameter("k_c", None, int, "clusters in the local term of the merge criterion (K_c)", "phase1", _PRESET,
              widget=(2, 20, 1)),
    Parameter("lam", None, float, "weight of the local term of the merge criterion (lambda)", "phase1", _PRESET),
    Parameter("eta", None, float, "unfolding rate: each period merges ceil(eta x clusters) times", "phase1",
              _PRESET, widget=(0.05, 1.0, 0.05)),
    Parameter("epochs_per_period", None, int, "CNN epochs after the merges of each period", "phase1", _PRESET),
    Parameter("final_epochs", None, int, "CNN epochs of the final update", "phase1", _PRESET),
    Parameter("batch_size", None, int, "patches per minibatch", "phase1", _PRESET),
    Parameter("lr", None, float, "SGD learning rate, decayed as lr x (1 + 1e-4 it) to the power -0.75", "phase1",
              _PRESET),
    Parameter("jule_options", None, dict, "further JuleConfig fields (net_overrides, raw_features, ...)",
              "phase1", "none", cli=False),
    Parameter("stride", 2, int, "grid stride of the dense features (voxels)", "phase2", metavar="S"),
    Parameter("phase2", None, str, "Phase 2 clustering: consensus or merge [ours], or kmeans (the paper)",
              "phase2", _PRESET, choices=("consensus", "merge", "kmeans")),
    Parameter("intensity_weight", None, float, "[ours] weight of the local mean intensity next to the features "
              "(0 leaves it out)", "phase2", _PHASE2, widget=(0.0, 5.0, 0.5), metavar="W"),
    Parameter("intensity_window", 3, int,
              "[ours] side of the window of the local mean intensity and of the refinement's local median (voxels)",
              "phase2"),
    Parameter("smoothing", None, float, "[ours] Potts weight regularising the labels (0 turns it off)", "phase2",
              _PHASE2, widget=(0.0, 5.0, 0.25), metavar="BETA"),
    Parameter("device", "auto", str, "where to compute: auto (CUDA when available), cpu, cuda, cuda:1, ...",
              "runtime"),
    Parameter("progress", False, bool, "show progress bars", "runtime", cli=False),
)}
"""Every setting of :class:`jule3d.estimator.JuleSegmenter`, in the order of its signature."""

#: The settings the tuning panel has controls for, with their defaults.
TUNABLE: dict[str, Any] = {name: p.default for name, p in PARAMETERS.items() if p.widget is not None}

_NOTEBOOK_COMMENT_COLUMN = 40


def notebook_line(name: str) -> str:
    """The line that declares ``name`` in a notebook's ``parameters`` cell (a test keeps the notebooks so)."""
    p = PARAMETERS[name]
    value = json.dumps(p.default) if isinstance(p.default, str) else repr(p.default)
    code = f"{p.name}: {p.annotation} = {value}"
    return f"{code:<{_NOTEBOOK_COMMENT_COLUMN - 1}} # {p.describe()}"


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """Add an option for every :data:`PARAMETERS` entry with ``cli=True`` (help, type, choices, default)."""
    for p in PARAMETERS.values():
        if not p.cli:
            continue
        default = f"default: {p.none_means}" if p.default is None else f"default {p.default}"
        parser.add_argument(p.option, type=p.type, default=p.default, choices=p.choices, metavar=p.metavar,
                            dest=p.name, help=f"{p.help} ({default})")


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The parameter values of a namespace parsed with :func:`add_cli_options`."""
    return {name: getattr(args, name) for name, p in PARAMETERS.items() if p.cli}
