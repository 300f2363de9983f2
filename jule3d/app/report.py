"""One self-contained HTML report from the executed pipeline notebooks.

The report holds every figure every notebook produced, drawn by one inlined copy of plotly.js, and nothing
that loads from elsewhere: no CDN script, style or font. Code is hidden; markdown becomes HTML (tables
included); tables the notebooks displayed (pandas) stay HTML tables; text output wraps instead of running
off the page; progress-bar lines are left out. A table of contents and the headline numbers (NMI next to
every baseline, class volumes, seconds) come first.

Figures are taken from the plotly JSON each figure output carries (see
:class:`jule3d.app.plotting.OfflineNotebookRenderer`), never guessed from the size or text of an HTML output.
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = [
    "FIGURE_FORMATS",
    "PLOTLY_MIME",
    "Headline",
    "build_report",
    "check_figure_formats",
    "export_figures",
    "headline_from",
    "iter_figure_outputs",
    "notebook_figures",
]

#: MIME type of a plotly figure in a notebook output.
PLOTLY_MIME = "application/vnd.plotly.v1+json"
#: Static image formats :func:`export_figures` writes (through kaleido and a Chrome/Chromium).
FIGURE_FORMATS = ("png", "svg", "pdf")
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_PROGRESS = re.compile(r"\r|\d+%\|.*\||\[\d\d:\d\d[<,]|it/s\]|\?\w+/s\]")
_HEADING = re.compile(r"<h([1-3])(?: [^>]*)?>(.*?)</h\1>", re.S)
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.S)

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1b1b1b;
       line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; margin-top: 2.5rem; }
h2 { margin-top: 2rem; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f8fa; padding: .6rem .8rem;
      border-radius: 4px; font-size: .85rem; }
pre.stderr { background: #fff7e6; }
pre.error { background: #fdecea; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th, tr:first-child th { background: #f6f8fa; }
nav.toc { background: #f6f8fa; padding: .6rem 1.2rem; border-radius: 4px; }
nav.toc ul { margin: .2rem 0; }
.figure { margin: .6rem 0 1.2rem; }
.headline td.best { font-weight: bold; }
img { max-width: 100%; }
"""


@dataclass
class Headline:
    """The numbers shown first: method scores, class volumes and seconds.

    Parameters
    ----------
    methods : mapping
        Method name -> its metrics row (``nmi``, ``ari``, ``dice_mean``, ``seconds``, ...), JULE-3D first.
    class_volumes_mm3 : mapping
        Class id -> volume in mm³ of JULE-3D's labels.
    seconds : mapping
        Stage (notebook) -> wall seconds.

    Examples
    --------
    >>> from jule3d.app.report import Headline
    >>> headline = Headline(methods={"jule3d": {"nmi": 0.9}, "kmeans": {"nmi": 0.5}})
    >>> list(headline.methods), headline.seconds
    (['jule3d', 'kmeans'], {})
    """

    methods: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    class_volumes_mm3: Mapping[str, float] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)


def iter_figure_outputs(notebook: Any) -> Iterator[dict]:
    """The plotly figures (as JSON dicts) of an executed notebook, in order.

    Parameters
    ----------
    notebook : nbformat.NotebookNode
        An executed notebook.

    Examples
    --------
    >>> import nbformat.v4 as nbf
    >>> from jule3d.app.report import PLOTLY_MIME
    >>> figure = {"data": [{"type": "scatter", "x": [0, 1], "y": [1, 0]}], "layout": {}}
    >>> notebook = nbf.new_notebook(cells=[
    ...     nbf.new_markdown_cell("# Results"),
    ...     nbf.new_code_cell("fig", outputs=[nbf.new_output("display_data", data={PLOTLY_MIME: figure})])])
    >>> from jule3d.app.report import iter_figure_outputs
    >>> [f["data"][0]["type"] for f in iter_figure_outputs(notebook)]
    ['scatter']
    """
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            figure = output.get("data", {}).get(PLOTLY_MIME)
            if figure is not None:
                yield figure


def notebook_figures(paths: Sequence[str | os.PathLike]) -> int:
    """How many plotly figures the executed notebooks at ``paths`` hold (what the report must draw).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import nbformat
    >>> import nbformat.v4 as nbf
    >>> from jule3d.app.report import PLOTLY_MIME
    >>> figure = {"data": [{"type": "scatter", "x": [0, 1], "y": [1, 0]}], "layout": {}}
    >>> notebook = nbf.new_notebook(cells=[
    ...     nbf.new_markdown_cell("# Results"),
    ...     nbf.new_code_cell("fig", outputs=[nbf.new_output("display_data", data={PLOTLY_MIME: figure})])])
    >>> from jule3d.app.report import notebook_figures
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "01_results.ipynb"
    ...     nbformat.write(notebook, str(path))
    ...     print(notebook_figures([path, path]))
    2
    """
    import nbformat

    return sum(sum(1 for _ in iter_figure_outputs(nbformat.read(str(p), as_version=4))) for p in paths)


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _stream(output: Mapping[str, Any]) -> str:
    lines = [line for line in _text(output.get("text", "")).splitlines() if line.strip()]
    if output.get("name") == "stderr":
        lines = [line for line in lines if not _PROGRESS.search(line)]
    if not lines:
        return ""
    css = "stderr" if output.get("name") == "stderr" else "stdout"
    return f'<pre class="{css}">{html.escape(chr(10).join(lines))}</pre>'


class _Renderer:
    """Turns notebook cells into report HTML, numbering figures and collecting headings."""

    def __init__(self) -> None:
        self.n_figures = 0
        self.headings: list[tuple[int, str, str]] = []

    def figure(self, figure: Mapping[str, Any]) -> str:
        import plotly.io as pio

        self.n_figures += 1
        div = pio.to_html(dict(figure), include_plotlyjs=False, include_mathjax=False, full_html=False,
                          validate=False, default_width="100%", div_id=f"figure-{self.n_figures}")
        return f'<div class="figure">{div}</div>'

    def output(self, output: Mapping[str, Any]) -> str:
        from .plotting import PLOTLYJS_METADATA

        kind = output.get("output_type")
        if kind == "stream":
            return _stream(output)
        if kind == "error":
            return f'<pre class="error">{html.escape(output.get("ename", ""))}: {html.escape(output.get("evalue", ""))}</pre>'
        data = output.get("data", {})
        if output.get("metadata", {}).get("jule3d") == PLOTLYJS_METADATA["jule3d"]:
            return ""  # the notebook's own copy of plotly.js: the report inlines one for all
        if PLOTLY_MIME in data:
            return self.figure(data[PLOTLY_MIME])
        if _WIDGET_MIME in data:
            return ""  # a live widget (progress bar, slider) has no static form
        if "text/html" in data:
            return f'<div class="output">{_text(data["text/html"])}</div>'
        for mime in ("image/png", "image/jpeg"):
            if mime in data:
                return f'<img src="data:{mime};base64,{_text(data[mime]).strip()}" alt="figure">'
        if "image/svg+xml" in data:
            return _text(data["image/svg+xml"])
        if "text/plain" in data:
            return f"<pre>{html.escape(_text(data['text/plain']))}</pre>"
        return ""

    def markdown(self, source: str, anchor_prefix: str) -> str:
        from nbconvert.filters import markdown2html

        body = markdown2html(source)

        def anchor(match: re.Match) -> str:
            level, inner = int(match.group(1)), _ANCHOR_LINK.sub("", match.group(2))
            anchor_id = f"{anchor_prefix}-{len(self.headings) + 1}"
            self.headings.append((level, anchor_id, html.unescape(re.sub(r"<[^>]+>", "", inner)).strip()))
            return f'<h{level} id="{anchor_id}">{inner}</h{level}>'

        return _HEADING.sub(anchor, body)


def _toc(headings: Sequence[tuple[int, str, str]]) -> str:
    items, open_sub = [], False
    for level, anchor_id, text in headings:
        if level == 1:
            if open_sub:
                items.append("</ul></li>")
            elif items:
                items.append("</li>")
            items.append(f'<li><a href="#{anchor_id}">{html.escape(text)}</a>')
            open_sub = False
        elif level == 2:
            if not open_sub:
                items.append("<ul>")
                open_sub = True
            items.append(f'<li><a href="#{anchor_id}">{html.escape(text)}</a></li>')
    if items:
        items.append("</ul></li>" if open_sub else "</li>")
    return '<nav class="toc"><strong>Contents</strong><ul>' + "".join(items) + "</ul></nav>"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def _headline(headline: Headline | None, parameters: Mapping[str, Any]) -> str:
    import yaml

    parts = []
    if headline is not None and headline.methods:
        columns = [("nmi", "NMI"), ("ari", "ARI"), ("dice_mean", "matched Dice"), ("seconds", "seconds")]
        best = max((row.get("nmi", float("-inf")) for row in headline.methods.values()), default=None)
        rows = []
        for name, row in headline.methods.items():
            cells = "".join(
                f'<td class="{"best" if key == "nmi" and row.get(key) == best else ""}">'
                f'{_fmt(row.get(key), 1 if key == "seconds" else 3)}</td>' for key, _ in columns)
            rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
        parts.append("<h3>Against the ground truth (same voxels, same k)</h3><table><tr><th>method</th>"
                     + "".join(f"<th>{h}</th>" for _, h in columns) + "</tr>" + "".join(rows) + "</table>")
    if headline is not None and headline.class_volumes_mm3:
        total = sum(headline.class_volumes_mm3.values()) or 1.0
        rows = "".join(f"<tr><td>class {html.escape(str(k))}</td><td>{v:.1f}</td><td>{v / total:.3f}</td></tr>"
                       for k, v in headline.class_volumes_mm3.items())
        parts.append("<h3>JULE-3D class volumes</h3><table><tr><th>class</th><th>mm³</th><th>fraction</th></tr>"
                     + rows + "</table>")
    if headline is not None and headline.seconds:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in headline.seconds.items())
        total = sum(headline.seconds.values())
        parts.append("<h3>Seconds</h3><table><tr><th>stage</th><th>wall s</th></tr>" + rows
                     + f"<tr><th>total</th><th>{total:.1f}</th></tr></table>")
    params = yaml.safe_dump(dict(parameters), sort_keys=True).strip() or "{}"
    parts.append(f"<h3>Parameters</h3><pre>{html.escape(params)}</pre>")
    return "".join(parts)


def build_report(
    executed: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    parameters: Mapping[str, Any] | None = None,
    headline: Headline | None = None,
    title: str = "jule3d report",
) -> Path:
    """Merge executed notebooks into one self-contained HTML report.

    Parameters
    ----------
    executed : sequence of path
        Executed notebooks, in pipeline order.
    out : path
        The HTML file to write (atomically: a failure leaves no partial file).
    parameters : mapping, optional
        The run's parameters, listed under the headline numbers.
    headline : Headline, optional
        Numbers shown first (scores, class volumes, seconds).
    title : str
        Page title and first heading.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    PermissionError, OSError
        When ``out``'s folder cannot be written (nothing is left behind).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import nbformat
    >>> import nbformat.v4 as nbf
    >>> from jule3d.app.report import PLOTLY_MIME
    >>> figure = {"data": [{"type": "scatter", "x": [0, 1], "y": [1, 0]}], "layout": {}}
    >>> notebook = nbf.new_notebook(cells=[
    ...     nbf.new_markdown_cell("# Results"),
    ...     nbf.new_code_cell("fig", outputs=[nbf.new_output("display_data", data={PLOTLY_MIME: figure})])])
    >>> from jule3d.app.report import Headline, build_report
    >>> headline = Headline(methods={"jule3d": {"nmi": 0.9, "seconds": 12.0}, "kmeans": {"nmi": 0.5}})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "01_results.ipynb"
    ...     nbformat.write(notebook, str(path))
    ...     out = build_report([path], Path(folder) / "report.html", parameters={"k": 3}, headline=headline)
    ...     page = out.read_text(encoding="utf-8")
    >>> out.name, "1 figures from 1 notebooks" in page, 'id="figure-1"' in page, 'src="http' in page
    ('report.html', True, True, False)
    >>> '<td class="best">0.900</td>' in page, '<a href="#01-1">Results</a>' in page
    (True, True)
    """
    import nbformat
    from plotly.offline import get_plotlyjs

    out = Path(out)
    renderer = _Renderer()
    sections = []
    for path in executed:
        nb = nbformat.read(str(path), as_version=4)
        prefix = Path(path).stem[:2]
        parts = []
        for cell in nb.cells:
            tags = cell.metadata.get("tags", [])
            if "injected-parameters" in tags or "parameters" in tags:
                continue
            if cell.cell_type == "markdown":
                parts.append(renderer.markdown(cell.source, prefix))
            elif cell.cell_type == "code":
                parts.extend(renderer.output(o) for o in cell.get("outputs", []))
        sections.append(f'<section id="notebook-{prefix}">' + "".join(parts) + "</section>")
    summary_id = "summary"
    toc = _toc([(1, summary_id, "Summary")] + renderer.headings)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body><main>"
        f"<h1 id=\"{summary_id}\">{html.escape(title)}</h1>"
        f"<p>{renderer.n_figures} figures from {len(sections)} notebooks.</p>"
        f"{toc}{_headline(headline, parameters or {})}{''.join(sections)}</main></body></html>\n"
    )
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return out


def headline_from(metrics: Mapping[str, Any] | None, seconds: Mapping[str, float]) -> Headline:
    """The :class:`Headline` of a run from its ``metrics.json`` record and per-notebook seconds.

    Examples
    --------
    >>> from jule3d.app.report import headline_from
    >>> metrics = {"methods": {"jule3d": {"nmi": 0.9}}, "class_volumes_mm3": {"1": 12.5}}
    >>> headline = headline_from(metrics, {"01_load": 3.0})
    >>> headline.methods, headline.class_volumes_mm3, headline.seconds
    ({'jule3d': {'nmi': 0.9}}, {'1': 12.5}, {'01_load': 3.0})
    >>> headline_from(None, {}).methods
    {}
    """
    metrics = metrics or {}
    return Headline(methods=dict(metrics.get("methods", {})),
                    class_volumes_mm3=dict(metrics.get("class_volumes_mm3", {})), seconds=dict(seconds))


def check_figure_formats(formats: Sequence[str]) -> None:
    """Refuse unknown static formats, and any format when no Chrome/Chromium is there to draw them.

    Called before a run starts, so a missing browser is reported in a second, not after the notebooks ran.

    Raises
    ------
    ValueError
        An unknown format (the message lists the known ones).
    RuntimeError
        No Chrome or Chromium for kaleido (the message says how to get one).

    Examples
    --------
    >>> from jule3d.app.report import check_figure_formats
    >>> check_figure_formats([])  # no static figures: nothing to check
    >>> try:
    ...     check_figure_formats(["gif"])
    ... except ValueError as error:
    ...     print(error)
    figure formats ['gif'] are not supported; choose from ['png', 'svg', 'pdf']
    """
    unknown = sorted(set(formats) - set(FIGURE_FORMATS))
    if unknown:
        raise ValueError(f"figure formats {unknown} are not supported; choose from {list(FIGURE_FORMATS)}")
    if not formats:
        return
    from choreographer.browsers.chromium import Chromium

    if Chromium.find_browser(skip_local=False) is None:
        raise RuntimeError(
            "static figures need Chrome or Chromium (kaleido draws them with it) and none was found: install one "
            "(Debian/Ubuntu: apt-get install chromium; or run plotly_get_chrome) or set BROWSER_PATH to it"
        )


def export_figures(
    executed: Sequence[str | os.PathLike], folder: str | os.PathLike, formats: Sequence[str] = ("png",),
    scale: float = 2.0,
) -> list[Path]:
    """Save every figure of the executed notebooks as static images, for papers and slides.

    Files are named ``<notebook number>_<figure number>.<format>`` (``04_03.png``: the third figure of
    notebook 04), in the order the report shows them. The images are written into a temporary folder that
    replaces ``folder`` only when all of them succeeded.

    Parameters
    ----------
    executed : sequence of path
        Executed notebooks.
    folder : path
        Output folder (replaced as a whole).
    formats : sequence of str
        Any of :data:`FIGURE_FORMATS`.
    scale : float
        Pixel density of raster images (2 = twice the on-screen size).

    Returns
    -------
    list of pathlib.Path
        The files written.

    Examples
    --------
    Without formats nothing is drawn, so no browser is needed (``formats=("png",)`` needs Chrome or
    Chromium, see :func:`check_figure_formats`):

    >>> import tempfile
    >>> from pathlib import Path
    >>> import nbformat
    >>> import nbformat.v4 as nbf
    >>> from jule3d.app.report import PLOTLY_MIME
    >>> figure = {"data": [{"type": "scatter", "x": [0, 1], "y": [1, 0]}], "layout": {}}
    >>> notebook = nbf.new_notebook(cells=[
    ...     nbf.new_markdown_cell("# Results"),
    ...     nbf.new_code_cell("fig", outputs=[nbf.new_output("display_data", data={PLOTLY_MIME: figure})])])
    >>> from jule3d.app.report import export_figures
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "01_results.ipynb"
    ...     nbformat.write(notebook, str(path))
    ...     print(export_figures([path], Path(folder) / "figures", formats=()), (Path(folder) / "figures").is_dir())
    [] True
    """
    import shutil

    import nbformat
    import plotly.io as pio

    check_figure_formats(formats)
    folder = Path(folder)
    figures, names = [], []
    for path in executed:
        nb = nbformat.read(str(path), as_version=4)
        for i, figure in enumerate(iter_figure_outputs(nb), start=1):
            figures.append(figure)
            names.append(f"{Path(path).stem[:2]}_{i:02d}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = [tmp / f"{name}.{fmt}" for fmt in formats for name in names]
        if files:
            pio.write_images([f for _ in formats for f in figures], files, scale=scale, validate=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return [folder / f.name for f in files]
