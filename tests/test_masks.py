import math

import pytest
import torch

from ajepa.masks import (
    MaskGenerator,
    Masks,
    block_masks,
    curriculum_probability,
    masks_to_grid,
    time_frequency_masks,
)

GRIDS = [(64, 8), (12, 8), (8, 8), (3, 8)]


def draw(grid, mode, calls=100, batch=20, seed=0, **kw):
    gen = MaskGenerator(grid, mode=mode, seed=seed, total_steps=calls, **kw)
    return gen, [gen(batch, step) for step in range(calls)]


def rect(idx, F):
    """(top, left, h, w) if the indices form exactly one filled rectangle, else None."""
    t, f = idx // F, idx % F
    t0, f0 = int(t.min()), int(f.min())
    h, w = int(t.max()) - t0 + 1, int(f.max()) - f0 + 1
    if len(set(idx.tolist())) == len(idx) == h * w:
        return t0, f0, h, w
    return None


def blocks(masks_list, grid):
    """All target rectangles (top, left, h, w); asserts each target is one."""
    out = []
    for m in masks_list:
        for b in range(m.targets.shape[0]):
            for j in range(m.targets.shape[1]):
                r = rect(m.targets[b, j], grid[1])
                assert r is not None, "target block is not a filled rectangle"
                out.append(r)
    return out


# --- guarantees ------------------------------------------------------------------------


def check_invariants(m: Masks, grid, min_keep=10):
    N = grid[0] * grid[1]
    B, M, K = m.targets.shape
    assert m.context.dtype == m.targets.dtype == torch.long
    assert m.context.shape[0] == B and m.context.shape[1] >= 1
    for x in (m.context, m.targets):
        assert int(x.min()) >= 0 and int(x.max()) < N
    ctx = torch.zeros(B, N, dtype=torch.bool).scatter_(1, m.context, True)
    tgt = torch.zeros(B, N, dtype=torch.bool).scatter_(1, m.targets.reshape(B, -1), True)
    assert (ctx.sum(1) == m.context.shape[1]).all(), "duplicate context indices"
    assert not (ctx & tgt).any(), "context overlaps a target"
    assert (m.targets.sort(-1).values.diff(dim=-1) > 0).all(), "duplicate index inside a target"
    assert m.context.shape[1] >= min(min_keep, N - K)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mode", ["block", "tf", "curriculum"])
def test_invariants(grid, mode):
    _, ms = draw(grid, mode)  # 2000 samples
    for m in ms:
        assert m.mode in ("block", "tf")
        check_invariants(m, grid)


def test_public_functions_with_explicit_generator():
    for fn, mode, m_targets in ((block_masks, "block", 4), (time_frequency_masks, "tf", 3)):
        a = fn(6, (12, 8), torch.Generator().manual_seed(3))
        b = fn(6, (12, 8), torch.Generator().manual_seed(3))
        assert a.mode == mode and a.targets.shape[:2] == (6, m_targets)
        assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
        check_invariants(a, (12, 8))


def test_min_keep_larger_than_grid_is_capped():
    for mode in ("block", "tf"):
        gen = MaskGenerator((3, 8), mode=mode, min_keep=1000)
        for step in range(50):
            m = gen(8, step)
            check_invariants(m, (3, 8), min_keep=1000)
            assert m.context.shape[1] == 24 - m.targets.shape[2]  # everything but one target


def test_fallback_duplicates_target_zero():
    # 4x4 grid, four 2x2 targets, min_keep=12 = N - K: only fully coinciding targets leave
    # enough context, so the documented last-resort rule must fire for (almost) every sample.
    gen = MaskGenerator((4, 4), mode="block", target_scale=(0.25, 0.25), target_aspect=(1, 1), min_keep=12)
    for step in range(20):
        m = gen(16, step)
        assert m.targets.shape[1:] == (4, 4)
        assert (m.targets == m.targets[:, :1]).all()
        expected = [sorted(set(range(16)) - set(m.targets[b, 0].tolist())) for b in range(16)]
        assert m.context.tolist() == expected


def test_context_truncation_is_not_positionally_biased():
    # Keeping the first k context indices would starve the last time rows.
    _, ms = draw((64, 8), "block", calls=60)
    counts = torch.zeros(64)
    for m in ms:
        counts += torch.bincount(m.context.flatten() // 8, minlength=64)
    head, tail = counts[:8].sum(), counts[-8:].sum()
    assert 0.8 < head / tail < 1.25


def test_masks_to_grid():
    gen = MaskGenerator((12, 8), mode="block", seed=3)
    m = gen(4, 7)
    g = masks_to_grid(m, (12, 8))
    assert g.shape == (4, 12, 8) and g.dtype == torch.long
    flat = g.view(4, -1)
    assert ((flat == 1).sum(1) == m.context.shape[1]).all()
    for j in range(m.targets.shape[1]):
        cells = (flat == 2 + j).nonzero()
        assert all(int(i) in set(m.targets[b, j].tolist()) for b, i in cells)
    assert int(flat.max()) <= 1 + m.targets.shape[1]


# --- block geometry --------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(64, 8), (12, 8), (32, 32)])
def test_block_scale_and_aspect(grid):
    T, F = grid
    N = T * F
    _, ms = draw(grid, "block", calls=200, batch=10)
    rs = blocks(ms, grid)
    for m in ms:  # sizes are shared by the batch and by all targets
        assert len({rect(m.targets[b, j], F)[2:] for b in range(10) for j in range(4)}) == 1
    for _, _, h, w in rs:
        tol = max(h, w) / (2 * N) + 1e-9  # rounding one side of the block
        assert 0.15 - tol <= h * w / N <= 0.2 + tol
        if h < T and w < F:  # no side clamped: aspect holds up to rounding
            eps = 2.0 / min(h, w)
            assert 0.75 / (1 + eps) <= h / w <= 1.5 * (1 + eps)
    if grid == (32, 32):
        aspects = {h / w for *_, h, w in rs}
        assert min(aspects) < 0.85 and max(aspects) > 1.35  # the aspect range is explored


@pytest.mark.parametrize("grid", [(64, 8), (12, 8), (8, 8), (3, 8)])
def test_blocks_reach_all_edges(grid):
    T, F = grid
    rs = blocks(draw(grid, "block", calls=100, batch=20)[1], grid)
    assert min(t for t, _, _, _ in rs) == 0 and min(f for _, f, _, _ in rs) == 0
    assert max(t + h for t, _, h, _ in rs) == T, "no block touches the last time row"
    assert max(f + w for _, f, _, w in rs) == F, "no block touches the last freq column"


def test_every_position_reachable():
    # Fixed 2x2 target size on a 12x8 grid: all 11*7 start positions must appear.
    gen = MaskGenerator((12, 8), mode="block", target_scale=(4 / 96, 4 / 96), target_aspect=(1, 1))
    rs = blocks([gen(20, s) for s in range(40)], (12, 8))
    assert {(h, w) for *_, h, w in rs} == {(2, 2)}
    assert {(t, f) for t, f, _, _ in rs} == {(t, f) for t in range(11) for f in range(7)}


def test_scale_and_aspect_drawn_independently():
    # I-JEPA draws both from one number (correlation ~1); ours must be ~uncorrelated.
    grid = (32, 32)
    gen = MaskGenerator(grid, mode="block", seed=1)
    pts = []
    for step in range(600):
        _, _, h, w = rect(gen(1, step).targets[0, 0], 32)
        pts.append((h * w / 1024, math.log(h / w)))
    x = torch.tensor(pts, dtype=torch.float64).T
    corr = torch.corrcoef(x)[0, 1].item()
    assert abs(corr) < 0.25, corr


# --- TF geometry -----------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_tf_strips(grid):
    T, F = grid
    N = T * F
    _, ms = draw(grid, "tf", calls=100, batch=20)
    kinds = {"time": 0, "freq": 0}
    for m in ms:
        assert m.targets.shape[1] == 3
        for j in range(3):
            # samples hit by the last-resort fallback carry copies of target 0: skip them
            kept = [b for b in range(20) if not (m.targets[b] == m.targets[b, :1]).all()]
            shapes = {rect(m.targets[b, j], F)[2:] for b in kept}
            assert len(shapes) <= 1, "strip type/size must be shared across the batch"
    for _, _, h, w in blocks(ms, grid):
        kinds["time" if w == F else "freq"] += 1
        K = h * w
        assert K % F == 0  # K = (time-strip length) * n_freq for both kinds
        if K > F:  # a 1-step time strip is the minimum size, exempt from the scale range
            tol = F / (2 * N)
            assert 0.05 - tol <= K / N <= 0.075 + tol
        if w < F:
            assert h <= T
    assert kinds["time"] > 0 and kinds["freq"] > 0
    assert 0.4 < kinds["time"] / sum(kinds.values()) < 0.6


def test_tf_geometry_on_64x8():
    rs = blocks(draw((64, 8), "tf", calls=100, batch=4)[1], (64, 8))
    time_strips = {h for _, _, h, w in rs if w == 8}
    freq_strips = {(h, w) for _, _, h, w in rs if w != 8}
    assert time_strips == {3, 4, 5}
    assert {w for _, w in freq_strips} == {1} and {h for h, _ in freq_strips} == {24, 32, 40}
    assert {f for _, f, _, w in rs if w == 1} == set(range(8))  # every frequency row used


# --- curriculum ------------------------------------------------------------------------


def test_curriculum_probability():
    S = 1000
    assert curriculum_probability(0, S) == pytest.approx(0.01)
    assert curriculum_probability(S // 4, S) == pytest.approx(0.5, abs=1e-3)
    assert curriculum_probability(S, S) == 1.0
    assert curriculum_probability(5 * S, S) == 1.0
    ps = [curriculum_probability(s, S) for s in range(0, 2 * S, 7)]
    assert all(a <= b for a, b in zip(ps, ps[1:]))
    assert sum(curriculum_probability(s, S) for s in range(S)) / S == pytest.approx(2 / 3, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("mode,expected", [("curriculum", 2 / 3), ("inverse", 1 / 3), ("block", 0.0), ("tf", 1.0)])
def test_mode_fractions(mode, expected):
    S = 3000
    gen = MaskGenerator((12, 8), mode=mode, total_steps=S, seed=5)
    modes = [gen(1, s).mode for s in range(S)]
    frac = modes.count("tf") / S
    assert frac == pytest.approx(expected, abs=0.04)
    early, late = modes[: S // 10].count("tf"), modes[-S // 10 :].count("tf")
    if mode == "curriculum":
        assert early < late
    if mode == "inverse":
        assert early > late
    for s in range(0, S, 300):  # the mode depends on the step, not on the batch size
        assert gen(2, s).mode == modes[s]


# --- reproducibility -------------------------------------------------------------------


def same(a: Masks, b: Masks):
    return a.mode == b.mode and torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)


def test_reproducible_regardless_of_order_and_global_rng():
    steps = list(range(0, 400, 13))
    g1 = MaskGenerator((64, 8), mode="curriculum", total_steps=400, seed=7)
    g2 = MaskGenerator((64, 8), mode="curriculum", total_steps=400, seed=7)
    torch.manual_seed(0)
    a = {s: g1(8, s) for s in steps}
    torch.manual_seed(123)
    torch.rand(10)
    b = {s: g2(8, s) for s in reversed(steps)}
    assert all(same(a[s], b[s]) for s in steps)
    assert {m.mode for m in a.values()} == {"block", "tf"}
    assert same(g1(8, 13), a[13])  # calling again replays


def test_different_step_or_seed_differs():
    for mode in ("block", "tf"):
        g = MaskGenerator((64, 8), mode=mode, seed=1)
        assert not same(g(8, 0), g(8, 1))
        assert not same(g(8, 0), MaskGenerator((64, 8), mode=mode, seed=2)(8, 0))


def test_bad_mode_rejected():
    with pytest.raises(ValueError):
        MaskGenerator((12, 8), mode="random")
