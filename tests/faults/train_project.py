"""A small project for the training fault tests: the repository's params with the smoke preset, the
synthetic dataset only, its features and pool made once per test module; each test copies it."""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ajepa.cli import main
from ajepa.tools.presets import load_preset, merge

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def smoke_params() -> dict:
    """params.yaml + presets/smoke.yaml, on the synthetic dataset alone, without the learning curve."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    merge(p, load_preset(REPO / "presets" / "smoke.yaml"))
    p["pipeline"].update(datasets=["synth"], benchmarks=["synth"])
    p["pretrain"]["datasets"] = ["synth"]
    p["pretrain"]["probe"]["every"] = 0
    p["finetune"]["synth"]["runs"] = 1
    return p


@contextlib.contextmanager
def cwd(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(before)


def make_template(root: Path) -> Path:
    """root/ with params.yaml, data/features/synth and data/pool/synth.json (in-process, seconds)."""
    write_params(root, smoke_params())
    with cwd(root):
        for command in (["prepare", "synth"], ["features", "synth"], ["pool", "synth"]):
            assert main(command) == 0, command
    return root


def write_params(root: Path, params: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def project(template: Path, dest: Path, **pretrain) -> Path:
    """A copy of the template whose pretrain section is updated with `pretrain` (optim.* as optim={...})."""
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("models", "results"))
    p = yaml.safe_load((dest / "params.yaml").read_text())
    optim = pretrain.pop("optim", {})
    p["pretrain"].update(pretrain)
    p["pretrain"]["optim"].update(optim)
    write_params(dest, p)
    return dest


def ajepa(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ajepa ARGS` as a real process in `root`."""
    return subprocess.run([sys.executable, "-m", "ajepa.cli", *args], cwd=root, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def start(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ajepa.cli", *args], cwd=root, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `condition()` until it holds; fail if `proc` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended first ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def last_line(text: str) -> str:
    """The last line of a process's stderr (progress bars redraw with carriage returns)."""
    return text.replace("\r", "\n").strip().splitlines()[-1]


def logged_steps(root: Path) -> int:
    """Training steps logged so far (DVCLive's loss curve, one row per step with log_every 1)."""
    tsv = root / "results/pretrain/live/plots/metrics/train/loss.tsv"
    return max(0, len(tsv.read_text().splitlines()) - 1) if tsv.exists() else 0
