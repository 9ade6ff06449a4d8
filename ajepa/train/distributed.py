"""torchrun-style process groups: one process per GPU, started by torchrun or by `launch` itself.

Reads only the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
The device is chosen from LOCAL_RANK, never from CUDA_VISIBLE_DEVICES: neither DVC nor Snakemake
sets it, so every process sees every GPU of its node and must pick its own.

`launch` starts the processes of one node with torch's elastic launcher (the API torchrun itself is
built on), so a plain `ajepa pretrain` under `dvc repro` or Snakemake uses every GPU of its node; a
process that a launcher already started (WORLD_SIZE set: torchrun, or srun + torchrun across nodes)
never launches again.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ajepa.device import pick_device
from ajepa.errors import AjepaError, Interrupted
from ajepa.interrupt import signal_name

__all__ = ["DistInfo", "init_distributed", "cleanup", "all_reduce_mean", "max_over_ranks", "launched", "local_processes",
           "launch"]


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


def _backend(setting: str, dev: torch.device) -> str:
    if setting == "auto":
        return "nccl" if dev.type == "cuda" else "gloo"
    if setting == "nccl" and dev.type != "cuda":
        raise AjepaError(f"distributed.backend = 'nccl' needs CUDA devices, but this process runs on {dev}: "
                         f"use gloo (or auto)")
    return setting


def init_distributed(device: str | torch.device | None = None, backend: str = "auto") -> DistInfo:
    """Join the process group torchrun describes, or run single-process when WORLD_SIZE is unset or 1.

    `device` is distributed.device (ajepa.device.pick_device): auto (None) takes cuda:LOCAL_RANK when CUDA
    works, else the CPU; cuda insists on the GPU; cpu, or cuda:N, as named. `backend` "auto": nccl for CUDA
    devices, gloo for CPU. Calling it again in an initialised process returns the same description without
    re-initialising."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise AjepaError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        # Before any CUDA work, so that every later allocation and the NCCL communicator land on
        # this process's GPU rather than all on cuda:0.
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = _backend(backend, dev)
        kwargs = {"device_id": dev} if backend == "nccl" else {}
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


def launched() -> bool:
    """Whether a launcher started this process as one of a group (torchrun, srun + torchrun, `launch`)."""
    return os.environ.get("WORLD_SIZE", "") != ""


def local_processes(setting: int | str, global_batch: int | None = None) -> int:
    """How many processes `launch` starts on this node for `distributed.processes`.

    "auto": one per visible CUDA device, 1 without CUDA; when a global batch is given, the largest
    count up to that which divides it (the batch is split evenly: 16 clips on 6 GPUs run on 4).
    An integer is taken as it is (say 2 gloo processes on a CPU, to test the distributed path)."""
    if setting != "auto":
        return int(setting)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    while global_batch and n > 1 and global_batch % n:
        n -= 1
    return max(n, 1)


def _worker(fn: Callable, args: tuple, threads: int, errors: str) -> Any:
    if threads:
        # several CPU processes on one machine: each takes its share of the cores, not all of them
        torch.set_num_threads(threads)
    try:
        return fn(*args)
    except Interrupted as e:  # saved and stopped by a signal: one line, and the shell's exit status for it
        print(f"rank {os.environ.get('RANK', '0')}: {e}", file=sys.stderr, flush=True)
        os._exit(128 + e.signum)
    except AjepaError as e:
        # bad input, not a bug: one line for the parent to raise; exiting non-zero (rather than
        # returning) makes the launcher stop the other processes, which may wait in a collective
        Path(errors, os.environ.get("RANK", "0")).write_text(str(e))
    except BaseException:
        traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


def launch(fn: Callable, args: tuple, processes: int) -> Any:
    """Run `fn(*args)` in `processes` new processes of one node (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT set as torchrun sets them, on a free local port) and return rank 0's result.

    `fn` and `args` must be picklable (the processes are spawned). When any process fails, the launcher
    stops the others, and an AjepaError raised by `fn` is raised here as one line (a crash as a pointer to
    its traceback above)."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          start_method="spawn", monitor_interval=0.1)
    threads = 0 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // processes)
    with tempfile.TemporaryDirectory(prefix="ajepa-launch-") as errors:
        try:
            return elastic_launch(config, _worker)(fn, args, threads, errors)[0]
        except SignalException as e:  # the launcher passed the signal on and waited for the processes to save
            raise Interrupted(int(e.sigval), f"stopped by {signal_name(int(e.sigval))}: the {processes} processes "
                                             f"saved their state at the end of their step; rerun to resume") from None
        except ChildFailedError as e:
            reported = sorted(Path(errors).iterdir(), key=lambda f: int(f.name))
            if reported:
                raise AjepaError(reported[0].read_text()) from None
            rank, failure = e.get_first_failure()
            raise AjepaError(f"process {rank} of {processes} failed (exit code {failure.exitcode}; "
                             f"its traceback is above)") from None
