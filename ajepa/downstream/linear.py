"""Linear evaluation (EVAR-style; the paper gives no linear protocol): a frozen encoder's
mean-pooled patch embeddings, standardised on the training clips, and one linear layer trained
with Adam and early stopping on the validation clips. The test clips are scored once, with the
weights of the best validation epoch.

Three rows per benchmark: the pretrained encoder (`linear`), the same architecture with random
weights (`linear_random_init`: what pretraining adds) and the time-averaged log-mel fbank
(`fbank_baseline`: what a spectrogram alone gives).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ajepa.atomic import atomic_path
from ajepa.config import LinearConfig
from ajepa.downstream import metrics
from ajepa.downstream.common import summarize
from ajepa.downstream.protocols import EvalSplit, Task

__all__ = ["embed", "fbank_embeddings", "cached_embeddings", "fit_probe", "evaluate_embeddings", "score"]


@torch.no_grad()
def embed(encoder: torch.nn.Module, task: Task, batch_size: int, device: torch.device) -> np.ndarray:
    """Mean over every patch token of the encoder's final (layer-normed) output: [N, D] float32."""
    encoder = encoder.to(device).eval()
    out = []
    for start in range(0, len(task.y), batch_size):
        x = task.clips(range(start, min(start + batch_size, len(task.y)))).to(device)
        out.append(encoder(x).mean(dim=1).float().cpu())
    return torch.cat(out).numpy()


def fbank_embeddings(task: Task, batch_size: int = 256) -> np.ndarray:
    """The spectrogram baseline: normalised log-mel fbank averaged over time, [N, mel bins]."""
    out = [task.clips(range(s, min(s + batch_size, len(task.y)))).mean(dim=1)
           for s in range(0, len(task.y), batch_size)]
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


def score(task: Task, y: torch.Tensor, logits: torch.Tensor) -> dict:
    """The benchmark's metrics on raw model outputs (softmax / sigmoid scores)."""
    if task.multi_label:
        return metrics.multilabel_metrics(y.numpy(), torch.sigmoid(logits).numpy())
    return metrics.singlelabel_metrics(y.numpy(), torch.softmax(logits, dim=1).numpy(), len(task.classes))


def val_score(task: Task, y: torch.Tensor, logits: torch.Tensor) -> float:
    """The selection metric, cheaply: argmax accuracy in percent, or mAP (per-class sklearn AP)."""
    if task.multi_label:
        return metrics.mean_average_precision(y.numpy(), torch.sigmoid(logits).numpy())
    return float((logits.argmax(1) == y).float().mean()) * 100.0


def _loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y) if multi_label else F.cross_entropy(logits, y)


def fit_probe(task: Task, emb: np.ndarray, split: EvalSplit, cfg: LinearConfig) -> dict:
    """Train one linear layer on split.train, stop on split.val, score split.test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a [batch, D] x [D, C] product: threads only add sync cost (and spin under load)
    try:
        return _fit_probe(task, emb, split, cfg)
    finally:
        torch.set_num_threads(threads)


def _fit_probe(task: Task, emb: np.ndarray, split: EvalSplit, cfg: LinearConfig) -> dict:
    x = torch.from_numpy(emb)
    mean, std = x[split.train].mean(0), x[split.train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    xtr, ytr = x[split.train], task.y[split.train]
    xva, yva = x[split.val], task.y[split.val]
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    head = torch.nn.Linear(x.shape[1], len(task.classes))
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (-float("inf"), float("inf"))  # (val metric, val loss): higher metric wins, then lower loss
    best_state, best_epoch, since = copy.deepcopy(head.state_dict()), 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        for idx in torch.randperm(len(xtr), generator=g).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            _loss(head(xtr[idx]), ytr[idx], task.multi_label).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            logits = head(xva)
            val = (val_score(task, yva, logits), float(_loss(logits, yva, task.multi_label)))
        if val[0] > best[0] or (val[0] == best[0] and val[1] < best[1]):
            best, best_state, best_epoch, since = val, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    head.load_state_dict(best_state)
    with torch.no_grad():
        test = score(task, task.y[split.test], head(x[split.test]))
    return {"split": split.name, task.metric: round(float(test[task.metric]), 2), **metrics.secondary(test),
            "best_epoch": best_epoch, "epochs_run": epoch, f"val_{task.metric}": round(float(best[0]), 2),
            "train_clips": len(split.train), "val_clips": len(split.val), "test_clips": len(split.test)}


def evaluate_embeddings(task: Task, emb: np.ndarray, cfg: LinearConfig) -> dict:
    return summarize([fit_probe(task, emb, s, cfg) for s in task.splits], task.metric)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
