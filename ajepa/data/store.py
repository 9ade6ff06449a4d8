"""Feature store: float16 log-mel spectrograms in shards, an index and statistics.

    DIR/shard-00000.npy ...   [clips, target_length, num_mel_bins] float16 (.npy, read by position)
    DIR/index.csv             clip_id, labels, fold, split, shard, row, n_frames, path
    DIR/stats.json            mean/std from the training splits, front-end settings, counts
    DIR/rejects.csv           path, reason for every clip that could not become features
    DIR/checksums.json        size and sha256 of every shard (what a staged copy is checked against)

The size of the store is checked against the free space first; shards are then pre-allocated (their
blocks reserved, so a full disk fails the allocation with ENOSPC instead of killing a worker with
SIGBUS when it writes a page that has no block) and filled in chunks by worker processes, so the
dataset is never held in memory and one slow clip does not stall a whole shard. A rejected clip
leaves a zero row that the index does not point at. Statistics cover the valid (unpadded) frames of
the training splits only. The store is built in a hidden work folder beside DIR, and each finished
shard is recorded there with its sha256: a killed run is resumed shard by shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ajepa.atomic import atomic_path, free_space, write_csv, write_errors, write_json
from ajepa.cpus import available_cpus
from ajepa.data.frontend import FrontEnd, UnreadableAudio, normalize, pad_or_crop
from ajepa.datasets.manifest import STATS_SPLITS
from ajepa.errors import AjepaError
from ajepa.progress import progress as progress_bar

DONE = "done"  # the work folder's records of finished shards
CHECKSUMS = "checksums.json"  # in a store: every shard's size and sha256
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
    kept_shards: int = 0  # finished by an earlier, stopped run and kept


_frontend: FrontEnd | None = None


def _init_worker(frontend: FrontEnd) -> None:
    global _frontend
    # one intra-op thread per process: the parallelism is across clips, and oversubscription costs more
    torch.set_num_threads(1)
    _frontend = frontend


def _process_chunk(task):
    number, shard_path, start, paths, target_length = task
    shard = np.load(shard_path, mmap_mode="r+")
    results = []
    with torch.inference_mode():
        for k, path in enumerate(paths):
            try:
                wav = _frontend.load(path, max_frames=target_length)  # reads only what the crop keeps
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
    return number, start, results


@dataclass(frozen=True)
class Shard:
    number: int
    start: int  # its first manifest row
    rows: int
    key: str  # sha256 of what its content depends on: the front end, the frames and its clips' paths


def work_dir(out_dir: Path) -> Path:
    """Where a store is built before it is installed; kept when the run stops, so that a rerun keeps
    the shards it finished (`DONE/shard-NNNNN.json` records each: inputs, per-clip results, sha256)."""
    return out_dir.with_name(f".{out_dir.name}.partial")


def shard_file(root: Path, number: int) -> Path:
    return root / f"shard-{number:05d}.npy"


def plan_shards(manifest: pd.DataFrame, frontend: FrontEnd, target_length: int, shard_clips: int) -> list[Shard]:
    settings = json.dumps({"format": 1, "target_length": target_length, "sample_rate": frontend.sample_rate,
                           "num_mel_bins": frontend.num_mel_bins, "frame_shift_ms": frontend.frame_shift_ms,
                           "frame_length_ms": frontend.frame_length_ms}, sort_keys=True)
    paths = manifest["path"].astype(str).tolist()
    shards = []
    for number, start in enumerate(range(0, len(paths), shard_clips)):
        clips = paths[start:start + shard_clips]
        key = hashlib.sha256("\n".join([settings, *clips]).encode()).hexdigest()
        shards.append(Shard(number, start, len(clips), key))
    return shards


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def finished_shards(work: Path, shards: list[Shard]) -> dict[int, list]:
    """{shard: per-clip results} of the shards an earlier run finished in `work` and that still hold:
    the record names the same inputs, and the file has the recorded size and sha256."""
    kept = {}
    for shard in shards:
        try:
            record = json.loads((work / DONE / f"shard-{shard.number:05d}.json").read_text())
        except (OSError, ValueError):
            continue
        path = shard_file(work, shard.number)
        if (record.get("key") == shard.key and path.is_file() and path.stat().st_size == record.get("size")
                and sha256_file(path) == record.get("sha256")):
            kept[shard.number] = [tuple(clip) for clip in record["results"]]
    return kept


def _record(work: Path, shard: Shard, results: list) -> None:
    path = shard_file(work, shard.number)
    write_json(work / DONE / f"shard-{shard.number:05d}.json",
               {"key": shard.key, "size": path.stat().st_size, "sha256": sha256_file(path), "results": results})


def _check_room(work: Path, shards: list[Shard], kept: dict, row_shape: tuple[int, int], out_dir: Path) -> None:
    """Refuse a store that cannot fit before any block is reserved (a typo in target_length once
    reserved every free byte before failing)."""
    clips = sum(s.rows for s in shards if s.number not in kept)
    need = clips * row_shape[0] * row_shape[1] * 2 + 128 * len(shards)
    existing = next(p for p in (work, *work.parents) if p.exists())
    if need > shutil.disk_usage(existing).free:
        size = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.1f} MiB"
        raise AjepaError(f"features {out_dir}: {os.strerror(errno.ENOSPC)} for the store: it needs {size} ({clips} clips x {row_shape[0]} frames x "
                         f"{row_shape[1]} mel bins, float16) and there is {free_space(existing)}: free some space, "
                         f"or check target_length and num_mel_bins")


def _plan(manifest: pd.DataFrame, work: Path, shards: list[Shard], target_length: int, mel_bins: int) -> list[tuple]:
    """Pre-allocate the given shards under `work` and cut them into worker tasks."""
    tasks = []
    for shard in shards:
        path = shard_file(work, shard.number)
        # open_memmap writes the header and sizes the file sparsely: nothing is held in memory
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                  shape=(shard.rows, target_length, mel_bins)).flush()
        _reserve(path)
        for c in range(0, shard.rows, CHUNK_CLIPS):
            rows = manifest["path"].iloc[shard.start + c: shard.start + min(c + CHUNK_CLIPS, shard.rows)]
            tasks.append((shard.number, str(path), c, rows.tolist(), target_length))
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


def _serve(conn, frontend: FrontEnd, parent_ends: list[int]) -> None:
    """A worker: run the tasks that come down `conn` until None, sending back each output (or error).

    It first closes the parent's ends of the workers' pipes that it inherited through the fork, so that
    the parent's exit reaches it as the end of `conn`: a parent stopped between starting it and recording
    it (a SIGTERM at that moment) never ends it, and it would otherwise wait for a task forever, holding
    the parent's standard streams open."""
    for fd in parent_ends:
        os.close(fd)
    _init_worker(frontend)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        try:
            conn.send(_process_chunk(task))
        except Exception as e:  # the parent raises it, as a pool's future would
            conn.send(e)


def _run(tasks: list[tuple], frontend: FrontEnd, workers: int, collect, out_dir: Path) -> None:
    """Pass every task's output to `collect` as it completes, from at most `workers` processes.

    No helper thread: the parent waits on the workers' pipes and their exit sentinels at once, so a
    worker that dies (killed, out of memory, a bus error) fails the run with one line, and so does one
    that cannot start (a cap on processes or threads), after the started ones are ended."""
    workers = min(workers, len(tasks))  # never a process without a task
    if workers <= 1:
        _init_worker(frontend)
        for task in tasks:
            collect(_process_chunk(task))
        return
    ctx, todo, busy, procs = mp.get_context("fork"), iter(tasks), {}, []
    try:
        for _ in range(workers):
            conn, child = ctx.Pipe()
            ends = [c.fileno() for c in [*busy, conn]]  # the parent's ends this worker inherits (see _serve)
            process = ctx.Process(target=_serve, args=(child, frontend, ends), daemon=True)
            try:
                process.start()
            except OSError as e:
                raise AjepaError(f"features {out_dir}: cannot start {workers} worker processes ({e.strerror}; "
                                 f"a cap on processes, `ulimit -u` or the job's): set features.num_workers lower") from None
            finally:
                child.close()
            procs.append(process)
            busy[conn] = process
            conn.send(next(todo, None))
        while busy:
            _serve_ready(busy, todo, collect, out_dir)
    finally:
        for process in procs:
            process.terminate()
            process.join()


def _serve_ready(busy: dict, todo, collect, out_dir: Path) -> None:
    """Collect the outputs that have come in and hand those workers their next task (None: stop)."""
    sentinels = {p.sentinel: conn for conn, p in busy.items()}
    for ready in wait([*busy, *sentinels]):
        conn = sentinels.get(ready, ready)
        if conn not in busy or (ready in sentinels and conn.poll()):
            continue  # done already, or its last output is still to be read through its pipe
        try:
            if ready in sentinels:
                raise EOFError
            output = conn.recv()
            if isinstance(output, Exception):
                raise output
            collect(output)
            task = next(todo, None)
            conn.send(task)
        except (EOFError, BrokenPipeError):
            raise AjepaError(f"features {out_dir}: a worker process died (killed from outside, out of memory, or "
                             f"a bus error; {free_space(out_dir)}); nothing was installed") from None
        if task is None:
            busy.pop(conn)


def _extract(manifest: pd.DataFrame, work: Path, out_dir: Path, frontend: FrontEnd, target_length: int,
             shard_clips: int, num_workers: int, progress: bool) -> tuple[list, int]:
    """(per-clip results in manifest order, shards kept from an earlier run) of the store built in `work`."""
    shards = plan_shards(manifest, frontend, target_length, shard_clips)
    kept = finished_shards(work, shards) if work.is_dir() else {}
    todo = [s for s in shards if s.number not in kept]
    _check_room(work, shards, kept, (target_length, frontend.num_mel_bins), out_dir)
    (work / DONE).mkdir(parents=True, exist_ok=True)
    for stale in work.glob("shard-*.npy"):  # a longer earlier manifest's tail
        if int(stale.stem.split("-")[1]) >= len(shards):
            stale.unlink()
    tasks = _plan(manifest, work, todo, target_length, frontend.num_mel_bins)
    results, chunks = dict(kept), {s.number: {} for s in todo}
    expected = {s.number: -(-s.rows // CHUNK_CLIPS) for s in todo}

    def collect(output: tuple) -> None:
        number, start, clips = output
        chunks[number][start] = clips
        bar.update(len(clips))
        if len(chunks[number]) == expected[number]:
            results[number] = [clip for _, part in sorted(chunks.pop(number).items()) for clip in part]
            _record(work, shards[number], results[number])

    bar = progress_bar(len(manifest), f"features {out_dir.name}", "clip", enabled=progress,
                       initial=sum(s.rows for s in shards if s.number in kept))
    try:
        _run(tasks, frontend, num_workers or available_cpus(), collect, out_dir)
    finally:
        bar.close()
    return [clip for s in shards for clip in results[s.number]], len(kept)


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

    The store is built in work_dir(out_dir), which a stopped run leaves behind: a rerun keeps every
    shard that run finished (checked by sha256) and computes the others. Raises AjepaError when the
    rejected fraction exceeds `max_reject_fraction`; the rejects list is then kept beside the (not
    installed) output as `<out_dir>.rejects.csv`.
    """
    t0, out_dir, n = time.perf_counter(), Path(out_dir), len(manifest)
    if n == 0:
        raise AjepaError("manifest has no clips: nothing to extract")
    rejected_path = out_dir.with_name(out_dir.name + ".rejects.csv")
    work = work_dir(out_dir)
    with write_errors(out_dir):
        per_clip, kept = _extract(manifest, work, out_dir, frontend, target_length, shard_clips, num_workers,
                                  progress)
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
    audio_seconds = float(numbers[:, 4].sum())
    stats = {
        "mean": mean, "std": std, "frames": count, "stats_splits": list(STATS_SPLITS),
        "clips": n, "accepted": int(ok.sum()), "rejected": n_rejected,
        "target_length": target_length, "num_mel_bins": frontend.num_mel_bins,
        "sample_rate": frontend.sample_rate, "frame_shift_ms": frontend.frame_shift_ms,
        "frame_length_ms": frontend.frame_length_ms, "shard_clips": shard_clips,
        "audio_hours": round(audio_seconds / 3600, 4), **(extra_stats or {}),
    }
    _finish(work, out_dir, index, rejects, stats)
    if rejected_path.exists():
        rejected_path.unlink()  # a stale list from an earlier failed run
    return ExtractSummary(n, int(ok.sum()), n_rejected, time.perf_counter() - t0, audio_seconds, mean, std,
                          out_dir, out_dir / "rejects.csv", kept)


def _finish(work: Path, out_dir: Path, index: pd.DataFrame, rejects: pd.DataFrame, stats: dict) -> None:
    """Write the store's tables into `work` and rename it into place as `out_dir`."""
    with write_errors(out_dir):
        index.to_csv(work / "index.csv", index=False)
        rejects.to_csv(work / "rejects.csv", index=False)
        (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (work / CHECKSUMS).write_text(json.dumps(_checksums(work), indent=1) + "\n")
        shutil.rmtree(work / DONE)
    with atomic_path(out_dir) as tmp:
        os.replace(work, tmp)


def _checksums(work: Path) -> dict:
    """{shard file: size and sha256} from the records of the finished shards: what a copy of the store
    (ajepa.data.staging) is verified against, without reading the store again."""
    sums = {}
    for record_path in sorted((work / DONE).glob("shard-*.json")):
        name = record_path.with_suffix(".npy").name
        if (work / name).is_file():  # a record of a longer earlier manifest's shard has no file left
            record = json.loads(record_path.read_text())
            sums[name] = {"size": record["size"], "sha256": record["sha256"]}
    return sums


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
