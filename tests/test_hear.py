"""The HEAR API wrapper: hear-validator's checks, done directly, and the embeddings against the pipeline."""
import math
import shutil

import numpy as np
import pytest
import torch

from ajepa import hear
from ajepa.data.frontend import FrontEnd, normalize, pad_or_crop
from ajepa.errors import AjepaError
from ajepa.export import write_export
from ajepa.models import SpectrogramEncoder, pool_tokens

SR = 16000
# a window of 4 time patches (64 frames, 0.64 s): audio of a few seconds spans several windows
TINY = {"grid": [4, 8], "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
        "drop_path": 0.1}


def noise(n_sounds: int, n_samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_sounds, n_samples, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model() -> hear.HearModel:
    return hear.load_model(encoder_config=TINY)


FRONTEND = {"sample_rate": SR, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
            "target_length": 64}
STATS = {"mean": -6.6268077, "std": 5.358466}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny encoder with weights of its own, exported as pretraining does (a folder with its statistics)."""
    torch.manual_seed(123)
    encoder = SpectrogramEncoder(grid=tuple(TINY["grid"]), **{k: v for k, v in TINY.items() if k != "grid"})
    path = tmp_path_factory.mktemp("export") / "encoder"
    write_export(path, encoder, {"encoder": "target", "architecture": TINY, "frontend": FRONTEND,
                                 "normalisation": STATS})
    return path, encoder.eval()


def test_model_attributes(model):
    assert isinstance(model, torch.nn.Module)
    assert type(model.sample_rate) is int and model.sample_rate == SR
    # one token per frequency patch, concatenated: 8 bands x embed_dim
    width = TINY["grid"][1] * TINY["embed_dim"]
    assert type(model.scene_embedding_size) is int and model.scene_embedding_size == width
    assert type(model.timestamp_embedding_size) is int and model.timestamp_embedding_size == width
    default = hear.load_model(random_init=True)
    assert default.scene_embedding_size == hear.DEFAULT_ENCODER["grid"][1] * hear.DEFAULT_ENCODER["embed_dim"]
    assert default.encoder.grid == tuple(hear.DEFAULT_ENCODER["grid"])


# 1 sample, less than one fbank frame, less than one patch, the validators' lengths, longer than 5 windows
@pytest.mark.parametrize("n_samples", [1, 300, 1000, 17120, 31680, 64000])
def test_timestamp_embeddings_shapes_and_timestamps(model, n_samples):
    emb, ts = hear.get_timestamp_embeddings(noise(2, n_samples), model)
    n_ts = max(1, math.floor((n_samples / SR * 1000 - 87.5) / 40) + 1)
    assert emb.shape == (2, n_ts, model.timestamp_embedding_size) and ts.shape == (2, n_ts)
    assert emb.dtype == ts.dtype == torch.float32 and emb.device == ts.device == torch.device("cpu")
    assert torch.isfinite(emb).all()
    assert (ts == ts[:1]).all()
    length_ms = 1000 * n_samples / SR
    assert ts[0, 0] == 87.5  # centre of the first patch: frames 0..15 span 0..175 ms
    if n_ts > 1:
        diff = ts.diff(dim=1).numpy()
        assert np.all(diff == 40.0)  # constant hop, <= 50 ms
        # hear-validator: the last timestamp lies within the audio and at most two hops before its end
        assert length_ms - 2 * 40 <= ts.max() <= length_ms
        assert length_ms - 40 < ts.max()


def test_scene_embeddings_are_the_linear_probes(exported):
    """The fbank cut into grid-length windows from frame 0, the last zero-padded; each window's tokens
    pooled as the linear probe pools them (mean over time, frequency patches concatenated); the mean
    over the windows. A trailing piece shorter than one patch is dropped, as the feature store crops it."""
    path, encoder = exported
    model = hear.load_model(str(path))
    audio = noise(2, int(1.5 * SR))
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (2, model.scene_embedding_size) and scene.dtype == torch.float32
    for clip, emb in zip(audio, scene):
        fbank = FrontEnd().fbank(clip[None])  # 148 frames: two windows of 64 and 20 frames of a third
        frames = normalize(pad_or_crop(fbank, 3 * 64).half().float(), STATS["mean"], STATS["std"])
        with torch.no_grad():
            pooled = pool_tokens(encoder(frames.reshape(3, 64, 128)), encoder.grid, "time")
        assert torch.allclose(emb, pooled.mean(0), atol=1e-5)
    # 64 + 15 frames: the 15-frame remainder is dropped, so the clip is its first window
    clip = noise(1, 15 * 160 + 64 * 160 + 240, seed=5)
    window = normalize(FrontEnd().fbank(clip)[:64].half().float(), STATS["mean"], STATS["std"])
    with torch.no_grad():
        first = pool_tokens(encoder(window[None]), encoder.grid, "time")
    assert torch.allclose(hear.get_scene_embeddings(clip, model), first, atol=1e-5)
    assert hear.get_scene_embeddings(noise(2, 50), model).shape == (2, model.scene_embedding_size)


def test_embeddings_are_deterministic_and_independent_of_batch_position(model):
    a, b, c = noise(3, 12800, seed=1)
    emb_abc, _ = hear.get_timestamp_embeddings(torch.stack([a, b, c]), model)
    assert torch.equal(emb_abc, hear.get_timestamp_embeddings(torch.stack([a, b, c]), model)[0])
    emb_cb, _ = hear.get_timestamp_embeddings(torch.stack([c, b]), model)
    emb_a, _ = hear.get_timestamp_embeddings(a[None], model)
    assert torch.allclose(emb_abc[1], emb_cb[1], atol=1e-5) and torch.allclose(emb_abc[2], emb_cb[0], atol=1e-5)
    assert torch.allclose(emb_abc[0], emb_a[0], atol=1e-5)
    assert not torch.allclose(emb_abc[0], emb_abc[1])


def test_random_model_is_seeded_without_touching_the_global_rng(model):
    audio = noise(1, 8000)
    rng = torch.get_rng_state()
    same = hear.load_model(encoder_config=TINY)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(hear.get_scene_embeddings(audio, same), hear.get_scene_embeddings(audio, model))
    other = hear.load_model(encoder_config=TINY, seed=1)
    assert not torch.allclose(hear.get_scene_embeddings(audio, other), hear.get_scene_embeddings(audio, model))


def test_exported_encoder_weights_and_front_end_are_used(exported, model):
    path, encoder = exported
    mean, std = -6.6268077, 5.358466
    loaded = hear.load_model(str(path), mean=mean, std=std)
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[name], tensor), name
    audio = noise(1, 24000, seed=3) + 0.2  # a DC offset, for the mean removal
    emb, _ = hear.get_timestamp_embeddings(audio, loaded)
    assert not torch.allclose(emb, hear.get_timestamp_embeddings(audio, hear.load_model(
        encoder_config=TINY, mean=mean, std=std))[0], atol=1e-2)
    # reference: the pipeline's fbank, zero-padded and float16 as the feature store keeps it, encoded
    # window by window; embedding k is the column of frequency patches on frames 4k..4k+15, concatenated
    n_time = TINY["grid"][0]
    window = n_time * 16
    fbank = pad_or_crop(FrontEnd().fbank(audio), 12 + 8 * window)  # zeros past the end
    frames = normalize(fbank.half().float(), mean, std)
    windows = {}  # first frame -> per-patch embeddings of the window starting there
    for k in range(emb.shape[1]):
        patch = 4 * k // 16 % n_time  # the patch's place in its window
        first = 4 * k - 16 * patch
        if first not in windows:
            with torch.no_grad():
                windows[first] = encoder(frames[None, first:first + window])[0].reshape(n_time, -1)
        assert torch.allclose(emb[0, k], windows[first][patch], atol=1e-5), k
    assert len(windows) == 4 * 3  # 4 shifts x 3 windows for 35 embeddings


def test_normalisation_statistics_are_used(model):
    audio = noise(1, 8000)
    other = hear.load_model(encoder_config=TINY, mean=-6.0, std=5.0)
    assert not torch.allclose(hear.get_scene_embeddings(audio, model), hear.get_scene_embeddings(audio, other))


def test_eval_even_after_train_mode(model):
    audio = noise(1, 8000)
    before = hear.get_scene_embeddings(audio, model)
    model.train()
    try:
        assert torch.equal(hear.get_scene_embeddings(audio, model), before)  # drop path is off
    finally:
        model.eval()


def test_errors(tmp_path, exported):
    with pytest.raises(AjepaError, match="no model_file_path: pass an export folder .* or random_init=True"):
        hear.load_model()  # never an untrained encoder unasked
    path, _ = exported
    with pytest.raises(AjepaError, match="encoder_config"):
        hear.load_model(str(path), encoder_config=TINY)
    with pytest.raises(AjepaError, match="mel bins"):
        hear.load_model(encoder_config={**TINY, "grid": [4, 4]})
    with pytest.raises(AjepaError, match="not found"):
        hear.load_model(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad/model.safetensors"
    shutil.copytree(path, bad.parent)
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AjepaError, match="corrupt"):
        hear.load_model(str(bad))
    deeper = tmp_path / "deeper"
    write_export(deeper, SpectrogramEncoder(grid=(4, 8), embed_dim=32, depth=1, num_heads=2),
                 {"encoder": "target", "architecture": {**TINY, "depth": 2}, "frontend": FRONTEND,
                  "normalisation": STATS})
    with pytest.raises(AjepaError, match="do not fit"):
        hear.load_model(str(deeper))
    model = hear.load_model(str(path))
    with pytest.raises(AjepaError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(16000), model)
    with pytest.raises(AjepaError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(2, 0), model)
    with pytest.raises(AjepaError, match="NaN"):
        hear.get_scene_embeddings(torch.full((1, 1000), float("nan")), model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_outputs_on_the_models_device(exported):
    path, _ = exported
    model = hear.load_model(str(path))
    audio = noise(2, 20000)
    cpu_emb, _ = hear.get_timestamp_embeddings(audio, model)
    model.to("cuda")
    emb, ts = hear.get_timestamp_embeddings(audio.cuda(), model)
    assert emb.device.type == ts.device.type == "cuda" and emb.dtype == torch.float32
    assert torch.allclose(emb.cpu(), cpu_emb, atol=1e-3)


def test_hear_validator(exported):
    validate = pytest.importorskip("hearvalidator.validate")  # needs TensorFlow; optional extra
    path, _ = exported
    validate.ValidateModel("ajepa.hear", str(path), device="cpu")()
