"""The AudioMAE/AST spectrogram front end: the one place audio becomes log-mel frames.

    waveform -> mono -> resample to 16 kHz -> subtract mean -> Kaldi fbank (128 mel, 25 ms / 10 ms,
    Hanning, htk_compat, no dither, no energy) -> pad with zeros or crop to target_length frames

Normalisation, (x - mean) / (2 std), is applied when features are read (see ajepa.data.store), so
the stored fbank does not change when the statistics do (e.g. to compare with published stats).
"""

from __future__ import annotations

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
    def from_config(cls, cfg) -> "FrontEnd":
        return cls(cfg.sample_rate, cfg.num_mel_bins, cfg.frame_shift_ms, cfg.frame_length_ms)

    @property
    def min_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    def load(self, path) -> torch.Tensor:
        """Read a file as a mono float32 waveform [1, n] at the front end's sample rate; a file with
        non-finite samples or samples beyond MAX_ABS_SAMPLE is refused (UnreadableAudio)."""
        try:
            with sf.SoundFile(str(path)) as f:
                sr = f.samplerate
                if f.subtype == "PCM_16":
                    # libsndfile's own float conversion is x / 32768 too, but several times slower;
                    # scaling by a power of two is exact, so the samples are bit-identical
                    data = f.read(dtype="int16", always_2d=True).astype(np.float32) * np.float32(1 / 32768)
                else:
                    data = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise UnreadableAudio(f"unreadable audio: {' '.join(str(e).split())}") from None
        if data.size == 0:
            raise UnreadableAudio("empty: no samples")
        peak = float(np.abs(data).max())
        if not np.isfinite(peak):
            raise UnreadableAudio("non-finite samples")
        if peak > MAX_ABS_SAMPLE:
            raise UnreadableAudio(f"samples out of range: peak |x| {peak:.3g} > {MAX_ABS_SAMPLE:g}")
        wav = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])[None]
        return self.resample(wav, sr)

    def resample(self, wav: torch.Tensor, sr: int) -> torch.Tensor:
        if sr == self.sample_rate:
            return wav
        # the module caches the sinc kernel that functional.resample (AudioMAE's call) rebuilds every
        # time; building it in float32, as the functional form does, keeps the output bit-identical
        if sr not in self._resamplers:
            self._resamplers[sr] = torchaudio.transforms.Resample(sr, self.sample_rate, dtype=torch.float32)
        return self._resamplers[sr](wav)

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
