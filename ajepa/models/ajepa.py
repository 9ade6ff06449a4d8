"""A-JEPA: context encoder + EMA target encoder + predictor (arXiv 2311.15830)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ajepa.choices import Loss, check_choice

from .vit import Predictor, SpectrogramEncoder, gather_tokens, resolve_size

__all__ = ["AJEPA", "PositionOnlyPredictor", "effective_rank", "sigreg"]


class AJEPA(nn.Module):
    """encoder_kwargs: SpectrogramEncoder kwargs (grid required; `size` allowed).
    predictor_kwargs: Predictor kwargs without grid/encoder_dim (taken from the encoder)."""

    def __init__(self, encoder_kwargs: dict, predictor_kwargs: dict | None = None, loss: Loss = "l2",
                 target_layers: int = 1, sigreg: float = 0.0):
        super().__init__()
        check_choice(loss, Loss, "loss")
        self.loss_type = loss
        self.target_layers, self.sigreg_weight = int(target_layers), float(sigreg)
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
        if self.target_layers == 1:
            h = self.target_encoder(x)
        else:  # data2vec: the average of the last K blocks, each normalised so that no layer dominates
            h = torch.stack([F.layer_norm(o, o.shape[-1:]) for o in
                             self.target_encoder.block_outputs(x, self.target_layers)]).mean(0)
        h = F.layer_norm(h, h.shape[-1:])
        return gather_tokens(h, target_idx)

    def forward_context(self, x: torch.Tensor, context_idx: torch.Tensor,
                        target_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions [B, M, Kt, D], context tokens [B, Kc, D]) from the context patches only."""
        z = self.context_encoder(x, keep=context_idx)
        return self.predictor(z, context_idx, target_idx), z

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
        pred, context = self.forward_context(x, context_idx, target_idx)
        loss = self.loss(pred, target)
        if self.sigreg_weight > 0:
            loss = (1.0 - self.sigreg_weight) * loss + self.sigreg_weight * sigreg(context.flatten(0, 1))
        return loss


def sigreg(z: torch.Tensor, directions: int = 64, points: int = 9, t_max: float = 4.0) -> torch.Tensor:
    """LeJEPA's SIGReg (Balestriero & LeCun 2025): how far embeddings z [N, D] are from an isotropic
    standard Gaussian, as the Epps-Pulley statistic of their projections on random unit directions: the
    squared distance between each projection's empirical characteristic function and exp(-t^2 / 2),
    weighted by exp(-t^2 / 2) and integrated over t (times N), averaged over directions. Collapse,
    dimensional or complete, moves it far from 0. The integrand is even in t, so it is integrated over
    [0, t_max] and doubled (beyond |t| = 4 the weight is below 3e-4). Directions are drawn afresh per
    call from the global RNG; 64 of them cost about a tenth of the embedded default's step."""
    a = torch.randn(z.shape[-1], directions, device=z.device, dtype=z.dtype)
    proj = z @ (a / a.norm(dim=0, keepdim=True))  # [N, directions]
    t = torch.linspace(0.0, t_max, points, device=z.device, dtype=z.dtype)
    arg = proj[..., None] * t  # [N, directions, points]
    gauss = torch.exp(-0.5 * t * t)
    err = (torch.cos(arg).mean(0) - gauss) ** 2 + torch.sin(arg).mean(0) ** 2
    return 2.0 * torch.trapezoid(err * gauss, t, dim=-1).mean() * z.shape[0]


class PositionOnlyPredictor(nn.Module):
    """The best L2 prediction of a target that sees no context at all: the mean target at each patch
    position, kept as a running mean over training (cumulative at first, then an EMA with `momentum`).
    Its loss on fresh targets, next to the real loss, tells how much of the target the predictor could
    get from position alone: if the two are close, the targets carry position, not content."""

    def __init__(self, num_patches: int, dim: int, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(num_patches, dim))
        self.register_buffer("count", torch.zeros(num_patches))

    @torch.no_grad()
    def loss_and_update(self, target: torch.Tensor, target_idx: torch.Tensor) -> float:
        """MSE of the current table on target [..., D] at patch indices target_idx [...] (positions never
        seen before are left out), then fold the targets into the table."""
        idx, t = target_idx.reshape(-1), target.reshape(-1, target.shape[-1]).float()
        seen = self.count[idx] > 0
        loss = float(F.mse_loss(self.mean[idx][seen], t[seen])) if seen.any() else float("nan")
        sums = torch.zeros_like(self.mean).index_add_(0, idx, t)
        n = torch.zeros_like(self.count).index_add_(0, idx, torch.ones_like(idx, dtype=self.count.dtype))
        hit = n > 0
        self.count += n
        rate = torch.clamp(n / self.count.clamp_min(1), min=1.0 - self.momentum)[hit, None]
        self.mean[hit] += rate * (sums[hit] / n[hit, None] - self.mean[hit])
        return loss


@torch.no_grad()
def effective_rank(tokens: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular-value energy of token features [..., D] (Roy & Vetterli
    2007): D for isotropic features, 1 when every token varies along one direction. JEPA's failure mode
    is dimensional collapse, which the loss alone does not show (a collapsed target is easy to predict)."""
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s.square() / s.square().sum().clamp_min(1e-30)
    return float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()))
