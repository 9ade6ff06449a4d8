import hashlib
import multiprocessing.context
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
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


def pool_features(root: Path, out: Path, *, seed: int, clips: int, duration_s: float = 1.0,
                  shard_clips: int = 64) -> Path:
    """`clips` unlabeled synthetic clips of `duration_s` seconds generated under `root`, as a pretraining
    feature store at `out`: 96 log-mel frames per second of 128 bins, a patch grid of 16 x 16 patches."""
    from ajepa.data.frontend import FrontEnd
    from ajepa.data.store import extract_features
    from ajepa.datasets import synth
    from ajepa.datasets.manifest import unlabeled_rows

    spec = synth.GeneratorSpec(seed=seed, duration_s=duration_s, sample_rate=16000, snr_db=(10.0, 30.0))
    synth.generate(root / "raw", spec, clips_per_class=1, num_folds=1, pool_clips=clips)
    frames = round(96 * duration_s)
    extract_features(unlabeled_rows(root / "raw", "meta/pool.csv", "pool"), out, FrontEnd(), frames, shard_clips,
                     1, 0.0, extra_stats={"grid": [frames // 16, 8], "patch_size": 16}, progress=False)
    return out


def noise_wavs(folder: Path, n: int, samples: int, grow: int, prefix: str = "clip") -> list[str]:
    """n 16 kHz noise clips folder/PREFIXi.wav (seeded), the i-th `samples + grow * i` samples long."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i}.wav"
        sf.write(p, (0.1 * rng.standard_normal(samples + grow * i)).astype(np.float32), 16000)
        paths.append(str(p))
    return paths

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


GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
# `snakemake --cores 2` runs each training job with OMP_NUM_THREADS=2; the same thread count for DVC, as
# float sums depend on it (in the last bits) and the tests compare the two byte for byte
TWO_THREADS = {**os.environ, "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The project with the repository's params.yaml (its layout and comments) and the smoke preset
    applied by `ajepa preset smoke`, in its own git repo, run once with `dvc repro` and committed as a
    user commits a run: (root, the repro's result). Tests work on a copy (`copy_project`)."""
    root = make_project_copy(tmp_path_factory.mktemp("smoke_run"), load_repo_params(), git=False)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    run(["ajepa", "preset", "smoke"], root)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run([*GIT, "commit", "-q", "-m", "the project"], root)  # DVC experiments need a commit
    r = run(["dvc", "repro"], root, env=TWO_THREADS)
    run(["git", "add", "-A"], root)
    run([*GIT, "commit", "-q", "-m", "smoke run"], root)
    return root, r


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project folder with its git history, DVC cache and outputs (links kept as links)."""
    shutil.copytree(src, dest, symlinks=True)
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


# -- two workers ------------------------------------------------------------------------------------------
# `make test` runs pytest-xdist with two workers and `--dist loadgroup`. Every test is put in the group of its
# module, so a module's fixtures are built once; the modules whose tests use the committed smoke run
# (`smoke_run`, 1 to 2 minutes of `dvc repro`) share one group, so it is built once too. The two longest
# groups come first (with `--no-loadscope-reorder`, in collection order): the SLURM tests, which mostly wait
# on the cluster's jobs and time limit while the other worker computes, and the smoke run's.
SHARED_GROUPS = {"smoke_run": "smoke_run"}  # session fixture -> the group of every module that uses it
FIRST_GROUPS = ("tests/test_slurm.py", "smoke_run")


def pytest_collection_modifyitems(config, items):
    by_module: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        shared = next((g for f, g in SHARED_GROUPS.items() if f in item.fixturenames), None)
        if shared:
            by_module[module] = shared
        else:
            by_module.setdefault(module, module)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(by_module[item.nodeid.split("::")[0]]))
    first = {group: rank for rank, group in enumerate(FIRST_GROUPS)}
    items.sort(key=lambda item: first.get(by_module[item.nodeid.split("::")[0]], len(first)))  # stable


# -- the two tiers -------------------------------------------------------------------------------------
# `make test-fast` runs `pytest -m "not slow"`: the unit tests, in under a minute. A test that starts a
# program (ajepa, dvc, snakemake, torchrun, SLURM) or a fresh interpreter (multiprocessing's spawn) must
# carry @pytest.mark.slow: the fixture below fails it otherwise, so the fast tier cannot drift slow.
# Forked workers (a DataLoader's) do not count: they start in milliseconds.
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes, the pipeline or a training run "
                                       "(`make test-fast` leaves it out; `make test` runs everything)")


@pytest.fixture(autouse=True)
def _processes_need_the_slow_marker(request, monkeypatch):
    if request.node.get_closest_marker("slow"):
        yield
        return
    started = []
    popen = subprocess.Popen.__init__

    def recording_popen(self, args, *a, **kw):
        started.append(args)
        popen(self, args, *a, **kw)

    def recording_start(original):
        def start(self):
            started.append(f"a {type(self).__name__}")
            return original(self)
        return start

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_popen)
    for cls in (multiprocessing.context.SpawnProcess, multiprocessing.context.ForkServerProcess):
        monkeypatch.setattr(cls, "start", recording_start(cls.start))
    yield
    if started and os.environ.get("AJEPA_LIST_PROCESS_TESTS"):  # a listing run: record instead of failing
        with open(os.environ["AJEPA_LIST_PROCESS_TESTS"], "a") as f:
            f.write(request.node.nodeid + "\n")
    elif started:
        pytest.fail(f"{request.node.nodeid} starts {started[0]!r} (and {len(started) - 1} more processes) "
                    "without @pytest.mark.slow", pytrace=False)
