"""`ajepa features DATASET`: the AudioMAE/AST front end over a manifest into a feature store."""

from __future__ import annotations

from ajepa import paths
from ajepa.config import Params
from ajepa.data.frontend import FrontEnd
from ajepa.data.store import extract_features
from ajepa.datasets.manifest import read_manifest
from ajepa.datasets.registry import REGISTRY


def run(params: Params, dataset: str) -> str:
    ds = params.dataset(dataset)
    cfg = params.features
    manifest, meta = read_manifest(paths.manifest_dir(), dataset)
    published = REGISTRY[dataset].published_stats
    extra = {"dataset": dataset, "classes": meta.get("classes", []), "protocol": meta.get("protocol"),
             "patch_size": cfg.patch_size,
             "grid": [ds.target_length // cfg.patch_size, cfg.num_mel_bins // cfg.patch_size],
             "published_mean_std": list(published) if published else None}
    s = extract_features(manifest, paths.features_dir(dataset), FrontEnd.from_config(cfg), ds.target_length,
                         cfg.shard_clips, cfg.num_workers, cfg.max_reject_fraction, extra_stats=extra)
    speed = s.audio_seconds / s.seconds if s.seconds else float("inf")
    return (f"features {dataset}: {s.accepted} of {s.clips} clips -> {s.out_dir}/ "
            f"({ds.target_length} x {cfg.num_mel_bins} float16, {s.rejected} rejected, listed in "
            f"{s.rejects_file}); train-split mean {s.mean:.4f}, std {s.std:.4f}; "
            f"{s.audio_seconds / 3600:.2f} h of audio in {s.seconds:.1f} s ({speed:.0f}x real time)"
            + (f"; {s.kept_shards} shards kept from a stopped run." if s.kept_shards else "."))
