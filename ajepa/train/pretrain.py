"""A-JEPA pretraining: build, resume, one training step, and the loop (resumable, distributed).

The step reads as I-JEPA's: forward the target encoder (EMA, whole spectrogram), forward the context
encoder and predictor, loss, optimiser step, EMA update; schedules are stepped once per iteration.
A checkpoint holds the whole state (models, optimiser, schedules, RNG, the step counter that drives
the batch order and the masks), so a resumed run is the same run. The library logs through a plain
`log(step, metrics)` callable; the stage decides where the metrics go. With `micro_batch` a step's
batch (masks drawn for all of it, before any split) goes through forward/backward in micro-batches
whose gradients add up to the batch's (ajepa.train.compute); the rest still happens once per step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from ajepa.config import PretrainConfig
from ajepa.data.loader import pretrain_augment, pretrain_loader
from ajepa.data.store import FeatureStore, StoreUnion, training_statistics
from ajepa.errors import AjepaError, Interrupted
from ajepa.export import write_export
from ajepa.interrupt import signal_name
from ajepa.masks import MaskGenerator
from ajepa.models import AJEPA, PositionOnlyPredictor, effective_rank, set_activation_checkpointing
from ajepa.progress import progress
from ajepa.train.checkpoint import (config_hash, load_checkpoint, load_fitting, load_optimizer, restoring, rng_state,
                                    save_checkpoint, set_rng_state)
from ajepa.train.compute import (accumulate, compile_blocks, fits_in_cuda_memory, min_over_processes,
                                 resolve_micro_batch, without_compute_keys)
from ajepa.train.distributed import DistInfo, all_reduce_mean, max_over_ranks
from ajepa.train.finite import NonFinite, check_loss, check_weights
from ajepa.train.schedules import CosineWeightDecay, LinearMomentum, WarmupCosine, param_groups

Log = Callable[[int, dict], None]  # log(step, metrics)
OpenLog = Callable[[int], Log]  # open_log(start_step) -> log: told where the run starts (0, or where it resumes)


@dataclass
class PretrainPaths:
    encoders: dict[str, Path]  # export folders (ajepa.export) by encoder: {"context": ..., "target": ...}
    state: Path  # resumable checkpoint (a persistent, uncached directory in dvc.yaml)
    metrics: Path  # final summary JSON


@dataclass
class PretrainResult:
    steps: int
    start_step: int
    final_loss: float
    samples_per_s: float
    seconds: float  # training, without the learning-curve probes
    probe_seconds: float
    tf_fraction: float
    target_rank: float  # effective rank of the last logged step's targets (collapse shows as ~1)


@dataclass
class Trainer:
    """Everything a run updates, and what a checkpoint holds of it."""

    model: AJEPA
    optimizer: torch.optim.Optimizer
    lr: WarmupCosine
    wd: CosineWeightDecay
    momentum: LinearMomentum
    position_only: PositionOnlyPredictor  # the no-context floor of the loss, a diagnostic

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr": self.lr.state_dict(), "wd": self.wd.state_dict(), "momentum": self.momentum.state_dict(),
                "position_only": self.position_only.state_dict()}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Load `state`; a part that does not fit fails in one line naming `source` and the key."""
        load_fitting(self.model, state["model"], f"{source} [model]")
        load_optimizer(self.optimizer, state["optimizer"], f"{source} [optimizer]")
        for key in ("lr", "wd", "momentum"):
            getattr(self, key).load_state_dict(state[key])
        load_fitting(self.position_only, state["position_only"], f"{source} [position_only]")


def encoder_config(cfg: PretrainConfig, grid: tuple[int, int], patch_size: int) -> dict:
    """The SpectrogramEncoder arguments, as the export records them."""
    return {"grid": list(grid), "patch_size": patch_size, **asdict(cfg.encoder)}


def export_config(cfg: PretrainConfig, store: FeatureStore | StoreUnion, total_steps: int) -> dict:
    """What each exported encoder's config.json records besides which encoder it is (ajepa.export)."""
    frontend, normalisation = training_statistics(store)
    return {"architecture": encoder_config(cfg, tuple(store.stats["grid"]), int(store.stats["patch_size"])),
            "frontend": frontend, "normalisation": normalisation,
            "training": {"steps": total_steps, "splits": list(cfg.splits), "params_sha256": config_hash(cfg)}}


def build_model(cfg: PretrainConfig, grid: tuple[int, int], patch_size: int) -> AJEPA:
    p = cfg.predictor
    return AJEPA({**encoder_config(cfg, grid, patch_size), "grid": tuple(grid)},
                 {"predictor_dim": p.embed_dim, "depth": p.depth, "num_heads": p.num_heads, "init": p.init},
                 loss=cfg.loss, target_layers=cfg.target_layers, sigreg=cfg.sigreg)


def build(cfg: PretrainConfig, grid: tuple[int, int], patch_size: int, steps_per_epoch: int,
          device: torch.device) -> Trainer:
    """The model (seeded: identical on every rank), fused AdamW and the per-step schedules."""
    o = cfg.optim
    total_steps = o.epochs * steps_per_epoch
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, grid, patch_size).to(device)
    # fused: 3-5x faster optimiser step on CPU and GPU alike (measured with ajepa.tools.flops)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay[0]), lr=o.lr, betas=tuple(o.betas), fused=True)
    return Trainer(
        model, optimizer,
        WarmupCosine(o.lr, o.final_lr, round(o.warmup_epochs * steps_per_epoch), total_steps, optimizer=optimizer),
        CosineWeightDecay(o.weight_decay[0], o.weight_decay[1], total_steps, optimizer=optimizer),
        LinearMomentum(o.ema_momentum[0], o.ema_momentum[1], total_steps),
        PositionOnlyPredictor(grid[0] * grid[1], cfg.encoder.embed_dim).to(device))


def build_mask_generator(cfg: PretrainConfig, grid: tuple[int, int], total_steps: int) -> MaskGenerator:
    m = cfg.masking
    return MaskGenerator(grid, mode=m.mode, total_steps=total_steps, seed=cfg.seed, num_targets=m.num_targets,
                         target_scale=tuple(m.target_scale), target_aspect=tuple(m.target_aspect),
                         context_scale=tuple(m.context_scale), tf_num_targets=m.tf_num_targets,
                         tf_scale=tuple(m.tf_scale), min_keep=m.min_keep, c0=m.curriculum_c0)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; fp32 on the CPU (bf16 there is a numerics change, not a speed-up)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, context: torch.Tensor,
               targets: torch.Tensor, momentum: float, grad_clip: float = 0.0, autocast=None,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, micro_batch: int | None = None) -> float:
    """One A-JEPA step: loss (target forward, context forward, predictor), backward, clipping, optimiser
    step, EMA update of the target encoder. `model` may be DDP-wrapped; `reduce` averages the loss over
    processes. With `micro_batch` the rows go through forward/backward that many at a time and the
    gradients accumulate (ajepa.train.compute), still one optimiser and EMA step. Returns the (global)
    loss; a non-finite loss raises NonFinite before any update, non-finite weights after the optimiser
    step raise it before the EMA (every rank sees the same loss and weights)."""
    bare = model.module if isinstance(model, DistributedDataParallel) else model
    kept = []

    def loss_of(rows: slice) -> torch.Tensor:
        with autocast or nullcontext():
            loss = model(x[rows], context[rows], targets[rows])
        kept.append(bare.last_target)
        return loss

    optimizer.zero_grad(set_to_none=True)
    loss = accumulate(model, len(x), micro_batch, loss_of)
    if len(kept) > 1:  # the diagnostics read the whole batch's targets
        bare.last_target = torch.cat(kept)
    value = (reduce(loss) if reduce else loss).item()
    check_loss(value)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(bare.parameters(), grad_clip)
    optimizer.step()
    check_weights(bare)
    bare.update_target(momentum)
    return value


def configure_compute(cfg: PretrainConfig, trainer: Trainer, dist: DistInfo, grid: tuple[int, int],
                      patch_size: int, total_steps: int) -> int:
    """Apply activation checkpointing and torch.compile as configured, and return the micro-batch size
    (the same on every process: the smallest any of them resolved)."""
    if cfg.activation_checkpointing:
        set_activation_checkpointing(trainer.model)
    if cfg.compile:
        compile_blocks(trainer.model)
    local = cfg.optim.batch_size // dist.world_size
    if cfg.micro_batch != "auto" or dist.device.type != "cuda":
        return resolve_micro_batch(cfg.micro_batch, local, dist.device)
    n = grid[0] * grid[1]
    x = torch.randn(local, grid[0] * patch_size, grid[1] * patch_size, device=dist.device)
    # every patch as context: more than any mask keeps, so the probe errs on the side of fitting
    context = torch.arange(n, device=dist.device).expand(local, n)
    targets = build_mask_generator(cfg, grid, total_steps)(local, 0).targets.to(dist.device)
    model, autocast = trainer.model, autocast_for(dist.device)

    def forward_backward(size: int) -> None:
        try:
            with autocast:
                model(x[:size], context[:size], targets[:size]).backward()
        finally:
            model.zero_grad(set_to_none=True)

    # AdamW's two moments (not allocated before the first step) and DDP's gradient buckets
    reserve = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    size = resolve_micro_batch("auto", local, dist.device,
                               lambda m: fits_in_cuda_memory(dist.device, lambda: forward_backward(m), reserve))
    return min_over_processes(size, dist.device)


def run_hash(cfg: PretrainConfig, store: FeatureStore | StoreUnion, world_size: int) -> str:
    # the data and the process layout are part of the run's identity: the same params over other
    # features, or another split of the global batch, would not continue the same trajectory
    return config_hash({"params": without_compute_keys(asdict(cfg)), "store": store.fingerprint(), "world_size": world_size})


def resume(trainer: Trainer, checkpoint: Path, this_run: str, dist: DistInfo) -> dict | None:
    """Load the checkpoint into `trainer` when it is from this run; its counters, or None (start afresh)."""
    if not checkpoint.exists():
        return None
    state = load_checkpoint(checkpoint, map_location=dist.device)
    if state.get("run_hash") != this_run:
        if dist.is_main:
            print(f"pretrain: {checkpoint} is from other parameters or data; starting afresh")
        return None
    with restoring(checkpoint):
        trainer.load_state_dict(state, str(checkpoint))
        set_rng_state(state["rng"][dist.rank])  # one state per rank: each draws its own dropout
        # the clock of the processes before this one (absent from checkpoints written before it was kept)
        clock = {"seen": state.get("seen", 0), "probing": state.get("probe_seconds", 0.0),
                 "seconds_before": state.get("seconds", 0.0)}
        return {k: state[k] for k in ("step", "tf_steps", "loss", "target_rank")} | clock


def save(trainer: Trainer, checkpoint: Path, this_run: str, dist: DistInfo, counters: dict) -> None:
    rngs = [None] * dist.world_size
    if dist.world_size > 1:
        torch.distributed.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if dist.is_main:
        save_checkpoint(checkpoint, {**counters, "run_hash": this_run, **trainer.state_dict(), "rng": rngs})


def _check_batch(cfg: PretrainConfig, store, dist: DistInfo) -> int:
    """Steps per epoch, after the checks that the global batch splits over the processes and fits the data."""
    b = cfg.optim.batch_size
    if b % dist.world_size:
        raise AjepaError(f"pretrain.optim.batch_size = {b}: not divisible by the {dist.world_size} processes")
    if len(store) < b:
        raise AjepaError(f"pretrain.optim.batch_size = {b}: larger than the {len(store)} clips in {store.root} "
                         f"(splits {', '.join(cfg.splits)})")
    return len(store) // b


@dataclass
class RunState:
    """A run's counters and clock (what the checkpoint keeps beside the trainer), over every process that
    worked on the run: a resumed run reports the seconds and clips of the whole run, not of its last part."""

    step: int = 0  # steps done
    tf_steps: int = 0
    loss: float = float("nan")
    target_rank: float = float("nan")
    seen: int = 0  # clips trained on
    probing: float = 0.0  # seconds spent in learning-curve probes
    seconds_before: float = 0.0  # training seconds of the processes before this one
    seen_since_log: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_log: float = field(default_factory=time.perf_counter)
    probing_before: float = field(init=False)

    def __post_init__(self):
        self.probing_before = self.probing

    def training_seconds(self) -> float:
        """Wall-clock seconds of training so far, without the learning-curve probes."""
        return self.seconds_before + time.perf_counter() - self.started - (self.probing - self.probing_before)

    def counters(self) -> dict:
        return {"step": self.step, "tf_steps": self.tf_steps, "loss": self.loss, "target_rank": self.target_rank,
                "seen": self.seen, "probe_seconds": self.probing, "seconds": self.training_seconds()}


def _distributed(model: AJEPA, dist: DistInfo) -> torch.nn.Module:
    if dist.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def _metrics(cfg: PretrainConfig, trainer: Trainer, run: RunState, position_loss: float, schedule: tuple,
             evaluate, total_steps: int) -> dict:
    """What a logged step records; the learning-curve probe too when one is due."""
    now = time.perf_counter()
    run.target_rank = effective_rank(trainer.model.last_target.float())
    lr_now, wd_now, momentum = schedule
    metrics = {"train/loss": run.loss, "train/position_only_loss": position_loss, "train/lr": lr_now,
               "train/weight_decay": wd_now, "train/ema_momentum": momentum,
               "train/tf_fraction": run.tf_steps / run.step,
               "train/samples_per_s": run.seen_since_log / max(now - run.last_log, 1e-9),
               "train/target_rank": run.target_rank}
    if evaluate is not None and cfg.probe.every and (run.step % cfg.probe.every == 0 or run.step == total_steps):
        metrics.update(evaluate(run.step, trainer.model))
        trainer.model.train()
        run.probing += time.perf_counter() - now
    run.last_log, run.seen_since_log = time.perf_counter(), 0
    return metrics


def _loader(cfg: PretrainConfig, store: FeatureStore | StoreUnion, dist: DistInfo, total_steps: int, start_step: int,
            end_step: int):
    """This process's batches of steps start_step..end_step, masks and augmentation drawn from the seed."""
    return pretrain_loader(store, cfg.optim.batch_size // dist.world_size,
                           build_mask_generator(cfg, tuple(store.stats["grid"]), total_steps), cfg.seed,
                           start_step=start_step, total_steps=end_step, num_workers=cfg.num_workers, rank=dist.rank,
                           world_size=dist.world_size,
                           augment=pretrain_augment(store, cfg.augment.roll, cfg.augment.magnitude, cfg.seed))


def pretrain(cfg: PretrainConfig, store: FeatureStore | StoreUnion, paths: PretrainPaths, dist: DistInfo,
             open_log: OpenLog | None = None, stop_after: int | None = None,
             on_step: Callable[[int, float], None] | None = None,
             evaluate: Callable[[int, AJEPA], dict] | None = None, enable_progress: bool = True,
             stop_requested: Callable[[], int | None] | None = None) -> PretrainResult:
    """Train (or resume) to the configured number of steps; rank 0 logs and writes every output.

    `open_log(start_step)` returns the `log(step, metrics)` that receives the training metrics every
    `log_every` steps (rank 0 only; it is told the start step so that it can drop what an interrupted
    run logged after its last checkpoint);
    `stop_after` ends the run early after that many steps as if interrupted (tests, time-boxed jobs);
    `on_step(step, loss)` sees every step's globally averaged loss; `evaluate(steps_done, model)`, on
    rank 0 every `cfg.probe.every` steps and at the end, returns metrics logged with the others (the
    learning-curve probe); `stop_requested()`, asked after every step, returns a signal number when the
    run should save and stop there (ajepa.interrupt): it then raises Interrupted once the checkpoint is saved.
    """
    grid, patch_size = tuple(store.stats["grid"]), int(store.stats["patch_size"])
    steps_per_epoch = _check_batch(cfg, store, dist)
    total_steps = cfg.optim.epochs * steps_per_epoch
    trainer = build(cfg, grid, patch_size, steps_per_epoch, dist.device)
    this_run, checkpoint = run_hash(cfg, store, dist.world_size), paths.state / "checkpoint.pt"
    run = RunState(**(resume(trainer, checkpoint, this_run, dist) or {}))
    start_step, saved_step = run.step, run.step or None
    log = open_log(start_step) if open_log and dist.is_main else (lambda step, metrics: None)
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    loader = _loader(cfg, store, dist, total_steps, start_step, end_step)
    micro = configure_compute(cfg, trainer, dist, grid, patch_size, total_steps)
    train_model, autocast = _distributed(trainer.model, dist), autocast_for(dist.device)
    trainer.model.train()
    bar = progress(end_step - start_step, "pretrain", "step", enabled=enable_progress and dist.is_main)
    stopped_by = 0
    for batch in loader:
        schedule = trainer.lr.step(), trainer.wd.step(), trainer.momentum.step()
        targets = batch.masks.targets.to(dist.device, non_blocking=True)
        try:
            run.loss = train_step(train_model, trainer.optimizer, batch.x.to(dist.device, non_blocking=True),
                                  batch.masks.context.to(dist.device, non_blocking=True), targets, schedule[2],
                                  cfg.optim.grad_clip, autocast, all_reduce_mean, micro)
        except NonFinite as e:
            raise _non_finite(e, batch.step, checkpoint, saved_step) from None
        position_loss = trainer.position_only.loss_and_update(trainer.model.last_target, targets)
        run.step, run.tf_steps = batch.step + 1, run.tf_steps + (batch.masks.mode == "tf")
        run.seen, run.seen_since_log = run.seen + cfg.optim.batch_size, run.seen_since_log + cfg.optim.batch_size
        if on_step:
            on_step(batch.step, run.loss)
        bar.update(1)
        if dist.is_main and (run.step % cfg.log_every == 0 or run.step == end_step):
            log(batch.step, _metrics(cfg, trainer, run, position_loss, schedule, evaluate, total_steps))
            bar.set_postfix(loss=f"{run.loss:.4f}")
        if run.step % cfg.checkpoint_every == 0 and run.step < end_step:
            save(trainer, checkpoint, this_run, dist, run.counters())
            saved_step = run.step
        stopped_by = max_over_ranks(stop_requested() or 0, dist.device) if stop_requested else 0
        if stopped_by:
            break
    bar.close()
    return _finish(trainer, run, paths, dist, export_config(cfg, store, total_steps), start_step, checkpoint,
                   this_run, stopped_by if run.step < end_step else 0)


def _non_finite(e: NonFinite, step: int, checkpoint: Path, saved_step: int | None) -> AjepaError:
    kept = f"the last good checkpoint {checkpoint} (step {saved_step}) is kept" if saved_step is not None \
        else "no checkpoint was written yet"
    return AjepaError(f"{e} at step {step}: stopped; {kept}; lower pretrain.optim.lr or check the features")


def _finish(trainer: Trainer, run: RunState, paths: PretrainPaths, dist: DistInfo, export: dict, start_step: int,
            checkpoint: Path, this_run: str, stopped_by: int) -> PretrainResult:
    """Save the final state, export both encoders when the run is complete, and sum it up; or, when a
    signal (`stopped_by`) ended it early, raise Interrupted once the state is saved."""
    counters = run.counters()
    seconds = counters["seconds"]
    if run.step > start_step:  # a rerun of a finished run trained nothing: its checkpoint stays as it is
        save(trainer, checkpoint, this_run, dist, counters)
    if stopped_by:
        raise Interrupted(stopped_by, f"stopped by {signal_name(stopped_by)} after step {run.step}: checkpoint "
                                      f"{checkpoint} saved; rerun to resume from it")
    if dist.is_main and run.step == export["training"]["steps"]:
        for which, folder in paths.encoders.items():
            write_export(folder, getattr(trainer.model, f"{which}_encoder"), {"encoder": which, **export})
    return PretrainResult(steps=run.step, start_step=start_step, final_loss=run.loss,
                          samples_per_s=run.seen / seconds if seconds > 0 else 0.0, seconds=seconds,
                          probe_seconds=run.probing, tf_fraction=run.tf_steps / run.step if run.step else 0.0,
                          target_rank=run.target_rank)
