"""Audio inputs a careless hand leaves: link loops in an audio folder, names that are no audio file
(a dangling link, a FIFO, a folder called x.wav), a file deleted during the run, a name the terminal
cannot print, and files far longer than what is kept. Each is a rejects row or a finished run: never
a hang, a traceback or memory that grows with the file."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from data_clips import write_clips
from exports import make_export
from train_project import ENV

from ajepa.data.frontend import FrontEnd
from ajepa.datasets.audioset import index_audio
from ajepa.hear import load_model
from ajepa.tools.embed import audio_files, embed_files

HERE = Path(__file__).resolve().parent
CHILD_ENV = {**ENV, "PYTHONPATH": os.pathsep.join([ENV["PYTHONPATH"], str(HERE)])}


def _noise(path: Path, seconds: float, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16") -> Path:
    """A noise WAV written a minute at a time (the test itself holds no more than that)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, channels, subtype) as f:
        left = int(seconds * rate)
        while left:
            n = min(left, 60 * rate)
            f.write((0.1 * rng.standard_normal((n, channels))).astype(np.float32))
            left -= n
    return path


def _in_child(code: str, extra_mb: int) -> subprocess.CompletedProcess:
    """`code` in a child whose heap may grow by `extra_mb` over what its imports took."""
    script = textwrap.dedent("""
        import resource, sys
        import ajepa.cli, ajepa.data.store, ajepa.encoder
        data = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (data + (EXTRA << 20), resource.RLIM_INFINITY))
    """).replace("EXTRA", str(extra_mb)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], env=CHILD_ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_link_loops_in_an_audioset_folder_list_each_file_once(tmp_path):
    audio = tmp_path / "audio"
    (audio / "part1").mkdir(parents=True)
    for ytid in ("aaaaaaaaaaa", "bbbbbbbbbbb"):
        (audio / "part1" / f"{ytid}.wav").write_bytes(b"")
    (audio / "loop").symlink_to(".")  # `ln -s . audio/loop`
    (audio / "part1" / "up").symlink_to("..")  # a second loop: the plain walk never ends
    code = textwrap.dedent(f"""
        from pathlib import Path
        from ajepa.datasets.audioset import index_audio
        found, unreadable, duplicates = index_audio(Path({str(audio)!r}), {{"aaaaaaaaaaa", "bbbbbbbbbbb"}})
        print(sorted(str(p) for p in found.values()), duplicates)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"{[str(audio / 'part1' / f'{y}.wav') for y in ('aaaaaaaaaaa', 'bbbbbbbbbbb')]} []"


def test_a_link_to_a_sibling_folder_adds_no_duplicate(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ccccccccccc.flac").write_bytes(b"")
    (tmp_path / "b").symlink_to("a")
    found, _, duplicates = index_audio(tmp_path, {"ccccccccccc"})
    assert list(found) == ["ccccccccccc"] and duplicates == []


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(make_export(tmp_path_factory.mktemp("export") / "export")))


def test_names_that_are_no_audio_file_get_a_rejects_row(tmp_path, model):
    write_clips(tmp_path / "in", 2)
    (tmp_path / "in" / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    os.mkfifo(tmp_path / "in" / "pipe.wav")
    (tmp_path / "in" / "folder.wav").mkdir()
    files = audio_files([str(tmp_path / "in")])
    r = embed_files(model, files, tmp_path / "e.npz")
    assert r["clips"] == 2
    rejects = pd.read_csv(tmp_path / "e.rejects.csv")
    assert dict(zip(rejects.path.map(lambda p: Path(p).name), rejects.reason)) == {
        "gone.wav": "dangling symbolic link", "pipe.wav": "not a regular file (a FIFO, socket or device)",
        "folder.wav": "a folder, not an audio file"}


def test_a_file_deleted_after_the_listing_is_rejected_with_its_reason(tmp_path, model):
    write_clips(tmp_path / "in", 3)
    files = audio_files([str(tmp_path / "in")])
    files[1].unlink()  # between the listing and the read
    r = embed_files(model, files, tmp_path / "e.npz")
    assert r["clips"] == 2
    assert r["rejects"] == [(str(files[1]), "file not found (deleted or moved after it was listed)")]
    with pytest.raises(Exception, match="file not found"):
        FrontEnd().load(files[1])


@pytest.mark.slow
def test_a_name_the_terminal_cannot_encode_is_printed_escaped(tmp_path):
    export = make_export(tmp_path / "export")
    _noise(tmp_path / "café – ünïcode.wav", 1.0)
    r = subprocess.run([sys.executable, "-m", "ajepa.cli", "embed", str(tmp_path), "--encoder", str(export),
                        "--out", str(tmp_path / "émbeddings.npz")], env={**ENV, "PYTHONIOENCODING": "ascii"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "embed: 1 of 1 clips" in r.stdout and "\\xe9mbeddings.npz" in r.stdout, r.stdout


def test_a_clip_shorter_than_the_read_limit_is_read_exactly_as_before(tmp_path):
    frontend = FrontEnd()
    for seconds, rate in ((1.0, 16000), (5.0, 44100), (10.0, 32000)):
        path = _noise(tmp_path / f"{seconds}.wav", seconds, rate, channels=2)
        assert torch.equal(frontend.load(path, max_frames=96 if seconds < 5 else 1024), frontend.load(path))
    long = _noise(tmp_path / "long.wav", 60.0)
    kept = frontend.load(long, max_frames=96)
    assert kept.shape[1] == round(frontend.read_limit(96) * 16000)
    assert torch.equal(kept, frontend.load(long)[:, :kept.shape[1]])


@pytest.mark.slow
def test_features_of_a_20_minute_pool_clip_stay_within_the_crop(tmp_path):
    """One clip of 20 minutes among short ones, where 0.96 s is kept: the fbank of the whole file alone
    needs about a gigabyte; a worker now reads 12 s of it."""
    manifest = write_clips(tmp_path / "audio", 3)
    manifest.loc[len(manifest)] = ["long", str(_noise(tmp_path / "audio" / "long.wav", 20 * 60)), "noise", 1, "train"]
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    r = _in_child(f"""
        import pandas as pd
        from ajepa.data.store import extract_features
        from data_clips import FRONTEND, TARGET_LENGTH
        manifest = pd.read_csv({str(tmp_path / 'manifest.csv')!r}, dtype={{"path": str, "labels": str, "clip_id": str}})
        s = extract_features(manifest, {str(tmp_path / 'features')!r}, FRONTEND, TARGET_LENGTH, shard_clips=8,
                             num_workers=1, max_reject_fraction=0.0, progress=False)
        print(s.clips)
    """, extra_mb=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "4"


@pytest.mark.slow
def test_embed_of_a_20_minute_file_streams_in_bounded_memory(tmp_path):
    export = make_export(tmp_path / "export")
    long = _noise(tmp_path / "long.wav", 20 * 60, rate=48000, channels=2)
    r = _in_child(f"""
        sys.exit(ajepa.cli.main(["embed", {str(long)!r}, "--encoder", {str(export)!r}, "--out", {str(tmp_path / 'e.npz')!r}]))
    """, extra_mb=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.isfinite(np.load(tmp_path / "e.npz")["embeddings"]).all()


def test_the_streamed_embedding_is_the_whole_clip_embedding(tmp_path, model):
    path = _noise(tmp_path / "a.wav", 7.3, rate=44100, channels=2, subtype="FLOAT")
    whole = model.embed(model.frontend.load(path)[0], model.sample_rate)
    streamed = model.embed_stream(model.frontend.stream(path, block_seconds=1.1))
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=1e-4)
