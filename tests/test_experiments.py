"""`dvc exp` as a researcher uses it, on the smoke preset: a queued probe sweep reuses pretraining and
fine-tuning, a bad `-S` deletes nothing, a one-key `-S` changes one line of params.yaml, a rerun that
computes the same numbers leaves git clean; and the pieces behind them (DVC's params.yaml layout, the
comparison table, the plots, the curves' pruning).

One `dvc repro` serves the pipeline tests (a module fixture); each leaves the workspace as it found it."""

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, TWO_THREADS, copy_project, load_repo_params, run, tree_digest
from sklearn.metrics import average_precision_score

from ajepa.errors import AjepaError
from ajepa.plots import benchmark_bars_figure, pretrain_curves_figure
from ajepa.stages.finetune import plot_tables
from ajepa.stages.report import collect, partial_runs
from ajepa.stages.tracking import prune_live
from ajepa.tools import compare, paramfile

ENV = TWO_THREADS


@pytest.fixture(scope="module")
def project(smoke_run, tmp_path_factory):
    """The smoke run (the repository's params.yaml with `ajepa preset smoke`, `dvc repro`, committed)."""
    return copy_project(smoke_run[0], tmp_path_factory.mktemp("exp") / "project")


def _ran(text: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", text))


def _wait_for_queue(root, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while re.search(r"\b(Queued|Running)\b", run(["dvc", "queue", "status"], root).stdout):
        assert time.monotonic() < deadline, "the queued experiment did not finish"
        time.sleep(2)


@pytest.mark.slow
def test_bytecode_caches_do_not_change_a_code_folders_hash(tmp_path):
    """Stages depend on code folders (ajepa/data, ajepa/models). A used checkout has __pycache__ in them
    and a queued experiment's fresh copy has none: if DVC hashed them, every queued or --temp run would
    see pretraining's dependencies changed and retrain. The project's .dvcignore keeps them out."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("X = 1\n")
    (root / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    (root / "dvc.yaml").write_text(
        "stages:\n  build:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n"
        "    deps: [pkg]\n    outs: [out.txt]\n")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "repro", "-q"], root)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"bytecode")
    (root / "pkg" / "stray.pyc").write_bytes(b"bytecode")
    assert "up to date" in run(["dvc", "status"], root).stdout
    (root / "pkg" / "mod.py").write_text("X = 2\n")  # and a real code change still counts
    assert "modified:" in run(["dvc", "status"], root).stdout


@pytest.mark.slow
def test_a_queued_probe_sweep_reruns_no_pretraining_and_no_fine_tuning(project):
    """A queued run starts from a copy of the git tree plus DVC's cache: every output of an unchanged
    stage is there (the resumable state is no output), so only the probes and the report run. DVC's
    rewrite of params.yaml for `-S` changes the one line of the key."""
    root = project
    run(["dvc", "exp", "run", "--queue", "-n", "probe-iters", "-S", "linear.max_iter=5"], root)
    run(["dvc", "queue", "start", "-j", "1"], root, env=ENV)
    _wait_for_queue(root)
    log = run(["dvc", "queue", "logs", "probe-iters"], root).stdout
    assert _ran(log) == {"check", "linear@synth", "linear@words", "report"}, log
    for stage in ("pretrain", "finetune@synth", "finetune@words", "features@synth"):
        assert f"Stage '{stage}' didn't change, skipping" in log

    [exp] = [r for e in json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
             for x in e.get("experiments") or [] for r in x["revs"] if r["name"] == "probe-iters"]
    diff = run(["git", "diff", "--numstat", "HEAD", exp["rev"], "--", "params.yaml"], root).stdout.split()
    assert diff[:2] == ["1", "1"], diff  # one line out, one line in
    shown = run(["git", "show", f"{exp['rev']}:params.yaml"], root).stdout
    assert "  max_iter: 5                # L-BFGS iterations per strength" in shown  # the comment stays

    table = run(["ajepa", "compare"], root).stdout.splitlines()
    assert all(len(line) <= 120 for line in table), table
    [row] = [line for line in table if line.startswith("probe-iters")]
    assert "linear.max_iter=5" in row and re.search(r"\d+\.\d\*? +\d+\.\d\*?$", row)
    assert run(["git", "status", "--porcelain"], root).stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("setting, named", [
    ("pretrain.optim.lr=abc", "pretrain.optim.lr = 'abc': must be a number"),
    ("pretrain.optim.lr=nan", "pretrain.optim.lr = nan: must be a finite number"),
    ("+linear.bogus=1", "linear.bogus = 1: unknown key"),
])
def test_a_bad_value_fails_before_any_output_is_deleted(project, setting, named):
    """The check stage runs first for every stage: DVC deletes nothing of the others. The two commands
    of docs/pipeline.md put params.yaml and the outputs back."""
    root = project
    before = {d: tree_digest(root / d) for d in ("models", "results")}
    r = run(["dvc", "exp", "run", "-S", setting], root, check=False)
    assert r.returncode != 0 and named in r.stdout + r.stderr, r.stdout + r.stderr
    assert _ran(r.stdout + r.stderr) == {"check"}
    assert {d: tree_digest(root / d) for d in ("models", "results")} == before
    # the committed params.yaml written out (DVC may leave git's index thinking the edited file is
    # unchanged, so `git checkout HEAD -- params.yaml` can do nothing), then the outputs
    (root / "params.yaml").write_text(run(["git", "show", "HEAD:params.yaml"], root).stdout)
    run(["dvc", "checkout"], root)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root).stdout
    run(["git", "reset", "-q"], root)  # what DVC staged (the test's own clean-up)


@pytest.mark.slow
def test_a_key_params_yaml_lacks_is_refused_by_dvc_itself(project):
    r = run(["dvc", "exp", "run", "-S", "linear.bogus=1"], project, check=False)
    assert r.returncode != 0 and not _ran(r.stdout + r.stderr)
    assert run(["git", "status", "--porcelain"], project).stdout == ""


@pytest.mark.slow
def test_a_rerun_with_unchanged_inputs_leaves_git_clean(project):
    """Seconds and samples/s live in logs/timing/, so rerunning every training stage writes the same
    files; the finished pretraining is not trained again and its checkpoint not rewritten."""
    root = project
    checkpoint = root / "models/pretrain_state/checkpoint.pt"
    stamp = (checkpoint.stat().st_mtime_ns, checkpoint.read_bytes())
    for stage in ("pretrain", "linear@synth", "finetune@synth", "report"):
        run(["dvc", "repro", "--force", "--single-item", stage], root, env=ENV)
    assert run(["git", "status", "--porcelain"], root).stdout == ""
    assert (checkpoint.stat().st_mtime_ns, checkpoint.read_bytes()) == stamp
    timing = json.loads((root / "logs/timing/pretrain.json").read_text())
    assert timing["seconds"] >= 0 and timing["samples_per_s"] >= 0 and timing["device"] == "cpu"
    assert "seconds" not in (root / "results/pretrain/metrics.json").read_text()
    assert (root / "logs/timing/pretrain/plots/metrics/train/samples_per_s.tsv").exists()
    assert not (root / "results/pretrain/live/plots/metrics/train/samples_per_s.tsv").exists()


# --- the pieces -----------------------------------------------------------------------------------


def test_params_yaml_is_a_fixed_point_of_dvcs_rewrite(tmp_path):
    """What `dvc exp run -S` does to the keys it does not set (DVC's own function, no override) leaves
    params.yaml as it is; `ajepa params-format` gives DVC's layout from any other."""
    from dvc.utils.hydra import apply_overrides

    text = (REPO / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text)
    apply_overrides(str(path), [])
    assert path.read_text() == text
    assert paramfile.formatted(text) == text
    flow = "a:  # section\n  b: [1, 2.5e-4]   # a list\n  c: null\n  d: {e: null}\n  f: 1.0e-06\n"
    path.write_text(flow)
    apply_overrides(str(path), [])
    assert paramfile.formatted(flow) == path.read_text()
    assert "# a list" in path.read_text()


@pytest.mark.slow
def test_params_format_rewrites_and_checks(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("a: [1, 2]  # kept\n")
    assert run(["ajepa", "--params", str(path), "params-format", "--check"], tmp_path, check=False).returncode == 1
    assert path.read_text() == "a: [1, 2]  # kept\n"
    run(["ajepa", "--params", str(path), "params-format"], tmp_path)
    assert re.fullmatch(r"a: +# kept\n- 1\n- 2\n", path.read_text())
    assert run(["ajepa", "--params", str(path), "params-format", "--check"], tmp_path).returncode == 0


def _rev(rev: str, name, params: dict, summary: dict, error=None) -> dict:
    return {"rev": rev, "name": name, "error": error,
            "data": {"params": {"params.yaml": {"data": params}},
                     "metrics": {"results/summary.json": {"data": summary}}}}


def test_compare_lists_each_experiment_with_its_changes_and_headlines():
    base = {"linear": {"l2": [0.1], "max_iter": 100}, "pretrain": {"optim": {"lr": 0.0005}}}
    summary = {"synth": {"linear": {"accuracy": 59.79, "std": 2.5},
                         "finetune": {"accuracy": 72.92, "runs": "fold1 of 5"}},
               "esc50": {"linear": {"mAP": 40.0}, "finetune": {"mAP": 50.25}}}
    commit = _rev("a" * 40, "main", base, summary)
    commit["experiments"] = [
        {"name": "long", "revs": [_rev("b" * 40, "long", {**base, "linear": {"l2": [1.0, 0.1, 0.01] * 20,
                                                                             "max_iter": 50}}, summary)]},
        {"name": "broken", "revs": [_rev("c" * 40, "broken", {}, {}, {"type": "X", "msg": "no metrics"})]}]
    table = compare.render(compare.table_rows([_rev("workspace", None, base, summary), commit]))
    lines = table.splitlines()
    assert all(len(line) <= 120 for line in lines)
    assert lines[0].split()[-4:] == ["synth", "lin/fin", "esc50", "lin/fin"]
    assert lines[1].startswith("workspace") and "(no change)" in lines[1]
    assert re.search(r" 59\.8 72\.9\* +40\.0 50\.2$", lines[1])  # linear and fine-tuning; partial starred
    assert lines[2].startswith("main") and "(commit)" in lines[2]
    assert lines[3].startswith("long") and "linear.l2=[1.0,0.1,0.01," in lines[3] and "..." in lines[3]
    assert lines[4].startswith("broken") and "failed: no metrics" in lines[4]
    assert lines[-1].startswith("* over fewer protocol runs")
    with pytest.raises(AjepaError, match="2 benchmarks do not fit 50 columns"):
        compare.render(compare.table_rows([commit]), width=50)


def test_partial_fine_tuning_is_marked_in_the_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from ajepa.atomic import write_json
    from ajepa.config import parse_params
    linear = {"metric": "accuracy", "protocol": "folds", "classes": 3,
              "linear": {"accuracy": 60.0, "runs": [{"split": f"fold{i}", "accuracy": 60.0} for i in (1, 2, 3)]}}
    finetune = {"metric": "accuracy", "protocol": "folds", "classes": 3,
                "finetune": {"accuracy": 70.0, "runs": [{"split": "fold1", "accuracy": 70.0}]}}
    params = load_repo_params()
    params["pipeline"]["benchmarks"] = ["synth"]
    write_json(tmp_path / "results/linear/synth/metrics.json", linear)
    write_json(tmp_path / "results/finetune/synth/metrics.json", finetune)
    summary, _ = collect(parse_params(params))
    assert summary["synth"]["finetune"]["runs"] == "fold1 of 3" and "runs" not in summary["synth"]["linear"]
    assert partial_runs({"a": {"fold1": 1.0, "fold2": 2.0}, "b": {"fold1": 1.0, "fold2": 2.0}}) == {}


def test_pretraining_figure_draws_the_position_only_floor(tmp_path):
    for name, values in (("loss", [1.0, 0.5]), ("position_only_loss", [float("nan"), 0.8])):
        pd.DataFrame({"step": [0, 1], name: values}).to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
    fig = pretrain_curves_figure(tmp_path)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["A-JEPA", "position only"]


def test_bar_charts_promise_the_paper_only_where_it_has_numbers():
    rows = {"linear": {"accuracy": 60.0}, "finetune": {"accuracy": 70.0, "runs": "fold1 of 5"}}
    ax = benchmark_bars_figure("synth", rows, "accuracy", {}).axes[0]
    assert "paper" not in ax.get_title() and len(ax.patches) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["linear", "finetune\n(fold1 of 5)"]
    ax = benchmark_bars_figure("esc50", rows, "accuracy", {"A-JEPA (paper)": 96.3}).axes[0]
    assert "paper (orange)" in ax.get_title() and len(ax.patches) == 3


def test_per_class_ap_of_a_single_label_set_is_each_class_against_the_rest():
    from types import SimpleNamespace
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    scores = rng.random((8, 3))
    task = SimpleNamespace(classes=["a", "b", "c"], multi_label=False, y=y)
    records = [{"test_positions": list(range(8)), "test_scores": scores.tolist()}]
    table = plot_tables(task, records)["per_class_ap.csv"]
    expected = {c: round(100 * average_precision_score(y == k, scores[:, k]), 3) for k, c in enumerate("abc")}
    assert dict(zip(table["class"], table["ap"])) == expected
    assert list(table["ap"]) == sorted(table["ap"], reverse=True)


def test_pruning_the_curves_keeps_logged_nans_and_drops_cut_rows(tmp_path):
    folder = tmp_path / "plots" / "metrics"
    folder.mkdir(parents=True)
    (folder / "floor.tsv").write_text("step\tfloor\n0\tnan\n1\t0.5\n2\t0.4\n3\n")
    prune_live(tmp_path, 3)
    assert (folder / "floor.tsv").read_text() == "step\tfloor\n0\tnan\n1\t0.5\n2\t0.4\n"
    prune_live(tmp_path, 2)
    assert (folder / "floor.tsv").read_text() == "step\tfloor\n0\tnan\n1\t0.5\n"
