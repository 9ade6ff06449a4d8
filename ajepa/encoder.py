"""A pretrained encoder in users' hands: audio in, embeddings out.

    import ajepa
    model = ajepa.load_encoder("models/pretrain")         # or models/pretrain/target, or any export folder
    scene = model.embed(waveform, sample_rate)            # [n_freq * D], or [n_clips, n_freq * D]
    frames, ms = model.embed_frames(waveform, sample_rate)  # [n_ts, n_freq * D], centres in ms

The audio goes through the pipeline's own front end (`ajepa.data.frontend`): resampled to the
export's rate, Kaldi fbank, rounded to float16 as the feature store keeps it, normalised with the
statistics recorded in the export. Nothing is estimated from the user's audio.

Scene embedding: what the linear probe reads (`linear.pooling: time`). The fbank is cut into windows
of the encoder's grid from frame 0, the last one zero-padded as the store pads short clips (a trailing
piece shorter than one patch is dropped, as the store crops it); each window's tokens become one
embedding per time patch, its frequency patches concatenated (ajepa.models.time_patch_embeddings), and
the scene embedding is their mean over every time patch of every window. A clip that fits one window
thus gets exactly the embedding the probe is trained on.

Frame embeddings (the HEAR timestamp embeddings): a patch spans 16 frames (175 ms: 15 hops of 10 ms
plus one 25 ms frame) and the encoder sees a fixed grid. To reach a 40 ms hop the fbank is cut into
grid-length windows four times, starting at frames 0, 4, 8 and 12, and the four sets of time-patch
embeddings are interleaved: embedding k comes from the patch on frames 4k .. 4k+15 and is stamped with
that patch's centre, 40 k + 87.5 ms. Patches never start before the audio, because the encoder never
saw leading padding in training; so the first timestamp is 87.5 ms and events in the first ~90 ms are
seen by the first embedding. Embeddings go on while their centre lies within the audio; frames past
the end are zeros, the padding the encoder saw at the end of short clips. A sound shorter than 87.5 ms
gets one embedding. Consecutive windows are encoded on their own (no attention across their borders).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ajepa.data.frontend import FrontEnd, normalize, pad_or_crop
from ajepa.errors import AjepaError
from ajepa.export import read_export
from ajepa.models import SpectrogramEncoder, pool_tokens, time_patch_embeddings
from ajepa.models.state import load_fitting

__all__ = ["AudioEncoder", "load_encoder", "spectrogram_encoder", "HOP_FRAMES"]

HOP_FRAMES = 4  # 40 ms between frame embeddings; HEAR asks for at most 50 ms
_FRONTEND_ARGS = ("sample_rate", "num_mel_bins", "frame_shift_ms", "frame_length_ms")


def spectrogram_encoder(architecture: dict) -> SpectrogramEncoder:
    """A SpectrogramEncoder from an export's `architecture`, drop path off: embeddings must be
    deterministic even if someone calls .train() on the model."""
    kwargs = {**architecture, "grid": tuple(architecture["grid"]), "drop_path": 0.0}
    try:
        return SpectrogramEncoder(**kwargs)
    except TypeError as e:
        raise AjepaError(f"encoder config {sorted(architecture)} does not fit SpectrogramEncoder ({e})") from None


class AudioEncoder(nn.Module):
    """A spectrogram encoder with the front end and the normalisation statistics it was trained with.
    `embed` gives scene embeddings, `embed_frames` one embedding every 40 ms (see the module docstring).
    The attributes HEAR asks for (sample_rate, scene/timestamp_embedding_size) are set, so `ajepa.hear`
    hands this module to hear-eval-kit as it is."""

    def __init__(self, encoder: SpectrogramEncoder, mean: float, std: float, frontend: FrontEnd | None = None,
                 max_windows: int = 32, config: dict | None = None):
        super().__init__()
        self.frontend = frontend or FrontEnd()
        patch, (n_time, n_freq) = encoder.patch_size, encoder.grid
        if n_freq * patch != self.frontend.num_mel_bins:
            raise AjepaError(f"encoder grid {encoder.grid} x patch {patch} covers {n_freq * patch} mel bins, "
                             f"the front end makes {self.frontend.num_mel_bins}")
        if patch % HOP_FRAMES:
            raise AjepaError(f"patch size {patch} is not a multiple of the {HOP_FRAMES}-frame hop")
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0) or max_windows < 1:
            raise AjepaError(f"mean must be finite, std finite and positive, max_windows positive, got {mean}, "
                             f"{std} and {max_windows}")
        self.encoder = encoder.eval()
        self.mean, self.std, self.max_windows = float(mean), float(std), int(max_windows)
        self.config = dict(config or {})
        self.sample_rate = int(self.frontend.sample_rate)
        self.embedding_size = int(n_freq * encoder.embed_dim)
        self.scene_embedding_size = self.timestamp_embedding_size = self.embedding_size
        self.window_frames = n_time * patch
        hop = self.frontend.sample_rate * self.frontend.frame_shift_ms / 1000  # 160 samples
        # in samples: the span of frames 0..patch-1 is [0, (patch - 1) * hop + one frame)
        self._first_centre = ((patch - 1) * hop + self.frontend.min_samples) / 2
        self._hop_samples = HOP_FRAMES * hop

    def num_timestamps(self, n_samples: int) -> int:
        """Frame embeddings of a sound of `n_samples`: one per 40 ms while the centre is within the audio."""
        return max(1, math.floor((n_samples - self._first_centre) / self._hop_samples) + 1)

    def timestamps_ms(self, n_samples: int) -> torch.Tensor:
        k = torch.arange(self.num_timestamps(n_samples), dtype=torch.float64)
        return (1000.0 * (self._first_centre + k * self._hop_samples) / self.sample_rate).float()

    def clips(self, waveform, sample_rate: int) -> tuple[list[torch.Tensor], bool]:
        """([mono float32 waveform at the front end's rate, ...], whether the input was a batch) of one
        clip [n], a batch [n_clips, n] or a list of clips of any lengths (tensors or numpy arrays)."""
        batched = isinstance(waveform, (list, tuple)) or np.ndim(waveform) == 2
        if not isinstance(waveform, (list, tuple)):
            waveform = torch.as_tensor(waveform)
            # soundfile's [n_samples, channels] would otherwise read as thousands of clips of 2 samples
            if waveform.ndim not in (1, 2) or waveform.ndim == 2 and waveform.shape[1] <= 8 < waveform.shape[0]:
                raise AjepaError(f"waveform must be [n_samples] or [n_clips, n_samples], got shape "
                                 f"{tuple(waveform.shape)} (mix channels down first, e.g. wav.mean(1))")
        if type(sample_rate) is not int and not isinstance(sample_rate, np.integer) or sample_rate <= 0:
            raise AjepaError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        out = []
        for w in (waveform if batched else [waveform]):
            w = torch.as_tensor(w).detach().to("cpu", torch.float32)
            if w.ndim != 1 or w.numel() == 0:
                raise AjepaError(f"each clip must be a 1-D waveform with samples, got shape {tuple(w.shape)}")
            if not torch.isfinite(w).all():
                raise AjepaError("audio contains NaN or infinite samples")
            out.append(self.frontend.resample(w[None], int(sample_rate))[0])
        if not out:
            raise AjepaError("no clips to embed")
        return out, batched

    def fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """Un-normalised log-mel frames [n_frames, mel] of one clip at the front end's rate."""
        if wav.shape[-1] < self.frontend.min_samples:
            # one Kaldi frame needs 25 ms: remove the mean first so the padding zeros leave it at zero
            wav = F.pad(wav - wav.mean(), (0, self.frontend.min_samples - wav.shape[-1]))
        return self.frontend.fbank(wav[None])

    def normalised(self, fbank: torch.Tensor, n_frames: int) -> torch.Tensor:
        """The frames as the feature store serves them: padded or cropped, float16, normalised."""
        return normalize(pad_or_crop(fbank, n_frames).half().float(), self.mean, self.std)

    def encode(self, windows: torch.Tensor, pooled: bool) -> torch.Tensor:
        """Windows [n, window_frames, mel] -> scene embeddings [n, E] (pooled) or time-patch embeddings
        [n, n_time, E], at most max_windows per encoder call, on the encoder's device."""
        device, grid, out = self.encoder.pos_embed.device, self.encoder.grid, []
        for chunk in windows.split(self.max_windows):
            tokens = self.encoder(chunk.to(device))
            out.append(pool_tokens(tokens, grid, "time") if pooled else time_patch_embeddings(tokens, grid))
        return torch.cat(out).float()

    @torch.no_grad()
    def embed(self, waveform, sample_rate: int) -> torch.Tensor:
        """Scene embeddings: [E] for one clip [n], [n_clips, E] for a batch or a list of clips."""
        clips, batched = self.clips(waveform, sample_rate)
        patch, window, windows, owner = self.encoder.patch_size, self.window_frames, [], []
        for i, wav in enumerate(clips):
            fbank = self.fbank(wav)
            n = max(1, -(-(fbank.shape[0] - patch + 1) // window))
            windows.append(self.normalised(fbank, n * window).reshape(n, window, -1))
            owner += [i] * n
        pooled = self.encode(torch.cat(windows), pooled=True)
        owner = torch.tensor(owner, device=pooled.device)
        scene = torch.stack([pooled[owner == i].mean(0) for i in range(len(clips))])
        return scene if batched else scene[0]

    @torch.no_grad()
    def embed_stream(self, blocks: Iterable[torch.Tensor]) -> torch.Tensor:
        """The scene embedding [E] of one clip given as consecutive blocks [1, n] of its waveform at the
        front end's rate (FrontEnd.stream): what `embed` gives for the whole clip, up to float rounding
        (the mean removed before each fbank is the part's, which Kaldi's per-frame DC removal cancels),
        in memory bounded by a block rather than by the clip."""
        hop, length = round(self.frontend.sample_rate * self.frontend.frame_shift_ms / 1000), self.frontend.min_samples
        window, patch = self.window_frames, self.encoder.patch_size
        buffer, total, count = torch.zeros(1, 0), None, 0

        def add(frames: torch.Tensor) -> None:
            nonlocal total, count
            n = -(-frames.shape[0] // window)
            pooled = self.encode(self.normalised(frames, n * window).reshape(n, window, -1), pooled=True)
            total = pooled.sum(0) if total is None else total + pooled.sum(0)
            count += n

        for block in blocks:
            buffer = torch.cat([buffer, block], 1)
            whole = (buffer.shape[1] - length) // hop + 1 if buffer.shape[1] >= length else 0
            if whole >= window:  # the frames of whole windows now; the rest waits for the next block
                keep = whole // window * window
                add(self.fbank(buffer[0, :(keep - 1) * hop + length])[:keep])
                buffer = buffer[:, keep * hop:]
        rest = (buffer.shape[1] - length) // hop + 1 if buffer.shape[1] >= length else 0
        if rest >= patch or count == 0:  # the last window, zero-padded, as `embed` keeps it
            add(self.fbank(buffer[0])[:max(rest, 1)])
        return total / count

    @torch.no_grad()
    def embed_frames(self, waveform, sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One embedding every 40 ms and its centre in ms: ([n_ts, E], [n_ts]) for one clip [n],
        ([n_clips, n_ts, E], [n_clips, n_ts]) for a batch of clips of one length."""
        clips, batched = self.clips(waveform, sample_rate)
        n_samples = clips[0].shape[0]
        if any(c.shape[0] != n_samples for c in clips):
            raise AjepaError("embed_frames: the clips of a batch must have one length (call it per clip)")
        n_time, patch, n = self.encoder.grid[0], self.encoder.patch_size, len(clips)
        shifts, n_ts = patch // HOP_FRAMES, self.num_timestamps(n_samples)
        span = math.ceil(math.ceil(n_ts / shifts) / n_time) * self.window_frames
        frames = torch.stack([self.normalised(self.fbank(w), HOP_FRAMES * (shifts - 1) + span) for w in clips])
        windows = torch.stack([frames[:, s * HOP_FRAMES: s * HOP_FRAMES + span] for s in range(shifts)], 1)
        per_patch = self.encode(windows.reshape(-1, self.window_frames, frames.shape[-1]), pooled=False)
        # patch q of shift s starts at frame 16 q + 4 s, i.e. it is embedding k = shifts * q + s
        dim = self.embedding_size
        emb = per_patch.reshape(n, shifts, -1, dim).transpose(1, 2).reshape(n, -1, dim)[:, :n_ts].contiguous()
        ts = self.timestamps_ms(n_samples).to(emb.device).expand(n, -1).contiguous()
        return (emb, ts) if batched else (emb[0], ts[0])

    def forward(self, waveform, sample_rate: int | None = None) -> torch.Tensor:
        """The scene embedding (`embed`), audio at the front end's rate unless told otherwise."""
        return self.embed(waveform, self.sample_rate if sample_rate is None else sample_rate)


def load_encoder(path: str | os.PathLike = "models/pretrain", encoder: str | None = None, *,
                 mean: float | None = None, std: float | None = None, target_length: int | None = None,
                 max_windows: int = 32, device: str | torch.device = "cpu") -> AudioEncoder:
    """An exported encoder (`ajepa.export`) as an AudioEncoder, in eval mode on `device`.

    `path`: an export folder, its model.safetensors, or a folder of exports (models/pretrain), of which
    `encoder` ("context" or "target"; default the only one, else "context"). `mean`/`std` replace the
    export's normalisation statistics (e.g. those of the features a probe was trained on);
    `target_length` replaces its window (frames, a multiple of the patch size); `max_windows` bounds
    the windows per encoder call (memory)."""
    where, state, config = read_export(path, encoder)
    arch = dict(config["architecture"])
    if target_length is not None:
        if target_length <= 0 or target_length % arch["patch_size"]:
            raise AjepaError(f"target_length {target_length} is not a positive multiple of the patch size "
                             f"{arch['patch_size']}")
        arch["grid"] = [target_length // arch["patch_size"], arch["grid"][1]]
    model = spectrogram_encoder(arch)
    load_fitting(model, state, str(where))  # one line naming the export when a tensor does not fit
    stats = config["normalisation"]  # checked by read_export
    mean, std = stats["mean"] if mean is None else mean, stats["std"] if std is None else std
    frontend = FrontEnd(**{k: config["frontend"][k] for k in _FRONTEND_ARGS})
    return AudioEncoder(model, mean, std, frontend, max_windows, {**config, "source": str(where)}).to(device)
