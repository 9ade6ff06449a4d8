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

Memory is bounded by a block, not by the clip count (AudioSet-2M's pooled embeddings are 50 GB per
encoder): the stage writes embeddings to disk batch by batch as they are computed (rowfile), computes the
standardisation in one streaming pass, and runs the same full-batch L-BFGS with each loss and gradient
summed over blocks of `linear.block_mb` (on the GPU when there is one). A set that fits in one block is
read once and fitted in memory on the CPU, exactly as before, so small benchmarks give the same figures on
every machine. The attentive probe reads its batches of tokens by position from disk.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from ajepa.config import AttentiveConfig, LinearConfig
from ajepa.downstream import metrics
from ajepa.downstream.common import summarize
from ajepa.downstream.protocols import EvalSplit, Task
from ajepa.downstream.rowfile import ArrayRows, RowFile, Rows, as_rows, write_rows
from ajepa.errors import AjepaError
from ajepa.models import SpectrogramEncoder, pool_tokens
from ajepa.progress import progress

__all__ = ["pooled_batches", "embed", "token_batches", "fbank_batches",
           "cached_embeddings", "block_rows", "standardisation", "Blocks", "fit_blocks", "fit_logistic", "fit_probe",
           "fit_attentive", "AttentiveProbe", "evaluate_embeddings", "evaluate_tokens", "validation_probe",
           "fbank_validation_probe"]


@torch.no_grad()
def pooled_batches(encoder: SpectrogramEncoder, task: Task, batch_size: int, device: torch.device,
                   pooling: str = "time", positions: np.ndarray | None = None,
                   desc: str | None = None) -> Iterator[np.ndarray]:
    """The encoder's final (layer-normed) tokens of every clip (or of `positions`), pooled
    (ajepa.models.pool_tokens), a batch at a time: [b, n_freq * D] for "time", [b, D] for "all"; float32.
    A progress bar named `desc` when one is given."""
    was_training = encoder.training
    encoder = encoder.to(device).eval()
    positions = np.arange(len(task.y)) if positions is None else np.asarray(positions)
    try:
        with progress(len(positions), desc or "", "clip", enabled=desc is not None) as bar:
            for start in range(0, len(positions), batch_size):
                x = task.clips(positions[start:start + batch_size]).to(device)
                yield pool_tokens(encoder(x), encoder.grid, pooling).float().cpu().numpy()
                bar.update(len(x))
    finally:
        encoder.train(was_training)


def embed(encoder: SpectrogramEncoder, task: Task, batch_size: int, device: torch.device, pooling: str = "time",
          positions: np.ndarray | None = None, desc: str | None = None) -> np.ndarray:
    """pooled_batches in one array [N, width] (in memory: for the learning curve's few clips)."""
    return np.concatenate(list(pooled_batches(encoder, task, batch_size, device, pooling, positions, desc)))


def fbank_batches(task: Task, batch_size: int = 256, desc: str | None = None,
                  positions: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The spectrogram baseline of every clip (or of `positions`), a batch at a time: normalised log-mel
    fbank averaged over time [b, mel bins]."""
    positions = np.arange(len(task.y)) if positions is None else np.asarray(positions)
    with progress(len(positions), desc or "", "clip", enabled=desc is not None) as bar:
        for s in range(0, len(positions), batch_size):
            batch = task.clips(positions[s:s + batch_size]).mean(dim=1).numpy()
            yield batch
            bar.update(len(batch))


@torch.no_grad()
def token_batches(encoder: SpectrogramEncoder, task: Task, batch_size: int, device: torch.device,
                  desc: str | None = None) -> Iterator[np.ndarray]:
    """Every clip's output tokens [b, patches, D] as float16 (the attentive probe's input), a batch at a time."""
    encoder = encoder.to(device).eval()
    with progress(len(task.y), desc or "", "clip", enabled=desc is not None) as bar:
        for s in range(0, len(task.y), batch_size):
            batch = encoder(task.clips(range(s, min(s + batch_size, len(task.y)))).to(device)).half().cpu().numpy()
            yield batch
            bar.update(len(batch))


def cached_embeddings(path: Path, n: int, batches: Callable[[], Iterable[np.ndarray]], what: str) -> RowFile:
    """The rows of `path` if it exists, else the n rows batches() yields, written there batch by batch
    (atomically; rowfile.write_rows, which refuses non-finite rows naming `what`). Either way read from
    disk by block, never held whole. The caller puts what the embeddings depend on (encoder and features
    hash) in the file name."""
    if not path.exists():
        write_rows(path, n, batches(), what)
    return RowFile(path)


def _loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y) if multi_label else F.cross_entropy(logits, y)


def block_rows(rows: Rows, block_mb: float) -> int:
    """Rows per block: as many float32 rows of `rows` as fit in block_mb MiB (at least one)."""
    return max(1, int(block_mb * 2**20) // (4 * int(np.prod(rows.shape[1:], dtype=np.int64))))


def standardisation(rows: Rows, positions: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (unbiased, floored at 1e-6) of every feature over the rows `positions`: in float32 from
    one read when they fit in a block of `size` rows (the in-memory fit's exact figures), else in one
    streaming pass over the blocks in float64 (Chan et al.'s pairwise update of mean and squared deviations)."""
    if len(positions) <= size:
        x = torch.from_numpy(rows.read(positions)).float()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    else:
        n, mean, m2 = 0, torch.zeros(rows.shape[1:], dtype=torch.float64), 0.0
        for _, block in rows.blocks(positions, size):
            b = torch.from_numpy(block).double()
            k, block_mean = len(b), b.mean(0)
            delta = block_mean - mean
            mean = mean + delta * (k / (n + k))
            m2 = m2 + b.sub_(block_mean).square_().sum(0) + delta.square() * (n * k / (n + k))  # in place: one copy
            n += k
        mean, std = mean.float(), (m2 / max(n - 1, 1)).sqrt().float().clamp_min(1e-6)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise AjepaError(f"{rows.name}: the training clips' embeddings are not finite (NaN or inf): the encoder "
                         "or input they came from is damaged; delete the file and rerun")
    return mean, std


class Blocks:
    """The rows `positions` of `rows` as float32 tensors on `device`, standardised by `stats` (mean, std)
    when given: (slice of positions, block) pairs of at most `size` rows, one pass per iteration. A set of
    one block is read once and held (the in-memory fit); a larger one is read again at every pass, unless
    it fits in half the GPU's free memory, where it is held after the first pass (no disk reads after)."""

    def __init__(self, rows: Rows, positions: np.ndarray, size: int, device: torch.device,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.rows, self.positions, self.size, self.device = rows, np.asarray(positions), size, device
        self.stats = None if stats is None else tuple(t.to(device) for t in stats)
        self.held: list | None = None
        nbytes = len(self.positions) * 4 * int(np.prod(rows.shape[1:], dtype=np.int64))
        self.keep = len(self.positions) <= size or (
            device.type == "cuda" and nbytes < torch.cuda.mem_get_info(device)[0] / 2)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def one_block(self) -> bool:
        return len(self.positions) <= self.size

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor]]:
        if self.held is not None:
            yield from self.held
            return
        out = []
        for part, block in self.rows.blocks(self.positions, self.size):
            x = torch.from_numpy(block).to(self.device).float()
            if self.stats is not None:  # in place (Rows.read gives a fresh array): one buffer per block keeps
                x = x.sub_(self.stats[0]).div_(self.stats[1])  # a streamed pass's memory flat (ajepa bench probe)
            if self.keep:
                out.append((part, x))
            yield part, x
        self.held = out if self.keep else None


def _logistic(data: Blocks, y: torch.Tensor, l2: float, multi_label: bool, max_iter: int,
              start: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias minimising the cross-entropy (softmax, or per-class sigmoid) + l2 * |W|^2 over the
    rows of `data` (labels y), by full-batch L-BFGS from `start`: every evaluation is one pass over the
    blocks, summing the loss (each block's mean weighted by its share of the rows) and the gradient, so a
    streamed fit reaches the same optimum as one in memory. The gradient is written out (the logits' gradient
    is the predicted minus the true probabilities): a line search calls this hundreds of times on small
    matrices, where autograd's bookkeeping would cost more than the arithmetic."""
    w, b = (t.clone() for t in start)
    classes, n = w.shape[1], len(y)
    scale = 1.0 / (n * classes if multi_label else n)  # the mean the loss takes
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():
        loss, grad_w, grad_b = 0.0, 2 * l2 * w, None
        for part, x in data:
            labels = y[part].to(w.device)
            target = labels.float() if multi_label else F.one_hot(labels, classes).float()
            logits = x @ w + b
            predicted = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
            residual = (predicted - target) * scale
            grad_w = x.T @ residual + grad_w
            grad_b = residual.sum(0) if grad_b is None else grad_b + residual.sum(0)
            loss = _loss(logits, labels, multi_label) * (len(x) / n) + loss
        w.grad, b.grad = grad_w, grad_b
        return loss + l2 * w.square().sum()

    opt.step(closure)
    return w, b


def logits_of(data: Blocks, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The probe's scores [len(data), C] of the rows of `data`, on the CPU; non-finite scores are one error
    naming the embeddings they came from."""
    out = torch.cat([(x @ w + b).cpu() for _, x in data])
    if not torch.isfinite(out).all():
        raise AjepaError(f"{data.rows.name}: the linear probe's scores are not finite (NaN or inf): the embeddings "
                         "or the encoder they came from are damaged; delete the file and rerun")
    return out


def fit_blocks(task: Task, train: Blocks, val: Blocks, l2: list[float],
               max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(W [D, C], b [C], strength, validation score): logistic regression on the rows of `train`, one fit per
    L2 strength in `l2` (strongest first, each starting from the last), the strength with the best score on
    the rows of `val` kept."""
    ytr, yva = task.y[train.positions], task.y[val.positions]
    width = int(np.prod(train.rows.shape[1:]))
    params = (torch.zeros(width, len(task.classes), device=train.device),
              torch.zeros(len(task.classes), device=train.device))
    best, threads = None, torch.get_num_threads()
    if train.one_block and train.device.type == "cpu":
        torch.set_num_threads(1)  # products of a few MFLOP: more threads only add sync cost (and spin under load)
    try:
        for strength in sorted(l2, reverse=True):
            params = _logistic(train, ytr, strength, task.multi_label, max_iter, params)
            score = task.selection_score(yva, logits_of(val, *params))
            if best is None or score > best[0]:
                best = (score, strength, params)
    finally:
        torch.set_num_threads(threads)
    score, strength, (w, b) = best
    return w, b, strength, score


def fit_logistic(task: Task, x: torch.Tensor, split: EvalSplit, l2: list[float],
                 max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """fit_blocks on the rows split.train and split.val of x [N, D], in memory, as they are (no standardisation)."""
    rows, cpu = ArrayRows(x.numpy(), "the classifier head's inputs"), torch.device("cpu")
    if not torch.isfinite(x[split.train]).all():
        raise AjepaError(f"{rows.name}: not finite (NaN or inf) on the training clips: the encoder is damaged")
    return fit_blocks(task, Blocks(rows, split.train, max(1, len(split.train)), cpu),
                      Blocks(rows, split.val, max(1, len(split.val)), cpu), l2, max_iter)


def fit_probe(task: Task, emb, split: EvalSplit, l2: list[float], max_iter: int = 100,
              block_mb: float = 512, device: torch.device = torch.device("cpu")) -> dict:
    """Logistic regression on the embeddings `emb` (an array, or rows on disk: rowfile) standardised on
    split.train (fit_blocks), split.test scored once with the strength the validation clips chose. A convex
    fit to convergence has no learning rate, batch or epoch count to tune, so every row of the report gets
    its own best probe from the same grid. Sets whose clips fit in one block of block_mb MiB are fitted in
    memory on the CPU (the same figures on every machine); larger ones are streamed in blocks on `device`."""
    rows = as_rows(emb)
    size = block_rows(rows, block_mb)
    if len(split.train) + len(split.val) + len(split.test) <= size:
        device = torch.device("cpu")
    stats = standardisation(rows, split.train, size)
    train, val, test = (Blocks(rows, p, size, device, stats) for p in (split.train, split.val, split.test))
    w, b, strength, val_score = fit_blocks(task, train, val, l2, max_iter)
    test = task.score(task.y[split.test], logits_of(test, w, b))
    return {"split": split.name, task.metric: round(float(test[task.metric]), 2), **metrics.secondary(test),
            "l2": strength, f"val_{task.metric}": round(float(val_score), 2), "train_clips": len(split.train),
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


def fit_attentive(task: Task, tokens, split: EvalSplit, cfg: AttentiveConfig, seed: int) -> dict:
    """Train an AttentiveProbe on the frozen tokens [N clips, patches, D] (an array, or rows on disk) of
    split.train with AdamW, keep the epoch with the best split.val score (stopping after `patience` epochs
    without one), and score split.test once with it. Memory: one batch of tokens (batch_size clips, or
    256 to 511 when scoring), read by position when `tokens` is on disk, never the whole set."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rows = as_rows(tokens)
    probe = AttentiveProbe(rows.shape[-1], len(task.classes), cfg.num_heads)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def batch(positions) -> torch.Tensor:
        return torch.from_numpy(rows.read(np.asarray(positions))).float()

    def logits(positions: np.ndarray) -> torch.Tensor:
        probe.eval()
        with torch.no_grad():
            return torch.cat([probe(batch(p)) for p in np.array_split(positions, max(1, len(positions) // 256))])

    best, best_state, best_epoch, since = -float("inf"), None, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        probe.train()
        for idx in torch.as_tensor(split.train)[torch.randperm(len(split.train), generator=g)].split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            _loss(probe(batch(idx.numpy())), task.y[idx], task.multi_label).backward()
            opt.step()
        val = task.selection_score(task.y[split.val], logits(split.val))
        if val > best:
            best, best_state, best_epoch, since = val, copy.deepcopy(probe.state_dict()), epoch, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    if best_state is None:
        raise AjepaError(f"{rows.name}: the attentive probe's validation scores are not numbers (NaN): the tokens "
                         "or the encoder they came from are damaged")
    probe.load_state_dict(best_state)
    test = task.score(task.y[split.test], logits(split.test))
    return {"split": split.name, task.metric: round(float(test[task.metric]), 2), **metrics.secondary(test),
            "best_epoch": best_epoch, "epochs_run": epoch, f"val_{task.metric}": round(float(best), 2),
            "train_clips": len(split.train), "val_clips": len(split.val), "test_clips": len(split.test)}


def evaluate_embeddings(task: Task, emb, cfg: LinearConfig, device: torch.device = torch.device("cpu")) -> dict:
    """The linear probe on every run of the benchmark's protocol, summarised (mean, std, runs)."""
    return summarize([fit_probe(task, emb, s, cfg.l2, cfg.max_iter, cfg.block_mb, device) for s in task.splits],
                     task.metric)


def evaluate_tokens(task: Task, tokens, cfg: LinearConfig) -> dict:
    """The attentive probe on every run of the benchmark's protocol, summarised."""
    return summarize([fit_attentive(task, tokens, s, cfg.attentive, cfg.seed) for s in task.splits], task.metric)


def validation_probe(encoder: SpectrogramEncoder, task: Task, l2: list[float], device: torch.device,
                     pooling: str = "time", batch_size: int = 64) -> float:
    """The learning-curve probe: embed the train and val clips of the protocol's first run, fit the linear
    probe on train and return its validation score (the test clips are never touched). For a probe at
    every few hundred pretraining steps: one run, no test, no cache."""
    return _validation_score(task, l2, lambda positions: embed(encoder, task, batch_size, device, pooling, positions))


def fbank_validation_probe(task: Task, l2: list[float]) -> float:
    """validation_probe's score for the time-averaged fbank: the learning curve's baseline, on the same clips."""
    return _validation_score(task, l2, lambda positions: np.concatenate(list(fbank_batches(task, positions=positions))))


def _validation_score(task: Task, l2: list[float], embeddings: Callable[[np.ndarray], np.ndarray]) -> float:
    split = task.splits[0]
    positions = np.concatenate([split.train, split.val])
    pooled = embeddings(positions)
    emb = np.zeros((len(task.y), pooled.shape[1]), dtype=np.float32)
    emb[positions] = pooled
    return fit_probe(task, emb, EvalSplit(split.name, split.train, split.val, split.val), l2)[task.metric]
