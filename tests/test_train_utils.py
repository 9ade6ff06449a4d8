import multiprocessing as mp
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from ajepa.errors import AjepaError
from ajepa.export import read_export, write_export
from ajepa.models import AJEPA, SpectrogramEncoder
from ajepa.train.checkpoint import config_hash, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ajepa.train.distributed import all_reduce_mean, cleanup, init_distributed
from ajepa.train.schedules import CosineWeightDecay, LinearMomentum, WarmupCosine, param_groups

ENC = dict(grid=(4, 2), embed_dim=32, depth=2, num_heads=2)


def tiny_ajepa():
    torch.manual_seed(0)
    return AJEPA(ENC, dict(embed_dim=16, depth=1, num_heads=2))


# --- schedules ----------------------------------------------------------------------------------


def test_warmup_cosine_endpoints_and_midpoint():
    s = WarmupCosine(base_value=1.0, final_value=0.1, warmup_steps=10, total_steps=110, start_value=0.2)
    assert s.value(0) == pytest.approx(0.2)
    assert s.value(5) == pytest.approx(0.6)  # halfway up the warmup
    assert s.value(10) == pytest.approx(1.0)
    assert s.value(60) == pytest.approx(0.55)  # halfway down the cosine
    assert s.value(110) == pytest.approx(0.1) and s.value(1000) == pytest.approx(0.1)
    values = [s.step() for _ in range(12)]
    assert values == [s.value(i) for i in range(12)] and s.current_step == 12
    with pytest.raises(ValueError):
        WarmupCosine(1.0, 0.0, warmup_steps=20, total_steps=10)


def test_lr_respects_per_group_lr_scale():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.25}], lr=123.0)
    s = WarmupCosine(2.0, 0.0, warmup_steps=4, total_steps=8, optimizer=opt)
    for _ in range(3):
        v = s.step()
    assert v == pytest.approx(1.0)  # step 2 of 4 of warmup from 0 to 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.25])


def test_weight_decay_only_on_decaying_groups_even_after_reaching_zero():
    model = SpectrogramEncoder(**ENC)
    opt = torch.optim.AdamW(param_groups(model, 0.05))
    s = CosineWeightDecay(0.1, 0.0, total_steps=4, optimizer=opt)
    assert s.value(0) == pytest.approx(0.1) and s.value(2) == pytest.approx(0.05) and s.value(4) == 0.0
    for _ in range(5):
        s.step()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    # a decayed-to-zero group is still known as a decaying one, also through the optimizer's state_dict
    opt2 = torch.optim.AdamW(param_groups(model, 0.05))
    opt2.load_state_dict(opt.state_dict())
    s2 = CosineWeightDecay(0.1, 0.0, total_steps=4, optimizer=opt2)
    s2.step()
    assert [g["weight_decay"] for g in opt2.param_groups] == [pytest.approx(0.1), 0.0]


def test_momentum_endpoints():
    m = LinearMomentum(0.996, 1.0, total_steps=100)
    assert m.value(0) == pytest.approx(0.996)
    assert m.value(50) == pytest.approx(0.998)
    assert m.value(100) == 1.0 and m.value(250) == 1.0
    assert [m.step() for _ in range(3)] == [m.value(i) for i in range(3)]


def test_schedule_state_resumes_the_same_sequence(tmp_path):
    make = [lambda: WarmupCosine(1e-3, 1e-6, 5, 40, start_value=1e-5), lambda: CosineWeightDecay(0.04, 0.4, 40),
            lambda: LinearMomentum(0.99, 1.0, 40)]
    for new in make:
        uninterrupted = new()
        values = [uninterrupted.step() for _ in range(20)]
        first = new()
        [first.step() for _ in range(7)]
        save_checkpoint(tmp_path / "s.pt", {"schedule": first.state_dict()})
        resumed = new()
        resumed.load_state_dict(load_checkpoint(tmp_path / "s.pt")["schedule"])
        assert [resumed.step() for _ in range(13)] == values[7:]


def test_param_groups_exclude_biases_norms_1d_and_embeddings():
    model = tiny_ajepa()
    model.learned = nn.Module()
    model.learned.pos_embed = nn.Parameter(torch.zeros(1, 8, 32))  # e.g. a learned positional table
    groups = param_groups(model, 0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert not any(n.startswith("target_encoder.") for n in decay | no_decay)  # EMA copy: no gradients
    for n in ["context_encoder.patch_embed.proj.bias", "context_encoder.norm.weight", "context_encoder.norm.bias",
              "context_encoder.blocks.0.norm1.weight", "context_encoder.blocks.1.attn.qkv.bias",
              "predictor.mask_token", "learned.pos_embed"]:
        assert n in no_decay, n
    for n in ["context_encoder.patch_embed.proj.weight", "context_encoder.blocks.0.attn.qkv.weight",
              "context_encoder.blocks.1.mlp.fc2.weight", "predictor.embed.weight", "predictor.proj.weight"]:
        assert n in decay, n
    assert all(p.ndim > 1 for p in groups[0]["params"])


# --- checkpoint ---------------------------------------------------------------------------------


def train_step(model, opt, x, masks):
    loss = model(x, *masks)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.update_target(0.99)


def test_checkpoint_round_trip_resumes_the_same_training(tmp_path):
    from ajepa.masks import MaskGenerator
    model = tiny_ajepa()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    lr = WarmupCosine(1e-3, 1e-5, 1, 4, optimizer=opt)
    x = torch.randn(2, 64, 32)
    gen = MaskGenerator((4, 2), mode="block", total_steps=4, seed=0)
    m = gen(2, 0)
    lr.step()
    train_step(model, opt, x, (m.context, m.targets))
    random.random(), np.random.randn(), torch.rand(1)  # leave the generators mid-stream (numpy: cached gaussian)
    state = {"step": 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "lr": lr.state_dict(),
             "rng": rng_state(), "config_hash": config_hash({"lr": 1e-3})}
    save_checkpoint(tmp_path / "ckpt.pt", state)
    expected_draws = (random.random(), np.random.randn(3).tolist(), torch.rand(3))

    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the property the format promises
    assert loaded["config_hash"] == state["config_hash"]
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    set_rng_state(loaded["rng"])
    draws = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])

    model2 = AJEPA(ENC, dict(embed_dim=16, depth=1, num_heads=2))
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.AdamW(param_groups(model2, 0.05), lr=1e-3, betas=(0.9, 0.95))
    opt2.load_state_dict(loaded["optimizer"])
    lr2 = WarmupCosine(1e-3, 1e-5, 1, 4, optimizer=opt2)
    lr2.load_state_dict(loaded["lr"])
    m = gen(2, 1)
    for mod, o, s in ((model, opt, lr), (model2, opt2, lr2)):
        s.step()
        train_step(mod, o, x, (m.context, m.targets))
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_unloadable_values_are_refused_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"state\['log'\]\['loss'\].*numpy"):
        save_checkpoint(tmp_path / "c.pt", {"log": {"loss": np.float64(1.0)}})
    assert not (tmp_path / "c.pt").exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(10)})
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # leave a partial file behind, as a kill during the write would
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind


def test_truncated_or_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 3, "w": torch.randn(100, 100)})
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(AjepaError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "corrupt or truncated" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AjepaError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_encoder_export_round_trip(tmp_path):
    torch.manual_seed(1)
    encoder = SpectrogramEncoder(**ENC)

    class Wrapped(nn.Module):  # keys "module.*", as DistributedDataParallel has them
        def __init__(self, module):
            super().__init__()
            self.module = module

    architecture = {**ENC, "grid": list(ENC["grid"]), "patch_size": 16}
    frontend = {"sample_rate": 16000, "num_mel_bins": 32, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
                "target_length": 64}
    write_export(tmp_path / "encoder", Wrapped(encoder), {"encoder": "context", "architecture": architecture,
                                                          "frontend": frontend, "normalisation": {"mean": 0, "std": 1}})
    where, state, config = read_export(tmp_path / "encoder" / "model.safetensors")
    assert where == tmp_path / "encoder" and config["architecture"] == architecture
    fresh = SpectrogramEncoder(**{**architecture, "grid": tuple(architecture["grid"])})
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 64, 32)
    encoder.eval(), fresh.eval()
    assert torch.equal(encoder(x), fresh(x))
    (tmp_path / "encoder/model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AjepaError, match="encoder/model.safetensors: corrupt or truncated"):
        read_export(tmp_path / "encoder")


def test_config_hash_is_canonical():
    @dataclass
    class Cfg:
        lr: float
        grid: tuple

    h = config_hash({"a": 1, "b": [1, 2], "c": {"x": 0.5, "y": None}})
    assert h == config_hash({"c": {"y": None, "x": 0.5}, "b": (1, 2), "a": 1})
    assert h != config_hash({"a": 1, "b": [1, 2], "c": {"x": 0.25, "y": None}})
    assert len(h) == 64 and int(h, 16) >= 0
    assert config_hash(Cfg(1e-3, (64, 8))) == config_hash({"grid": [64, 8], "lr": 0.001})


# --- distributed --------------------------------------------------------------------------------


def test_without_torchrun_env_is_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert not dist.is_initialized()
    t = torch.tensor([1.0, 3.0])
    out = all_reduce_mean(t)
    assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()
    assert all_reduce_mean(torch.tensor(3)).dtype == torch.float64
    cleanup()


def _worker(rank, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        info = init_distributed(device="cpu")
        queue.put((rank, info.rank, info.world_size, info.is_main, all_reduce_mean(torch.tensor([rank + 1.0])).item()))
        cleanup()
    except Exception as e:  # report instead of hanging the parent
        queue.put((rank, repr(e)))


def test_two_cpu_processes_with_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == [(0, 0, 2, True, 1.5), (1, 1, 2, False, 1.5)]
