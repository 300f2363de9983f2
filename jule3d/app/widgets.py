"""Interactive parameter tuning with ipywidgets, active only in a live JupyterLab (or VS Code) session.

Under papermill, ``jule3d run`` or plain Python there is no frontend to talk to: every function here then
returns ``None`` and displays nothing, so notebooks can call them unconditionally and still run headless.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..parameters import PARAMETERS, TUNABLE, Parameter
from ..volume import Volume

__all__ = [
    "live_frontend", "patch_sampling_explorer", "TUNABLE", "preset_values", "quick_preview", "write_params",
    "tuning_panel",
]

#: Set to 0 to force headless behaviour, 1 to force widgets (e.g. in a frontend we do not detect).
INTERACTIVE_ENV = "JULE3D_INTERACTIVE"


def live_frontend() -> bool:
    """Whether code runs in a kernel that a live notebook frontend is attached to.

    Jupyter Server (JupyterLab, Notebook 7) and VS Code start kernels with ``JPY_SESSION_NAME`` set;
    papermill/nbclient and plain Python do not. ``$JULE3D_INTERACTIVE`` (0 or 1) overrides the guess.
    """
    forced = os.environ.get(INTERACTIVE_ENV)
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    return "JPY_SESSION_NAME" in os.environ


def _interactive(build: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``build`` only with a live frontend; otherwise return None without importing ipywidgets."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not live_frontend():
            return None
        return build(*args, **kwargs)

    wrapper.__name__ = build.__name__
    wrapper.__doc__ = build.__doc__
    return wrapper


@_interactive
def patch_sampling_explorer(
    volume: Volume,
    patch_size: int = 27,
    n_patches: int = 500,
    stride: int = 8,
    min_foreground: float = 0.5,
    seed: int = 0,
) -> Any:
    """Sliders for patch size, count and grid stride that redraw the sampled centres on the slices.

    Returns the widget box (displayed by the notebook), or ``None`` without a live frontend.
    """
    import ipywidgets as w
    import plotly.graph_objects as go

    from ..patches import grid_patches, sample_patches
    from .plotting import plot_orthogonal_slices

    size = w.IntSlider(value=patch_size, min=5, max=min(63, min(volume.shape)), step=2, description="patch size")
    count = w.IntSlider(value=n_patches, min=10, max=20_000, step=10, description="patches")
    grid = w.IntSlider(value=stride, min=1, max=32, description="grid stride")
    mode = w.ToggleButtons(options=["random", "grid"], value="random", description="sampling")
    fg = w.FloatSlider(value=min_foreground, min=0.0, max=1.0, step=0.05, description="min fg")
    status = w.HTML()
    figure = go.FigureWidget(plot_orthogonal_slices(volume, title="Patch centres"))

    def redraw(_: Any = None) -> None:
        try:
            if mode.value == "random":
                patches = sample_patches(volume, count.value, size.value, min_foreground=fg.value, seed=seed)
            else:
                patches = grid_patches(volume, grid.value, size.value, min_foreground=fg.value)
        except ValueError as exc:
            status.value = f"<span style='color:#c00'>{exc}</span>"
            return
        new = plot_orthogonal_slices(volume, points=patches.centers, point_halfwidth=size.value // 2,
                                     title=f"{len(patches)} patch centres")
        with figure.batch_update():
            figure.data = ()
            figure.add_traces(list(new.data))  # each trace keeps its own subplot axes (x2/y2, ...)
            figure.layout.title = new.layout.title
        status.value = f"{len(patches)} patches of {size.value}³ voxels"

    for control in (size, count, grid, mode, fg):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([mode, size]), w.HBox([count, grid, fg]), status, figure])



def preset_values(preset: str) -> dict[str, Any]:
    """The values a preset gives the tunable parameters whose default is ``None`` (where the sliders start)."""
    from ..estimator import JuleSegmenter

    resolved = JuleSegmenter(preset=preset).resolved()
    return {name: resolved[name] for name, default in TUNABLE.items() if default is None}


def quick_preview(
    volume: Volume,
    params: Mapping[str, Any],
    n_preview: int = 300,
    slab: int | None = None,
    seed: int = 0,
) -> tuple[Volume, np.ndarray]:
    """A fast, rough preview of the segmentation that ``params`` would give.

    JULE is trained on at most ``n_preview`` patches with one epoch per period and two final epochs, then
    a slab of the volume around its middle axial slice is labelled. Minutes become seconds; the result
    shows the *effect* of a setting (patch size, K_s, η, k, intensity weight, smoothing), not the final quality.

    Parameters
    ----------
    volume : Volume
        The normalised volume with its mask.
    params : mapping
        Values for the names in :data:`TUNABLE` (missing names take the defaults).
    n_preview : int
        Training patches of the preview.
    slab : int, optional
        Thickness (voxels) of the labelled slab; default: the patch size plus 8.
    seed : int
        Seed of everything random.

    Returns
    -------
    (Volume, numpy.ndarray)
        The slab and its labels.
    """
    from ..estimator import JuleSegmenter

    unknown = sorted(set(params) - set(TUNABLE))
    if unknown:
        raise ValueError(f"unknown tuning parameter(s) {unknown}; tunable: {sorted(TUNABLE)}")
    p = {**TUNABLE, **params}
    p.update({k: v for k, v in preset_values(p["preset"]).items() if p[k] is None})
    n = min(int(p["n_patches"]), n_preview)
    segmenter = JuleSegmenter(**{**p, "n_patches": n, "k_s": min(int(p["k_s"]), n - 1)}, seed=seed,
                              epochs_per_period=1, final_epochs=2, n_networks=1)
    thickness = slab or int(p["patch_size"]) + 8
    middle = volume.shape[0] // 2
    start = int(np.clip(middle - thickness // 2, 0, max(volume.shape[0] - thickness, 0)))
    part = volume.crop((start, 0, 0), (start + thickness, *volume.shape[1:]))
    return part, segmenter.fit(volume).predict(part)


def write_params(params: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write chosen parameters as a YAML file for ``jule3d run -f PATH`` (refuses to overwrite by default)."""
    import yaml

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    clean = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
    path.write_text(yaml.safe_dump(clean, sort_keys=True), encoding="utf-8")
    return path


def _control(parameter: Parameter, value: Any) -> Any:
    """The widget of one tunable parameter: a dropdown of its choices, or a slider over its range."""
    import ipywidgets as w

    label = parameter.name.replace("_", " ")
    if parameter.choices:
        return w.Dropdown(options=list(parameter.choices), value=value, description=label)
    low, high, step = parameter.widget
    slider = w.IntSlider if parameter.type is int else w.FloatSlider
    return slider(value=value, min=low, max=high, step=step, description=label)


@_interactive
def tuning_panel(volume: Volume, params_path: str | os.PathLike = "params.yaml", seed: int = 0) -> Any:
    """Sliders for the main parameters, a *Preview* button (:func:`quick_preview`) and *Save* (:func:`write_params`).

    Returns the widget box, or ``None`` without a live frontend.
    """
    import ipywidgets as w

    from .plotting import plot_label_slices

    start = {**TUNABLE, **preset_values(TUNABLE["preset"])}
    controls = {name: _control(PARAMETERS[name], start[name]) for name in TUNABLE}

    def on_preset(change: Any) -> None:  # the sliders show what the chosen preset would use
        for name, value in preset_values(change["new"]).items():
            controls[name].value = value

    controls["preset"].observe(on_preset, names="value")
    preview, save = w.Button(description="Preview", icon="play"), w.Button(description="Save params", icon="save")
    status, output = w.HTML(), w.Output()

    def values() -> dict[str, Any]:
        return {name: c.value for name, c in controls.items()}

    def on_preview(_: Any) -> None:
        status.value = "training on a few hundred patches..."
        try:
            part, labels = quick_preview(volume, values(), seed=seed)
        except ValueError as exc:
            status.value = f"<span style='color:#c00'>{exc}</span>"
            return
        output.clear_output(wait=True)
        with output:
            plot_label_slices(part, labels, slider_axis=None, title="Preview (rough: few patches, few epochs)").show()
        status.value = "preview done"

    saved: list[Path] = []  # the panel replaces only a file it wrote itself

    def on_save(_: Any) -> None:
        try:
            written = write_params(values(), params_path, overwrite=bool(saved))
        except (OSError, ValueError) as exc:
            status.value = f"<span style='color:#c00'>{exc}</span>"
            return
        saved.append(written)
        status.value = f"saved {written}: run <code>jule3d run -f {written} --out RUN_DIR</code>"

    preview.on_click(on_preview)
    save.on_click(on_save)
    rows = [w.HBox([controls["preset"], controls["n_clusters"]]), w.HBox([controls["patch_size"], controls["n_patches"]]),
            w.HBox([controls["k_s"], controls["k_c"], controls["eta"]]),
            w.HBox([controls["intensity_weight"], controls["smoothing"]]), w.HBox([preview, save]), status, output]
    return w.VBox(rows)
