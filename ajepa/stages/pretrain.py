"""`ajepa pretrain`: A-JEPA self-supervised pretraining on the pooled feature stores.

One command uses the whole node: unless a launcher (torchrun, srun + torchrun) started it, the stage
starts `distributed.processes` processes itself, one per GPU by default, and rank 0 writes every output,
exactly the files of a single-process run."""

from __future__ import annotations

import contextlib
import sys

import torch

from ajepa import paths
from ajepa.atomic import write_json
from ajepa.choices import Encoder, names
from ajepa.config import Params
from ajepa.data.staging import expand_target, stage_store
from ajepa.data.store import FeatureStore, StoreUnion
from ajepa.device import pick_device
from ajepa.downstream.linear import fbank_validation_probe, validation_probe
from ajepa.downstream.protocols import load_task
from ajepa.errors import AjepaError
from ajepa.interrupt import StopSignals
from ajepa.lock import state_lock
from ajepa.masks import block_masks, time_frequency_masks
from ajepa.plots import plot_masks
from ajepa.stages.pool import check as check_pool
from ajepa.stages.tracking import open_live, write_timing
from ajepa.train.distributed import DistInfo, cleanup, init_distributed, launch, launched, local_processes
from ajepa.train.pretrain import PretrainPaths, PretrainResult, build_mask_generator, pretrain


def output_paths() -> PretrainPaths:
    return PretrainPaths(encoders={k: paths.pretrained_encoder(k) for k in names(Encoder)},
                         state=paths.pretrain_state_dir(), metrics=paths.pretrain_results() / "metrics.json")


def pool(params: Params) -> StoreUnion:
    """The clips of pretrain.splits in every store of pretrain.datasets, as one sequence: read from the
    verified copies in distributed.stage_to when it is set (made by the first process to get here)."""
    cfg = params.pretrain
    stores = []
    for name in cfg.datasets:
        check_pool(params, name)
        root = paths.features_dir(name)
        if params.distributed.stage_to is not None:
            staged = stage_store(root, expand_target(params.distributed.stage_to) / name)
            if staged.copied:
                print(f"pretrain: staged {root} to {staged.root}: {staged.copied} files copied and verified "
                      f"({staged.bytes_copied / 2**20:.1f} MiB), {staged.reused} already in place", file=sys.stderr)
            root = staged.root
        store = FeatureStore(root, splits=tuple(cfg.splits))
        if len(store) == 0:
            raise AjepaError(f"{store.root}: no clips in splits {cfg.splits} (pretrain.splits)")
        stores.append(store)
    return StoreUnion(stores)


def learning_curve(params: Params, device: torch.device):
    """evaluate(step, model) for the pretraining loop: the validation probe (ajepa.downstream.linear) of
    each configured encoder on the labeled clips of each pretraining dataset that has them, beside the
    same probe of the time-averaged fbank (`probe/BENCH/fbank`, computed once: a level line on the
    curve), or None when pretrain.probe.every is 0 or no pretraining dataset is labeled."""
    cfg = params.pretrain.probe
    labeled = [d for d in params.pretrain.datasets if FeatureStore(paths.features_dir(d)).stats.get("classes")]
    if not cfg.every or not labeled:
        return None
    tasks = {b: load_task(b, paths.features_dir(b)) for b in labeled}
    fbank = {}

    def evaluate(step: int, model) -> dict:
        if not fbank:
            fbank.update({f"probe/{b}/fbank": fbank_validation_probe(task, cfg.l2) for b, task in tasks.items()})
        return {**{f"probe/{bench}/{which}": validation_probe(getattr(model, f"{which}_encoder"), task, cfg.l2,
                                                             device)
                   for bench, task in tasks.items() for which in cfg.encoders}, **fbank}
    return evaluate


def run(params: Params, stop_after: int | None = None) -> str:
    """Pretrain in this process, or in one new process per device when nothing launched this one."""
    pick_device(params.distributed.device)  # no usable GPU for `cuda`: one line here, before any process starts
    processes = local_processes(params.distributed.processes, params.pretrain.optim.batch_size)
    if processes > 1 and not launched():
        pool(params)  # bad input fails here, once, before any process starts
        return launch(train, (params, stop_after), processes)
    return train(params, stop_after)


def train(params: Params, stop_after: int | None = None) -> str:
    """This process's part of the run (all of it when single-process); the summary line on rank 0."""
    cfg = params.pretrain
    store = pool(params)
    dist = init_distributed(device=params.distributed.device, backend=params.distributed.backend)
    out = output_paths()
    try:
        with _state_lock(dist):
            if dist.is_main:
                _draw_masks(cfg, store, out)
            evaluate = learning_curve(params, dist.device) if dist.is_main else None
            with StopSignals(deferred=True) as stop:  # SIGINT/SIGTERM: save at the next step boundary, then stop
                log = open_live(paths.pretrain_live_dir(), paths.timing_file("pretrain").with_suffix(""))
                r = pretrain(cfg, store, out, dist, open_log=log,
                             stop_after=stop_after, evaluate=evaluate, stop_requested=stop.requested)
            if dist.is_main:
                _write_metrics(out, r, dist)
    finally:
        cleanup()
    return _summary(cfg, store, out, r, dist, stop_after) if dist.is_main else ""


def _state_lock(dist: DistInfo):
    """The state folder's lock, held by rank 0: the one process that writes the state (every rank would
    lock out the others)."""
    return state_lock(paths.pretrain_state_dir(), "ajepa pretrain") if dist.is_main else contextlib.nullcontext()


def _write_metrics(out: PretrainPaths, r: PretrainResult, dist: DistInfo) -> None:
    write_json(out.metrics, {"steps": r.steps, "final_loss": r.final_loss, "tf_fraction": r.tf_fraction,
                             "target_rank": round(r.target_rank, 2), "world_size": dist.world_size})
    write_timing("pretrain", {"samples_per_s": round(r.samples_per_s, 2), "seconds": round(r.seconds, 1),
                              "probe_seconds": round(r.probe_seconds, 1), "device": str(dist.device)})


def _summary(cfg, store: StoreUnion, out: PretrainPaths, r: PretrainResult, dist: DistInfo,
             stop_after: int | None) -> str:
    done = all(p.exists() for p in out.encoders.values()) and stop_after is None
    where = f"encoders {', '.join(map(str, out.encoders.values()))}" if done else f"checkpoint {out.state}"
    return (f"pretrain: {r.steps - r.start_step} steps (from step {r.start_step}, {r.steps} done) on {len(store)} "
            f"clips of {', '.join(cfg.datasets)} with {dist.world_size} process(es) on {dist.device}; final loss "
            f"{r.final_loss:.4f}; {r.tf_fraction:.0%} of steps used time-frequency masks; "
            f"{r.samples_per_s:.0f} samples/s, {r.seconds:.0f} s (+ {r.probe_seconds:.0f} s of learning-curve "
            f"probes); {where}; curves in {paths.pretrain_live_dir()}/.")


def _draw_masks(cfg, store: StoreUnion, out: PretrainPaths) -> None:
    grid = tuple(store.stats["grid"])
    gen = build_mask_generator(cfg, grid, total_steps=1)
    x = torch.stack([store[i] for i in range(min(3, len(store)))])
    g = torch.Generator().manual_seed(cfg.seed)
    examples = {"block": block_masks(len(x), grid, g, **gen.block_kw),
                "time-frequency": time_frequency_masks(len(x), grid, g, **gen.tf_kw)}
    plot_masks(x, examples, grid, int(store.stats["patch_size"]), paths.pretrain_results() / "masks.png")
