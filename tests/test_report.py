"""The HTML report from executed notebooks, and static figure export (unit tests on synthetic notebooks)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import pytest

from jule3d.app.plotting import PLOTLYJS_METADATA, OfflineNotebookRenderer
from jule3d.app.report import (
    Headline,
    build_report,
    check_figure_formats,
    export_figures,
    notebook_figures,
)


def _figure_output(fig: go.Figure) -> nbformat.NotebookNode:
    bundle = OfflineNotebookRenderer().to_mimebundle(fig.to_dict())
    return nbformat.v4.new_output("display_data", data=bundle)


def _executed(tmp_path: Path, name: str = "01_demo.ipynb", n_figures: int = 2) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# 01 · Demo\n\n## Results\n\n| a | b |\n|---|---|\n| 1 | 2 |"))
    code = nbformat.v4.new_code_cell("secret_code_line()")
    code.outputs = [
        nbformat.v4.new_output("display_data", data={"text/html": "<script>/* plotly.js */</script>"},
                               metadata=PLOTLYJS_METADATA),
        nbformat.v4.new_output("stream", name="stderr", text="JULE:  40%|####      | 4/10 [00:01<00:02, 3.1epoch/s]\n"),
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: something a user must see\n"),
        nbformat.v4.new_output("stream", name="stdout", text="segmented in 1.0 s\n"),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "x"},
                                                    "text/plain": "JULE: 0epoch [00:00, ?epoch/s]"}),
        nbformat.v4.new_output("execute_result", data={"text/html": "<table class='dataframe'><tr><td>7</td></tr></table>"},
                               execution_count=1),
    ] + [_figure_output(go.Figure(go.Scatter(x=[0, 1], y=[i, i + 1]))) for i in range(n_figures)]
    nb.cells.append(code)
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_report_has_every_figure_once_and_nothing_remote(tmp_path: Path) -> None:
    executed = [_executed(tmp_path, "01_a.ipynb", 2), _executed(tmp_path, "02_b.ipynb", 3)]
    assert notebook_figures(executed) == 5
    headline = Headline(methods={"jule3d": {"nmi": 0.9, "seconds": 3.0}, "kmeans": {"nmi": 0.1, "seconds": 1.0}},
                        class_volumes_mm3={"1": 3.0, "2": 1.0}, seconds={"01_a.ipynb": 2.0})
    out = build_report(executed, tmp_path / "report.html", {"seed": 0}, headline=headline)
    page = out.read_text(encoding="utf-8")
    assert page.count('class="figure"') == 5 and page.count("Plotly.newPlot") == 5
    assert page.count("/* plotly.js */") == 0, "the notebooks' own plotly.js copies are left out"
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|@import", page)
    assert "secret_code_line" not in page, "code is hidden"
    assert "epoch/s" not in page, "progress bars (stderr lines and widgets) are left out"
    assert "something a user must see" in page and "segmented in 1.0 s" in page
    assert "<td>1</td>" in page and "class='dataframe'" in page, "markdown and DataFrame tables are HTML tables"
    assert re.search(r'<td class="best">0\.900</td>', page), "the best NMI is marked in the headline"
    assert "0.750" in page, "class fractions"
    toc = page[page.index('<nav class="toc">'):page.index("</nav>")]
    assert "01 · Demo" in toc and "Results" in toc and "&amp;#" not in toc
    assert not list(tmp_path.glob("*.tmp"))


def test_report_into_an_unwritable_place_leaves_nothing(tmp_path: Path) -> None:
    executed = [_executed(tmp_path)]
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(OSError):
        build_report(executed, blocker / "report.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_demo.ipynb", "file"]


def test_figure_formats_are_checked() -> None:
    with pytest.raises(ValueError, match="not supported; choose from"):
        check_figure_formats(["gif"])
    check_figure_formats([])


@pytest.mark.skipif(not (os.environ.get("BROWSER_PATH") or __import__("shutil").which("chromium")),
                    reason="static figures need Chrome or Chromium (apt-get install chromium)")
def test_export_figures_writes_one_image_per_figure(tmp_path: Path) -> None:
    executed = [_executed(tmp_path, "01_a.ipynb", 2), _executed(tmp_path, "04_b.ipynb", 1)]
    files = export_figures(executed, tmp_path / "figures", ["png", "svg"])
    assert [f.name for f in files] == ["01_01.png", "01_02.png", "04_01.png", "01_01.svg", "01_02.svg", "04_01.svg"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files if f.suffix == ".png")
    assert all(b"<svg" in f.read_bytes()[:2000] for f in files if f.suffix == ".svg")
    assert not (tmp_path / "figures.tmp").exists()
