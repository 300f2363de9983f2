"""Interactive parameter tuning with ipywidgets, active only in a live JupyterLab (or VS Code) session.

Under papermill, ``jule3d run`` or plain Python there is no frontend to talk to: every function here then
returns ``None`` and displays nothing, so notebooks can call them unconditionally and still run headless.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .volume import Volume

__all__ = ["live_frontend", "patch_sampling_explorer"]

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
    min_foreground: float = 0.9,
    seed: int = 0,
) -> Any:
    """Sliders for patch size, count and grid stride that redraw the sampled centres on the slices.

    Returns the widget box (displayed by the notebook), or ``None`` without a live frontend.
    """
    import ipywidgets as w
    import plotly.graph_objects as go

    from .patches import grid_patches, sample_patches
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

