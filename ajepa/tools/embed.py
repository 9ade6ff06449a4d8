"""`ajepa embed DIR_OR_FILE... --out FILE.npz`: scene embeddings of audio files with an exported encoder.

Written once every clip is done, each file atomically:
  FILE.npz          paths [N] (str), embeddings [N, E] float32, seconds [N], sizes and mtimes [N] (what
                    the embedding was made from), encoder (JSON: export, weights sha256, statistics)
  FILE.csv          row, path, seconds: one row per embedded clip, in input order
  FILE.rejects.csv  path, reason: every clip that could not be read (counted in the summary)
NumPy's .npz rather than Parquet: pyarrow is not a dependency, and `np.load` reads it without pickle.

Resumable: finished embeddings go to FILE.npz.parts/ every `save_every` clips; a rerun with the same
encoder keeps them, and those of an existing FILE.npz made with it, for every file whose size and
modification time are unchanged, so a large folder is embedded once and a grown one only in part.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd

from ajepa.atomic import atomic_path, check_replaceable, make_parent, write_csv
from ajepa.config import load_params
from ajepa.data.frontend import UnreadableAudio
from ajepa.datasets.walk import walk_files
from ajepa.device import pick_device
from ajepa.encoder import AudioEncoder, load_encoder
from ajepa.errors import AjepaError
from ajepa.export import CONFIG, WEIGHTS
from ajepa.progress import progress
from ajepa.train.checkpoint import file_sha256

__all__ = ["AUDIO_SUFFIXES", "audio_files", "embed_files", "run"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")
_FIELDS = ("paths", "sizes", "mtimes", "seconds", "embeddings")
# files longer than this are streamed (embed_stream) rather than read whole and batched
STREAM_SECONDS = 30.0


def audio_files(inputs: list[str]) -> list[Path]:
    """The files named, and the names with AUDIO_SUFFIXES under the folders named (links followed, each
    folder once: see ajepa.datasets.walk), sorted, each once. A name that is no regular file (a dangling
    link, a FIFO, a folder called x.wav) is listed too: embed_files rejects it with its reason."""
    out = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            out += sorted(Path(d) / f for d, dirs, files in walk_files(p) for f in dirs + files
                          if Path(f).suffix.lower() in AUDIO_SUFFIXES)
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise AjepaError(f"{p}: no such file or folder")
    return list(dict.fromkeys(out))


def _not_audio(path: Path) -> str | None:
    """Why `path` cannot be read as an audio file (a dangling link, a folder, a FIFO, gone), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "dangling symbolic link" if path.is_symlink() else "file not found (deleted or moved after it was listed)"
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if stat.S_ISDIR(mode):
        return "a folder, not an audio file"
    return None if stat.S_ISREG(mode) else "not a regular file (a FIFO, socket or device)"


def _identity(model: AudioEncoder) -> str:
    """What the embeddings depend on besides the audio: the weights, statistics and window."""
    source = Path(model.config["source"])
    return json.dumps({"export": str(source), "weights_sha256": file_sha256(source / WEIGHTS),
                       "mean": model.mean, "std": model.std, "window_frames": model.window_frames}, sort_keys=True)


def _save(path: Path, rows: list[tuple], identity: str) -> None:
    """rows of (path, size, mtime, seconds, embedding) as one .npz, atomically."""
    columns = list(zip(*rows)) if rows else [[]] * 5
    arrays = {"paths": np.array(columns[0], dtype=str), "sizes": np.array(columns[1], dtype=np.int64),
              "mtimes": np.array(columns[2], dtype=np.int64), "seconds": np.array(columns[3], dtype=np.float64),
              "embeddings": np.stack(columns[4]).astype(np.float32) if rows else np.zeros((0, 0), np.float32)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, encoder=np.array(identity), **arrays)


def _load_rows(path: Path, identity: str) -> dict[str, tuple] | None:
    """{path: (path, size, mtime, seconds, embedding)} of a file _save wrote with this encoder, else None."""
    with np.load(path) as z:
        if str(z["encoder"]) != identity:
            return None
        cols = [z[k] for k in _FIELDS]
    return {str(p): (str(p), int(s), int(m), float(sec), e) for p, s, m, sec, e in zip(*cols)}


def _earlier(out: Path, parts: Path, identity: str) -> dict[str, tuple]:
    """The rows a previous run finished with this encoder: in `out`, then in its parts folder."""
    done = {}
    if out.is_file():
        done.update(_load_rows(out, identity) or {})
    if parts.is_dir():
        for part in sorted(parts.glob("part-*.npz")):
            rows = _load_rows(part, identity)
            if rows is None:
                raise AjepaError(f"{parts}: an interrupted run with another encoder or statistics; delete the "
                                 "folder to start afresh, or choose another --out")
            done.update(rows)
    return done


def _stat(path: Path) -> tuple[int, int]:
    s = path.stat()
    return s.st_size, s.st_mtime_ns


def _names(out: Path) -> tuple[Path, Path, Path]:
    """FILE.csv, FILE.rejects.csv and FILE.npz.parts/ of --out FILE.npz."""
    return out.with_suffix(".csv"), out.with_name(out.stem + ".rejects.csv"), out.with_name(out.name + ".parts")


def _write_outputs(out: Path, rows: list[tuple], rejects: list[tuple[str, str]], identity: str) -> None:
    index, rejected, _ = _names(out)
    _save(out, rows, identity)
    write_csv(index, pd.DataFrame({"row": range(len(rows)), "path": [r[0] for r in rows],
                                   "seconds": [round(r[3], 3) for r in rows]}))
    write_csv(rejected, pd.DataFrame(rejects, columns=["path", "reason"]))


def embed_files(model: AudioEncoder, files: list[Path], out: str | Path, batch_size: int = 16,
                save_every: int = 256) -> dict:
    """Scene embeddings of `files` into `out` and its index and rejects lists (see the module docstring).
    Returns {"clips", "reused", "rejects": [(path, reason), ...]}."""
    out = Path(out)
    parts, identity = _names(out)[2], _identity(model)
    rejects = [(str(f), why) for f in files if (why := _not_audio(f)) is not None]
    bad = {path for path, _ in rejects}
    files = [f for f in files if str(f) not in bad]
    keys = {str(f): _stat(f) for f in files}
    done = {p: r for p, r in _earlier(out, parts, identity).items() if p in keys and r[1:3] == keys[p]}
    reused, todo = len(done), [f for f in files if str(f) not in done]
    n_parts = len(list(parts.glob("part-*.npz"))) if parts.is_dir() else 0
    pending, batch = [], []
    bar = progress(len(todo), "embed", "clip")

    def embed_batch() -> None:
        emb = model.embed([w for _, w in batch], model.sample_rate).cpu().numpy()
        pending.extend((str(f), *keys[str(f)], w.shape[0] / model.sample_rate, e) for (f, w), e in zip(batch, emb))
        bar.update(len(batch))
        batch.clear()

    def save_part() -> None:
        nonlocal n_parts
        _save(parts / f"part-{n_parts:05d}.npz", pending, identity)
        n_parts += 1
        done.update((r[0], r) for r in pending)
        pending.clear()

    for f in todo:
        try:
            if (seconds := model.frontend.seconds(f)) <= STREAM_SECONDS:
                batch.append((f, model.frontend.load(f)[0]))
            else:  # a long file is read, resampled and embedded a block at a time (memory: one block)
                scene = model.embed_stream(model.frontend.stream(f, STREAM_SECONDS)).cpu().numpy()
                pending.append((str(f), *keys[str(f)], seconds, scene))
                bar.update(1)
        except (UnreadableAudio, OSError) as e:
            rejects.append((str(f), " ".join(str(e).split()) or type(e).__name__))
            bar.update(1)
        if len(batch) >= batch_size:
            embed_batch()
        if len(pending) >= save_every:
            save_part()
    if batch:
        embed_batch()
    if pending:
        save_part()
    bar.close()
    _write_outputs(out, [done[str(f)] for f in files if str(f) in done], rejects, identity)
    shutil.rmtree(parts, ignore_errors=True)
    return {"clips": sum(str(f) in done for f in files), "reused": reused, "rejects": rejects}


def _which(args) -> str | None:
    """--which, else (for a folder of exports) downstream.encoder of --params where that file exists."""
    if args.which or (Path(args.encoder) / CONFIG).is_file() or not Path(args.params).is_file():
        return args.which
    return load_params(args.params).downstream.encoder


def run(args) -> str:
    out = Path(args.out)
    if out.suffix != ".npz":
        raise AjepaError(f"--out {out}: must end in .npz (Parquet would need pyarrow, not a dependency of ajepa)")
    if args.batch_size < 1 or args.save_every < 1:
        raise AjepaError(f"--batch-size and --save-every must be at least 1, got {args.batch_size}, {args.save_every}")
    make_parent(out)  # before any work: a file in the way of --out's folder, a folder in the way of an output
    for path, kind in zip((out, *_names(out)), ("file", "file", "file", "folder")):
        check_replaceable(path, kind)
    files = audio_files(args.inputs)
    if not files:
        raise AjepaError(f"no audio files ({' '.join(AUDIO_SUFFIXES)}) in {', '.join(args.inputs)}")
    device = pick_device(args.device, key="--device")
    which = _which(args)
    model = load_encoder(args.encoder, which, device=device)
    r = embed_files(model, files, out, args.batch_size, args.save_every)
    lines = [f"embed: {r['clips']} of {len(files)} clips -> {out} ({model.embedding_size}-dim scene embeddings of "
             f"{model.config['source']}, on {device}; {r['reused']} kept from an earlier run), "
             f"index {out.with_suffix('.csv')}"]
    if r["rejects"]:
        path, reason = r["rejects"][0]
        lines.append(f"  {len(r['rejects'])} unreadable, listed in {_names(out)[1]}; "
                     f"first: {path}: {reason}")
    return "\n".join(lines)
