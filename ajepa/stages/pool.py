"""`ajepa pool DATASET`: what pretraining takes from one dataset's feature store, as a small record.

Pretraining pools the clips of `pretrain.splits` from every dataset in `pretrain.datasets`. A DVC stage
cannot list a variable number of dependencies, so each dataset's contribution is this stage's output
(`data/pool/DATASET.json`: the splits, the clip count and a fingerprint of the feature store) and
pretraining depends on the folder of them. Pretraining refuses a record whose fingerprint no longer
matches the features, so a hand-run `ajepa pretrain` cannot silently train on features that changed
after `ajepa pool` was run.
"""

from __future__ import annotations

import hashlib
import json

from ajepa import paths
from ajepa.atomic import write_json
from ajepa.config import Params
from ajepa.data.store import FeatureStore
from ajepa.errors import AjepaError


def fingerprint(dataset: str) -> str:
    """sha256 of the feature store's statistics and index (which clips, where, with what normalisation)."""
    root = paths.features_dir(dataset)
    h = hashlib.sha256()
    for name in ("stats.json", "index.csv"):
        try:
            h.update((root / name).read_bytes())
        except FileNotFoundError:
            raise AjepaError(f"{root / name}: not found (run `ajepa features {dataset}` first)") from None
    return h.hexdigest()


def run(params: Params, dataset: str) -> str:
    cfg = params.pretrain
    if dataset not in cfg.datasets:
        raise AjepaError(f"pool {dataset}: not in pretrain.datasets ({', '.join(cfg.datasets)})")
    store = FeatureStore(paths.features_dir(dataset), splits=tuple(cfg.splits))
    if len(store) == 0:
        raise AjepaError(f"{store.root}: no clips in splits {cfg.splits} (pretrain.splits)")
    out = paths.pool_file(dataset)
    write_json(out, {"dataset": dataset, "splits": list(cfg.splits), "clips": len(store),
                     "features": fingerprint(dataset)})
    return f"pool {dataset}: {len(store)} clips of splits {', '.join(cfg.splits)} for pretraining -> {out}"


def check(params: Params, dataset: str) -> dict:
    """The pool record of `dataset`, refused unless it matches the current features and splits."""
    path = paths.pool_file(dataset)
    if not path.exists():
        raise AjepaError(f"{path}: not found (run `ajepa pool {dataset}` first)")
    record = json.loads(path.read_text())
    if record.get("features") != fingerprint(dataset) or record.get("splits") != list(params.pretrain.splits):
        raise AjepaError(f"{path}: made from other features or splits than the current ones "
                         f"(rerun `ajepa pool {dataset}`)")
    return record
