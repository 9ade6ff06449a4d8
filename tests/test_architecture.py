"""docs/architecture.md lists every module of the package, each once, and names no path that is gone."""

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
