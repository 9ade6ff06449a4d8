"""A small encoder export written the way `ajepa pretrain` writes one (ajepa.export.write_export)."""

from pathlib import Path

import torch

from ajepa.export import write_export
from ajepa.models import SpectrogramEncoder

TINY = {"grid": [4, 8], "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 4.0}
FRONTEND = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
            "target_length": 64}


def make_export(folder: Path, mean: float = -4.0, std: float = 4.0) -> Path:
    torch.manual_seed(0)
    encoder = SpectrogramEncoder(**{**TINY, "grid": tuple(TINY["grid"])})
    write_export(folder, encoder, {"encoder": "context", "architecture": TINY, "frontend": FRONTEND,
                                   "normalisation": {"mean": mean, "std": std}})
    return folder
