"""The chapter writers' one notebook builder: ``CELLS`` entries are ``(kind, source[, tags[, figure]])``."""
import nbformat

MD, CODE = "markdown", "code"


def write(cells, out, typed_numbers: dict | None = None) -> None:
    """Write ``cells`` as a notebook at ``out``; ``figure`` becomes the cell's ``mystnb.figure`` (name, caption) and
    ``typed_numbers`` the settings the book's typed-number check accepts in its prose."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src, *rest in cells:
        cell = nbformat.v4.new_markdown_cell(src) if kind == MD else nbformat.v4.new_code_cell(src)
        if rest and rest[0]:
            cell.metadata["tags"] = list(rest[0])
        if len(rest) > 1 and rest[1]:
            cell.metadata["mystnb"] = {"figure": rest[1]}
        nb.cells.append(cell)
    if typed_numbers:
        nb.metadata["book"] = {"typed_numbers": dict(typed_numbers)}
    nbformat.write(nb, out)
    print("wrote", out)
