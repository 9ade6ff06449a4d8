"""Which device a stage computes on: the one decision every stage (pretrain, linear, finetune, embed, bench,
gpu-check) takes through `pick_device`.

`distributed.device` in params.yaml (and `ajepa embed --device`):
  cuda  the GPU, or a stop with one line that says why CUDA cannot be used and what to do (no usable
        torch build, no NVIDIA driver, a driver older than this torch build needs, no visible device);
  cpu   the CPU, without touching CUDA;
  auto  the GPU when CUDA works, else the CPU; said on stderr when an NVIDIA driver is installed but
        CUDA does not work, so that a broken GPU setup never turns into a months-long CPU run unnoticed.

Why CUDA does not work is read from the driver itself (libcuda's cuDriverGetVersion, through ctypes),
the environment and torch's build, not from torch's warning alone: torch warns only on the first CUDA
call of a process, and a private torch function for the driver's version is not in every build.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from ajepa.errors import AjepaError

__all__ = ["SETTINGS", "cuda_problem", "driver_cuda_version", "pick_device"]

SETTINGS = ("auto", "cuda", "cpu")
# The oldest Linux driver each CUDA major release runs on: a build for CUDA 12.x runs on any driver
# for 12.0 or later (NVIDIA's "minor version compatibility"; CUDA Toolkit release notes, table 2/3).
DRIVER_FOR_CUDA = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
DRIVER_FILE = Path("/proc/driver/nvidia/version")  # the loaded kernel module's version, when there is one


def driver_cuda_version() -> int | None:
    """The newest CUDA version the installed NVIDIA driver supports, as cuDriverGetVersion reports it
    (1000 * major + 10 * minor: 12040 is 12.4); None when no driver library loads."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        failed = lib.cuDriverGetVersion(ctypes.byref(version))
    except (OSError, AttributeError):
        return None
    return version.value if failed == 0 and version.value > 0 else None


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _driver_release() -> str:
    """' 535.104.05' from the kernel module's version file, or '' where it cannot be read."""
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", DRIVER_FILE.read_text())
    except OSError:
        return ""
    return f" {found.group(1)}" if found else ""


_SAID: list[str] = []  # torch's words on CUDA's start, which it says once per process: kept for later calls


def _torch_said() -> tuple[bool, str]:
    """(whether CUDA works, what torch warned about it, without its "Triggered internally at ..." tail)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    for w in caught:
        if "CUDA" in str(w.message):
            _SAID.append(re.sub(r"\s*\(Triggered internally at.*", "", " ".join(str(w.message).split())))
    return available, _SAID[0] if _SAID else ""


def cuda_problem() -> str | None:
    """None when CUDA works; otherwise one line: why it does not, and what to do."""
    available, said = _torch_said()
    if available:
        return None
    build = torch.version.cuda
    if build is None:
        return (f"this torch ({torch.__version__}) is built without CUDA: install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/)")
    driver = driver_cuda_version()
    if driver is None:
        return ("no NVIDIA driver found (libcuda.so.1 does not load): run on a GPU node (under SLURM, ask for GPUs "
                "with --gres=gpu:N or --gpus=N) or install the NVIDIA driver")
    major = int(build.split(".")[0])
    if driver < major * 1000 or "too old" in said:
        need = DRIVER_FOR_CUDA.get(major, f"one for CUDA {major}.0")
        return (f"the NVIDIA driver{_driver_release()} supports CUDA {_cuda_text(driver)}, older than this torch "
                f"({torch.__version__}, built for CUDA {build}) needs: update the driver to {need} or newer, or "
                f"install a torch build for CUDA {_cuda_text(driver)} or older "
                "(https://pytorch.org/get-started/previous-versions/)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return (f"CUDA_VISIBLE_DEVICES={visible!r} leaves this process no GPU: unset it or list GPUs that exist "
                "(nvidia-smi -L); under SLURM ask for GPUs with --gres=gpu:N or --gpus=N, which sets it")
    return (f"the NVIDIA driver{_driver_release()} (CUDA {_cuda_text(driver)}) is installed but CUDA finds no usable "
            f"GPU{': ' + said[:300] if said else ''}: check `nvidia-smi` on this node")


def pick_device(setting: str | torch.device | None = "auto", local_rank: int = 0,
                key: str = "distributed.device") -> torch.device:
    """The device for `setting` (None is auto): cpu; cuda:`local_rank` for auto and cuda; cuda:N as named.

    cuda (or cuda:N) without a usable GPU raises AjepaError with cuda_problem's line, naming `key`; auto
    falls back to the CPU, with a line on stderr when an NVIDIA driver is there but CUDA does not work."""
    name = "auto" if setting is None else str(setting)
    what = f"{key} {name}" if key.startswith("-") else f"{key} = {name!r}"  # a flag, or a params.yaml key
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise AjepaError(f"{what}: must be auto, cuda, cuda:N or cpu")
    problem = cuda_problem()
    if problem and name != "auto":
        raise AjepaError(f"{what} but CUDA cannot be used: {problem}")
    if problem:
        if driver_cuda_version() is not None:
            print(f"ajepa: warning: {what} runs on the CPU: {problem}", file=sys.stderr)
        return torch.device("cpu")
    index = int(name.split(":")[1]) if ":" in name else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        which = what if ":" in name else f"LOCAL_RANK {index}"
        raise AjepaError(f"{which} but only {count} CUDA device(s) on this node: start at most {count} processes "
                         f"per node (torchrun --nproc_per_node), or name a device below {count}")
    unsupported = _arch_problem(index)
    if unsupported:
        raise AjepaError(f"{what} but CUDA cannot be used: {unsupported}")
    return torch.device("cuda", index)


def _arch_problem(index: int) -> str | None:
    """None when this torch build has kernels for GPU `index`: compiled for its architecture (sm_XY of the
    same major version, not newer) or as PTX the driver compiles for it (compute_XY, not newer); otherwise
    one line. CUDA 13 builds, for one, dropped Volta (V100) and older: CUDA looks fine until a kernel runs."""
    major, minor = torch.cuda.get_device_capability(index)
    archs = torch.cuda.get_arch_list()
    own = major * 10 + minor

    def runs(arch: str) -> bool:
        kind, _, number = arch.partition("_")
        version = int(re.sub(r"\D", "", number) or 0)
        return version <= own and (kind == "compute" or (kind == "sm" and version // 10 == major))

    if not archs or any(runs(a) for a in archs):
        return None
    return (f"GPU {index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor}) is not among "
            f"the architectures this torch ({torch.__version__}) is built for ({' '.join(archs)}): install a torch "
            "build that supports it (https://pytorch.org/get-started/previous-versions/)")
