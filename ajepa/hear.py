"""The HEAR 2021 common API over an exported A-JEPA encoder, so hear-eval-kit can score it.

    import ajepa.hear as hear
    model = hear.load_model("models/pretrain/target_encoder.safetensors", mean=-5.10, std=3.80)
    scene = hear.get_scene_embeddings(audio, model)                 # [n_sounds, n_freq * embed_dim]
    emb, ts = hear.get_timestamp_embeddings(audio, model)           # [n_sounds, n_ts, n_freq * embed_dim], ts

`audio` is float32 [n_sounds, n_samples] in [-1, 1] at 16 kHz, of any length; outputs are float32 on
the model's device, timestamps in milliseconds from the start of the audio. Embeddings are n_freq x
embed_dim wide (8 x 192 = 1,536 for the embedded default, 8 x 768 = 6,144 for ViT-B on 128 mel bins).

Front end: the pipeline's own (`ajepa.data.frontend`): Kaldi fbank of each sound, zero-padded in the
fbank domain, rounded to float16 as the feature store keeps it, then normalised with (mean, std). The
export does not carry the statistics, so pass those of the features the encoder was trained on
(`data/features/DATASET/stats.json`, keys "mean"/"std"); the default is AudioSet's published pair.

Time resolution: a patch spans 16 frames (175 ms of audio: 15 hops of 10 ms plus one 25 ms frame)
and the encoder sees a fixed grid of T patches. One embedding per time patch is its column of tokens,
the frequency patches concatenated (low to high): averaging them would sum every band through the same
patch projection and lose where in frequency the energy is (MSM-MAE and EVAR keep the bands too). To reach a 40 ms hop the fbank is cut into grid-length windows four times,
starting at frames 0, 4, 8 and 12, and the four sets of patch embeddings are interleaved: embedding
k comes from the patch on frames 4k .. 4k+15 and is stamped with that patch's centre, 40 k + 87.5 ms.
Patches never start before the audio, because the encoder never saw leading padding in training; so
the first timestamp is 87.5 ms (the newest hear-validator warns about that, none fails it) and events
in the first ~90 ms are seen by the first embedding. Embeddings go on while their centre lies within
the audio (the last is less than 40 ms from its end); frames past the end are zeros, the padding the
encoder saw at the end of short clips. A sound shorter than 87.5 ms gets one embedding, stamped
87.5 ms all the same. A sound longer than a window is covered by consecutive windows, each encoded
on its own (no attention across window borders).

Scene embedding: the mean of the timestamp embeddings, i.e. of all four shifted encodings: the tokens
averaged over time with the frequency patches kept, as the linear probe reads them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ajepa.data.frontend import FrontEnd, normalize, pad_or_crop
from ajepa.errors import AjepaError
from ajepa.models import SpectrogramEncoder
from ajepa.train.checkpoint import load_encoder_state, load_fitting

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings", "AUDIOSET_MEAN",
           "AUDIOSET_STD", "DEFAULT_ENCODER", "HOP_FRAMES"]

AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974  # AudioMAE/AST published fbank statistics
HOP_FRAMES = 4  # 40 ms between timestamp embeddings; HEAR asks for at most 50 ms
# The untrained stand-in `load_model()` builds without a weights file: ViT-tiny width, two blocks, on
# the AudioSet grid (1024 frames x 128 mel bins). For API checks, not a representation.
DEFAULT_ENCODER = {"grid": [64, 8], "patch_size": 16, "embed_dim": 192, "depth": 2, "num_heads": 3,
                   "mlp_ratio": 4.0}


class HearModel(nn.Module):
    """A spectrogram encoder with the front end and statistics it expects; called on audio it returns
    (timestamp embeddings [n_sounds, n_ts, D], timestamps in ms [n_sounds, n_ts])."""

    sample_rate: int = 16000

    def __init__(self, encoder: SpectrogramEncoder, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD,
                 max_windows: int = 32):
        super().__init__()
        self.frontend = FrontEnd(sample_rate=self.sample_rate)
        patch, (n_time, n_freq) = encoder.patch_size, encoder.grid
        if n_freq * patch != self.frontend.num_mel_bins:
            raise AjepaError(f"encoder grid {encoder.grid} x patch {patch} covers {n_freq * patch} mel bins, "
                             f"the front end makes {self.frontend.num_mel_bins}")
        if patch % HOP_FRAMES:
            raise AjepaError(f"patch size {patch} is not a multiple of the {HOP_FRAMES}-frame hop")
        if not std > 0 or max_windows < 1:
            raise AjepaError(f"std and max_windows must be positive, got {std} and {max_windows}")
        self.encoder = encoder.eval()
        self.mean, self.std, self.max_windows = float(mean), float(std), int(max_windows)
        self.scene_embedding_size = self.timestamp_embedding_size = int(n_freq * encoder.embed_dim)
        hop = self.frontend.sample_rate * self.frontend.frame_shift_ms / 1000  # 160 samples
        window = self.frontend.min_samples  # 400 samples
        # in samples: the span of frames 0..patch-1 is [0, (patch - 1) * hop + window)
        self._first_centre = ((patch - 1) * hop + window) / 2
        self._hop_samples = HOP_FRAMES * hop

    def num_timestamps(self, n_samples: int) -> int:
        """Embeddings for a sound of `n_samples`: one per 40 ms while the centre is within the audio."""
        return max(1, math.floor((n_samples - self._first_centre) / self._hop_samples) + 1)

    def timestamps_ms(self, n_samples: int) -> torch.Tensor:
        k = torch.arange(self.num_timestamps(n_samples), dtype=torch.float64)
        return (1000.0 * (self._first_centre + k * self._hop_samples) / self.sample_rate).float()

    def _fbank(self, wav: torch.Tensor) -> torch.Tensor:
        n = wav.shape[-1]
        if n < self.frontend.min_samples:
            # one Kaldi frame needs 25 ms: remove the mean first so the padding zeros leave it at zero
            wav = F.pad(wav - wav.mean(), (0, self.frontend.min_samples - n))
        return self.frontend.fbank(wav)

    def features(self, audio: torch.Tensor, n_frames: int) -> torch.Tensor:
        """Normalised fbank [n_sounds, n_frames, mel] exactly as the feature store serves it."""
        # on the CPU: the same fbank, bit for bit, as the features the encoder was trained on
        wav = audio.detach().to("cpu", torch.float32)
        fbanks = torch.stack([pad_or_crop(self._fbank(w[None]), n_frames) for w in wav])
        return normalize(fbanks.half().float(), self.mean, self.std)

    def _time_patch_embeddings(self, windows: torch.Tensor) -> torch.Tensor:
        """[n, window frames, mel] -> one embedding per time patch [n, n_time, n_freq * D], its frequency
        patches concatenated."""
        n_time, n_freq = self.encoder.grid
        return self.encoder(windows).reshape(len(windows), n_time, n_freq * self.encoder.embed_dim)

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise AjepaError(f"audio must be [n_sounds, n_samples] with samples, got shape {tuple(audio.shape)}")
        if not torch.isfinite(audio).all():
            raise AjepaError("audio contains NaN or infinite samples")
        device = self.encoder.pos_embed.device
        n_sounds, n_samples = audio.shape
        n_time, patch, dim = self.encoder.grid[0], self.encoder.patch_size, self.timestamp_embedding_size
        shifts = patch // HOP_FRAMES
        n_ts = self.num_timestamps(n_samples)
        n_windows = math.ceil(math.ceil(n_ts / shifts) / n_time)
        span = n_windows * n_time * patch
        frames = self.features(audio, HOP_FRAMES * (shifts - 1) + span).to(device)
        windows = torch.stack([frames[:, s * HOP_FRAMES: s * HOP_FRAMES + span] for s in range(shifts)], 1)
        timestamps = self.timestamps_ms(n_samples).to(device).expand(n_sounds, -1)
        per_patch = torch.cat([self._time_patch_embeddings(chunk) for chunk in
                               windows.reshape(-1, n_time * patch, frames.shape[-1]).split(self.max_windows)])
        # patch q of shift s starts at frame 16 q + 4 s, i.e. it is embedding k = shifts * q + s
        embeddings = per_patch.reshape(n_sounds, shifts, -1, dim).transpose(1, 2).reshape(n_sounds, -1, dim)
        return embeddings[:, :n_ts].float().contiguous(), timestamps.contiguous()


def _encoder(config: dict) -> SpectrogramEncoder:
    # drop path off: the embeddings must be deterministic even if someone calls .train() on the model
    kwargs = {**config, "grid": tuple(config["grid"]), "drop_path": 0.0}
    try:
        return SpectrogramEncoder(**kwargs)
    except TypeError as e:
        raise AjepaError(f"encoder config {sorted(config)} does not fit SpectrogramEncoder ({e})") from None


def load_model(model_file_path: str = "", *, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD,
               encoder_config: dict | None = None, seed: int = 0, max_windows: int = 32) -> HearModel:
    """An exported encoder (``ajepa.train.checkpoint.export_encoder``) wrapped for the HEAR API.

    Without a path: a randomly initialised encoder, `encoder_config` (default DEFAULT_ENCODER) seeded
    with `seed`. `mean`/`std` are the fbank statistics of the encoder's training features.
    `max_windows` bounds the grid-length windows per encoder call (memory)."""
    if model_file_path:
        if encoder_config is not None:
            raise AjepaError("encoder_config is for the random encoder; a weights file carries its own config")
        # the metadata is parsed and its claims checked against the weights' shapes before the encoder
        # is built: a damaged or hostile config fails in one line, without allocating what it claims
        state, config = load_encoder_state(Path(model_file_path))
        encoder = _encoder(config)
        load_fitting(encoder, state, model_file_path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = _encoder(encoder_config if encoder_config is not None else DEFAULT_ENCODER)
    return HearModel(encoder, mean=mean, std=std, max_windows=max_windows)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings every 40 ms [n_sounds, n_ts, D] and their centres in ms [n_sounds, n_ts]."""
    return model(audio)


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """One embedding per sound [n_sounds, D]: the mean of its timestamp embeddings."""
    embeddings, _ = model(audio)
    return embeddings.mean(1)
