"""The β slider works in the *static* book: build a one-page book with the project's config, open
it in headless Chromium with no kernel and no network, move the slider, and check the shown image
changes. Needs Debian's chromium (``apt-get install chromium``; ``.ci/run`` installs it)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CELL = """
import torch
from helpers import widgets
frames = {f"{b:g}": widgets.grid_png(torch.full((2, 3, 8, 8), v) * torch.tensor([1.0, 0.5, 0.2])[:, None, None],
                                     nrow=2, title=f"beta {b:g}")
          for b, v in [(0.0, 0.1), (1.0, 0.5), (2.0, 0.9)]}
widgets.beta_slider(frames, description="β")
"""


def build_mini_book(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    cfg["execute"]["execute_notebooks"] = "force"
    (tmp / "_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # script order matters
    (tmp / "_toc.yml").write_text("format: jb-book\nroot: slider\n")
    shutil.copytree(ROOT / "widgets_js", tmp / "widgets_js")
    for f in cfg.get("bibtex_bibfiles", []):  # files the project's config names must exist in the mini book too
        shutil.copy(ROOT / f, tmp / f)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Slider"), nbformat.v4.new_code_cell(CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp / "slider.ipynb")
    jb = Path(sys.executable).with_name("jupyter-book")
    r = subprocess.run([str(jb), "build", str(tmp), "-W", "--keep-going"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "_build" / "html"


def test_static_slider_switches_frames_without_kernel(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("DIFFLENS_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (DIFFLENS_REQUIRE_BROWSER is set): apt-get install chromium")
        pytest.skip("needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    html = build_mini_book(tmp_path / "book")
    page_html = (html / "slider.html").read_text()
    assert "application/vnd.jupyter.widget-state+json" in page_html  # widget state embedded in the page
    assert "cdn.jsdelivr" not in page_html and "cdnjs" not in page_html  # JS served by the book itself
    from helpers import widgets
    got = widgets.check_static_slider(html, "slider.html", CHROMIUM)
    before, after, last = got["frames"]
    assert before != after != last and before != last, "moving the slider did not change the shown frame"
    assert got["readout"] == "2", got["readout"]
