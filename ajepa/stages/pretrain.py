"""`ajepa pretrain`: A-JEPA self-supervised pretraining on a feature store (torchrun-aware)."""

from __future__ import annotations

import torch

from ajepa import paths
from ajepa.atomic import write_json
from ajepa.config import Params
from ajepa.data.store import FeatureStore
from ajepa.errors import AjepaError
from ajepa.masks import block_masks, time_frequency_masks
from ajepa.plots import plot_masks
from ajepa.train.distributed import cleanup, init_distributed
from ajepa.train.pretrain import PretrainPaths, build_mask_generator, pretrain


def output_paths() -> PretrainPaths:
    return PretrainPaths(encoder=paths.pretrain_dir() / "encoder.safetensors", state=paths.pretrain_state_dir(),
                         live=paths.pretrain_results() / "live", metrics=paths.pretrain_results() / "metrics.json")


def run(params: Params, stop_after: int | None = None) -> str:
    cfg = params.pretrain
    store_dir = paths.features_dir(cfg.dataset)
    store = FeatureStore(store_dir, splits=tuple(cfg.splits))
    if len(store) == 0:
        raise AjepaError(f"{store_dir}: no clips in splits {cfg.splits} (pretrain.splits)")
    dist = init_distributed()
    try:
        out = output_paths()
        if dist.is_main:
            _draw_masks(cfg, store, out)
        r = pretrain(cfg, store, out, dist, stop_after=stop_after)
        if dist.is_main:
            write_json(out.metrics, {"steps": r.steps, "final_loss": r.final_loss, "tf_fraction": r.tf_fraction,
                                     "target_rank": round(r.target_rank, 2),
                                     "samples_per_s": round(r.samples_per_s, 2), "seconds": round(r.seconds, 1),
                                     "world_size": dist.world_size, "device": str(dist.device)})
    finally:
        cleanup()
    if not dist.is_main:
        return ""
    where = f"encoder {out.encoder}" if out.encoder.exists() and stop_after is None else f"checkpoint {out.state}"
    return (f"pretrain: {r.steps - r.start_step} steps (from step {r.start_step}, {r.steps} done) on {len(store)} "
            f"clips of {cfg.dataset} with {dist.world_size} process(es) on {dist.device}; final loss "
            f"{r.final_loss:.4f}; {r.tf_fraction:.0%} of steps used time-frequency masks; "
            f"{r.samples_per_s:.0f} samples/s, {r.seconds:.0f} s; {where}; curves in {out.live}/.")


def _draw_masks(cfg, store: FeatureStore, out: PretrainPaths) -> None:
    grid = tuple(store.stats["grid"])
    gen = build_mask_generator(cfg, grid, total_steps=1)
    x = torch.stack([store[i] for i in range(min(3, len(store)))])
    g = torch.Generator().manual_seed(cfg.seed)
    examples = {"block": block_masks(len(x), grid, g, **gen.block_kw),
                "time-frequency": time_frequency_masks(len(x), grid, g, **gen.tf_kw)}
    plot_masks(x, examples, grid, int(store.stats["patch_size"]), out.live.parent / "masks.png")
