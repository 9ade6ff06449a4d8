"""Where the A-JEPA paper is silent, the `paper` preset takes its sources' values (docs/recipes.md):
I-JEPA's optimiser, schedules and predictor heads in pretraining, AudioMAE's fc_norm head in
fine-tuning. Every value is read from the objects the library builds from the merged parameters,
shrunk in depth so that a ViT-B builds in seconds on a CPU; widths and head counts stay the paper's."""

import dataclasses
import types

import pytest
import torch
import torch.nn as nn
from conftest import REPO, load_repo_params

from ajepa.config import parse_params
from ajepa.downstream.finetune import Classifier
from ajepa.errors import ConfigError
from ajepa.models import SpectrogramEncoder
from ajepa.models.vit import Predictor
from ajepa.tools.presets import load_preset, merge
from ajepa.train import pretrain as pt
from ajepa.train.schedules import WarmupCosine

GRID, PATCH, STEPS_PER_EPOCH = (4, 8), 16, 10
PUBLISHED = ["as2m", "as20k", "esc50", "spc2", "spc1", "vox1"]


def _paper():
    raw = load_repo_params()
    merge(raw, load_preset(REPO / "presets" / "paper.yaml"))
    return parse_params(raw, source="params.yaml + presets/paper.yaml")


def _shrunk(cfg):
    """The same pretraining with 2-block encoder and predictor (widths and heads unchanged)."""
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, depth=2),
                               predictor=dataclasses.replace(cfg.predictor, depth=2))


def _trainer(cfg):
    """The built parts (model, optimizer, lr, wd, momentum, ...) as attributes."""
    return types.SimpleNamespace(**pt.build(cfg, GRID, PATCH, STEPS_PER_EPOCH, torch.device("cpu")))


@pytest.fixture(scope="module")
def paper():
    return _paper()


@pytest.fixture(scope="module")
def paper_trainer(paper):
    return _trainer(_shrunk(paper.pretrain))


def test_paper_optimiser_is_ijepas_adamw(paper_trainer):
    """I-JEPA's train.py: AdamW(param_groups) with torch's defaults, a decaying and a non-decaying group."""
    opt, model = paper_trainer.optimizer, paper_trainer.model
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    # I-JEPA: no decay on biases and 1-D parameters; every other trainable parameter decays, except (ours,
    # docs/recipes.md) the predictor's mask token
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and (p.ndim == 1 or n == "predictor.mask_token")}
    assert all(p.ndim > 1 for p in decay["params"])
    assert not any(names[id(p)].startswith("target_encoder") for g in opt.param_groups for p in g["params"])


def test_paper_schedules_are_ijepas(paper, paper_trainer):
    """Warm-up from start_lr = 0.2 x lr to lr over 3 epochs, cosine to final_lr 1e-6; weight decay
    0.04 -> 0.4; EMA 0.996 -> 1.0 (I-JEPA's configs; the warm-up length is AudioMAE's 3 epochs)."""
    o = paper.pretrain.optim
    lr, wd, ema = paper_trainer.lr, paper_trainer.wd, paper_trainer.momentum
    warmup, total = 3 * STEPS_PER_EPOCH, o.epochs * STEPS_PER_EPOCH
    assert lr.value(0) == pytest.approx(0.2 * 2e-4) and lr.value(warmup) == pytest.approx(2e-4)
    assert lr.value(warmup // 2) == pytest.approx(0.6 * 2e-4)  # linear between them
    assert lr.value(total) == pytest.approx(1e-6)
    assert (wd.value(0), wd.value(total)) == pytest.approx((0.04, 0.4))
    assert (ema.value(0), ema.value(total)) == pytest.approx((0.996, 1.0))
    fresh = _trainer(_shrunk(paper.pretrain))  # stepping sets the optimiser's lr to the schedule's
    fresh.lr.step()
    assert [g["lr"] for g in fresh.optimizer.param_groups] == pytest.approx([0.2 * 2e-4] * 2)


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, GRID[0] * PATCH, GRID[1] * PATCH, generator=g)
    patches = torch.stack([torch.randperm(GRID[0] * GRID[1], generator=g) for _ in range(n)])
    return x, patches[:, :20], patches[:, 20:28].reshape(n, 2, 4)


def _grad_norm_after_step(cfg, grad_clip):
    trainer = _trainer(cfg)
    with torch.no_grad():  # large predictions: a gradient norm well above 1
        trainer.model.predictor.proj.weight.mul_(20.0)
    trainer.lr.step()
    pt.train_step(trainer.model, trainer.optimizer, *_batch(), momentum=0.996, grad_clip=grad_clip)
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@pytest.mark.slow
def test_paper_preset_does_not_clip_gradients(paper):
    """Neither I-JEPA nor AudioMAE clips in pretraining: the step keeps a gradient the embedded default's
    clip at 1.0 would shrink."""
    cfg = _shrunk(paper.pretrain)
    assert cfg.optim.grad_clip == 0
    unclipped = _grad_norm_after_step(cfg, cfg.optim.grad_clip)
    assert unclipped > 1.5
    default_clip = parse_params(load_repo_params()).pretrain.optim.grad_clip
    assert _grad_norm_after_step(cfg, default_clip) == pytest.approx(default_clip, rel=1e-3)


def test_paper_predictor_has_16_heads_of_32(paper_trainer):
    """I-JEPA's helper.py gives the predictor the encoder's head count: 12 cannot split the paper's 512
    wide predictor, so the preset takes 16, the count of every released I-JEPA predictor."""
    model = paper_trainer.model
    assert {b.attn.num_heads for b in model.context_encoder.blocks} == {12}
    assert {(b.attn.num_heads, b.attn.head_dim) for b in model.predictor.blocks} == {(16, 32)}
    with pytest.raises(AssertionError):  # what I-JEPA's rule would build
        Predictor(GRID, 768, 512, depth=1, num_heads=12)


@pytest.mark.parametrize("bench", PUBLISHED)
def test_published_recipes_fine_tune_with_audiomaes_fc_norm_head(paper, bench):
    """AudioMAE's models_vit.py with global_pool: the encoder's final norm deleted, fc_norm on the mean
    of the last block's tokens, then the head."""
    recipe = paper.recipe(bench)
    torch.manual_seed(0)
    encoder = SpectrogramEncoder(GRID, PATCH, 64, 2, 4)
    model = Classifier(encoder, 5, recipe.pooling, recipe.head_norm).eval()
    assert recipe.pooling == "all" and isinstance(model.encoder.norm, nn.Identity)
    assert not any(n.startswith("encoder.norm") for n, _ in model.named_parameters())
    x = torch.randn(3, GRID[0] * PATCH, GRID[1] * PATCH)
    with torch.no_grad():
        tokens = encoder.embed(x)
        for blk in encoder.blocks:
            tokens = blk(tokens)
        expected = model.head(model.norm(tokens.mean(dim=1)))
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_embedded_default_is_unchanged_by_the_new_options():
    """At their defaults the new keys build what the code built before them: the lr read as absolute and
    warmed up from 0, and the classifier's encoder keeping its final norm before the pool."""
    params = parse_params(load_repo_params())
    o = params.pretrain.optim
    assert (o.lr_scaling, o.warmup_start) == ("absolute", 0.0)
    trainer = _trainer(_shrunk(params.pretrain))
    before = WarmupCosine(o.lr, o.final_lr, round(o.warmup_epochs * STEPS_PER_EPOCH), o.epochs * STEPS_PER_EPOCH)
    assert [trainer.lr.value(s) for s in range(before.total_steps + 1)] == \
        [before.value(s) for s in range(before.total_steps + 1)]
    assert all(g["betas"] == tuple(o.betas) for g in trainer.optimizer.param_groups)
    for bench in params.pipeline.benchmarks:
        torch.manual_seed(0)
        encoder = SpectrogramEncoder(GRID, PATCH, 64, 2, 4)
        model = Classifier(encoder, 5, params.recipe(bench).pooling, params.recipe(bench).head_norm).eval()
        assert isinstance(model.encoder.norm, nn.LayerNorm)
        x = torch.randn(2, GRID[0] * PATCH, GRID[1] * PATCH)
        with torch.no_grad():
            z = encoder(x).reshape(2, GRID[0], GRID[1], -1).mean(dim=1)  # the time pooling, encoder norm kept
            assert torch.allclose(model(x), model.head(model.norm(z).flatten(1)), atol=1e-6)


def test_lr_scaling_per_256_reads_lr_as_audiomaes_base_lr(paper):
    """The other reading of the paper's lr 2e-4: AudioMAE's blr, 4e-4 at batch 512; the warm-up start
    and the final lr follow (0.2 x the peak; final_lr stays absolute, as MAE's min_lr)."""
    cfg = _shrunk(paper.pretrain)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr_scaling="per_256"))
    lr = _trainer(cfg).lr
    assert lr.value(3 * STEPS_PER_EPOCH) == pytest.approx(4e-4) and lr.value(0) == pytest.approx(0.8e-4)
    assert lr.value(lr.total_steps) == pytest.approx(1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("warmup_start", 1.5, "pretrain.optim.warmup_start = 1.5: a fraction of the peak lr"),
    ("lr_scaling", "blr", "pretrain.optim.lr_scaling = 'blr': must be one of 'absolute', 'per_256'"),
])
def test_bad_new_optim_values_are_one_line(key, value, message):
    raw = load_repo_params()
    raw["pretrain"]["optim"][key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


def test_report_names_the_lr_reading_and_the_model_selection_rule():
    from ajepa.stages.report import render
    raw = load_repo_params()
    merge(raw, load_preset(REPO / "presets" / "paper.yaml"))
    raw["pretrain"]["optim"]["lr_scaling"] = "per_256"
    pretrain = {"steps": 1, "seconds": 1.0, "final_loss": 0.1, "samples_per_s": 1, "device": "cpu", "world_size": 1}
    text = render({}, {}, pretrain, {}, parse_params(raw))
    assert "peak lr 0.0004 at batch 512 (`lr: 0.0002` read as `lr_scaling: per_256`" in text
    assert "best epoch" in text and "0.1-0.5 points below the paper rows" in text
