"""Context/target masks for A-JEPA on a rectangular grid of spectrogram patches.

The patch grid is ``(n_time, n_freq)``; patch index = ``t * n_freq + f``. Below, a
block's *height* ``h`` is its time extent, its *width* ``w`` its frequency extent, and
its aspect ratio is ``h / w``. Masks are index lists built in the collate function;
the model only gathers them.

Block mode (I-JEPA "multiblock")
    ``num_targets`` target blocks with scale ~U[0.15, 0.2] of the patch count and
    aspect ~U[0.75, 1.5]; one context block with scale ~U[0.85, 1.0] and aspect 1.
    Sizes are drawn once per batch (so targets stack), positions per sample.
    Two deliberate departures from the I-JEPA reference code:

    * positions are drawn from ``[0, grid - extent]`` *inclusive*, so blocks can
      touch the last time row / freq column (I-JEPA's exclusive ``randint`` bound
      makes them unreachable);
    * scale and aspect come from two independent draws (I-JEPA reuses one number,
      so large blocks are always the elongated ones).

    When a side overflows the grid it is clamped and the other side is re-fitted to
    keep the *area*: on a (64, 8) grid almost every block hits the 8 frequency rows,
    and keeping the aspect instead would silently shrink targets (and the context
    block) well below their nominal scale. Aspect is the quantity we give up.

TF mode (time-frequency aware; the paper does not publish the exact geometry)
    3 target strips sharing one scale ~U[0.05, 0.075], drawn per batch. Each target
    independently (p = 0.5, per batch) is either

    * a *time strip*: ``h`` consecutive time steps spanning ALL frequency rows, with
      ``h = round(scale * N / n_freq)`` clamped to ``[1, n_time - 1]``; or
    * a *frequency strip*: the narrowest band of ``r`` consecutive frequency rows
      (usually ``r = 1``) spanning ``K / r`` consecutive time steps,

    where ``K = h * n_freq`` is the common patch count, so both strip types stack in
    one tensor. On (64, 8): time strips are 3-5 steps x 8 rows and frequency strips
    are 1 row x 24-40 steps (scale 0.047-0.078).

Context (both modes)
    The context block minus every target patch. If fewer than
    ``min(min_keep, N - K)`` patches remain (``K`` = patches per target; ``N - K`` is
    the most any rule can keep, so the requirement is always satisfiable), the
    context block position is redrawn up to ``max_tries`` times. If all tries fail,
    the context becomes the complement of the targets; if even that is too small,
    targets 1..M-1 are replaced by copies of target 0 (equivalent to dropping them
    while keeping the tensor shape) and the context is the complement of target 0.
    Contexts are then cut to the batch minimum length by keeping a uniformly random
    subset per sample, so truncation favours no region.

Determinism
    Every draw comes from a ``torch.Generator`` seeded by a hash of ``(seed, step)``,
    so masks are independent of call order and of global RNG state, and a resumed
    run replays the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ajepa.choices import MaskMode, check_choice
from ajepa.seeding import torch_generator

Grid = tuple[int, int]


@dataclass
class Masks:
    context: torch.Tensor  # [B, Kc] int64, ascending
    targets: torch.Tensor  # [B, M, Kt] int64, time-major inside each block
    mode: str  # "block" or "tf"


def curriculum_probability(step: int, total_steps: int, c0: float = 0.01) -> float:
    """Probability of a TF-mode step: sqrt schedule from c0 to 1 (0.5 at total/4)."""
    if total_steps <= 0:
        return 1.0
    return min(1.0, math.sqrt(max(step, 0) * (1 - c0**2) / total_steps + c0**2))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _fit_block(area: float, aspect: float, grid: Grid) -> tuple[int, int]:
    """(h, w) with h*w ~= area and h/w ~= aspect, clamped to the grid keeping the area."""
    T, F = grid
    h = min(T, max(1, round(math.sqrt(area * aspect))))
    w = round(area / h)
    if w > F:
        w, h = F, min(T, max(1, round(area / F)))
    return h, max(1, w)


def _place(g: torch.Generator, batch: int, shapes: list[tuple[int, int]], grid: Grid) -> torch.Tensor:
    """Indices [B, len(shapes), K] of blocks at uniform positions; all shapes have h*w == K."""
    T, F = grid
    hs = torch.tensor([h for h, _ in shapes])
    ws = torch.tensor([w for _, w in shapes])
    n = (batch, len(shapes))
    # +1: the last start position (block flush with the grid edge) must be reachable.
    # A huge randint modulo a small count is exact integer sampling (bias ~ 2**-56).
    top = torch.randint(0, 1 << 62, n, generator=g) % (T - hs + 1)
    left = torch.randint(0, 1 << 62, n, generator=g) % (F - ws + 1)
    k = torch.arange(shapes[0][0] * shapes[0][1])
    t = top[..., None] + k // ws[:, None]
    f = left[..., None] + k % ws[:, None]
    return t * F + f


def _scatter(batch: int, n: int, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(batch, n, dtype=torch.bool).scatter_(1, idx.reshape(batch, -1), True)


def _context(
    g: torch.Generator,
    targets: torch.Tensor,
    grid: Grid,
    context_scale: tuple[float, float],
    min_keep: int,
    max_tries: int,
) -> torch.Tensor:
    """Context indices [B, Kc]; may overwrite ``targets`` rows in place (last-resort rule)."""
    B, M, K = targets.shape
    N = grid[0] * grid[1]
    need = min(min_keep, N - K)
    hit = _scatter(B, N, targets)
    ctx_shape = _fit_block(_uniform(g, *context_scale) * N, 1.0, grid)
    keep = torch.zeros(B, N, dtype=torch.bool)
    todo = torch.ones(B, dtype=torch.bool)
    for _ in range(max_tries):
        cand = _scatter(B, N, _place(g, B, [ctx_shape], grid)) & ~hit
        ok = todo & (cand.sum(1) >= need)
        keep = torch.where(ok[:, None], cand, keep)
        todo &= ~ok
        if not todo.any():
            break
    keep = torch.where(todo[:, None], ~hit, keep)
    short = keep.sum(1) < need
    if short.any():
        targets[short] = targets[short, :1].expand(-1, M, -1).clone()
        keep = torch.where(short[:, None], ~_scatter(B, N, targets[:, 0]), keep)
    n = int(keep.sum(1).min())
    score = torch.rand(B, N, generator=g).masked_fill(~keep, 2.0)  # 2.0: never picked
    return score.topk(n, dim=1, largest=False).indices.sort(dim=1).values


def block_masks(batch_size: int, grid: Grid, generator: torch.Generator, num_targets: int = 4,
                scale: tuple[float, float] = (0.15, 0.2), aspect: tuple[float, float] = (0.75, 1.5),
                context_scale: tuple[float, float] = (0.85, 1.0), min_keep: int = 10, max_tries: int = 20) -> Masks:
    """I-JEPA multiblock masks (see module docstring)."""
    T, F = grid
    s = _uniform(generator, *scale)
    a = _uniform(generator, *aspect)  # independent of s, unlike I-JEPA
    h, w = _fit_block(s * T * F, a, grid)
    if h * w >= T * F:  # a target covering everything would leave no context
        h, w = (T - 1, w) if T > 1 else (h, F - 1)
    targets = _place(generator, batch_size, [(h, w)] * num_targets, grid)
    context = _context(generator, targets, grid, context_scale, min_keep, max_tries)
    return Masks(context=context, targets=targets, mode="block")


def time_frequency_masks(batch_size: int, grid: Grid, generator: torch.Generator, num_targets: int = 3,
                         scale: tuple[float, float] = (0.05, 0.075), context_scale: tuple[float, float] = (0.85, 1.0),
                         min_keep: int = 10, max_tries: int = 20) -> Masks:
    """Time strips / frequency strips of equal patch count (see module docstring)."""
    T, F = grid
    if T < 2:
        raise ValueError(f"TF masks need n_time >= 2, got grid {grid}")
    h = min(max(1, round(_uniform(generator, *scale) * T)), T - 1)  # = scale * N / F
    k = h * F
    r = next(r for r in range(1, F + 1) if k % r == 0 and k // r <= T)
    is_time = torch.rand(num_targets, generator=generator) < 0.5
    shapes = [(h, F) if t else (k // r, r) for t in is_time.tolist()]
    targets = _place(generator, batch_size, shapes, grid)
    context = _context(generator, targets, grid, context_scale, min_keep, max_tries)
    return Masks(context=context, targets=targets, mode="tf")


class MaskGenerator:
    """Builds a batch of context/target masks for a given training step.

    ``mode``: "block" | "tf" | "curriculum" (TF with probability
    ``curriculum_probability(step)``) | "inverse" (TF with probability 1 - that,
    i.e. hard TF masks first: the paper's inverse-order ablation).
    """

    def __init__(
        self,
        grid: Grid,
        mode: MaskMode = "curriculum",
        total_steps: int = 1,
        seed: int = 0,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        tf_num_targets: int = 3,
        tf_scale: tuple[float, float] = (0.05, 0.075),
        min_keep: int = 10,
        max_tries: int = 20,
        curriculum_c0: float = 0.01,
    ):
        check_choice(mode, MaskMode, "mode")
        T, F = grid
        if T < 1 or F < 1 or T * F < 2:
            raise ValueError(f"grid {grid} needs at least 2 patches")
        if mode != "block" and T < 2:
            raise ValueError(f"TF masks need n_time >= 2, got grid {grid}")
        self.grid, self.mode, self.total_steps, self.seed = (T, F), mode, total_steps, seed
        self.curriculum_c0 = curriculum_c0
        ctx = dict(context_scale=context_scale, min_keep=min_keep, max_tries=max_tries)
        self.block_kw = dict(num_targets=num_targets, scale=target_scale, aspect=target_aspect, **ctx)
        self.tf_kw = dict(num_targets=tf_num_targets, scale=tf_scale, **ctx)

    def _generator(self, step: int) -> torch.Generator:
        return torch_generator(self.seed, step)

    def _draw_mode(self, g: torch.Generator, step: int) -> str:
        if self.mode in ("block", "tf"):
            return self.mode
        p = curriculum_probability(step, self.total_steps, self.curriculum_c0)
        p_tf = p if self.mode == "curriculum" else 1.0 - p
        return "tf" if torch.rand((), generator=g, dtype=torch.float64).item() < p_tf else "block"

    def __call__(self, batch_size: int, step: int) -> Masks:
        g = self._generator(step)
        if self._draw_mode(g, step) == "tf":
            return time_frequency_masks(batch_size, self.grid, g, **self.tf_kw)
        return block_masks(batch_size, self.grid, g, **self.block_kw)


def masks_to_grid(masks: Masks, grid: Grid) -> torch.Tensor:
    """[B, n_time, n_freq] int64: 0 unused, 1 context, 2 + j target block j (later wins)."""
    T, F = grid
    B, M, _ = masks.targets.shape
    out = torch.zeros(B, T * F, dtype=torch.long)
    out.scatter_(1, masks.context, 1)
    for j in range(M):
        out.scatter_(1, masks.targets[:, j], 2 + j)
    return out.view(B, T, F)
