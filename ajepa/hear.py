"""The HEAR 2021 common API over an exported A-JEPA encoder, so hear-eval-kit can score it.

    import ajepa.hear as hear
    model = hear.load_model("models/pretrain/target")             # an export folder (ajepa.export)
    scene = hear.get_scene_embeddings(audio, model)                 # [n_sounds, n_freq * embed_dim]
    emb, ts = hear.get_timestamp_embeddings(audio, model)           # [n_sounds, n_ts, n_freq * embed_dim], ts

`audio` is float32 [n_sounds, n_samples] in [-1, 1] at the model's `sample_rate` (16 kHz), of any
length; outputs are float32 on the model's device, timestamps in milliseconds from the start of the
audio. Embeddings are n_freq x embed_dim wide (8 x 192 = 1,536 for the embedded default, 8 x 768 =
6,144 for ViT-B on 128 mel bins).

The model is `ajepa.encoder.AudioEncoder`, the one `ajepa.load_encoder` returns: the pipeline's front
end, normalised with the statistics stored in the export. Scene embeddings are its `embed` (what the
linear probe reads), timestamp embeddings its `embed_frames` (every 40 ms, the first centred at
87.5 ms); the module docstring of `ajepa.encoder` gives the windowing.
"""
from __future__ import annotations

import torch

from ajepa.encoder import HOP_FRAMES, AudioEncoder, load_encoder, spectrogram_encoder
from ajepa.errors import AjepaError

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings", "AUDIOSET_MEAN",
           "AUDIOSET_STD", "DEFAULT_ENCODER", "HOP_FRAMES"]

HearModel = AudioEncoder
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974  # AudioMAE/AST published fbank statistics
# The untrained stand-in `load_model(random_init=True)` builds: ViT-tiny width, two blocks, on the
# AudioSet grid (1024 frames x 128 mel bins). For API checks, not a representation.
DEFAULT_ENCODER = {"grid": [64, 8], "patch_size": 16, "embed_dim": 192, "depth": 2, "num_heads": 3,
                   "mlp_ratio": 4.0}


def load_model(model_file_path: str = "", *, mean: float | None = None, std: float | None = None,
               encoder_config: dict | None = None, seed: int = 0, max_windows: int = 32,
               random_init: bool = False) -> AudioEncoder:
    """An exported encoder (an export folder, its model.safetensors, or models/pretrain) for the HEAR API,
    normalised with the statistics in its export (`mean`/`std` replace them). Without a path it is an
    error: an untrained encoder scores as a representation without saying so.

    With `random_init` or an `encoder_config` (and no path): a randomly initialised encoder,
    `encoder_config` (default DEFAULT_ENCODER) seeded with `seed`, normalised with AudioSet's statistics
    unless `mean`/`std` are given, for API checks. `max_windows` bounds the grid-length windows per
    encoder call (memory)."""
    if model_file_path:
        if encoder_config is not None or random_init:
            raise AjepaError("encoder_config and random_init are for the random encoder; an export carries its "
                             "own config and weights")
        return load_encoder(model_file_path, mean=mean, std=std, max_windows=max_windows)
    if encoder_config is None and not random_init:
        raise AjepaError("load_model: no model_file_path: pass an export folder (e.g. models/pretrain/context, "
                         "what `ajepa pretrain` writes), or random_init=True for an untrained encoder (API checks)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = spectrogram_encoder(encoder_config if encoder_config is not None else DEFAULT_ENCODER)
    return AudioEncoder(encoder, AUDIOSET_MEAN if mean is None else mean, AUDIOSET_STD if std is None else std,
                        max_windows=max_windows)


def _check(audio: torch.Tensor) -> torch.Tensor:
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise AjepaError(f"audio must be [n_sounds, n_samples] with samples, got shape {tuple(audio.shape)}")
    return audio


def get_timestamp_embeddings(audio: torch.Tensor, model: AudioEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings every 40 ms [n_sounds, n_ts, D] and their centres in ms [n_sounds, n_ts]."""
    return model.embed_frames(_check(audio), model.sample_rate)


def get_scene_embeddings(audio: torch.Tensor, model: AudioEncoder) -> torch.Tensor:
    """One embedding per sound [n_sounds, D]: the model's scene embedding, as the linear probe reads it."""
    return model.embed(_check(audio), model.sample_rate)
