"""One command uses every device: `ajepa pretrain` starts its own processes (torch's elastic launcher),
and a process that torchrun or srun started does not start any."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, load_repo_params, make_project_copy, parse_dry_run, pool_features, run, tiny_params

from ajepa.config import parse_params
from ajepa.errors import ConfigError
from ajepa.export import read_export
from ajepa.train.distributed import launched, local_processes

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "GROUP_RANK")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """32 one-second synthetic clips as features (96 x 128, a 6 x 8 patch grid)."""
    root = tmp_path_factory.mktemp("features")
    return pool_features(root, root / "features", seed=5, clips=32)


def _project(root, store_dir, processes):
    shutil.copytree(store_dir, root / "data/features/synth")
    p = tiny_params()
    p["pretrain"]["optim"]["epochs"] = 1
    p["pretrain"]["datasets"] = ["synth"]
    p["distributed"]["processes"] = processes
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    return root


def _outputs(root) -> dict:
    return {p.relative_to(root).as_posix(): p for d in ("models", "results") for p in (root / d).rglob("*")
            if p.is_file()}


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES} | {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU")
def test_pretrain_launches_its_own_processes_and_matches_one(store_dir, tmp_path):
    """`ajepa pretrain` with distributed.processes = 2 starts two gloo processes by itself; rank 0 alone
    writes, the same files as one process, with the weights one process with the whole batch gets."""
    results = {}
    for name, processes in (("single", 1), ("ddp", 2)):
        root = _project(tmp_path / name, store_dir, processes)
        env = _clean_env()
        subprocess.run([sys.executable, "-m", "ajepa.cli", "pool", "synth"], cwd=root, check=True, env=env,
                       capture_output=True)
        r = subprocess.run([sys.executable, "-m", "ajepa.cli", "pretrain"], cwd=root, capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        results[name] = (root, r.stdout)
    (one, out1), (two, out2) = results["single"], results["ddp"]
    assert "with 2 process(es)" in out2 and "with 1 process(es)" in out1
    assert out2.count("pretrain: ") == 1  # only rank 0 reports
    assert set(_outputs(one)) == set(_outputs(two))
    m1, m2 = (json.loads((r / "results/pretrain/metrics.json").read_text()) for r in (one, two))
    assert (m1["world_size"], m2["world_size"], m1["steps"], m2["steps"]) == (1, 2, 4, 4)
    assert math.isclose(m1["final_loss"], m2["final_loss"], rel_tol=1e-4)
    for which in ("context", "target"):
        _, w1, c1 = read_export(one / f"models/pretrain/{which}")
        _, w2, c2 = read_export(two / f"models/pretrain/{which}")
        assert c1["architecture"] == c2["architecture"] and set(w1) == set(w2)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), (which, k)


@pytest.mark.slow
def test_a_failure_in_a_launched_process_is_one_line(store_dir, tmp_path):
    """A global batch that does not split over the processes fails in them; the parent says so in one line."""
    root = _project(tmp_path, store_dir, 3)
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "ajepa.cli", "pool", "synth"], cwd=root, check=True, env=env,
                   capture_output=True)
    r = subprocess.run([sys.executable, "-m", "ajepa.cli", "pretrain"], cwd=root, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last == "ajepa pretrain: error: pretrain.optim.batch_size = 8: not divisible by the 3 processes"
    assert not (root / "models/pretrain/context/model.safetensors").exists()


def test_process_count(monkeypatch):
    for var in LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert not launched()
    assert local_processes(3) == 3
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert local_processes("auto") == gpus
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 6)
    assert local_processes("auto") == 6
    assert local_processes("auto", global_batch=16) == 4  # the largest count that splits the batch
    assert local_processes("auto", global_batch=7) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()  # torchrun started this one: the stage runs its part and launches nothing


@pytest.mark.parametrize("value, message", [(0, "distributed.processes = 0: must be 'auto' or a positive"),
                                            ("all", "distributed.processes = 'all': must be one of 'auto'")])
def test_bad_process_count_is_one_line(value, message):
    p = tiny_params()
    p["distributed"]["processes"] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(p)


@pytest.mark.slow
def test_multinode_profile_runs_pretraining_under_srun_and_torchrun(tmp_path):
    """The multi-node SLURM profile, rendered by a dry run: one torchrun per node under srun, meeting at a
    c10d rendezvous on the job's first node, around dvc.yaml's own command; and the sbatch line the
    plugin builds for it. Everything else is the one-node profile's."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    one, multi = (yaml.safe_load((REPO / f"workflow/profiles/{name}/profile.yaml").read_text())
                  for name in ("slurm", "slurm-multinode"))
    assert multi["set-resources"].pop("pretrain") != one["set-resources"].pop("pretrain") and one == multi
    root = make_project_copy(tmp_path / "copy", load_repo_params())
    out = run(["snakemake", "--profile", "workflow/profiles/slurm-multinode", "--dry-run", "--forceall"], root).stdout
    job = next(j for j in parse_dry_run(out) if j["rule"] == "pretrain")
    resources = dict(kv.split("=", 1) for kv in job["resources"].split(", "))
    assert (resources["nodes"], resources["gpu"], resources["mpi"]) == ("2", "16", "srun")
    shell = job["shell"]
    assert shell.startswith("srun --nodes 2 --ntasks-per-node 1 ")
    assert " torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id \"$SLURM_JOB_ID\" --rdzv_backend c10d " in shell
    assert '--rdzv_endpoint "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":29500' in shell
    assert shell.endswith(f"--no-python ajepa pretrain 2> {job['log']}")  # dvc.yaml's command

    class Resources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=Resources({k: int(v) if v.isdigit() else v for k, v in resources.items()
                                               if k in ("nodes", "gpu", "mpi", "tasks_per_node", "cpus_per_task",
                                                        "mem_mb", "runtime")}), threads=1, name="pretrain",
                          wildcards={})
    sbatch = get_submit_command(job, dict(run_uuid="u", slurm_logfile="l", comment_str="rule_pretrain", account="",
                                          partition="", workdir=str(root))) + set_gres_string(job)
    for flag in ("--nodes=2", "--gpus=16", "--ntasks-per-node=8", "--cpus-per-task=8"):
        assert flag in sbatch, (flag, sbatch)
