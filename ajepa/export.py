"""The self-describing encoder export: one folder per pretrained encoder.

    models/pretrain/context/          (and models/pretrain/target/)
        model.safetensors   the weights (no pickle), the architecture in the metadata too
        config.json         architecture, patch grid, front end, normalisation statistics of the
                            pretraining features, which encoder, pretraining params hash, ajepa version
        README.md           a short model card

Everything a user needs to turn audio into the inputs the encoder was trained on is in config.json,
so `ajepa.load_encoder` needs only torch, timm, torchaudio, soundfile and safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from ajepa import __version__
from ajepa.atomic import atomic_path
from ajepa.errors import AjepaError
from ajepa.train.checkpoint import export_encoder, load_encoder_state
from ajepa.train.finite import check_loaded

__all__ = ["EXPORT_FORMAT", "WEIGHTS", "CONFIG", "CARD", "DEFAULT_EXPORT", "find_export", "read_export",
           "weights_file", "write_export", "model_card"]

EXPORT_FORMAT = "ajepa-export/1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# The encoder a folder of several exports stands for: params.yaml's `downstream.encoder` default
# (docs/experiments.md measures why the context encoder rather than I-JEPA's target encoder).
DEFAULT_EXPORT = "context"
# The front end every export before config.json existed was made with (ajepa.data.frontend defaults)
_LEGACY_FRONTEND = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0}
GRID_RULE = ("tokens are time-major (index t * n_freq + f); n_time = window frames / patch_size, n_freq = "
             "num_mel_bins / patch_size; positions are a fixed sin-cos function of the grid, so any window "
             "that is a multiple of patch_size loads")


def find_export(path: str | os.PathLike, encoder: str | None = None) -> Path:
    """The export folder `path` names: the folder itself, its model.safetensors or config.json, or a
    folder of exports (models/pretrain), of which `encoder` (default: the only one, else DEFAULT_EXPORT).
    A bare .safetensors without config.json beside it (an export from before config.json) is returned
    as it is."""
    path = Path(path)
    if path.is_file():
        return path.parent if path.name == CONFIG or (path.parent / CONFIG).is_file() else path
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


def weights_file(where: Path) -> Path:
    """The weights of an export found by find_export."""
    return where if where.is_file() else where / WEIGHTS


def read_export(path: str | os.PathLike, encoder: str | None = None) -> tuple[Path, dict, dict]:
    """(export folder, state_dict, config) of the export `path` names (see find_export). An export from
    before config.json gets the front end it was made with and no normalisation statistics."""
    where = find_export(path, encoder)
    if where.is_file():
        state, architecture = load_encoder_state(where)
        frontend = {**_LEGACY_FRONTEND, "target_length": architecture["grid"][0] * architecture["patch_size"]}
        return where, state, {"architecture": architecture, "frontend": frontend, "normalisation": None}
    try:
        config = json.loads((where / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AjepaError(f"{where / CONFIG}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise AjepaError(f"{where / CONFIG}: not an ajepa encoder export (format "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, expected {EXPORT_FORMAT!r})")
    if encoder is not None and config.get("encoder") != encoder:
        raise AjepaError(f"{where}: the {config.get('encoder')!r} encoder, not {encoder!r}")
    state, architecture = load_encoder_state(where / WEIGHTS)
    if architecture != config.get("architecture"):
        raise AjepaError(f"{where}: {WEIGHTS} and {CONFIG} describe different architectures")
    check_loaded(where / CONFIG, stats=config.get("normalisation") or None)  # finite mean, finite std > 0
    return where, state, config


def write_export(folder: str | os.PathLike, encoder: nn.Module, config: dict) -> None:
    """Write one export folder atomically. `config` holds at least `encoder` (which one), `architecture`
    (the SpectrogramEncoder arguments), `frontend` and `normalisation` ({"mean", "std", ...})."""
    config = {"format": EXPORT_FORMAT, "ajepa_version": __version__, **config}
    arch, frontend = config["architecture"], config["frontend"]
    config["patch_grid"] = {"grid": arch["grid"], "patch_size": arch["patch_size"],
                            "window_frames": arch["grid"][0] * arch["patch_size"], "rule": GRID_RULE}
    config["embedding"] = {"size": arch["grid"][1] * arch["embed_dim"],
                           "layout": "the frequency-patch tokens of a time patch concatenated (low band first); "
                                     "the scene embedding is their mean over the time patches"}
    if frontend["num_mel_bins"] != arch["grid"][1] * arch["patch_size"]:
        raise AjepaError(f"export: {frontend['num_mel_bins']} mel bins do not fill the grid {arch['grid']}")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        export_encoder(tmp / WEIGHTS, encoder, arch)
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
