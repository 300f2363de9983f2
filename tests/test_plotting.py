"""Plotly figures: trace counts and types, slider steps, colour scales, mesh budget, bad input."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from jule3d.app.plotting import (
    OfflineNotebookRenderer,
    configure_notebook_renderer,
    label_colors,
    plot_embedding,
    plot_histograms,
    plot_history,
    plot_label_meshes,
    plot_label_slices,
    plot_orthogonal_slices,
    plot_patch_gallery,
)
from jule3d.volume import Volume

SHAPE = (9, 11, 13)


@pytest.fixture(scope="module")
def volume() -> Volume:
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    mask = np.zeros(SHAPE, bool)
    mask[2:7, 2:9, 3:10] = True
    return Volume.from_array(data, spacing=(0.5, 1.0, 2.0), mask=mask)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    out[2:7, 2:9, 3:6], out[2:7, 2:9, 6:8], out[2:7, 2:9, 8:10] = 1, 2, 3
    return out


def _types(fig: go.Figure) -> list[str]:
    return [t.type for t in fig.data]


def test_configure_notebook_renderer() -> None:
    before = pio.renderers.default
    try:
        pio.renderers.default = "json"
        configure_notebook_renderer()
        assert pio.renderers.default == "jule3d"
    finally:
        pio.renderers.default = before


def test_offline_renderer_bundle_has_json_and_html_without_cdn() -> None:
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    bundle = OfflineNotebookRenderer().to_mimebundle(fig.to_dict())
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [3, 4]
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html
    assert "src=" not in html and "mathjax" not in html.lower(), "nothing may be loaded from elsewhere"


def test_label_colors_repeat() -> None:
    colors = label_colors(12)
    assert len(colors) == 12 and colors[10] == colors[0] and len(set(colors[:10])) == 10


def test_orthogonal_slices(volume: Volume) -> None:
    fig = plot_orthogonal_slices(volume, indices=(1, 2, 3))
    assert isinstance(fig, go.Figure)
    assert _types(fig) == ["heatmap"] * 3 + ["contour"] * 3
    np.testing.assert_array_equal(fig.data[0].z, volume.data[0, 1])
    np.testing.assert_array_equal(fig.data[1].z, volume.data[0, :, 2])
    np.testing.assert_array_equal(fig.data[2].z, volume.data[0, :, :, 3])
    np.testing.assert_array_equal(fig.data[3].z, volume.mask[1])
    assert [a.text for a in fig.layout.annotations] == ["axial (Z) = 1", "coronal (Y) = 2", "sagittal (X) = 3"]
    # aspect ratio: axial rows are y (1 mm), columns x (0.5 mm)
    assert fig.layout.yaxis.scaleratio == pytest.approx(2.0)
    assert fig.layout.yaxis3.scaleratio == pytest.approx(2.0 / 1.0)  # sagittal rows z (2 mm), cols y (1 mm)


def test_orthogonal_slices_points_without_mask(volume: Volume) -> None:
    points = np.array([[4, 5, 6], [4, 0, 0], [0, 5, 12]])
    fig = plot_orthogonal_slices(volume.with_mask(None), points=points, point_halfwidth=0)
    assert _types(fig) == ["heatmap"] * 3 + ["scatter"] * 3
    axial = fig.data[3]  # slice z = 4: points 0 and 1, drawn at (x, y)
    assert list(axial.x) == [6, 0] and list(axial.y) == [5, 0]
    sagittal = fig.data[5]  # slice x = 6: point 0 only, drawn at (y, z)
    assert list(sagittal.x) == [5] and list(sagittal.y) == [4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(indices=(1, 2)), "indices"),
    (dict(indices=(1, 2, 13)), "indices"),
    (dict(channel=1), "channel"),
    (dict(points=np.zeros((3, 2))), "points"),
])
def test_orthogonal_slices_bad_input(volume: Volume, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_orthogonal_slices(volume, **kwargs)


def test_label_slices_traces_and_colours(volume: Volume, labels: np.ndarray) -> None:
    fig = plot_label_slices(volume, labels, slider_axis=None)
    assert _types(fig) == ["heatmap"] * 6 + ["scatter"] * 3
    assert [t.name for t in fig.data[6:]] == ["class 1", "class 2", "class 3"]
    np.testing.assert_array_equal(fig.data[3].z, labels[4])
    assert not fig.layout.sliders
    overlay = fig.data[3]
    colors = label_colors(3)
    scale = [(float(p), c) for p, c in overlay.colorscale]
    positions = [p for p, _ in scale]
    assert positions == sorted(positions) and positions[0] == 0 and positions[-1] == 1

    def colour_at(value: float) -> str:
        x = (value - overlay.zmin) / (overlay.zmax - overlay.zmin)
        inside = [c for (p0, c0), (p1, c1) in zip(scale, scale[1:]) if p0 <= x <= p1 and c0 == c1 for c in [c0]]
        assert inside, f"label {value} falls between colours"
        return inside[0]

    assert "rgba(0,0,0,0)" in colour_at(0).replace(" ", "")
    assert [colour_at(k) for k in (1, 2, 3)] == colors


def test_label_slices_slider_steps(volume: Volume, labels: np.ndarray) -> None:
    for axis in (0, 1, 2):
        fig = plot_label_slices(volume, labels, slider_axis=axis)
        [slider] = fig.layout.sliders
        size = SHAPE[axis]
        positions = [int(s.label) for s in slider.steps]
        assert positions == list(range(size))  # fewer than 20 slices: one step each
        assert positions[slider.active] == size // 2
        for step in slider.steps:
            pos = int(step.label)
            update, traces = step.args
            assert step.method == "restyle" and list(traces) == [axis, 3 + axis]
            np.testing.assert_array_equal(update["z"][0], np.take(volume.data[0], pos, axis=axis))
            np.testing.assert_array_equal(update["z"][1], np.take(labels, pos, axis=axis))
        # the traces the slider restyles are the image and overlay of that axis
        np.testing.assert_array_equal(fig.data[axis].z, np.take(volume.data[0], size // 2, axis=axis))
        np.testing.assert_array_equal(fig.data[3 + axis].z, np.take(labels, size // 2, axis=axis))


def test_label_slices_long_axis_has_20_steps() -> None:
    vol = Volume.from_array(np.random.default_rng(0).normal(size=(50, 6, 7)).astype(np.float32))
    lab = np.ones((50, 6, 7), np.uint8)
    fig = plot_label_slices(vol, lab, slider_axis=0)
    positions = [int(s.label) for s in fig.layout.sliders[0].steps]
    assert len(positions) == 20 and positions[0] == 0 and positions[-1] == 49


def test_label_slices_bad_input(volume: Volume, labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="labels shape"):
        plot_label_slices(volume, labels[:-1])
    with pytest.raises(ValueError, match="slider_axis"):
        plot_label_slices(volume, labels, slider_axis=3)
    fig = plot_label_slices(volume, np.zeros(SHAPE, np.uint8))  # no label: no legend entries
    assert _types(fig) == ["heatmap"] * 6


def test_patch_gallery() -> None:
    patches = np.random.default_rng(0).normal(size=(20, 2, 5, 5, 5)).astype(np.float32)
    fig = plot_patch_gallery(patches, n_per_row=4, max_patches=10)
    assert _types(fig) == ["heatmap"]
    canvas = np.asarray(fig.data[0].z, dtype=float)
    assert canvas.shape == (3 * 7, 4 * 7)  # 10 patches in rows of 4, 5 voxels + 2 gap
    assert np.count_nonzero(~np.isnan(canvas)) == 10 * 25
    labels = np.repeat([3, 7], 10)
    fig = plot_patch_gallery(patches, labels=labels, n_per_row=4, channel=1)
    canvas = np.asarray(fig.data[0].z, dtype=float)
    assert canvas.shape == (2 * 7, 4 * 7)
    assert list(fig.layout.yaxis.ticktext) == ["cluster 3 (n=10)", "cluster 7 (n=10)"]
    first = canvas[:5, :5]  # a member of cluster 3, channel 1, central axial slice
    assert any(np.array_equal(first, patches[i, 1, 2]) for i in range(10))


@pytest.mark.parametrize("kwargs, match", [
    (dict(patches=np.zeros((3, 5, 5, 5))), "patches"),
    (dict(patches=np.zeros((3, 1, 5, 5, 5)), labels=np.zeros(2)), "labels"),
    (dict(patches=np.zeros((3, 1, 5, 5, 5)), channel=1), "channel"),
])
def test_patch_gallery_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_patch_gallery(**kwargs)


def test_histograms(volume: Volume, labels: np.ndarray) -> None:
    fig = plot_histograms(volume, bins=10)
    assert len(fig.data) == 2
    assert [t.name.split(" (")[0] for t in fig.data] == ["background", "foreground"]
    assert fig.data[1].name == f"foreground ({int(volume.mask.sum()):,} voxels)"
    fig = plot_histograms(volume, regions=labels, region_names={1: "fat"}, bins=10)
    assert [t.name.split(" (")[0] for t in fig.data] == ["class 0", "fat", "class 2", "class 3"]
    for trace in fig.data:
        assert len(trace.x) == 10 == len(trace.y)
        widths = np.diff(trace.x)
        assert np.sum(np.asarray(trace.y) * widths[0]) == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(regions=np.zeros((2, 2, 2))), "regions"),
    (dict(channel=2), "channel"),
    (dict(bins=1), "bins"),
])
def test_histograms_bad_input(volume: Volume, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_histograms(volume, **kwargs)


def test_history() -> None:
    history = [dict(period=0, n_clusters=100, loss=0.5), dict(period=1, n_clusters=10, loss=0.3)]
    fig = plot_history(history)
    assert _types(fig) == ["scatter", "scatter"]
    assert list(fig.data[0].y) == [100, 10] and list(fig.data[1].y) == [0.5, 0.3]
    history[1]["nmi"] = 0.4
    fig = plot_history(history)
    assert _types(fig) == ["scatter"] * 3 and list(fig.data[2].y) == [None, 0.4]
    with pytest.raises(ValueError, match="history"):
        plot_history([])


def _ball(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    z, y, x = np.ogrid[tuple(slice(0, s) for s in shape)]
    c = [(s - 1) / 2 for s in shape]
    return (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2


def test_label_meshes_per_label() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[_ball((20, 20, 20), 7)] = 2
    labels[2:5, 2:5, 2:5] = 4  # label 1 and 3 absent
    fig = plot_label_meshes(labels, spacing_zyx=(2.0, 1.0, 1.0), names={4: "bone"})
    assert _types(fig) == ["mesh3d", "mesh3d"]
    assert [t.name for t in fig.data] == ["class 2", "bone"]
    assert fig.data[0].color == label_colors(4)[1] and fig.data[1].color == label_colors(4)[3]
    box = fig.data[1]  # voxels 2..4 -> surface between 1.5 and 4.5 voxels, z in mm (spacing 2)
    assert min(box.z) == pytest.approx(3.0) and max(box.z) == pytest.approx(9.0)
    assert min(box.x) == pytest.approx(1.5) and max(box.x) == pytest.approx(4.5)
    assert len(plot_label_meshes(np.zeros((4, 4, 4), np.uint8)).data) == 0


@pytest.mark.parametrize("make", [
    lambda: _ball((48, 48, 48), 20).astype(np.uint8),
    lambda: np.ones((40, 40, 40), np.uint8),  # one label filling the volume: all its surface is the border
    lambda: (np.indices((40, 40, 40)).sum(0) // 7 % 3 + 1).astype(np.uint8),  # slabs touching the border
    lambda: np.random.default_rng(0).integers(0, 4, (30, 30, 30)),  # label noise
])
@pytest.mark.parametrize("max_faces", [2_000, 10_000])
def test_label_meshes_face_budget(make, max_faces: int) -> None:
    fig = plot_label_meshes(make(), max_faces=max_faces)
    faces = sum(len(t.i) for t in fig.data)
    assert 0 < faces <= max_faces


def test_label_meshes_bad_input() -> None:
    with pytest.raises(ValueError, match="3D"):
        plot_label_meshes(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing_zyx"):
        plot_label_meshes(np.ones((4, 4, 4), np.uint8), spacing_zyx=(1.0, 1.0))


def test_embedding_plot() -> None:
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(30, 2))
    color = np.repeat([2, 0, 5], 10)
    fig = plot_embedding(coords, color, hover={"index": np.arange(30), "size": rng.random(30)})
    assert _types(fig) == ["scattergl"] * 3
    assert [t.name for t in fig.data] == ["cluster 0", "cluster 2", "cluster 5"]
    np.testing.assert_array_equal(fig.data[1].x, coords[:10, 0])
    np.testing.assert_array_equal(np.asarray(fig.data[1].customdata)[:, 0], np.arange(10))
    assert "index: %{customdata[0]}" in fig.data[0].hovertemplate
    assert plot_embedding(coords, color).data[0].hovertemplate is None
    with pytest.raises(ValueError, match="embedding"):
        plot_embedding(np.zeros((30, 3)), color)
    with pytest.raises(ValueError, match="color"):
        plot_embedding(coords, color[:5])


def test_histograms_skip_the_background_spike() -> None:
    from jule3d.volume import Volume

    data = np.zeros((10, 10, 10), dtype=np.float32)
    data[2:8, 2:8, 2:8] = np.random.default_rng(0).normal(1.0, 0.2, size=(6, 6, 6))
    regions = (data != 0).astype(np.uint8)
    fig = plot_histograms(Volume.from_array(data), regions=regions, skip=(0,))
    assert len(fig.data) == 1 and fig.data[0].name.startswith("class 1")
    assert fig.data[0].x.min() > 0.3, "the bin range must come from the drawn regions only"
    with pytest.raises(ValueError, match="leaves no region"):
        plot_histograms(Volume.from_array(data), regions=regions, skip=(0, 1))
