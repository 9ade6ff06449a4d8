"""Presets: named sets of params.yaml values, merged into params.yaml by `ajepa preset NAME`.

A preset (presets/NAME.yaml) holds only the keys whose values differ from the embedded default.
Merging walks the preset: a mapping merges key by key, anything else (number, string, list)
replaces the value in params.yaml. A preset may not add keys: a key that params.yaml lacks is
an error rather than a value nobody reads, and the merged parameters must pass the same
validation as every stage before params.yaml is rewritten (atomically, keeping its comments, in
the layout `dvc exp run -S` writes: ajepa.tools.paramfile).

Presets are applied to whatever params.yaml holds, so apply one to the committed default
(`git checkout params.yaml` first) rather than on top of another preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ajepa.atomic import write_text
from ajepa.config import PARAMS_FILE, parse_params, read_yaml
from ajepa.errors import AjepaError, ConfigError
from ajepa.tools import paramfile

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
    that their trailing comments survive."""
    changes: list[Change] = []
    for key, new in preset.items():
        dotted = f"{prefix}{key}"
        if not isinstance(params, dict) or key not in params:
            raise ConfigError(f"{source}: {dotted}: not a key of {PARAMS_FILE} (only existing keys can be changed)")
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
    try:
        doc = paramfile.load(params_file.read_text(), str(params_file))
    except FileNotFoundError:
        raise ConfigError(f"{params_file}: not found (run from the repository root or pass --params)") from None
    changes = merge(doc, preset, source=str(path))
    merged = paramfile.dump(doc)
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
