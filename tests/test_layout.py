"""The package's shape: generic modules never import a chapter module (helpers/chapters/)."""
import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def imports(path: Path) -> set[str]:
    """The helpers modules ``path`` imports (relative or absolute), as dotted names below ``helpers``."""
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(HELPERS).parent.parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("helpers"):
                mod = node.module.split(".")[1:]
            else:
                continue
            for a in node.names:
                out.add(".".join(mod + [a.name]) if not node.module or node.level and not node.module else
                        ".".join(mod))
                if not node.module:
                    out.add(".".join(mod + [a.name]))
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("helpers.")}
    return out


def test_no_generic_module_imports_a_chapter_module():
    generic = [p for p in HELPERS.glob("*.py")]
    assert any(p.name == "runner.py" for p in generic) and any(p.name == "pipeline.py" for p in generic)
    for p in generic:
        bad = [m for m in imports(p) if m == "chapters" or m.startswith("chapters.")]
        assert not bad, f"{p.name} imports chapter module(s) {bad}"


def test_the_import_check_sees_chapter_imports():
    """The check above must be able to fail: a chapter module importing its sibling is seen."""
    assert "chapters.dissect" in imports(HELPERS / "chapters" / "identify.py")


# The floors of ../shared/DESIGN.md (and README's layout row): a module imports only from its floor or below.
FLOORS = {
    "world": 1, "metrics": 1, "io": 1, "plots": 1, "tables": 1, "cache": 1, "tiny": 1,
    "hooks": 2, "sae": 2, "probe": 2, "widgets": 2, "guided": 2,
    "models": 3, "attribution": 3,
    "intervention": 4, "patching": 4, "judge": 4, "judges": 4, "minisd": 4,
    "harvest": 5, "baselines": 5,
    "pipeline": 6,
    "runner": 7, "__main__": 7, "__init__": 7,
}


def test_modules_import_only_from_their_floor_or_below():
    for p in HELPERS.glob("*.py"):
        assert p.stem in FLOORS, f"{p.name} has no floor; add it to FLOORS (and README's layout)"
        for m in imports(p):
            top = m.split(".")[0]
            if top in FLOORS:
                assert FLOORS[top] <= FLOORS[p.stem], f"{p.stem} (floor {FLOORS[p.stem]}) imports {top} (floor {FLOORS[top]})"
