"""Every chapter in _toc.yml executes from a fresh kernel without error (no execution cache)."""
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def _chapters():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]
    return [ROOT / (f + ".ipynb") for f in files if (ROOT / (f + ".ipynb")).is_file()]


def test_toc_lists_existing_documents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    for f in [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]:
        assert any((ROOT / (f + ext)).is_file() for ext in (".md", ".ipynb")), f


def test_notebooks_are_committed_without_outputs():
    for nb_path in _chapters():
        nb = nbformat.read(nb_path, as_version=4)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), nb_path.name


def test_chapters_open_with_a_title_and_keep_prose_in_markdown():
    """A chapter whose text cells were written as commented-out code still executes, but renders
    without a title (no toc link) and with its prose in code boxes; catch both."""
    for nb_path in _chapters():
        nb = nbformat.read(nb_path, as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and first.source.startswith("# "), \
            f"{nb_path.name}: the first cell must be a markdown cell starting with the '# ' chapter title"
        for i, c in enumerate(nb.cells):
            if c.cell_type != "code":
                continue
            lines = [l for l in c.source.splitlines() if l.strip()]
            assert not lines or not all(l.startswith("#") for l in lines), \
                f"{nb_path.name}, cell {i}: a code cell holding only comments — prose belongs in a markdown cell"


@pytest.mark.parametrize("nb_path", _chapters(), ids=lambda p: p.name)
def test_chapter_executes(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(nb_path.parent)}}).execute()
