"""The report's quality bars and its learning-curve table, on hand-made stage results."""

import pandas as pd

from ajepa.stages.report import checks


def _info(runs: dict) -> dict:
    return {"metric": "accuracy", "runs": runs}


def test_bars_are_met_or_missed_by_their_margins():
    rows = {"linear": {"accuracy": 70.0}, "linear_random_init": {"accuracy": 61.0},
            "fbank_baseline": {"accuracy": 60.0}, "finetune": {"accuracy": 75.0},
            "finetune_random_init": {"accuracy": 60.0}}
    runs = {k: {"fold1": v["accuracy"]} for k, v in rows.items()}
    lines = checks("synth", rows, _info(runs))
    assert len(lines) == 4
    assert "random-init encoder, linear probe: 70.00 vs 61.00 (+9.00 points; bar: at least +10; MISSED)" in lines[0]
    assert "+10.00 points; bar: at least +3; met" in lines[1]
    assert "A-JEPA, fine-tuned vs A-JEPA, linear probe: 75.00 vs 70.00" in lines[2] and lines[2].endswith("met)")
    # the spoken words ask for +5 over random init, not +10
    assert checks("words", rows, _info(runs))[0].endswith("bar: at least +5; met)")
    # a benchmark without its own bars is held to "at least level"
    assert all("at least level" in line for line in checks("esc50", rows, _info(runs)))


def test_fine_tuning_on_some_folds_is_compared_with_the_probe_on_the_same_folds():
    rows = {"linear": {"accuracy": 60.0}, "finetune": {"accuracy": 62.0}}
    runs = {"linear": {"fold1": 70.0, "fold2": 50.0, "fold3": 60.0}, "finetune": {"fold1": 62.0}}
    (line,) = checks("esc50", rows, _info(runs))
    assert "on the runs both have (fold1): 62.00 vs 70.00 (-8.00 points" in line and "MISSED" in line


def test_learning_curve_table(tmp_path):
    from conftest import REPO

    from ajepa.config import load_params
    from ajepa.plots import learning_curves
    from ajepa.stages.report import render
    for encoder, values in (("target", [50.0, 61.5]), ("context", [48.0, 55.25])):
        d = tmp_path / "probe" / "synth"
        d.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": [99, 199], encoder: values}).to_csv(d / f"{encoder}.tsv", sep="\t", index=False)
    curves = learning_curves(tmp_path)
    assert list(curves) == ["synth/context", "synth/target"] and curves["synth/target"].to_dict() == {99: 50.0,
                                                                                                     199: 61.5}
    pretrain = {"steps": 200, "seconds": 10.0, "final_loss": 0.1, "samples_per_s": 50, "device": "cpu",
                "world_size": 1, "target_rank": 20.0}
    text = render({}, {}, pretrain, curves, load_params(REPO / "params.yaml"))
    assert "| step | synth, context encoder | synth, target encoder |" in text
    assert "| 99 | 48.0 | 50.0 |" in text and "| 199 | 55.2 | 61.5 |" in text
