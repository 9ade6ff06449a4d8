"""`ajepa gpu-check` (`make gpu-check`): does this machine's GPU setup run the project? One JSON object.

In minutes on one GPU it runs what the paper's setup will run, each part through the same `ajepa`
commands a user types, in a temporary project on the embedded synthetic dataset:

- paper_step: bf16 training steps at the paper's size (ViT-B on 1024 x 128, predictor 16 x 512, the paper
  preset's masking), their MFU (`ajepa bench pretrain`), and their peak memory against the GPU's;
- micro_batch: what `micro_batch: auto` chooses for the paper's global batch of 512 on this node's GPUs;
- data_path: the pretraining loader's clips/s from a store the check writes (`ajepa bench loader`), with
  the paper preset's workers, against the clips/s the GPUs consume;
- open_files: the open-file limit (RLIMIT_NOFILE) against the descriptors the paper's store takes;
- pretrain: 300 steps of the embedded default's recipe, and whether the loss falls;
- resume: the same run killed with SIGKILL after its first checkpoint, then resumed: does it end where
  the uninterrupted run ended?
- downstream: the linear probes and a fine-tuning epoch on the pretrained encoders;
- ddp and torchrun: the run on every visible GPU through NCCL, with the processes `ajepa pretrain`
  starts itself and with torchrun; skipped (never "ok") on one GPU.

Every check reports a status, "ok", "failed" or "skipped" (with the reason), and the object's "ok" is
true only when none failed. Without a usable GPU it stops with the one line ajepa.device gives; `--cpu`
runs a miniature of every check on the CPU (tiny sizes, a few steps, two gloo processes) in a minute or two.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import yaml

from ajepa.config import parse_params, read_yaml
from ajepa.cpus import available_cpus
from ajepa.data.store import FeatureStore
from ajepa.device import cuda_problem
from ajepa.errors import AjepaError
from ajepa.export import read_export
from ajepa.tools.bench import bench_loader, bench_pretrain, plan_clips_per_s_per_gpu
from ajepa.tools.presets import load_preset, merge, preset_path
from ajepa.train.checkpoint import load_checkpoint
from ajepa.train.distributed import local_processes
from ajepa.train.engine import Engine, single_process
from ajepa.train.pretrain import build, probe_loss

CPU_ENV = "AJEPA_GPU_CHECK_CPU"  # set to 1: as --cpu, the miniature on the CPU
CHECKS = ("paper_step", "micro_batch", "data_path", "open_files", "pretrain", "resume", "downstream", "ddp",
          "torchrun")
# AudioSet-2M, the paper's pretraining set: about 2.0 M clips (docs/compute.md, "Storage")
PAPER_POOL_CLIPS = 2_000_000
# descriptors a training process holds besides the shards: libraries, pipes to its loader workers, the
# process group's sockets, tensors in flight between processes (torch shares them as descriptors)
FD_MARGIN = 256


def settings(params_file: str, miniature: bool) -> dict:
    """The temporary project's params: the embedded default (or, for the miniature, its smoke preset)
    pretraining on the synthetic pool only, in one process on the GPU (the miniature: the CPU), with a
    checkpoint every 10 steps so the kill lands early, and the downstream stages cut to one benchmark and
    a short fine-tuning."""
    p = read_yaml(Path(params_file).read_text(), str(params_file))
    if miniature:
        merge(p, load_preset(preset_path("smoke")))
        merge(p, {"datasets": {"synth": {"prepare": {"pool_clips": 48}}},
                  "pretrain": {"optim": {"epochs": 5, "lr": 2.0e-3}, "probe": {"every": 0}}})
    merge(p, {"pipeline": {"datasets": ["synth"], "benchmarks": ["synth"]},
              "distributed": {"device": "cpu" if miniature else "cuda", "processes": 1, "backend": "auto"},
              "pretrain": {"datasets": ["synth"], "checkpoint_every": 10},
              "finetune": {"synth": {"epochs": 1, "random_init_baseline": False, "runs": 1}},
              "linear": {"attentive": {"epochs": 2}}})
    parse_params(p)  # a bad params file fails here, before any work
    return p


def paper_params(params_file: str, miniature: bool):
    """The paper preset over `params_file` (the miniature: the smoke preset), parsed."""
    p = read_yaml(Path(params_file).read_text(), str(params_file))
    merge(p, load_preset(preset_path("smoke" if miniature else "paper")))
    return parse_params(p)


def ajepa(cwd: Path, *args: str, launcher: tuple[str, ...] = ()) -> str:
    """Run one `ajepa` command in `cwd` (under `launcher`'s python module, e.g. torch.distributed.run);
    what it printed, or an error naming the command."""
    r = subprocess.run([sys.executable, *launcher, "-m", "ajepa.cli", *args], cwd=cwd, capture_output=True,
                       text=True, env=_clean_env())
    if r.returncode != 0:
        raise RuntimeError(f"ajepa {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout.strip()


def _clean_env() -> dict:
    # a check run under torchrun must not pass its rank to the runs it starts
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def project(root: Path, params: dict, data: Path | None = None) -> Path:
    """A working directory with this params.yaml, sharing `data` (the prepared dataset) when given."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if data is not None:
        (root / "data").symlink_to(data.resolve())
    return root


def run_pretrain(cwd: Path, launcher: tuple[str, ...] = ()) -> dict:
    """`ajepa pretrain` to the end: its seconds, logged losses, metrics and printed summary."""
    t0 = time.perf_counter()
    summary = ajepa(cwd, "pretrain", launcher=launcher)
    loss = pd.read_csv(cwd / "results/pretrain/live/plots/metrics/train/loss.tsv", sep="\t")["loss"].tolist()
    # the model's figures and the machine's (seconds, samples/s, device: logs/timing, kept apart)
    metrics = {**json.loads((cwd / "results/pretrain/metrics.json").read_text()),
               **json.loads((cwd / "logs/timing/pretrain.json").read_text())}
    return {"seconds": round(time.perf_counter() - t0, 1), "loss": loss, "metrics": metrics, "summary": summary}


def encoder_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' exported context encoders."""
    wa, wb = (read_export(root / "models/pretrain/context")[1] for root in (a, b))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def same_end(a: dict, b: dict, rel_tol: float) -> bool:
    """Two runs end at the same loss, to `rel_tol` (0: bit for bit)."""
    la, lb = a["metrics"]["final_loss"], b["metrics"]["final_loss"]
    return la == lb if rel_tol == 0 else math.isclose(la, lb, rel_tol=rel_tol)


def _tolerance(cuda: bool) -> float:
    # on CUDA, atomic adds in the backward pass sum in a different order from run to run: the same run
    # drifts apart by float noise, so the check allows 2% on the final loss; the CPU is bit-exact
    return 0.02 if cuda else 0.0


def memory_capacity(device: torch.device) -> int:
    """Bytes a run on `device` can use: the GPU's memory, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_paper_step(params_file: str, miniature: bool) -> dict:
    """bf16 steps at the paper's size and its per-GPU batch of 64 (the miniature: the smoke size, fp32 on
    the CPU): MFU, and the peak memory, which must stay within 90% of the device's (the rest is the CUDA
    context's, the allocator's fragments and the masks that keep more patches than the timed ones)."""
    size = dict(batch=4, steps=1) if miniature else dict(encoder="base", target_length=1024, batch=64,
                                                          predictor_dim=512, predictor_depth=16, steps=6)
    device = torch.device("cpu") if miniature else torch.device("cuda", 0)
    r = bench_pretrain(paper_params(params_file, miniature), device=str(device), **size)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the runs that follow are other processes on the same GPU
    peak, capacity = r["peak_memory"]["bytes"], memory_capacity(device)
    return {"ok": r["samples_per_s"] > 0 and 0 < r["mfu"] <= 1 and peak <= 0.9 * capacity, "dtype": r["dtype"],
            "input": r["input"], "encoder": r["encoder"], "predictor": r["predictor"], "batch": r["batch"],
            "masking_mode": r["masking_mode"], "samples_per_s": round(r["samples_per_s"], 1),
            "mfu": round(r["mfu"], 3), "matmul_peak_flops_per_s": r["peak_flops_per_s"],
            "peak_memory_gib": round(peak / 2**30, 2), "memory_capacity_gib": round(capacity / 2**30, 2),
            "memory_fraction": round(peak / capacity, 3), "memory_measure": r["peak_memory"]["what"]}


def check_micro_batch(params_file: str, miniature: bool, processes: int) -> dict:
    """What `micro_batch: auto` chooses for the paper's global batch on this node (one process per GPU),
    probed by the pretraining code itself on a paper-size model: clips per forward/backward and the
    accumulation steps that make up the per-process batch. On the CPU auto takes the whole batch."""
    params = paper_params(params_file, miniature)
    cfg = params.pretrain
    device = torch.device("cpu") if miniature else torch.device("cuda", 0)
    patch, length = params.features.patch_size, params.dataset(cfg.datasets[0]).target_length
    grid = (length // patch, params.features.num_mel_bins // patch)
    local = cfg.optim.batch_size // processes
    # one process's share of the batch, as each of the `processes` resolves it (no process group here)
    parts = build(cfg, grid, patch, 1000, device)
    engine = Engine("pretrain", parts, single_process(device), Path(os.devnull), "")
    engine.configure(local, cfg.micro_batch, cfg.activation_checkpointing, False,
                     probe_loss(cfg, parts["model"], grid, patch, 1000, device))
    size = engine.micro_batch or local
    del engine, parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ok": 1 <= size <= local, "setting": cfg.micro_batch, "global_batch": cfg.optim.batch_size,
            "processes": processes, "per_process_batch": local, "micro_batch": size,
            "accumulation_steps": math.ceil(local / size), "input": [length, params.features.num_mel_bins]}


def check_data_path(params_file: str, miniature: bool, paper_step: dict | None, processes: int) -> dict:
    """`ajepa bench loader` on a store it writes (the paper's 1024 x 128 clips; the miniature: small ones):
    clips/s per loader worker, times the workers the paper preset starts per GPU process (at most the
    cores this process may use), against what the GPUs consume: the paper step's samples/s on each GPU,
    or, without that figure, the compute plan's (docs/compute.md)."""
    params = paper_params(params_file, miniature)
    size = dict(clips=48, frames=96, batch=8, steps=3) if miniature else dict(clips=512, frames=1024, batch=64, steps=8)
    r = bench_loader(params, workers=(1, 2), **size)
    per_worker = min(r["clips_per_s_per_worker"].values())
    workers = min(max(params.pretrain.num_workers, 1) * processes, available_cpus())
    measured = paper_step is not None and paper_step.get("status") == "ok"
    per_gpu = paper_step["samples_per_s"] if measured else plan_clips_per_s_per_gpu()
    supply, need = per_worker * workers, per_gpu * processes
    return {"ok": supply >= need, "store": f"{r['clips']} clips of {r['clip_shape'][0]} x {r['clip_shape'][1]}, "
                                          "written by the check", "clips_per_s": r["clips_per_s"],
            "clips_per_s_per_worker": round(per_worker, 1), "loader_workers": workers, "processes": processes,
            "supply_clips_per_s": round(supply, 1), "need_clips_per_s": round(need, 1),
            "need_from": "paper_step samples_per_s x processes" if measured else "the compute plan (docs/compute.md)",
            "plan_clips_per_s_per_gpu": r["plan_clips_per_s_per_gpu"]}


def descriptors_per_shard(store_dir: Path) -> float:
    """Open file descriptors this process gains per shard it reads from (every shard of `store_dir`
    memory-mapped, as a loader worker ends up doing): 1 with NumPy's memmap, which keeps a duplicate."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return 1.0  # no /proc (macOS): what NumPy's memmap holds
    store = FeatureStore(store_dir)
    firsts = store.index.drop_duplicates("shard").index  # one clip of each shard
    before = len(list(fd_dir.iterdir()))
    for i in firsts:
        store.raw(int(i))
    gained = len(list(fd_dir.iterdir())) - before
    del store
    return gained / max(len(firsts), 1)


def check_open_files(params_file: str, store_dir: Path) -> dict:
    """RLIMIT_NOFILE (soft and hard) against the descriptors the paper's pretraining store takes in each
    loader worker: one per memory-mapped shard (measured on the store the check wrote) of about 2.0 M
    clips in shards of features.shard_clips, plus FD_MARGIN. The soft limit is what a process gets; a
    process, or `ulimit -n` in the job script, may raise it up to the hard limit."""
    params = paper_params(params_file, False)  # the paper's shards, whatever the store of the check
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_shard = descriptors_per_shard(store_dir)
    shards = math.ceil(PAPER_POOL_CLIPS / params.features.shard_clips)
    need = math.ceil(shards * per_shard) + FD_MARGIN
    unlimited = resource.RLIM_INFINITY
    r = {"ok": soft == unlimited or soft >= need, "soft_limit": None if soft == unlimited else soft,
         "hard_limit": None if hard == unlimited else hard, "descriptors_per_shard": round(per_shard, 2),
         "paper_shards": shards, "need": need}
    if not r["ok"]:
        r["remedy"] = (f"`ulimit -n {need}` in the job script before `ajepa pretrain`" if hard == unlimited
                       or hard >= need else f"the hard limit {hard} is below {need}: ask the cluster's admins "
                       "to raise it (limits.conf, or slurmd's LimitNOFILE), or use larger features.shard_clips")
    return r


def check_pretrain(run: dict, steps: int) -> dict:
    """All steps ran and the loss falls: the mean of the last fifth of the logged losses is below the mean
    of the first fifth."""
    loss, k = run["loss"], max(1, len(run["loss"]) // 5)
    first, last = sum(loss[:k]) / k, sum(loss[-k:]) / k
    m = run["metrics"]
    return {"ok": last < first and m["steps"] == steps, "steps": m["steps"],
            "first_loss": round(first, 4), "last_loss": round(last, 4), "seconds": run["seconds"],
            "samples_per_s": m["samples_per_s"], "device": m["device"]}


def check_resume(cwd: Path, straight: dict, cuda: bool) -> dict:
    """`ajepa pretrain` killed (SIGKILL, with its loader workers) once its first checkpoint is written,
    then run again: it resumes from the checkpoint and ends as the uninterrupted run ended."""
    checkpoint = cwd / "models/pretrain_state/checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "ajepa.cli", "pretrain"], cwd=cwd, env=_clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(checkpoint)["step"]
    resumed = run_pretrain(cwd)
    found = re.search(r"from step (\d+)", resumed["summary"])
    from_step = int(found.group(1)) if found else None
    diff = encoder_difference(cwd, cwd.parent / "a")
    return {"ok": killed and from_step == killed_at > 0 and same_end(straight, resumed, _tolerance(cuda)),
            "killed": killed, "checkpoint_step": killed_at, "resumed_from_step": from_step,
            "final_loss": resumed["metrics"]["final_loss"],
            "uninterrupted_final_loss": straight["metrics"]["final_loss"],
            "max_weight_difference": diff}


def check_downstream(cwd: Path) -> dict:
    """The linear probes (logistic regression and the attentive probe) and one fine-tuning epoch on the
    pretrained encoders."""
    t0 = time.perf_counter()
    linear = ajepa(cwd, "linear", "synth")
    t1 = time.perf_counter()
    finetune = ajepa(cwd, "finetune", "synth")
    done = all((cwd / f"results/{stage}/synth/metrics.json").exists() for stage in ("linear", "finetune"))
    return {"ok": done, "linear_seconds": round(t1 - t0, 1), "finetune_seconds": round(time.perf_counter() - t1, 1),
            "linear": linear.splitlines()[0], "finetune": finetune.splitlines()[0]}


def spread_processes(cuda: bool) -> int:
    """The processes the ddp and torchrun checks run: one per visible GPU (the miniature: two on the CPU)."""
    return torch.cuda.device_count() if cuda else 2


def check_spread(root: Path, straight: dict, params: dict, data: Path, cuda: bool, torchrun: bool) -> dict:
    """The run on several processes, through NCCL on the GPUs (the miniature: gloo on the CPU), started by
    `ajepa pretrain` itself or (`torchrun`) by torchrun, against the single-process run: the same steps and
    final loss. Skipped with one GPU: there is nothing to spread over."""
    processes = spread_processes(cuda)
    backend = "nccl" if cuda else "gloo"
    if processes < 2:
        return {"skipped": "one visible GPU: nothing to spread over", "processes": processes}
    params = {**params, "distributed": {**params["distributed"], "backend": backend,
                                       "processes": 1 if torchrun else processes}}
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)) if torchrun else ()
    cwd = project(root, params, data)
    run = run_pretrain(cwd, launcher)
    m = run["metrics"]
    # a global batch split over processes sums in another order: float noise, on the CPU too
    tolerance = max(_tolerance(cuda), 1e-4)
    return {"ok": m["world_size"] == processes and m["steps"] == straight["metrics"]["steps"]
            and same_end(straight, run, tolerance), "processes": processes, "backend": backend,
            "world_size": m["world_size"], "final_loss": m["final_loss"],
            "single_process_final_loss": straight["metrics"]["final_loss"], "samples_per_s": m["samples_per_s"],
            "max_weight_difference": encoder_difference(cwd, cwd.parent / "a")}


def guarded(results: dict, name: str, check: Callable[[], dict]) -> dict | None:
    """Run one check into results[name], with its status: "ok", "failed" (a failure is recorded there,
    not raised, so the JSON reports every check) or "skipped" (ok null: a skip is never a pass).
    Returns the result when it passed."""
    t0 = time.perf_counter()
    try:
        r = check()
    except Exception as e:  # noqa: BLE001 - the report names the failure, whatever it is
        r = {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:2000]}"}
    if "skipped" in r:
        r = {**r, "ok": None, "status": "skipped"}
    else:
        r["status"] = "ok" if r["ok"] else "failed"
    r["check_seconds"] = round(time.perf_counter() - t0, 1)
    results[name] = r
    return r if r["status"] == "ok" else None


def _checks_on_a_project(r: dict, tmp: Path, params_file: str, miniature: bool) -> None:
    """The checks that run `ajepa` commands on the synthetic dataset, into r."""
    cuda, params = not miniature, settings(params_file, miniature)
    cfg = parse_params(params)
    # 300 for the embedded default: 3 epochs of the 1,600 synthetic pool clips in batches of 16
    steps = cfg.pretrain.optim.epochs * (cfg.dataset("synth").prepare.pool_clips // cfg.pretrain.optim.batch_size)
    base = project(tmp / "data-prep", params)
    for command in ("prepare", "features", "pool"):
        ajepa(base, command, "synth")
    guarded(r, "open_files", lambda: check_open_files(params_file, base / "data/features/synth"))
    a = project(tmp / "a", params, base / "data")
    runs = {}
    guarded(r, "pretrain", lambda: check_pretrain(runs.setdefault("a", run_pretrain(a)), steps))
    for name in ("resume", "downstream", "ddp", "torchrun"):
        r[name] = {"skipped": "the pretraining run failed", "ok": None, "status": "skipped"}
    if "a" in runs:
        guarded(r, "resume", lambda: check_resume(project(tmp / "b", params, base / "data"), runs["a"], cuda))
        guarded(r, "downstream", lambda: check_downstream(a))
        for name in ("ddp", "torchrun"):
            guarded(r, name, lambda name=name: check_spread(tmp / name, runs["a"], params, base / "data", cuda,
                                                  torchrun=name == "torchrun"))


def gpu_check(params_file: str = "params.yaml", cpu: bool = False) -> dict:
    """Every check's result and status, the checks skipped and failed, and ok when none failed. Without a
    usable GPU (and without `cpu`) an AjepaError: the one line that says why and what to do."""
    miniature = cpu or os.environ.get(CPU_ENV, "") not in ("", "0")
    problem = None if miniature else cuda_problem()
    if problem:
        raise AjepaError(f"no usable GPU: {problem} (--cpu runs a miniature of the checks on the CPU)")
    t0 = time.perf_counter()
    settings(params_file, miniature)  # a bad params file fails here, before any work
    r = {"cuda": not miniature, "miniature": miniature, "torch": torch.__version__,
         "device": "cpu" if miniature else torch.cuda.get_device_name(0),
         "gpus": 0 if miniature else torch.cuda.device_count()}
    # the processes the paper's run starts on this node: one per GPU that divides its global batch
    processes = 1 if miniature else local_processes("auto", paper_params(params_file, False).pretrain.optim.batch_size)
    paper = guarded(r, "paper_step", lambda: check_paper_step(params_file, miniature))
    guarded(r, "micro_batch", lambda: check_micro_batch(params_file, miniature, processes))
    guarded(r, "data_path", lambda: check_data_path(params_file, miniature, paper, processes))
    with tempfile.TemporaryDirectory(prefix="ajepa-gpu-check-") as tmp:
        _checks_on_a_project(r, Path(tmp), params_file, miniature)
    r["skipped"] = [k for k in CHECKS if r[k]["status"] == "skipped"]
    r["failed"] = [k for k in CHECKS if r[k]["status"] == "failed"]
    r["ok"] = not r["failed"]
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def summary_line(r: dict) -> str:
    """One line for stderr: passed, skipped (with why) and failed checks."""
    passed = [k for k in CHECKS if r[k]["status"] == "ok"]
    parts = [f"{len(passed)} of {len(CHECKS)} checks ok"]
    parts += [f"skipped {k} ({r[k]['skipped']})" for k in r["skipped"]]
    parts += [f"FAILED {k}" + (f" ({r[k]['error'][:200]})" if "error" in r[k] else "") for k in r["failed"]]
    where = "the CPU miniature" if r["miniature"] else f"{r['gpus']} x {r['device']}"
    return f"gpu-check on {where}: " + "; ".join(parts)
