"""Full fine-tuning: the pretrained encoder + mean pool + LayerNorm + linear head (AudioMAE recipe)
with A-JEPA's regularized masking.

One run trains on a protocol split's training clips, picks the epoch with the best validation
score and scores the test clips once with that epoch's weights. Per step, in this order:
  roll      a random circular shift along time (AudioMAE rolls the waveform; this is the same shift
            on the spectrogram, which the features are cached as)
  mixup     x = l x + (1 - l) x[flipped batch], targets mixed alike, l ~ Beta(a, a)
  SpecAug   one time mask of width U[0, specaug_time) frames and one frequency mask of width
            U[0, specaug_freq) bins per clip (torchaudio's TimeMasking/FrequencyMasking draws),
            filled with what AudioMAE fills them with: log-mel 0 before normalisation
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ajepa.config import FinetuneConfig
from ajepa.downstream.linear import score, val_score
from ajepa.downstream.protocols import EvalSplit, Task
from ajepa.models import SpectrogramEncoder
from ajepa.train.pretrain import prune_live
from ajepa.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ajepa.train.schedules import WarmupCosine, _decays

__all__ = ["Classifier", "layer_decay_groups", "augment", "spec_augment", "finetune_run", "RunResult"]


class Classifier(nn.Module):
    """Encoder tokens -> mean over patches -> LayerNorm -> linear (AudioMAE's global-pool head)."""

    def __init__(self, encoder: SpectrogramEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)  # MAE/AudioMAE fine-tuning head init
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, key_mask_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        z = self.encoder(x, key_mask_ratio=key_mask_ratio, generator=generator)
        return self.head(self.norm(z.mean(dim=1)))


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups keyed by (layer, decays?), each with its `lr_scale` (see module docstring)."""
    depth = len(model.encoder.blocks)

    def layer_of(name: str) -> int:
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith("encoder.patch_embed"):
            return 0
        return depth + 1  # encoder.norm, norm, head

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decays = layer_of(name), _decays(name, p)
        g = groups.setdefault((layer, decays), {
            "name": f"layer{layer}_{'decay' if decays else 'no_decay'}", "params": [],
            "weight_decay": weight_decay if decays else 0.0, "lr_scale": layer_decay ** (depth + 1 - layer)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


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
        x.masked_fill_(m[:, :, None] if axis == 1 else m[:, None, :], fill)
    return x


def augment(x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, fill: float,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """roll -> mixup -> SpecAugment on a CPU batch; y becomes a float target matrix [B, C]."""
    if cfg.roll:
        shifts = torch.randint(0, x.shape[1], (x.shape[0],), generator=g)
        idx = (torch.arange(x.shape[1])[None] - shifts[:, None]) % x.shape[1]
        x = torch.gather(x, 1, idx[:, :, None].expand_as(x))
    if cfg.mixup > 0:
        seed = int(torch.randint(0, 2**31, (1,), generator=g))  # torch's Beta takes no generator
        lam = float(np.random.default_rng(seed).beta(cfg.mixup, cfg.mixup))
        x = lam * x + (1 - lam) * x.flip(0)
        y = lam * y + (1 - lam) * y.flip(0)
    if cfg.specaug_time or cfg.specaug_freq:
        x = spec_augment(x, cfg.specaug_time, cfg.specaug_freq, fill, g)
    return x, y


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
        return split.train[torch.multinomial(w, n, replacement=True, generator=g).numpy()]
    reps = math.ceil(n / len(split.train))
    order = torch.cat([torch.randperm(len(split.train), generator=g) for _ in range(reps)])[:n]
    return split.train[order.numpy()]


def finetune_run(task: Task, split: EvalSplit, encoder: SpectrogramEncoder, cfg: FinetuneConfig, name: str,
                 device: torch.device, state_path: Path, run_hash: str, live_dir: Path | None = None,
                 enable_progress: bool = True) -> RunResult:
    """Fine-tune `encoder` on one split (resuming from `state_path` when it holds this run)."""
    from ajepa.progress import progress

    num_classes = len(task.classes)
    model = Classifier(encoder, num_classes).to(device)
    opt = torch.optim.AdamW(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr,
                            betas=(0.9, 0.999))
    steps_per_epoch = max(1, (cfg.samples_per_epoch or len(split.train)) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    lr = WarmupCosine(cfg.lr, cfg.final_lr, round(cfg.warmup_epochs * steps_per_epoch), total, optimizer=opt)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stats = task.store.stats
    fill = (0.0 - float(stats["mean"])) / (2.0 * float(stats["std"]))  # log-mel 0, normalised

    start_epoch, best_score, best_epoch, best_state, history = 0, -math.inf, 0, None, []
    if state_path.exists():
        state = load_checkpoint(state_path, map_location="cpu")
        if state.get("run_hash") == run_hash:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            lr.load_state_dict(state["lr"])
            set_rng_state(state["rng"])
            start_epoch, best_score, best_epoch = int(state["epoch"]), float(state["best_score"]), int(state["best_epoch"])
            best_state, history = state["best_state"], list(state["history"])

    live = None
    if live_dir is not None:
        from dvclive import Live
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=start_epoch > 0, report=None)
        prune_live(live_dir, start_epoch + 1)  # rows are logged at step = epoch, 1-based

    t0 = time.perf_counter()
    bar = progress(total - start_epoch * steps_per_epoch, f"finetune {name}", "step", enabled=enable_progress)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = _epoch_order(task, split, cfg, epoch)
        losses = []
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, y = augment(task.clips(idx), _one_hot(task.y[idx], num_classes), cfg, fill, g)
            lr_now = lr.step()
            with autocast:
                logits = model(x.to(device), key_mask_ratio=cfg.key_mask_ratio, generator=g)
            loss = _loss(logits.float(), y.to(device), cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
        logits = predict(model, task, split.val, cfg.batch_size * 2, device, autocast)
        val = val_score(task, task.y[split.val], logits)
        history.append({"epoch": epoch + 1, "train_loss": round(float(np.mean(losses)), 5),
                        f"val_{task.metric}": round(val, 3), "lr": lr_now})
        if val > best_score:  # ties keep the earlier epoch
            best_score, best_epoch = val, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if live is not None:
            live.step = epoch + 1
            live.log_metric("train/loss", history[-1]["train_loss"])
            live.log_metric(f"val/{task.metric}", val)
            live.log_metric("train/lr", lr_now)
            live.next_step()
        bar.set_postfix(val=f"{val:.1f}")
        save_checkpoint(state_path, {"run_hash": run_hash, "epoch": epoch + 1, "model": model.state_dict(),
                                     "optimizer": opt.state_dict(), "lr": lr.state_dict(), "rng": rng_state(),
                                     "best_score": best_score, "best_epoch": best_epoch, "best_state": best_state,
                                     "history": history})
    bar.close()
    if live is not None:
        live.end()
    model.load_state_dict(best_state)
    logits = predict(model, task, split.test, cfg.batch_size * 2, device, autocast)
    test = score(task, task.y[split.test], logits)
    scores = torch.sigmoid(logits) if task.multi_label else torch.softmax(logits, dim=1)
    return RunResult(name, test, best_epoch, best_score, split.test.tolist(), scores.tolist(),
                     time.perf_counter() - t0, history)


def result_dict(r: RunResult) -> dict:
    return asdict(r)
