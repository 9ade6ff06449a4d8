"""Encoder exports that lie or are damaged: HEAR's `load_model` and the downstream stages' loader check
config.json and the architecture it claims against the weights before building anything. An export
written before the format lived in one module (its weights carrying a copy of the architecture in
their metadata) still loads; a bare weights file without config.json is refused in one line."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from exports import TINY, make_export
from safetensors.torch import load_file, save_file
from train_project import ENV

import ajepa
import ajepa.hear as hear
from ajepa.downstream.common import build_encoder
from ajepa.errors import AjepaError


def _one_line_error(fn, *args) -> str:
    with pytest.raises(AjepaError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def _edit_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _architecture(**changes):
    return lambda config: config["architecture"].update(changes)


LOADERS = (lambda p: hear.load_model(str(p)), lambda p: build_encoder(p, (4, 8)))


@pytest.mark.parametrize("change, says", [
    (lambda c: c.update(format="ajepa-export/0"),
     "not an ajepa encoder export (format 'ajepa-export/0', expected 'ajepa-export/1')"),
    (lambda c: c["architecture"].pop("grid"),
     "architecture grid = None: missing or not a [time, frequency] pair of positive integers"),
    (_architecture(depth="1"), "architecture depth = '1': missing or not a positive int"),
    (_architecture(grid=[10 ** 6, 8]), "more than 65536 patches"),
    (lambda c: c.pop("frontend"), "no 'frontend' section (a mapping) in the config"),
    (lambda c: c["frontend"].update(sample_rate=0), "frontend sample_rate = 0: missing or not a positive number"),
])
def test_a_bad_config_is_one_line_naming_it(change, says, tmp_path):
    folder = make_export(tmp_path / "export")
    _edit_config(folder, change)
    for load in LOADERS:
        message = _one_line_error(load, folder)
        assert message.startswith(str(folder / "config.json")) and says in message, message


def test_an_architecture_the_weights_do_not_have_names_the_key(tmp_path):
    folder = make_export(tmp_path / "export")
    _edit_config(folder, _architecture(mlp_ratio=3.0))
    for load in LOADERS:
        assert _one_line_error(load, folder) == (f"{folder / 'model.safetensors'}: 'blocks.0.mlp.fc1.weight' is "
                                                 "[128, 32], the model expects [96, 32]")


def test_weights_of_the_wrong_shape_name_the_key(tmp_path):
    folder = make_export(tmp_path / "export")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["blocks.0.attn.qkv.weight"] = torch.zeros(96, 33)
    save_file(tensors, str(folder / "model.safetensors"))
    message = _one_line_error(build_encoder, folder, (4, 8))
    assert message == (f"{folder / 'model.safetensors'}: 'blocks.0.attn.qkv.weight' is [96, 33], the model "
                       "expects [96, 32]")


def test_an_export_whose_weights_carry_the_architecture_too_still_loads(tmp_path):
    """ajepa up to this change also wrote the architecture into the weights' metadata, under its own
    format id: the reader ignores that copy, so such exports load as they are."""
    folder = make_export(tmp_path / "export")
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    save_file(tensors, str(weights), metadata={"ajepa": json.dumps({"format": "ajepa-encoder/1", "config": TINY})})
    fresh = ajepa.load_encoder(make_export(tmp_path / "fresh"))
    model = ajepa.load_encoder(folder)
    wav = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.1
    assert torch.equal(model.embed(wav, 16000), fresh.embed(wav, 16000))


def test_a_bare_weights_file_is_refused_in_one_line(tmp_path):
    folder = make_export(tmp_path / "export")
    bare = tmp_path / "encoder.safetensors"
    (folder / "model.safetensors").rename(bare)
    for load in (*LOADERS, ajepa.load_encoder):
        message = _one_line_error(load, bare)
        assert message.startswith(f"{bare}: no config.json beside it"), message


@pytest.mark.slow
def test_a_small_file_claiming_a_huge_encoder_fails_before_allocating_it(tmp_path):
    """A 50 KB export whose config claims 8 blocks of width 2048 (1.6 GB of weights): refused from the
    tensors' shapes, in a process that cannot allocate 512 MB more than it holds after its imports."""
    folder = make_export(tmp_path / "liar")
    _edit_config(folder, _architecture(depth=8, embed_dim=2048, num_heads=8))
    script = textwrap.dedent(f"""
        import resource, sys
        import ajepa.hear as hear
        from ajepa.errors import AjepaError
        data = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (data + (512 << 20), resource.RLIM_INFINITY))
        try:
            hear.load_model({str(folder)!r})
        except AjepaError as e:
            print("AjepaError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    assert r.stdout == (f"AjepaError: {folder / 'model.safetensors'}: weights do not fit the config: it claims "
                        "depth 8 and width 2048, the weights hold 1 block(s) of width 32\n")
