import math
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ajepa.masks import MaskGenerator
from ajepa.models import AJEPA
from ajepa.tools import flops
from ajepa.train.pretrain import train_step

GRID, P = (4, 8), 4  # input [B, 16, 32]
ENC = dict(grid=GRID, patch_size=P, embed_dim=32, depth=2, num_heads=4)
PRED = dict(embed_dim=16, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _setup(batch=3):
    model = AJEPA(ENC, PRED)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    m = MaskGenerator(GRID, mode="block", seed=0, min_keep=4)(batch, 0)
    x = torch.randn(batch, GRID[0] * P, GRID[1] * P)
    return model, opt, x, m.context, m.targets


def _counted(fn) -> int:
    # FlopCounterMode has no formula for the CPU flash-attention kernel, so attention must run
    # on the MATH backend (plain bmm's) to be counted at all.
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def test_step_count_matches_flop_counter():
    model, opt, x, ctx, tgt = _setup()
    B, M, Kt = tgt.shape
    enc, pred, grid = flops.model_configs(model)
    analytic = flops.ajepa_step_flops(enc, pred, grid, B, ctx.shape[1], M, Kt)
    counted = _counted(lambda: train_step(model, opt, x, ctx, tgt, momentum=0.996))
    # Both count exactly the same matmuls (softmax/LayerNorm/GELU/optimizer/EMA are not
    # counted by either), so they agree to rounding; 1% is the stated tolerance.
    assert counted > 0
    assert analytic == pytest.approx(counted, rel=0.01)


def test_parts_match_flop_counter_and_target_has_no_backward():
    model, opt, x, ctx, tgt = _setup()
    B, M, Kt = tgt.shape
    enc, pred, grid = flops.model_configs(model)
    parts = flops.ajepa_step_flops(enc, pred, grid, B, ctx.shape[1], M, Kt, breakdown=True)
    assert set(parts) == {"target_forward", "context_forward", "context_backward", "predictor_forward",
                          "predictor_backward", "total"}
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    # target encoder: forward only (no_grad), on all N patches
    assert _counted(lambda: model.forward_target(x, tgt)) == pytest.approx(parts["target_forward"], rel=1e-9)
    assert parts["target_forward"] == flops.encoder_forward_flops(ENC, GRID, B)
    # context encoder + predictor forward
    ctx_fwd = _counted(lambda: model.forward_context(x, ctx, tgt)[0])
    assert ctx_fwd == pytest.approx(parts["context_forward"] + parts["predictor_forward"], rel=1e-9)
    # backward = 2 x forward, except the patch embedding (no input gradient)
    embed = 2.0 * B * GRID[0] * GRID[1] * P * P * ENC["embed_dim"]
    assert parts["context_backward"] == pytest.approx(2 * parts["context_forward"] - embed)
    assert parts["predictor_backward"] == pytest.approx(2 * parts["predictor_forward"])


def test_counts_scale_with_batch_and_sequence():
    args = dict(encoder_cfg={"size": "small", "patch_size": 16}, predictor_cfg=dict(embed_dim=192, depth=6,
                num_heads=3), grid=(64, 8), n_context=200, n_targets=4, target_len=80)
    one = flops.ajepa_step_flops(batch=8, **args)
    assert flops.ajepa_step_flops(batch=16, **args) == pytest.approx(2 * one)
    # the target encoder enters once (forward only): growing the grid with the context fixed
    # adds exactly the extra target-encoder forward (+ the context encoder's patch embedding
    # forward and weight gradient, which run on all N patches)
    a = flops.ajepa_step_flops(batch=8, **{**args, "grid": (32, 8)}, breakdown=True)
    b = flops.ajepa_step_flops(batch=8, **args, breakdown=True)
    extra_embed = 2.0 * 8 * 32 * 8 * 16 * 16 * 384
    assert b["total"] - a["total"] == pytest.approx(b["target_forward"] - a["target_forward"] + 2 * extra_embed)
    # encoder forward: linear in batch, and a bigger keep costs more
    enc = {"size": "small", "grid": (64, 8)}
    assert flops.encoder_forward_flops(enc, batch=4) == pytest.approx(4 * flops.encoder_forward_flops(enc))
    assert flops.encoder_forward_flops(enc, n_tokens=100) < flops.encoder_forward_flops(enc, n_tokens=200)


def test_vit_base_reference_count():
    # ViT-B/16 on 224 x 224 is the textbook ~17.5 GMACs = ~35 GFLOPs (196 tokens; ours has no
    # CLS token and one input channel, so slightly less).
    f = flops.encoder_forward_flops({"size": "base"}, grid=(14, 14))
    assert f == pytest.approx(34.8e9, rel=0.02)


def test_model_configs_roundtrip():
    model = AJEPA({**ENC, "mlp_ratio": 2.0}, PRED)
    enc, pred, grid = flops.model_configs(model)
    assert grid == GRID
    assert enc == dict(patch_size=P, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
    assert pred == dict(PRED, mlp_ratio=4.0)


def test_matmul_peak_is_positive_and_quick():
    t0 = time.perf_counter()
    peak = flops.matmul_peak_flops(size=64, seconds=0.05)
    assert math.isfinite(peak) and peak > 0
    assert time.perf_counter() - t0 < 5.0


def test_measure_step_times_real_steps_and_moves_ema():
    model, opt, x, ctx, tgt = _setup(batch=2)
    before = [p.clone() for p in model.target_encoder.parameters()]
    calls = []

    def batch_maker(i):
        calls.append(i)
        return x, ctx, tgt

    sec = flops.measure_step(model, opt, batch_maker, steps=3, warmup=1, momentum=0.5)
    assert math.isfinite(sec) and sec > 0
    assert calls == [0, 1, 2, 3]
    assert model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.target_encoder.parameters()))
    assert all(not p.requires_grad for p in model.target_encoder.parameters())


def test_configure_cpu_threads():
    old = torch.get_num_threads()
    try:
        assert flops.configure_cpu_threads(1) == 1
        assert flops.configure_cpu_threads() >= 1
    finally:
        torch.set_num_threads(old)


def test_cpu_busy_fraction():
    f = flops.cpu_busy_fraction(0.05)
    assert f is None or 0.0 <= f <= 1.0
