"""`ajepa embed` on a folder of generated audio (with a corrupt file): one row per readable clip, the
unreadable one listed, an interrupted run resumed, a finished one not redone."""

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import ajepa
from ajepa.cli import main
from ajepa.tools.embed import audio_files, embed_files


def _tone(seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(len(t))
    return np.stack([x] * channels, 1) if channels > 1 else x


@pytest.fixture
def audio_dir(tmp_path):
    """Seven clips of other lengths, rates, channels and formats (one in a sub-folder), a corrupt WAV
    and a text file."""
    root = tmp_path / "audio"
    (root / "more").mkdir(parents=True)
    for i, (seconds, sr) in enumerate([(0.5, 16000), (1.0, 22050), (2.5, 44100), (0.02, 8000), (1.2, 16000)]):
        sf.write(root / f"clip{i}.wav", _tone(seconds, sr, i), sr, subtype="PCM_16")
    sf.write(root / "stereo.wav", _tone(1.0, 48000, 7, channels=2), 48000, subtype="FLOAT")
    sf.write(root / "more" / "deep.flac", _tone(0.8, 32000, 8), 32000)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    (root / "notes.txt").write_text("not audio")
    return root


def _read(out):
    with np.load(out) as z:
        return list(z["paths"]), z["embeddings"]


def test_embed_a_folder(tiny_export, audio_dir, in_tmp, capsys):
    models, _ = tiny_export
    assert main(["embed", str(audio_dir), "--out", "emb.npz", "--encoder", str(models), "--batch-size", "3",
                 "--save-every", "2"]) == 0
    summary = capsys.readouterr().out
    assert "7 of 8 clips -> emb.npz" in summary and "1 unreadable" in summary and "broken.wav" in summary
    paths, emb = _read(in_tmp / "emb.npz")
    readable = [str(p) for p in audio_files([str(audio_dir)]) if p.name != "broken.wav"]
    assert paths == readable and emb.shape == (7, 8 * 32) and emb.dtype == np.float32
    model = ajepa.load_encoder(models)
    for path, row in zip(paths, emb):  # each row is the clip's own embedding, whatever its rate and channels
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
        assert np.allclose(row, model.embed(wav.mean(1), sr).numpy(), atol=1e-5), path
    index = pd.read_csv(in_tmp / "emb.csv")
    assert list(index["path"]) == paths and list(index["row"]) == list(range(7))
    assert index["seconds"].iloc[2] == pytest.approx(2.5, abs=0.01)
    rejects = pd.read_csv(in_tmp / "emb.rejects.csv")
    assert list(rejects["path"]) == [str(audio_dir / "broken.wav")] and "unreadable" in rejects["reason"][0]
    assert not (in_tmp / "emb.npz.parts").exists()
    # the other encoder of the folder
    assert main(["embed", str(audio_dir / "clip0.wav"), "--out", "t.npz", "--encoder", str(models),
                 "--which", "target"]) == 0
    assert not np.allclose(_read(in_tmp / "t.npz")[1][0], emb[0], atol=1e-3)


def test_an_interrupted_run_resumes(tiny_export, audio_dir, tmp_path):
    models, _ = tiny_export
    model = ajepa.load_encoder(models)
    files = audio_files([str(audio_dir)])
    embed_files(model, files, tmp_path / "straight.npz", batch_size=2, save_every=2)
    calls, embed = [], model.embed

    def interrupted(clips, sample_rate):
        calls.append(len(clips))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return embed(clips, sample_rate)

    model.embed = interrupted
    with pytest.raises(KeyboardInterrupt):
        embed_files(model, files, tmp_path / "emb.npz", batch_size=2, save_every=2)
    assert not (tmp_path / "emb.npz").exists() and len(list((tmp_path / "emb.npz.parts").glob("part-*"))) == 2
    calls.clear()
    model.embed = embed
    r = embed_files(model, files, tmp_path / "emb.npz", batch_size=2, save_every=2)
    assert r["reused"] == 4 and r["clips"] == 7 and [p for p, _ in r["rejects"]] == [str(audio_dir / "broken.wav")]
    paths, emb = _read(tmp_path / "emb.npz")
    straight_paths, straight = _read(tmp_path / "straight.npz")
    assert paths == straight_paths and np.array_equal(emb, straight)
    # a finished run is not redone; a new clip and a changed one are embedded, a deleted one dropped
    sf.write(audio_dir / "new.wav", _tone(0.7, 16000, 11), 16000)
    sf.write(audio_dir / "clip0.wav", _tone(0.5, 16000, 12), 16000)
    (audio_dir / "clip1.wav").unlink()
    files = audio_files([str(audio_dir)])
    model.embed = lambda clips, sr: (calls.append(len(clips)), embed(clips, sr))[1]
    r = embed_files(model, files, tmp_path / "emb.npz", batch_size=8, save_every=8)
    assert r == {"clips": 7, "reused": 5, "rejects": r["rejects"]} and calls == [2]
    paths, emb = _read(tmp_path / "emb.npz")
    assert str(audio_dir / "new.wav") in paths and str(audio_dir / "clip1.wav") not in paths
    fresh = embed(sf.read(audio_dir / "clip0.wav", dtype="float32")[0], 16000).numpy()
    assert np.allclose(emb[paths.index(str(audio_dir / "clip0.wav"))], fresh, atol=1e-6)


def test_parts_of_another_encoder_are_refused(tiny_export, audio_dir, tmp_path, capsys):
    models, _ = tiny_export
    files = audio_files([str(audio_dir / "clip0.wav"), str(audio_dir / "clip4.wav")])
    context = ajepa.load_encoder(models, "context")
    embed_files(context, files, tmp_path / "emb.npz")
    (tmp_path / "emb.npz.parts").mkdir()
    (tmp_path / "emb.npz").rename(tmp_path / "emb.npz.parts" / "part-00000.npz")
    args = ["embed", *map(str, files), "--out", str(tmp_path / "emb.npz"), "--encoder", str(models)]
    assert main(args + ["--which", "target"]) == 2
    assert "another encoder" in capsys.readouterr().err
    assert main(args + ["--which", "context"]) == 0 and "2 kept from an earlier run" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(tiny_export, audio_dir, tmp_path, capsys):
    models, _ = tiny_export
    cases = {("--out", str(tmp_path / "e.parquet")): "must end in .npz",
             ("--out", str(tmp_path / "e.npz"), "--batch-size", "0"): "at least 1",
             ("--out", str(tmp_path / "e.npz"), "--encoder", str(tmp_path)): "no encoder export here"}
    for extra, message in cases.items():
        assert main(["embed", str(audio_dir), "--encoder", str(models), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["embed", str(tmp_path / "nothing"), "--out", str(tmp_path / "e.npz"), "--encoder", str(models)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert torch.is_tensor(ajepa.load_encoder(models).embed(np.zeros(10), 16000))  # shorter than one frame
