"""The one checkpoint format: a ``torch.save`` dict loadable with ``weights_only=True``.

A checkpoint holds the full training state (models, optimizer, schedules, RNG states, step, config
hash); resume restores it and replays the data order and masks from ``(seed, step)``, so a resumed
run is the same run. Only tensors and plain Python values are allowed in it: ``weights_only=True``
then loads it without executing pickled code, and a file from elsewhere cannot run anything.

Encoders for downstream use are exported separately as safetensors with their config in the
metadata: no pickle at all, loadable without this package.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from collections import OrderedDict
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ajepa.atomic import atomic_path
from ajepa.errors import AjepaError
from ajepa.train.finite import check_loaded

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "export_encoder",
           "load_encoder_state", "config_hash", "file_sha256", "check_state", "load_fitting", "load_optimizer",
           "restoring"]

ENCODER_FORMAT = "ajepa-encoder/1"
# Exact types: subclasses such as numpy.float64 (a float) or defaultdict (a dict) pickle as their own
# class, which the weights_only unpickler refuses. Tensor subclasses (nn.Parameter) are fine.
_PLAIN_TYPES = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, torch.Size)
# Wrappers that prefix state_dict keys: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def _fsync(path: Path) -> None:
    # Without it a crash soon after the rename can leave the new name pointing at unwritten blocks
    # on some file systems: the rename is only atomic for the name, not for the data.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically: a crash mid-save leaves the previous checkpoint intact."""
    _check_loadable(state)
    with atomic_path(path) as tmp:
        # through a Python file object: given a name, torch's own writer reports a full disk as
        # "unexpected pos" and hides the OSError that atomic_path turns into a one-line error
        with open(tmp, "wb") as f:
            torch.save(state, f)
        _fsync(tmp)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (weights_only, tensors on `map_location`)."""
    path = Path(path)
    if not path.is_file():
        raise AjepaError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global: all mean "not a checkpoint we can use"
        raise AjepaError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from e
    if not isinstance(state, dict):
        raise AjepaError(f"{path}: not an ajepa checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def check_state(expected: dict[str, torch.Size], state, source: str) -> None:
    """One line naming the first key a state dict lacks, should not have, or holds in another shape
    (torch's own report spans many lines and names no file)."""
    if not isinstance(state, dict):
        raise AjepaError(f"{source}: not a state dict (holds a {type(state).__name__})")
    for what, keys in (("missing key", [k for k in expected if k not in state]),
                       ("unexpected key", [k for k in state if k not in expected])):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise AjepaError(f"{source}: {what} {keys[0]!r}{more}: not a state of this model")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise AjepaError(f"{source}: {key!r} is {got}, the model expects {list(shape)}")


def load_fitting(module: nn.Module, state, source: str) -> None:
    """`module.load_state_dict(state)`, after :func:`check_state` against the module's own state."""
    check_state({k: v.shape for k, v in module.state_dict().items()}, state, source)
    module.load_state_dict(state)


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
        raise AjepaError(f"{path}: does not fit this run ({_first_line(e)})") from None


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


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def export_encoder(path: str | os.PathLike, encoder: nn.Module, config: dict) -> None:
    """Write the encoder's weights as safetensors (atomically), `config` JSON-encoded in the metadata.

    Keys are those of the bare encoder even when it is wrapped in DDP or torch.compile, so the file
    loads into a plain ``SpectrogramEncoder(**config)``."""
    tensors = {_strip_wrappers(k): v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    # one metadata key: safetensors writes its metadata map in hash order, so two keys would make
    # identical weights hash differently from run to run (and DVC see a change that is not one)
    metadata = {"ajepa": json.dumps({"format": ENCODER_FORMAT, "config": config}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync(tmp)


def load_encoder_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config) from a file written by :func:`export_encoder`."""
    path = Path(path)
    if not path.is_file():
        raise AjepaError(f"{path}: encoder weights not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AjepaError(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from e
    try:
        info = json.loads(metadata.get("ajepa", "{}"))
    except json.JSONDecodeError as e:
        raise AjepaError(f"{path}: the ajepa metadata is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != ENCODER_FORMAT or not isinstance(info.get("config"), dict):
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise AjepaError(f"{path}: not an ajepa encoder export (metadata format {found!r})")
    _check_encoder(path, tensors, info["config"])
    check_loaded(path, tensors)  # finite floating-point weights: a NaN would make every embedding NaN
    return tensors, info["config"]


# What an export's config says, by type; `grid` is [time patches, frequency patches]. Every export
# has them all; the last two may be left to SpectrogramEncoder's defaults in a hand-written config.
ENCODER_ARCH = {"grid": list, "embed_dim": int, "depth": int, "num_heads": int, "patch_size": int,
                "mlp_ratio": float}
OPTIONAL_ARCH = ("patch_size", "mlp_ratio")
MAX_PATCHES = 1 << 16  # 21 min of audio at 128 mel bins: a larger grid is a damaged config, not a model


def _positive(value, kind: type) -> bool:
    if kind is list:
        return isinstance(value, list) and len(value) == 2 and all(_positive(v, int) for v in value)
    return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0


def _check_encoder(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """The config's claims against the weights, before anyone builds the model it describes: a small
    file claiming a deep or wide encoder must fail here, not after allocating that encoder."""
    for key, kind in ENCODER_ARCH.items():
        value = config.get(key)
        if not (key in OPTIONAL_ARCH and key not in config) and not _positive(value, kind):
            what = "[time, frequency] pair of positive integers" if key == "grid" else f"positive {kind.__name__}"
            raise AjepaError(f"{path}: encoder config {key} = {value!r}: missing or not a {what}")
    if config["grid"][0] * config["grid"][1] > MAX_PATCHES:
        raise AjepaError(f"{path}: encoder config grid = {config['grid']}: more than {MAX_PATCHES} patches")
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    width = tensors.get("patch_embed.proj.weight")
    if config["depth"] != len(blocks) or width is None or width.shape[0] != config["embed_dim"]:
        raise AjepaError(f"{path}: weights do not fit the config: it claims depth {config['depth']} and width "
                         f"{config['embed_dim']}, the weights hold {len(blocks)} block(s) of width "
                         f"{'?' if width is None else width.shape[0]}")
    from ajepa.models import SpectrogramEncoder
    kwargs = {k: config[k] for k in ENCODER_ARCH if k in config} | {"grid": tuple(config["grid"])}
    try:
        with torch.device("meta"):  # shapes only: no memory, however large the claim
            expected = {k: v.shape for k, v in SpectrogramEncoder(**kwargs).state_dict().items()}
    except (AssertionError, ValueError, RuntimeError, TypeError) as e:
        raise AjepaError(f"{path}: the encoder config does not build ({_first_line(e)})") from None
    check_state(expected, tensors, str(path))


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
