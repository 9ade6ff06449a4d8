"""Small real clips and a manifest for the data fault tests (not a test module)."""

from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from ajepa.data.frontend import FrontEnd

RATE = 16000
FRONTEND = FrontEnd(sample_rate=RATE)
TARGET_LENGTH = 96


def write_clips(folder: Path, n: int, seconds: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """n float32 WAVs of noise at -20 dBFS and a manifest (train split) listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"clip{i:03d}.wav"
        sf.write(path, (0.1 * rng.standard_normal(int(RATE * seconds))).astype(np.float32), RATE, subtype="FLOAT")
        paths.append(str(path))
    return pd.DataFrame({"clip_id": [Path(p).stem for p in paths], "path": paths, "labels": "noise",
                         "fold": 1, "split": "train"})
