"""Pictures a researcher looks at: masks over real spectrograms (more plots join with the report)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ajepa.atomic import atomic_path  # noqa: E402
from ajepa.masks import Masks, masks_to_grid  # noqa: E402


def plot_masks(spectrograms: torch.Tensor, examples: dict[str, Masks], grid: tuple[int, int], patch: int,
               path: Path) -> None:
    """One row per masking mode, one column per clip: the spectrogram with context patches left clear,
    target blocks tinted (one colour each) and unused patches greyed out."""
    n = spectrograms.shape[0]
    fig, axes = plt.subplots(len(examples), n, figsize=(3.2 * n, 2.6 * len(examples)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for r, (mode, masks) in enumerate(examples.items()):
        cells = masks_to_grid(masks, grid).numpy()
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(spectrograms[c].T.numpy(), origin="lower", aspect="auto", cmap="magma",
                      extent=(0, grid[0] * patch, 0, grid[1] * patch))
            overlay = np.zeros((grid[1], grid[0], 4))
            for t in range(grid[0]):
                for f in range(grid[1]):
                    v = cells[c, t, f]
                    overlay[f, t] = (0.5, 0.5, 0.5, 0.75) if v == 0 else (0, 0, 0, 0) if v == 1 else \
                        (*colours((v - 2) % 10)[:3], 0.55)
            ax.imshow(overlay, origin="lower", aspect="auto", interpolation="nearest",
                      extent=(0, grid[0] * patch, 0, grid[1] * patch))
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{mode} masks\nmel bins")
            if r == len(examples) - 1:
                ax.set_xlabel("time frames")
    fig.suptitle("A-JEPA masks: clear = context, tinted = target blocks, grey = unused", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
