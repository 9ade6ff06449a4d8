import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ajepa.tools.presets import load_preset, merge

REPO = Path(__file__).resolve().parent.parent
# The files a working copy of the project needs (what a clone has, minus tests and data).
PROJECT_FILES = ["ajepa", "workflow", "presets", "Snakefile", "dvc.yaml", "params.yaml", "pyproject.toml",
                 ".dvc/config", ".dvcignore", ".gitignore"]

# subprocesses (ajepa, dvc, snakemake) must come from the same environment as the tests
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def load_repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_params() -> dict:
    """The repository's params.yaml with the smoke preset (presets/smoke.yaml): a seconds-long run."""
    p = load_repo_params()
    merge(p, load_preset(REPO / "presets" / "smoke.yaml"))
    return p


def pool_features(root: Path, out: Path, *, seed: int, clips: int, duration_s: float = 1.0) -> Path:
    """`clips` unlabeled synthetic clips of `duration_s` seconds generated under `root`, as a pretraining
    feature store at `out`: 96 log-mel frames per second of 128 bins, a patch grid of 16 x 16 patches."""
    from ajepa.data.frontend import FrontEnd
    from ajepa.data.store import extract_features
    from ajepa.datasets import synth
    from ajepa.datasets.manifest import unlabeled_rows

    spec = synth.GeneratorSpec(seed=seed, duration_s=duration_s, sample_rate=16000, snr_db=(10.0, 30.0))
    synth.generate(root / "raw", spec, clips_per_class=1, num_folds=1, pool_clips=clips)
    frames = round(96 * duration_s)
    extract_features(unlabeled_rows(root / "raw", "meta/pool.csv", "pool"), out, FrontEnd(), frames, 64, 1, 0.0,
                     extra_stats={"grid": [frames // 16, 8], "patch_size": 16}, progress=False)
    return out


def make_project_copy(dest: Path, params: dict, git: bool = True) -> Path:
    """A temporary working copy of the project (its own git repo, as a clone would be)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if git:
        run(["git", "init", "-q"], dest)
        run(["git", "add", "-A"], dest)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init"], dest)
    return dest


def run(cmd, cwd, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse_dry_run(text: str) -> list[dict]:
    """The job blocks of `snakemake --dry-run --printshellcmds` (Snakemake 9): rule, its "key: value"
    lines (input, output, log, wildcards, resources, ...) and the shell command."""
    jobs, job = [], None
    for line in text.splitlines():
        if not line.startswith(" ") and line.strip().removeprefix("local").startswith("rule ") and line.endswith(":"):
            job = {"rule": line.strip().removeprefix("local").split()[1].rstrip(":")}
            jobs.append(job)
        elif job is not None and line.startswith("Shell command:"):
            job["shell"], job = line.split(":", 1)[1].strip(), None
        elif job is not None and line.startswith("    ") and ":" in line:
            key, value = line.strip().split(":", 1)
            job[key] = value.strip()
        elif not line.strip():
            job = None
    return jobs


def tree_digest(root: Path) -> str:
    """One hash of every file's relative path and bytes below root: equal trees, equal digests."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A few pretraining steps on 24 one-second synthetic clips recorded at 32 kHz (features at 16 kHz
    on a 6 x 8 patch grid), exported as `ajepa pretrain` exports them: (models/pretrain, feature store)."""
    from ajepa.config import parse_params
    from ajepa.data.frontend import FrontEnd
    from ajepa.data.store import FeatureStore, extract_features
    from ajepa.datasets import synth
    from ajepa.datasets.manifest import unlabeled_rows
    from ajepa.train.distributed import init_distributed
    from ajepa.train.pretrain import PretrainPaths, pretrain

    root = tmp_path_factory.mktemp("tiny_export")
    spec = synth.GeneratorSpec(seed=5, duration_s=1.0, sample_rate=32000, snr_db=(10.0, 30.0))
    synth.generate(root / "raw", spec, clips_per_class=1, num_folds=1, pool_clips=24)
    store = root / "data" / "features" / "synth"
    extract_features(unlabeled_rows(root / "raw", "meta/pool.csv", "pool"), store, FrontEnd(), 96, 64, 1, 0.0,
                     extra_stats={"grid": [6, 8], "patch_size": 16}, progress=False)
    params = tiny_params()
    params["pretrain"]["optim"]["epochs"] = 1
    models = root / "models" / "pretrain"
    pretrain(parse_params(params).pretrain, FeatureStore(store, ("pretrain",)),
             PretrainPaths({"context": models / "context", "target": models / "target"}, root / "state",
                           root / "metrics.json"), init_distributed())
    return models, store
