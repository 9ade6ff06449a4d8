"""`ajepa ablate`: the paper's ablations as queued DVC experiments (every -S key one params.yaml has,
every value one the stages accept), and their table of mean and range over seeds."""

import json
import re
import shlex
import shutil

import pytest
from conftest import REPO, load_repo_params, run
from test_experiments import ENV, project  # noqa: F401 (the smoke run, committed: a fixture)

from ajepa.cli import main
from ajepa.errors import AjepaError
from ajepa.tools import ablate, compare


def _commands(capsys, *argv) -> list[list[str]]:
    assert main(["--params", str(REPO / "params.yaml"), "ablate", "--dry-run", *argv]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def _settings(command: list[str]) -> dict:
    return dict(command[i + 1].split("=", 1) for i, a in enumerate(command) if a == "-S")


def test_dry_run_lists_every_variant_for_every_seed_with_keys_params_yaml_has(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # presets/ is found from the repository root
    commands = _commands(capsys, "--seeds", "2")
    names = [c[c.index("-n") + 1] for c in commands]
    assert names == [f"abl-{v}-s{s}" for v in ("mask-curriculum", "mask-block", "mask-tf", "mask-inverse",
                                                "regmask-0", "regmask-0.1", "regmask-0.3") for s in (0, 1)]
    assert all(c[:4] == ["dvc", "exp", "run", "--queue"] for c in commands)
    keys = set(compare.flatten(load_repo_params()))
    for command in commands:
        assert set(_settings(command)) <= keys, command
    assert _settings(commands[5]) == {"pretrain.masking.mode": "tf", "pretrain.seed": "1"}
    benches = load_repo_params()["pipeline"]["benchmarks"]
    assert _settings(commands[11]) == {**{f"finetune.{b}.key_mask_ratio": "0.1" for b in benches},
                                      **{f"finetune.{b}.seed": "1" for b in benches}}
    # a preset's values come first, as overrides; the variant's and the seed's last
    [smoke] = _commands(capsys, "--seeds", "1", "--variants", "mask-tf", "--preset", "smoke")
    settings = _settings(smoke)
    assert settings["pretrain.encoder.embed_dim"] == "32" and list(settings)[-2:] == ["pretrain.masking.mode",
                                                                                      "pretrain.seed"]
    assert settings["datasets.words.prepare.speakers"] == "[2,1,1]"


@pytest.mark.parametrize("argv, named", [
    (["--set", "pretrain.optim.bogus=1"], "pretrain.optim.bogus: not a key of params.yaml"),
    (["--set", "pretrain.optim.lr=abc"], "pretrain.optim.lr = 'abc': must be a number"),
    (["--variants", "mask-tf,nope"], "--variants nope: unknown"),
])
def test_a_bad_setting_is_one_line_and_queues_nothing(capsys, argv, named):
    assert main(["--params", str(REPO / "params.yaml"), "ablate", "--dry-run", *argv]) == 2
    out = capsys.readouterr()
    assert out.out == "" and named in out.err and len(out.err.strip().splitlines()) == 1, out.err


def _exp(name, summary, error=None, state="success"):
    return {"name": name, "executor": {"state": state}, "revs": [{"rev": "f" * 40, "name": name, "error": error,
                                    "data": {"metrics": {"results/summary.json": {"data": summary}}}}]}


def test_the_table_has_the_mean_and_range_over_seeds_and_lists_failed_runs():
    def summary(linear, finetune):
        return {"synth": {"linear": {"accuracy": linear, "std": 1.0}, "finetune": {"accuracy": finetune}},
                "esc50": {"linear": {"mAP": linear / 2}}}
    shown = [{"rev": "workspace"}, {"rev": "a" * 40, "experiments": [
        _exp("abl-mask-tf-s0", summary(60.0, 70.0)), _exp("abl-mask-tf-s1", summary(64.0, 74.5)),
        _exp("abl-regmask-0-s0", summary(61.0, 72.0)), _exp("probe-iters", summary(1.0, 1.0)),
        _exp("abl-mask-block-s2", {}, {"type": "X", "msg": "pretrain failed"})]}]
    found, problems = ablate.collect(shown)
    assert set(found) == {"mask-tf", "regmask-0"} and sorted(found["mask-tf"]) == [0, 1]
    assert problems == ["abl-mask-block-s2: failed: pretrain failed"]
    lines = ablate.table(found, problems).splitlines()
    assert lines[0] == ("| variant | sets | seeds | synth linear probe | synth fine-tuned | esc50 linear probe | "
                        "esc50 fine-tuned |")
    assert lines[2] == "| mask-tf | `pretrain.masking.mode=tf` | 0, 1 | 62.0 (60.0-64.0) | 72.2 (70.0-74.5) | " \
                       "31.0 (30.0-32.0) | - |"
    assert lines[3].startswith("| regmask-0 | `finetune.BENCH.key_mask_ratio=0.0` | 0 | 61.0 | 72.0 |")
    assert lines[-1] == "- not in the table: abl-mask-block-s2: failed: pretrain failed"


def test_a_run_still_queued_or_running_is_not_a_row():
    """`dvc exp show` gives a running experiment the metrics of its commit until it finishes: counted, they
    would enter the table as that seed's result."""
    commit = {"synth": {"linear": {"accuracy": 57.7}, "finetune": {"accuracy": 54.2}}}
    shown = [{"rev": "a" * 40, "experiments": [
        _exp("abl-mask-block-s0", commit), _exp("abl-mask-block-s1", commit, state="running"),
        _exp("abl-mask-block-s2", {}, state="queued")]}]
    found, problems = ablate.collect(shown)
    assert sorted(found["mask-block"]) == [0]
    assert problems == ["abl-mask-block-s1: running, not finished", "abl-mask-block-s2: queued, not finished"]


def test_a_failed_attempt_queued_again_and_finished_is_a_row_not_a_problem():
    """A worker killed mid-run leaves a failed experiment; queued again under the same name and finished, the
    name has two entries in `dvc exp show`, and the failed one shows its commit's metrics."""
    commit, own = {"synth": {"linear": {"accuracy": 57.7}}}, {"synth": {"linear": {"accuracy": 61.3}}}
    failed = {"type": "", "msg": "Experiment run failed"}
    shown = [{"rev": "a" * 40, "experiments": [
        _exp("abl-mask-tf-s0", own), _exp("abl-mask-tf-s0", commit, failed, state="failed"),
        _exp("abl-mask-tf-s1", commit, failed, state="failed")]}]
    found, problems = ablate.collect(shown)
    assert found == {"mask-tf": {0: own}}
    assert problems == ["abl-mask-tf-s1: failed: Experiment run failed"]


def test_the_table_goes_between_the_markers(tmp_path):
    doc = tmp_path / "experiments.md"
    doc.write_text("# Log\nbefore\n")
    with pytest.raises(AjepaError, match="experiments.md: no ablation markers"):
        ablate.replace_between_markers(doc, "| a |\n")
    doc.write_text(f"before\n{ablate.MARKERS[0]}\nold table\n{ablate.MARKERS[1]}\nafter\n")
    ablate.replace_between_markers(doc, "| new |\n")
    assert doc.read_text() == f"before\n{ablate.MARKERS[0]}\n| new |\n{ablate.MARKERS[1]}\nafter\n"


# PROCESS-STARTING: a smoke `dvc repro` (the module fixture) and a DVC queue worker running one experiment
@pytest.mark.slow
def test_a_queued_ablation_runs_and_its_table_reaches_the_docs_and_the_report(project):  # noqa: F811
    root = project
    shutil.copytree(REPO / "docs", root / "docs")
    r = run(["ajepa", "ablate", "--run", "--seeds", "1", "--variants", "regmask-0.3"], root, env=ENV)
    assert "ablate: 1 of 1 runs finished" in r.stdout, r.stdout
    table = (root / "results/ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| regmask")]
    assert [row.split(" | ")[0] for row in rows] == ["| regmask-0.3"]
    for row in rows:  # every benchmark's probe and fine-tuned cell is a number (one seed: no range)
        assert all(re.fullmatch(r"\d+\.\d", cell) for cell in row.strip("| ").split(" | ")[3:]), row
    doc = (root / "docs/experiments.md").read_text()
    assert f"{ablate.MARKERS[0]}\n{table}{ablate.MARKERS[1]}" in doc
    # the probes did not rerun: only fine-tuning (and the report) changed
    log = run(["dvc", "queue", "logs", "abl-regmask-0.3-s0"], root).stdout
    assert "Stage 'pretrain' didn't change, skipping" in log and "Stage 'linear@synth' didn't change" in log
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    names = {name for name, _ in compare.experiments(shown)}
    assert "abl-regmask-0.3-s0" in names
    run(["ajepa", "report"], root)
    report = (root / "results/report.md").read_text()
    assert "## Ablations" in report and rows[0] in report
