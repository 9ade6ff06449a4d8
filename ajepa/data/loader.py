"""Datasets over a feature store, a resumable step-indexed batch order, and the masking collate.

The pretraining batch of step ``s`` is a pure function of ``(seed, s)``: the clips come from the
epoch permutation seeded by ``(seed, epoch)`` and the masks from ``MaskGenerator(..., seed)(B, s)``,
built in the collate function (so in the worker processes, I-JEPA style). Nothing depends on worker
count, worker RNGs or how many batches were drawn before, so a run resumed at step ``k`` sees exactly
the batches an uninterrupted run would have, and ``num_workers`` changes speed only.

Distributed convention: ``batch_size`` is the per-rank batch; the global batch of a step is the
concatenation of the ranks' batches in rank order, clips *and* masks. World size 2 with batch B is
therefore the same run (same clips, same masks) as world size 1 with batch 2B.
"""
from __future__ import annotations

import atexit
import math
import multiprocessing.util
import os
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ajepa.data.augment import ClipAugment
from ajepa.data.store import FeatureStore, StoreUnion
from ajepa.datasets.manifest import LABEL_SEPARATOR  # manifests join a clip's class names with it
from ajepa.errors import AjepaError
from ajepa.masks import MaskGenerator, Masks
from ajepa.seeding import numpy_rng

__all__ = ["SpectrogramDataset", "StepBatchSampler", "MaskCollator", "PretrainBatch", "pretrain_loader",
           "pretrain_augment", "ignore_stop_signals", "step_loader"]


class SpectrogramDataset(Dataset):
    """``store[i]`` as a [T, F] float32 tensor; with `classes`, ``(x, y)`` where y is the class index
    (int64 scalar) or, with ``multi_label=True``, a float32 multi-hot vector [len(classes)].

    Targets are parsed once here, so a label missing from `classes` fails before training starts."""

    def __init__(self, store: FeatureStore, classes: list[str] | None = None, multi_label: bool = False):
        self.store = store
        self.targets: torch.Tensor | None = None
        if classes is not None:
            self.targets = self._parse_labels(list(classes), multi_label)

    def _parse_labels(self, classes: list[str], multi_label: bool) -> torch.Tensor:
        index = {c: k for k, c in enumerate(classes)}
        labels = self.store.index["labels"].tolist()
        ids = self.store.index["clip_id"].tolist()
        if multi_label:
            y = torch.zeros(len(labels), len(classes))
        else:
            y = torch.empty(len(labels), dtype=torch.long)
        for i, text in enumerate(labels):
            names = [n for n in text.split(LABEL_SEPARATOR) if n]
            unknown = [n for n in names if n not in index]
            if unknown:
                raise AjepaError(f"{self.store.root}: clip {ids[i]} has label {unknown[0]!r} not among the "
                                 f"{len(classes)} classes")
            if multi_label:
                y[i, [index[n] for n in names]] = 1.0
            elif len(names) != 1:
                raise AjepaError(f"{self.store.root}: clip {ids[i]} has {len(names)} labels "
                                 f"({text!r}); a single-label task needs exactly one")
            else:
                y[i] = index[names[0]]
        return y

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        x = self.store[i]
        return x if self.targets is None else (x, self.targets[i])


class StepBatchSampler:
    """Yields ``(step, indices)`` for ``step = start_step, start_step + 1, ...`` up to `total_steps`
    (exclusive), or forever when it is None.

    Epoch ``e`` is a permutation of ``range(n_items)`` seeded by ``(seed, e)``; step ``s`` is global
    batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, and this rank takes the slice
    ``[rank * batch_size, (rank + 1) * batch_size)`` of it. With ``drop_last=True`` the tail of each
    permutation that does not fill a global batch is skipped (a different tail each epoch); with
    ``drop_last=False`` the last global batch is completed with the first items of the same
    permutation, as DistributedSampler pads, so every rank always gets a full batch.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, start_step: int = 0,
                 total_steps: int | None = None, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed and start_step must be >= 0, got {seed}, {start_step}")
        self.global_batch = batch_size * world_size
        if n_items < 1 or (drop_last and n_items < self.global_batch):
            raise AjepaError(f"global batch {self.global_batch} (batch_size {batch_size} x world_size "
                             f"{world_size}) is larger than the {n_items} clips available")
        self.n_items, self.batch_size, self.seed = int(n_items), int(batch_size), int(seed)
        self.start_step, self.total_steps = int(start_step), total_steps
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), drop_last
        self.steps_per_epoch = (n_items // self.global_batch if drop_last
                                else math.ceil(n_items / self.global_batch))
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        return numpy_rng(self.seed, "epoch", epoch).permutation(self.n_items)

    def indices(self, step: int) -> list[int]:
        """This rank's item indices at `step` (a pure function of the constructor's arguments and step)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            order = self.permutation(epoch)
            if not self.drop_last:
                pad = self.steps_per_epoch * self.global_batch - self.n_items
                order = np.concatenate([order, np.resize(order, pad)])
            self._epoch, self._order = epoch, order
        lo = pos * self.global_batch + self.rank * self.batch_size
        return self._order[lo: lo + self.batch_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            yield step, self.indices(step)
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an endless StepBatchSampler (total_steps=None) has no length")
        return max(0, self.total_steps - self.start_step)


class PretrainBatch(NamedTuple):
    x: torch.Tensor  # [B, T, F] spectrograms
    masks: Masks  # context [B, Kc], targets [B, M, Kt]
    step: int

    def pin_memory(self) -> PretrainBatch:
        # DataLoader's pin_memory thread calls this; the default leaves a dataclass like Masks unpinned,
        # and pinned index tensors let the training step copy them with non_blocking=True as well.
        m = self.masks
        return PretrainBatch(self.x.pin_memory(),
                             Masks(m.context.pin_memory(), m.targets.pin_memory(), m.mode), self.step)


class MaskCollator:
    """Collate ``[(step, x), ...]`` (one step per batch) into a :class:`PretrainBatch`.

    The masks of a rank are rows ``[rank * B, (rank + 1) * B)`` of ``mask_generator(B * world_size,
    step)``: a deterministic function of (seed, step, rank), and identical to a single-process run with
    the global batch (block sizes are shared per global batch, as they are per batch there). Each rank
    thus draws the whole global batch's masks, about 10-20 ms per step for 512 on a 64 x 8 grid, spread
    over the loader workers."""

    def __init__(self, mask_generator: MaskGenerator, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank={rank}, world_size={world_size}")
        self.mask_generator, self.rank, self.world_size = mask_generator, rank, world_size

    def masks(self, batch_size: int, step: int) -> Masks:
        m = self.mask_generator(batch_size * self.world_size, step)
        if self.world_size == 1:
            return m
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        # clone: a view would ship the whole global batch's storage from the worker
        return Masks(m.context[rows].clone(), m.targets[rows].clone(), m.mode)

    def __call__(self, items: list[tuple[int, torch.Tensor]]) -> PretrainBatch:
        steps = {s for s, _ in items}
        if len(steps) != 1:
            raise ValueError(f"a batch must come from one step, got steps {sorted(steps)}")
        step = steps.pop()
        x = torch.stack([x for _, x in items])
        return PretrainBatch(x, self.masks(len(items), step), step)


class _StepItems(Dataset):
    """Maps the key ``(step, i)`` to ``(step, dataset[i])`` so the step reaches the collate function,
    the clip augmented by ``augment(x, step, i)`` when one is given."""

    def __init__(self, dataset: Dataset, augment: ClipAugment | None = None):
        self.dataset, self.augment = dataset, augment

    def __getitem__(self, key: tuple[int, int]):
        step, i = key
        x = self.dataset[i]
        return step, (x if self.augment is None else self.augment(x, step, i))


def pretrain_augment(store: FeatureStore | StoreUnion, roll: bool, magnitude: bool, seed: int) -> ClipAugment | None:
    """AudioMAE's pretraining roll and magnitude jitter over `store` (None when both are off); the
    magnitude shift of a clip uses its own store's std."""
    if not (roll or magnitude):
        return None
    stores = store.stores if isinstance(store, StoreUnion) else [store]
    return ClipAugment(roll, magnitude, seed, [s.std for s in stores], np.cumsum([0] + [len(s) for s in stores[:-1]]))


class _StepKeys:
    """A DataLoader batch_sampler: each batch of the StepBatchSampler as a list of (step, i) keys."""

    def __init__(self, sampler: StepBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        for step, indices in self.sampler:
            yield [(step, i) for i in indices]

    def __len__(self) -> int:
        return len(self.sampler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's init: SIGINT and SIGTERM ignored. Both go to the whole process group (Ctrl-C;
    slurmstepd at a time limit), and the training process saves at the end of its step and then closes
    its loader; a worker that died of the signal would make the DataLoader raise inside that step
    instead, and the work since the last checkpoint would be lost. The workers still end with the
    training process (DataLoader's watchdog) and on SIGKILL."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _loader_options(num_workers: int, seed: int, pin_memory: bool | None = None,
                   prefetch: int | None = None) -> dict:
    """The DataLoader keywords every training loader shares: `num_workers` processes (0: batches built
    in the training process) that ignore stop signals, each `prefetch` batches ahead (torch's default,
    2, when None), pinned memory (default: whether CUDA is available) and a generator of its own."""
    if num_workers > 0:
        check_worker_sockets()
    return dict(
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        timeout=WORKER_TIMEOUT_S if num_workers > 0 else 0,
        worker_init_fn=ignore_stop_signals,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch if num_workers > 0 else None,  # DataLoader refuses one without workers
        # Its own generator: otherwise every iter(loader) draws a base seed from the global torch RNG,
        # shifting the dropout/drop-path stream by one draw at each resume (and with any loader at all).
        generator=torch.Generator().manual_seed(seed),
    )


# A worker hands each batch's tensors over a Unix socket under multiprocessing's temporary folder
# (TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX); Linux caps such a path at 107 bytes, and a worker that cannot
# bind it, or cannot open a file at all (the open-file limit), fails in a thread the main process never
# hears from. Checked before the workers start, and a batch that never comes is an error after this long.
SOCKET_PATH_MAX = 107
WORKER_TIMEOUT_S = 600


def check_worker_sockets() -> None:
    """One line naming TMPDIR when the sockets loader workers pass batches through cannot live under it."""
    path = os.path.join(multiprocessing.util.get_temp_dir(), "listener-" + "x" * 8)
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise AjepaError(f"the temporary folder {tempfile.gettempdir()} is too long for loader workers: their "
                         f"sockets under it ({len(os.fsencode(path))} bytes) pass Linux's {SOCKET_PATH_MAX}-byte "
                         f"limit; set TMPDIR to a shorter folder (TMPDIR=/tmp) or num_workers to 0")


class WorkerLoader(DataLoader):
    """A DataLoader whose stalled worker ends the run in one line instead of a wait without end.

    DataLoader's own `timeout` covers the wait for a worker's message, not what follows it: a batch's
    tensors come as descriptors that the main process fetches from the worker over a socket, and a
    worker that can no longer accept that connection (out of descriptors) leaves the main process
    waiting in a read with no timeout. A watchdog armed for each batch kills the workers a little after
    that timeout, which ends that read. A stall, or a worker that closes the connection, stops the run in
    one line."""

    def __iter__(self):
        batches = super().__iter__()
        _WORKERS.update(getattr(batches, "_workers", []))
        watchdog = _Watchdog(self.timeout + WATCHDOG_MARGIN_S, batches) if self.timeout and getattr(batches, "_workers", None) else None
        try:
            while True:
                if watchdog:
                    watchdog.arm()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except Exception as e:
                    stalled = (watchdog and watchdog.fired.is_set()) or (
                        isinstance(e, RuntimeError) and "timed out" in str(e))
                    if not (stalled or isinstance(e, (EOFError, ConnectionError))):
                        raise
                    what = f"sent no batch in {self.timeout:g} s" if stalled else "closed while handing over a batch"
                    _kill_workers(batches)  # they ignore SIGTERM (ignore_stop_signals): the exit would wait on them
                    raise AjepaError(f"a data-loader worker {what}: most often it could not open a file or a "
                                     f"socket (open-file limit `ulimit -n`: raise it, or set num_workers to 0)") from None
                if watchdog:
                    watchdog.disarm()
                yield batch
        finally:
            if watchdog:
                watchdog.stop()


class _Watchdog(threading.Thread):
    """One thread per pass over a loader: it kills the workers of `batches` (a DataLoader iterator) when a
    batch is awaited for `seconds` (armed before each batch, disarmed when it comes; a lock, not a thread,
    per batch), and sets `fired` when it does. It holds the iterator by a weak reference: a strong one
    would keep the workers alive after their loader is done."""

    def __init__(self, seconds: float, batches):
        super().__init__(daemon=True)
        self.seconds, self.ref, self.fired = seconds, weakref.ref(batches), threading.Event()
        self.deadline: float | None = None
        self.done, self.wake = False, threading.Condition()
        self.start()

    def arm(self) -> None:
        with self.wake:
            self.deadline = time.monotonic() + self.seconds
            self.wake.notify()

    def disarm(self) -> None:
        with self.wake:
            self.deadline = None

    def stop(self) -> None:
        with self.wake:
            self.done = True
            self.wake.notify()

    def run(self) -> None:
        with self.wake:
            while not self.done:
                if self.deadline is None:
                    self.wake.wait()
                elif (left := self.deadline - time.monotonic()) > 0:
                    self.wake.wait(left)
                else:
                    self.fired.set()
                    if (live := self.ref()) is not None:
                        _kill_workers(live)
                    return


WATCHDOG_MARGIN_S = 5  # after DataLoader's own timeout, which answers the commoner stall (no message) first


# Workers ignore SIGTERM (ignore_stop_signals), and multiprocessing ends a process by sending its daemon
# children SIGTERM, then waiting for them; DataLoader, shutting a loader down, also falls back on SIGTERM for
# a worker slow to stop. A process leaving with a worker alive (an error, a loop that stopped before its
# loader's end) would wait forever. Registered after multiprocessing's own exit function (imported above),
# so it runs first: every worker still alive is killed.
_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _end_live_workers() -> None:
    alive = [w for w in list(_WORKERS) if w._parent_pid == os.getpid() and w.is_alive()]  # not a fork's copy
    if alive and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader's handler would raise for each one killed
    for w in alive:
        w.kill()


def _kill_workers(batches) -> None:
    """SIGKILL to the workers of `batches`, their process ids first taken from DataLoader's SIGCHLD check,
    which would otherwise raise its own error in the main thread for each one."""
    if getattr(batches, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for w in getattr(batches, "_workers", []):
        if w.is_alive():
            w.kill()


def pretrain_loader(store: FeatureStore, batch_size: int, mask_generator: MaskGenerator, seed: int,
                    start_step: int = 0, total_steps: int | None = None, num_workers: int = 0,
                    rank: int = 0, world_size: int = 1, pin_memory: bool | None = None,
                    augment: ClipAugment | None = None) -> DataLoader:
    """DataLoader of :class:`PretrainBatch` for steps ``start_step .. total_steps - 1`` (this rank's
    share of each global batch). Resume by passing the checkpoint's next step as `start_step`.
    `pin_memory` defaults to whether CUDA is available; `augment` (see :func:`pretrain_augment`)
    transforms each clip."""
    sampler = StepBatchSampler(len(store), batch_size, seed, start_step=start_step, total_steps=total_steps,
                               rank=rank, world_size=world_size, drop_last=True)
    return WorkerLoader(
        _StepItems(SpectrogramDataset(store), augment),
        batch_sampler=_StepKeys(sampler),
        collate_fn=MaskCollator(mask_generator, rank, world_size),
        **_loader_options(num_workers, seed, pin_memory),
    )


def step_loader(batches: Dataset, steps: range, seed: int, num_workers: int = 0, prefetch: int | None = None,
                pin_memory: bool | None = None) -> DataLoader:
    """DataLoader of ``batches[step]`` for each of `steps`, in order, for a Dataset whose item is a whole
    batch and a pure function of its step (fine-tuning's StepBatches). Each worker builds whole batches,
    the steps dealt round-robin, and the DataLoader hands them back in step order, so the batches are
    the same for any `num_workers` and a resumed run passes the steps from its checkpoint's on."""
    return WorkerLoader(batches, batch_size=None, sampler=steps,
                      **_loader_options(num_workers, seed, pin_memory, prefetch))
