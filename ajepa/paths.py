"""Where each stage reads and writes, relative to the repository root.

dvc.yaml and the Snakemake rules name the same paths (the Snakefile reads dvc.yaml).
"""

import re
from pathlib import Path

DATA = Path("data")


def params_checked() -> Path:
    """What `ajepa check` writes once params.yaml passed validation; every stage depends on it."""
    return DATA / "params.checked"


def timing_file(stage: str) -> Path:
    """Where a stage's seconds and throughput go: no output of any stage, git-ignored, never compared
    by `dvc exp show` or `dvc metrics diff`, so a rerun that computes the same numbers changes nothing."""
    return Path("logs") / "timing" / f"{stage}.json"


def raw_dir(dataset: str) -> Path:
    return DATA / "raw" / dataset


def downloads_dir() -> Path:
    """Downloaded archives, shared by the datasets (AS-20K and AS-2M share CSVs). Not a stage output:
    it survives reruns, so an interrupted download resumes and a rerun does not download again."""
    return DATA / "downloads"


def manifest_dir() -> Path:
    return DATA / "manifests"


def features_dir(dataset: str) -> Path:
    return DATA / "features" / dataset


def pool_file(dataset: str) -> Path:
    """What pretraining takes from one dataset (ajepa.stages.pool)."""
    return DATA / "pool" / f"{dataset}.json"


def pretrain_dir() -> Path:
    return Path("models") / "pretrain"


def pretrain_state_dir() -> Path:
    """Resumable training state: no output of the pretrain stage in dvc.yaml nor in the Snakefile (scratch
    space the stage keeps beside its outputs; neither tool deletes it before a run)."""
    return Path("models") / "pretrain_state"


def pretrain_results() -> Path:
    return Path("results") / "pretrain"


def pretrain_live_dir() -> Path:
    """Pretraining curves (DVCLive), appended to by a resumed run."""
    return pretrain_results() / "live"


def pretrained_encoder(which: str) -> Path:
    """What pretraining exports: the context encoder or the target (EMA) encoder, each a folder of
    weights, config.json and model card (ajepa.export)."""
    return pretrain_dir() / which


def embeddings_dir(benchmark: str) -> Path:
    """Frozen-encoder embeddings of the linear stage (a persistent, cached output in dvc.yaml)."""
    return DATA / "embeddings" / benchmark


def linear_results(benchmark: str) -> Path:
    return Path("results") / "linear" / benchmark


def finetune_results(benchmark: str) -> Path:
    return Path("results") / "finetune" / benchmark


def finetune_state_dir(benchmark: str) -> Path:
    """Resumable fine-tuning state, one checkpoint per run (no stage output, as pretrain_state_dir)."""
    return Path("models") / "finetune_state" / benchmark


def report_dir() -> Path:
    return Path("results")


def ablation_table() -> Path:
    """The table of the ablation experiments, written by `ajepa ablate --table` (no stage output: the
    report includes it when it exists)."""
    return report_dir() / "ablation.md"


def escapes(name: str) -> str | None:
    """Why the relative name `name` could lead outside its folder ("an absolute path", "a '..'
    component"), or None when it stays inside (as far as the name tells: links are checked apart)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "a '..' component"
    return None
