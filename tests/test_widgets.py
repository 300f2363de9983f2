"""Widgets: headless detection, the environment override, and the patch sampling explorer's updates."""

from __future__ import annotations

import numpy as np
import pytest

from jule3d.app import widgets
from jule3d.app.widgets import INTERACTIVE_ENV, live_frontend, patch_sampling_explorer
from jule3d.volume import Volume


@pytest.fixture
def volume() -> Volume:
    rng = np.random.default_rng(0)
    mask = np.zeros((24, 26, 28), bool)
    mask[3:21, 3:23, 3:25] = True
    return Volume.from_array(rng.normal(size=(24, 26, 28)).astype(np.float32), spacing=(1.0, 1.0, 2.0),
                             mask=mask)


def test_plain_python_is_headless(monkeypatch) -> None:
    monkeypatch.delenv(INTERACTIVE_ENV, raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", "x.ipynb")  # not enough without a ZMQ kernel
    assert live_frontend() is False


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("0", False), ("", False),
                                             ("false", False), (" no ", False)])
def test_environment_override(monkeypatch, value: str, expected: bool) -> None:
    monkeypatch.setenv(INTERACTIVE_ENV, value)
    assert live_frontend() is expected


def test_zmq_kernel_needs_a_jupyter_session(monkeypatch) -> None:
    class ZMQInteractiveShell:  # the name is what the detection looks at
        pass

    import IPython

    monkeypatch.delenv(INTERACTIVE_ENV, raising=False)
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert live_frontend() is False  # papermill / nbclient kernel
    monkeypatch.setenv("JPY_SESSION_NAME", "analysis.ipynb")
    assert live_frontend() is True


def test_explorer_headless_returns_none(monkeypatch, volume: Volume) -> None:
    monkeypatch.setenv(INTERACTIVE_ENV, "0")
    assert patch_sampling_explorer(volume) is None
    assert patch_sampling_explorer.__name__ == "patch_sampling_explorer"
    assert "Sliders" in patch_sampling_explorer.__doc__


def _controls(box):
    (mode, size), (count, grid, fg) = box.children[0].children, box.children[1].children
    status, figure = box.children[2], box.children[3]
    return mode, size, count, grid, fg, status, figure


def _points(figure) -> int:
    """Patch centres drawn on the axial slice (the first scatter trace)."""
    scatters = [t for t in figure.data if t.type == "scatter"]
    return len(scatters[0].x) if scatters else 0


def test_explorer_updates_figure_and_status(monkeypatch, volume: Volume) -> None:
    pytest.importorskip("anywidget")  # plotly's FigureWidget needs it
    import ipywidgets

    monkeypatch.setenv(INTERACTIVE_ENV, "1")
    box = patch_sampling_explorer(volume, patch_size=9, n_patches=40, stride=4, min_foreground=0.5, seed=1)
    assert isinstance(box, ipywidgets.VBox)
    mode, size, count, grid, fg, status, figure = _controls(box)
    assert (size.value, count.value, grid.value, mode.value) == (9, 40, 4, "random")
    assert size.max == 24  # the smallest volume side
    assert status.value == "40 patches of 9³ voxels"
    assert figure.layout.title.text == "40 patch centres"
    assert [t.type for t in figure.data][:3] == ["heatmap"] * 3
    assert [t.xaxis for t in figure.data][:3] == ["x", "x2", "x3"]  # traces stay on their subplots
    drawn = _points(figure)
    assert 0 < drawn <= 40

    count.value = 200
    assert status.value == "200 patches of 9³ voxels" and figure.layout.title.text == "200 patch centres"
    assert _points(figure) > drawn

    mode.value = "grid"
    n_grid = int(status.value.split()[0])
    assert status.value.endswith("patches of 9³ voxels") and n_grid > 0
    grid.value = 2
    assert int(status.value.split()[0]) > n_grid

    size.value = 21
    assert "of 21³ voxels" in status.value
    # every patch of 25 or more voxels needs more foreground than the mask has: the error is shown
    size.value = 23
    fg.value = 1.0
    assert "color:#c00" in status.value
    assert figure.layout.title.text.endswith("patch centres")  # the last good figure stays


def test_interactive_decorator_skips_build(monkeypatch) -> None:
    calls = []
    wrapped = widgets._interactive(lambda *a, **k: calls.append((a, k)) or "built")
    monkeypatch.setenv(INTERACTIVE_ENV, "0")
    assert wrapped(1, b=2) is None and calls == []
    monkeypatch.setenv(INTERACTIVE_ENV, "1")
    assert wrapped(1, b=2) == "built" and calls == [((1,), {"b": 2})]
