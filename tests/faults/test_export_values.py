"""A damaged export (a NaN weight, integer weights, a NaN mean or an infinite std) is refused when it is
loaded, naming the file, by every loader: `ajepa.load_encoder`, HEAR's `load_model`, `ajepa embed`
and the downstream stages' `build_encoder`; it never turns into NaN embeddings or scores."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from exports import make_export
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ajepa
import ajepa.hear as hear
from ajepa.cli import main
from ajepa.downstream.common import build_encoder
from ajepa.errors import AjepaError


def _damage_weights(folder, change) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _one_nan(tensors):
    tensors["blocks.0.attn.qkv.weight"][3, 5] = math.nan


def _int8(tensors):
    tensors["patch_embed.proj.weight"] = tensors["patch_embed.proj.weight"].to(torch.int8)


def _stats(mean, std):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config["normalisation"].update(mean=mean, std=std)
        (folder / "config.json").write_text(json.dumps(config))
    return change


LOADERS = {"load_encoder": lambda p: ajepa.load_encoder(p), "hear.load_model": lambda p: hear.load_model(str(p)),
           "build_encoder (finetune, linear)": lambda p: build_encoder(p, (4, 8))}


@pytest.mark.parametrize("damage, file, says", [
    (lambda f: _damage_weights(f, _one_nan), "model.safetensors", "'blocks.0.attn.qkv.weight' holds NaN or infinite"),
    (lambda f: _damage_weights(f, _int8), "model.safetensors", "'patch_embed.proj.weight' holds torch.int8 values"),
    (_stats(math.nan, 4.0), "config.json", "normalisation mean = nan: must be a finite number"),
    (_stats(-4.0, math.inf), "config.json", "normalisation std = inf: must be a finite positive number"),
    (_stats(-4.0, "4"), "config.json", "normalisation std = '4': must be a finite positive number"),
])
def test_a_damaged_export_is_refused_by_every_loader(tmp_path, damage, file, says):
    folder = make_export(tmp_path / "export")
    damage(folder)
    for name, load in LOADERS.items():
        if name.startswith("build_encoder") and file == "config.json":
            continue  # the downstream stages normalise with their own features' statistics
        with pytest.raises(AjepaError) as e:
            load(folder)
        message = str(e.value)
        assert "\n" not in message and message.startswith(str(folder / file)) and says in message, (name, message)


def test_embed_of_a_damaged_export_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    folder = make_export(tmp_path / "export")
    sf.write(tmp_path / "a.wav", np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    assert main(["embed", str(tmp_path / "a.wav"), "--encoder", str(folder), "--out", str(tmp_path / "e.npz")]) == 0
    assert np.isfinite(np.load(tmp_path / "e.npz")["embeddings"]).all()
    _damage_weights(folder, _one_nan)
    (tmp_path / "e.npz").unlink()
    capsys.readouterr()
    assert main(["embed", str(tmp_path / "a.wav"), "--encoder", str(folder), "--out", str(tmp_path / "e.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.safetensors" in err and "NaN" in err, err
    assert not (tmp_path / "e.npz").exists()


def test_non_finite_statistics_passed_by_hand_are_refused(tmp_path):
    folder = make_export(tmp_path / "export")
    for mean, std in ((math.nan, 4.0), (-4.0, math.inf), (-4.0, 0.0)):
        with pytest.raises(AjepaError, match="mean must be finite, std finite and positive"):
            ajepa.load_encoder(folder, mean=mean, std=std)
