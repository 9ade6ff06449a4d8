import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ajepa.models import (
    AJEPA,
    SIZES,
    KeyMaskBlock,
    Predictor,
    SpectrogramEncoder,
    random_key_mask,
    resolve_size,
    sincos_pos_embed_2d,
)

GRID, P = (4, 8), 4  # rectangular 4 x 8 grid of 4 x 4 patches: input [B, 16, 32]
ENC = dict(grid=GRID, patch_size=P, embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spec(b=2):
    return torch.randn(b, GRID[0] * P, GRID[1] * P)


def masks(b=2, m=3, kt=4, kc=10, n=GRID[0] * GRID[1]):
    perm = torch.stack([torch.randperm(n) for _ in range(b)])
    return perm[:, :kc], perm[:, kc:kc + m * kt].reshape(b, m, kt)


# --- positional embedding -------------------------------------------------------------

def _mae_2d_sincos(dim, size):  # MAE's numpy reference (square grid)
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), 0)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("grid", [(4, 8), (3, 2), (64, 8)])
def test_pos_embed_rectangular(grid):
    d = 16
    pe = sincos_pos_embed_2d(grid, d)
    assert pe.shape == (grid[0] * grid[1], d)
    assert torch.unique(pe, dim=0).shape[0] == pe.shape[0]  # every patch distinct
    # time-major: row t * n_freq + f; first half depends only on f, second half only on t
    pe = pe.reshape(grid[0], grid[1], d)
    assert torch.allclose(pe[:, :, : d // 2], pe[:1, :, : d // 2].expand_as(pe[:, :, : d // 2]))
    assert torch.allclose(pe[:, :, d // 2:], pe[:, :1, d // 2:].expand_as(pe[:, :, d // 2:]))


def test_pos_embed_matches_mae_on_square_grid_and_is_buffer():
    ref = torch.from_numpy(_mae_2d_sincos(32, 5)).float()
    assert torch.allclose(sincos_pos_embed_2d((5, 5), 32), ref, atol=1e-6)
    enc = SpectrogramEncoder(**ENC)
    assert "pos_embed" in dict(enc.named_buffers())
    assert all("pos_embed" not in n for n, _ in enc.named_parameters())
    assert "pos_embed" not in enc.state_dict()  # recomputed from grid -> loads at any clip length
    other = SpectrogramEncoder(**{**ENC, "grid": (6, 8)})
    other.load_state_dict(enc.state_dict())


# --- encoder ---------------------------------------------------------------------------

def test_encoder_shapes_and_sizes():
    enc = SpectrogramEncoder(**ENC)
    assert enc(spec()).shape == (2, 32, 32)
    enc16 = SpectrogramEncoder((3, 2), patch_size=16, embed_dim=32, depth=1, num_heads=2)
    assert enc16(torch.randn(1, 48, 32)).shape == (1, 6, 32)
    assert resolve_size({"size": "base", "depth": 2}) == dict(embed_dim=768, depth=2, num_heads=12)
    assert SIZES["large"] == dict(embed_dim=1024, depth=24, num_heads=16)
    tiny = SpectrogramEncoder((2, 2), **resolve_size({"size": "tiny", "patch_size": 4, "depth": 1}))
    assert tiny.embed_dim == 192 and len(tiny.blocks) == 1


def test_init_rescales_residual_projections():
    enc = SpectrogramEncoder(**{**ENC, "embed_dim": 256, "depth": 4})
    stds = [b.mlp.fc2.weight.std().item() for b in enc.blocks]
    for layer_id, s in enumerate(stds, start=1):  # trunc_normal(0.02) / sqrt(2 * layer_id)
        assert s == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.05)
    assert enc.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_encoder_keep_equals_blocks_on_gathered_subset():
    enc = SpectrogramEncoder(**ENC).eval()
    x = spec()
    keep, _ = masks()
    tokens = enc.patch_embed(x.unsqueeze(1)) + enc.pos_embed
    h = torch.stack([tokens[b, keep[b]] for b in range(2)])
    for blk in enc.blocks:
        h = blk(h)
    assert torch.allclose(enc(x, keep=keep), enc.norm(h), atol=1e-6)
    full = torch.arange(32).expand(2, -1)
    assert torch.allclose(enc(x, keep=full), enc(x), atol=1e-6)


# --- predictor -------------------------------------------------------------------------

def test_predictor_batched_equals_separate_passes():
    pred = Predictor(GRID, encoder_dim=32, embed_dim=16, depth=2, num_heads=2).eval()
    ctx_idx, tgt_idx = masks()
    ctx = torch.randn(2, ctx_idx.shape[1], 32)
    out = pred(ctx, ctx_idx, tgt_idx)
    assert out.shape == (2, 3, 4, 32)
    for m in range(3):
        assert torch.allclose(out[:, m], pred(ctx, ctx_idx, tgt_idx[:, m:m + 1])[:, 0], atol=1e-5)
    # mask tokens at different positions must give different predictions
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_predictor_init_choices():
    """trunc_normal: I-JEPA's 0.02 with the residual rescale; xavier: every Linear at
    sqrt(2 / (fan_in + fan_out)) with zero biases, no rescale, and the mask token still at 0.02;
    the encoder's weights do not depend on the predictor's init."""
    kw = dict(encoder_dim=64, embed_dim=128, depth=3, num_heads=4)
    ij, xa = Predictor(GRID, **kw), Predictor(GRID, init="xavier", **kw)
    assert ij.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert ij.blocks[2].mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    linears = [m for m in xa.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 4 * 3  # embed, proj, and qkv / proj / fc1 / fc2 per block
    for m in linears:
        fan_out, fan_in = m.weight.shape
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)
        assert not m.bias.any()
    assert xa.mask_token.std().item() == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ValueError, match="predictor init must be one of"):
        Predictor(GRID, init="kaiming", **kw)
    torch.manual_seed(0)
    m = AJEPA(ENC, dict(embed_dim=16, depth=1, num_heads=2, init="xavier"))
    torch.manual_seed(0)
    plain = SpectrogramEncoder(**ENC)
    assert all(torch.equal(a, b) for a, b in zip(m.context_encoder.state_dict().values(),
                                                 plain.state_dict().values()))


# --- regularized (key) masking ---------------------------------------------------------

def test_random_key_mask_counts():
    m = random_key_mask(3, 20, 0.1)
    assert m.shape == (3, 1, 1, 20) and m.dtype == torch.bool
    assert ((~m).sum(-1) == 2).all()
    assert random_key_mask(3, 5, 0.1) is None  # floor(0.5) = 0 keys -> unmasked fast path
    assert ((~random_key_mask(1, 4, 1.0)).sum() == 3)  # never hides every key


def attention_reference(attn, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
    """timm's Attention written out (no fused kernel): (output [B, N, C], probabilities [B, H, N, N])."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(attn.norm(out)), probs


@pytest.fixture
def drawn_masks(monkeypatch):
    """Every key mask the blocks draw, in order (the library keeps none)."""
    from ajepa.models import attention
    drawn, draw = [], attention.random_key_mask

    def recording(*a, **kw):
        m = draw(*a, **kw)
        drawn.append(m)
        return m
    monkeypatch.setattr(attention, "random_key_mask", recording)
    return drawn


def test_masked_keys_get_zero_attention_and_fused_matches_reference():
    blk = KeyMaskBlock(32, 4, qkv_bias=True)
    x = torch.randn(2, 12, 32)
    mask = random_key_mask(2, 12, 0.25)
    out_ref, probs = attention_reference(blk.attn, x, mask)
    assert probs.shape == (2, 4, 12, 12)
    hidden = (~mask).expand_as(probs)
    assert (probs[hidden] == 0).all() and (probs[~hidden] > 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 12))
    assert torch.allclose(blk.attn(x, attn_mask=mask), out_ref, atol=1e-5)  # fused SDPA path
    assert torch.allclose(blk.attn(x), attention_reference(blk.attn, x)[0], atol=1e-5)


def test_block_applies_its_drawn_mask(drawn_masks):
    blk = KeyMaskBlock(32, 4, qkv_bias=True).train()
    x = torch.randn(2, 12, 32)
    out = blk(x, key_mask_ratio=0.25)
    (mask,) = drawn_masks
    h = x + attention_reference(blk.attn, blk.norm1(x), mask)[0]
    assert torch.allclose(out, h + blk.mlp(blk.norm2(h)), atol=1e-5)


def test_key_mask_fresh_per_layer_and_call_and_train_only(drawn_masks):
    enc = SpectrogramEncoder(**{**ENC, "depth": 3}).train()
    x = spec()
    y1 = enc(x, key_mask_ratio=0.25)
    m1 = list(drawn_masks)
    assert len(m1) == 3 and all(((~m).sum(-1) == 8).all() for m in m1)  # floor(0.25 * 32) hidden per sample
    assert not torch.equal(m1[0], m1[1]) and not torch.equal(m1[1], m1[2])
    y2 = enc(x, key_mask_ratio=0.25)
    assert not torch.equal(m1[0], drawn_masks[3]) and not torch.allclose(y1, y2)

    drawn_masks.clear()
    plain = enc.eval()(x)
    assert torch.equal(enc(x, key_mask_ratio=0.25), plain)  # eval: off
    assert drawn_masks == []  # no mask was drawn
    assert torch.equal(enc.train()(x, key_mask_ratio=0.0), plain)  # ratio 0: exactly plain

    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(enc(x, key_mask_ratio=0.25, generator=g1), enc(x, key_mask_ratio=0.25, generator=g2))


# --- A-JEPA ----------------------------------------------------------------------------

def model(loss="l2"):
    return AJEPA(ENC, dict(embed_dim=16, depth=2, num_heads=2), loss=loss)


def test_target_features_layernormed_no_grad():
    m = model()
    x = spec()
    _, tgt_idx = masks()
    t = m.forward_target(x, tgt_idx)
    assert t.shape == (2, 3, 4, 32) and not t.requires_grad
    assert torch.allclose(t.mean(-1), torch.zeros(2, 3, 4), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 3, 4), atol=1e-3)
    assert not any(p.requires_grad for p in m.target_encoder.parameters())
    full = F.layer_norm(m.target_encoder(x), (32,))
    assert torch.allclose(t[1, 2], full[1, tgt_idx[1, 2]])


def test_ema_update():
    m = model()
    for p in m.context_encoder.parameters():
        torch.nn.init.normal_(p)
    tgt0 = [p.clone() for p in m.target_encoder.parameters()]
    ctx = [p.clone() for p in m.context_encoder.parameters()]
    m.update_target(1.0)
    assert all(torch.equal(a, b) for a, b in zip(tgt0, m.target_encoder.parameters()))
    m.update_target(0.9)
    for t0, c, t in zip(tgt0, ctx, m.target_encoder.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * c, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ctx, m.context_encoder.parameters()))


def test_losses_and_gradients():
    pred, tgt = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    assert torch.allclose(model("l2").loss(pred, tgt), ((pred - tgt) ** 2).mean())
    assert torch.allclose(model("smooth_l1").loss(pred, tgt), F.smooth_l1_loss(pred, tgt))
    with pytest.raises(ValueError):
        model("l1")

    m = model()
    ctx_idx, tgt_idx = masks()
    m(spec(), ctx_idx, tgt_idx).backward()
    assert all(p.grad is not None for p in m.context_encoder.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert m.context_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.target_encoder.parameters())


def test_few_steps_reduce_loss():
    m = model().train()
    x = spec()
    ctx_idx, tgt_idx = masks()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = m(x, ctx_idx, tgt_idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_target(0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


def test_effective_rank_tells_collapse_from_spread():
    from ajepa.models import effective_rank
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 16, generator=g)
    assert 15.0 < effective_rank(spread) <= 16.0
    direction = torch.randn(16, generator=g)
    collapsed = torch.randn(4096, 1, generator=g) * direction + 1e-4 * torch.randn(4096, 16, generator=g)
    assert effective_rank(collapsed) < 1.01
    # two equal directions: rank 2, whatever their scale and the tensor's leading shape
    two = torch.zeros(64, 32, 16)
    two[..., 0], two[..., 1] = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    assert effective_rank(3.0 * two) == pytest.approx(2.0, abs=0.05)


def test_position_only_predictor_is_the_running_mean_per_position():
    from ajepa.models import PositionOnlyPredictor
    table = PositionOnlyPredictor(num_patches=3, dim=2, momentum=0.5)
    idx = torch.tensor([[0, 1], [0, 2]])
    first = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[3.0, 3.0], [4.0, 4.0]]])
    assert math.isnan(table.loss_and_update(first, idx))  # nothing seen yet
    assert table.mean.tolist() == [[2.0, 2.0], [2.0, 0.0], [4.0, 4.0]] and table.count.tolist() == [2, 1, 1]
    second = torch.tensor([[[2.0, 2.0], [2.0, 0.0]], [[2.0, 2.0], [6.0, 4.0]]])
    # the loss is that of the table before it sees these targets: only position 2 is off, by 2 in one dim
    assert table.loss_and_update(second, idx) == pytest.approx(4.0 / 8)
    # cumulative mean while 1/count > 1 - momentum, then the EMA rate: position 0 had 2, now 2 more -> 1/2
    assert table.mean[0].tolist() == [2.0, 2.0] and table.mean[2].tolist() == [5.0, 4.0]


def test_sigreg_is_small_for_gaussian_and_large_for_collapsed_embeddings():
    from ajepa.models import sigreg
    torch.manual_seed(0)
    gaussian = sigreg(torch.randn(2048, 32))
    collapsed = sigreg(torch.randn(2048, 1) * torch.ones(1, 32) / 32 ** 0.5 + 0.01 * torch.randn(2048, 32))
    constant = sigreg(torch.zeros(2048, 32))
    assert gaussian < 5 and collapsed > 10 * gaussian and constant > 10 * gaussian


def test_multi_layer_targets_average_the_last_blocks():
    model = AJEPA({"grid": (4, 2), "patch_size": 16, "embed_dim": 32, "depth": 3, "num_heads": 2},
                  {"embed_dim": 32, "depth": 1, "num_heads": 2}, target_layers=2)
    x = torch.randn(2, 64, 32)
    idx = torch.arange(8).repeat(2, 1, 1)  # every patch, one block
    outs = model.target_encoder.block_outputs(x, 2)
    expected = torch.stack([F.layer_norm(o, (32,)) for o in outs]).mean(0)
    assert torch.allclose(model.forward_target(x, idx)[:, 0], F.layer_norm(expected, (32,)), atol=1e-6)
    assert torch.allclose(outs[-1], model.target_encoder(x), atol=1e-6)  # the last one is the encoder's output
