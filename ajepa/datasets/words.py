"""The second embedded dataset: synthetic spoken words, made by a small formant synthesiser.

Ten command words (the SUPERB keyword-spotting vocabulary: yes no up down left right on off stop go)
spelled as phone sequences and rendered as speech-like sound:

  voiced phones   a harmonic source on a pitch contour, shaped by three formant resonances
                  (a cascade, as in Klatt's synthesiser) whose frequencies move between phone targets:
                  the formant transitions that tell consonants apart
  fricatives      noise in a band (s high, f broad and weak), with formant loci on both sides
  stops           a closure (silent, or a low voice bar for b d g), a release burst whose band depends on
                  the place of articulation, and for p t k an aspiration of noise through the formants
  nasals, glides  a low murmur (m n), or a fast transition from an i-like tract (y) or low F3 (r)

Speakers differ in vocal-tract length (every formant scaled together, adult male to child), their own
vowel targets, mean pitch, speaking rate, breathiness and a microphone tilt; every utterance adds its
own intonation, timing jitter, onset, level and background noise. Speakers are split disjointly into
train, val and test (as Speech Commands splits by speaker), so a test word is always a new voice.

Unlike `synth`, the time-averaged spectrum is a strong baseline here, as it is for real speech
commands: vowel colour and fricative noise survive averaging. Word pairs that differ in phone order
(no / on) or in one consonant (on / off, up / stop) need the temporal structure.

The unlabeled pretraining pool is speech in general: utterances of other speakers (never one of the
labeled speakers) of random one- to three-syllable pseudo-words built from the same phones, a third
of them one of the ten words.

Layout (the Speech Commands layout, so the manifest code is the one that reads the real thing):
    audio/{word}/{speaker}_nohash_{n}.wav   labeled clips
    audio/validation_list.txt               val clips, 'word/file.wav' per line
    audio/testing_list.txt                  test clips; every other clip is train
    pool/pool-{index:06d}.wav               unlabeled pretraining pool
    meta/pool.csv                           filename
Each clip is a pure function of (seed, split, index) and each speaker of (seed, speaker id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from scipy.signal import istft, stft

from ajepa.datasets.synth import GeneratorSpec, pink_noise, write_clips

__all__ = ["WORDS", "Speaker", "speaker", "utterance", "clip", "speaker_splits", "generate"]

WORDS = {  # word -> phones (see PHONES)
    "yes": "j e s", "no": "n ou", "up": "^ p", "down": "d au n", "left": "l e f t",
    "right": "r ai t", "on": "O n", "off": "O f", "stop": "s t O p", "go": "g ou",
}
LABELED, POOL, SPEAKERS = 0, 1, 2

# Vowel formant targets (F1, F2, F3 in Hz) for an adult male tract, after Peterson & Barney / Hillenbrand.
VOWELS = {"i": (280, 2250, 2900), "e": (550, 1800, 2500), "a": (730, 1150, 2450), "o": (520, 880, 2400),
          "u": (320, 900, 2250), "^": (620, 1200, 2550), "O": (600, 950, 2450)}
DIPHTHONGS = {"ai": ("a", "i"), "au": ("a", "u"), "ou": ("o", "u")}
# Consonants: kind, formant locus (the tract the transitions start from or head to), duration (ms),
# and for noise sources the band (Hz) and level relative to a vowel.
CONSONANTS = {
    "j": dict(kind="glide", locus=(280, 2200, 3000), ms=70),
    "l": dict(kind="glide", locus=(360, 1100, 2700), ms=65),
    "r": dict(kind="glide", locus=(420, 1250, 1650), ms=75),
    "m": dict(kind="nasal", locus=(260, 1000, 2300), ms=75),
    "n": dict(kind="nasal", locus=(260, 1700, 2600), ms=75),
    "s": dict(kind="fricative", locus=(400, 1700, 2600), ms=130, band=(3800, 7600), level=0.5),
    "S": dict(kind="fricative", locus=(350, 1900, 2400), ms=130, band=(2000, 5500), level=0.45),
    "f": dict(kind="fricative", locus=(350, 1100, 2300), ms=110, band=(1000, 7600), level=0.15),
    "p": dict(kind="stop", locus=(300, 900, 2200), ms=70, band=(300, 1800), level=0.25, voiced=False),
    "t": dict(kind="stop", locus=(350, 1700, 2600), ms=70, band=(3000, 6500), level=0.4, voiced=False),
    "k": dict(kind="stop", locus=(300, 2000, 2400), ms=75, band=(1500, 3200), level=0.4, voiced=False),
    "b": dict(kind="stop", locus=(300, 900, 2200), ms=60, band=(300, 1800), level=0.2, voiced=True),
    "d": dict(kind="stop", locus=(350, 1700, 2600), ms=60, band=(3000, 6000), level=0.3, voiced=True),
    "g": dict(kind="stop", locus=(300, 2000, 2400), ms=65, band=(1500, 3200), level=0.3, voiced=True),
}
PHONES = {*VOWELS, *DIPHTHONGS, *CONSONANTS}
BANDWIDTHS = (80.0, 110.0, 160.0)  # formant bandwidths (Hz)
FRAME_S = 0.005  # control rate of the synthesiser: 5 ms
# white noise at level 1 over the whole band comes out at about the RMS of a vowel: noise levels above are
# relative to a vowel (s about -9 dB, f about -17 dB, as in speech)
NOISE_SCALE = 2.75


@dataclass(frozen=True)
class Speaker:
    tract: float  # formant scale: 1 = adult male, ~1.2 = adult female, ~1.35 = child
    vowel_offsets: dict  # vowel -> per-formant factors: this speaker's own vowel targets
    f0: float  # mean pitch (Hz)
    rate: float  # duration factor (< 1: fast)
    breathiness: float  # aspiration noise mixed into voicing
    tilt_db: float  # microphone / channel tilt in dB per octave above 1 kHz


def speaker(seed: int, speaker_id: int) -> Speaker:
    rng = np.random.default_rng([seed, SPEAKERS, speaker_id])
    tract = float(rng.uniform(0.88, 1.32))
    offsets = {v: tuple(float(x) for x in rng.normal(1.0, 0.05, 3)) for v in VOWELS}
    f0 = float(np.clip(105.0 * tract ** 2.6 * rng.uniform(0.85, 1.18), 75.0, 320.0))
    return Speaker(tract, offsets, f0, float(rng.uniform(0.78, 1.3)), float(rng.uniform(0.0, 0.35)),
                   float(rng.uniform(-3.0, 3.0)))


def _segments(phones: list[str], spk: Speaker, rng) -> list[tuple[str, float]]:
    """(phone, seconds) with speaker rate, per-phone jitter, stressed and phrase-final lengthening."""
    out = []
    for i, p in enumerate(phones):
        if p in CONSONANTS:
            ms = CONSONANTS[p]["ms"]
        else:
            ms = 290.0 if p in DIPHTHONGS else 210.0
        if i == len(phones) - 1:
            ms *= 1.25
        out.append((p, ms / 1000.0 * spk.rate * rng.uniform(0.88, 1.12)))
    return out


def _vowel(v: str, spk: Speaker) -> np.ndarray:
    return np.array(VOWELS[v]) * np.array(spk.vowel_offsets[v]) * spk.tract


def _resonance(f: np.ndarray, fc: np.ndarray, bw: float) -> np.ndarray:
    """|H(f)| of a second-order resonator normalised to 1 at 0 Hz (one formant of a cascade)."""
    r = f / fc
    return 1.0 / np.sqrt((1.0 - r * r) ** 2 + (f * bw / (fc * fc)) ** 2)


def _tract(f: np.ndarray, formants: np.ndarray, nasal: np.ndarray) -> np.ndarray:
    """The cascade's gain at frequencies f [frames, K] for formants [frames, 3]; nasal frames [frames] are
    damped above the murmur (the closed mouth)."""
    gain = np.ones_like(f)
    for k in range(3):
        gain *= _resonance(f, formants[:, k:k + 1], BANDWIDTHS[k])
    damp = 1.0 / (1.0 + (f / 400.0) ** 2)
    return gain * np.where(nasal[:, None] > 0, damp * 0.5, 1.0)


def _tracks(segments, spk: Speaker, rng, n_frames: int) -> dict:
    """Control tracks at the frame rate: formants, voicing, noise levels and bands, nasality."""
    times, targets = [], []  # formant anchor points
    voice, noise_level = np.zeros(n_frames), np.zeros(n_frames)
    noise_band = np.zeros((n_frames, 2))
    aspiration, nasal = np.zeros(n_frames), np.zeros(n_frames)
    t = 0.0
    for i, (p, dur) in enumerate(segments):
        a, b = int(round(t / FRAME_S)), int(round((t + dur) / FRAME_S))
        edge = min(0.045, dur / 3)
        if p in VOWELS or p in DIPHTHONGS:
            first, last = (DIPHTHONGS[p] if p in DIPHTHONGS else (p, p))
            times += [t + edge, t + dur - edge]
            targets += [_vowel(first, spk), _vowel(last, spk)]
            voice[a:b] = 1.0
        else:
            c = CONSONANTS[p]
            locus = np.array(c["locus"]) * spk.tract
            times += [t + 0.2 * dur, t + 0.8 * dur]
            targets += [locus, locus]
            if c["kind"] == "glide":
                voice[a:b] = 0.8
            elif c["kind"] == "nasal":
                voice[a:b], nasal[a:b] = 0.6, 1.0
            elif c["kind"] == "fricative":
                noise_level[a:b], noise_band[a:b] = c["level"], c["band"]
            else:  # stop: closure, then a burst at release, then aspiration if voiceless and a vowel follows
                closure = max(a + 1, b - int(0.012 / FRAME_S))
                voice[a:closure] = 0.12 if c["voiced"] else 0.0
                released = i + 1 < len(segments) or rng.random() < 0.7  # word-final stops may be unreleased
                if released:
                    noise_level[closure:b], noise_band[closure:b] = c["level"], c["band"]
                if not c["voiced"] and i + 1 < len(segments):
                    asp = int(rng.uniform(0.035, 0.06) * spk.rate / FRAME_S)
                    aspiration[b:b + asp] = 0.35
                    voice[b:b + asp] = 0.0
                    # the vowel's voicing starts after the aspiration (voice onset time)
                    nxt = int(round((t + dur + segments[i + 1][1]) / FRAME_S))
                    voice[b + asp:nxt] = np.where(voice[b + asp:nxt] > 0, voice[b + asp:nxt], 1.0)
        t += dur
    frame_t = np.arange(n_frames) * FRAME_S
    order = np.argsort(times, kind="stable")
    anchors_t, anchors = np.asarray(times)[order], np.asarray(targets)[order]
    formants = np.stack([np.interp(frame_t, anchors_t, anchors[:, k]) for k in range(3)], axis=1)
    return {"formants": formants, "voice": voice, "noise": noise_level, "band": noise_band,
            "aspiration": aspiration, "nasal": nasal, "length": t}


def _smooth(x: np.ndarray, frames: int = 3) -> np.ndarray:
    """Short ramps instead of steps: a step in level would add a broadband click."""
    kernel = np.hanning(2 * frames + 1)
    return np.convolve(x, kernel / kernel.sum(), mode="same")


def _voiced(tr: dict, spk: Speaker, rng, sr: int, n: int) -> np.ndarray:
    """The harmonic part: harmonics of the pitch contour, each weighted by the tract's gain at its frequency
    (computed at the frame rate and interpolated), with the source's -12 dB/octave roll-off."""
    n_frames = len(tr["voice"])
    frame_t = np.arange(n_frames) * FRAME_S
    u = frame_t / max(tr["length"], FRAME_S)
    start, end = rng.uniform(0.98, 1.15), (rng.uniform(1.05, 1.3) if rng.random() < 0.2 else rng.uniform(0.75, 0.97))
    vibrato = 1.0 + 0.015 * np.sin(2 * np.pi * rng.uniform(4.0, 6.0) * frame_t + rng.uniform(0, 2 * np.pi))
    f0_frames = spk.f0 * (start + (end - start) * np.clip(u, 0, 1)) * vibrato
    sample_t = np.arange(n) / sr
    f0 = np.interp(sample_t, frame_t, f0_frames)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    n_harm = int(0.45 * sr / f0_frames.min())
    h = np.arange(1, n_harm + 1)
    freqs = f0_frames[:, None] * h[None, :]  # [frames, harmonics]
    amp = _tract(freqs, tr["formants"], tr["nasal"]) / h[None, :] ** 2 * h[None, :]  # source -12, lip +6 dB/oct
    amp *= (freqs < 0.45 * sr) * _smooth(tr["voice"])[:, None]
    # amplitudes linearly interpolated from the frame rate; sin(k phase) by the Chebyshev recurrence
    # sin((k+1) p) = 2 cos(p) sin(k p) - sin((k-1) p), a multiply-add per harmonic instead of a sine
    pos = np.minimum(sample_t / FRAME_S, n_frames - 1.001)
    i0, w = pos.astype(int), pos - pos.astype(int)
    lo, hi = amp[i0], amp[i0 + 1]
    two_cos, prev, cur = 2.0 * np.cos(phase), np.zeros(n), np.sin(phase)
    out = np.zeros(n)
    for k in range(n_harm):
        out += (lo[:, k] + (hi[:, k] - lo[:, k]) * w) * cur
        prev, cur = cur, two_cos * cur - prev
    return out


def _noise(tr: dict, spk: Speaker, rng, sr: int, n: int) -> np.ndarray:
    """The noise part, shaped frame by frame in the STFT domain: fricative and burst bands, aspiration
    through the formants, and breathiness under the voicing."""
    hop = int(FRAME_S * sr)
    f, _, spec = stft(rng.standard_normal(n), fs=sr, nperseg=4 * hop, noverlap=3 * hop, boundary="even")
    n_frames = spec.shape[1]
    idx = np.minimum(np.arange(n_frames), len(tr["voice"]) - 1)
    band = tr["band"][idx]
    in_band = (f[None, :] >= band[:, :1]) & (f[None, :] <= band[:, 1:])
    formants = tr["formants"][idx]
    tract = _tract(np.broadcast_to(f[None, :], (n_frames, len(f))), formants, tr["nasal"][idx])
    tract /= tract.max(axis=1, keepdims=True) + 1e-9
    shape = (_smooth(tr["noise"])[idx, None] * in_band
             + (_smooth(tr["aspiration"])[idx, None] + spk.breathiness * 0.15 * _smooth(tr["voice"])[idx, None]
                * (f[None, :] > 1500)) * tract)
    _, out = istft(spec * shape.T, fs=sr, nperseg=4 * hop, noverlap=3 * hop)
    out = out[:n]
    return np.pad(out, (0, n - len(out))) * NOISE_SCALE


def _tilt(x: np.ndarray, tilt_db: float, sr: int) -> np.ndarray:
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / sr)
    octaves = np.log2(np.maximum(f, 1000.0) / 1000.0)
    return np.fft.irfft(spec * 10 ** (tilt_db * octaves / 20), len(x))


def utterance(phones: list[str], spk: Speaker, rng: np.random.Generator, sr: int) -> np.ndarray:
    """One spoken pseudo-word (float64, unit RMS over its span), before placement and background noise."""
    segments = _segments(phones, spk, rng)
    length = sum(d for _, d in segments)
    n_frames = int(np.ceil(length / FRAME_S)) + 2
    n = int(round(length * sr))
    tr = _tracks(segments, spk, rng, n_frames)
    out = _voiced(tr, spk, rng, sr, n) + _noise(tr, spk, rng, sr, n)
    out = _tilt(out, spk.tilt_db, sr)
    return out / (np.sqrt(np.mean(out ** 2)) + 1e-9)


def pseudo_word(rng: np.random.Generator) -> list[str]:
    """A random 1-3 syllable word of the pool: (consonant) vowel (consonant) syllables."""
    onsets = [c for c in CONSONANTS] + [None] * 3
    codas = ["n", "m", "s", "f", "t", "p", "k", "l", None, None, None]
    nuclei = list(VOWELS) + list(DIPHTHONGS)
    phones = []
    for _ in range(int(rng.integers(1, 4))):
        onset, coda = onsets[rng.integers(len(onsets))], codas[rng.integers(len(codas))]
        phones += ([onset] if onset else []) + [nuclei[rng.integers(len(nuclei))]] + ([coda] if coda else [])
    return phones


def clip(spec: GeneratorSpec, split: int, index: int, speaker_id: int, word: str | None) -> np.ndarray:
    """A whole clip (float32 in [-1, 1]): the word (None: a pool pseudo-word) said by speaker_id, at a
    random onset in background noise at a random SNR and level. A pure function of its arguments."""
    rng = np.random.default_rng([spec.seed, split, index])
    sr, n = spec.sample_rate, int(round(spec.duration_s * spec.sample_rate))
    spk = speaker(spec.seed, speaker_id)
    if word is None:
        phones = WORDS[list(WORDS)[rng.integers(len(WORDS))]].split() if rng.random() < 1 / 3 else pseudo_word(rng)
    else:
        phones = WORDS[word].split()
    fg = utterance(phones, spk, rng, sr)[:n]
    out = np.zeros(n)
    onset = int(rng.integers(0, n - len(fg) + 1))
    out[onset:onset + len(fg)] = fg
    noise = pink_noise(rng, n, sr)
    snr_db = rng.uniform(*spec.snr_db)
    out += noise * 10 ** (-snr_db / 20) / (np.sqrt(np.mean(noise ** 2)) + 1e-9)
    gain = 10 ** (rng.uniform(*spec.gain_db) / 20)
    return (0.7 * gain * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def speaker_splits(speakers: tuple[int, int, int]) -> dict[str, range]:
    """Labeled speaker ids per split (disjoint); pool speakers are numbered after them."""
    n_train, n_val, n_test = speakers
    return {"train": range(0, n_train), "val": range(n_train, n_train + n_val),
            "test": range(n_train + n_val, n_train + n_val + n_test)}


def _write_clip(job: tuple) -> None:
    path, spec, split, index, speaker_id, word = job
    sf.write(path, clip(spec, split, index, speaker_id, word), spec.sample_rate, subtype="PCM_16")


def generate(root: Path, spec: GeneratorSpec, speakers: tuple[int, int, int], repetitions: int, pool_clips: int,
             pool_speakers: int, progress=None, workers: int = 1) -> pd.DataFrame:
    """Write the dataset under `root` (empty or absent) in the layout above; return the labeled table
    (file, word, speaker, split). Files are the same for any number of workers."""
    audio, pool_dir = root / "audio", root / "pool"
    for d in (audio, pool_dir, root / "meta"):
        d.mkdir(parents=True, exist_ok=True)
    rows, jobs, index = [], [], 0
    for split, ids in speaker_splits(speakers).items():
        for spk in ids:
            for word in WORDS:
                for rep in range(repetitions):
                    rel = f"{word}/{spk:04d}_nohash_{rep}.wav"
                    (audio / word).mkdir(exist_ok=True)
                    jobs.append((audio / rel, spec, LABELED, index, spk, word))
                    rows.append({"file": rel, "word": word, "speaker": spk, "split": split})
                    index += 1
    first_pool = sum(speakers)
    pool_names = []
    for i in range(pool_clips):
        name = f"pool-{i:06d}.wav"
        jobs.append((pool_dir / name, spec, POOL, i, first_pool + i % pool_speakers, None))
        pool_names.append(name)
    write_clips(_write_clip, jobs, progress, workers)
    table = pd.DataFrame(rows)
    for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        (audio / name).write_text("".join(f + "\n" for f in table.loc[table["split"] == split, "file"]))
    pd.DataFrame({"filename": pool_names}).to_csv(root / "meta" / "pool.csv", index=False)
    return table
