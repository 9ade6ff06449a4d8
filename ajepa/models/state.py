"""A state dict into a model, with one clear line when it does not fit: torch's own report spans many
lines and names no file. Used wherever weights are loaded: a resumed run, an encoder export, a
fine-tuned model's best state."""

from __future__ import annotations

import torch
import torch.nn as nn

from ajepa.errors import AjepaError

__all__ = ["check_state", "load_fitting"]


def check_state(expected: dict[str, torch.Size], state, source: str) -> None:
    """One line naming the first key a state dict lacks, should not have, or holds in another shape."""
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
