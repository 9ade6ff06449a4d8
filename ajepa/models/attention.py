"""The encoder's transformer block, with regularized masking for fine-tuning (A-JEPA, arXiv 2311.15830;
ratio 10% in the paper). Every encoder block is a KeyMaskBlock; with a ratio of 0 it is timm's Block.

A-JEPA fine-tunes "with a regularized masking ... instead of input dropping or zero":
rather than removing patches from the input (AudioMAE/SpecAugment-style), a random subset
of tokens is hidden *as attention keys* in every block. Each hidden token is still a
query and still flows through the residual stream; no token may attend to it. A fresh
subset is drawn per layer and per call, so no patch is invisible for the whole network.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block

__all__ = ["random_key_mask", "KeyMaskBlock"]


def random_key_mask(batch: int, n: int, ratio: float, device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, 1, N]; True = key may be attended, False = hidden key.

    Exactly floor(ratio * N) keys are hidden per sample (capped at N - 1 so that a
    softmax row is never all -inf, which would produce NaNs). Returns None when nothing
    is hidden so callers fall through to the unmasked (fastest) SDPA kernel.
    """
    n_mask = min(int(ratio * n), n - 1)
    if n_mask <= 0:
        return None
    # Draw on the generator's device so a CPU generator also works for CUDA inputs.
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, n, generator=generator, device=gen_device).to(device)
    hidden = noise.argsort(dim=1)[:, :n_mask]
    allowed = torch.ones(batch, n, dtype=torch.bool, device=device).scatter_(1, hidden, False)
    return allowed[:, None, None, :]


class KeyMaskBlock(Block):
    """timm pre-norm Block (timm's Attention, fused SDPA with `attn_mask`) whose attention hides a fresh
    random key subset in training.

    With `key_mask_ratio == 0` or in eval mode no mask is built and the call is exactly
    `timm.Block.forward`. An extra `attn_mask`, if given, must be boolean (it is ANDed with the drawn
    key mask).
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                key_mask_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        key_mask = None
        if self.training and key_mask_ratio > 0:
            key_mask = random_key_mask(x.shape[0], x.shape[1], key_mask_ratio, x.device, generator)
            if key_mask is not None and attn_mask is not None:
                key_mask = key_mask & attn_mask
        return super().forward(x, attn_mask=attn_mask if key_mask is None else key_mask, is_causal=is_causal)
