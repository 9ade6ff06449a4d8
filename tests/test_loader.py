import pickle

import pandas as pd
import pytest
import torch
from conftest import noise_wavs

from ajepa.data.frontend import FrontEnd
from ajepa.data.loader import MaskCollator, SpectrogramDataset, StepBatchSampler, pretrain_loader
from ajepa.data.store import FeatureStore, extract_features
from ajepa.errors import AjepaError
from ajepa.masks import MaskGenerator

N_CLIPS = 12
TARGET_LENGTH, MEL_BINS = 64, 32  # 16x16 patches: a (4, 2) grid
GRID = (TARGET_LENGTH // 16, MEL_BINS // 16)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    paths = noise_wavs(tmp, N_CLIPS, 4000, 500)
    manifest = pd.DataFrame({"clip_id": [f"c{i}" for i in range(N_CLIPS)], "path": paths,
                             "labels": ["dog" if i % 2 else "cat" for i in range(N_CLIPS)], "fold": 0,
                             "split": "train"})
    extract_features(manifest, tmp / "feat", FrontEnd(num_mel_bins=MEL_BINS), target_length=TARGET_LENGTH,
                     shard_clips=5, num_workers=1, max_reject_fraction=0.0, progress=False)
    return tmp / "feat"


@pytest.fixture
def store(store_dir):
    return FeatureStore(store_dir)


def batches(sampler):
    return [(s, list(idx)) for s, idx in sampler]


# --- StepBatchSampler ---------------------------------------------------------------------------


def test_sampler_is_a_function_of_the_seed():
    a = batches(StepBatchSampler(30, 4, seed=3, total_steps=20))
    assert a == batches(StepBatchSampler(30, 4, seed=3, total_steps=20))
    assert a != batches(StepBatchSampler(30, 4, seed=4, total_steps=20))
    assert [s for s, _ in a] == list(range(20))


def test_every_item_once_per_epoch_and_epochs_reshuffle():
    sampler = StepBatchSampler(24, 4, seed=0, total_steps=18)
    assert sampler.steps_per_epoch == 6
    out = batches(sampler)
    epochs = [sum((idx for _, idx in out[e * 6:(e + 1) * 6]), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2]


def test_drop_last_skips_a_partial_batch_and_padding_fills_it():
    dropped = StepBatchSampler(10, 4, seed=1, total_steps=2)
    items = sum((idx for _, idx in dropped), [])
    assert len(items) == len(set(items)) == 8  # one epoch: 2 full batches, 2 items left out
    padded = StepBatchSampler(10, 4, seed=1, total_steps=3, drop_last=False)
    out = batches(padded)
    assert all(len(idx) == 4 for _, idx in out)
    items = sum((idx for _, idx in out), [])
    assert sorted(set(items)) == list(range(10))
    assert items[10:] == items[:2]  # completed with the first items of the same permutation


@pytest.mark.parametrize("k", [0, 1, 5, 7, 19])
def test_resume_reproduces_the_tail(k):
    full = batches(StepBatchSampler(22, 4, seed=9, total_steps=20))
    resumed = batches(StepBatchSampler(22, 4, seed=9, start_step=k, total_steps=20))
    assert resumed == full[k:]
    assert len(StepBatchSampler(22, 4, seed=9, start_step=k, total_steps=20)) == 20 - k


def test_rank_slices_are_disjoint_and_concatenate_to_the_single_process_batch():
    B, steps = 3, 9  # 20 // 6 = 3 steps per epoch: three epochs
    single = batches(StepBatchSampler(20, 2 * B, seed=5, total_steps=steps))
    r0 = batches(StepBatchSampler(20, B, seed=5, total_steps=steps, rank=0, world_size=2))
    r1 = batches(StepBatchSampler(20, B, seed=5, total_steps=steps, rank=1, world_size=2))
    for (s, whole), (s0, a), (s1, b) in zip(single, r0, r1):
        assert s == s0 == s1
        assert len(a) == len(b) == B and not set(a) & set(b)
        assert a + b == whole


def test_endless_sampler_and_bad_sizes():
    it = iter(StepBatchSampler(8, 2, seed=0, start_step=100))
    assert [next(it)[0] for _ in range(3)] == [100, 101, 102]
    with pytest.raises(AjepaError, match="global batch 8"):
        StepBatchSampler(6, 4, seed=0, world_size=2)


# --- datasets, collate, loader --------------------------------------------------------------------


def test_dataset_spectrograms_and_labels(store_dir):
    store = FeatureStore(store_dir)
    x = SpectrogramDataset(store)[3]
    assert x.shape == (TARGET_LENGTH, MEL_BINS) and x.dtype == torch.float32
    assert torch.equal(x, store[3])
    x, y = SpectrogramDataset(store, classes=["cat", "dog"])[3]
    assert y.dtype == torch.long and int(y) == (1 if store.index["labels"][3] == "dog" else 0)
    store.index.loc[0, "labels"] = "dog;cat"
    _, y = SpectrogramDataset(store, classes=["cat", "dog", "bird"], multi_label=True)[0]
    assert y.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(AjepaError, match="2 labels"):
        SpectrogramDataset(store, classes=["cat", "dog"])
    with pytest.raises(AjepaError, match="'dog'"):
        SpectrogramDataset(FeatureStore(store_dir), classes=["cat"])


def test_store_pickles_without_its_memory_maps(store):
    store[0], store[11]  # open the maps
    blob = pickle.dumps(store)
    assert len(blob) < 50_000  # the index, not the shards
    assert torch.equal(pickle.loads(blob)[11], store[11])


def test_collator_masks_are_the_generators(store):
    gen = MaskGenerator(GRID, mode="curriculum", total_steps=10, seed=2)
    batch = MaskCollator(gen)([(7, store[i]) for i in range(4)])
    expected = gen(4, 7)
    assert batch.step == 7 and batch.x.shape == (4, TARGET_LENGTH, MEL_BINS)
    assert torch.equal(batch.masks.context, expected.context) and torch.equal(batch.masks.targets, expected.targets)
    with pytest.raises(ValueError, match="one step"):
        MaskCollator(gen)([(1, store[0]), (2, store[1])])


def collect(loader):
    return [(b.step, b.x.clone(), b.masks.context.clone(), b.masks.targets.clone(), b.masks.mode) for b in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u[0] == v[0] and u[4] == v[4]
        assert all(torch.equal(p, q) for p, q in zip(u[1:4], v[1:4]))


def test_loader_same_batches_with_and_without_workers(store):
    B, steps, seed = 4, 6, 11
    gen = MaskGenerator(GRID, mode="curriculum", total_steps=steps, seed=seed)
    serial = collect(pretrain_loader(store, B, gen, seed, total_steps=steps, num_workers=0))
    parallel = collect(pretrain_loader(store, B, gen, seed, total_steps=steps, num_workers=2))
    assert_same(serial, parallel)
    sampler = StepBatchSampler(len(store), B, seed, total_steps=steps)
    assert [b[0] for b in serial] == list(range(steps))
    for (step, x, ctx, tgt, mode), (_s, idx) in zip(serial, sampler):
        assert torch.equal(x, torch.stack([store[i] for i in idx]))
        m = gen(B, step)
        assert torch.equal(ctx, m.context) and torch.equal(tgt, m.targets) and mode == m.mode
    modes = {b[4] for b in serial}
    assert modes <= {"block", "tf"}


def test_loader_resume_and_ranks_match_the_single_process_run(store):
    B, steps, seed = 2, 5, 4
    gen = MaskGenerator(GRID, mode="block", total_steps=steps, seed=seed)
    full = collect(pretrain_loader(store, 2 * B, gen, seed, total_steps=steps))
    assert_same(collect(pretrain_loader(store, 2 * B, gen, seed, start_step=3, total_steps=steps)), full[3:])
    ranks = [collect(pretrain_loader(store, B, gen, seed, total_steps=steps, rank=r, world_size=2)) for r in (0, 1)]
    for whole, a, b in zip(full, *ranks):
        assert whole[0] == a[0] == b[0]
        for k in (1, 2, 3):  # x, context, targets: rank batches concatenate to the global batch
            assert torch.equal(torch.cat([a[k], b[k]]), whole[k])
    # the loader does not touch the global torch RNG (drop path draws from it)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    collect(pretrain_loader(store, B, gen, seed, total_steps=2))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_batch_pins_masks_too(store):
    gen = MaskGenerator(GRID, mode="block", total_steps=2, seed=0)
    batch = next(iter(pretrain_loader(store, 2, gen, 0, total_steps=2)))
    assert batch.x.is_pinned() and batch.masks.context.is_pinned() and batch.masks.targets.is_pinned()
