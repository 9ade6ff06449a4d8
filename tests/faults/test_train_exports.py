"""Encoder exports that lie or are damaged: HEAR's `load_model` and the downstream stages' loader check
the metadata and the claimed architecture against the weights before building anything."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from train_project import ENV

import ajepa.hear as hear
from ajepa.downstream.common import build_encoder
from ajepa.errors import AjepaError
from ajepa.models import SpectrogramEncoder
from ajepa.train.checkpoint import ENCODER_FORMAT, export_encoder

TINY = {"grid": [4, 8], "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 4.0}


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in SpectrogramEncoder(**{**TINY, "grid": (4, 8)}).state_dict().items()}


def _write(path, metadata: str | None, tensors=None):
    save_file(tensors or _weights(), str(path), metadata=None if metadata is None else {"ajepa": metadata})
    return path


def _one_line_error(fn, *args) -> str:
    with pytest.raises(AjepaError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("metadata, says", [
    ("{not json", "the ajepa metadata is not valid JSON"),
    ("[1, 2]", "not an ajepa encoder export (metadata format 'list')"),
    (json.dumps({"format": ENCODER_FORMAT, "config": {k: v for k, v in TINY.items() if k != "grid"}}),
     "encoder config grid = None: missing or not a [time, frequency] pair of positive integers"),
    (json.dumps({"format": ENCODER_FORMAT, "config": {**TINY, "depth": "1"}}),
     "encoder config depth = '1': missing or not a positive int"),
    (json.dumps({"format": ENCODER_FORMAT, "config": {**TINY, "grid": [10 ** 6, 8]}}), "more than 65536 patches"),
    (json.dumps({"format": ENCODER_FORMAT, "config": {**TINY, "mlp_ratio": 3.0}}),
     "'blocks.0.mlp.fc1.weight' is [128, 32], the model expects [96, 32]"),
])
def test_bad_metadata_is_one_line_naming_the_file(metadata, says, tmp_path):
    path = _write(tmp_path / "enc.safetensors", metadata)
    for load in (hear.load_model, lambda p: build_encoder(p, (4, 8))):
        message = _one_line_error(load, path if load is not hear.load_model else str(path))
        assert message.startswith(str(path)) and says in message, message


def test_weights_of_the_wrong_shape_name_the_key(tmp_path):
    tensors = _weights()
    tensors["blocks.0.attn.qkv.weight"] = torch.zeros(96, 33)
    path = _write(tmp_path / "enc.safetensors", json.dumps({"format": ENCODER_FORMAT, "config": TINY}), tensors)
    message = _one_line_error(build_encoder, path, (4, 8))
    assert message == f"{path}: 'blocks.0.attn.qkv.weight' is [96, 33], the model expects [96, 32]"


@pytest.mark.slow
def test_a_small_file_claiming_a_huge_encoder_fails_before_allocating_it(tmp_path):
    """A 50 KB export whose config claims 8 blocks of width 2048 (1.6 GB of weights): refused from the
    tensors' shapes, in a process that cannot allocate 512 MB more than it holds after its imports."""
    path = tmp_path / "liar.safetensors"
    export_encoder(path, SpectrogramEncoder(**{**TINY, "grid": (4, 8)}),
                   {**TINY, "depth": 8, "embed_dim": 2048, "num_heads": 8})
    script = textwrap.dedent(f"""
        import resource, sys
        import ajepa.hear as hear
        from ajepa.errors import AjepaError
        data = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (data + (512 << 20), resource.RLIM_INFINITY))
        try:
            hear.load_model({str(path)!r})
        except AjepaError as e:
            print("AjepaError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    assert r.stdout == (f"AjepaError: {path}: weights do not fit the config: it claims depth 8 and width 2048, "
                        "the weights hold 1 block(s) of width 32\n")
