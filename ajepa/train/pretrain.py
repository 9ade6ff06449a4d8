"""A-JEPA pretraining loop: resumable, distributed, DVCLive-logged.

The step reads as I-JEPA's: forward the target encoder (EMA, whole spectrogram), forward the context
encoder and predictor, loss, optimiser step, EMA update; schedules are stepped once per iteration.
A checkpoint holds the whole state (models, optimiser, schedules, RNG, the step counter that drives
the batch order and the masks), so a resumed run is the same run.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from ajepa.config import PretrainConfig
from ajepa.data.loader import pretrain_loader
from ajepa.data.store import FeatureStore
from ajepa.errors import AjepaError
from ajepa.masks import MaskGenerator
from ajepa.models import AJEPA, effective_rank
from ajepa.progress import progress
from ajepa.train.checkpoint import (config_hash, export_encoder, load_checkpoint, rng_state, save_checkpoint,
                                    set_rng_state)
from ajepa.train.distributed import DistInfo, all_reduce_mean
from ajepa.train.schedules import CosineWeightDecay, LinearMomentum, WarmupCosine, param_groups


@dataclass
class PretrainPaths:
    encoder: Path  # safetensors export of the context encoder (what fine-tuning loads)
    state: Path  # resumable checkpoint (a persistent, uncached directory in dvc.yaml)
    live: Path  # DVCLive directory: metrics per logged step
    metrics: Path  # final summary JSON


@dataclass
class PretrainResult:
    steps: int
    start_step: int
    final_loss: float
    samples_per_s: float
    seconds: float
    tf_fraction: float
    target_rank: float  # effective rank of the last logged step's targets (collapse shows as ~1)


def encoder_config(cfg: PretrainConfig, grid: tuple[int, int], patch_size: int) -> dict:
    e = cfg.encoder
    return {"grid": list(grid), "patch_size": patch_size, "embed_dim": e.embed_dim, "depth": e.depth,
            "num_heads": e.num_heads, "mlp_ratio": e.mlp_ratio, "drop_path": e.drop_path}


def build_model(cfg: PretrainConfig, grid: tuple[int, int], patch_size: int) -> AJEPA:
    encoder = encoder_config(cfg, grid, patch_size)
    encoder["grid"] = tuple(encoder["grid"])
    p = cfg.predictor
    return AJEPA(encoder, {"predictor_dim": p.embed_dim, "depth": p.depth, "num_heads": p.num_heads,
                           "init": p.init}, loss=cfg.loss)


def build_mask_generator(cfg: PretrainConfig, grid: tuple[int, int], total_steps: int) -> MaskGenerator:
    m = cfg.masking
    return MaskGenerator(grid, mode=m.mode, total_steps=total_steps, seed=cfg.seed, num_targets=m.num_targets,
                         target_scale=tuple(m.target_scale), target_aspect=tuple(m.target_aspect),
                         context_scale=tuple(m.context_scale), tf_num_targets=m.tf_num_targets,
                         tf_scale=tuple(m.tf_scale), min_keep=m.min_keep, c0=m.curriculum_c0)


def run_hash(cfg: PretrainConfig, store: FeatureStore, world_size: int) -> str:
    # the data and the process layout are part of the run's identity: the same params over other
    # features, or another split of the global batch, would not continue the same trajectory
    return config_hash({"params": asdict(cfg), "store": {k: store.stats[k] for k in ("mean", "std", "accepted")},
                        "clips": len(store), "world_size": world_size})


def prune_live(live_dir: Path, start_step: int) -> None:
    """Drop DVCLive rows with step >= start_step (logged after the checkpoint we resume from: they
    will be logged again)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        col = lines[0].split("\t").index("step")
        keep = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) < start_step]
        tsv.write_text("\n".join(keep) + "\n")


def pretrain(cfg: PretrainConfig, store: FeatureStore, paths: PretrainPaths, dist: DistInfo,
             stop_after: int | None = None, on_step: Callable[[int, float], None] | None = None,
             enable_progress: bool = True) -> PretrainResult:
    """Train (or resume) to the configured number of steps; rank 0 writes every output.

    `stop_after` ends the run early after that many steps as if interrupted (for tests and
    time-boxed jobs); `on_step(step, loss)` sees every step's globally averaged loss.
    """
    from dvclive import Live

    grid = tuple(store.stats["grid"])
    patch_size = int(store.stats["patch_size"])
    o = cfg.optim
    if o.batch_size % dist.world_size:
        raise AjepaError(f"pretrain.optim.batch_size = {o.batch_size}: not divisible by the "
                         f"{dist.world_size} processes")
    if len(store) < o.batch_size:
        raise AjepaError(f"pretrain.optim.batch_size = {o.batch_size}: larger than the {len(store)} clips "
                         f"in {store.root} (splits {', '.join(cfg.splits)})")
    steps_per_epoch = len(store) // o.batch_size
    total_steps = o.epochs * steps_per_epoch
    device = dist.device

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(cfg, grid, patch_size).to(device)
    # fused: 3-5x faster optimiser step on CPU and GPU alike (measured with ajepa.flops)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay[0]), lr=o.lr, betas=tuple(o.betas), fused=True)
    lr = WarmupCosine(o.lr, o.final_lr, round(o.warmup_epochs * steps_per_epoch), total_steps, optimizer=optimizer)
    wd = CosineWeightDecay(o.weight_decay[0], o.weight_decay[1], total_steps, optimizer=optimizer)
    momentum = LinearMomentum(o.ema_momentum[0], o.ema_momentum[1], total_steps)
    this_run = run_hash(cfg, store, dist.world_size)

    start_step, tf_steps, last_loss, saved_step, target_rank = 0, 0, float("nan"), None, float("nan")
    checkpoint = paths.state / "checkpoint.pt"
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, map_location=device)
        if state.get("run_hash") == this_run:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            for sched, key in ((lr, "lr"), (wd, "wd"), (momentum, "momentum")):
                sched.load_state_dict(state[key])
            set_rng_state(state["rng"][dist.rank])  # one state per rank: each draws its own dropout
            start_step, tf_steps, last_loss = int(state["step"]), int(state["tf_steps"]), float(state["loss"])
            target_rank = float(state["target_rank"])
            saved_step = start_step
        elif dist.is_main:
            print(f"pretrain: {checkpoint} is from other parameters or data; starting afresh")

    train_model = model
    if dist.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    masks = build_mask_generator(cfg, grid, total_steps)
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    loader = pretrain_loader(store, o.batch_size // dist.world_size, masks, cfg.seed, start_step=start_step,
                             total_steps=end_step, num_workers=cfg.num_workers, rank=dist.rank,
                             world_size=dist.world_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    live = None
    if dist.is_main:
        if start_step:
            prune_live(paths.live, start_step)
        live = Live(str(paths.live), dvcyaml=False, save_dvc_exp=False, resume=start_step > 0, report=None)

    def save(step: int) -> None:
        nonlocal saved_step
        rngs = [None] * dist.world_size
        if dist.world_size > 1:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if dist.is_main:
            save_checkpoint(checkpoint, {
                "step": step, "tf_steps": tf_steps, "loss": last_loss, "target_rank": target_rank,
                "run_hash": this_run,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": lr.state_dict(),
                "wd": wd.state_dict(), "momentum": momentum.state_dict(), "rng": rngs})
        saved_step = step

    model.train()
    t0, seen, t_log, seen_log = time.perf_counter(), 0, time.perf_counter(), 0
    bar = progress(end_step - start_step, "pretrain", "step", enabled=enable_progress and dist.is_main)
    step = start_step
    for batch in loader:
        step = batch.step
        x = batch.x.to(device, non_blocking=True)
        context = batch.masks.context.to(device, non_blocking=True)
        targets = batch.masks.targets.to(device, non_blocking=True)
        lr_now, wd_now = lr.step(), wd.step()
        with autocast:
            loss = train_model(x, context, targets)
        global_loss = all_reduce_mean(loss.detach()).item()
        if not math.isfinite(global_loss):
            kept = f"the last good checkpoint {checkpoint} (step {saved_step}) is kept" if saved_step is not None \
                else "no checkpoint was written yet"
            raise AjepaError(f"non-finite loss ({global_loss}) at step {step}: stopped before updating the "
                             f"model; {kept}; lower pretrain.optim.lr or check the features")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        m = momentum.step()
        model.update_target(m)

        last_loss = global_loss
        tf_steps += batch.masks.mode == "tf"
        seen += o.batch_size
        seen_log += o.batch_size
        if on_step:
            on_step(step, global_loss)
        bar.update(1)
        done = step + 1
        if live is not None and (done % cfg.log_every == 0 or done == end_step):
            now = time.perf_counter()
            live.step = step
            live.log_metric("train/loss", global_loss)
            live.log_metric("train/lr", lr_now)
            live.log_metric("train/weight_decay", wd_now)
            live.log_metric("train/ema_momentum", m)
            live.log_metric("train/tf_fraction", tf_steps / done)
            live.log_metric("train/samples_per_s", seen_log / max(now - t_log, 1e-9))
            target_rank = effective_rank(model.last_target.float())
            live.log_metric("train/target_rank", target_rank)
            live.next_step()
            t_log, seen_log = now, 0
            bar.set_postfix(loss=f"{global_loss:.4f}")
        if done % cfg.checkpoint_every == 0 and done < end_step:
            save(done)
    bar.close()
    seconds = time.perf_counter() - t0
    done = step + 1 if end_step > start_step else start_step
    save(done)
    if dist.is_main:
        live.end()
        if done == total_steps:
            export_encoder(paths.encoder, model.context_encoder, encoder_config(cfg, grid, patch_size))
    return PretrainResult(steps=done, start_step=start_step, final_loss=last_loss,
                          samples_per_s=seen / seconds if seconds > 0 else 0.0, seconds=seconds,
                          tf_fraction=tf_steps / done if done else 0.0, target_rank=target_rank)
