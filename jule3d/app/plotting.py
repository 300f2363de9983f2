"""Plotly figures for every stage: slices with overlays, patch galleries, histograms, training curves, meshes.

Every function returns a :class:`plotly.graph_objects.Figure` and draws nothing itself, so the same
figure shows in JupyterLab, in a papermill-executed notebook and in the HTML report. Call
:func:`configure_notebook_renderer` once at the top of a notebook so that executed notebooks carry
plotly.js inline and render offline.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.io.base_renderers import MimetypeRenderer, PlotlyRenderer
from plotly.subplots import make_subplots

from ..volume import Volume

__all__ = [
    "OfflineNotebookRenderer",
    "PLOTLYJS_METADATA",
    "configure_notebook_renderer",
    "label_colors",
    "plot_orthogonal_slices",
    "plot_label_slices",
    "plot_patch_gallery",
    "plot_histograms",
    "plot_history",
    "plot_label_meshes",
    "plot_embedding",
]

_AXES = ("axial (Z)", "coronal (Y)", "sagittal (X)")
# Qualitative palette; index 0 is reserved for background.
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)


#: Output metadata that marks the one plotly.js bundle a notebook carries (so the report can leave it out).
PLOTLYJS_METADATA = {"jule3d": {"role": "plotly.js"}}
#: Name under which :func:`configure_notebook_renderer` registers jule3d's plotly renderer.
RENDERER = "jule3d"


class OfflineNotebookRenderer(MimetypeRenderer):
    """plotly renderer for notebooks that must render offline in every viewer.

    Each figure is displayed as one output holding two representations: the plotly JSON
    (``application/vnd.plotly.v1+json``, drawn natively by JupyterLab, VS Code and by jule3d's report) and a
    small HTML ``<div>`` with a ``Plotly.newPlot`` call (drawn by nbconvert's HTML export). plotly.js itself is
    displayed once per notebook, before the first figure, as an output tagged with :data:`PLOTLYJS_METADATA`.
    Unlike plotly's own ``notebook`` renderer, nothing is loaded from a CDN (plotly 7 adds MathJax from a CDN
    to every figure).

    Examples
    --------
    >>> import plotly.graph_objects as go
    >>> from jule3d.app.plotting import OfflineNotebookRenderer
    >>> bundle = OfflineNotebookRenderer().to_mimebundle(go.Figure().to_dict())
    >>> sorted(bundle), "Plotly.newPlot" in bundle["text/html"]
    (['application/vnd.plotly.v1+json', 'text/html'], True)
    """

    def __init__(self) -> None:
        self._json = PlotlyRenderer()

    def activate(self) -> None:
        """Display plotly.js once (called by plotly before the first figure of a session)."""
        from IPython.display import display
        from plotly.offline import get_plotlyjs

        display({"text/html": f"<script type=\"text/javascript\">{get_plotlyjs()}</script>"},
                raw=True, metadata=PLOTLYJS_METADATA)

    def to_mimebundle(self, fig_dict: dict) -> dict:
        """The JSON and HTML representations of one figure."""
        import plotly.io as pio

        bundle = self._json.to_mimebundle(dict(fig_dict))
        bundle["text/html"] = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False,
                                          full_html=False, validate=False, default_width="100%")
        return bundle


def configure_notebook_renderer() -> None:
    """Make ``fig.show()`` use :class:`OfflineNotebookRenderer`, so executed notebooks render offline.

    Under papermill plotly's default renderer stores only the figure JSON, which nbconvert's HTML drops, and
    plotly's ``notebook`` renderer loads MathJax from a CDN for every figure.

    Examples
    --------
    >>> import plotly.io as pio
    >>> from jule3d.app.plotting import configure_notebook_renderer
    >>> previous = pio.renderers.default
    >>> configure_notebook_renderer()
    >>> pio.renderers.default
    'jule3d'
    >>> pio.renderers.default = previous
    """
    import plotly.io as pio

    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = OfflineNotebookRenderer()
    pio.renderers.default = RENDERER


def label_colors(n_labels: int) -> list[str]:
    """Colours for labels ``1..n_labels`` (a qualitative palette, repeated when needed).

    Examples
    --------
    >>> from jule3d.app.plotting import label_colors
    >>> label_colors(3)
    ['#1f77b4', '#ff7f0e', '#2ca02c']
    >>> len(label_colors(12)), label_colors(12)[10] == label_colors(12)[0]
    (12, True)
    """
    return [_PALETTE[i % len(_PALETTE)] for i in range(n_labels)]


def _slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


def _center_indices(shape: Sequence[int], indices: Sequence[int] | None) -> tuple[int, int, int]:
    if indices is None:
        return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]
    if len(indices) != 3:
        raise ValueError(f"indices must be 3 slice positions (z, y, x), got {indices}")
    for i, (idx, size) in enumerate(zip(indices, shape)):
        if not 0 <= int(idx) < size:
            raise ValueError(f"indices[{i}]={idx} is outside the volume axis of size {size}")
    return tuple(int(i) for i in indices)  # type: ignore[return-value]


def _aspect(volume: Volume, axis: int) -> float:
    """Height/width ratio of one voxel on the displayed slice (rows, columns of the 2D array)."""
    sz = volume.geometry.spacing_zyx
    rows, cols = [a for a in range(3) if a != axis]
    return sz[rows] / sz[cols]


def _check_channel(channel: int, n_channels: int) -> None:
    if not 0 <= channel < n_channels:
        raise ValueError(f"channel={channel} but the data has {n_channels} channel(s)")


def _base_slices(volume: Volume, channel: int, indices: tuple[int, int, int], title: str) -> go.Figure:
    _check_channel(channel, volume.n_channels)
    fig = make_subplots(rows=1, cols=3, subplot_titles=[f"{n} = {i}" for n, i in zip(_AXES, indices)])
    data = volume.data[channel]
    fg = volume.foreground()
    lo, hi = np.percentile(np.asarray(data)[fg], [1, 99]) if fg.any() else (0.0, 1.0)
    for axis in range(3):
        img = np.asarray(_slice(data, axis, indices[axis]), dtype=np.float32)
        fig.add_trace(
            go.Heatmap(z=img, colorscale="Gray", zmin=float(lo), zmax=float(hi), showscale=False,
                       hovertemplate="row %{y}, col %{x}: %{z:.3g}<extra></extra>"),
            row=1, col=axis + 1,
        )
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{axis + 1}",
                         scaleratio=_aspect(volume, axis), row=1, col=axis + 1)
    fig.update_layout(title=title, height=380, margin=dict(l=10, r=10, t=60, b=10))
    return fig


def plot_orthogonal_slices(
    volume: Volume,
    indices: Sequence[int] | None = None,
    channel: int = 0,
    show_mask: bool = True,
    points: np.ndarray | None = None,
    point_halfwidth: int = 0,
    title: str = "Orthogonal slices",
) -> go.Figure:
    """Axial, coronal and sagittal slices, with the mask contour and optional points (e.g. patch centres).

    Parameters
    ----------
    volume : Volume
        The image; its first channel (or ``channel``) is shown in grey.
    indices : sequence of int, optional
        Slice positions ``(z, y, x)``; the volume centre by default.
    channel : int
        Channel to display.
    show_mask : bool
        Outline the foreground mask (if the volume has one).
    points : ndarray, optional
        ``(N, 3)`` voxel coordinates ``(z, y, x)``; those within ``point_halfwidth`` of a slice are drawn on it.
    point_halfwidth : int
        Distance (voxels) from a slice within which a point is drawn (half a patch shows every patch that
        the slice cuts).
    title : str
        Figure title.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.volume import Volume
    >>> data = np.arange(8 ** 3, dtype=np.float32).reshape(8, 8, 8)
    >>> mask = np.zeros((8, 8, 8), dtype=bool)
    >>> mask[2:6, 2:6, 2:6] = True
    >>> volume = Volume.from_array(data, mask=mask)
    >>> from jule3d.app.plotting import plot_orthogonal_slices
    >>> fig = plot_orthogonal_slices(volume, points=np.array([[4, 4, 4], [1, 4, 4]]), point_halfwidth=1)
    >>> [trace.type for trace in fig.data[:5]], len(fig.data)
    (['heatmap', 'heatmap', 'heatmap', 'contour', 'scatter'], 9)
    >>> fig.data[4].x.tolist(), fig.data[4].y.tolist()  # the point near the axial slice z = 4
    ([4], [4])
    """
    idx = _center_indices(volume.shape, indices)
    if points is not None and (np.ndim(points) != 2 or np.shape(points)[1] != 3):
        raise ValueError(f"points must have shape (N, 3) (z, y, x), got {np.shape(points)}")
    fig = _base_slices(volume, channel, idx, title)
    for axis in range(3):
        rows, cols = [a for a in range(3) if a != axis]
        if show_mask and volume.mask is not None:
            m = _slice(volume.mask, axis, idx[axis]).astype(np.float32)
            fig.add_trace(
                go.Contour(z=m, showscale=False, contours=dict(start=0.5, end=0.5, coloring="lines"),
                           line=dict(color="#00cc96", width=2), hoverinfo="skip", name="mask",
                           showlegend=axis == 0),
                row=1, col=axis + 1,
            )
        if points is not None and len(points):
            pts = np.asarray(points)
            near = np.abs(pts[:, axis] - idx[axis]) <= point_halfwidth
            fig.add_trace(
                go.Scatter(x=pts[near, cols], y=pts[near, rows], mode="markers", name="patch centres",
                           marker=dict(color="#ef553b", size=5, line=dict(width=0.5, color="white")),
                           showlegend=axis == 0),
                row=1, col=axis + 1,
            )
    return fig


def plot_label_slices(
    volume: Volume,
    labels: np.ndarray,
    indices: Sequence[int] | None = None,
    channel: int = 0,
    opacity: float = 0.45,
    slider_axis: int | None = 0,
    title: str = "Segmentation",
) -> go.Figure:
    """Orthogonal slices with a label overlay; optionally a slider that moves along ``slider_axis``.

    Parameters
    ----------
    volume : Volume
        The image shown underneath.
    labels : ndarray
        Integer label volume ``(Z, Y, X)``, 0 = background (transparent).
    indices : sequence of int, optional
        Slice positions ``(z, y, x)``; the volume centre by default.
    channel : int
        Channel of the image to display.
    opacity : float
        Opacity of the label colours.
    slider_axis : int or None
        Axis (0 = Z, 1 = Y, 2 = X) whose slice a slider moves, with about 20 steps; ``None`` for no slider.
    title : str
        Figure title.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.volume import Volume
    >>> data = np.arange(8 ** 3, dtype=np.float32).reshape(8, 8, 8)
    >>> mask = np.zeros((8, 8, 8), dtype=bool)
    >>> mask[2:6, 2:6, 2:6] = True
    >>> volume = Volume.from_array(data, mask=mask)
    >>> from jule3d.app.plotting import plot_label_slices
    >>> labels = mask.astype(np.uint8) + (data > 255) * mask
    >>> fig = plot_label_slices(volume, labels)
    >>> len(fig.data), [trace.name for trace in fig.data[6:]], len(fig.layout.sliders[0].steps)
    (8, ['class 1', 'class 2'], 8)
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the volume shape {volume.shape}")
    idx = _center_indices(volume.shape, indices)
    n_labels = int(labels.max()) if labels.size else 0
    colors = label_colors(max(n_labels, 1))
    # Discrete colour scale: 0 transparent, label l -> colors[l-1].
    scale = [[0.0, "rgba(0,0,0,0)"], [0.5 / (n_labels + 0.5), "rgba(0,0,0,0)"]]
    for lab in range(1, n_labels + 1):
        lo, hi = (lab - 0.5) / (n_labels + 0.5), (lab + 0.5) / (n_labels + 0.5)
        scale += [[lo, colors[lab - 1]], [min(hi, 1.0), colors[lab - 1]]]

    def overlay(axis: int, position: int) -> go.Heatmap:
        return go.Heatmap(z=_slice(labels, axis, position).astype(np.float32), colorscale=scale,
                          zmin=-0.5, zmax=n_labels + 0.5 if n_labels else 1, opacity=opacity,
                          showscale=False, hovertemplate="label %{z}<extra></extra>")

    fig = _base_slices(volume, channel, idx, title)
    for axis in range(3):
        fig.add_trace(overlay(axis, idx[axis]), row=1, col=axis + 1)
    for lab in range(1, n_labels + 1):  # legend entries
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"class {lab}",
                                 marker=dict(color=colors[lab - 1], size=10, symbol="square")))
    if slider_axis is not None:
        if slider_axis not in (0, 1, 2):
            raise ValueError(f"slider_axis must be 0, 1, 2 or None, got {slider_axis}")
        size = volume.shape[slider_axis]
        positions = np.unique(np.linspace(0, size - 1, min(size, 20)).round().astype(int))
        image_trace, label_trace = slider_axis, 3 + slider_axis  # traces: 3 images, then 3 overlays
        data = volume.data[channel]
        steps = []
        for pos in positions:
            steps.append(dict(
                method="restyle", label=str(pos),
                args=[{"z": [np.asarray(_slice(data, slider_axis, pos), dtype=np.float32),
                             _slice(labels, slider_axis, pos).astype(np.float32)]},
                      [image_trace, label_trace]],
            ))
        active = int(np.argmin(np.abs(positions - idx[slider_axis])))
        fig.update_layout(sliders=[dict(active=active, steps=steps, pad=dict(t=30),
                                        currentvalue=dict(prefix=f"{_AXES[slider_axis]} slice: "))],
                          height=460)
    return fig


def plot_patch_gallery(
    patches: np.ndarray,
    labels: np.ndarray | None = None,
    n_per_row: int = 8,
    max_patches: int = 32,
    channel: int = 0,
    seed: int = 0,
    label_name: str = "cluster",
    title: str = "Patches (central axial slice)",
) -> go.Figure:
    """A grid of patch thumbnails (central axial slice), optionally grouped by cluster label.

    Parameters
    ----------
    patches : ndarray
        ``(N, C, w, w, w)`` patches.
    labels : ndarray, optional
        ``(N,)`` cluster labels; when given, each row shows patches of one label.
    n_per_row : int
        Thumbnails per row.
    max_patches : int
        At most this many thumbnails without labels (a seeded random choice).
    channel : int
        Channel to show.
    seed : int
        Seed of the random choice of patches.
    label_name : str
        What a label is called in the row titles (``cluster``, ``class``).
    title : str
        Figure title.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.app.plotting import plot_patch_gallery
    >>> patches = np.random.default_rng(0).normal(size=(10, 1, 5, 5, 5)).astype(np.float32)
    >>> fig = plot_patch_gallery(patches, labels=np.array([0] * 4 + [1] * 6), n_per_row=4)
    >>> list(fig.layout.yaxis.ticktext), fig.data[0].z.shape
    (['cluster 0 (n=4)', 'cluster 1 (n=6)'], (14, 28))
    """
    patches = np.asarray(patches)
    if patches.ndim != 5:
        raise ValueError(f"patches must have shape (N, C, w, w, w), got {patches.shape}")
    _check_channel(channel, patches.shape[1])
    rng = np.random.default_rng(seed)
    if labels is None:
        chosen = rng.choice(len(patches), size=min(max_patches, len(patches)), replace=False)
        rows = [chosen[i:i + n_per_row] for i in range(0, len(chosen), n_per_row)]
        row_names = [""] * len(rows)
    else:
        labels = np.asarray(labels)
        if labels.shape != (len(patches),):
            raise ValueError(f"labels must have shape ({len(patches)},), got {labels.shape}")
        rows, row_names = [], []
        for lab in np.unique(labels):
            members = np.flatnonzero(labels == lab)
            rows.append(rng.choice(members, size=min(n_per_row, len(members)), replace=False))
            row_names.append(f"{label_name} {lab} (n={len(members)})")
    w = patches.shape[-1]
    gap = 2
    canvas = np.full((len(rows) * (w + gap), n_per_row * (w + gap)), np.nan, dtype=np.float32)
    for r, members in enumerate(rows):
        for c, i in enumerate(members):
            canvas[r * (w + gap): r * (w + gap) + w, c * (w + gap): c * (w + gap) + w] = patches[i, channel, w // 2]
    fig = go.Figure(go.Heatmap(z=canvas, colorscale="Gray", showscale=False, hoverinfo="skip"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=labels is not None,
                     tickvals=[r * (w + gap) + w / 2 for r in range(len(rows))], ticktext=row_names)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, height=max(200, 90 * len(rows) + 80), margin=dict(l=10, r=10, t=50, b=10))
    return fig


def plot_histograms(
    volume: Volume,
    regions: np.ndarray | None = None,
    region_names: Mapping[int, str] | None = None,
    channel: int = 0,
    bins: int = 100,
    skip: Sequence[int] = (),
    title: str = "Intensity histograms",
) -> go.Figure:
    """Intensity histograms per region (e.g. background vs foreground, or per ground-truth class).

    The histograms are computed here (shared bin edges over the 0.1-99.9 percentile range, densities) and
    drawn as lines, so the figure stays small whatever the volume size.

    Parameters
    ----------
    volume : Volume
        The image.
    regions : ndarray, optional
        Integer region map ``(Z, Y, X)``; by default the mask (0 = background, 1 = foreground).
    region_names : mapping, optional
        Display name per region id (default ``class <id>``).
    channel : int
        Channel to histogram.
    bins : int
        Number of bins.
    title : str
        Figure title.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.volume import Volume
    >>> data = np.arange(8 ** 3, dtype=np.float32).reshape(8, 8, 8)
    >>> mask = np.zeros((8, 8, 8), dtype=bool)
    >>> mask[2:6, 2:6, 2:6] = True
    >>> volume = Volume.from_array(data, mask=mask)
    >>> from jule3d.app.plotting import plot_histograms
    >>> [trace.name for trace in plot_histograms(volume, bins=20).data]
    ['background (448 voxels)', 'foreground (64 voxels)']
    >>> regions = mask.astype(np.uint8) + (data > 255) * mask
    >>> fig = plot_histograms(volume, regions=regions, region_names={1: "low"}, skip=[0], bins=20)
    >>> [trace.name for trace in fig.data], len(fig.data[0].x)
    (['low (32 voxels)', 'class 2 (32 voxels)'], 20)
    """
    _check_channel(channel, volume.n_channels)
    data = np.asarray(volume.data[channel])
    if regions is None:
        regions = volume.foreground().astype(np.uint8)
        region_names = region_names or {0: "background", 1: "foreground"}
    regions = np.asarray(regions)
    if regions.shape != volume.shape:
        raise ValueError(f"regions shape {regions.shape} does not match the volume shape {volume.shape}")
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    ids, counts = np.unique(regions, return_counts=True)
    keep = ~np.isin(ids, list(skip))
    if not keep.any():
        raise ValueError(f"skip={tuple(skip)} leaves no region to draw (regions: {ids.tolist()})")
    ids, counts = ids[keep], counts[keep]
    lo, hi = np.percentile(data[np.isin(regions, ids)], [0.1, 99.9])
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for rid, count in zip(ids, counts):
        density, _ = np.histogram(data[regions == rid], bins=edges, density=True)
        name = (region_names or {}).get(int(rid), f"class {rid}")
        fig.add_trace(go.Scatter(x=centres, y=density, mode="lines", line=dict(shape="hvh"),
                                 fill="tozeroy", opacity=0.6, name=f"{name} ({count:,} voxels)"))
    fig.update_layout(title=title, xaxis_title="intensity", yaxis_title="density",
                      height=350, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def plot_history(history: Sequence[Mapping[str, float]], title: str = "JULE training") -> go.Figure:
    """Cluster count, loss and (when present) NMI per period of a JULE run.

    Parameters
    ----------
    history : sequence of mapping
        One record per period with keys ``period``, ``n_clusters``, ``loss`` and optionally ``nmi``.
    title : str
        Figure title.

    Examples
    --------
    >>> from jule3d.app.plotting import plot_history
    >>> history = [{"period": 0, "n_clusters": 500, "loss": 0.3},
    ...            {"period": 1, "n_clusters": 50, "loss": 0.2, "nmi": 0.5},
    ...            {"period": 2, "n_clusters": 3, "loss": 0.1, "nmi": 0.7}]
    >>> [annotation.text for annotation in plot_history(history).layout.annotations]
    ['clusters', 'triplet loss', 'NMI vs ground truth']
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    period = [h["period"] for h in history]
    has_nmi = any(h.get("nmi") is not None for h in history)
    cols = 3 if has_nmi else 2
    names = ["clusters", "triplet loss", "NMI vs ground truth"][:cols]
    fig = make_subplots(rows=1, cols=cols, subplot_titles=names)
    fig.add_trace(go.Scatter(x=period, y=[h["n_clusters"] for h in history], mode="lines+markers",
                             name="clusters"), row=1, col=1)
    counts = sorted({int(h["n_clusters"]) for h in history})
    shown = counts if len(counts) <= 8 else [counts[round(i)] for i in np.linspace(0, len(counts) - 1, 8)]
    fig.update_yaxes(type="log", tickvals=shown, ticktext=[str(c) for c in shown], row=1, col=1)
    fig.add_trace(go.Scatter(x=period, y=[h.get("loss") for h in history], mode="lines+markers",
                             name="loss"), row=1, col=2)
    if has_nmi:
        fig.add_trace(go.Scatter(x=period, y=[h.get("nmi") for h in history], mode="lines+markers",
                                 name="NMI"), row=1, col=3)
        fig.update_yaxes(range=[0, 1], row=1, col=3)
    fig.update_xaxes(title_text="period")
    fig.update_layout(title=title, height=330, showlegend=False, margin=dict(l=10, r=10, t=60, b=10))
    return fig


def plot_label_meshes(
    labels: np.ndarray,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    max_faces: int = 60_000,
    opacity: float = 0.5,
    names: Mapping[int, str] | None = None,
    title: str = "3D rendering of the label surfaces",
) -> go.Figure:
    """Surfaces of each label (marching cubes) as plotly meshes: a 3D view that renders offline.

    Parameters
    ----------
    labels : ndarray
        Integer label volume ``(Z, Y, X)``; 0 is not drawn.
    spacing_zyx : sequence of float
        Voxel size in array order, so the rendering has physical proportions.
    max_faces : int
        Total triangle budget; labels are downsampled (by an integer factor) to stay under it.
    opacity : float
        Mesh opacity.
    names : mapping, optional
        Display name per label id.
    title : str
        Figure title.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.app.plotting import plot_label_meshes
    >>> labels = np.zeros((8, 8, 8), dtype=np.uint8)
    >>> labels[1:4, 1:7, 1:7] = 1
    >>> labels[4:7, 1:7, 1:7] = 2
    >>> fig = plot_label_meshes(labels, spacing_zyx=(2.0, 0.5, 0.5), names={1: "top"})
    >>> [(trace.type, trace.name) for trace in fig.data]
    [('mesh3d', 'top'), ('mesh3d', 'class 2')]
    """
    from skimage.measure import marching_cubes

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D (Z, Y, X), got shape {labels.shape}")
    if len(spacing_zyx) != 3:
        raise ValueError(f"spacing_zyx must have 3 entries (z, y, x), got {spacing_zyx}")
    ids = [int(i) for i in np.unique(labels) if i != 0]
    colors = label_colors(max(ids) if ids else 1)
    # Faces of a surface grow with the square of the resolution: pick a factor that keeps the total bounded.
    # Count the boundary voxel faces on the padded masks (as meshed below), so faces on the border count too.
    surface = sum(int(np.count_nonzero(np.diff(np.pad(labels == i, 1).astype(np.int8), axis=a)))
                  for i in ids for a in range(3))
    factor = max(1, int(np.ceil(np.sqrt(2 * surface / max(max_faces, 1)))))
    small = labels[::factor, ::factor, ::factor]
    spacing = np.asarray(spacing_zyx, dtype=float) * factor
    fig = go.Figure()
    for lab in ids:
        mask = np.pad(small == lab, 1)
        if mask.sum() == 0:
            continue
        verts, faces, _, _ = marching_cubes(mask.astype(np.float32), level=0.5, spacing=tuple(spacing))
        verts -= spacing  # undo the padding
        fig.add_trace(go.Mesh3d(
            x=verts[:, 2], y=verts[:, 1], z=verts[:, 0], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
            color=colors[lab - 1], opacity=opacity, name=(names or {}).get(lab, f"class {lab}"),
            showlegend=True, flatshading=True,
        ))
    fig.update_layout(title=title, height=550, scene=dict(aspectmode="data", xaxis_title="x (mm)",
                      yaxis_title="y (mm)", zaxis_title="z (mm)"), margin=dict(l=0, r=0, t=50, b=0))
    return fig


def plot_embedding(
    embedding: np.ndarray,
    color: np.ndarray,
    color_name: str = "cluster",
    hover: Mapping[str, np.ndarray] | None = None,
    title: str = "t-SNE of patch features",
) -> go.Figure:
    """2D scatter of an embedding coloured by a discrete label, with extra hover fields.

    Parameters
    ----------
    embedding : ndarray
        ``(N, 2)`` coordinates.
    color : ndarray
        ``(N,)`` discrete labels used for colour.
    color_name : str
        Legend title for the labels.
    hover : mapping, optional
        Extra per-point values (name -> ``(N,)`` array) shown on hover.
    title : str
        Figure title.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.app.plotting import plot_embedding
    >>> coords = np.random.default_rng(0).normal(size=(6, 2))
    >>> fig = plot_embedding(coords, np.array([0, 0, 1, 1, 2, 2]), hover={"patch": np.arange(6)})
    >>> [trace.name for trace in fig.data], fig.data[0].hovertemplate
    (['cluster 0', 'cluster 1', 'cluster 2'], 'patch: %{customdata[0]}<extra></extra>')
    """
    embedding = np.asarray(embedding)
    color = np.asarray(color)
    if embedding.ndim != 2 or embedding.shape[1] != 2:
        raise ValueError(f"embedding must have shape (N, 2), got {embedding.shape}")
    if color.shape != (len(embedding),):
        raise ValueError(f"color must have shape ({len(embedding)},), got {color.shape}")
    hover = dict(hover or {})
    fig = go.Figure()
    ids = np.unique(color)
    palette = label_colors(len(ids))
    for k, lab in enumerate(ids):
        sel = color == lab
        custom = np.stack([np.asarray(v)[sel] for v in hover.values()], axis=1) if hover else None
        template = "<br>".join(f"{name}: %{{customdata[{i}]}}" for i, name in enumerate(hover))
        fig.add_trace(go.Scattergl(
            x=embedding[sel, 0], y=embedding[sel, 1], mode="markers", name=f"{color_name} {lab}",
            marker=dict(size=4, color=palette[k], opacity=0.75), customdata=custom,
            hovertemplate=(template + "<extra></extra>") if hover else None,
        ))
    fig.update_layout(title=title, height=480, legend_title=color_name, margin=dict(l=10, r=10, t=50, b=10))
    return fig
