"""params.yaml in the layout `dvc exp run -S` writes, so that setting one key changes one line.

`dvc exp run -S key=value` loads params.yaml with ruamel's round-trip loader, turns every list into a
plain Python list (Hydra's OmegaConf sees plain values only), merges the result back into the loaded
document and dumps it with ruamel's defaults (DVC's `dvc.utils.serialize._yaml`; treeverse/dvc#8720).
So every list, set or not, comes out one item per line, and `null` as an empty value; comments stay.
A file already in that layout is a fixed point: DVC's rewrite then touches only the keys it sets.
`ajepa params-format` puts params.yaml in that layout (after a merge that added keys in another
style); tests/test_experiments.py checks the file against DVC's own rewrite.
"""

from __future__ import annotations

import io
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ajepa.atomic import write_text
from ajepa.errors import ConfigError


def load(text: str, source: str):
    """The round-trip document (comments and key order kept), as DVC loads it for an update."""
    try:
        return YAML(typ="rt").load(text) or {}
    except YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None


def dump(doc) -> str:
    """`doc` as DVC's dumper writes it after a `-S` run (the document is changed in place)."""
    _as_dvc_merges(doc)
    yaml = YAML()
    yaml.default_flow_style = False
    # a new plain float (from a preset) as 1.0e-06, not 1e-06, which YAML 1.1 readers such as PyYAML take
    # for a string; floats read from the file keep their spelling (DVC writes them back as read)
    yaml.representer.add_representer(float, _represent_float)
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def formatted(text: str, source: str = "params.yaml") -> str:
    return dump(load(text, source))


def format_file(path: str | Path, check: bool = False) -> bool:
    """Rewrite `path` in DVC's layout (atomically); True when it was not in it. With `check`, write nothing."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root or pass --params)") from None
    new = formatted(text, str(path))
    if new != text and not check:
        write_text(path, new)
    return new != text


def _as_dvc_merges(node: dict) -> None:
    """What DVC's merge of OmegaConf's output does to a section: lists replaced by plain lists (block
    style; a comment that followed a flow list stays on the key's line), scalars and sections kept."""
    for key, value in node.items():
        if isinstance(value, dict):
            _as_dvc_merges(value)
        elif isinstance(value, list):
            node[key] = _plain(value)


def _plain(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _represent_float(representer, value: float):
    if value != value or value in (float("inf"), float("-inf")):
        text = ".nan" if value != value else (".inf" if value > 0 else "-.inf")
    else:
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)
