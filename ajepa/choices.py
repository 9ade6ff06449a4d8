"""The words params.yaml chooses between, each set defined once.

config.py validates params.yaml against these types, and the code that implements each set checks its
own arguments with `check_choice`; both read the one definition here. They live in this module, not
beside their implementations, because config.py must import them and must stay light: it is imported
by every `ajepa` command and by each Snakemake parse of the workflow (workflow/rules/dvc.smk), and the
implementing modules import torch and timm (about 2-5 s).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MaskMode", "Loss", "PredictorInit", "Pooling", "Encoder", "HeadInit", "HeadNorm", "ClassifierLoss",
           "Selection", "Split", "LrScaling", "names", "check_choice"]

# ajepa.masks.MaskGenerator: curriculum (paper), block (I-JEPA), tf (time-frequency), inverse curriculum
MaskMode = Literal["curriculum", "block", "tf", "inverse"]
# ajepa.models.ajepa.AJEPA: the paper's mean L2, or the smooth-L1 the I-JEPA code optimises
Loss = Literal["l2", "smooth_l1"]
# ajepa.models.vit.Predictor: I-JEPA's trunc_normal(0.02), or MAE's decoder init (xavier_uniform)
PredictorInit = Literal["trunc_normal", "xavier"]
# ajepa.models.vit.pool_tokens: the mean over time, frequency kept, or the mean of every patch
Pooling = Literal["time", "all"]
# ajepa.models.ajepa.AJEPA's two encoders, exported each to its own folder (ajepa.export)
Encoder = Literal["context", "target"]
# ajepa.downstream.finetune: the head's start (AudioMAE's near-zero, or the linear probe's solution: LP-FT),
# where the final norm goes, the loss, and which epoch's weights are scored
HeadInit = Literal["zero", "probe"]
HeadNorm = Literal["encoder", "fc_norm"]
ClassifierLoss = Literal["ce", "bce"]
Selection = Literal["val", "val_start", "last"]
# ajepa.datasets.manifest: the split column of a manifest
Split = Literal["train", "val", "test", "pretrain"]
# ajepa.train.schedules.peak_lr: lr is the peak (I-JEPA), or a base lr per 256 clips (AudioMAE)
LrScaling = Literal["absolute", "per_256"]


def names(choice) -> tuple[str, ...]:
    """The words of one of the sets above, in their order."""
    return get_args(choice)


def check_choice(value: str, choice, what: str) -> None:
    """ValueError naming `what` unless `value` is one of `choice`'s words (for the library's own callers;
    params.yaml's values are checked by config.py with a one-line ConfigError before they get here)."""
    if value not in get_args(choice):
        raise ValueError(f"{what} must be one of {get_args(choice)}, got {value!r}")
