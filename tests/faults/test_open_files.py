"""Open files stay bounded whatever the shard count: every reader of a feature store of 1,000+ shards
(one clip per shard) passes under a 256-descriptor limit, as a cluster job with a low soft limit has.

Before, a store kept one memory map (and so one open file) per shard it had touched: pretraining died
after 32 steps with `OSError: [Errno 24] Too many open files`, fine-tuning after a few batches."""

import multiprocessing.resource_sharer
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from train_project import ENV, cwd, smoke_params, write_params

from ajepa.cli import main
from ajepa.data import loader
from ajepa.errors import AjepaError

LIMIT = 256


def _limited():
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def ajepa_limited(root, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ajepa.cli", *args], cwd=root, env=ENV, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_limited)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("many_shards")
    p = smoke_params()
    p["datasets"]["synth"]["prepare"].update(pool_clips=1100, clips_per_class=25)
    p["features"]["shard_clips"] = 1
    p["pretrain"]["optim"].update(epochs=1, batch_size=32)
    p["pretrain"]["num_workers"] = 2  # forked loader workers read the shards too
    p["finetune"]["synth"].update(epochs=1, batch_size=32, num_workers=2)  # (its clips are held in memory)
    write_params(root, p)
    with cwd(root):
        for command in (["prepare", "synth"], ["features", "synth"], ["pool", "synth"]):
            assert main(command) == 0, command
    return root


@pytest.mark.slow
def test_the_store_has_more_shards_than_the_limit_allows_open(project):
    assert len(list((project / "data/features/synth").glob("shard-*.npy"))) > 4 * LIMIT


@pytest.mark.slow
def test_pretraining_finetuning_the_probe_and_embed_pass_under_256_descriptors(project, tmp_path):
    for args in (["pretrain"], ["finetune", "synth"], ["linear", "synth"]):
        r = ajepa_limited(project, *args)
        assert r.returncode == 0, (args, r.stderr[-3000:])
        assert "Too many open files" not in r.stderr
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2 * LIMIT):
        sf.write(audio / f"{i:04d}.wav", 0.1 * rng.standard_normal(4000).astype(np.float32), 16000)
    r = ajepa_limited(project, "embed", str(audio), "--out", str(tmp_path / "emb.npz"))
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp_path / "emb.npz") as z:
        assert z["embeddings"].shape[0] == 2 * LIMIT and np.isfinite(z["embeddings"]).all()


STREAMED = """
import dataclasses, torch
from ajepa.config import load_params
from ajepa.downstream import finetune
from ajepa.downstream.protocols import load_task
task = dataclasses.replace(load_task("synth", "data/features/synth"), x=torch.empty(0))  # read from the shards
split = task.splits[0]
cfg = dataclasses.replace(load_params("params.yaml").recipe("synth"), epochs=2, batch_size=16, mixup=0.5,
                          num_workers=2)
batches = finetune.StepBatches(task, split, cfg, finetune.steps_per_epoch(cfg, split))
print(len(split.train), sum(len(b.x) + len(b.x2) for b in finetune.batch_stream(batches, 0, torch.device("cpu"))))
"""


@pytest.mark.slow
def test_fine_tuning_loader_workers_reading_the_shards_keep_their_open_files_bounded(project):
    """A benchmark too large to hold in memory is read from the store by the loader workers: each reads
    more shards than a 128-descriptor limit allows open (16 clips and 16 mixup partners a step, in
    one-clip shards), each keeping a bounded few."""
    # a worker out of descriptors cannot even send its error (the DataLoader waits on it): a timeout
    r = subprocess.run([sys.executable, "-c", STREAMED], cwd=project, env=ENV, capture_output=True, text=True,
                       timeout=180, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)))
    assert r.returncode == 0, r.stderr[-3000:]
    train, read = map(int, r.stdout.split())
    assert train > 128 and read == 2 * 2 * (train // 16) * 16  # the training clips' shards alone pass the limit


class _Starved(torch.utils.data.Dataset):
    """Each item first lowers its worker's open-file limit to the files it has open: the worker can build
    the batch but cannot open the socket and shared memory that hand it over."""

    def __len__(self):
        return 4

    def __getitem__(self, step):
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        return torch.zeros(64, 64)


@pytest.mark.slow
def test_a_worker_out_of_descriptors_is_one_line_not_a_hang(monkeypatch):
    """Before, the worker's failure stayed in one of its threads and the training process waited forever."""
    monkeypatch.setattr(loader, "WORKER_TIMEOUT_S", 5)
    # which of the three ways the handover fails (no message, a message whose descriptors cannot be
    # fetched, a connection closed) depends on the timing: each is the same one line
    with pytest.raises(AjepaError, match=r"worker (sent no batch in 5 s|closed while handing over a batch): .*ulimit -n"):
        list(loader.step_loader(_Starved(), range(4), seed=0, num_workers=1))


class _DeafSharer(torch.utils.data.Dataset):
    """Its worker's batch arrives as a message, but the worker never answers the main process's request for
    the batch's descriptors: the wait DataLoader's own timeout does not cover."""

    def __len__(self):
        return 4

    def __getitem__(self, step):
        multiprocessing.resource_sharer._ResourceSharer._serve = lambda sharer: time.sleep(3600)
        return torch.zeros(64, 64)


@pytest.mark.slow
def test_a_batch_whose_descriptors_never_come_is_one_line_not_a_hang(monkeypatch):
    """Before, the training process waited in a socket read without end (DataLoader's timeout ends only the
    wait for the message): the watchdog kills the workers a few seconds after that timeout."""
    monkeypatch.setattr(loader, "WORKER_TIMEOUT_S", 3)
    start = time.monotonic()
    with pytest.raises(AjepaError, match=r"worker sent no batch in 3 s: .*ulimit -n"):
        list(loader.step_loader(_DeafSharer(), range(4), seed=0, num_workers=1))
    assert time.monotonic() - start < 3 + loader.WATCHDOG_MARGIN_S + 30


@pytest.mark.slow
def test_a_process_leaving_with_a_loader_open_exits():
    """Before, multiprocessing's exit sent the workers SIGTERM, which they ignore, and waited for them forever."""
    script = ("from ajepa.data import loader; import torch;"
              "batches = iter(loader.step_loader(torch.utils.data.TensorDataset(torch.zeros(64, 2)), range(8), 0,"
              " num_workers=2)); next(batches); print('one batch')")
    r = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "one batch", r.stderr


@pytest.mark.slow
def test_a_temporary_folder_too_long_for_worker_sockets_is_one_line(tmp_path):
    """Before, a TMPDIR of about 80 characters or more made every loader worker hang (AF_UNIX path too long)."""
    long_tmp = tmp_path / ("t" * 100)
    long_tmp.mkdir()
    script = ("from ajepa.data import loader; import torch;"
              "list(loader.step_loader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), range(4), 0, num_workers=1))")
    r = subprocess.run([sys.executable, "-c", script], env={**ENV, "TMPDIR": str(long_tmp)}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert f"the temporary folder {long_tmp} is too long for loader workers" in r.stderr.strip().splitlines()[-1]
    # a short one is fine
    assert subprocess.run([sys.executable, "-c", script], env={**ENV, "TMPDIR": str(tmp_path)},
                          timeout=120).returncode == 0
