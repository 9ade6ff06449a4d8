"""Where each stage reads and writes, relative to the repository root.

dvc.yaml and the Snakemake rules name the same paths; `ajepa dag --check` (later) compares them.
"""

from pathlib import Path

DATA = Path("data")


def raw_dir(dataset: str) -> Path:
    return DATA / "raw" / dataset


def manifest_dir() -> Path:
    return DATA / "manifests"


def features_dir(dataset: str) -> Path:
    return DATA / "features" / dataset


def pretrain_dir() -> Path:
    return Path("models") / "pretrain"


def pretrain_state_dir() -> Path:
    """Resumable training state: persistent and uncached in dvc.yaml, never a Snakemake output."""
    return Path("models") / "pretrain_state"


def pretrain_results() -> Path:
    return Path("results") / "pretrain"
