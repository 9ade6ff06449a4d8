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

Every random draw comes from generators seeded by (seed, epoch) or (seed, step), and a checkpoint
after every epoch holds the whole state, so an interrupted run resumes to the same result.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ajepa.config import FinetuneConfig
from ajepa.data.augment import add_noise, mix_targets, mixup_draws, power_mix, roll_time, scale_magnitude
from ajepa.downstream.protocols import EvalSplit, Task
from ajepa.errors import AjepaError
from ajepa.models import SpectrogramEncoder, set_activation_checkpointing
from ajepa.train.checkpoint import (check_state, load_checkpoint, load_fitting, load_optimizer, restoring, rng_state,
                                    save_checkpoint, set_rng_state)
from ajepa.train.compute import accumulate, fits_in_cuda_memory, resolve_micro_batch
from ajepa.train.finite import NonFinite, check_loss, check_weights
from ajepa.train.schedules import WarmupCosine, layer_decay_groups

__all__ = ["Classifier", "augment", "spec_augment", "mixup_partners", "finetune_run", "RunResult", "PROBE_L2"]

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
    from ajepa.downstream.linear import fit_logistic

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


def _epoch_order(task: Task, split: EvalSplit, cfg: FinetuneConfig, epoch: int) -> np.ndarray:
    """The training clips (store positions) of one epoch, drawn from a generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
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


@dataclass
class FinetuneState:
    """What one fine-tuning run updates, and what its checkpoint holds."""

    model: Classifier
    optimizer: torch.optim.Optimizer
    lr: WarmupCosine
    steps_per_epoch: int
    epoch: int = 0  # epochs done
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    history: list = field(default_factory=list)
    micro_batch: int | None = None  # clips per forward/backward (None: the whole batch); not checkpointed

    def checkpoint(self, run_hash: str) -> dict:
        return {"run_hash": run_hash, "epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lr": self.lr.state_dict(), "rng": rng_state(),
                "best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "history": self.history}

    def resume(self, state_path: Path, run_hash: str) -> None:
        """Continue from `state_path` when it holds this run (same hash); otherwise start afresh."""
        if not state_path.exists():
            return
        state = load_checkpoint(state_path, map_location="cpu")
        if state.get("run_hash") != run_hash:
            return
        with restoring(state_path):
            load_fitting(self.model, state["model"], f"{state_path} [model]")
            if state["best_state"] is not None:  # loaded only at the end: checked now, not after the last epoch
                check_state({k: v.shape for k, v in self.model.state_dict().items()}, state["best_state"],
                            f"{state_path} [best_state]")
            load_optimizer(self.optimizer, state["optimizer"], f"{state_path} [optimizer]")
            self.lr.load_state_dict(state["lr"])
            set_rng_state(state["rng"])
            self.epoch, self.best_score, self.best_epoch = int(state["epoch"]), float(state["best_score"]), \
                int(state["best_epoch"])
            self.best_state, self.history = state["best_state"], list(state["history"])


def build(encoder: SpectrogramEncoder, task: Task, split: EvalSplit, cfg: FinetuneConfig,
          device: torch.device) -> FinetuneState:
    """The classifier (its head from the linear probe with cfg.head_init "probe"), AdamW with layer-wise
    lr decay, and warmup-cosine per step."""
    model = Classifier(encoder, len(task.classes), cfg.pooling, cfg.head_norm).to(device)
    if cfg.head_init == "probe":
        probe_head(model, task, split, PROBE_L2, cfg.batch_size * 2, device)
    train_clips = len(split.train)
    opt = torch.optim.AdamW(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr,
                            betas=(0.9, 0.999))
    steps_per_epoch = max(1, (cfg.samples_per_epoch or train_clips) // cfg.batch_size)
    lr = WarmupCosine(cfg.lr, cfg.final_lr, round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch,
                      optimizer=opt)
    return FinetuneState(model, opt, lr, steps_per_epoch)


def train_step(run: FinetuneState, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, g: torch.Generator,
               autocast) -> float:
    """One optimiser step on an augmented batch (regularized masking drawn from `g`, micro-batch after
    micro-batch when the batch is split); returns the loss."""
    run.lr.step()

    def loss_of(rows: slice) -> torch.Tensor:
        with autocast:
            logits = run.model(x[rows], key_mask_ratio=cfg.key_mask_ratio, generator=g)
        return _loss(logits.float(), y[rows], cfg.loss)

    run.optimizer.zero_grad(set_to_none=True)
    value = float(accumulate(run.model, len(x), run.micro_batch, loss_of))
    check_loss(value)  # before the update: the model keeps its last finite state
    run.optimizer.step()
    check_weights(run.model)
    return value


def configure_compute(run: FinetuneState, task: Task, split: EvalSplit, cfg: FinetuneConfig,
                      device: torch.device, autocast) -> None:
    """Activation checkpointing as configured, and the micro-batch size (`auto`: probed on CUDA with a
    forward/backward of real training clips at decreasing sizes)."""
    if cfg.activation_checkpointing:
        set_activation_checkpointing(run.model)
    if cfg.micro_batch != "auto" or device.type != "cuda":
        run.micro_batch = resolve_micro_batch(cfg.micro_batch, cfg.batch_size, device)
        return
    x = task.clips(np.resize(split.train, cfg.batch_size)).to(device)
    run.model.train()

    def forward_backward(size: int) -> None:
        try:
            with autocast:
                logits = run.model(x[:size], key_mask_ratio=cfg.key_mask_ratio)
            logits.float().logsumexp(1).mean().backward()
        finally:
            run.model.zero_grad(set_to_none=True)

    # AdamW's two moments, not allocated before the first step
    reserve = 2 * sum(p.numel() * p.element_size() for p in run.model.parameters())
    run.micro_batch = resolve_micro_batch("auto", cfg.batch_size, device,
                                          lambda m: fits_in_cuda_memory(device, lambda: forward_backward(m), reserve))


def train_epoch(run: FinetuneState, task: Task, split: EvalSplit, cfg: FinetuneConfig, device: torch.device,
                autocast, bar) -> float:
    """One epoch of steps over the training clips (order and augmentation seeded by epoch and step);
    returns the mean training loss."""
    run.model.train()
    mean, std = float(task.store.stats["mean"]), float(task.store.stats["std"])
    order = _epoch_order(task, split, cfg, run.epoch)
    losses = []
    for b in range(run.steps_per_epoch):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.epoch * run.steps_per_epoch + b)
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        # augmented where the model runs: on a GPU, the CPU would otherwise hold back a large batch
        x, y = augment(task.clips(idx).to(device), _one_hot(task.y[idx], len(task.classes)).to(device), cfg,
                       mean, std, g, partners=lambda n: mixup_partners(task, split, n, g))
        losses.append(train_step(run, x, y, cfg, g, autocast))
        bar.update(1)
    return float(np.mean(losses))


def finetune_run(task: Task, split: EvalSplit, encoder: SpectrogramEncoder, cfg: FinetuneConfig, name: str,
                 device: torch.device, state_path: Path, run_hash: str, open_log=None,
                 enable_progress: bool = True) -> RunResult:
    """Fine-tune `encoder` on one split (resuming from `state_path` when it holds this run), keep the epoch
    with the best validation score (cfg.selection "last": train on the validation clips too and keep the
    last epoch) and score the test clips with it. `open_log(first_epoch)` returns a
    log(epoch, metrics) for the per-epoch curves (epochs from 1)."""
    from ajepa.progress import progress

    if cfg.selection == "last":  # AudioMAE's training clips: its 4 ESC-50 folds, all of AudioSet's training segments
        split = replace(split, train=np.concatenate([split.train, split.val]))
    run = build(encoder, task, split, cfg, device)
    run.resume(state_path, run_hash)
    log = open_log(run.epoch + 1) if open_log else (lambda step, metrics: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    configure_compute(run, task, split, cfg, device, autocast)
    t0 = time.perf_counter()
    bar = progress((cfg.epochs - run.epoch) * run.steps_per_epoch, f"finetune {name}", "step",
                   enabled=enable_progress)
    while run.epoch < cfg.epochs:
        try:
            train_loss = train_epoch(run, task, split, cfg, device, autocast, bar)
        except NonFinite as e:
            raise AjepaError(f"finetune {name}: {e} in epoch {run.epoch + 1}: stopped; {_kept(state_path, run)}; "
                             "lower the benchmark's finetune lr") from None
        lr_now = run.lr.value(run.lr.current_step - 1)  # the last step's
        val = task.selection_score(task.y[split.val], predict(run.model, task, split.val, cfg.batch_size * 2,
                                                               device, autocast))
        run.epoch += 1
        run.history.append({"epoch": run.epoch, "train_loss": round(train_loss, 5), f"val_{task.metric}": round(val, 3),
                            "lr": lr_now})
        if val > run.best_score or cfg.selection == "last":  # ties keep the earlier epoch
            run.best_score, run.best_epoch = val, run.epoch
            run.best_state = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        log(run.epoch, {"train/loss": run.history[-1]["train_loss"], f"val/{task.metric}": val, "train/lr": lr_now})
        bar.set_postfix(val=f"{val:.1f}")
        save_checkpoint(state_path, run.checkpoint(run_hash))
    bar.close()
    run.model.load_state_dict(run.best_state)
    logits = predict(run.model, task, split.test, cfg.batch_size * 2, device, autocast)
    scores = torch.sigmoid(logits) if task.multi_label else torch.softmax(logits, dim=1)
    return RunResult(name, task.score(task.y[split.test], logits), run.best_epoch, run.best_score,
                     split.test.tolist(), scores.tolist(), time.perf_counter() - t0, run.history)


def _kept(state_path: Path, run: FinetuneState) -> str:
    if run.epoch and state_path.exists():
        return f"the last good checkpoint {state_path} (after epoch {run.epoch}) is kept"
    return "no checkpoint was written yet"


def result_dict(r: RunResult) -> dict:
    return asdict(r)
