"""On a real single-node SLURM cluster (tests/slurm_cluster.py, started once for the session): the SLURM
profile runs the smoke pipeline through sbatch, and a pretraining job cut by its time limit resumes
to the weights of an uninterrupted run. Without root or the Debian packages the tests skip, saying so."""

import copy
import os
import re
import shutil

import pytest
import torch
import yaml
from conftest import REPO, make_project_copy, run, tiny_params
from slurm_cluster import Cluster, unavailable


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()
    assert c.running() == []


def scaled_profile(profile: dict) -> dict:
    """workflow/profiles/slurm sized for a small node: the same jobs, keys and settings, with every job
    cut to 1 GB, 10 minutes and one core (so that two jobs run side by side on two cores), no GPUs, and
    the plugin's first status check after 1 s instead of its default 40 s."""
    p = copy.deepcopy(profile)
    p.update({"latency-wait": 5, "slurm-init-seconds-before-status-checks": 1})
    for res in [p["default-resources"], *p["set-resources"].values()]:
        res.update(mem_mb=1000, runtime=10)
        if "cpus_per_task" in res:
            res["cpus_per_task"] = 1
        if "gpu" in res:
            res["gpu"] = 0  # the CPU path of each stage
    return p


def _profile(dest):
    dest.mkdir(parents=True)
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/profile.yaml").read_text())
    (dest / "profile.yaml").write_text(yaml.safe_dump(scaled_profile(profile), sort_keys=False))
    return dest


def _jobs(cluster) -> dict[str, list[dict]]:
    """Every job the cluster has accounted, by rule (the plugin's comment `rule_NAME...`)."""
    out = cluster.run("sacct", "-n", "-X", "-P", "-S", "now-1days", "-o", "JobID,State,NNodes,ReqCPUS,Comment").stdout
    jobs: dict[str, list[dict]] = {}
    for line in out.splitlines():
        job_id, state, nodes, cpus, comment = line.split("|", 4)
        rule = re.match(r"rule_([a-z]+)", comment)
        jobs.setdefault(rule.group(1) if rule else comment, []).append(
            {"id": job_id, "state": state, "nodes": int(nodes), "cpus": int(cpus)})
    return jobs


@pytest.mark.slow
def test_slurm_profile_runs_the_smoke_pipeline_through_sbatch(cluster, tmp_path):
    root = make_project_copy(tmp_path / "copy", tiny_params())
    profile = _profile(tmp_path / "profile")
    r = run(["snakemake", "--profile", str(profile)], root, env=cluster.env, timeout=900)
    out = r.stdout + r.stderr
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", out)
    # every job but `all`: check; prepare, features, pool x 2; pretrain; linear, finetune x 2; report
    assert len(submitted) == 13, out
    jobs = {rule: [j for j in js if j["id"] in submitted] for rule, js in _jobs(cluster).items()}
    assert {rule: len(js) for rule, js in jobs.items() if js} == {
        "check": 1, "prepare": 2, "features": 2, "pool": 2, "pretrain": 1, "linear": 2, "finetune": 2, "report": 1}
    assert all(j["state"] == "COMPLETED" for js in jobs.values() for j in js), jobs
    assert (jobs["pretrain"][0]["nodes"], jobs["pretrain"][0]["cpus"]) == (1, 1)  # the profile's nodes: 1
    assert (root / "results/report.md").exists() and (root / "models/pretrain/context").is_dir()
    assert "steps" in (root / "results/pretrain/metrics.json").read_text()
    assert "Nothing to be done" in run(["snakemake", "--cores", "1", "--dry-run"], root).stdout


# A run far longer than the test, so that only the time limit ends the first job; the comparison is at
# a step both runs reach with --stop-after (a checkpoint holds the whole state of the run).
LONG_RUN = {"datasets": ["synth"], "checkpoint_every": 500, "log_every": 100, "probe": {"every": 0}}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # float sums depend on the thread count: the same in both runs


@pytest.fixture(scope="module")
def pooled_copies(tmp_path_factory):
    """Two copies of the project with the synthetic pool's features built (locally), for a long run."""
    params = tiny_params()
    params["pipeline"]["datasets"] = ["synth"]
    for key, value in LONG_RUN.items():
        params["pretrain"][key] = {**params["pretrain"][key], **value} if isinstance(value, dict) else value
    params["pretrain"]["optim"]["epochs"] = 10000
    first = make_project_copy(tmp_path_factory.mktemp("cut"), params)
    run(["snakemake", "--cores", "2", "data/pool/synth.json"], first)
    second = tmp_path_factory.mktemp("reference") / "copy"
    shutil.copytree(first, second, symlinks=True)
    return first, second


def _checkpoint(root):
    return torch.load(root / "models/pretrain_state/checkpoint.pt", map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_pretraining_cut_by_the_time_limit_resumes_to_the_uninterrupted_weights(cluster, pooled_copies):
    cut, reference = pooled_copies
    def sbatch(limit_min: int, command: str) -> str:
        return cluster.run("sbatch", "--parsable", f"--time={limit_min}", "--cpus-per-task=1", "--mem=1000",
                           f"--chdir={cut}", f"--output={cut}/slurm-%j.log", "--wrap", command,
                           env=ONE_THREAD).stdout.strip()

    # the limit is 1 minute, and slurmctld checks limits every 30 s: SIGTERM comes 60 to 90 s after the
    # start. Sleeping the first 40 s keeps the run (and the uninterrupted one it is compared with) short.
    job = sbatch(1, "sleep 40; exec ajepa pretrain")
    assert cluster.wait_job(job, timeout=180) == "TIMEOUT"
    log = (cut / f"slurm-{job}.log").read_text()
    stopped = re.search(r"stopped by SIGTERM after step (\d+): checkpoint \S+ saved", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 0 < step == _checkpoint(cut)["step"]  # saved at the end of the last finished step

    job = sbatch(5, "exec ajepa pretrain --stop-after 3")
    run(["ajepa", "pretrain", "--stop-after", str(step + 3)], reference, env={**os.environ, **ONE_THREAD})
    assert cluster.wait_job(job, timeout=180) == "COMPLETED"
    assert f"from step {step}, {step + 3} done" in (cut / f"slurm-{job}.log").read_text()
    resumed, uninterrupted = _checkpoint(cut), _checkpoint(reference)
    assert resumed["step"] == uninterrupted["step"] == step + 3
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
