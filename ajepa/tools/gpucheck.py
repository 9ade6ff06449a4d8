"""`ajepa gpu-check` (`make gpu-check`): does this machine's GPU setup run the project? One JSON object.

In a few minutes on one GPU it runs what the paper's setup will run, each part through the same
`ajepa` commands a user types, in a temporary project on the embedded synthetic dataset:

- paper_step: bf16 training steps at the paper's size (ViT-B on 1024 x 128, predictor 16 x 512, 64 clips,
  the paper preset's masking), with their MFU (`ajepa bench pretrain`) and the peak GPU memory;
- pretrain: 300 steps of the embedded default's recipe, and whether the loss falls;
- resume: the same run killed with SIGKILL after its first checkpoint, then resumed: does it end where
  the uninterrupted run ended?
- downstream: the linear probes and a fine-tuning epoch on the pretrained encoders;
- ddp: the same run on every visible GPU, with the processes `ajepa pretrain` starts itself.

Without CUDA it reports so and does nothing, unless asked for a miniature on the CPU (tiny sizes, a few
steps, two gloo processes), which runs every code path above in about a minute.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import yaml

from ajepa.config import parse_params, read_yaml
from ajepa.tools.presets import load_preset, merge, preset_path

CPU_ENV = "AJEPA_GPU_CHECK_CPU"  # set to 1: the miniature on the CPU when there is no CUDA device


def settings(params_file: str, miniature: bool) -> dict:
    """The temporary project's params: the embedded default (or, for the miniature, its smoke preset)
    pretraining on the synthetic pool only, in one process, with a checkpoint every 10 steps so the kill
    lands early, and the downstream stages cut to one benchmark and a short fine-tuning."""
    p = read_yaml(Path(params_file).read_text(), str(params_file))
    if miniature:
        merge(p, load_preset(preset_path("smoke")))
        merge(p, {"datasets": {"synth": {"prepare": {"pool_clips": 48}}},
                  "pretrain": {"optim": {"epochs": 5, "lr": 2.0e-3}, "probe": {"every": 0}}})
    merge(p, {"pipeline": {"datasets": ["synth"], "benchmarks": ["synth"]},
              "distributed": {"processes": 1, "backend": "auto"},
              "pretrain": {"datasets": ["synth"], "checkpoint_every": 10},
              "finetune": {"synth": {"epochs": 1, "random_init_baseline": False, "runs": 1}},
              "linear": {"attentive": {"epochs": 2}}})
    parse_params(p)  # a bad params file fails here, before any work
    return p


def ajepa(cwd: Path, *args: str) -> str:
    """Run one `ajepa` command in `cwd`; what it printed, or an error naming the command."""
    r = subprocess.run([sys.executable, "-m", "ajepa.cli", *args], cwd=cwd, capture_output=True, text=True,
                       env=_clean_env())
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


def run_pretrain(cwd: Path) -> dict:
    """`ajepa pretrain` to the end: its seconds, logged losses, metrics and printed summary."""
    t0 = time.perf_counter()
    summary = ajepa(cwd, "pretrain")
    loss = pd.read_csv(cwd / "results/pretrain/live/plots/metrics/train/loss.tsv", sep="\t")["loss"].tolist()
    metrics = json.loads((cwd / "results/pretrain/metrics.json").read_text())
    return {"seconds": round(time.perf_counter() - t0, 1), "loss": loss, "metrics": metrics, "summary": summary}


def encoder_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' exported context encoders."""
    from ajepa.train.checkpoint import load_encoder_state

    wa, _ = load_encoder_state(a / "models/pretrain/context/model.safetensors")
    wb, _ = load_encoder_state(b / "models/pretrain/context/model.safetensors")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def same_end(a: dict, b: dict, rel_tol: float) -> bool:
    """Two runs end at the same loss, to `rel_tol` (0: bit for bit)."""
    la, lb = a["metrics"]["final_loss"], b["metrics"]["final_loss"]
    return la == lb if rel_tol == 0 else math.isclose(la, lb, rel_tol=rel_tol)


def _tolerance(cuda: bool) -> float:
    # on CUDA, atomic adds in the backward pass sum in a different order from run to run: the same run
    # drifts apart by float noise, so the check allows 2% on the final loss; the CPU is bit-exact
    return 0.02 if cuda else 0.0


def check_paper_step(params_file: str, miniature: bool) -> dict:
    """bf16 steps at the paper's size (the miniature: the smoke size, fp32 on the CPU): MFU, peak memory."""
    from ajepa.tools.bench import bench_pretrain

    p = read_yaml(Path(params_file).read_text(), str(params_file))
    merge(p, load_preset(preset_path("smoke" if miniature else "paper")))
    size = dict(batch=4, steps=1) if miniature else dict(encoder="base", target_length=1024, batch=64,
                                                          predictor_dim=512, predictor_depth=16, steps=6)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    r = bench_pretrain(parse_params(p), device="cuda" if cuda else "cpu", **size)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.empty_cache()  # the runs that follow are other processes on the same GPU
    return {"ok": r["samples_per_s"] > 0 and 0 < r["mfu"] <= 1, "dtype": r["dtype"], "input": r["input"],
            "encoder": r["encoder"], "predictor": r["predictor"], "batch": r["batch"],
            "masking_mode": r["masking_mode"], "samples_per_s": round(r["samples_per_s"], 1),
            "mfu": round(r["mfu"], 3), "matmul_peak_flops_per_s": r["peak_flops_per_s"],
            "peak_memory_gib": None if peak_memory is None else round(peak_memory, 2)}


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
    from ajepa.train.checkpoint import load_checkpoint

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


def check_ddp(root: Path, straight: dict, params: dict, data: Path) -> dict:
    """The run with the processes `ajepa pretrain` starts by itself (one per GPU; the miniature: two gloo
    processes on the CPU), against the single-process run: the same steps and final loss."""
    from ajepa.train.distributed import local_processes

    cuda = torch.cuda.is_available()
    params = {**params, "distributed": {"processes": "auto" if cuda else 2, "backend": "auto"}}
    cfg = parse_params(params)
    processes = local_processes(cfg.distributed.processes, cfg.pretrain.optim.batch_size)
    if processes < 2:
        return {"ok": True, "processes": processes, "skipped": "one visible GPU: nothing to spread over"}
    cwd = project(root, params, data)
    run = run_pretrain(cwd)
    m = run["metrics"]
    # a global batch split over processes sums in another order: float noise, on the CPU too
    tolerance = max(_tolerance(cuda), 1e-4)
    return {"ok": m["world_size"] == processes and m["steps"] == straight["metrics"]["steps"]
            and same_end(straight, run, tolerance), "processes": processes, "world_size": m["world_size"],
            "final_loss": m["final_loss"], "single_process_final_loss": straight["metrics"]["final_loss"],
            "samples_per_s": m["samples_per_s"], "max_weight_difference": encoder_difference(cwd, cwd.parent / "a")}


def guarded(results: dict, name: str, check: Callable[[], dict]) -> dict | None:
    """Run one check into results[name]; a failure is recorded there (as ok: false) instead of raised, so
    the JSON reports every check."""
    t0 = time.perf_counter()
    try:
        results[name] = check()
    except Exception as e:  # noqa: BLE001 - the report names the failure, whatever it is
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:2000]}"}
    results[name]["check_seconds"] = round(time.perf_counter() - t0, 1)
    return results[name] if results[name]["ok"] else None


def gpu_check(params_file: str = "params.yaml", cpu: bool = False) -> dict:
    """Every check's result, and ok when all passed; without CUDA (and without `cpu`) a skip notice."""
    cuda = torch.cuda.is_available()
    miniature = not cuda and (cpu or os.environ.get(CPU_ENV, "") not in ("", "0"))
    if not cuda and not miniature:
        return {"cuda": False, "skipped": f"no CUDA device visible: nothing checked ({CPU_ENV}=1 or --cpu "
                                          f"runs a miniature of the checks on the CPU)"}
    t0 = time.perf_counter()
    params = settings(params_file, miniature)
    cfg = parse_params(params)
    # 300 for the embedded default: 3 epochs of the 1,600 synthetic pool clips in batches of 16
    steps = cfg.pretrain.optim.epochs * (cfg.dataset("synth").prepare.pool_clips // cfg.pretrain.optim.batch_size)
    r = {"cuda": cuda, "miniature": miniature, "torch": torch.__version__,
         "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": torch.cuda.device_count()}
    guarded(r, "paper_step", lambda: check_paper_step(params_file, miniature))
    with tempfile.TemporaryDirectory(prefix="ajepa-gpu-check-") as tmp:
        base = project(Path(tmp) / "data-prep", params)
        for command in ("prepare", "features", "pool"):
            ajepa(base, command, "synth")
        a = project(Path(tmp) / "a", params, base / "data")
        runs = {}
        guarded(r, "pretrain", lambda: check_pretrain(runs.setdefault("a", run_pretrain(a)), steps))
        if "a" in runs:
            guarded(r, "resume", lambda: check_resume(project(Path(tmp) / "b", params, base / "data"), runs["a"], cuda))
            guarded(r, "downstream", lambda: check_downstream(a))
            guarded(r, "ddp", lambda: check_ddp(Path(tmp) / "c", runs["a"], params, base / "data"))
    r["ok"] = all(r.get(k, {}).get("ok", False) for k in ("paper_step", "pretrain", "resume", "downstream", "ddp"))
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r
