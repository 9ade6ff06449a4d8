"""The training engine: what every training run shares, whatever it trains.

A run is its parts (model, optimiser, schedules: anything with a state dict), its counters (plain
values the caller keeps: the step, the clock, the best epoch ...) and the RNG of every process. The
engine owns, once for every kind of training:
  state     checkpoint and resume of all three under the run's identity (a hash the caller makes of
            what decides the trajectory); a checkpoint of another run is set aside under its own name,
            never overwritten, never resumed
  compute   where and how a step runs: the device, bf16 autocast on CUDA, activation checkpointing,
            torch.compile, micro-batches (`auto`: probed on CUDA) and DDP (ajepa.train.compute)
  the step  zero the gradients, forward/backward micro-batch by micro-batch, the loss averaged over
            the processes and checked, clipping, the optimiser step, the weights checked (ajepa.train.finite)
  the loop  units of work (a pretraining step, a fine-tuning epoch) with periodic checkpoints, the stop
            at a unit's end when a signal asked for it, and the non-finite stop that keeps the last
            good checkpoint
Pretraining (ajepa.train.pretrain) and fine-tuning (ajepa.downstream.finetune) differ only in what
they hand it: their model, their batch and their loss (`loss_of(model, rows)`, `do(unit)`).

The process count is no part of a run: the batch of a step is the same global batch on any number
of processes (ajepa.data.loader), so a run resumed on N' processes continues the same trajectory.
Each process keeps its own RNG state (dropout, drop path); resumed on more processes than saved them,
process r takes the state of process r mod N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ajepa.errors import AjepaError, Interrupted
from ajepa.interrupt import signal_name
from ajepa.models import set_activation_checkpointing
from ajepa.models.state import load_fitting
from ajepa.train.checkpoint import load_checkpoint, load_optimizer, restoring, rng_state, save_checkpoint, set_rng_state
from ajepa.train.compute import accumulate, compile_blocks, fits_in_cuda_memory, min_over_processes, resolve_micro_batch
from ajepa.train.distributed import DistInfo, all_reduce_mean, max_over_ranks
from ajepa.train.finite import NonFinite, check_loss, check_weights

__all__ = ["Engine", "Log", "OpenLog", "autocast_for", "optimizer_step", "single_process", "unwrap"]

Log = Callable[[int, dict], None]  # log(step, metrics)
OpenLog = Callable[[int], Log]  # open_log(start) -> log: told where the run starts (0, or where it resumes)
LossOf = Callable[[nn.Module, slice], torch.Tensor]  # loss_of(model, rows): the mean loss of those batch rows
RESERVED = ("run_hash", "rng")  # checkpoint keys that are neither parts nor counters


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; fp32 on the CPU (bf16 there is a numerics change, not a speed-up)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def single_process(device: torch.device) -> DistInfo:
    """The description of a run that is one process on `device` (fine-tuning)."""
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself when it is not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, rows: int, loss_of: LossOf,
                   micro_batch: int | None = None, autocast=None, grad_clip: float = 0.0) -> float:
    """The step sequence of every training run: zero the gradients, forward/backward the `rows` batch
    rows (in micro-batches when `micro_batch` splits them; `model` may be DDP-wrapped), the loss
    averaged over the processes and checked, clipping, the optimiser step, the weights checked.
    Returns the loss. A non-finite loss raises NonFinite before any update, non-finite weights after
    the optimiser step (every process sees the same loss and weights, so all stop alike)."""
    optimizer.zero_grad(set_to_none=True)

    def forward(part: slice) -> torch.Tensor:
        with autocast or nullcontext():
            return loss_of(model, part)

    value = all_reduce_mean(accumulate(model, rows, micro_batch, forward)).item()
    check_loss(value)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), grad_clip)
    optimizer.step()
    check_weights(unwrap(model))
    return value


class Engine:
    """One training run's state, compute and step (see the module docstring). `parts` must hold
    "model" and "optimizer"; the checkpoint is the file `checkpoint`, written by rank 0 alone."""

    def __init__(self, name: str, parts: dict[str, Any], dist: DistInfo, checkpoint: Path, run_hash: str):
        self.name, self.parts, self.dist, self.checkpoint, self.run_hash = name, parts, dist, Path(checkpoint), run_hash
        self.model: nn.Module = parts["model"]
        self.optimizer: torch.optim.Optimizer = parts["optimizer"]
        self.train_model: nn.Module = self.model  # DDP-wrapped once configured, on more than one process
        self.autocast = autocast_for(dist.device)
        self.micro_batch: int | None = None
        self.saved: int | None = None  # the unit (step, epoch) of the last checkpoint this run wrote or resumed

    # -- state ---------------------------------------------------------------------------------------
    def load_state_dict(self, state: dict, source: str) -> None:
        """Load every part; a part that does not fit fails in one line naming `source` and the key."""
        for key, part in self.parts.items():
            if isinstance(part, nn.Module):
                load_fitting(part, state[key], f"{source} [{key}]")
            elif isinstance(part, torch.optim.Optimizer):
                load_optimizer(part, state[key], f"{source} [{key}]")
            else:
                part.load_state_dict(state[key])

    def resume(self) -> dict | None:
        """Load the checkpoint when it holds this run and return its counters; None to start afresh
        (no checkpoint, or another run's, which is set aside first)."""
        if not self.checkpoint.exists():
            return None
        state = load_checkpoint(self.checkpoint, map_location=self.dist.device)
        if state.get("run_hash") != self.run_hash:
            self._set_aside(str(state.get("run_hash") or "unknown"))
            return None
        with restoring(self.checkpoint):
            self.load_state_dict(state, str(self.checkpoint))
            rngs = state["rng"]
            set_rng_state(rngs[self.dist.rank % len(rngs)])
            return {k: v for k, v in state.items() if k not in self.parts and k not in RESERVED}

    def _set_aside(self, other_hash: str) -> None:
        """Rename another run's checkpoint out of the way (rank 0, once every rank has read it)."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if not self.dist.is_main:
            return
        stem, suffix = self.checkpoint.stem, self.checkpoint.suffix
        target, n = self.checkpoint.with_name(f"{stem}.{other_hash[:12]}{suffix}"), 1
        while target.exists():
            target, n = self.checkpoint.with_name(f"{stem}.{other_hash[:12]}.{n}{suffix}"), n + 1
        self.checkpoint.rename(target)
        print(f"{self.name}: {self.checkpoint} is from other parameters or data: kept as {target}; starting afresh")

    def save(self, counters: dict) -> None:
        """Checkpoint the parts, `counters` and every process's RNG (every process must call it)."""
        rngs = [None] * self.dist.world_size
        if self.dist.world_size > 1:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.dist.is_main:
            state = {k: p.state_dict() for k, p in self.parts.items()}
            save_checkpoint(self.checkpoint, {**counters, "run_hash": self.run_hash, **state, "rng": rngs})

    # -- compute -------------------------------------------------------------------------------------
    def configure(self, batch: int, micro_batch: int | str | None, activation_checkpointing: bool = False,
                  compile: bool = False, probe_loss: Callable[[int], torch.Tensor] | None = None) -> None:
        """Activation checkpointing and torch.compile as configured, the micro-batch size for this
        process's `batch` clips (the same on every process: the smallest any resolved; `auto` on CUDA
        tries `probe_loss(size)`, a forward at that size, at decreasing sizes) and DDP."""
        device = self.dist.device
        if activation_checkpointing:
            set_activation_checkpointing(self.model)
        if compile:
            compile_blocks(self.model)
        if micro_batch != "auto" or device.type != "cuda":
            self.micro_batch = resolve_micro_batch(micro_batch, batch, device)
        else:
            def forward_backward(size: int) -> None:
                try:
                    with self.autocast:
                        loss = probe_loss(size)
                    loss.backward()
                finally:
                    self.model.zero_grad(set_to_none=True)

            # AdamW's two moments (not allocated before the first step) and DDP's gradient buckets
            reserve = 3 * sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            size = resolve_micro_batch("auto", batch, device,
                                       lambda m: fits_in_cuda_memory(device, lambda: forward_backward(m), reserve))
            self.micro_batch = min_over_processes(size, device)
        if self.dist.world_size > 1:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- the loop ------------------------------------------------------------------------------------
    def loop(self, units: Iterable[tuple[int, Any]], do: Callable[[Any], int], counters: Callable[[], dict],
             end: int, save_every: int, unit: str, advice: str,
             stop_requested: Callable[[], int | None] | None = None) -> int:
        """`do(item)` for each (number, item) of `units`; it returns how many units are done. A checkpoint
        every `save_every` units short of `end` (the caller saves the last, `finish`); after each unit,
        a stop when a signal asked for one on any process: its number is returned (0: ran to the end).
        A non-finite step stops the run in one line that names the checkpoint kept and `advice`."""
        for number, item in units:
            try:
                done = do(item)
            except NonFinite as e:
                kept = (f"the last good checkpoint {self.checkpoint} ({unit} {self.saved}) is kept"
                        if self.saved is not None else "no checkpoint was written yet")
                raise AjepaError(f"{e} at {unit} {number} of {self.name}: stopped; {kept}; {advice}") from None
            if done % save_every == 0 and done < end:
                self.save(counters())
                self.saved = done
            stopped_by = max_over_ranks(stop_requested() or 0, self.dist.device) if stop_requested else 0
            if stopped_by:
                return stopped_by
        return 0

    def finish(self, counters: dict, stopped_by: int, unit: str, done: int, trained: bool = True) -> None:
        """Save the last state (a rerun of a finished run trained nothing: its checkpoint stays as it is);
        when a signal (`stopped_by`) ended the run early, raise Interrupted then."""
        if trained:
            self.save(counters)
        self.saved = done
        if stopped_by:
            raise Interrupted(stopped_by, f"stopped by {signal_name(stopped_by)} after {unit} {done}: checkpoint "
                                          f"{self.checkpoint} saved; rerun to resume from it")

    def step(self, rows: int, loss_of: LossOf, grad_clip: float = 0.0) -> float:
        """`optimizer_step` with this run's model, optimiser, micro-batches and autocast."""
        return optimizer_step(self.train_model, self.optimizer, rows, loss_of, self.micro_batch, self.autocast,
                              grad_clip)

    def tracker(self, open_log: OpenLog | None, start: int) -> Log:
        """The run's `log(step, metrics)`: `open_log(start)` on rank 0, a no-op elsewhere."""
        return open_log(start) if open_log and self.dist.is_main else (lambda step, metrics: None)
