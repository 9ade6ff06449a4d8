"""Presets: named sets of params.yaml values, merged into params.yaml by `ajepa preset NAME`.

A preset (presets/NAME.yaml) holds only the keys whose values differ from the embedded default.
Merging walks the preset: a mapping merges key by key, anything else (number, string, list)
replaces the value in params.yaml. A preset may not add keys: a key that params.yaml lacks is
an error rather than a value nobody reads, and the merged parameters must pass the same
validation as every stage before params.yaml is rewritten (atomically, keeping its comments and
layout, as `dvc exp run -S` does).

Presets are applied to whatever params.yaml holds, so apply one to the committed default
(`git checkout params.yaml` first) rather than on top of another preset.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError as RuamelError

from ajepa.atomic import write_text
from ajepa.config import PARAMS_FILE, parse_params, read_yaml
from ajepa.errors import AjepaError, ConfigError

PRESET_DIR = Path("presets")


@dataclass(frozen=True)
class Change:
    key: str  # dotted, e.g. pretrain.encoder.embed_dim
    old: Any
    new: Any


def preset_path(name: str | Path) -> Path:
    """presets/NAME.yaml for a bare name; a path to a .yaml file as given."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        return p
    return PRESET_DIR / f"{name}.yaml"


def available() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        known = ", ".join(available()) or f"none in {PRESET_DIR}/"
        raise AjepaError(f"{path}: no such preset (known: {known})") from None
    raw = read_yaml(text, str(path))  # the loader of params.yaml: no aliases, no duplicate keys
    if not isinstance(raw, dict) or not raw:
        raise AjepaError(f"{path}: a preset must be a non-empty mapping of params.yaml keys")
    return raw


def merge(params: dict, preset: dict, source: str = "preset", prefix: str = "") -> list[Change]:
    """Merge `preset` into `params` in place; return the values that changed.

    `params` may be a plain dict or ruamel's round-trip mapping: lists are replaced in place so
    that their flow style and trailing comments survive."""
    changes: list[Change] = []
    for key, new in preset.items():
        dotted = f"{prefix}{key}"
        if not isinstance(params, dict) or key not in params:
            raise ConfigError(f"{source}: {dotted}: not a key of {PARAMS_FILE} (a preset only changes existing keys)")
        old = params[key]
        if isinstance(new, dict):
            if not isinstance(old, dict):
                raise ConfigError(f"{source}: {dotted} is a section in the preset but a value ({old!r}) in "
                                  f"{PARAMS_FILE}")
            changes += merge(old, new, source, dotted + ".")
            continue
        if isinstance(old, dict):
            raise ConfigError(f"{source}: {dotted} = {new!r}: {PARAMS_FILE} has a section here, not a value")
        if _plain(old) == _plain(new) and type(_plain(old)) is type(_plain(new)):
            continue
        changes.append(Change(dotted, _plain(old), _plain(new)))
        if isinstance(old, list) and isinstance(new, list):
            old[:] = new
        else:
            params[key] = new
    return changes


def apply_preset(name: str | Path, params_file: str | Path = PARAMS_FILE, dry_run: bool = False) -> list[Change]:
    """Merge a preset into params_file; nothing is written when it fails validation or dry_run."""
    path = preset_path(name)
    preset = load_preset(path)
    params_file = Path(params_file)
    rt = _round_trip()
    try:
        text = params_file.read_text()
        read_yaml(text, str(params_file))  # refuses what ruamel would keep: aliases, duplicate keys
        doc = rt.load(text)
    except FileNotFoundError:
        raise ConfigError(f"{params_file}: not found (run from the repository root or pass --params)") from None
    except RuamelError as e:
        raise ConfigError(f"{params_file}: not valid YAML: {' '.join(str(e).split())}") from None
    changes = merge(doc, preset, source=str(path))
    out = io.StringIO()
    rt.dump(doc, out)
    merged = out.getvalue()
    parse_params(read_yaml(merged), source=f"{params_file} with preset {path}")
    if changes and not dry_run:
        write_text(params_file, merged)
    return changes


def describe(name: str | Path, params_file: str | Path, changes: list[Change], dry_run: bool) -> str:
    path = preset_path(name)
    if not changes:
        return f"preset {path}: {params_file} already has these values; nothing changed."
    verb = "would change" if dry_run else "changed"
    lines = [f"preset {path}: {verb} {len(changes)} value(s) in {params_file}:"]
    lines += [f"  {c.key}: {_show(c.old)} -> {_show(c.new)}" for c in changes]
    return "\n".join(lines)


def _round_trip() -> YAML:
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line
    rt.representer.add_representer(float, _represent_float)
    # ruamel writes None as an empty value; params.yaml spells it `null`, and a diff should not
    # show every unset source changing
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _represent_float(representer, value: float):
    """Floats with a dot in the mantissa (1.0e-06, not ruamel's 1e-06), which YAML 1.1 readers
    such as PyYAML (Snakemake's config) also take for numbers."""
    if value != value or value in (float("inf"), float("-inf")):
        text = ".nan" if value != value else (".inf" if value > 0 else "-.inf")
    else:
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _plain(value: Any) -> Any:
    """ruamel's scalar and sequence subclasses as plain Python values (for comparing and printing)."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=4096).strip().removesuffix("\n...").strip()
