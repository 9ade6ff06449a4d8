"""The encoder export: one self-describing folder per pretrained encoder, the format's one module.

    models/pretrain/context/          (and models/pretrain/target/)
        model.safetensors   the weights (no pickle; keys of the bare encoder)
        config.json         format id, architecture, patch grid, front end, normalisation statistics
                            of the pretraining features, which encoder, pretraining params hash, version
        README.md           a short model card

config.json is the one description: the architecture is stored there only, and checked against the
weights' shapes before any model is built (a small file claiming a huge encoder fails without
allocating it). Everything a user needs to turn audio into the encoder's inputs is in it, so
`ajepa.load_encoder` needs only torch, timm, torchaudio, soundfile and safetensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ajepa import __version__
from ajepa.atomic import atomic_path, fsync
from ajepa.choices import Encoder
from ajepa.errors import AjepaError, first_line
from ajepa.models import SpectrogramEncoder
from ajepa.models.state import check_state

__all__ = ["EXPORT_FORMAT", "WEIGHTS", "CONFIG", "CARD", "DEFAULT_EXPORT", "ARCHITECTURE", "find_export",
           "read_config", "read_export", "check_loaded", "write_export", "model_card"]

EXPORT_FORMAT = "ajepa-export/1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# The encoder a folder of several exports stands for: params.yaml's `downstream.encoder` default
# (docs/experiments.md measures why the context encoder rather than I-JEPA's target encoder).
DEFAULT_EXPORT: Encoder = "context"
GRID_RULE = ("tokens are time-major (index t * n_freq + f); n_time = window frames / patch_size, n_freq = "
             "num_mel_bins / patch_size; positions are a fixed sin-cos function of the grid, so any window "
             "that is a multiple of patch_size loads")
# config.json's `architecture` (the SpectrogramEncoder arguments) by type; `grid` is [time patches,
# frequency patches]. The last two may be left to SpectrogramEncoder's defaults in a hand-written one.
ARCHITECTURE = {"grid": list, "embed_dim": int, "depth": int, "num_heads": int, "patch_size": int,
                "mlp_ratio": float}
OPTIONAL_ARCHITECTURE = ("patch_size", "mlp_ratio")
FRONTEND = ("sample_rate", "num_mel_bins", "frame_shift_ms", "frame_length_ms", "target_length")
MAX_PATCHES = 1 << 16  # 21 min of audio at 128 mel bins: a larger grid is a damaged config, not a model
# Wrappers that prefix state_dict keys: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def find_export(path: str | os.PathLike, encoder: str | None = None) -> Path:
    """The export folder `path` names: the folder itself, its model.safetensors or config.json, or a
    folder of exports (models/pretrain), of which `encoder` (default: the only one, else DEFAULT_EXPORT)."""
    path = Path(path)
    if path.is_file():
        if not (path.parent / CONFIG).is_file():
            raise AjepaError(f"{path}: no {CONFIG} beside it: not an encoder export folder (bare weights files "
                             "of ajepa before 0.1.0 are no longer read: export the encoder again)")
        return path.parent
    if (path / CONFIG).is_file():
        return path
    if not path.is_dir():
        raise AjepaError(f"{path}: encoder export not found")
    found = sorted(p.parent.name for p in path.glob(f"*/{CONFIG}"))
    if not found:
        raise AjepaError(f"{path}: no encoder export here (no {CONFIG}, nor a folder holding one)")
    name = encoder or (found[0] if len(found) == 1 else DEFAULT_EXPORT)
    if name not in found:
        raise AjepaError(f"{path}: no {name!r} encoder export (found: {', '.join(found)})")
    return path / name


def read_config(path: str | os.PathLike, encoder: str | None = None) -> tuple[Path, dict]:
    """(export folder, config) of the export `path` names (see find_export), its config checked: the
    format id, which encoder, the architecture's claims, the front end and the normalisation statistics."""
    where = find_export(path, encoder)
    source = where / CONFIG
    try:
        config = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise AjepaError(f"{source}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise AjepaError(f"{source}: not an ajepa encoder export (format "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, expected {EXPORT_FORMAT!r})")
    if encoder is not None and config.get("encoder") != encoder:
        raise AjepaError(f"{where}: the {config.get('encoder')!r} encoder, not {encoder!r}")
    architecture, frontend = _section(config, "architecture", source), _section(config, "frontend", source)
    for key, kind in ARCHITECTURE.items():
        value = architecture.get(key)
        if not (key in OPTIONAL_ARCHITECTURE and key not in architecture) and not _positive(value, kind):
            what = "[time, frequency] pair of positive integers" if key == "grid" else f"positive {kind.__name__}"
            raise AjepaError(f"{source}: architecture {key} = {value!r}: missing or not a {what}")
    if architecture["grid"][0] * architecture["grid"][1] > MAX_PATCHES:
        raise AjepaError(f"{source}: architecture grid = {architecture['grid']}: more than {MAX_PATCHES} patches")
    for key in FRONTEND:
        if not _positive(frontend.get(key), float):
            raise AjepaError(f"{source}: frontend {key} = {frontend.get(key)!r}: missing or not a positive number")
    check_loaded(source, stats=_section(config, "normalisation", source))
    return where, config


def read_export(path: str | os.PathLike, encoder: str | None = None) -> tuple[Path, dict, dict]:
    """(export folder, state_dict, config) of the export `path` names (see find_export): the config
    checked (read_config), then the weights against the architecture it states."""
    where, config = read_config(path, encoder)
    source = where / WEIGHTS
    if not source.is_file():
        raise AjepaError(f"{source}: encoder weights not found")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AjepaError(f"{source}: corrupt or truncated safetensors file ({first_line(e)})") from e
    _check_fits(source, tensors, config["architecture"])
    check_loaded(source, tensors)  # finite floating-point weights: a NaN would make every embedding NaN
    return where, tensors, config


def _section(config: dict, key: str, source: Path) -> dict:
    if not isinstance(config.get(key), dict):
        raise AjepaError(f"{source}: no {key!r} section (a mapping) in the config")
    return config[key]


def _positive(value, kind: type) -> bool:
    if kind is list:
        return isinstance(value, list) and len(value) == 2 and all(_positive(v, int) for v in value)
    return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0


def _check_fits(source: Path, tensors: dict[str, torch.Tensor], architecture: dict) -> None:
    """The architecture's claims against the weights, before anyone builds the model it describes: a
    small file claiming a deep or wide encoder must fail here, not after allocating that encoder."""
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    width = tensors.get("patch_embed.proj.weight")
    if architecture["depth"] != len(blocks) or width is None or width.shape[0] != architecture["embed_dim"]:
        raise AjepaError(f"{source}: weights do not fit the config: it claims depth {architecture['depth']} and "
                         f"width {architecture['embed_dim']}, the weights hold {len(blocks)} block(s) of width "
                         f"{'?' if width is None else width.shape[0]}")
    kwargs = {k: architecture[k] for k in ARCHITECTURE if k in architecture} | {"grid": tuple(architecture["grid"])}
    try:
        with torch.device("meta"):  # shapes only: no memory, however large the claim
            expected = {k: v.shape for k, v in SpectrogramEncoder(**kwargs).state_dict().items()}
    except (AssertionError, ValueError, RuntimeError, TypeError) as e:
        raise AjepaError(f"{source}: the architecture in {CONFIG} does not build ({first_line(e)})") from None
    check_state(expected, tensors, str(source))


def check_loaded(source, tensors: dict | None = None, stats: dict | None = None) -> None:
    """Refuse loaded weights or normalisation statistics that would make every output NaN or garbage
    without a word: a tensor that is not floating point (int8 weights load into float parameters as
    whole numbers) or holds a NaN or an infinity, a mean that is not a finite number, a std that is not
    a finite positive one. One AjepaError naming `source` (the file) and the first bad entry.
    About 0.1 s for ViT-B's 86 M weights: once per load."""
    for key, value in (tensors or {}).items():
        if not value.is_floating_point():
            raise AjepaError(f"{source}: {key!r} holds {value.dtype} values, not floating point: a damaged "
                             "or foreign export; export the encoder again")
        if not torch.isfinite(value).all():
            raise AjepaError(f"{source}: {key!r} holds NaN or infinite values: a damaged export (or one "
                             "of a diverged run); export the encoder again")
    for key in ("mean", "std") if stats is not None else ():
        value = stats.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or key == "std" and value <= 0:
            what = "a finite positive number" if key == "std" else "a finite number"
            raise AjepaError(f"{source}: normalisation {key} = {value!r}: must be {what}")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def write_export(folder: str | os.PathLike, encoder: nn.Module, config: dict) -> None:
    """Write one export folder atomically. `config` holds at least `encoder` (which one), `architecture`
    (the SpectrogramEncoder arguments), `frontend` and `normalisation` ({"mean", "std", ...}). The
    weights' keys are those of the bare encoder even when it is wrapped in DDP or torch.compile, so
    they load into a plain ``SpectrogramEncoder(**architecture)``."""
    config = {"format": EXPORT_FORMAT, "ajepa_version": __version__, **config}
    arch, frontend = config["architecture"], config["frontend"]
    config["patch_grid"] = {"grid": arch["grid"], "patch_size": arch["patch_size"],
                            "window_frames": arch["grid"][0] * arch["patch_size"], "rule": GRID_RULE}
    config["embedding"] = {"size": arch["grid"][1] * arch["embed_dim"],
                           "layout": "the frequency-patch tokens of a time patch concatenated (low band first); "
                                     "the scene embedding is their mean over the time patches"}
    if frontend["num_mel_bins"] != arch["grid"][1] * arch["patch_size"]:
        raise AjepaError(f"export: {frontend['num_mel_bins']} mel bins do not fill the grid {arch['grid']}")
    tensors = {_strip_wrappers(k): v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        # no metadata: the architecture is stated once, in config.json
        save_file(tensors, str(tmp / WEIGHTS))
        fsync(tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(config))


_ROLE = {"context": "the context encoder, the one trained by gradient descent",
         "target": "the target encoder, the exponential moving average of the context encoder (the one I-JEPA "
                   "evaluates)"}


def model_card(config: dict) -> str:
    """README.md of an export folder, from its config."""
    a, f, n = config["architecture"], config["frontend"], config["normalisation"]
    t = config.get("training", {})
    seconds = f["target_length"] * f["frame_shift_ms"] / 1000
    datasets = ", ".join(n.get("datasets", {})) or "unknown"
    return f"""# A-JEPA {config['encoder']} encoder

An audio encoder pretrained with A-JEPA (Fei, Fan and Huang, "A-JEPA: Joint-Embedding Predictive
Architecture Can Listen", arXiv:2311.15830), exported by ajepa {config['ajepa_version']}.
This is {_ROLE.get(config['encoder'], config['encoder'])}.

- **Architecture**: ViT, {a['depth']} blocks of width {a['embed_dim']} ({a['num_heads']} heads), {a['patch_size']} x
  {a['patch_size']} patches on a {a['grid'][0]} x {a['grid'][1]} (time x frequency) grid: windows of
  {f['target_length']} frames ({seconds:g} s).
- **Input**: mono audio at {f['sample_rate']} Hz (other rates are resampled); Kaldi log-mel fbank with
  {f['num_mel_bins']} bins, {f['frame_length_ms']:g} ms frames every {f['frame_shift_ms']:g} ms, normalised as
  (x - {n['mean']:.4f}) / (2 x {n['std']:.4f}): the statistics of the pretraining features.
- **Output**: a {config['embedding']['size']}-dim scene embedding per clip ({a['grid'][1]} frequency-patch tokens
  of width {a['embed_dim']} concatenated, averaged over time), or one such embedding every 40 ms.
- **Pretraining**: {datasets}; {t.get('steps', '?')} steps; pretrain params sha256
  {str(t.get('params_sha256', '?'))[:16]}. What the embeddings capture is bounded by that data.

## Use

```python
import ajepa
import soundfile as sf

model = ajepa.load_encoder("path/to/this/folder")
wav, sr = sf.read("clip.wav", dtype="float32", always_2d=True)
scene = model.embed(wav.mean(1), sr)               # [{config['embedding']['size']}]
frames, ms = model.embed_frames(wav.mean(1), sr)   # [n, {config['embedding']['size']}], centres in ms
```

A folder of audio: `ajepa embed AUDIO_DIR --encoder path/to/this/folder --out embeddings.npz`.
HEAR 2021 API: `hear-validator ajepa.hear -m path/to/this/folder`.

Files: `model.safetensors` (weights), `config.json` (everything above, machine-readable).
The code is MIT-licensed; the weights carry the terms of the pretraining data. Cite the A-JEPA paper.
"""
