"""`ajepa bench ...`: throughput figures that issues set targets on, printed rather than asserted."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import soundfile as sf
import torch
import torchaudio

from ajepa.data import synth
from ajepa.data.frontend import FrontEnd
from ajepa.data.store import extract_features

BENCH_SR, BENCH_SECONDS = 44100, 10.0


def _bench_clips(root: Path, n: int) -> pd.DataFrame:
    """n distinct 10 s clips at 44.1 kHz (PCM16 WAV, as ESC-50 ships), from the synthetic generator."""
    spec = synth.SynthSpec(seed=1, duration_s=BENCH_SECONDS, sample_rate=BENCH_SR, snr_db=(5.0, 30.0))
    distinct = min(n, 16)  # generating is slower than extracting; repeat a few distinct files
    for i in range(distinct):
        sf.write(root / f"clip{i}.wav", synth.clip(spec, 0, i, synth.CLASSES[i % len(synth.CLASSES)]),
                 BENCH_SR, subtype="PCM_16")
    paths = [str(root / f"clip{i % distinct}.wav") for i in range(n)]
    return pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "path": paths, "labels": "",
                         "fold": 0, "split": "train"})


def _reference(path: str, reps: int) -> float:
    """Seconds per clip of the bare AudioMAE-style computation, one thread, nothing written."""
    torch.set_num_threads(1)

    def once():
        wav, sr = sf.read(path, dtype="float32")
        wav = torchaudio.functional.resample(torch.from_numpy(wav)[None], sr, 16000)
        return torchaudio.compliance.kaldi.fbank(
            wav - wav.mean(), htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_shift=10)

    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t0) / reps


def bench_features(clips: int, workers: int) -> dict:
    workers = workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ajepa-bench-") as tmp:
        tmp = Path(tmp)
        manifest = _bench_clips(tmp, clips)
        ref = _reference(manifest["path"].iloc[0], reps=min(clips, 50))
        runs = {}
        for n_proc in sorted({1, workers}):
            torch.set_num_threads(1)
            s = extract_features(manifest, tmp / f"out{n_proc}", FrontEnd(), target_length=1024, shard_clips=256,
                                 num_workers=n_proc, max_reject_fraction=0.0, progress=False)
            runs[n_proc] = s
    one, par = runs[1], runs[workers]
    rt_one = one.audio_seconds / one.seconds
    rt_par = par.audio_seconds / par.seconds
    return {
        "clips": clips, "clip_seconds": BENCH_SECONDS, "input_sample_rate": BENCH_SR, "workers": workers,
        "clips_per_s": round(clips / par.seconds, 1),
        "clips_per_s_one_process": round(clips / one.seconds, 1),
        "realtime_factor_one_process": round(rt_one, 1),
        "realtime_factor_all_workers": round(rt_par, 1),
        "realtime_factor_per_core": round(rt_one, 1),
        "parallel_speedup": round(rt_par / rt_one, 2),
        "reference_realtime_factor": round(BENCH_SECONDS / ref, 1),
    }


def run(args) -> str:
    if args.bench == "features":
        r = bench_features(args.clips, args.workers)
        if args.json:
            return json.dumps(r)
        return (f"bench features: {r['clips']} clips of {r['clip_seconds']:g} s at {r['input_sample_rate']} Hz, "
                f"decode + resample + fbank + write.\n"
                f"  1 process : {r['clips_per_s_one_process']:8.1f} clips/s  {r['realtime_factor_one_process']:8.0f}x real time"
                f" (per core)\n"
                f"  {r['workers']} workers : {r['clips_per_s']:8.1f} clips/s  {r['realtime_factor_all_workers']:8.0f}x real time"
                f"  ({r['parallel_speedup']:.2f}x the single process)\n"
                f"  reference (bare read + resample + fbank, one thread, no write): "
                f"{r['reference_realtime_factor']:.0f}x real time")
    raise ValueError(args.bench)
