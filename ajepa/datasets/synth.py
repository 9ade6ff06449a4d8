"""The embedded default dataset: synthetic sounds whose classes live in time-frequency structure.

Twelve classes in six pairs. Three pairs are exact time mirrors of each other (glide direction,
tone->noise vs noise->tone, low->high vs high->low bursts) and arch vs valley sweep the same
frequencies for the same time in the opposite order, so in these four pairs the time-averaged
spectra are identical in distribution and a classifier on the averaged spectrum is at chance inside
each pair. The other two pairs share their average spectrum and differ in fine temporal texture
(amplitude-modulation rate, click rate; every event is scaled to the same RMS). A model of the patches can tell
all twelve apart; the averaged spectrum can at best tell the six pairs apart (about 50%). That gap
is what makes the default run a test of self-supervised learning rather than of spectral colour.

Nuisances on every clip: pitch shift (random base frequency and band positions), onset jitter,
event durations, background noise at a random SNR, and overall gain. Each clip is generated from
its own generator seeded with (seed, split, index), so the set is identical for the same seed,
independent of generation order, and different for another seed.

Layout (the ESC-50 layout, so the same manifest code reads the real ESC-50):
    audio/{fold}-{index:06d}-A-{target}.wav    labeled benchmark clips
    pool/pool-{index:06d}.wav                  unlabeled pretraining pool (same generative process)
    meta/synth.csv                             filename, fold, target, category, esc10, src_file, take
    meta/pool.csv                              filename
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

CLASSES = (
    "rising_glide", "falling_glide",
    "arch_glide", "valley_glide",
    "tone_then_noise", "noise_then_tone",
    "low_then_high_bursts", "high_then_low_bursts",
    "slow_am_tone", "fast_am_tone",
    "slow_clicks", "fast_clicks",
)
LABELED, POOL = 0, 1


@dataclass(frozen=True)
class GeneratorSpec:
    """What an embedded dataset's clips are drawn from (synth and words alike)."""

    seed: int
    duration_s: float
    sample_rate: int
    snr_db: tuple[float, float]
    gain_db: tuple[float, float] = (-12.0, 0.0)  # overall level of the clip


def _harmonic(rng, f_inst: np.ndarray, sr: int) -> np.ndarray:
    """A harmonic tone following the instantaneous fundamental f_inst (Hz per sample)."""
    phase = 2 * np.pi * np.cumsum(f_inst) / sr
    n_harm = int(rng.integers(3, 6))
    out = np.zeros_like(f_inst)
    for h in range(1, n_harm + 1):
        # harmonics above 90% of Nyquist would alias back down as spurious glides
        ok = f_inst * h < 0.45 * sr
        out += ok * np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h
    return out


def _band_noise(rng, n: int, lo: float, hi: float, sr: int) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0
    out = np.fft.irfft(spec, n)
    return out / (np.abs(out).max() + 1e-9)


def _envelope(n: int, sr: int, ramp_s: float = 0.01) -> np.ndarray:
    """Raised-cosine on/off ramps: hard edges would add broadband clicks to every event."""
    r = min(int(ramp_s * sr), n // 2)
    env = np.ones(n)
    if r:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, r))
        env[:r], env[n - r:] = ramp, ramp[::-1]
    return env


def _glide(rng, n: int, sr: int, shape: str) -> np.ndarray:
    f_low = rng.uniform(180, 500)
    f_high = f_low * rng.uniform(2.0, 3.0)
    t = np.linspace(0, 1, n)
    # log-frequency trajectories, so mirrored shapes spend equal time at each pitch
    u = {"rise": t, "fall": 1 - t, "arch": 1 - np.abs(2 * t - 1), "valley": np.abs(2 * t - 1)}[shape]
    f = f_low * (f_high / f_low) ** u
    return _harmonic(rng, f, sr) * _envelope(n, sr)


def _steady_tone(rng, n: int, sr: int) -> np.ndarray:
    f = np.full(n, rng.uniform(250, 700))
    return _harmonic(rng, f, sr) * _envelope(n, sr)


def _burst(rng, n: int, sr: int, band: str) -> np.ndarray:
    centre = {"low": rng.uniform(400, 900), "mid": rng.uniform(1200, 2500), "high": rng.uniform(3000, 5500)}[band]
    width = centre * rng.uniform(0.3, 0.6)
    return _band_noise(rng, n, centre - width / 2, centre + width / 2, sr) * _envelope(n, sr)


def _am_tone(rng, n: int, sr: int, rate: float) -> np.ndarray:
    f = np.full(n, rng.uniform(500, 1800))
    t = np.arange(n) / sr
    am = 0.5 * (1 - np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    return _harmonic(rng, f, sr) * am * _envelope(n, sr)


def _clicks(rng, n: int, sr: int, rate: float) -> np.ndarray:
    out = np.zeros(n)
    click_len = int(0.004 * sr)
    decay = np.exp(-np.arange(click_len) / (0.0008 * sr))
    times = np.arange(rng.uniform(0, 1 / rate), n / sr - 0.005, 1 / rate)
    times = times + rng.normal(0, 0.1 / rate, len(times))
    for t0 in times:
        i = int(np.clip(t0, 0, n / sr) * sr)
        seg = out[i:i + click_len]
        seg += rng.standard_normal(len(seg)) * decay[:len(seg)]
    return out / (np.abs(out).max() + 1e-9)


def _pair(rng, sr: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    gap = int(rng.uniform(0.02, 0.12) * sr)
    out = np.zeros(len(first) + gap + len(second))
    out[:len(first)] = first
    out[len(first) + gap:] = second
    return out


def event(rng: np.random.Generator, category: str, sr: int, duration_s: float) -> np.ndarray:
    """One clip's foreground event for a class, before placement, noise and gain."""
    max_len = duration_s * sr
    length = int(rng.uniform(0.6, 0.85) * max_len)
    half = int(length * rng.uniform(0.42, 0.5))
    if category.endswith("_glide"):
        shape = {"rising_glide": "rise", "falling_glide": "fall", "arch_glide": "arch", "valley_glide": "valley"}
        return _glide(rng, length, sr, shape[category])
    if category in ("tone_then_noise", "noise_then_tone"):
        tone, noise = _steady_tone(rng, half, sr), _burst(rng, half, sr, "mid")
        return _pair(rng, sr, *((tone, noise) if category == "tone_then_noise" else (noise, tone)))
    if category in ("low_then_high_bursts", "high_then_low_bursts"):
        low, high = _burst(rng, half, sr, "low"), _burst(rng, half, sr, "high")
        return _pair(rng, sr, *((low, high) if category.startswith("low") else (high, low)))
    if category in ("slow_am_tone", "fast_am_tone"):
        return _am_tone(rng, length, sr, rng.uniform(2.5, 4.5) if category.startswith("slow") else rng.uniform(11, 16))
    if category in ("slow_clicks", "fast_clicks"):
        return _clicks(rng, length, sr, rng.uniform(4, 6) if category.startswith("slow") else rng.uniform(14, 20))
    raise ValueError(f"unknown synthetic class {category!r}")


def pink_noise(rng, n: int, sr: int) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec /= np.sqrt(np.maximum(freqs, 20.0))
    return np.fft.irfft(spec, n)


def clip(spec: GeneratorSpec, split: int, index: int, category: str) -> np.ndarray:
    """A whole clip (float32 in [-1, 1]), a pure function of (seed, split, index, category)."""
    rng = np.random.default_rng([spec.seed, split, index])
    sr, n = spec.sample_rate, int(round(spec.duration_s * spec.sample_rate))
    fg = event(rng, category, sr, spec.duration_s)[:n]
    fg = fg / (np.sqrt(np.mean(fg**2)) + 1e-9)
    onset = int(rng.integers(0, n - len(fg) + 1))
    out = np.zeros(n)
    out[onset:onset + len(fg)] = fg
    noise = pink_noise(rng, n, sr)
    snr_db = rng.uniform(*spec.snr_db)
    # SNR against the event's own RMS (over its span), so short and long events are equally audible
    noise *= 10 ** (-snr_db / 20) / (np.sqrt(np.mean(noise**2)) + 1e-9)
    out += noise
    gain = 10 ** (rng.uniform(*spec.gain_db) / 20)
    return (0.7 * gain * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def _write_clip(job: tuple) -> None:
    path, spec, split, index, category = job
    sf.write(path, clip(spec, split, index, category), spec.sample_rate, subtype="PCM_16")


def write_clips(write, jobs: list, progress=None, workers: int = 1) -> None:
    """Call write(job) for every job, in `workers` forked processes when workers > 1 (as the features
    stage's workers); every clip is a pure function of its job, so the files are the same either way."""
    with contextlib.ExitStack() as stack:
        written = map(write, jobs)
        if workers > 1:
            executor = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")))
            written = executor.map(write, jobs, chunksize=32)
        for _ in written:
            if progress:
                progress.update(1)


def generate(root: Path, spec: GeneratorSpec, clips_per_class: int, num_folds: int, pool_clips: int,
             progress=None, workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the dataset under `root` (which must be empty or absent); return (meta, pool) tables.
    With workers > 1 the clips are written by that many processes; every clip is a pure function of
    its (seed, split, index), so the files are the same either way."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "pool").mkdir(exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    rows, pool_rows, jobs = [], [], []
    index = 0
    for target, category in enumerate(CLASSES):
        for k in range(clips_per_class):
            fold = k % num_folds + 1
            name = f"{fold}-{index:06d}-A-{target}.wav"
            jobs.append((root / "audio" / name, spec, LABELED, index, category))
            rows.append(dict(filename=name, fold=fold, target=target, category=category, esc10=False,
                             src_file=f"{index:06d}", take="A"))
            index += 1
    class_rng = np.random.default_rng([spec.seed, POOL])
    pool_classes = class_rng.integers(0, len(CLASSES), pool_clips)
    for i, target in enumerate(pool_classes):
        name = f"pool-{i:06d}.wav"
        jobs.append((root / "pool" / name, spec, POOL, i, CLASSES[target]))
        pool_rows.append(dict(filename=name))
    write_clips(_write_clip, jobs, progress, workers)
    meta, pool = pd.DataFrame(rows), pd.DataFrame(pool_rows)
    meta.to_csv(root / "meta" / "synth.csv", index=False)
    pool.to_csv(root / "meta" / "pool.csv", index=False)
    return meta, pool
