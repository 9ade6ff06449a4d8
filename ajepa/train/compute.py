"""How a training step is computed, never what it computes: gradient accumulation over micro-batches,
the `auto` micro-batch probe, and torch.compile of the transformer blocks.

Gradient accumulation. The configured batch stays the optimiser's batch (global over the processes);
each process cuts its share into micro-batches, back-propagates each micro-batch's loss scaled by its
share of the batch, and the optimiser steps once. Every loss we train with is a mean over samples
that each contribute the same number of terms (the pretraining masks are rectangular [B, M, Kt]; a
fine-tuning clip has one target row), so the sum of the scaled micro-batch gradients is the batch
gradient, up to float rounding. Under DDP the gradients are all-reduced on the last micro-batch only
(`no_sync` on the others), which averages the accumulated sums, as DDP averages whole batches.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.nn.parallel import DistributedDataParallel

from ajepa.errors import AjepaError

__all__ = ["COMPUTE_KEYS", "without_compute_keys", "micro_slices", "accumulate", "resolve_micro_batch", "largest_fitting", "fits_in_cuda_memory",
           "min_over_processes", "compile_blocks", "check_compile"]

MicroBatch = int | str | None  # clips per forward/backward: an int, "auto", or None (the whole batch)

# The config keys that say how a step is computed, not what it computes. A run resumed with other
# values (say `micro_batch: auto` on another GPU) continues the same trajectory up to float rounding
# (and, with dropout or drop path, other draws), so they are no part of a run's identity. The loader's
# workers and prefetch change nothing at all: a batch is a function of its step (ajepa.data.loader).
COMPUTE_KEYS = ("micro_batch", "activation_checkpointing", "compile", "num_workers", "prefetch")


def without_compute_keys(section: dict) -> dict:
    """A config section (as a dict) without COMPUTE_KEYS: what a run's identity hash should see."""
    return {k: v for k, v in section.items() if k not in COMPUTE_KEYS}


def micro_slices(n: int, size: int | None) -> list[slice]:
    """Rows [0, n) in consecutive slices of `size` (the last one shorter); one slice when size is None."""
    step = n if not size or size >= n else size
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]


def accumulate(model: nn.Module, n: int, size: int | None, loss_of: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """Backward each micro-batch's `loss_of(rows)` (a mean over its rows), scaled by its share of the n
    rows, into the gradients; return the batch's mean loss (detached). With one micro-batch it is
    exactly `loss.backward()`. A DDP `model` synchronises on the last micro-batch only."""
    slices = micro_slices(n, size)
    if len(slices) == 1:
        loss = loss_of(slices[0])
        loss.backward()
        return loss.detach()
    total = None
    for i, rows in enumerate(slices):
        last = i == len(slices) - 1
        # DDP's no_sync must cover the forward as well as the backward
        with model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext():
            share = (rows.stop - rows.start) / n
            loss = loss_of(rows)
            (loss * share).backward()
        total = loss.detach() * share if total is None else total + loss.detach() * share
    return total


def resolve_micro_batch(setting: MicroBatch, batch: int, device: torch.device,
                        fits: Callable[[int], bool] | None = None) -> int:
    """The micro-batch size for a per-process batch of `batch` clips: the whole batch for None (and for
    "auto" off CUDA, where nothing is short of memory but the host), an int capped at the batch, or on
    CUDA for "auto" the largest of batch, batch/2, batch/4, ... (rounded up) for which `fits(size)`."""
    if setting is None or (setting == "auto" and device.type != "cuda"):
        return batch
    if setting == "auto":
        if fits is None:
            raise ValueError("micro_batch auto needs a fits(size) probe")
        return largest_fitting(batch, fits)
    return min(int(setting), batch)


def largest_fitting(batch: int, fits: Callable[[int], bool]) -> int:
    """The first of batch, ceil(batch / 2), ... 1 for which fits(size) holds; an error when none does."""
    size = batch
    while True:
        if fits(size):
            return size
        if size == 1:
            raise AjepaError("micro_batch auto: not even one clip per forward/backward fits in GPU memory; "
                             "use a smaller model, or activation_checkpointing: true")
        size = (size + 1) // 2


def fits_in_cuda_memory(device: torch.device, run: Callable[[], None], reserve_bytes: int = 0,
                        headroom: float = 0.85) -> bool:
    """Whether `run()` (a forward and backward at some size) completes on `device` with its peak
    allocation plus `reserve_bytes` (what the step will add later, e.g. AdamW's moments) within
    `headroom` of the memory this process can have; the margin covers batches whose masks keep more
    patches than the probe's. The RNG streams are left as they were, so probing never changes a run."""
    torch.cuda.empty_cache()
    capacity = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.random.fork_rng(devices=[device]):
            run()
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated(device) + reserve_bytes <= headroom * capacity


def min_over_processes(value: int, device: torch.device) -> int:
    """The smallest `value` over all processes (every one must call it); `value` when single-process."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block of `model` in place (timm's Block and its subclasses);
    returns how many. Blocks rather than the whole model: the context and target sizes change from
    step to step (the masks), and a block recompiles once or twice for new sizes (then its graph
    takes any size); the mask gathering and the loss stay eager."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if blocks:
        check_compile(next(blocks[0].parameters()).device)
    for blk in blocks:
        blk.compile()
    return len(blocks)


def check_compile(device: torch.device) -> None:
    """Compile and run a one-line function, so that a machine where torch.compile cannot work (no C++
    compiler for the CPU backend, no Triton for CUDA) fails here with one line, before training, rather
    than with a long trace at the first step."""
    try:
        torch.compile(lambda t: torch.nn.functional.gelu(t) * 2.0)(torch.ones(8, device=device))
    except Exception as e:  # inductor raises many kinds: a missing compiler, Triton, a bad cache dir
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise AjepaError(f"torch.compile does not work on this machine ({type(e).__name__}: {why}); "
                         f"set pretrain.compile: false (or drop --compile)") from None
