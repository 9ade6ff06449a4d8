"""Feature store: float16 log-mel spectrograms in memory-mappable shards, an index and statistics.

    DIR/shard-00000.npy ...   [clips, target_length, num_mel_bins] float16, np.load(mmap_mode="r")
    DIR/index.csv             clip_id, labels, fold, split, shard, row, n_frames, path
    DIR/stats.json            mean/std from the training splits, front-end settings, counts
    DIR/rejects.csv           path, reason for every clip that could not become features

Shards are pre-allocated (their blocks reserved, so a full disk fails the allocation with ENOSPC
instead of killing a worker with SIGBUS when it writes a page that has no block) and filled in chunks by worker processes, so the dataset is never held in
memory and one slow clip does not stall a whole shard. A rejected clip leaves a zero row that the
index does not point at. Statistics cover the valid (unpadded) frames of the training splits only.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import resource
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ajepa.atomic import atomic_path, free_space, write_csv
from ajepa.cpus import available_cpus
from ajepa.data.frontend import FrontEnd, UnreadableAudio, normalize, pad_or_crop
from ajepa.datasets.manifest import STATS_SPLITS
from ajepa.errors import AjepaError
from ajepa.progress import progress as progress_bar

CHUNK_CLIPS = 32  # clips per worker task: small enough for a live progress bar, large enough to amortise IPC
INDEX_COLUMNS = ["clip_id", "labels", "fold", "split", "shard", "row", "n_frames", "path"]
# What a model trained on a store needs to see audio as it did (stats.json keys)
FRONTEND_KEYS = ("sample_rate", "num_mel_bins", "frame_shift_ms", "frame_length_ms", "target_length")


@dataclass
class ExtractSummary:
    clips: int
    accepted: int
    rejected: int
    seconds: float
    audio_seconds: float
    mean: float
    std: float
    out_dir: Path
    rejects_file: Path


_frontend: FrontEnd | None = None


def _init_worker(frontend: FrontEnd) -> None:
    global _frontend
    # one intra-op thread per process: the parallelism is across clips, and oversubscription costs more
    torch.set_num_threads(1)
    _frontend = frontend


def _process_chunk(task):
    shard_path, start, paths, target_length = task
    shard = np.load(shard_path, mmap_mode="r+")
    results = []
    with torch.inference_mode():
        for k, path in enumerate(paths):
            try:
                wav = _frontend.load(path)
                fb = _frontend.fbank(wav)
            except UnreadableAudio as e:
                results.append((str(e), 0, 0.0, 0.0, 0, 0.0))
                continue
            if not torch.isfinite(fb).all():
                results.append(("non-finite features", 0, 0.0, 0.0, 0, 0.0))
                continue
            n_frames = fb.shape[0]
            fb = pad_or_crop(fb, target_length)
            valid = fb[: min(n_frames, target_length)].double()
            # torch's float16 cast is vectorised (F16C) and rounds like numpy's, at a tenth of the cost
            shard[start + k] = fb.half().numpy()
            results.append(("", n_frames, float(valid.sum()), float((valid * valid).sum()), valid.numel(),
                            wav.shape[-1] / _frontend.sample_rate))
    # no msync: the mapping is shared, so the parent reads the pages from the page cache; forcing
    # them to disk per chunk would cost more than the fbank
    del shard
    return start, shard_path, results


def _plan(manifest: pd.DataFrame, root: Path, shard_clips: int, target_length: int, mel_bins: int) -> list[tuple]:
    """Pre-allocate the shards under `root` and cut the manifest into worker tasks (shard, row, paths)."""
    tasks, n = [], len(manifest)
    for s, shard_start in enumerate(range(0, n, shard_clips)):
        rows = min(shard_clips, n - shard_start)
        shard_path = root / f"shard-{s:05d}.npy"
        # open_memmap writes the header and sizes the file sparsely: nothing is held in memory
        np.lib.format.open_memmap(shard_path, mode="w+", dtype=np.float16, shape=(rows, target_length, mel_bins)).flush()
        _reserve(shard_path)
        for c in range(0, rows, CHUNK_CLIPS):
            paths = manifest["path"].iloc[shard_start + c: shard_start + min(c + CHUNK_CLIPS, rows)].tolist()
            tasks.append((str(shard_path), c, paths, target_length))
    return tasks


def _reserve(path: Path) -> None:
    """Give a sparse file its blocks now, so that running out of space is an error here."""
    if not hasattr(os, "posix_fallocate"):
        return  # macOS: a full disk stays a worker's SIGBUS, which the executor reports
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            # a file system that cannot reserve blocks keeps the sparse file, as before
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def _run(tasks: list[tuple], frontend: FrontEnd, workers: int, bar, out_dir: Path) -> list[tuple]:
    """Every task's per-clip results, in task order (so in manifest order), from `workers` processes.

    A worker that dies (killed, out of memory, a bus error) fails the run with one line: the
    executor notices the dead process, where a multiprocessing.Pool would wait for its task forever."""
    results = {}
    try:
        if workers == 1:
            _init_worker(frontend)
            for task in tasks:
                _collect(results, _process_chunk(task), bar)
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                     initargs=(frontend,)) as pool:
                futures = [pool.submit(_process_chunk, task) for task in tasks]
                try:
                    for future in as_completed(futures):
                        _collect(results, future.result(), bar)
                except BrokenProcessPool:
                    raise AjepaError(f"features {out_dir}: a worker process died (killed from outside, out of "
                                     f"memory, or a bus error; {free_space(out_dir)}); nothing was installed") from None
                finally:
                    for future in futures:
                        future.cancel()
    finally:
        bar.close()
    return [clip for shard_path, start, _, _ in tasks for clip in results[(shard_path, start)]]


def _collect(results: dict, output: tuple, bar) -> None:
    start, shard_path, chunk = output
    results[(shard_path, start)] = chunk
    bar.update(len(chunk))


def _statistics(manifest: pd.DataFrame, numbers: np.ndarray, ok: np.ndarray) -> tuple[float, float, int]:
    """(mean, std, values) over the valid frames of the readable clips of the statistics splits."""
    in_stats = manifest["split"].isin(STATS_SPLITS).to_numpy() & ok
    if not in_stats.any():
        raise AjepaError(f"no readable clip in the statistics splits {STATS_SPLITS}: cannot normalise")
    total, total_sq, count = numbers[in_stats, 1:4].sum(axis=0)
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise AjepaError(f"statistics: mean {mean} and std {std} over the accepted training clips are not finite")
    if std == 0.0:
        raise AjepaError("statistics: zero standard deviation over the training clips (all silent?)")
    return float(mean), std, int(count)


def extract_features(manifest: pd.DataFrame, out_dir: Path, frontend: FrontEnd, target_length: int,
                     shard_clips: int, num_workers: int, max_reject_fraction: float,
                     extra_stats: dict | None = None, progress: bool = True) -> ExtractSummary:
    """Compute features for every manifest row into `out_dir` (replaced atomically on success).

    Raises AjepaError when the rejected fraction exceeds `max_reject_fraction`; the rejects list is
    then kept beside the (not installed) output as `<out_dir>.rejects.csv`.
    """
    t0, out_dir, n = time.perf_counter(), Path(out_dir), len(manifest)
    if n == 0:
        raise AjepaError("manifest has no clips: nothing to extract")
    rejected_path = out_dir.with_name(out_dir.name + ".rejects.csv")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        tasks = _plan(manifest, tmp, shard_clips, target_length, frontend.num_mel_bins)
        per_clip = _run(tasks, frontend, num_workers or available_cpus(),
                        progress_bar(n, f"features {out_dir.name}", "clip", enabled=progress), out_dir)
        reasons = np.array([r[0] for r in per_clip], dtype=object)
        ok = reasons == ""
        rejects = pd.DataFrame({"path": manifest["path"].to_numpy()[~ok], "reason": reasons[~ok]})
        n_rejected = int((~ok).sum())
        if n_rejected > max_reject_fraction * n:
            write_csv(rejected_path, rejects)
            first = f"{rejects['path'].iloc[0]}: {rejects['reason'].iloc[0]}"
            raise AjepaError(
                f"{n_rejected} of {n} clips rejected ({n_rejected / n:.1%} > max_reject_fraction "
                f"{max_reject_fraction:.1%}); list in {rejected_path}; first: {first}")
        # columns: n_frames, sum, sum of squares, value count, seconds (rejected rows hold zeros)
        numbers = np.array([r[1:] for r in per_clip], dtype=np.float64)
        mean, std, count = _statistics(manifest, numbers, ok)
        shard_of, row_of = np.divmod(np.arange(n), shard_clips)
        index = pd.DataFrame({
            "clip_id": manifest["clip_id"].to_numpy(), "labels": manifest["labels"].to_numpy(),
            "fold": manifest["fold"].to_numpy(), "split": manifest["split"].to_numpy(),
            "shard": shard_of, "row": row_of, "n_frames": numbers[:, 0].astype(np.int64),
            "path": manifest["path"].to_numpy(),
        })[ok]
        index.to_csv(tmp / "index.csv", index=False)
        rejects.to_csv(tmp / "rejects.csv", index=False)
        audio_seconds = float(numbers[:, 4].sum())
        stats = {
            "mean": mean, "std": std, "frames": count, "stats_splits": list(STATS_SPLITS),
            "clips": n, "accepted": int(ok.sum()), "rejected": n_rejected,
            "target_length": target_length, "num_mel_bins": frontend.num_mel_bins,
            "sample_rate": frontend.sample_rate, "frame_shift_ms": frontend.frame_shift_ms,
            "frame_length_ms": frontend.frame_length_ms, "shard_clips": shard_clips,
            "audio_hours": round(audio_seconds / 3600, 4), **(extra_stats or {}),
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if rejected_path.exists():
        rejected_path.unlink()  # a stale list from an earlier failed run
    return ExtractSummary(n, int(ok.sum()), n_rejected, time.perf_counter() - t0, audio_seconds, mean, std,
                          out_dir, out_dir / "rejects.csv")


def open_shard_budget() -> int:
    """How many shard files one process keeps open: a sixteenth of its soft descriptor limit (16 at
    a limit of 256, 64 at 1,024), so that the loader's pipes and shared-memory handles, the
    checkpoint and the logs keep the rest, whatever the shard count."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(2, min(64, (soft if soft != resource.RLIM_INFINITY else 1024) // 16))


class ShardReader:
    """Rows of the shards of one store by positional reads (os.pread) from a bounded set of open files.

    A memory map keeps its file open (mmap duplicates the descriptor), so mapping every shard touched
    ran out of descriptors at a few hundred shards. Here the least recently used file is closed when
    `max_open` are open. pread does not move a shared file offset, so a forked loader worker reads
    safely through the descriptors it inherits; a pickled reader starts with none."""

    def __init__(self, root: Path, shape: tuple[int, int], max_open: int | None = None):
        self.root, self.shape = root, shape
        self.max_open = max_open or open_shard_budget()
        self.row_bytes = shape[0] * shape[1] * 2
        self._open: OrderedDict[int, tuple] = OrderedDict()

    def _file(self, s: int) -> tuple:
        """(file, data offset, rows) of shard s, opened and its header checked on first use."""
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        path = self.root / f"shard-{s:05d}.npy"
        f = open(path, "rb")
        try:
            rows = self._header(f, path)
        except BaseException:
            f.close()
            raise
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1][0].close()
        self._open[s] = (f, f.tell(), rows)
        return self._open[s]

    def _header(self, f, path: Path) -> int:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"npy format {version}")
            shape, fortran, dtype = read[version](f)
        except ValueError as e:
            raise AjepaError(f"{path}: not a feature shard ({e}); rerun `ajepa features`") from None
        if dtype != np.float16 or fortran or len(shape) != 3 or tuple(shape[1:]) != self.shape:
            raise AjepaError(f"{path}: holds {dtype} {shape}, expected float16 [clips, {self.shape[0]}, "
                             f"{self.shape[1]}] as stats.json says; rerun `ajepa features`")
        return int(shape[0])

    def read(self, s: int, row: int) -> np.ndarray:
        f, offset, rows = self._file(s)
        data = os.pread(f.fileno(), self.row_bytes, offset + row * self.row_bytes) if row < rows else b""
        if len(data) != self.row_bytes:
            raise AjepaError(f"{self.root / f'shard-{s:05d}.npy'}: row {row} is cut short (a damaged or "
                             f"truncated shard); rerun `ajepa features`")
        return np.frombuffer(data, dtype=np.float16).reshape(self.shape)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()

    def __getstate__(self):
        return {**self.__dict__, "_open": OrderedDict()}


class FeatureStore:
    """Read-only access to a feature directory: normalised float32 spectrograms by position.

    Shards are read through a ShardReader, so the open files stay bounded and a store pickled into
    DataLoader workers opens its own.
    """

    def __init__(self, root: str | os.PathLike, splits: tuple[str, ...] | None = None):
        self.root = Path(root)
        stats_path = self.root / "stats.json"
        if not stats_path.exists():
            raise AjepaError(f"{self.root}: not a feature store (no stats.json; run `ajepa features` first)")
        self.stats = json.loads(stats_path.read_text())
        index = pd.read_csv(self.root / "index.csv", keep_default_na=False,
                            dtype={"clip_id": str, "labels": str, "path": str})
        if splits is not None:
            index = index[index["split"].isin(splits)]
        self.index = index.reset_index(drop=True)
        self.mean, self.std = float(self.stats["mean"]), float(self.stats["std"])
        self.reader = ShardReader(self.root, self.shape)
        self._shard = self.index["shard"].to_numpy()
        self._row = self.index["row"].to_numpy()

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.stats["target_length"]), int(self.stats["num_mel_bins"])

    def __len__(self) -> int:
        return len(self.index)

    def raw(self, i: int) -> np.ndarray:
        """The stored (un-normalised, float16) fbank of clip i."""
        return self.reader.read(int(self._shard[i]), int(self._row[i]))

    def __getitem__(self, i: int) -> torch.Tensor:
        return normalize(torch.from_numpy(self.raw(i).astype(np.float32)), self.mean, self.std)

    def fingerprint(self) -> dict:
        """What a training run over these clips depends on: the normalisation and the clip count."""
        return {"mean": self.stats["mean"], "std": self.stats["std"], "accepted": self.stats["accepted"],
                "clips": len(self)}


class StoreUnion:
    """Several feature stores read as one sequence of clips (pretraining on the pools of several datasets).

    Each store keeps its own normalisation statistics; the stores must share the patch grid, so that
    clips of any store stack into one batch."""

    def __init__(self, stores: list[FeatureStore]):
        if not stores:
            raise AjepaError("no feature stores to pretrain on")
        layouts = {(tuple(s.stats["grid"]), int(s.stats["patch_size"])) for s in stores}
        if len(layouts) > 1:
            shown = ", ".join(f"{s.root} {s.stats['grid']}" for s in stores)
            raise AjepaError(f"pretraining stores differ in patch grid ({shown}): set the same target_length")
        self.stores = stores
        self.offsets = np.cumsum([0] + [len(s) for s in stores])
        self.stats = {"grid": list(stores[0].stats["grid"]), "patch_size": int(stores[0].stats["patch_size"])}
        self.root = " + ".join(str(s.root) for s in stores)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.stores[k][i - int(self.offsets[k])]

    def fingerprint(self) -> list[dict]:
        return [s.fingerprint() for s in self.stores]


def training_statistics(store: FeatureStore | StoreUnion) -> tuple[dict, dict]:
    """(front end, normalisation) of the features a model was trained on: the front-end settings the
    stores share, and the fbank mean and std over the statistics frames of every store with each
    store's own pair. Each store was normalised with its own pair in training; the pooled pair is the
    scale of a clip drawn from their mix, so it is what an encoder's users get (one store: its pair)."""
    stores = store.stores if isinstance(store, StoreUnion) else [store]
    frontends = [{k: s.stats[k] for k in FRONTEND_KEYS} for s in stores]
    if any(f != frontends[0] for f in frontends):
        shown = ", ".join(str(s.root) for s in stores)
        raise AjepaError(f"stores {shown} differ in front-end settings {', '.join(FRONTEND_KEYS)}")
    per = {s.root.name: {"mean": s.mean, "std": s.std, "values": int(s.stats["frames"])} for s in stores}
    if len(stores) == 1:
        mean, std = stores[0].mean, stores[0].std
    else:
        n = np.array([d["values"] for d in per.values()], dtype=np.float64)
        m = np.array([d["mean"] for d in per.values()])
        sd = np.array([d["std"] for d in per.values()])
        mean = float((n * m).sum() / n.sum())
        std = float(np.sqrt(max((n * (sd * sd + m * m)).sum() / n.sum() - mean * mean, 0.0)))
    return frontends[0], {"mean": mean, "std": std, "values": sum(d["values"] for d in per.values()), "datasets": per}
