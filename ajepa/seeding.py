"""The one way a random stream is seeded: from the run's seed and a key naming the draw.

Every random draw of a training run that must replay on resume (the masks of a step, the clip order
of an epoch, a clip's augmentation, a fine-tuning step's augmentation) comes from a generator seeded
by ``seed_of(seed, *key)``: a 63-bit hash (blake2b) of the seed and the key. A hash rather than
arithmetic such as ``seed * C + step``: no two (seed, key) pairs share a stream, whatever the numbers,
and draws with different purposes never overlap because each key starts with its own name (the masks,
the oldest stream, keep the bare ``(seed, step)``). The streams depend on nothing else: not on the
process count, the loader workers or how many draws came before.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["seed_of", "torch_generator", "numpy_rng"]


def seed_of(seed: int, *key: int | str) -> int:
    """A 63-bit seed for the stream named by (seed, *key)."""
    digest = hashlib.blake2b(":".join(map(str, (int(seed), *key))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def torch_generator(seed: int, *key: int | str) -> torch.Generator:
    """A CPU torch generator for the stream (seed, *key)."""
    return torch.Generator().manual_seed(seed_of(seed, *key))


def numpy_rng(seed: int, *key: int | str) -> np.random.Generator:
    """A numpy generator for the stream (seed, *key)."""
    return np.random.default_rng(seed_of(seed, *key))
