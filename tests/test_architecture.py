"""docs/architecture.md lists every module of the package, each once, and names no path that is gone."""

import ast
import re

from conftest import REPO

DOC = REPO / "docs" / "architecture.md"


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_every_module_is_listed_once_and_every_listed_module_exists():
    listed = re.findall(r"^- `(ajepa/[\w/]+\.py)`: \S", _section(DOC.read_text(), "Modules"), re.M)
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ajepa").rglob("*.py")
               if p.name != "__init__.py" or p.parent == REPO / "ajepa"}
    assert sorted(m for m in modules if m not in listed) == [], "modules without their line in docs/architecture.md"
    assert sorted(m for m in listed if m not in modules) == [], "lines in docs/architecture.md for no module"
    assert len(listed) == len(set(listed)), "a module listed twice"


def test_every_package_and_path_the_page_names_exists():
    text = DOC.read_text()
    packages = {p.parent.relative_to(REPO).as_posix() + "/" for p in (REPO / "ajepa").glob("*/__init__.py")}
    named = set(re.findall(r"`(ajepa/[\w/.]*)`", text))
    assert packages <= named, f"packages the page does not name: {sorted(packages - named)}"
    assert sorted(p for p in named if "NAME" not in p and not (REPO / p).exists()) == []


# The layers of docs/architecture.md, top down, by the module's first name under ajepa/ (the rest:
# the foundation; the package itself, which hands out `ajepa.load_encoder`, above them all). config.py's
# read of the dataset registry and checksum format is the page's one exception.
LAYERS = [{"cli"}, {"stages", "tools", "plots"}, {"train", "downstream"}, {"encoder", "hear", "export"},
          {"datasets", "data", "masks", "models"}]
EXCEPTIONS = {("ajepa.config", "ajepa.datasets.registry"), ("ajepa.config", "ajepa.datasets.download")}


def _layer(module: str) -> int:
    if module == "ajepa":
        return -1
    first = module.split(".")[1]
    return next((i for i, names in enumerate(LAYERS) if first in names), len(LAYERS))


def test_imports_point_down_the_layers():
    upward = []
    for path in sorted((REPO / "ajepa").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("ajepa"):
                continue
            targets = [f"ajepa.{a.name}" for a in node.names] if node.module == "ajepa" else [node.module]
            upward += [f"{module} -> {t}" for t in targets
                       if t != "ajepa.__version__" and _layer(t) < _layer(module) and (module, t) not in EXCEPTIONS]
    assert upward == []
