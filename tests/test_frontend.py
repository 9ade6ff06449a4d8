import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio

from ajepa.data.frontend import FrontEnd, normalize, pad_or_crop
from ajepa.data.store import FeatureStore, extract_features


def audiomae_fbank(path: str) -> torch.Tensor:
    """The reference computation as AudioMAE/AST write it, independent of ajepa's code."""
    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    wav = torch.from_numpy(wav.T.copy()).mean(0, keepdim=True)
    wav = torchaudio.functional.resample(wav, sr, 16000)
    wav = wav - wav.mean()
    return torchaudio.compliance.kaldi.fbank(wav, htk_compat=True, sample_frequency=16000, use_energy=False,
                                             window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)


def _stereo_clip(path, seconds=1.3, sr=44100, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    right = 0.2 * np.sin(2 * np.pi * 1234 * t * (1 + t)) + 0.05 * rng.standard_normal(len(t)) + 0.1  # DC offset
    sf.write(path, np.stack([left, right], 1).astype(np.float32), sr, subtype="FLOAT")


def test_frontend_equals_audiomae_reference(tmp_path):
    path = tmp_path / "a.wav"
    _stereo_clip(path)
    ours = FrontEnd()(path)
    ref = audiomae_fbank(str(path))
    assert ours.shape == ref.shape == (128, 128)  # 1.3 s -> 1 + (20800 - 400) // 160 frames
    assert torch.equal(ours, ref)


def test_stored_features_match_reference_and_are_normalised(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"c{i}.wav"))
        _stereo_clip(paths[-1], seconds=0.9 + 0.5 * i, seed=i)
    manifest = pd.DataFrame({"clip_id": ["a", "b", "c"], "path": paths, "labels": "x", "fold": 0,
                             "split": ["train", "train", "test"]})
    extract_features(manifest, tmp_path / "feat", FrontEnd(), target_length=112, shard_clips=2, num_workers=1,
                     max_reject_fraction=0.0, progress=False)
    store = FeatureStore(tmp_path / "feat")
    refs = [audiomae_fbank(p) for p in paths]
    for i, ref in enumerate(refs):
        n = ref.shape[0]
        raw = torch.from_numpy(store.raw(i).astype(np.float32))
        assert store.index["n_frames"][i] == n
        keep = min(n, 112)
        # float16 storage: relative precision 2^-11 of values up to ~|20|
        assert torch.allclose(raw[:keep], ref[:keep], atol=0.02, rtol=1e-3)
        assert torch.all(raw[keep:] == 0)
    # statistics from the train split's valid frames only (clip c is test)
    train = torch.cat([refs[0], refs[1][:112]]).double()
    assert abs(store.mean - train.mean().item()) < 1e-3
    assert abs(store.std - train.std(unbiased=False).item()) < 1e-3
    x = store[1]
    assert x.dtype == torch.float32 and x.shape == (112, 128)
    expected = (torch.from_numpy(store.raw(1).astype(np.float32)) - store.mean) / (2 * store.std)
    assert torch.allclose(x, expected)


def test_pad_or_crop_known_inputs():
    x = torch.arange(12.0).reshape(6, 2)
    padded = pad_or_crop(x, 8)
    assert padded.shape == (8, 2) and torch.equal(padded[:6], x) and torch.all(padded[6:] == 0)
    cropped = pad_or_crop(x, 4)
    assert torch.equal(cropped, x[:4])
    assert torch.equal(pad_or_crop(x, 6), x)


def test_normalise_known_inputs():
    x = torch.tensor([-4.0, 0.0, 6.0])
    assert torch.allclose(normalize(x, mean=2.0, std=3.0), torch.tensor([-1.0, -1 / 3, 2 / 3]))


def test_resampler_matches_functional(tmp_path):
    wav = torch.randn(1, 22050)
    fe = FrontEnd()
    assert torch.equal(fe.resample(wav, 22050), torchaudio.functional.resample(wav, 22050, 16000))


def test_pcm16_fast_path_is_bit_identical(tmp_path):
    """PCM16 files are read as int16 and scaled by 2^-15; the result must equal libsndfile's float read."""
    path = tmp_path / "pcm16.wav"
    rng = np.random.default_rng(3)
    sf.write(path, (0.5 * rng.standard_normal((30000, 2))).clip(-1, 1).astype(np.float32), 44100, subtype="PCM_16")
    assert sf.info(str(path)).subtype == "PCM_16"
    assert torch.equal(FrontEnd()(path), audiomae_fbank(str(path)))
