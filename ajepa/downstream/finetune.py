"""Full fine-tuning: the pretrained encoder + mean pool + LayerNorm + linear head (AudioMAE recipe)
with A-JEPA's regularized masking.

One run trains on a protocol split's training clips, picks the epoch with the best validation
score and scores the test clips once with that epoch's weights. Per step, in this order:
  roll, magnitude   a circular time shift and a level change of each clip (AudioMAE's roll_mag_aug
            on the waveform, restated on the cached log-mel: ajepa.data.augment)
  mixup     each clip, with probability `mixup`, mixed with a random training clip in the power
            domain (what mixing the waveforms gives), weight l ~ Beta(10, 10), targets l y1 + (1 - l) y2
  SpecAug   one time mask of width U[0, specaug_time) frames and one frequency mask of width
            U[0, specaug_freq) bins per clip (torchaudio's TimeMasking/FrequencyMasking draws),
            filled with what AudioMAE fills them with: log-mel 0 before normalisation
  noise     AST's speech noise: uniform noise on the normalised bins and a shift of up to 10 frames
  regularized masking  in every block a fresh `key_mask_ratio` of the tokens may not be attended
            to (A-JEPA; ajepa.models.attention), training only
Layer-wise lr decay (BEiT/AudioMAE): block l of L trains at lr * decay^(L + 1 - l), the patch
embedding at decay^(L + 1), the norms and the head at the full lr. Warmup then cosine per step.

What is fine-tuning's own: the model (Classifier), the batch (StepBatches, built ahead by loader
workers: batch_stream; then `augment`) and the loss; the engine (ajepa.train.engine) runs the rest, as
it does for pretraining. Every random draw comes from a stream named by (seed, epoch) or (seed, step)
(ajepa.seeding), and a checkpoint after every epoch holds the whole state, so an interrupted run
resumes to the same result, with any number of loader workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.utils.data import Dataset

from ajepa.config import FinetuneConfig
from ajepa.data.augment import add_noise, mix_targets, mixup_draws, power_mix, roll_time, scale_magnitude
from ajepa.data.loader import step_loader
from ajepa.downstream.linear import fit_logistic
from ajepa.downstream.protocols import EvalSplit, Task
from ajepa.errors import AjepaError
from ajepa.models import SpectrogramEncoder
from ajepa.models.state import check_state
from ajepa.progress import progress
from ajepa.seeding import torch_generator
from ajepa.train.checkpoint import restoring
from ajepa.train.engine import Engine, single_process
from ajepa.train.schedules import WarmupCosine, layer_decay_groups

__all__ = ["Classifier", "augment", "spec_augment", "mixup_partners", "epoch_order", "StepBatches", "FinetuneBatch",
           "batch_stream", "build", "train_step", "finetune_run", "RunResult", "PROBE_L2"]

PROBE_L2 = [0.1, 0.01, 0.001, 0.0001]  # LP-FT's probe: the strengths the linear probe tries by default


class Classifier(nn.Module):
    """Encoder tokens -> pool -> LayerNorm -> linear. pooling "all" is AudioMAE's global-pool head (the
    mean of every patch); "time" keeps the frequency patches (the mean over time of each, each normalised,
    concatenated), as the linear probe reads them. head_norm "fc_norm" drops the encoder's final norm, so
    the pooled tokens meet one LayerNorm (AudioMAE's models_vit.py: `del self.norm`, `fc_norm` after the
    mean); "encoder" keeps it before the pool."""

    def __init__(self, encoder: SpectrogramEncoder, num_classes: int, pooling: str = "all",
                 head_norm: str = "encoder"):
        super().__init__()
        if head_norm not in ("encoder", "fc_norm"):
            raise ValueError(f"head_norm must be 'encoder' or 'fc_norm', got {head_norm!r}")
        if head_norm == "fc_norm":
            encoder.norm = nn.Identity()
        self.encoder, self.pooling = encoder, pooling
        self.norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        width = encoder.embed_dim * (encoder.grid[1] if pooling == "time" else 1)
        self.head = nn.Linear(width, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)  # MAE/AudioMAE fine-tuning head init
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor, key_mask_ratio: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """What the linear head reads: the pooled, normalised tokens [B, D] or [B, F * D]."""
        z = self.encoder(x, key_mask_ratio=key_mask_ratio, generator=generator)
        if self.pooling == "all":
            return self.norm(z.mean(dim=1))
        n_time, n_freq = self.encoder.grid
        return self.norm(z.reshape(len(z), n_time, n_freq, -1).mean(dim=1)).flatten(1)  # bands [B, F, D]

    def forward(self, x: torch.Tensor, key_mask_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.head(self.features(x, key_mask_ratio, generator))


@torch.no_grad()
def probe_head(model: Classifier, task: Task, split: EvalSplit, l2: list[float], batch_size: int,
               device: torch.device) -> None:
    """LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): set the head to the
    logistic regression of the frozen model's head inputs (train clips, L2 strength chosen on the val
    clips), so fine-tuning starts from the linear probe instead of from a random head."""


    model.eval()
    positions = np.concatenate([split.train, split.val])
    feats = torch.cat([model.features(task.clips(positions[s:s + batch_size]).to(device)).float().cpu()
                       for s in range(0, len(positions), batch_size)])
    x = torch.zeros(len(task.y), feats.shape[1])
    x[torch.as_tensor(positions)] = feats
    w, b, _, _ = fit_logistic(task, x, split, l2)
    model.head.weight.copy_(w.T.to(model.head.weight.device))
    model.head.bias.copy_(b.to(model.head.bias.device))


def spec_augment(x: torch.Tensor, max_time: int, max_freq: int, fill: float, g: torch.Generator) -> torch.Tensor:
    """One time and one frequency mask per clip of x [B, T, F] (widths U[0, max), torchaudio-style)."""
    B, T, Fb = x.shape
    x = x.clone()
    for axis, size, width in ((1, T, max_time), (2, Fb, max_freq)):
        if width <= 0:
            continue
        w = (torch.rand(B, generator=g) * min(width, size)).long()
        start = (torch.rand(B, generator=g) * (size - w + 1).float()).long().clamp(max=size - 1)
        pos = torch.arange(size)
        m = (pos[None] >= start[:, None]) & (pos[None] < (start + w)[:, None])  # [B, size]
        m = m.to(x.device)
        x.masked_fill_(m[:, :, None] if axis == 1 else m[:, None, :], fill)
    return x


def augment(x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, mean: float, std: float, g: torch.Generator,
            partners: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """AudioMAE's training augmentation of a batch (on any device) of normalised log-mels x [B, T, F] with float
    targets y [B, C], in its order (ajepa.data.augment): roll and magnitude, mixup (each clip with
    probability cfg.mixup, its partner from `partners(n) -> (x2, y2)`, n random training clips, rolled
    and scaled alike), SpecAugment (masks filled with log-mel 0, as AudioMAE fills them), noise; then
    label smoothing of CE targets."""
    x = _roll_magnitude(x, cfg, std, g)
    if cfg.mixup > 0:
        mixed, lam = mixup_draws(len(x), cfg.mixup, cfg.mixup_alpha, g)
        if mixed.any():
            x2, y2 = partners(int(mixed.sum()))
            x2 = _roll_magnitude(x2.to(x.device), cfg, std, g)
            lam, rows = lam[mixed], mixed.to(x.device)
            x, y = x.clone(), y.clone()
            x[rows] = power_mix(x[rows], x2, lam, mean, std)
            y[rows] = mix_targets(y[rows], y2.to(y.device), lam)
    if cfg.specaug_time or cfg.specaug_freq:
        x = spec_augment(x, cfg.specaug_time, cfg.specaug_freq, -mean / (2.0 * std), g)  # log-mel 0, normalised
    if cfg.noise:
        x = add_noise(x, g)
    if cfg.label_smoothing and cfg.loss == "ce":  # timm's LabelSmoothingCrossEntropy is CE on these targets
        y = y * (1.0 - cfg.label_smoothing) + cfg.label_smoothing / y.shape[1]
    return x, y


def _roll_magnitude(x: torch.Tensor, cfg: FinetuneConfig, std: float, g: torch.Generator) -> torch.Tensor:
    if cfg.roll:
        x = roll_time(x, g)
    if cfg.magnitude:
        x = scale_magnitude(x, std, g)
    return x


@dataclass
class RunResult:
    name: str  # "<init>-<split>"
    test: dict  # metrics of the test clips at the best epoch
    best_epoch: int
    val_score: float
    test_positions: list[int]
    test_scores: list[list[float]]  # softmax / sigmoid scores per test clip
    seconds: float
    history: list[dict]


def _one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(y, num_classes).float() if y.dtype == torch.long else y.float()


def _loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)  # probability targets (one-hot or mixed)


@torch.no_grad()
def predict(model: Classifier, task: Task, positions: np.ndarray, batch_size: int, device: torch.device,
            autocast) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, len(positions), batch_size):
        with autocast:
            out.append(model(task.clips(positions[s:s + batch_size]).to(device)).float().cpu())
    return torch.cat(out)


def epoch_order(task: Task, split: EvalSplit, cfg: FinetuneConfig, epoch: int) -> np.ndarray:
    """The training clips (store positions) of one epoch, drawn from the stream (seed, epoch)."""
    g = torch_generator(cfg.seed, "finetune-epoch", epoch)
    n = cfg.samples_per_epoch or len(split.train)
    if cfg.balanced_sampling:
        y = _one_hot(task.y[split.train], len(task.classes))
        # AudioMAE's weights: a clip weighs the sum over its labels of 1 / (label frequency)
        w = (y / y.sum(0).clamp_min(1)).sum(1).clamp_min(1e-12)
        if not cfg.balanced_replacement and n > len(w):
            raise AjepaError(f"samples_per_epoch = {n} draws without replacement from {len(w)} training clips: "
                             f"lower it, or set balanced_replacement: true")
        return split.train[torch.multinomial(w, n, replacement=cfg.balanced_replacement, generator=g).numpy()]
    reps = math.ceil(n / len(split.train))
    order = torch.cat([torch.randperm(len(split.train), generator=g) for _ in range(reps)])[:n]
    return split.train[order.numpy()]


def mixup_partners(task: Task, split: EvalSplit, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n clips drawn uniformly from the training clips with their float targets: AST/AudioMAE draw a
    mixed clip's partner uniformly from the whole training set (not from the balanced draw)."""
    idx = split.train[torch.randint(0, len(split.train), (n,), generator=g).numpy()]
    return task.clips(idx), _one_hot(task.y[idx], len(task.classes))


class FinetuneBatch(NamedTuple):
    """The clips of one fine-tuning step, before augmentation."""

    x: torch.Tensor  # [B, T, F] normalised log-mels
    y: torch.Tensor  # [B, C] float targets
    x2: torch.Tensor  # [B, T, F] mixup partner candidates (the first n serve the n mixed clips); [0] without mixup
    y2: torch.Tensor  # [B, C] their targets
    step: int

    def pin_memory(self) -> FinetuneBatch:
        return FinetuneBatch(*(t.pin_memory() for t in self[:4]), self.step)


class StepBatches(Dataset):
    """`batches[step]`: the clips of fine-tuning step `step`, a pure function of (seed, step): epoch
    step // steps_per_epoch's order (`epoch_order`), and partner candidates from the stream (seed, step)."""

    def __init__(self, task: Task, split: EvalSplit, cfg: FinetuneConfig, steps_per_epoch: int):
        self.task, self.split, self.cfg, self.steps_per_epoch = task, split, cfg, steps_per_epoch
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def __getitem__(self, step: int) -> FinetuneBatch:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.task, self.split, self.cfg, epoch)
        size, classes = self.cfg.batch_size, len(self.task.classes)
        idx = self._order[b * size:(b + 1) * size]
        if self.cfg.mixup > 0:
            x2, y2 = mixup_partners(self.task, self.split, size, torch_generator(self.cfg.seed, "finetune-mixup", step))
        else:
            x2, y2 = torch.empty(0), torch.empty(0)
        return FinetuneBatch(self.task.clips(idx), _one_hot(self.task.y[idx], classes), x2, y2, step)


def batch_stream(batches: StepBatches, first_epoch: int, device: torch.device) -> Iterator[FinetuneBatch]:
    """The batches of every step from epoch `first_epoch` (0-based) on, in step order, built ahead by
    cfg.num_workers loader processes (started at the first batch, so a finished run starts none), each
    cfg.prefetch batches ahead, through validation too; pinned for a CUDA `device`. The same batches
    for any worker count: each is `batches[step]`."""
    cfg, first = batches.cfg, first_epoch * batches.steps_per_epoch
    yield from step_loader(batches, range(first, len(batches)), cfg.seed, cfg.num_workers, cfg.prefetch,
                           pin_memory=device.type == "cuda")


@dataclass
class FinetuneProgress:
    """A fine-tuning run's counters, kept in its checkpoint beside the engine's parts."""

    epoch: int = 0  # epochs done
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    history: list = field(default_factory=list)

    def counters(self) -> dict:
        return {"epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "history": self.history}


def steps_per_epoch(cfg: FinetuneConfig, split: EvalSplit) -> int:
    return max(1, (cfg.samples_per_epoch or len(split.train)) // cfg.batch_size)


def build(encoder: SpectrogramEncoder, task: Task, split: EvalSplit, cfg: FinetuneConfig, device: torch.device,
          state_path: Path, run_hash: str, name: str = "finetune") -> Engine:
    """The run's engine: the classifier (its head from the linear probe with cfg.head_init "probe"), AdamW
    with layer-wise lr decay and warmup-cosine per step, checkpointed to `state_path`."""
    model = Classifier(encoder, len(task.classes), cfg.pooling, cfg.head_norm).to(device)
    if cfg.head_init == "probe":
        probe_head(model, task, split, PROBE_L2, cfg.batch_size * 2, device)
    opt = torch.optim.AdamW(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr,
                            betas=(0.9, 0.999))
    total = steps_per_epoch(cfg, split)
    lr = WarmupCosine(cfg.lr, cfg.final_lr, round(cfg.warmup_epochs * total), cfg.epochs * total, optimizer=opt)
    return Engine(name, {"model": model, "optimizer": opt, "lr": lr}, single_process(device), state_path, run_hash)


def train_step(engine: Engine, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, g: torch.Generator) -> float:
    """One optimiser step on an augmented batch (regularized masking drawn from `g`); returns the loss."""
    engine.parts["lr"].step()

    def loss_of(model: nn.Module, rows: slice) -> torch.Tensor:
        logits = model(x[rows], key_mask_ratio=cfg.key_mask_ratio, generator=g)
        return _loss(logits.float(), y[rows], cfg.loss)
    return engine.step(len(x), loss_of)


def _probe_loss(model: Classifier, task: Task, split: EvalSplit, cfg: FinetuneConfig, device: torch.device):
    """loss(size) on real training clips, for `micro_batch: auto` (ajepa.train.engine)."""
    def loss(size: int) -> torch.Tensor:
        x = task.clips(np.resize(split.train, size)).to(device)
        return model(x, key_mask_ratio=cfg.key_mask_ratio).float().logsumexp(1).mean()
    return loss


def train_epoch(engine: Engine, batches: Iterable[FinetuneBatch], cfg: FinetuneConfig, stats: dict, bar) -> float:
    """One epoch's steps over `batches` (augmentation on the model's device from the stream (seed, step),
    normalised by the store's `stats`); returns the mean training loss."""
    engine.model.train()
    mean, std, device = float(stats["mean"]), float(stats["std"]), engine.dist.device
    losses = []
    for batch in batches:
        g = torch_generator(cfg.seed, "finetune-step", batch.step)
        # augmented where the model runs: on a GPU, the CPU would otherwise hold back a large batch
        x, y = augment(batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True), cfg, mean, std,
                       g, partners=lambda n, batch=batch: (batch.x2[:n], batch.y2[:n]))
        losses.append(train_step(engine, x, y, cfg, g))
        bar.update(1)
    return float(np.mean(losses))


def _resume(engine: Engine) -> FinetuneProgress:
    counters = engine.resume()
    if counters is None:
        return FinetuneProgress()
    with restoring(engine.checkpoint):
        run = FinetuneProgress(**counters)
        if run.best_state is not None:  # loaded only at the end: checked now, not after the last epoch
            check_state({k: v.shape for k, v in engine.model.state_dict().items()}, run.best_state,
                        f"{engine.checkpoint} [best_state]")
    engine.saved = run.epoch or None
    return run


def finetune_run(task: Task, split: EvalSplit, encoder: SpectrogramEncoder, cfg: FinetuneConfig, name: str,
                 device: torch.device, state_path: Path, run_hash: str, open_log=None) -> RunResult:
    """Fine-tune `encoder` on one split (resuming from `state_path` when it holds this run), keep the epoch
    with the best validation score (cfg.selection "val_start": the starting weights, epoch 0, are scored
    too and kept when no epoch beats them; "last": train on the validation clips too and keep the last
    epoch) and score the test clips with it. `open_log(first_epoch)` returns a
    log(epoch, metrics) for the per-epoch curves (epochs from 1)."""
    if cfg.selection == "last":  # AudioMAE's training clips: its 4 ESC-50 folds, all of AudioSet's training segments
        split = replace(split, train=np.concatenate([split.train, split.val]))
    engine = build(encoder, task, split, cfg, device, state_path, run_hash, f"finetune {name}")
    run = _resume(engine)
    log = engine.tracker(open_log, run.epoch + 1)
    engine.model.train()
    engine.configure(cfg.batch_size, cfg.micro_batch, cfg.activation_checkpointing,
                     probe_loss=_probe_loss(engine.model, task, split, cfg, device))
    batches = StepBatches(task, split, cfg, steps_per_epoch(cfg, split))
    t0 = time.perf_counter()

    def validate() -> float:
        return task.selection_score(task.y[split.val], predict(engine.model, task, split.val, cfg.batch_size * 2,
                                                                device, engine.autocast))

    def keep(val: float, number: int) -> None:
        run.best_score, run.best_epoch = val, number
        run.best_state = {k: v.detach().cpu().clone() for k, v in engine.model.state_dict().items()}

    if cfg.selection == "val_start" and run.epoch == 0:  # LP-FT's start is the probe: fine-tuning must beat it
        keep(val := validate(), 0)
        run.history.append({"epoch": 0, f"val_{task.metric}": round(val, 3)})
    bar = progress((cfg.epochs - run.epoch) * batches.steps_per_epoch, f"finetune {name}", "step")

    def epoch(number: int) -> int:
        train_loss = train_epoch(engine, islice(stream, batches.steps_per_epoch), cfg, task.store.stats, bar)
        lr = engine.parts["lr"]
        lr_now = lr.value(lr.current_step - 1)  # the last step's
        val = validate()
        run.epoch = number
        run.history.append({"epoch": number, "train_loss": round(train_loss, 5), f"val_{task.metric}": round(val, 3),
                            "lr": lr_now})
        if val > run.best_score or cfg.selection == "last":  # ties keep the earlier epoch
            keep(val, number)
        log(number, {"train/loss": run.history[-1]["train_loss"], f"val/{task.metric}": val, "train/lr": lr_now})
        bar.set_postfix(val=f"{val:.1f}")
        return number

    with closing(batch_stream(batches, run.epoch, device)) as stream:  # closed: its workers end with the loop
        engine.loop(((e, e) for e in range(run.epoch + 1, cfg.epochs + 1)), epoch, run.counters, cfg.epochs, 1,
                    "epoch", "lower the benchmark's finetune lr")
    engine.finish(run.counters(), 0, "epoch", run.epoch)
    bar.close()
    engine.model.load_state_dict(run.best_state)
    logits = predict(engine.model, task, split.test, cfg.batch_size * 2, device, engine.autocast)
    scores = torch.sigmoid(logits) if task.multi_label else torch.softmax(logits, dim=1)
    return RunResult(name, task.score(task.y[split.test], logits), run.best_epoch, run.best_score,
                     split.test.tolist(), scores.tolist(), time.perf_counter() - t0, run.history)


def result_dict(r: RunResult) -> dict:
    return asdict(r)
