"""A-JEPA pretraining: build, resume, one training step, and the loop (resumable, distributed).

What is A-JEPA's own: the model, the batch (clips and masks, ajepa.data.loader) and the loss; the
engine (ajepa.train.engine) runs the rest, as it does for fine-tuning. The step reads as I-JEPA's:
forward the target encoder (EMA, whole spectrogram), forward the context encoder and predictor, loss,
optimiser step, EMA update; schedules are stepped once per iteration. A checkpoint holds the whole
state (models, optimiser, schedules, RNG, the step counter that drives the batch order and the
masks), so a resumed run is the same run, on any number of processes. The library logs through a plain
`log(step, metrics)` callable; the stage decides where the metrics go. With `micro_batch` a step's
batch (masks drawn for all of it, before any split) goes through forward/backward in micro-batches
whose gradients add up to the batch's (ajepa.train.compute); the rest still happens once per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ajepa.config import PretrainConfig
from ajepa.data.loader import PretrainBatch, pretrain_augment, pretrain_loader
from ajepa.data.store import FeatureStore, StoreUnion, training_statistics
from ajepa.errors import AjepaError
from ajepa.export import write_export
from ajepa.masks import MaskGenerator
from ajepa.models import AJEPA, PositionOnlyPredictor, effective_rank
from ajepa.progress import progress
from ajepa.train.checkpoint import config_hash
from ajepa.train.compute import without_compute_keys
from ajepa.train.distributed import DistInfo
from ajepa.train.engine import Engine, OpenLog, optimizer_step, unwrap
from ajepa.train.schedules import CosineWeightDecay, LinearMomentum, WarmupCosine, param_groups, peak_lr


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
    # the predictor section's keys are Predictor's arguments, as the encoder section's are the encoder's
    return AJEPA({**encoder_config(cfg, grid, patch_size), "grid": tuple(grid)}, asdict(cfg.predictor),
                 loss=cfg.loss, target_layers=cfg.target_layers, sigreg=cfg.sigreg)


def build(cfg: PretrainConfig, grid: tuple[int, int], patch_size: int, steps_per_epoch: int,
          device: torch.device) -> dict:
    """The run's parts (ajepa.train.engine): the model (seeded: identical on every rank), fused AdamW, the
    per-step schedules and the no-context floor of the loss (a diagnostic)."""
    o = cfg.optim
    total_steps = o.epochs * steps_per_epoch
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, grid, patch_size).to(device)
    lr = peak_lr(o.lr, o.batch_size, o.lr_scaling)
    # fused: 3-5x faster optimiser step on CPU and GPU alike (measured with ajepa.tools.flops)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay[0]), lr=lr, betas=tuple(o.betas), fused=True)
    return {"model": model, "optimizer": optimizer,
            "lr": WarmupCosine(lr, o.final_lr, round(o.warmup_epochs * steps_per_epoch), total_steps,
                               start_value=o.warmup_start * lr, optimizer=optimizer),
            "wd": CosineWeightDecay(o.weight_decay[0], o.weight_decay[1], total_steps, optimizer=optimizer),
            "momentum": LinearMomentum(o.ema_momentum[0], o.ema_momentum[1], total_steps),
            "position_only": PositionOnlyPredictor(grid[0] * grid[1], cfg.encoder.embed_dim).to(device)}


def build_mask_generator(cfg: PretrainConfig, grid: tuple[int, int], total_steps: int) -> MaskGenerator:
    """The run's masks: the keys of pretrain.masking are MaskGenerator's arguments, word for word."""
    return MaskGenerator(grid, total_steps=total_steps, seed=cfg.seed, **asdict(cfg.masking))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, context: torch.Tensor,
               targets: torch.Tensor, momentum: float, grad_clip: float = 0.0, autocast=None,
               micro_batch: int | None = None) -> float:
    """One A-JEPA step: the engine's step (ajepa.train.engine.optimizer_step) on the loss of the target
    forward, the context forward and the predictor, then the EMA update of the target encoder. `model`
    may be DDP-wrapped. Returns the loss averaged over the processes; NonFinite before the EMA."""
    bare = unwrap(model)
    kept = []

    def loss_of(m: torch.nn.Module, rows: slice) -> torch.Tensor:
        loss = m(x[rows], context[rows], targets[rows])
        kept.append(bare.last_target)
        return loss

    value = optimizer_step(model, optimizer, len(x), loss_of, micro_batch, autocast, grad_clip)
    if len(kept) > 1:  # the diagnostics read the whole batch's targets
        bare.last_target = torch.cat(kept)
    bare.update_target(momentum)
    return value


def probe_loss(cfg: PretrainConfig, model: AJEPA, grid: tuple[int, int], patch_size: int, total_steps: int,
               device: torch.device):
    """loss(size): the loss of `size` random clips with every patch as context, more than any mask keeps,
    so that `micro_batch: auto` errs on the side of fitting (ajepa.train.engine)."""
    n = grid[0] * grid[1]

    def loss(size: int) -> torch.Tensor:
        x = torch.randn(size, grid[0] * patch_size, grid[1] * patch_size, device=device)
        targets = build_mask_generator(cfg, grid, total_steps)(size, 0).targets.to(device)
        return model(x, torch.arange(n, device=device).expand(size, n), targets)
    return loss


def run_hash(cfg: PretrainConfig, store: FeatureStore | StoreUnion) -> str:
    # the data are part of the run's identity (the same params over other features would not continue
    # the same trajectory); the process count is not: every count draws the same global batches
    return config_hash({"params": without_compute_keys(asdict(cfg)), "store": store.fingerprint()})


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

    @classmethod
    def resumed(cls, counters: dict | None) -> RunState:
        """The state of a run that starts afresh (None) or resumes from a checkpoint's counters."""
        if counters is None:
            return cls()
        return cls(**{k: counters[k] for k in ("step", "tf_steps", "loss", "target_rank", "seen")},
                   probing=counters["probe_seconds"], seconds_before=counters["seconds"])

    def counters(self) -> dict:
        return {"step": self.step, "tf_steps": self.tf_steps, "loss": self.loss, "target_rank": self.target_rank,
                "seen": self.seen, "probe_seconds": self.probing, "seconds": self.training_seconds()}


def _metrics(cfg: PretrainConfig, model: AJEPA, run: RunState, position_loss: float, schedule: tuple,
             evaluate, total_steps: int) -> dict:
    """What a logged step records; the learning-curve probe too when one is due."""
    now = time.perf_counter()
    run.target_rank = effective_rank(model.last_target.float())
    lr_now, wd_now, momentum = schedule
    metrics = {"train/loss": run.loss, "train/position_only_loss": position_loss, "train/lr": lr_now,
               "train/weight_decay": wd_now, "train/ema_momentum": momentum,
               "train/tf_fraction": run.tf_steps / run.step,
               "train/samples_per_s": run.seen_since_log / max(now - run.last_log, 1e-9),
               "train/target_rank": run.target_rank}
    if evaluate is not None and cfg.probe.every and (run.step % cfg.probe.every == 0 or run.step == total_steps):
        metrics.update(_probe(model, run, evaluate))
    run.last_log, run.seen_since_log = time.perf_counter(), 0
    return metrics


def _probe(model: AJEPA, run: RunState, evaluate) -> dict:
    """The learning-curve probe of the model after run.step steps, its seconds counted apart from training."""
    now = time.perf_counter()
    metrics = evaluate(run.step, model)
    model.train()
    run.probing += time.perf_counter() - now
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
             evaluate: Callable[[int, AJEPA], dict] | None = None,
             stop_requested: Callable[[], int | None] | None = None) -> PretrainResult:
    """Train (or resume) to the configured number of steps; rank 0 logs and writes every output.

    `open_log(first)` returns the `log(step, metrics)` that receives the training metrics every
    `log_every` steps, `step` being the steps done (rank 0 only; it is told the first step this run logs
    so that it can drop what an interrupted run logged after its last checkpoint);
    `stop_after` ends the run early after that many steps as if interrupted (tests, time-boxed jobs);
    `evaluate(steps_done, model)`, on rank 0 before the first step of a fresh run (step 0: the untrained
    model), every `cfg.probe.every` steps and at the end, returns
    metrics logged with the others (the learning-curve probe); `stop_requested()`, asked after every
    step, returns a signal number when the run should save and stop there (ajepa.interrupt): it then
    raises Interrupted once the checkpoint is saved.
    """
    grid, patch_size = tuple(store.stats["grid"]), int(store.stats["patch_size"])
    steps_per_epoch = _check_batch(cfg, store, dist)
    total_steps = cfg.optim.epochs * steps_per_epoch
    parts = build(cfg, grid, patch_size, steps_per_epoch, dist.device)
    model, schedules, position_only = parts["model"], [parts[k] for k in ("lr", "wd", "momentum")], parts["position_only"]
    engine = Engine("pretrain", parts, dist, paths.state / "checkpoint.pt", run_hash(cfg, store))
    run = RunState.resumed(engine.resume())
    start_step, engine.saved = run.step, run.step or None
    # rows are logged at the steps done (0: the untrained model); a resumed run keeps the rows up to its
    # checkpoint's step and drops what the interrupted run logged after it
    log = engine.tracker(open_log, start_step + 1 if start_step else 0)
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    loader = _loader(cfg, store, dist, total_steps, start_step, end_step)
    engine.configure(cfg.optim.batch_size // dist.world_size, cfg.micro_batch, cfg.activation_checkpointing,
                     cfg.compile, probe_loss(cfg, model, grid, patch_size, total_steps, dist.device))
    model.train()
    if dist.is_main and evaluate is not None and cfg.probe.every and start_step == 0:
        log(0, _probe(model, run, evaluate))  # the curve starts at random init
        run.last_log = time.perf_counter()
    bar = progress(end_step - start_step, "pretrain", "step", enabled=dist.is_main)

    def step(batch: PretrainBatch) -> int:
        schedule = tuple(s.step() for s in schedules)
        targets = batch.masks.targets.to(dist.device, non_blocking=True)
        run.loss = train_step(engine.train_model, engine.optimizer, batch.x.to(dist.device, non_blocking=True),
                              batch.masks.context.to(dist.device, non_blocking=True), targets, schedule[2],
                              cfg.optim.grad_clip, engine.autocast, engine.micro_batch)
        position_loss = position_only.loss_and_update(model.last_target, targets)
        run.step, run.tf_steps = batch.step + 1, run.tf_steps + (batch.masks.mode == "tf")
        run.seen, run.seen_since_log = run.seen + cfg.optim.batch_size, run.seen_since_log + cfg.optim.batch_size
        bar.update(1)
        if dist.is_main and (run.step % cfg.log_every == 0 or run.step == end_step):
            log(run.step, _metrics(cfg, model, run, position_loss, schedule, evaluate, total_steps))
            bar.set_postfix(loss=f"{run.loss:.4f}")
        return run.step

    stopped_by = engine.loop(((b.step, b) for b in loader), step, run.counters, end_step, cfg.checkpoint_every,
                             "step", "lower pretrain.optim.lr or check the features", stop_requested)
    bar.close()
    return _finish(engine, run, paths, export_config(cfg, store, total_steps), start_step,
                   stopped_by if run.step < end_step else 0)


def _finish(engine: Engine, run: RunState, paths: PretrainPaths, export: dict, start_step: int,
            stopped_by: int) -> PretrainResult:
    """Save the final state, export both encoders when the run is complete, and sum it up; or, when a
    signal (`stopped_by`) ended it early, raise Interrupted once the state is saved."""
    counters = run.counters()
    seconds = counters["seconds"]
    engine.finish(counters, stopped_by, "step", run.step, trained=run.step > start_step)
    if engine.dist.is_main and run.step == export["training"]["steps"]:
        for which, folder in paths.encoders.items():
            write_export(folder, getattr(engine.model, f"{which}_encoder"), {"encoder": which, **export})
    return PretrainResult(steps=run.step, start_step=start_step, final_loss=run.loss,
                          samples_per_s=run.seen / seconds if seconds > 0 else 0.0, seconds=seconds,
                          probe_seconds=run.probing, tf_fraction=run.tf_steps / run.step if run.step else 0.0,
                          target_rank=run.target_rank)
