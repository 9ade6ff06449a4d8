"""Fine-tuning's input pipeline: batches built ahead by loader worker processes, the same batches and the
same fine-tuned model for any worker count, and after a kill and a resume."""

import dataclasses
import multiprocessing

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import REPO, load_repo_params

from ajepa.config import load_params, parse_params
from ajepa.data.frontend import FrontEnd
from ajepa.data.store import extract_features
from ajepa.downstream import finetune
from ajepa.downstream.protocols import load_task
from ajepa.errors import ConfigError
from ajepa.models import SpectrogramEncoder
from ajepa.train import engine
from ajepa.train.compute import without_compute_keys

CLASSES = ["low", "mid", "high", "top"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """48 labeled clips (a tone per class in noise; 24 train, 12 val, 12 test) in a store of 5-clip
    shards, read from the store clip by clip (not held in memory), as a large benchmark is."""
    tmp = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    t = np.arange(4000) / 16000
    rows = []
    for i in range(48):
        k = i % len(CLASSES)
        wav = 0.3 * np.sin(2 * np.pi * 300 * 2 ** k * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(tmp / f"c{i}.wav", wav.astype(np.float32), 16000)
        rows.append({"clip_id": f"c{i}", "path": str(tmp / f"c{i}.wav"), "labels": CLASSES[k], "fold": 0,
                     "split": "train" if i < 24 else "val" if i < 36 else "test"})
    extract_features(pd.DataFrame(rows), tmp / "feat", FrontEnd(), target_length=32, shard_clips=5, num_workers=1,
                     max_reject_fraction=0.0, progress=False,
                     extra_stats={"grid": [2, 8], "patch_size": 16, "protocol": "splits", "classes": CLASSES})
    held = load_task("tones", tmp / "feat")
    return dataclasses.replace(held, x=torch.empty(0))  # streamed from the store, as beyond 2 GiB


def _recipe(**options):
    # every random part of the recipe on: mixup partners come through the loader too
    return dataclasses.replace(load_params(REPO / "params.yaml").recipe("synth"), epochs=3, batch_size=8,
                               warmup_epochs=1.0, head_init="zero", mixup=0.5, roll=True, specaug_time=8,
                               specaug_freq=8, drop_path=0.1, key_mask_ratio=0.1, **options)


def _stream(task, cfg, first_epoch=0):
    batches = finetune.StepBatches(task, task.splits[0], cfg, finetune.steps_per_epoch(cfg, task.splits[0]))
    return list(finetune.batch_stream(batches, first_epoch, CPU))


def _same(a, b):
    assert [x.step for x in a] == [x.step for x in b]
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x[:4], y[:4]))


def test_the_batches_are_the_same_for_any_worker_count_and_from_a_resumed_epoch(task):
    serial = _stream(task, _recipe(num_workers=0))
    assert [b.step for b in serial] == list(range(9))  # 3 epochs of 24 // 8 steps
    assert all(b.x.shape == (8, 32, 128) and b.x2.shape == (8, 32, 128) for b in serial)
    assert not torch.equal(serial[0].x, serial[1].x)
    _same(serial, _stream(task, _recipe(num_workers=2, prefetch=1)))
    _same(serial, _stream(task, _recipe(num_workers=2, prefetch=4)))
    _same(serial[6:], _stream(task, _recipe(num_workers=2), first_epoch=2))
    assert not multiprocessing.active_children()  # the workers ended with their stream
    reseeded = _stream(task, _recipe(num_workers=0, seed=1))
    assert not torch.equal(serial[0].x, reseeded[0].x)  # the batches do follow the seed


def _run(task, cfg, name, tmp_path):
    torch.manual_seed(0)
    encoder = SpectrogramEncoder((2, 8), 16, 32, 2, 2, drop_path=cfg.drop_path)
    return finetune.finetune_run(task, task.splits[0], encoder, cfg, name, CPU, tmp_path / f"{name}.pt", "hash")


def test_workers_and_a_kill_with_workers_leave_the_fine_tuned_model_unchanged(task, tmp_path, monkeypatch):
    straight = _run(task, _recipe(num_workers=0), "straight", tmp_path)
    parallel = _run(task, _recipe(num_workers=2), "parallel", tmp_path)
    assert parallel.history == straight.history and parallel.test_scores == straight.test_scores
    real_save = engine.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # killed right after epoch 1's checkpoint, with workers building ahead

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(task, _recipe(num_workers=2), "resumed", tmp_path)
    assert not multiprocessing.active_children()  # no worker outlives the run it fed
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    resumed = _run(task, _recipe(num_workers=1, prefetch=3), "resumed", tmp_path)
    assert len(resumed.history) == 3 and resumed.history == straight.history
    assert resumed.test == straight.test and resumed.test_scores == straight.test_scores


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_batches_for_a_gpu_come_pinned_with_workers_and_without(task):
    for workers in (0, 2):
        cfg = _recipe(num_workers=workers, epochs=1)
        batches = finetune.StepBatches(task, task.splits[0], cfg, finetune.steps_per_epoch(cfg, task.splits[0]))
        for b in finetune.batch_stream(batches, 0, torch.device("cuda")):
            assert b.x.is_pinned() and b.y.is_pinned() and b.x2.is_pinned(), workers


def test_worker_count_and_prefetch_are_no_part_of_a_fine_tuning_runs_identity():
    # the stage hashes the recipe without its compute keys: a run resumed with other loader settings goes on
    same = without_compute_keys(dataclasses.asdict(_recipe(num_workers=0, prefetch=2)))
    assert same == without_compute_keys(dataclasses.asdict(_recipe(num_workers=6, prefetch=4)))
    assert same != without_compute_keys(dataclasses.asdict(_recipe(num_workers=0, seed=1)))


@pytest.mark.parametrize("key, value, why", [("num_workers", -1, "must be >= 0"), ("prefetch", 0, "must be positive")])
def test_loader_settings_are_checked(key, value, why):
    raw = load_repo_params()
    raw["finetune"]["synth"][key] = value
    with pytest.raises(ConfigError) as e:
        parse_params(raw, source="p.yaml")
    assert str(e.value).startswith(f"p.yaml: finetune.synth.{key} = {value}") and why in str(e.value)
