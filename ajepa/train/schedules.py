"""Per-iteration schedules (I-JEPA style) and the AdamW parameter groups they act on.

Each schedule is a plain object with a pure ``value(step)`` and a ``step()`` that returns the
value for the current iteration and then advances, so the training loop calls ``step()`` once at
the top of every iteration and iteration ``i`` runs with ``value(i)``. The only state is the
iteration counter; ``state_dict()`` / ``load_state_dict()`` carry it through a checkpoint, so a
resumed run continues the same sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ajepa.choices import LrScaling, check_choice

__all__ = ["WarmupCosine", "CosineWeightDecay", "LinearMomentum", "param_groups", "layer_decay_groups",
           "NO_DECAY_NAMES", "peak_lr"]

# Learned tokens and positional tables are embeddings, not weights: decaying them pulls them towards 0
# for no regularisation benefit. MAE/AudioMAE fine-tuning and timm exclude them (`no_weight_decay()`);
# MAE's and I-JEPA's pretraining groups split by ndim and name alone, so they decay a [1, 1, D] mask token.
NO_DECAY_NAMES = ("pos_embed", "mask_token", "cls_token")

def peak_lr(lr: float, batch_size: int, scaling: LrScaling) -> float:
    """The peak lr that `lr` means at a global batch of `batch_size` under `scaling`: "absolute" as I-JEPA
    (helper.py init_opt: the config's lr is the peak), "per_256" as MAE/AudioMAE's base lr
    (main_pretrain.py: `lr = blr * eff_batch_size / 256`)."""
    check_choice(scaling, LrScaling, "lr scaling")
    return float(lr) * batch_size / 256 if scaling == "per_256" else float(lr)

# Marker kept in an optimizer group once the weight-decay schedule has seen it decaying. It is stored
# in the optimizer's state_dict, so a resumed optimizer keeps its groups apart even when the cosine
# has taken the decay to exactly 0 (then "weight_decay > 0" could no longer tell them apart).
_WD_SCHEDULED = "weight_decay_scheduled"


def _cosine(start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Schedule:
    def __init__(self, total_steps: int, optimizer: torch.optim.Optimizer | None):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        self.optimizer = optimizer
        self._step = 0

    def value(self, step: int) -> float:
        raise NotImplementedError

    def apply(self, optimizer: torch.optim.Optimizer, value: float) -> None:
        pass

    @property
    def current_step(self) -> int:
        return self._step

    def step(self) -> float:
        v = self.value(self._step)
        self._step += 1
        if self.optimizer is not None:
            self.apply(self.optimizer, v)
        return v

    def state_dict(self) -> dict:
        return {"step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self._step = int(state["step"])


class WarmupCosine(_Schedule):
    """Linear warmup ``start_value -> base_value`` over ``warmup_steps``, then a half cosine to
    ``final_value`` at ``total_steps`` (held after). ``start_value`` 0 is MAE's warmup; I-JEPA's
    ``WarmupCosineSchedule`` starts at its config's ``start_lr`` (0.2 x ``lr``). With an optimizer,
    ``step()`` sets every group's ``lr`` to ``value * group.get("lr_scale", 1.0)``, so layer-wise lr
    decay only has to put an ``lr_scale`` in each group (AudioMAE/BEiT fine-tuning) and can reuse this
    schedule."""

    def __init__(self, base_value: float, final_value: float, warmup_steps: int, total_steps: int,
                 start_value: float = 0.0, optimizer: torch.optim.Optimizer | None = None):
        super().__init__(total_steps, optimizer)
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.base_value, self.final_value = float(base_value), float(final_value)
        self.start_value, self.warmup_steps = float(start_value), int(warmup_steps)

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_value + (self.base_value - self.start_value) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        return _cosine(self.base_value, self.final_value, (step - self.warmup_steps) / decay_steps)

    def apply(self, optimizer: torch.optim.Optimizer, value: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = value * group.get("lr_scale", 1.0)


class CosineWeightDecay(_Schedule):
    """Cosine weight decay ``start -> end`` over ``total_steps`` (I-JEPA: 0.04 -> 0.4).

    Only groups that started with ``weight_decay > 0`` follow it; the no-decay group of
    :func:`param_groups` stays at 0 (I-JEPA marks it with ``WD_exclude`` for the same reason)."""

    def __init__(self, start: float, end: float, total_steps: int,
                 optimizer: torch.optim.Optimizer | None = None):
        super().__init__(total_steps, optimizer)
        self.start, self.end = float(start), float(end)

    def value(self, step: int) -> float:
        return _cosine(self.start, self.end, step / self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, value: float) -> None:
        for group in optimizer.param_groups:
            if _WD_SCHEDULED not in group:
                group[_WD_SCHEDULED] = group.get("weight_decay", 0.0) > 0
            if group[_WD_SCHEDULED]:
                group["weight_decay"] = value


class LinearMomentum(_Schedule):
    """EMA momentum for the target encoder, linear ``start -> end`` per iteration (I-JEPA:
    0.996 -> 1.0), held at ``end`` after ``total_steps``. ``step()`` returns the momentum to pass to
    ``AJEPA.update_target`` after the optimizer step of the same iteration."""

    def __init__(self, start: float = 0.996, end: float = 1.0, total_steps: int = 1):
        super().__init__(total_steps, None)
        self.start, self.end = float(start), float(end)

    def value(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(max(step, 0) / self.total_steps, 1.0)


def _decays(name: str, p: nn.Parameter) -> bool:
    # ndim <= 1 covers biases and every norm's scale/shift (LayerNorm, BatchNorm, ...)
    return p.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` (matrices, conv kernels) and
    ``no_decay`` (biases, norm weights, any 1-D parameter, positional tables and learned tokens).

    Frozen parameters (the EMA target encoder) are left out. Both groups are always present,
    even if one is empty, so the optimizer's state_dict has the same layout for every model."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _decays(name, p) else no_decay).append(p)
    return [{"name": "decay", "params": decay, "weight_decay": float(weight_decay)},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups keyed by (layer, decays?), each with its `lr_scale` for layer-wise lr decay (BEiT,
    AudioMAE): on a classifier with an `encoder` of L blocks, block l trains at decay^(L + 1 - l), the
    patch embedding at decay^(L + 1), everything after the blocks at the full lr."""
    depth = len(model.encoder.blocks)

    def layer_of(name: str) -> int:
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith("encoder.patch_embed"):
            return 0
        return depth + 1  # encoder.norm, norm, head

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decays = layer_of(name), _decays(name, p)
        g = groups.setdefault((layer, decays), {
            "name": f"layer{layer}_{'decay' if decays else 'no_decay'}", "params": [],
            "weight_decay": weight_decay if decays else 0.0, "lr_scale": layer_decay ** (depth + 1 - layer)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
