"""ViT encoder and predictor on a rectangular (time, frequency) patch grid.

Spectrograms [B, T, F] are cut into non-overlapping patches; the grid is
(n_time, n_freq) = (T / p, F / p) and patch index = t * n_freq + f (time-major), which
is exactly the row-major flatten of the Conv2d output with time as height.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from ajepa.choices import Pooling, PredictorInit, check_choice

from .attention import KeyMaskBlock, random_key_mask

__all__ = ["SIZES", "resolve_size", "sincos_pos_embed_2d", "gather_tokens", "pool_tokens",
           "time_patch_embeddings", "init_vit_weights", "SpectrogramEncoder", "Predictor", "set_activation_checkpointing"]

# ViT sizes (embed_dim, depth, num_heads) as in ViT/MAE/I-JEPA; A-JEPA's main model is "base".
SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def resolve_size(kwargs: dict) -> dict:
    """Expand an optional `size` key ("tiny".."large") into embed_dim/depth/num_heads.

    Explicit keys win, so `{"size": "base", "depth": 2}` is a shallow base-width model and
    `{"embed_dim": 64, "depth": 2, "num_heads": 4}` needs no size at all.
    """
    kwargs = dict(kwargs)
    size = kwargs.pop("size", None)
    return {**SIZES[size], **kwargs} if size is not None else kwargs


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding [n_time * n_freq, dim] (MAE/I-JEPA formula).

    MAE builds the grid with meshgrid(w, h), so its first half of the channels encodes the
    column (width) coordinate and the second half the row. We keep that channel order --
    first half frequency (column), second half time (row) -- so a square grid reproduces
    MAE's table exactly, but take the two extents separately: the grid is rectangular.
    """
    n_time, n_freq = grid
    assert dim % 4 == 0, "sin-cos 2-D embedding needs dim divisible by 4"
    t = torch.arange(n_time).repeat_interleave(n_freq)  # row index of patch t * n_freq + f
    f = torch.arange(n_freq).repeat(n_time)  # column index
    return torch.cat([_sincos_1d(f, dim // 2), _sincos_1d(t, dim // 2)], dim=1).float()


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, *S] -> [B, *S, D]."""
    B, D = x.shape[0], x.shape[-1]
    flat = idx.reshape(B, -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, D))
    return out.reshape(*idx.shape, D)


# How a clip's tokens become one vector for a probe or a classification head:
#   "time"  mean over the time patches, the frequency patches concatenated: [B, F * D]. What MSM-MAE/M2D and
#           the EVAR benchmark use for frozen audio ViTs: it keeps where in frequency the energy is.
#   "all"   mean over every patch: [B, D] (AudioMAE's fine-tuning head). Every frequency band then goes
#           through one average of the same patch projection, so a probe no longer sees the band.
# (the words: ajepa.choices.Pooling)


def time_patch_embeddings(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Encoder output [B, n_time * n_freq, D] (time-major) -> one embedding per time patch
    [B, n_time, n_freq * D]: the patch's column of frequency tokens concatenated, low band first."""
    B, _, D = tokens.shape
    return tokens.reshape(B, grid[0], grid[1] * D)


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], pooling: Pooling) -> torch.Tensor:
    """Encoder output [B, n_time * n_freq, D] (time-major) -> [B, n_freq * D] ("time": the mean of the
    time-patch embeddings) or [B, D] ("all")."""
    check_choice(pooling, Pooling, "pooling")
    if pooling == "all":
        return tokens.mean(dim=1)
    return time_patch_embeddings(tokens, grid).mean(dim=1)


# How the predictor's Linear layers start: "trunc_normal" is I-JEPA's (init_vit_weights below);
# "xavier" is MAE's decoder init, xavier_uniform for every Linear and zero biases (ajepa.choices.PredictorInit).


def init_vit_weights(module: nn.Module, blocks: nn.ModuleList, std: float = 0.02) -> None:
    """I-JEPA/MAE init: trunc_normal_(0.02) for Linear/Conv weights, zero biases,
    LayerNorm (1, 0); then I-JEPA's `fix_init_weight`: divide each block's residual-branch
    output projections (attn.proj, mlp.fc2) by sqrt(2 * layer_id), layer_id from 1, so the
    residual stream's variance does not grow with depth at init."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


# eps=1e-6 as in I-JEPA/MAE (torch's default is 1e-5).
_norm = partial(nn.LayerNorm, eps=1e-6)


def _drop_path_rates(drop_path: float, depth: int) -> list[float]:
    # stochastic depth decay rule; on the CPU even when the model is built on the meta device (shape checks)
    return [x.item() for x in torch.linspace(0, drop_path, depth, device="cpu")]


class SpectrogramEncoder(nn.Module):
    """ViT over spectrogram patches; no CLS token (I-JEPA/A-JEPA predict patch features only)."""

    def __init__(self, grid: tuple[int, int], patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, drop_path: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        self.grid = tuple(grid)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_patches = self.grid[0] * self.grid[1]
        self.activation_checkpointing = False  # see set_activation_checkpointing
        self.patch_embed = PatchEmbed(img_size=(self.grid[0] * patch_size, self.grid[1] * patch_size),
                                      patch_size=patch_size, in_chans=1, embed_dim=embed_dim)
        # Fixed, not learned (MAE/I-JEPA): a buffer, never optimised. Not persistent: it is a
        # pure function of the grid, so checkpoints load at any clip length (e.g. pretrain on
        # 1024 frames, fine-tune on 192) without a shape clash or a resampled table.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(self.grid, embed_dim)[None], persistent=False)
        self.blocks = nn.ModuleList(
            KeyMaskBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dp,
                         norm_layer=_norm)
            for dp in _drop_path_rates(drop_path, depth))
        self.norm = _norm(embed_dim)
        init_vit_weights(self, self.blocks)
        # MAE/AudioMAE: the patch projection is initialised as the linear layer it is (Xavier over
        # the flattened 16x16 patch), not with I-JEPA's trunc_normal(0.02). With one input channel
        # the latter makes patch content ~5x smaller than the sin-cos position code, so at init
        # every token (and the EMA target) is mostly its position: an easy, content-free target.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> pos-embedded patch tokens [B, N, D]."""
        return self.patch_embed(x.unsqueeze(1)) + self.pos_embed

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, key_mask_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """x [B, T, F]; keep [B, K] patch indices or None -> [B, K or N, D].

        Kept tokens are gathered after adding the pos embed and before the blocks, so the
        context encoder only pays for visible patches. `key_mask_ratio` > 0 turns on
        regularized (key) masking, in training mode only.
        """
        x = self.embed(x)
        if keep is not None:
            x = gather_tokens(x, keep)
        for blk in self.blocks:
            x = self._block(blk, x, key_mask_ratio, generator)
        return self.norm(x)

    def _block(self, blk: KeyMaskBlock, x: torch.Tensor, key_mask_ratio: float,
               generator: torch.Generator | None) -> torch.Tensor:
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return blk(x, key_mask_ratio=key_mask_ratio, generator=generator)
        # The key mask is drawn here, as the block would draw it, but outside the checkpoint: the
        # backward recomputation must see the same mask, and `generator` has moved on by then.
        # (Drop path draws from the global RNG, which the checkpoint restores for the recomputation.)
        mask = random_key_mask(x.shape[0], x.shape[1], key_mask_ratio, x.device, generator) \
            if blk.training and key_mask_ratio > 0 else None
        return checkpoint(blk, x, mask, use_reentrant=False)

    def block_outputs(self, x: torch.Tensor, last: int) -> list[torch.Tensor]:
        """The residual stream after each of the last `last` blocks, the final one through the encoder's
        norm (so last=1 is forward(x)): [B, N, D] each, for data2vec-style multi-layer targets."""
        x = self.embed(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - last:
                outs.append(x)
        outs[-1] = self.norm(outs[-1])
        return outs


class Predictor(nn.Module):
    """Narrow ViT predicting target-block features from context tokens (I-JEPA predictor).

    Paper: depth 16, width 512. All M target blocks are predicted in one batched pass:
    each (sample, block) pair is its own sequence [context | Kt mask tokens], so blocks
    never see each other (same as I-JEPA's per-mask loop, M times fewer kernel launches).
    """

    def __init__(self, grid: tuple[int, int], encoder_dim: int, embed_dim: int = 512, depth: int = 16,
                 num_heads: int = 16, mlp_ratio: float = 4.0, drop_path: float = 0.0, qkv_bias: bool = True,
                 init: PredictorInit = "trunc_normal"):
        super().__init__()
        check_choice(init, PredictorInit, "predictor init")
        self.grid = tuple(grid)
        self.activation_checkpointing = False  # see set_activation_checkpointing
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(self.grid, embed_dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dp,
                  norm_layer=_norm)
            for dp in _drop_path_rates(drop_path, depth))
        self.norm = _norm(embed_dim)
        self.proj = nn.Linear(embed_dim, encoder_dim)
        init_vit_weights(self, self.blocks)
        if init == "xavier":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context_tokens: torch.Tensor, context_idx: torch.Tensor,
                target_idx: torch.Tensor) -> torch.Tensor:
        """context_tokens [B, Kc, D], context_idx [B, Kc], target_idx [B, M, Kt] -> [B, M, Kt, D]."""
        B, M, Kt = target_idx.shape
        ctx = self.embed(context_tokens) + self.pos_embed[context_idx]
        ctx = ctx.repeat_interleave(M, dim=0)  # row b * M + m
        tgt = self.mask_token + self.pos_embed[target_idx.reshape(B * M, Kt)]
        x = torch.cat([ctx, tgt], dim=1)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if checkpointing else blk(x)
        x = self.proj(self.norm(x[:, -Kt:]))
        return x.reshape(B, M, Kt, -1)


def set_activation_checkpointing(model: nn.Module, on: bool = True) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (torch.utils.checkpoint) in every encoder and predictor of `model`: activation memory drops to
    about one block's, for roughly a third more compute. The gradients are those of the plain model."""
    for m in model.modules():
        if isinstance(m, (SpectrogramEncoder, Predictor)):
            m.activation_checkpointing = on
