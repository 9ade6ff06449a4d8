"""torchrun-style process groups: one process per GPU, or a single process when not launched by torchrun.

Reads only the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
The device is chosen from LOCAL_RANK, never from CUDA_VISIBLE_DEVICES: neither DVC nor Snakemake
sets it, so every process sees every GPU of its node and must pick its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ajepa.errors import AjepaError

__all__ = ["DistInfo", "init_distributed", "cleanup", "all_reduce_mean", "max_over_ranks"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool  # rank 0: the one process that writes checkpoints, logs and metrics


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise AjepaError(f"environment variable {name}={value!r} is not an integer") from None


def _pick_device(local_rank: int, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise AjepaError(f"LOCAL_RANK {local_rank} but only {count} CUDA device(s) on this node: "
                         f"start at most {count} processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes, or run single-process when WORLD_SIZE is unset or 1.

    `device` overrides the choice (e.g. "cpu" to debug on a GPU node); by default cuda:LOCAL_RANK when
    CUDA is available, else CPU. Backend: nccl for CUDA devices, gloo for CPU. Calling it again in an
    initialised process returns the same description without re-initialising."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise AjepaError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    dev = _pick_device(local_rank, device)
    if dev.type == "cuda":
        # Before any CUDA work, so that every later allocation and the NCCL communicator land on
        # this process's GPU rather than all on cuda:0.
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def cleanup() -> None:
    """Leave the process group (no-op when single-process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all ranks, as a new tensor (the input is left untouched); identity
    when single-process. Every rank must call it, in the same order, or all of them hang."""
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.double()  # a mean of counts is not an integer
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` of all ranks (itself when single-process), so that every rank takes the same
    branch (e.g. stop here because one of them was signalled). Every rank must call it, in the same order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    out = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())
