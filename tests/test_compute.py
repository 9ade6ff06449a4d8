"""Gradient accumulation, activation checkpointing and torch.compile change how a step is computed,
never what it computes: the same parameters after an optimiser step, the same gradients."""

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, tiny_params

from ajepa.config import ConfigError, load_params, parse_params
from ajepa.downstream import finetune
from ajepa.downstream.protocols import Task, eval_splits
from ajepa.masks import MaskGenerator
from ajepa.models import AJEPA, SpectrogramEncoder, set_activation_checkpointing
from ajepa.train.compute import largest_fitting, micro_slices, resolve_micro_batch
from ajepa.train.pretrain import build, train_step

GRID = (6, 8)


def _close(a: dict, b: dict, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), (k, (a[k] - b[k]).abs().max())


def test_micro_slices_cover_the_batch_once():
    assert micro_slices(8, None) == [slice(0, 8)] and micro_slices(8, 8) == [slice(0, 8)]
    assert micro_slices(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert resolve_micro_batch(None, 8, torch.device("cpu")) == 8
    assert resolve_micro_batch("auto", 8, torch.device("cpu")) == 8  # nothing to probe on a CPU
    assert resolve_micro_batch(16, 8, torch.device("cpu")) == 8 and resolve_micro_batch(2, 8, torch.device("cpu")) == 2
    tried = []
    assert largest_fitting(12, lambda m: tried.append(m) or m <= 4) == 3 and tried == [12, 6, 3]
    with pytest.raises(Exception, match="not even one clip"):
        largest_fitting(4, lambda m: False)


def test_micro_batch_is_checked():
    p = tiny_params()
    p["pretrain"]["micro_batch"] = 0
    with pytest.raises(ConfigError, match="pretrain.micro_batch = 0"):
        parse_params(p)
    p["pretrain"]["micro_batch"] = "half"
    with pytest.raises(ConfigError, match="pretrain.micro_batch = 'half'"):
        parse_params(p)


@pytest.mark.parametrize("micro", [4, 2, 3])  # 8 as 2 x 4, 4 x 2, and 3 + 3 + 2
def test_accumulated_pretraining_step_equals_the_full_batch_step(micro):
    cfg = parse_params(tiny_params()).pretrain  # drop_path 0: nothing random in the step
    trainer = build(cfg, GRID, 16, steps_per_epoch=10, device=torch.device("cpu"))
    # float64: Adam's first step is about lr * sign(gradient), which turns float32 rounding in a gradient
    # that should be 0 (the attention keys' bias) into a whole +-lr step
    trainer["model"].double()
    split = copy.deepcopy(trainer)
    m = MaskGenerator(GRID, mode="block", seed=0)(8, 0)
    x = torch.randn(8, 96, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    losses = [train_step(t["model"], t["optimizer"], x, m.context, m.targets, 0.99, 1.0, micro_batch=mb)
              for t, mb in ((trainer, None), (split, micro))]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert split["model"].last_target.shape == trainer["model"].last_target.shape  # the whole batch's targets
    _close(trainer["model"].state_dict(), split["model"].state_dict(), atol=1e-12, rtol=1e-10)  # and the EMA


def _task(n=32, classes=4):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 32, 128, generator=g)
    for c in range(classes):
        x[y == c, :, 32 * c:32 * c + 16] += 1.5
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 4))
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})

    class Stats:
        stats = {"mean": -5.0, "std": 4.0}
    return Task("hand", "splits", [f"k{i}" for i in range(classes)], x, y, index, eval_splits(index, "splits"),
                store=Stats())


@pytest.mark.parametrize("micro", [2, 4, 3])
def test_accumulated_finetuning_step_equals_the_full_batch_step(micro, tmp_path):
    task = _task()
    # mixup and SpecAugment act on the whole batch before it is split; nothing random inside the step
    cfg = dataclasses.replace(load_params(REPO / "params.yaml").recipe("synth"), batch_size=8, head_init="zero",
                              mixup=0.5, roll=True, specaug_time=8, specaug_freq=8, drop_path=0.0,
                              key_mask_ratio=0.0)
    runs = []
    for mb in (None, micro):
        torch.manual_seed(0)
        run = finetune.build(SpectrogramEncoder((2, 8), 16, 32, 2, 2), task, task.splits[0], cfg,
                             torch.device("cpu"), tmp_path / "state.pt", "hash")
        run.model.double()  # as in the pretraining test: Adam's first step amplifies float32 rounding
        run.micro_batch = mb
        g = torch.Generator().manual_seed(5)
        x, y = finetune.augment(task.clips(task.splits[0].train[:8]).double(), torch.eye(4, dtype=torch.float64)[task.y[:8]],
                                cfg, -5.0, 4.0, g,
                                partners=lambda n, g=g: finetune.mixup_partners(task, task.splits[0], n, g))
        runs.append((run, finetune.train_step(run, x, y, cfg, g)))
    (full, loss_full), (split, loss_split) = runs
    assert loss_full == pytest.approx(loss_split, rel=1e-6)
    assert full.parts["lr"].current_step == split.parts["lr"].current_step == 1  # the schedule stepped once
    _close(full.model.state_dict(), split.model.state_dict(), atol=1e-12, rtol=1e-10)


def test_activation_checkpointing_keeps_the_gradients():
    """With drop path and regularized masking on, the recomputation sees the same draws."""
    def grads(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        model = AJEPA({"grid": GRID, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path": 0.2},
                      {"embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path": 0.2})
        set_activation_checkpointing(model, checkpointing)
        torch.manual_seed(1)
        m = MaskGenerator(GRID, mode="block", seed=0)(4, 0)
        x = torch.randn(4, 96, 128)
        model(x, m.context, m.targets).backward()
        g = torch.Generator().manual_seed(2)
        model.context_encoder(x, key_mask_ratio=0.3, generator=g).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) > 20
    _close(plain, checkpointed, atol=1e-7, rtol=1e-6)


def test_finetuning_run_with_micro_batches_and_checkpointing_scores_the_same(tmp_path):
    task = _task()
    cfg = dataclasses.replace(load_params(REPO / "params.yaml").recipe("synth"), epochs=2, batch_size=8,
                              head_init="zero", drop_path=0.0, key_mask_ratio=0.0, mixup=0.5, roll=True)
    results = []
    for name, options in (("plain", {}), ("split", {"micro_batch": 3, "activation_checkpointing": True})):
        torch.manual_seed(0)
        results.append(finetune.finetune_run(task, task.splits[0], SpectrogramEncoder((2, 8), 16, 32, 2, 2),
                                             dataclasses.replace(cfg, **options), name, torch.device("cpu"),
                                             tmp_path / f"{name}.pt", "hash"))
    plain, split = results
    assert [h["train_loss"] for h in plain.history] == pytest.approx([h["train_loss"] for h in split.history],
                                                                     abs=2e-5)
    assert np.allclose(plain.test_scores, split.test_scores, atol=1e-4)
