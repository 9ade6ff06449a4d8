"""The one checkpoint format: a ``torch.save`` dict loadable with ``weights_only=True``.

A checkpoint holds the full training state (models, optimizer, schedules, RNG states, step, config
hash); resume restores it and replays the data order and masks from ``(seed, step)``, so a resumed
run is the same run. Only tensors and plain Python values are allowed in it: ``weights_only=True``
then loads it without executing pickled code, and a file from elsewhere cannot run anything.

Encoders for downstream use are exported separately (ajepa.export): safetensors and a config.json, no
pickle at all.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections import OrderedDict
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from ajepa.atomic import atomic_path, fsync
from ajepa.errors import AjepaError, first_line

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "config_hash", "file_sha256",
           "load_optimizer", "restoring"]

# Exact types: subclasses such as numpy.float64 (a float) or defaultdict (a dict) pickle as their own
# class, which the weights_only unpickler refuses. Tensor subclasses (nn.Parameter) are fine.
_PLAIN_TYPES = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, torch.Size)


def _check_loadable(obj, where: str = "state") -> None:
    """Refuse at save time what weights_only=True would refuse at resume time, hours later."""
    if type(obj) in _MAPPINGS:
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not allowed in a checkpoint")
            _check_loadable(v, f"{where}[{k!r}]")
    elif type(obj) in _SEQUENCES:
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
    elif not (isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_TYPES):
        raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__name__} is not allowed in a checkpoint "
                        "(weights_only loads only tensors and plain str/int/float/bool/None, dicts, lists, tuples)")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically: a crash mid-save leaves the previous checkpoint intact."""
    _check_loadable(state)
    with atomic_path(path) as tmp:
        # through a Python file object: given a name, torch's own writer reports a full disk as
        # "unexpected pos" and hides the OSError that atomic_path turns into a one-line error
        with open(tmp, "wb") as f:
            torch.save(state, f)
        fsync(tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (weights_only, tensors on `map_location`)."""
    path = Path(path)
    if not path.is_file():
        raise AjepaError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global: all mean "not a checkpoint we can use"
        raise AjepaError(f"{path}: corrupt or truncated checkpoint ({first_line(e)})") from e
    if not isinstance(state, dict):
        raise AjepaError(f"{path}: not an ajepa checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def load_optimizer(optimizer: torch.optim.Optimizer, state, source: str) -> None:
    """`optimizer.load_state_dict(state)`, then check that every moment has its parameter's shape: torch
    loads a wrong one without a word and fails at the next step."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise AjepaError(f"{source}: optimizer {name!r} is {list(value.shape)}, its parameter "
                                     f"{list(p.shape)}")


@contextlib.contextmanager
def restoring(path: str | os.PathLike):
    """Around loading a checkpoint's parts into a run: what a damaged or foreign checkpoint makes
    `load_state_dict` and friends raise becomes one line naming the file."""
    try:
        yield
    except KeyError as e:
        raise AjepaError(f"{path}: missing key {e.args[0]!r}: not a checkpoint this run can resume") from None
    except (ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        raise AjepaError(f"{path}: does not fit this run ({first_line(e)})") from None


def rng_state() -> dict:
    """Python, numpy (legacy global) and torch RNG states as plain values and tensors.

    CUDA's state is taken for the current device only, and only once CUDA is in use: asking for
    every device would create a context on each GPU the process can see, and neither DVC nor
    Snakemake sets CUDA_VISIBLE_DEVICES. The state is per process; under DDP each rank has its own."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where CUDA is available)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _jsonable(obj):
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"config_hash: {type(obj).__name__} is not JSON-serialisable")


def config_hash(obj) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, tuples as lists, dataclasses as dicts).

    Stored in the checkpoint; a resume whose parameters hash differently is a different run and is
    refused rather than silently mixing two configurations in one model."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
