"""The AudioMAE/AST recipe pieces: mixup as a per-clip probability in the power domain, roll and
magnitude jitter (fine-tuning and pretraining), speech noise, class-balanced sampling, and the
published recipes' values against their sources (docs/recipes.md)."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ajepa.config import load_params
from ajepa.data.augment import (
    ClipAugment,
    add_noise,
    beta_draws,
    mix_targets,
    mixup_draws,
    power_mix,
    roll_time,
    scale_magnitude,
)
from ajepa.downstream import finetune
from ajepa.downstream.protocols import Task, eval_splits
from ajepa.errors import AjepaError

REPO = Path(__file__).resolve().parent.parent
PARAMS = load_params(REPO / "params.yaml")
MEAN, STD = -5.0, 4.0  # a store's log-mel statistics


def _z(log_mel: torch.Tensor) -> torch.Tensor:
    return (log_mel - MEAN) / (2 * STD)


def _log_mel(z: torch.Tensor) -> torch.Tensor:
    return z * 2 * STD + MEAN


# ------------------------------------------------------------------------------------------------
# mixup


def test_mixup_probability_zero_and_one():
    g = torch.Generator().manual_seed(0)
    mixed, lam = mixup_draws(500, 0.0, 10.0, g)
    assert not mixed.any() and torch.all(lam == 1.0)
    mixed, lam = mixup_draws(500, 1.0, 10.0, g)
    assert mixed.all() and torch.all((lam > 0) & (lam < 1))


def test_mixed_fraction_matches_the_probability():
    g = torch.Generator().manual_seed(1)
    n, p = 20_000, 0.5
    mixed, _ = mixup_draws(n, p, 10.0, g)
    assert abs(float(mixed.float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)  # within 4 sigma
    mixed, _ = mixup_draws(n, 0.2, 10.0, g)
    assert abs(float(mixed.float().mean()) - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)


def test_lambdas_follow_beta_10_10():
    lam = beta_draws(20_000, 10.0, torch.Generator().manual_seed(2))
    # Beta(10, 10): mean 1/2, std sqrt(1 / (4 * 21)) = 0.109, almost all mass in (0.2, 0.8)
    assert abs(float(lam.mean()) - 0.5) < 0.005
    assert abs(float(lam.std()) - math.sqrt(1 / 84)) < 0.005
    assert float(((lam > 0.2) & (lam < 0.8)).float().mean()) > 0.99
    # the alpha is a parameter: Beta(0.5, 0.5) piles up at the ends instead
    wide = beta_draws(20_000, 0.5, torch.Generator().manual_seed(2))
    assert float(((wide < 0.1) | (wide > 0.9)).float().mean()) > 0.35


def test_power_domain_mix_of_two_known_spectra():
    p1, p2, lam = 100.0, 0.01, 0.3  # mel powers of two flat spectra, one loud and one quiet
    z1, z2 = _z(torch.full((1, 4, 2), math.log(p1))), _z(torch.full((1, 4, 2), math.log(p2)))
    mixed = power_mix(z1, z2, torch.tensor([lam]), MEAN, STD)
    # lam w1 + (1 - lam) w2 of uncorrelated waveforms: power lam^2 P1 + (1 - lam)^2 P2
    expected = math.log(lam**2 * p1 + (1 - lam) ** 2 * p2)
    assert torch.allclose(_log_mel(mixed), torch.full_like(mixed, expected), atol=1e-5)
    # not the normalised log-mels averaged (a geometric mean of the powers)
    assert abs(float(_log_mel(lam * z1 + (1 - lam) * z2)[0, 0, 0]) - expected) > 3.0
    # symmetric in (clip, weight), and lam = 1 leaves the first clip
    assert torch.allclose(mixed, power_mix(z2, z1, torch.tensor([1 - lam]), MEAN, STD), atol=1e-5)
    assert torch.allclose(power_mix(z1, z2, torch.tensor([1.0]), MEAN, STD), z1, atol=1e-5)


def test_label_mixing_is_exact():
    y1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # single- and multi-label rows
    y2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    lam = torch.tensor([0.25, 0.6])
    assert torch.equal(mix_targets(y1, y2, lam), torch.tensor([[0.25, 0.0, 0.75], [0.0, 1.0, 0.6]]))


def _recipe(**kw):
    off = dict(mixup=0.0, roll=False, magnitude=False, noise=False, specaug_time=0, specaug_freq=0)
    return dataclasses.replace(PARAMS.recipe("synth"), **{**off, **kw})


def _batch(n=64, classes=4):
    """Clips of the first classes - 1 classes (the last is the partners')."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(n) % (classes - 1)
    return torch.randn(n, 16, 8, generator=g) * 0.3, torch.nn.functional.one_hot(y, classes).float()


def _partners(classes=4):
    """Partner clips: flat spectra of class `classes - 1`, so a mix is easy to recognise."""
    def draw(n):
        return torch.full((n, 16, 8), 0.2), torch.nn.functional.one_hot(torch.full((n,), classes - 1), classes).float()
    return draw


def test_augment_mixes_no_clip_at_probability_zero_and_every_clip_at_one():
    x, y = _batch()
    g = torch.Generator().manual_seed(4)
    x0, y0 = finetune.augment(x, y, _recipe(mixup=0.0), MEAN, STD, g, _partners())
    assert torch.equal(x0, x) and torch.equal(y0, y)
    x1, y1 = finetune.augment(x, y, _recipe(mixup=1.0), MEAN, STD, g, _partners())
    assert not torch.isclose(x1, x).all(dim=(1, 2)).any()  # every clip changed
    assert torch.allclose(y1.sum(1), torch.ones(len(y)))  # the weights of the two label sets add to 1
    # each mixed clip is the power-domain mix with the weight its labels carry
    own = y.argmax(1)
    for i in range(8):
        lam = y1[i, own[i]]
        assert 0.2 < lam < 0.8 and torch.isclose(y1[i, 3], 1 - lam)
        expected = power_mix(x[i:i + 1], torch.full((1, 16, 8), 0.2), lam.view(1), MEAN, STD)
        assert torch.allclose(x1[i:i + 1], expected, atol=1e-5)


def test_augment_mixes_about_the_probability_of_a_large_batch():
    x, y = _batch(n=2000)
    _, mixed_y = finetune.augment(x, y, _recipe(mixup=0.5), MEAN, STD, torch.Generator().manual_seed(5), _partners())
    fraction = float((mixed_y.max(1).values < 1).float().mean())  # a mixed row has no weight of 1
    assert abs(fraction - 0.5) < 4 * math.sqrt(0.25 / 2000)


def test_mixup_partners_are_drawn_from_the_training_clips():
    task = _task([30, 30])
    split = task.splits[0]
    g = torch.Generator().manual_seed(6)
    x2, y2 = finetune.mixup_partners(task, split, 200, g)
    train_rows = {tuple(r.tolist()) for r in task.x[split.train].flatten(1)}
    assert all(tuple(r.tolist()) in train_rows for r in x2.flatten(1)) and y2.shape == (200, 2)


# ------------------------------------------------------------------------------------------------
# roll, magnitude, noise


def _shift_of(original: torch.Tensor, shifted: torch.Tensor, atol=1e-6) -> int | None:
    for k in range(original.shape[0]):
        if torch.allclose(torch.roll(original, k, dims=0), shifted, atol=atol):
            return k
    return None


def test_roll_is_a_circular_time_shift_of_each_clip():
    x, _ = _batch(n=32)
    rolled = roll_time(x, torch.Generator().manual_seed(7))
    shifts = [_shift_of(a, b) for a, b in zip(x, rolled)]
    assert None not in shifts and len(set(shifts)) > 5  # every clip shifted, by different amounts


def test_magnitude_is_a_level_shift_of_a_gain_in_half_to_three_halves():
    z = torch.zeros(4000, 3, 2)
    shifted = scale_magnitude(z, STD, torch.Generator().manual_seed(8))
    per_clip = shifted[:, 0, 0]
    assert torch.equal(shifted, per_clip.view(-1, 1, 1).expand_as(shifted))  # one shift per clip
    gain = torch.exp(per_clip * STD)  # the shift is ln(m) / std
    assert gain.min() > 0.5 and gain.max() < 1.5 and abs(float(gain.mean()) - 1.0) < 0.01


def test_noise_is_small_uniform_noise_and_a_short_shift():
    x, _ = _batch(n=64)
    noisy = add_noise(x, torch.Generator().manual_seed(9))
    for a, b in zip(x, noisy):
        k = next(k for k in range(-10, 11) if (torch.roll(b, -k, dims=0) - a).min() >= -1e-6
                 and (torch.roll(b, -k, dims=0) - a).max() < 0.1)
        assert abs(k) <= 10


def test_augmentations_off_leave_the_batch_and_the_generator_untouched():
    x, y = _batch()
    g = torch.Generator().manual_seed(10)
    before = g.get_state()
    out, targets = finetune.augment(x, y, _recipe(), MEAN, STD, g, _partners())
    assert torch.equal(out, x) and torch.equal(targets, y) and torch.equal(g.get_state(), before)


def test_each_augmentation_changes_the_batch_when_on():
    x, y = _batch()
    for key in ("roll", "magnitude", "noise"):
        out, _ = finetune.augment(x, y, _recipe(**{key: True}), MEAN, STD, torch.Generator().manual_seed(11),
                                  _partners())
        assert not torch.equal(out, x), key


def test_pretraining_clip_augment_is_a_seeded_roll_and_level_shift():
    z = torch.randn(32, 8)
    aug = ClipAugment(True, True, seed=0, stds=[1.0, 2.0], starts=[0, 10])
    out = aug(z, step=3, i=12)
    assert torch.equal(out, aug(z, step=3, i=12))  # a function of (seed, step, index)
    assert not torch.equal(out, aug(z, step=4, i=12))
    assert any(torch.allclose(torch.roll(z, k, 0) + (out - torch.roll(z, k, 0)).mean(), out, atol=1e-5)
               for k in range(32))  # a circular time shift plus one level
    # the level shift is ln(m) / std of the clip's own store: clip 12 is in the second store (std 2)
    same_m = ClipAugment(False, True, seed=0, stds=[1.0, 1.0], starts=[0, 10])(z, 3, 12) - z
    half = ClipAugment(False, True, seed=0, stds=[1.0, 2.0], starts=[0, 10])(z, 3, 12) - z
    assert torch.allclose(half, same_m / 2)


def test_pretraining_loader_augments_and_resumes_to_the_same_clips(tmp_path):
    from conftest import pool_features

    from ajepa.data.loader import pretrain_augment, pretrain_loader
    from ajepa.data.store import FeatureStore, StoreUnion
    from ajepa.masks import MaskGenerator

    store = FeatureStore(pool_features(tmp_path, tmp_path / "features", seed=3, clips=8, duration_s=0.5),
                         ("pretrain",))
    masks = MaskGenerator((3, 8), mode="block", seed=0, total_steps=4, min_keep=2)
    assert pretrain_augment(store, False, False, 0) is None

    def batches(augment, start=0, workers=0):
        return [b.x for b in pretrain_loader(store, 4, masks, 0, start_step=start, total_steps=4, augment=augment,
                                             num_workers=workers)]

    plain = batches(None)
    aug = pretrain_augment(store, True, True, 0)
    augmented = batches(aug)
    assert not torch.equal(plain[0], augmented[0])
    for a, b in zip(plain[0], augmented[0]):  # each clip: a circular time shift plus one level
        assert any(torch.allclose(torch.roll(a, k, 0) + (b - torch.roll(a, k, 0)).mean(), b, atol=1e-4)
                   for k in range(a.shape[0]))
    assert all(torch.equal(p, q) for p, q in zip(batches(aug, start=2), augmented[2:]))  # resumed: same clips
    assert all(torch.equal(p, q) for p, q in zip(batches(aug, workers=2), augmented))  # whatever the workers
    pooled = pretrain_augment(StoreUnion([store, store]), True, True, 0)  # each store keeps its own std
    assert pooled.stds == [store.std, store.std] and pooled.starts.tolist() == [0, len(store)]


def test_label_smoothing_is_timms_label_smoothing_cross_entropy():
    from timm.loss import LabelSmoothingCrossEntropy

    x, y = _batch(n=16)
    _, targets = finetune.augment(x, y, _recipe(label_smoothing=0.1, loss="ce"), MEAN, STD,
                                  torch.Generator().manual_seed(12), _partners())
    assert torch.allclose(targets, y * 0.9 + 0.1 / 4)
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(13))
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, targets),
                          LabelSmoothingCrossEntropy(0.1)(logits, y.argmax(1)), atol=1e-6)
    _, bce = finetune.augment(x, y, _recipe(label_smoothing=0.1, loss="bce"), MEAN, STD,
                              torch.Generator().manual_seed(12), _partners())
    assert torch.equal(bce, y)  # AudioMAE's BCE recipes do not smooth


# ------------------------------------------------------------------------------------------------
# class-balanced sampling


def _task(counts: list[int]) -> Task:
    """A single-label task with `counts[c]` training clips of class c (and a few val/test clips)."""
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)] + [torch.arange(len(counts))] * 2)
    n = len(y)
    split = np.array(["train"] * sum(counts) + ["val"] * len(counts) + ["test"] * len(counts))
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 16, 8).clone()
    return Task("t", "splits", [f"k{i}" for i in range(len(counts))], x, y, index, eval_splits(index, "splits"),
                store=None)


def test_balanced_sampling_evens_out_the_classes():
    task = _task([180, 20])  # 9:1, as SPC-1's _unknown_ against a word
    split = task.splits[0]
    plain = finetune.epoch_order(task, split, _recipe(), 0)
    assert sorted(plain.tolist()) == sorted(split.train.tolist())  # one pass, each clip once
    cfg = _recipe(balanced_sampling=True, balanced_replacement=True, samples_per_epoch=4000)
    drawn = task.y[finetune.epoch_order(task, split, cfg, 0)]
    assert abs(float((drawn == 1).float().mean()) - 0.5) < 0.04
    assert float((task.y[plain] == 1).float().mean()) == pytest.approx(0.1)


def test_balanced_sampling_without_replacement_draws_no_clip_twice():
    task = _task([180, 20])
    split = task.splits[0]
    cfg = _recipe(balanced_sampling=True, balanced_replacement=False, samples_per_epoch=60)
    order = finetune.epoch_order(task, split, cfg, 0)
    assert len(set(order.tolist())) == 60
    assert float((task.y[order] == 1).float().mean()) > 0.2  # still biased towards the rare class (10% of clips)
    with pytest.raises(AjepaError, match="balanced_replacement"):
        finetune.epoch_order(task, split, dataclasses.replace(cfg, samples_per_epoch=201), 0)


# ------------------------------------------------------------------------------------------------
# the published recipes


AUDIOMAE_BLR = {"esc50": 1e-3, "spc2": 1e-3, "spc1": 1e-3, "as20k": 1e-3, "as2m": 2e-4, "vox1": 1e-3}


def test_every_fine_tuning_lr_is_audiomae_blr_times_batch_over_256():
    for name, blr in AUDIOMAE_BLR.items():
        r = PARAMS.recipe(name)
        assert r.lr == pytest.approx(blr * r.batch_size / 256), name


def test_published_recipes_turn_on_what_audiomae_uses():
    r = {name: PARAMS.recipe(name) for name in AUDIOMAE_BLR}
    assert all(r[n].mixup == 0.5 and r[n].mixup_alpha == 10.0 for n in ("spc2", "spc1", "as20k", "as2m"))
    assert r["esc50"].mixup == r["vox1"].mixup == 0.0 and r["esc50"].label_smoothing == 0.1
    assert all(r[n].roll and r[n].magnitude for n in ("as20k", "as2m"))  # roll_mag_aug
    assert all(r[n].noise for n in ("spc2", "spc1", "vox1")) and not any(r[n].noise for n in ("esc50", "as20k", "as2m"))
    assert r["spc1"].balanced_sampling and r["spc1"].balanced_replacement
    assert r["as2m"].balanced_sampling and not r["as2m"].balanced_replacement and r["as2m"].samples_per_epoch == 200_000
    # AudioMAE trains on every training clip of ESC-50 (4 folds) and AudioSet: no held-out clips there
    assert [n for n in r if r[n].selection == "last"] == ["esc50", "as20k", "as2m"]


def test_embedded_default_keeps_every_new_augmentation_off():
    for name in ("synth", "words"):
        r = PARAMS.recipe(name)
        assert (r.mixup, r.roll, r.magnitude, r.noise, r.balanced_sampling, r.label_smoothing) == \
            (0.0, False, False, False, False, 0.0)
        assert r.selection == "val"
    assert not PARAMS.pretrain.augment.roll and not PARAMS.pretrain.augment.magnitude


def test_mixup_must_be_a_probability():
    from conftest import load_repo_params

    from ajepa.config import parse_params
    from ajepa.errors import ConfigError

    raw = load_repo_params()
    raw["finetune"]["spc2"]["mixup"] = 10.0
    with pytest.raises(ConfigError, match="finetune.spc2.mixup = 10.0: a probability"):
        parse_params(raw)


# ------------------------------------------------------------------------------------------------
# model selection


def _band_task(n=48, classes=4):
    """Clips whose class raises one mel band, 24 train / 12 val / 12 test, on a 1 x 8 patch grid."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 16, 128, generator=g) * 0.5
    for c in range(classes):
        x[y == c, :, 32 * c:32 * c + 16] += 1.5
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 4))
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})
    return Task("bands", "splits", [f"k{i}" for i in range(classes)], x, y, index, eval_splits(index, "splits"),
                store=type("Stats", (), {"stats": {"mean": MEAN, "std": STD}})())


@pytest.mark.parametrize("selection", ["val", "last"])
def test_selection_last_trains_on_the_validation_clips_and_keeps_the_last_epoch(tmp_path, selection):
    from ajepa.models import SpectrogramEncoder
    from ajepa.train.checkpoint import load_checkpoint

    task = _band_task()
    cfg = _recipe(epochs=3, batch_size=4, warmup_epochs=0.0, head_init="zero", samples_per_epoch=0,
                  selection=selection)
    torch.manual_seed(0)
    encoder = SpectrogramEncoder((1, 8), 16, 32, 1, 2)
    r = finetune.finetune_run(task, task.splits[0], encoder, cfg, "run", torch.device("cpu"), tmp_path / "s.pt",
                              "hash")
    clips = 24 + (12 if selection == "last" else 0)  # the validation clips train too
    assert load_checkpoint(tmp_path / "s.pt")["lr"]["step"] == 3 * (clips // 4)
    if selection == "last":
        assert r.best_epoch == 3
    assert len(r.test_positions) == 12
