"""The AudioMAE/AST spectrogram front end: the one place audio becomes log-mel frames.

    waveform -> mono -> resample to 16 kHz -> subtract mean -> Kaldi fbank (128 mel, 25 ms / 10 ms,
    Hanning, htk_compat, no dither, no energy) -> pad with zeros or crop to target_length frames

Normalisation, (x - mean) / (2 std), is applied when features are read (see ajepa.data.store), so
the stored fbank does not change when the statistics do (e.g. to compare with published stats).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch
import torchaudio

# Decoded integer PCM lies in [-1, 1); float files may exceed full scale (mastering headroom, sums of
# tracks), but a sample beyond this bound is a broken or mis-scaled file, and its squares overflow the
# float32 fbank (1e30 squared is inf), which would make the dataset's mean and std NaN.
MAX_ABS_SAMPLE = 1e3


class UnreadableAudio(Exception):
    """A clip that cannot become features; the message is the reason recorded in the rejects file."""


@dataclass
class FrontEnd:
    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    _resamplers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg) -> FrontEnd:
        return cls(cfg.sample_rate, cfg.num_mel_bins, cfg.frame_shift_ms, cfg.frame_length_ms)

    @property
    def min_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    def load(self, path, max_frames: int | None = None) -> torch.Tensor:
        """Read a file as a mono float32 waveform [1, n] at the front end's rate; a file with non-finite
        samples or samples beyond MAX_ABS_SAMPLE is refused (UnreadableAudio). With `max_frames` (the
        frames the caller keeps), at most read_limit(max_frames) seconds are read: memory is bounded by
        the crop, not by the file."""
        with self._open(path) as f:
            sr = f.samplerate
            data = self._read(f, -1 if max_frames is None else math.ceil(self.read_limit(max_frames) * sr))
        if data.size == 0:
            raise UnreadableAudio("empty: no samples")
        return self.resample(torch.from_numpy(data)[None], sr)

    def read_limit(self, frames: int) -> float:
        """Seconds of audio read for `frames` kept frames: twice the crop plus 10 s, so that every clip up
        to that length (those of every dataset the pipeline ships: 1 s, 5 s and 10 s clips) is read
        whole and its features are exactly those of the whole file; a longer file is cut there (the
        mean removed before the fbank and the resampler's last few samples are then those of the part)."""
        return 2 * ((frames - 1) * self.frame_shift_ms + self.frame_length_ms) / 1000 + 10.0

    @contextlib.contextmanager
    def _open(self, path) -> Iterator[sf.SoundFile]:
        try:
            with sf.SoundFile(str(path)) as f:
                yield f
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            if not os.path.exists(path):  # libsndfile says only "System error."
                raise UnreadableAudio("unreadable audio: file not found (deleted or moved after it was listed)") from None
            raise UnreadableAudio(f"unreadable audio: {' '.join(str(e).split())}") from None

    @staticmethod
    def _read(f: sf.SoundFile, frames: int = -1) -> np.ndarray:
        """Up to `frames` samples (all: -1) from the file's position, mixed to mono float32, checked."""
        if f.subtype == "PCM_16":
            # libsndfile's own float conversion is x / 32768 too, but several times slower; scaling by
            # a power of two is exact, so the samples are bit-identical
            data = f.read(frames, dtype="int16", always_2d=True).astype(np.float32) * np.float32(1 / 32768)
        else:
            data = f.read(frames, dtype="float32", always_2d=True)
        peak = float(np.abs(data).max()) if data.size else 0.0
        if not np.isfinite(peak):
            raise UnreadableAudio("non-finite samples")
        if peak > MAX_ABS_SAMPLE:
            raise UnreadableAudio(f"samples out of range: peak |x| {peak:.3g} > {MAX_ABS_SAMPLE:g}")
        return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]

    def stream(self, path, block_seconds: float = 30.0) -> Iterator[torch.Tensor]:
        """The whole file as consecutive mono blocks [1, <= block] at the front end's rate, read and
        resampled a block at a time: memory is bounded by the block, not by the file. Each block is
        resampled with enough source on either side (zeros beyond the file, as the whole-file resampler
        pads) that the concatenated blocks equal the whole file's resampled waveform up to float
        rounding; blocks start on the resampler's phase grid, so no sample is shifted."""
        with self._open(path) as f:
            sr, n_src = f.samplerate, f.frames
            if n_src == 0:
                raise UnreadableAudio("empty: no samples")
            g = math.gcd(sr, self.sample_rate)
            down, up = sr // g, self.sample_rate // g
            width = self._resampler(sr).width if sr != self.sample_rate else 0
            ctx = (width // down + 2) * down  # source samples of context: at least width + down
            step = max(1, round(block_seconds * sr / down)) * down
            n_out = math.ceil(n_src * up / down)
            for start in range(0, n_src, step):
                lo = max(0, start - ctx)
                f.seek(lo)
                data = self._read(f, min(n_src, start + step + ctx) - lo)
                data = np.pad(data, (lo - (start - ctx), start + step + ctx - lo - data.shape[0]))
                wav = self.resample(torch.from_numpy(data)[None], sr)
                first = ctx // down * up
                yield wav[:, first: first + min(step // down * up, n_out - start // down * up)]

    def seconds(self, path) -> float:
        """The duration of a file from its header (nothing is decoded)."""
        with self._open(path) as f:
            return f.frames / f.samplerate

    def _resampler(self, sr: int) -> torchaudio.transforms.Resample:
        # the module caches the sinc kernel that functional.resample (AudioMAE's call) rebuilds every
        # time; building it in float32, as the functional form does, keeps the output bit-identical
        if sr not in self._resamplers:
            self._resamplers[sr] = torchaudio.transforms.Resample(sr, self.sample_rate, dtype=torch.float32)
        return self._resamplers[sr]

    def resample(self, wav: torch.Tensor, sr: int) -> torch.Tensor:
        return wav if sr == self.sample_rate else self._resampler(sr)(wav)

    def fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """Log-mel frames [n_frames, num_mel_bins] of a mono waveform [1, n] at `sample_rate`."""
        if wav.shape[-1] < self.min_samples:
            raise UnreadableAudio(f"too short: {wav.shape[-1]} samples, one frame needs {self.min_samples}")
        return torchaudio.compliance.kaldi.fbank(
            wav - wav.mean(), htk_compat=True, sample_frequency=self.sample_rate, use_energy=False,
            window_type="hanning", num_mel_bins=self.num_mel_bins, dither=0.0,
            frame_shift=self.frame_shift_ms, frame_length=self.frame_length_ms)

    def __call__(self, path) -> torch.Tensor:
        return self.fbank(self.load(path))


def pad_or_crop(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the end or keep the first target_length frames (AudioMAE/AST)."""
    n = fbank.shape[0]
    if n >= target_length:
        return fbank[:target_length]
    return torch.nn.functional.pad(fbank, (0, 0, 0, target_length - n))


def normalize(x, mean: float, std: float):
    """AudioMAE/AST normalisation: (x - mean) / (2 * std), so inputs sit roughly in [-1, 1]."""
    return (x - mean) / (2.0 * std)
