"""Frozen-encoder probes (the paper gives no linear protocol; we follow MSM-MAE/M2D and EVAR for the
linear probe and V-JEPA for the attentive one).

Embeddings   the encoder's final tokens [T, F, D] pooled by `ajepa.models.pool_tokens`: by default the
             mean over time with the F frequency patches concatenated (F x D), since a mean over every
             token sums the bands through one patch projection and loses where the energy is.
Linear       the embeddings standardised on the training clips, then multinomial logistic regression
             (per-class sigmoid for multi-label sets) fit to convergence by L-BFGS for each L2 strength of
             a small grid; the strength with the best validation score is kept, and the test clips are
             scored once with it. A convex fit has no learning rate, batch or epoch count to tune, so
             every embedding (pretrained, random init, fbank) gets its best probe from the same grid.
Attentive    a learned query token attends over the frozen tokens (one cross-attention block and an
             MLP), then a linear head; AdamW with early stopping on the validation clips.
The learning curve uses the linear probe on train -> val only (`validation_probe`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from ajepa.atomic import atomic_path
from ajepa.config import AttentiveConfig, LinearConfig
from ajepa.downstream import metrics
from ajepa.downstream.common import summarize
from ajepa.downstream.protocols import EvalSplit, Task
from ajepa.models import SpectrogramEncoder, pool_tokens
from ajepa.progress import progress

__all__ = ["embed", "embed_tokens", "fbank_embeddings", "cached_embeddings", "fit_logistic", "fit_probe", "fit_attentive",
           "AttentiveProbe", "evaluate_embeddings", "evaluate_tokens", "validation_probe"]


@torch.no_grad()
def embed(encoder: SpectrogramEncoder, task: Task, batch_size: int, device: torch.device, pooling: str = "time",
          positions: np.ndarray | None = None, desc: str | None = None) -> np.ndarray:
    """The encoder's final (layer-normed) tokens of every clip (or of `positions`), pooled
    (ajepa.models.pool_tokens): [N, n_freq * D] for "time", [N, D] for "all"; float32. A progress bar
    named `desc` when one is given."""
    was_training = encoder.training
    encoder = encoder.to(device).eval()
    positions = np.arange(len(task.y)) if positions is None else np.asarray(positions)
    out = []
    with progress(len(positions), desc or "", "clip", enabled=desc is not None) as bar:
        for start in range(0, len(positions), batch_size):
            x = task.clips(positions[start:start + batch_size]).to(device)
            out.append(pool_tokens(encoder(x), encoder.grid, pooling).float().cpu())
            bar.update(len(x))
    encoder.train(was_training)
    return torch.cat(out).numpy()


def fbank_embeddings(task: Task, batch_size: int = 256, desc: str | None = None) -> np.ndarray:
    """The spectrogram baseline: normalised log-mel fbank averaged over time, [N, mel bins]."""
    out = []
    with progress(len(task.y), desc or "", "clip", enabled=desc is not None) as bar:
        for s in range(0, len(task.y), batch_size):
            out.append(task.clips(range(s, min(s + batch_size, len(task.y)))).mean(dim=1))
            bar.update(len(out[-1]))
    return torch.cat(out).numpy()


def cached_embeddings(path: Path, compute) -> np.ndarray:
    """np.load(path) if it exists, else compute(), written atomically. The caller puts what the
    embeddings depend on (encoder and features hash) in the file name."""
    if path.exists():
        return np.load(path)
    emb = np.ascontiguousarray(compute(), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, emb)
    return emb


def _loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y) if multi_label else F.cross_entropy(logits, y)


def standardise(x: torch.Tensor, train: np.ndarray) -> torch.Tensor:
    """Every feature to zero mean and unit variance over the training clips."""
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    return (x - mean) / std


def _logistic(x: torch.Tensor, y: torch.Tensor, l2: float, multi_label: bool, max_iter: int,
              start: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias minimising the cross-entropy (softmax, or per-class sigmoid) + l2 * |W|^2, by
    full-batch L-BFGS from `start`. The gradient is written out (the logits' gradient is the predicted
    minus the true probabilities): a line search calls this hundreds of times on small matrices, where
    autograd's bookkeeping would cost more than the arithmetic."""
    w, b = (t.clone() for t in start)
    target = y.float() if multi_label else F.one_hot(y, w.shape[1]).float()
    scale = 1.0 / (target.numel() if multi_label else len(target))  # the mean the loss takes
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():
        logits = x @ w + b
        predicted = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        residual = (predicted - target) * scale
        w.grad, b.grad = x.T @ residual + 2 * l2 * w, residual.sum(0)
        return _loss(logits, y, multi_label) + l2 * w.square().sum()

    opt.step(closure)
    return w, b


def fit_logistic(task: Task, x: torch.Tensor, split: EvalSplit, l2: list[float],
                 max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(W [D, C], b [C], strength, validation score): logistic regression on the rows split.train of x,
    one fit per L2 strength in `l2` (strongest first, each starting from the last), the strength with
    the best split.val score kept."""
    xtr, ytr, xva, yva = x[split.train], task.y[split.train], x[split.val], task.y[split.val]
    params = (torch.zeros(x.shape[1], len(task.classes)), torch.zeros(len(task.classes)))
    best, threads = None, torch.get_num_threads()
    torch.set_num_threads(1)  # products of a few MFLOP: more threads only add sync cost (and spin under load)
    try:
        for strength in sorted(l2, reverse=True):
            params = _logistic(xtr, ytr, strength, task.multi_label, max_iter, params)
            val = task.selection_score(yva, xva @ params[0] + params[1])
            if best is None or val > best[0]:
                best = (val, strength, params)
    finally:
        torch.set_num_threads(threads)
    val, strength, (w, b) = best
    return w, b, strength, val


def fit_probe(task: Task, emb: np.ndarray, split: EvalSplit, l2: list[float], max_iter: int = 100) -> dict:
    """Logistic regression on the standardised embeddings (fit_logistic), split.test scored once with
    the strength the validation clips chose. A convex fit to convergence has no learning rate, batch or
    epoch count to tune, so every row of the report gets its own best probe from the same grid."""
    x = standardise(torch.from_numpy(emb), split.train)
    w, b, strength, val = fit_logistic(task, x, split, l2, max_iter)
    test = task.score(task.y[split.test], x[split.test] @ w + b)
    return {"split": split.name, task.metric: round(float(test[task.metric]), 2), **metrics.secondary(test),
            "l2": strength, f"val_{task.metric}": round(float(val), 2), "train_clips": len(split.train),
            "val_clips": len(split.val), "test_clips": len(split.test)}


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive probe: a learned query token attends over the frozen tokens [B, N, D] (one
    cross-attention block with an MLP, pre-norm), then a linear head on the pooled token. Where a mean
    over tokens weighs every patch alike, the query learns which patches (and which of their
    features) to read, so the probe can use *where* something happens, not only whether it does."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_tokens = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        h = self.num_heads
        k, v = self.kv(self.norm_tokens(tokens)).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)
        q = self.q(self.query).reshape(1, 1, h, D // h).transpose(1, 2).expand(B, -1, -1, -1)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        x = self.query + self.proj(pooled)
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(x[:, 0])


def fit_attentive(task: Task, tokens: np.ndarray, split: EvalSplit, cfg: AttentiveConfig, seed: int) -> dict:
    """Train an AttentiveProbe on the frozen tokens [N clips, patches, D] of split.train with AdamW,
    keep the epoch with the best split.val score (stopping after `patience` epochs without one), and
    score split.test once with it."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(tokens)
    probe = AttentiveProbe(x.shape[-1], len(task.classes), cfg.num_heads)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def logits(positions: np.ndarray) -> torch.Tensor:
        probe.eval()
        with torch.no_grad():
            return torch.cat([probe(x[torch.as_tensor(p)].float()) for p in np.array_split(
                positions, max(1, len(positions) // 256))])

    best, best_state, best_epoch, since = -float("inf"), None, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        probe.train()
        for idx in torch.as_tensor(split.train)[torch.randperm(len(split.train), generator=g)].split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            _loss(probe(x[idx].float()), task.y[idx], task.multi_label).backward()
            opt.step()
        val = task.selection_score(task.y[split.val], logits(split.val))
        if val > best:
            best, best_state, best_epoch, since = val, copy.deepcopy(probe.state_dict()), epoch, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    probe.load_state_dict(best_state)
    test = task.score(task.y[split.test], logits(split.test))
    return {"split": split.name, task.metric: round(float(test[task.metric]), 2), **metrics.secondary(test),
            "best_epoch": best_epoch, "epochs_run": epoch, f"val_{task.metric}": round(float(best), 2),
            "train_clips": len(split.train), "val_clips": len(split.val), "test_clips": len(split.test)}


def evaluate_embeddings(task: Task, emb: np.ndarray, cfg: LinearConfig) -> dict:
    """The linear probe on every run of the benchmark's protocol, summarised (mean, std, runs)."""
    return summarize([fit_probe(task, emb, s, cfg.l2, cfg.max_iter) for s in task.splits], task.metric)


def evaluate_tokens(task: Task, tokens: np.ndarray, cfg: LinearConfig) -> dict:
    """The attentive probe on every run of the benchmark's protocol, summarised."""
    return summarize([fit_attentive(task, tokens, s, cfg.attentive, cfg.seed) for s in task.splits], task.metric)


def validation_probe(encoder: SpectrogramEncoder, task: Task, l2: list[float], device: torch.device,
                     pooling: str = "time", batch_size: int = 64) -> float:
    """The learning-curve probe: embed the train and val clips of the protocol's first run, fit the linear
    probe on train and return its validation score (the test clips are never touched). For a probe at
    every few hundred pretraining steps: one run, no test, no cache."""
    split = task.splits[0]
    positions = np.concatenate([split.train, split.val])
    pooled = embed(encoder, task, batch_size, device, pooling, positions)
    emb = np.zeros((len(task.y), pooled.shape[1]), dtype=np.float32)
    emb[positions] = pooled
    return fit_probe(task, emb, EvalSplit(split.name, split.train, split.val, split.val), l2)[task.metric]


@torch.no_grad()
def embed_tokens(encoder: SpectrogramEncoder, task: Task, batch_size: int, device: torch.device,
                 desc: str | None = None) -> np.ndarray:
    """Every clip's output tokens [N, patches, D] as float16 (the attentive probe's input)."""
    encoder = encoder.to(device).eval()
    out = []
    with progress(len(task.y), desc or "", "clip", enabled=desc is not None) as bar:
        for s in range(0, len(task.y), batch_size):
            out.append(encoder(task.clips(range(s, min(s + batch_size, len(task.y)))).to(device)).half().cpu())
            bar.update(len(out[-1]))
    return torch.cat(out).numpy()
