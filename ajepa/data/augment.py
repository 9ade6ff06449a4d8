"""Training-time augmentations of cached, normalised log-mel spectrograms (AudioMAE/AST recipes).

AudioMAE and AST augment the waveform before the fbank; ajepa caches the fbank, so each augmentation
is restated as its effect on the normalised log-mel `z = (ln P - mean) / (2 std)` of a clip [T, F]
(P: mel power, natural log as in Kaldi's fbank):

  roll       a circular shift of the waveform is, up to the frame grid, a circular shift of the
             frames (AudioMAE's roll_mag_aug, first half)
  magnitude  scaling the waveform by m ~ Beta(10, 10) + 0.5 scales P by m^2, i.e. adds
             2 ln m / (2 std) = ln(m) / std to z (roll_mag_aug, second half)
  mixup      lam w1 + (1 - lam) w2 of two waveforms has, for uncorrelated sources, the expected mel
             power lam^2 P1 + (1 - lam)^2 P2 (the cross term averages out), so clips are mixed in
             that power domain: undo the normalisation and the log, mix, re-log, re-normalise.
             Mixing the normalised log-mels directly would instead take a weighted geometric mean of
             the powers, a sound that is in neither clip (AST/AudioMAE dataset code: the probability
             that a clip is mixed, lam ~ Beta(10, 10), labels lam y1 + (1 - lam) y2)
  noise      AST's speech-commands noise on the normalised fbank: + U[0, 1) x U[0, 1) / 10 per bin,
             then a shift of up to 10 frames either way

The padded frames of a short clip (log-mel 0 in the cache) are shifted, scaled and mixed with it;
AudioMAE pads after augmenting. For AudioSet (998 of 1,024 frames are audio) this is negligible.
Every draw comes from the (CPU) generator passed in, so a step's augmentation is a function of its
seed, on whatever device the batch is: the draws are small, and the batch need not leave the GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ajepa.seeding import numpy_rng

__all__ = ["MIX_ALPHA", "beta_draws", "mixup_draws", "power_mix", "mix_targets", "roll_time", "scale_magnitude",
           "add_noise", "ClipAugment"]

MIX_ALPHA = 10.0  # AST/AudioMAE: lam ~ Beta(10, 10), and the magnitude jitter m ~ Beta(10, 10) + 0.5


def beta_draws(n: int, alpha: float, g: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) [n] (float32). torch's Beta takes no generator, so numpy draws
    them from a seed taken from `g`."""
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def mixup_draws(n: int, prob: float, alpha: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of n clips are mixed (each with probability `prob`) and their weights lam [n]
    (Beta(alpha, alpha) where mixed, 1 elsewhere)."""
    mixed = torch.rand(n, generator=g) < prob
    lam = torch.where(mixed, beta_draws(n, alpha, g), torch.ones(n))
    return mixed, lam


def power_mix(z1: torch.Tensor, z2: torch.Tensor, lam: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Normalised log-mels [B, T, F] of lam w1 + (1 - lam) w2 (module docstring), lam [B] in (0, 1]."""
    lam = lam.to(z1.device, z1.dtype).view(-1, 1, 1)
    log1 = z1 * (2.0 * std) + mean + 2.0 * torch.log(lam)
    log2 = z2 * (2.0 * std) + mean + 2.0 * torch.log1p(-lam.clamp(max=1.0 - 1e-7))
    return (torch.logaddexp(log1, log2) - mean) / (2.0 * std)


def mix_targets(y1: torch.Tensor, y2: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """AST's targets: lam on the first clip's labels, 1 - lam on the second's [B, C]."""
    lam = lam.to(y1.device, y1.dtype).view(-1, 1)
    return lam * y1 + (1.0 - lam) * y2


def roll_time(z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each clip of z [B, T, F] shifted circularly along time by U{0, ..., T - 1} frames."""
    B, T = z.shape[:2]
    shifts = torch.randint(0, T, (B,), generator=g)
    idx = (torch.arange(T)[None] - shifts[:, None]) % T
    return torch.gather(z, 1, idx.to(z.device)[:, :, None].expand_as(z))


def scale_magnitude(z: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    """Each clip's waveform scaled by m ~ Beta(10, 10) + 0.5, as a shift of ln(m) / std of z [B, T, F]."""
    m = beta_draws(len(z), MIX_ALPHA, g) + 0.5
    return z + (torch.log(m) / std).to(z.device, z.dtype).view(-1, 1, 1)


def add_noise(z: torch.Tensor, g: torch.Generator, max_shift: int = 10) -> torch.Tensor:
    """AST's noise augmentation of z [B, T, F]: uniform noise of a per-clip level U[0, 0.1) on every
    bin, then a circular time shift of U{-max_shift, ..., max_shift - 1} frames."""
    B, T = z.shape[:2]
    level = torch.rand(B, 1, 1, generator=g) / 10.0
    z = z + (torch.rand(z.shape, generator=g) * level).to(z.device, z.dtype)
    shifts = torch.randint(-max_shift, max_shift, (B,), generator=g)
    idx = (torch.arange(T)[None] - shifts[:, None]) % T
    return torch.gather(z, 1, idx.to(z.device)[:, :, None].expand_as(z))


class ClipAugment:
    """AudioMAE's pretraining augmentation (roll_mag_aug) of one clip, drawn from (seed, step, index)
    so a resumed run sees the same augmented clips, whatever the number of loader workers.
    Clips [starts[k], starts[k + 1]) were normalised with stds[k] (pooled stores keep their own)."""

    def __init__(self, roll: bool, magnitude: bool, seed: int, stds: list[float], starts: list[int]):
        self.roll, self.magnitude, self.seed = roll, magnitude, int(seed)
        self.stds, self.starts = [float(s) for s in stds], np.asarray(starts, dtype=np.int64)

    def __call__(self, z: torch.Tensor, step: int, i: int) -> torch.Tensor:
        rng = numpy_rng(self.seed, "clip", int(step), int(i))
        if self.roll:
            z = torch.roll(z, int(rng.integers(z.shape[0])), dims=0)
        if self.magnitude:
            std = self.stds[int(np.searchsorted(self.starts, i, side="right")) - 1]
            z = z + float(math.log(rng.beta(MIX_ALPHA, MIX_ALPHA) + 0.5) / std)
        return z
