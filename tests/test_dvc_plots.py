"""The fine-tuning plots are data DVC draws (and `dvc plots diff` compares), and every number reaches
`dvc exp show` once."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import load_repo_params, make_project_copy, run

from ajepa.atomic import write_csv, write_json
from ajepa.stages.finetune import plot_tables

CLASSES = ["bark", "rain", "siren"]


def single_label_records():
    task = SimpleNamespace(classes=CLASSES, multi_label=False, y=np.array([0, 1, 2, 2, 1]))
    # run 1 tests clips 0-2, run 2 clips 3-4; clip 2 is taken for a bark, clip 4 for a siren
    records = [{"test_positions": [0, 1, 2], "test_scores": [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]]},
               {"test_positions": [3, 4], "test_scores": [[0.0, 0.1, 0.9], [0.1, 0.3, 0.6]]}]
    return task, records


def multi_label_records():
    task = SimpleNamespace(classes=CLASSES, multi_label=True)
    # "rain" has no test positive in either run (None): left out, not drawn as zero
    records = [{"test": {"per_class_ap": [80.0, None, 40.0]}}, {"test": {"per_class_ap": [60.0, None, 50.0]}}]
    return task, records


def test_confusion_pairs_are_the_argmax_of_every_run():
    tables = plot_tables(*single_label_records())
    assert tables["confusion.csv"].to_dict("records") == [
        {"actual": "bark", "predicted": "bark"}, {"actual": "rain", "predicted": "rain"},
        {"actual": "siren", "predicted": "bark"}, {"actual": "siren", "predicted": "siren"},
        {"actual": "rain", "predicted": "siren"}]
    # AP of each class against the rest, from the same scores (every class ranked its test positives first):
    # the per-class plot has data for single-label sets too
    assert tables["per_class_ap.csv"].to_dict("records") == [{"class": c, "ap": 100.0} for c in CLASSES]


def test_per_class_ap_is_the_mean_over_runs_best_first():
    tables = plot_tables(*multi_label_records())
    assert tables["per_class_ap.csv"].to_dict("records") == [{"class": "bark", "ap": 70.0},
                                                             {"class": "siren", "ap": 45.0}]
    assert tables["confusion.csv"].empty and list(tables["confusion.csv"].columns) == ["actual", "predicted"]


def plot_data(shown: dict, path: str) -> list[dict]:
    [plot] = shown["data"][path]
    return plot["content"]["data"]["values"]


@pytest.mark.slow
def test_dvc_draws_the_tables_and_shows_each_metric_once(tmp_path):
    params = load_repo_params()
    root = make_project_copy(tmp_path / "p", params)
    single, multi = single_label_records(), multi_label_records()
    for bench, (task, records) in zip(params["pipeline"]["benchmarks"], [single, multi]):
        for name, table in plot_tables(task, records).items():
            write_csv(root / "results" / "finetune" / bench / name, table)
        write_json(root / "results" / "finetune" / bench / "metrics.json", {"finetune": {"accuracy": 50.0}})
        write_json(root / "results" / "finetune" / bench / "live" / "pretrained-fold1" / "metrics.json", {"step": 3})
    write_json(root / "results" / "summary.json", {"synth": {"finetune": {"accuracy": 50.0}}})

    shown = json.loads(run(["dvc", "plots", "show", "--json"], root).stdout)
    synth, words = params["pipeline"]["benchmarks"][:2]
    values = plot_data(shown, f"results/finetune/{synth}/confusion.csv")
    assert [(v["actual"], v["predicted"]) for v in values] == [("bark", "bark"), ("rain", "rain"), ("siren", "bark"),
                                                               ("siren", "siren"), ("rain", "siren")]
    [confusion] = shown["data"][f"results/finetune/{synth}/confusion.csv"]
    assert '"field": "actual"' in json.dumps(confusion["content"]) and "rect" in json.dumps(confusion["content"])
    assert [v["class"] for v in plot_data(shown, f"results/finetune/{words}/per_class_ap.csv")] == ["bark", "siren"]
    assert [v["class"] for v in plot_data(shown, f"results/finetune/{synth}/per_class_ap.csv")] == CLASSES
    # bars from 0: with DVC's own axis (from the smallest value) three APs of 100 would draw three empty bars
    [ap_plot] = shown["data"][f"results/finetune/{synth}/per_class_ap.csv"]
    assert ap_plot["content"]["encoding"]["x"]["scale"] == {"zero": True}
    # DVCLive's run summaries are not read as plots
    assert not [e for e in shown.get("errors", []) if e["name"].endswith("metrics.json")], shown["errors"]

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = {f for rev in metrics.values() for f in rev["data"]}
    # the benchmark stages' metrics.json files (per-run detail) are not metrics: summary.json has their numbers
    assert files == {"results/summary.json", "results/pretrain/metrics.json"}
