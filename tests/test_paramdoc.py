"""docs/parameters.md is generated from the typed configuration and must be current."""

from conftest import REPO, load_repo_params

from ajepa.tools import paramdoc


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else k
        out |= _keys(v, path) if isinstance(v, dict) and v else {path}
    return out


def test_parameters_page_is_current():
    page = (REPO / "docs" / "parameters.md").read_text()
    assert page == paramdoc.render(REPO / "params.yaml"), "run `ajepa params-doc > docs/parameters.md`"


def test_every_key_is_documented_with_a_description():
    page = paramdoc.render(REPO / "params.yaml")
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[4].strip()
            for line in page.splitlines() if line.startswith("| `")}
    assert _keys(load_repo_params()) == set(rows)
    assert all(rows.values()), [k for k, v in rows.items() if not v]
