"""Evaluation protocols and the linear probe on hand-made embeddings: which clips train, select and
score, and that nothing about the test clips steers the choice."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from ajepa.config import load_params
from ajepa.downstream.linear import AttentiveProbe, evaluate_embeddings, evaluate_tokens, fit_attentive, fit_probe
from ajepa.downstream.protocols import Task, eval_splits
from ajepa.errors import AjepaError
from ajepa.models import pool_tokens

LINEAR = load_params(REPO / "params.yaml").linear
L2 = LINEAR.l2


def _folds_index(n_folds=5, per_fold=7):
    return pd.DataFrame({"clip_id": [f"c{i}" for i in range(n_folds * per_fold)],
                         "fold": np.repeat(np.arange(1, n_folds + 1), per_fold)})


def test_folds_never_share_a_clip_and_test_each_clip_once():
    index = _folds_index()
    splits = eval_splits(index, "folds")
    assert [s.name for s in splits] == [f"fold{k}" for k in range(1, 6)]
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested) == list(range(len(index)))  # every clip is a test clip exactly once
    for k, s in enumerate(splits, start=1):
        parts = [set(s.train), set(s.val), set(s.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(range(len(index)))
        assert set(index["fold"].to_numpy()[s.test]) == {k}
        assert set(index["fold"].to_numpy()[s.val]) == {k % 5 + 1}
        assert k not in set(index["fold"].to_numpy()[s.train])


def test_protocol_errors_are_one_line():
    with pytest.raises(AjepaError, match="at least 3 folds"):
        eval_splits(_folds_index(n_folds=2), "folds")
    index = pd.DataFrame({"clip_id": ["a", "b"], "split": ["train", "test"]})
    with pytest.raises(AjepaError, match="none in val"):
        eval_splits(index, "splits")


def _task(y: torch.Tensor, protocol: str, classes: int, index: pd.DataFrame) -> Task:
    return Task("hand", protocol, [f"k{i}" for i in range(classes)], torch.empty(0), y, index,
                eval_splits(index, protocol), store=None)


def _single_label_case(seed=0, n=240, classes=4, dim=16, signal=1.5):
    """Four clusters (train, val and test drawn alike); signal=0: labels unrelated to the embeddings."""
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 4))
    y = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, dim)) * signal
    emb = (centers[y] + rng.normal(size=(n, dim))).astype(np.float32)
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})
    return emb, torch.as_tensor(y), index


def test_strength_selection_looks_at_validation_only():
    emb, y, index = _single_label_case()
    task = _task(y, "splits", 4, index)
    split = task.splits[0]
    first = fit_probe(task, emb, split, L2)
    assert first["accuracy"] > 60 and first["val_accuracy"] > 60 and first["l2"] in L2
    # the test labels change: the chosen strength and its validation score stay the same
    y2 = y.clone()
    y2[split.test] = (y[split.test] + 1) % 4
    second = fit_probe(_task(y2, "splits", 4, index), emb, split, L2)
    assert (second["l2"], second["val_accuracy"]) == (first["l2"], first["val_accuracy"])
    assert second["accuracy"] < 40 < first["accuracy"]
    # the validation labels change: so does the validation score the choice rests on
    y3 = y.clone()
    y3[split.val] = (y[split.val] + 1) % 4
    third = fit_probe(_task(y3, "splits", 4, index), emb, split, L2)
    assert third["val_accuracy"] < 40


def test_weaker_l2_fits_the_training_clips_closer():
    """The grid spans under- to over-regularised fits: on pure noise the weakest strength memorises the
    training clips and the validation set then prefers a strong one (nothing generalises)."""
    emb, y, index = _single_label_case(signal=0.0, dim=64)
    task = _task(y, "splits", 4, index)
    split = task.splits[0]
    train_acc = {}
    for l2 in (10.0, 1e-4):
        r = fit_probe(_task(y, "splits", 4, index), emb,
                      type(split)(split.name, split.train, split.val, split.train), [l2])  # score the train clips
        train_acc[l2] = r["accuracy"]
    assert train_acc[1e-4] > 95 and train_acc[10.0] < train_acc[1e-4] - 20


def test_folds_probe_gives_mean_and_std_over_folds():
    emb, y, _ = _single_label_case()
    index = _folds_index(per_fold=48)
    summary = evaluate_embeddings(_task(y, "folds", 4, index), emb, LINEAR)
    assert all(r["l2"] in L2 for r in summary["runs"])
    runs = [r["accuracy"] for r in summary["runs"]]
    assert len(runs) == 5 and summary["accuracy"] == pytest.approx(np.mean(runs), abs=0.01)
    assert summary["std"] == pytest.approx(np.std(runs), abs=0.01)


def test_multilabel_probe_reports_map_mauc_and_d_prime():
    rng = np.random.default_rng(0)
    n, classes, dim = 300, 5, 12
    y = (rng.random((n, classes)) < 0.3).astype(np.float32)
    y[:, 4] = 0.0  # a class with no positives anywhere: skipped by mAP and mAUC, not an error
    emb = (y @ rng.normal(size=(classes, dim)) * 2 + rng.normal(size=(n, dim))).astype(np.float32)
    split = np.array(["train"] * 150 + ["val"] * 75 + ["test"] * 75)
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})
    summary = evaluate_embeddings(_task(torch.as_tensor(y), "multilabel", classes, index), emb, LINEAR)
    assert 60 < summary["mAP"] <= 100 and 0.8 < summary["mAUC"] <= 1.0
    assert summary["d_prime"] > 1.0 and set(summary["runs"][0]) >= {"mAP", "mAUC", "d_prime"}


def test_time_pooling_keeps_frequency_bands():
    """Tokens of a known 3 (time) x 2 (freq) grid: "time" averages each band's column over time and
    concatenates the bands; "all" averages every token."""
    tokens = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(1, 6, 2)  # patch t * 2 + f, D = 2
    # band f=0: patches 0, 2, 4 -> tokens [0,1], [4,5], [8,9]; band f=1: patches 1, 3, 5 -> [2,3], [6,7], [10,11]
    assert pool_tokens(tokens, (3, 2), "time").tolist() == [[4.0, 5.0, 6.0, 7.0]]
    assert pool_tokens(tokens, (3, 2), "all").tolist() == [[5.0, 6.0]]


def _where_case(n=480, patches=12, dim=8, seed=0):
    """A task mean pooling cannot solve: every clip has two marked tokens at random places, one with
    dims 0, 1 at +3 and one at -3, the rest noise; the class is the sign of dim 2 *on the token whose
    dim 0 is positive* (the other marked token carries the opposite sign). The mean over tokens sums
    dim 2 of both marked tokens to 0 whatever the class; a query that attends to dim 0 > 0 reads it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=0.3, size=(n, patches, dim)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        a, b = rng.choice(patches, 2, replace=False)
        sign = 1.0 if y[i] else -1.0
        x[i, a, :3] = [3.0, 3.0, 3.0 * sign]
        x[i, b, :3] = [-3.0, -3.0, -3.0 * sign]
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 4))
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})
    return x, torch.as_tensor(y), index


def test_attentive_probe_reads_what_mean_pooling_cannot():
    tokens, y, index = _where_case()
    task = _task(y, "splits", 2, index)
    mean = fit_probe(task, tokens.mean(1), task.splits[0], L2)
    attentive = evaluate_tokens(task, tokens.astype(np.float16), dataclasses.replace(
        LINEAR, attentive=dataclasses.replace(LINEAR.attentive, epochs=60, patience=15)))
    assert mean["accuracy"] < 65  # chance is 50
    assert attentive["accuracy"] > 90 and attentive["runs"][0]["best_epoch"] <= attentive["runs"][0]["epochs_run"]


def test_attentive_probe_is_seeded():
    tokens, y, index = _where_case(n=96)
    task = _task(y, "splits", 2, index)
    cfg = dataclasses.replace(LINEAR.attentive, epochs=3, patience=3)
    assert fit_attentive(task, tokens, task.splits[0], cfg, seed=1) == fit_attentive(task, tokens, task.splits[0],
                                                                                     cfg, seed=1)
    assert AttentiveProbe(8, 2)(torch.zeros(3, 5, 8)).shape == (3, 2)


class _Stats:
    stats = {"mean": -5.0, "std": 4.0}


def _spectrogram_task(n=48, classes=4, grid=(2, 8)):
    """Clips whose class sets the level of one mel band, in train / val / test splits."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, grid[0] * 16, grid[1] * 16, generator=g) * 0.5
    for c in range(classes):
        x[y == c, :, 32 * c:32 * c + 16] += 1.5
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 4))
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})
    return Task("hand", "splits", [f"k{i}" for i in range(classes)], x, y, index,
                eval_splits(index, "splits"), store=_Stats())


def test_interrupted_finetuning_resumes_to_the_same_result(tmp_path, monkeypatch):
    from ajepa.downstream import finetune
    from ajepa.models import SpectrogramEncoder
    from ajepa.train import engine

    task = _spectrogram_task()
    # every random part of the recipe is on: mixup, roll, SpecAugment, drop path, regularized masking
    cfg = dataclasses.replace(load_params(REPO / "params.yaml").recipe("synth"), epochs=3, batch_size=8,
                              warmup_epochs=1.0, mixup=0.5, roll=True, specaug_time=8, specaug_freq=8,
                              drop_path=0.1, key_mask_ratio=0.1)

    def fresh_encoder():
        torch.manual_seed(0)
        return SpectrogramEncoder((2, 8), 16, 32, 2, 2, drop_path=cfg.drop_path)

    def run(name):
        return finetune.finetune_run(task, task.splits[0], fresh_encoder(), cfg, name, torch.device("cpu"),
                                     tmp_path / f"{name}.pt", "hash")

    straight = run("straight")
    saves = []
    real_save = engine.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(state["epoch"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert saves == [1, 2]
    saves.clear()
    monkeypatch.setattr(engine, "save_checkpoint", lambda path, state: (real_save(path, state),
                                                                         saves.append(state["epoch"])))
    resumed = run("resumed")
    assert saves == [3]  # it went on from epoch 2 rather than starting again
    assert len(resumed.history) == 3 and resumed.history == straight.history
    assert resumed.test == straight.test and resumed.best_epoch == straight.best_epoch
    assert resumed.test_scores == straight.test_scores


def test_val_start_keeps_the_probes_start_when_no_epoch_beats_it(tmp_path):
    """selection "val_start" scores the starting weights (LP-FT: the linear probe's head) as epoch 0; when
    fine-tuning only makes the validation score worse (here an lr far too high), the start is what is tested."""
    from ajepa.downstream import finetune
    from ajepa.models import SpectrogramEncoder

    task = _spectrogram_task(n=96)
    base = dataclasses.replace(load_params(REPO / "params.yaml").recipe("synth"), epochs=2, batch_size=8,
                               warmup_epochs=0.0, head_init="probe", lr=3.0, num_workers=0)
    results = {}
    for selection in ("val", "val_start"):
        torch.manual_seed(0)
        encoder = SpectrogramEncoder((2, 8), 16, 32, 2, 2)
        results[selection] = finetune.finetune_run(task, task.splits[0], encoder, dataclasses.replace(
            base, selection=selection), selection, torch.device("cpu"), tmp_path / f"{selection}.pt", "hash")
    wrecked, kept = results["val"], results["val_start"]
    assert wrecked.best_epoch >= 1 and kept.best_epoch == 0
    assert kept.history[0]["epoch"] == 0 and kept.history[1:] == wrecked.history  # the same training after it
    assert kept.val_score == kept.history[0]["val_accuracy"] > max(h["val_accuracy"] for h in wrecked.history)
    assert kept.test["accuracy"] > wrecked.test["accuracy"]


def test_perfect_auc_gives_json_safe_null_d_prime():
    import json
    import math

    from ajepa.downstream.common import summarize
    from ajepa.downstream.metrics import multilabel_metrics, secondary

    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    test = multilabel_metrics(y, y * 0.9 + 0.05)  # perfect ranking: mAUC 1, d' infinite
    assert test["mAUC"] == 1.0 and math.isinf(test["d_prime"])
    run = {"split": "test", "mAP": 100.0, **secondary(test)}
    assert run["mAUC"] == 1.0 and run["d_prime"] is None
    summary = summarize([run], "mAP")
    assert summary["d_prime"] is None and summary["mAUC"] == 1.0
    json.dumps(summary, allow_nan=False)  # strict JSON: DVC and other readers parse it


def test_probe_head_starts_fine_tuning_from_the_linear_probe():
    """LP-FT: with head_init "probe" the untouched classifier already scores what a logistic regression
    of its own head inputs scores; AudioMAE's near-zero head starts at chance."""
    from ajepa.downstream import finetune
    from ajepa.models import SpectrogramEncoder

    task = _spectrogram_task(n=96)
    split = task.splits[0]
    cpu = torch.device("cpu")
    scores = {}
    for init in ("zero", "probe"):
        torch.manual_seed(0)
        model = finetune.Classifier(SpectrogramEncoder((2, 8), 16, 32, 2, 2), 4, "time")
        if init == "probe":
            finetune.probe_head(model, task, split, [0.1, 0.01], 16, cpu)
        logits = finetune.predict(model, task, split.val, 32, cpu, torch.autocast("cpu", enabled=False))
        scores[init] = task.selection_score(task.y[split.val], logits)
    assert scores["probe"] > 90 and scores["zero"] <= 50


def test_finetune_stage_drops_curves_of_runs_no_longer_configured(tmp_path):
    from ajepa.stages.finetune import _drop_stale_curves
    for name in ("pretrained-fold1", "pretrained-fold2", "random_init-fold1", "random_init-fold2"):
        (tmp_path / name / "plots").mkdir(parents=True)
    (tmp_path / "metrics.json").write_text("{}")  # not a run's folder: kept
    _drop_stale_curves(tmp_path, {"pretrained-fold1", "random_init-fold1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "pretrained-fold1", "random_init-fold1"]
    _drop_stale_curves(tmp_path / "absent", set())  # no curves yet: nothing to do


def test_embedding_shows_progress_only_when_named(capsys):
    from ajepa.downstream.linear import embed, fbank_batches
    from ajepa.models import SpectrogramEncoder
    x = torch.randn(10, 16, 16)
    task = Task("t", "splits", ["a", "b"], x, torch.zeros(10, dtype=torch.long), pd.DataFrame(), [], None)
    assert np.concatenate(list(fbank_batches(task, batch_size=4))).shape == (10, 16)
    assert capsys.readouterr().err == ""  # the pretraining learning curve embeds quietly
    list(fbank_batches(task, batch_size=4, desc="fbank synth"))
    assert "fbank synth" in capsys.readouterr().err
    encoder = SpectrogramEncoder((2, 2), 8, 16, 1, 2)
    assert embed(encoder, task, 4, torch.device("cpu"), desc="embed context").shape[0] == 10
    err = capsys.readouterr().err
    assert "embed context" in err and "10/10" in err
