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
