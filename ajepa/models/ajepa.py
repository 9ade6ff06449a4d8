"""A-JEPA: context encoder + EMA target encoder + predictor (arXiv 2311.15830)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import Predictor, SpectrogramEncoder, gather_tokens, resolve_size

__all__ = ["AJEPA", "effective_rank"]


class AJEPA(nn.Module):
    """encoder_kwargs: SpectrogramEncoder kwargs (grid required; `size` allowed).
    predictor_kwargs: Predictor kwargs without grid/encoder_dim (taken from the encoder)."""

    def __init__(self, encoder_kwargs: dict, predictor_kwargs: dict | None = None, loss: str = "l2"):
        super().__init__()
        if loss not in ("l2", "smooth_l1"):
            raise ValueError(f"loss must be 'l2' or 'smooth_l1', got {loss!r}")
        self.loss_type = loss
        self.last_target: torch.Tensor | None = None
        self.context_encoder = SpectrogramEncoder(**resolve_size(encoder_kwargs))
        # The target encoder starts as an exact copy and is only ever moved by EMA.
        self.target_encoder = copy.deepcopy(self.context_encoder).requires_grad_(False)
        self.predictor = Predictor(self.context_encoder.grid, self.context_encoder.embed_dim,
                                   **(predictor_kwargs or {}))

    @torch.no_grad()
    def forward_target(self, x: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """Target features [B, M, Kt, D]: encode the FULL spectrogram (targets are
        contextualised by every patch), then LayerNorm without affine over features, as
        I-JEPA does, so the regression target has a fixed scale the EMA cannot shrink."""
        h = self.target_encoder(x)
        h = F.layer_norm(h, h.shape[-1:])
        return gather_tokens(h, target_idx)

    def forward_context(self, x: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """Predictions [B, M, Kt, D] from the context patches only."""
        z = self.context_encoder(x, keep=context_idx)
        return self.predictor(z, context_idx, target_idx)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # "l2": the paper's mean L2 (squared error averaged over every target token and
        # feature); "smooth_l1": what the I-JEPA reference code actually optimises.
        if self.loss_type == "l2":
            return F.mse_loss(pred, target)
        return F.smooth_l1_loss(pred, target)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA t = m * t + (1 - m) * c over parameters (buffers are fixed pos embeds).
        lerp(t, c, 1 - m) is that same update as one fused multi-tensor op; m = 1 is a no-op."""
        tgt = list(self.target_encoder.parameters())
        ctx = [p.detach() for p in self.context_encoder.parameters()]
        torch._foreach_lerp_(tgt, ctx, 1.0 - momentum)

    def forward(self, x: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        target = self.forward_target(x, target_idx)
        # kept (no grad, no copy) for the training loop's collapse diagnostic, effective_rank()
        self.last_target = target
        return self.loss(self.forward_context(x, context_idx, target_idx), target)


@torch.no_grad()
def effective_rank(tokens: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular-value energy of token features [..., D] (Roy & Vetterli
    2007): D for isotropic features, 1 when every token varies along one direction. JEPA's failure mode
    is dimensional collapse, which the loss alone does not show (a collapsed target is easy to predict)."""
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s.square() / s.square().sum().clamp_min(1e-30)
    return float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()))
