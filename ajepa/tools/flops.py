"""FLOP accounting for A-JEPA: the machine's matmul peak, an analytic per-step FLOP count and a
training-step timer, so that `ajepa bench pretrain` can report model FLOP/s and MFU.

Counting convention (the usual "6 * N * params" / PaLM-MFU accounting)
    Only matrix products are counted, 2 FLOPs per multiply-accumulate (2 * m * n * k):
    the patch embedding (a stride-p convolution = a [tokens, p*p] x [p*p, D] matmul), the
    qkv / proj / fc1 / fc2 linears, the two attention products per layer (Q K^T and A V:
    2 * 2 * L^2 * D per sequence of length L, summed over heads), and the predictor's in/out
    projections. Softmax, LayerNorm, GELU, residual adds, the loss, the optimizer and the EMA
    are NOT counted (elementwise; < 1% of the matmul FLOPs at ViT sizes, but they cost real
    time on a CPU, which is part of what MFU measures).

    Backward = 2 x forward for every matmul (one product for the input gradient, one for
    the weight gradient). The one exception is the context encoder's patch embedding, whose
    input is the spectrogram: it needs no input gradient, so its backward is 1 x forward
    (weight gradient only). This matches what autograd actually computes, and
    torch.utils.flop_counter.FlopCounterMode agrees with the count to within rounding when
    attention runs on the MATH SDPA backend (FlopCounterMode has no formula for the CPU
    flash kernel `_scaled_dot_product_flash_attention_for_cpu`, so with the default backend
    it silently misses attention). The flash-attention backward also *recomputes* Q K^T;
    that recompute is hardware FLOPs, not model FLOPs, and is not counted here.

    A training step (`ajepa_step_flops`) is
        target encoder forward on all N patches (no_grad: no backward)
      + context encoder forward + backward on the Kc context patches (the patch embedding
        runs on all N patches before the gather, and is counted that way)
      + predictor forward + backward on B * M sequences of Kc + Kt tokens (the input
        projection runs once per sample on Kc tokens, before the repeat over the M blocks;
        the output projection on the Kt predicted tokens of each sequence only).

Study notes (2-core AMD EPYC Zen 4 VM, torch 2.14 CPU, MKL + libgomp, fp32, quiet machine)
    matmul peak ~195-200 GFLOP/s fp32 (2 threads), ~100 with 1 thread, ~430 bf16 (oneDNN).
    A-JEPA step MFU: ViT-S/16 on 1024 x 128 (512 patches), predictor width 192 depth 4-6,
    batch 8-16: 0.70-0.80; embedded sizes on 192 x 128 (96 patches), batch 32: 0.60-0.72.
    Knobs: the CPU flash SDPA kernel is already chosen with and without a bool attn_mask and
    is 1.5-3x faster than MATH; torch.compile compiles for ~45 s, recompiles on every new
    context length and gives no steady-state gain; AdamW(fused=True) is 3-5x faster than the
    default foreach step (1-2% of a step); the EMA (_foreach_lerp_) is < 1 ms; batch 64 is
    not faster than 32; bf16 autocast is 1.35-1.45x faster (a numerics change, not used);
    threads: see configure_cpu_threads.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ajepa.cpus import available_cpus
from ajepa.models import Predictor, SpectrogramEncoder, resolve_size
from ajepa.train.pretrain import train_step

__all__ = ["matmul_peak_flops", "encoder_forward_flops", "predictor_forward_flops", "ajepa_step_flops",
           "model_configs", "measure_step", "configure_cpu_threads", "cpu_busy_fraction"]


# ---------------------------------------------------------------------------------------------
# machine peak


def matmul_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      size: int | Sequence[int] | None = None, seconds: float = 1.0) -> float:
    """Achievable dense GEMM FLOP/s of `device` with every thread torch currently uses.

    Square [size x size] @ [size x size] products (out= preallocated), a short warm-up, then
    repeated timed chunks of about 20 ms; the median chunk rate per size, and the best size.
    Defaults: fp32 on CPU with sizes (512, 1024) (1024 is large enough to saturate MKL; 512
    fits the L2/L3 blocking a little better, up to ~5% faster on small caches); bf16 on CUDA
    with size 8192. `seconds` is the total timing budget (warm-up excluded), split over sizes.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    if size is None:
        size = (8192,) if cuda else (512, 1024)
    sizes = (size,) if isinstance(size, int) else tuple(size)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        flop = 2.0 * n ** 3
        # warm-up (thread pool spin-up, kernel selection) and a rough per-matmul time
        torch.mm(a, b, out=c)
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        one = max(time.perf_counter() - t0, 1e-7)
        reps = max(1, int(0.02 / one))  # ~20 ms chunks
        rates: list[float] = []
        deadline = time.perf_counter() + seconds / len(sizes)
        while len(rates) < 3 or (time.perf_counter() < deadline and len(rates) < 200):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            sync()
            rates.append(flop * reps / (time.perf_counter() - t0))
        best = max(best, statistics.median(rates))
    return best


# ---------------------------------------------------------------------------------------------
# analytic FLOP count


def _defaults(cls) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _encoder_cfg(cfg: dict) -> dict:
    return {**_defaults(SpectrogramEncoder), **resolve_size(cfg)}


def _predictor_cfg(cfg: dict | None) -> dict:
    return {**_defaults(Predictor), **(cfg or {})}


def _blocks_flops(n_seq: int, length: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of `depth` pre-norm ViT blocks on n_seq sequences of `length` tokens."""
    hidden = int(dim * mlp_ratio)  # timm Block: Mlp(hidden_features=int(dim * mlp_ratio))
    linear = 2.0 * length * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
    attention = 2.0 * 2.0 * length * length * dim  # Q K^T and A V, all heads together
    return float(n_seq) * depth * (linear + attention)


def _patch_embed_flops(batch: int, n_patches: int, patch_size: int, dim: int) -> float:
    return 2.0 * batch * n_patches * patch_size * patch_size * dim  # in_chans = 1


def encoder_forward_flops(encoder_cfg: dict, grid: tuple[int, int] | None = None, batch: int = 1,
                          n_tokens: int | None = None) -> float:
    """Forward matmul FLOPs of SpectrogramEncoder on `batch` spectrograms.

    encoder_cfg: SpectrogramEncoder kwargs (`size` allowed; missing keys take the class
    defaults; `grid` may be given here or as the argument). n_tokens: tokens kept per sample
    (the `keep` argument; default all N patches) -- the patch embedding always runs on all N.
    A fine-tuning step is about 3x this (backward = 2x forward; the patch embedding's
    backward is 1x since the spectrogram needs no gradient): see `ajepa_step_flops`.
    """
    cfg = _encoder_cfg(encoder_cfg)
    grid = tuple(grid if grid is not None else cfg["grid"])
    n = grid[0] * grid[1]
    n_tokens = n if n_tokens is None else n_tokens
    return (_patch_embed_flops(batch, n, cfg["patch_size"], cfg["embed_dim"])
            + _blocks_flops(batch, n_tokens, cfg["embed_dim"], cfg["depth"], cfg["mlp_ratio"]))


def predictor_forward_flops(encoder_dim: int, predictor_cfg: dict | None, batch: int, n_context: int,
                            n_targets: int, target_len: int) -> float:
    """Forward matmul FLOPs of Predictor (kwargs without grid/encoder_dim) for one batch."""
    cfg = _predictor_cfg(predictor_cfg)
    dp = cfg["embed_dim"]
    embed = 2.0 * batch * n_context * encoder_dim * dp  # once per sample, before repeat_interleave(M)
    blocks = _blocks_flops(batch * n_targets, n_context + target_len, dp, cfg["depth"], cfg["mlp_ratio"])
    proj = 2.0 * batch * n_targets * target_len * dp * encoder_dim  # predicted tokens only
    return embed + blocks + proj


def ajepa_step_flops(encoder_cfg: dict, predictor_cfg: dict | None, grid: tuple[int, int], batch: int,
                     n_context: int, n_targets: int, target_len: int, breakdown: bool = False):
    """Model FLOPs of one A-JEPA training step (see the module docstring for the convention).

    encoder_cfg / predictor_cfg: the AJEPA constructor's encoder_kwargs / predictor_kwargs.
    n_context = Kc (context patches per sample), n_targets = M, target_len = Kt.
    Returns a float, or with breakdown=True a dict of the parts and their "total".
    """
    cfg = _encoder_cfg({**encoder_cfg, "grid": tuple(grid)})
    n = grid[0] * grid[1]
    embed = _patch_embed_flops(batch, n, cfg["patch_size"], cfg["embed_dim"])
    target_fwd = encoder_forward_flops(cfg, grid, batch)
    context_fwd = encoder_forward_flops(cfg, grid, batch, n_context)
    pred_fwd = predictor_forward_flops(cfg["embed_dim"], predictor_cfg, batch, n_context, n_targets, target_len)
    parts = {
        "target_forward": target_fwd,
        "context_forward": context_fwd,
        "context_backward": 2.0 * (context_fwd - embed) + embed,  # no input grad for the spectrogram
        "predictor_forward": pred_fwd,
        "predictor_backward": 2.0 * pred_fwd,
    }
    parts["total"] = sum(parts.values())
    return parts if breakdown else parts["total"]


def model_configs(model) -> tuple[dict, dict, tuple[int, int]]:
    """(encoder_cfg, predictor_cfg, grid) of a built AJEPA, for `ajepa_step_flops`."""
    enc, pred = model.context_encoder, model.predictor
    blk = enc.blocks[0]
    encoder_cfg = dict(patch_size=enc.patch_size, embed_dim=enc.embed_dim, depth=len(enc.blocks),
                       num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / enc.embed_dim)
    pblk = pred.blocks[0]
    dp = pred.embed.out_features
    predictor_cfg = dict(embed_dim=dp, depth=len(pred.blocks), num_heads=pblk.attn.num_heads,
                         mlp_ratio=pblk.mlp.fc1.out_features / dp)
    return encoder_cfg, predictor_cfg, tuple(enc.grid)


# ---------------------------------------------------------------------------------------------
# timing real steps


def measure_step(model, optimizer, batch_maker: Callable[[int], tuple], steps: int = 10, warmup: int = 2,
                 momentum: float = 0.996, step_fn: Callable | None = None, reduce: str = "median") -> float:
    """Seconds per real training step (the pretraining loop's `train_step`, or `step_fn(model, optimizer,
    *batch)`).

    batch_maker(i) -> (x, context_idx, target_idx) for step i (build batches up front: mask
    generation is data-loader work and is not timed). `warmup` untimed steps first; then each
    of `steps` steps is timed on its own (CUDA synchronised) and the median (reduce="median")
    or mean ("mean") is returned. The model is put in train mode.
    """
    model.train()
    step_fn = step_fn or (lambda m, o, *b: train_step(m, o, *b, momentum=momentum))
    params = list(model.parameters())
    cuda = bool(params) and params[0].device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(warmup):
        step_fn(model, optimizer, *batch_maker(i))
    sync()
    times = []
    for i in range(warmup, warmup + steps):
        batch = batch_maker(i)
        t0 = time.perf_counter()
        loss = step_fn(model, optimizer, *batch)
        if not cuda:
            float(loss)  # nothing async on CPU; keeps the step honest if it ever is
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if reduce == "median" else sum(times) / len(times)


# ---------------------------------------------------------------------------------------------
# CPU knobs


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op thread count to one per core this process may run on (its affinity
    and the SLURM allocation: ajepa.cpus; `num_threads` overrides). Returns the count now in use.

    Measured on the 2-core dev box (see the study notes in the module docstring): 2 threads
    are 1.7x faster than 1 on a quiet machine, but with ONE other busy process 2 threads are
    1.7x SLOWER than 1 (libgomp threads spin-wait on the stolen core). So on a shared machine
    pass num_threads=1, or export OMP_WAIT_POLICY=PASSIVE before torch is imported (recovers
    the 1-thread speed under contention, costs ~15% on a quiet machine)."""
    if num_threads is None:
        num_threads = available_cpus()
    torch.set_num_threads(max(1, int(num_threads)))
    return torch.get_num_threads()


def cpu_busy_fraction(seconds: float = 0.5) -> float | None:
    """Fraction of the machine's CPU time spent busy (user + nice + system) over the next
    `seconds`, from /proc/stat; None where that is unavailable. Call it BEFORE a benchmark: a
    value above ~0.1 means another process competes for the cores, so peak, step time and MFU
    measured now are not comparable with a quiet run."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2], sum(v[:5])  # busy, busy + idle + iowait
    try:
        b0, t0 = read()
        time.sleep(seconds)
        b1, t1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / max(t1 - t0, 1)
