"""`ajepa bench ...`: throughput figures that issues set targets on, printed rather than asserted."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio

from ajepa import masks
from ajepa.config import load_params
from ajepa.cpus import available_cpus
from ajepa.data.frontend import FrontEnd
from ajepa.data.loader import pretrain_loader
from ajepa.data.store import FeatureStore, extract_features
from ajepa.datasets import synth
from ajepa.device import pick_device
from ajepa.downstream.finetune import StepBatches, batch_stream
from ajepa.downstream.protocols import EvalSplit, Task
from ajepa.errors import AjepaError
from ajepa.models import set_activation_checkpointing
from ajepa.models.vit import SIZES
from ajepa.tools import flops, layerprobe, scale
from ajepa.tools.probebench import bench_probe, format_probe
from ajepa.train.compute import compile_blocks
from ajepa.train.engine import autocast_for
from ajepa.train.pretrain import build_mask_generator, build_model, train_step
from ajepa.train.schedules import param_groups

BENCH_SR, BENCH_SECONDS = 44100, 10.0


def _bench_clips(root: Path, n: int) -> pd.DataFrame:
    """n distinct 10 s clips at 44.1 kHz (PCM16 WAV, as ESC-50 ships), from the synthetic generator."""
    spec = synth.GeneratorSpec(seed=1, duration_s=BENCH_SECONDS, sample_rate=BENCH_SR, snr_db=(5.0, 30.0))
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
    workers = workers or available_cpus()
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


# ---------------------------------------------------------------------------------------------
# pretraining step


def _expected_tf_fraction(mode: str, c0: float, n: int = 10_000) -> float:
    """Share of TF-mode steps a whole run of `mode` draws (curriculum: the mean of f(s), about 2/3)."""
    if mode in ("block", "tf"):
        return float(mode == "tf")
    f = sum(masks.curriculum_probability(s, n, c0) for s in range(n)) / n
    return f if mode == "curriculum" else 1.0 - f


def bench_pretrain(params, encoder: str = "config", target_length: int | None = None, batch: int | None = None,
                   predictor_dim: int | None = None, predictor_depth: int | None = None, steps: int = 8,
                   warmup: int = 2, threads: int | None = None, device: str = "auto", compile: bool = False,
                   activation_checkpointing: bool = False) -> dict:
    """Time real A-JEPA training steps at the configured size (or an override) and relate their
    model FLOP/s to the matmul peak measured in the same run (MFU).

    The step is the pretraining loop's: target forward, context forward + predictor, loss,
    backward, gradient clipping, fused AdamW, EMA update; bf16 autocast on CUDA, fp32 on CPU.
    Block-mode and TF-mode steps are timed separately (their context sizes differ); the headline
    figures mix the two in the proportion the configured masking mode draws over a run.
    Inputs are random spectrograms: the step's cost does not depend on the values, and the
    data loader runs in other processes during training. `compile` and `activation_checkpointing`
    are pretrain.compile and pretrain.activation_checkpointing; with `compile` the first steps
    (compilation included) are timed apart from the steady state. Peak memory: see _memory.
    """

    dev = pick_device(device, key="--device")
    cuda = dev.type == "cuda"
    n_threads = flops.configure_cpu_threads(threads) if not cuda else torch.get_num_threads()
    busy = None if cuda else flops.cpu_busy_fraction(0.5)
    cfg, length, grid, patch = _bench_config(params, encoder, target_length, predictor_dim, predictor_depth)
    batch = batch or cfg.optim.batch_size

    baseline = _memory(dev)
    torch.manual_seed(0)
    model = build_model(cfg, grid, patch).to(dev)
    if activation_checkpointing:
        set_activation_checkpointing(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay[0]), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), fused=True)
    enc_cfg, pred_cfg, _ = flops.model_configs(model)
    autocast = autocast_for(dev)

    def step_fn(m, o, x, ctx, tgt):
        return train_step(m, o, x, ctx, tgt, 0.996, cfg.optim.grad_clip, autocast)

    # The peak is measured before, between and after the two timed modes, and each mode's MFU uses
    # the mean of the two peaks around it: a shared VM's speed drifts by 20% or more within a
    # minute, and one peak taken before all timing made MFU swing with that drift.
    peaks = [flops.matmul_peak_flops(dev, seconds=0.7)]
    x = torch.randn(batch, length, grid[1] * patch, device=dev)
    first_steps = _compile(model, opt, step_fn, x, cfg, grid) if compile else None
    per_mode = {mode: _time_mode(model, opt, step_fn, x, cfg, mode, grid, steps, warmup, peaks, baseline)
                for mode in ("block", "tf")}
    r = {"device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({n_threads} threads)",
         "dtype": "bf16 autocast" if cuda else "fp32", "cpu_busy_before": None if busy is None else round(busy, 3),
         "encoder": {k: enc_cfg[k] for k in ("embed_dim", "depth", "num_heads")},
         "predictor": {"embed_dim": pred_cfg["embed_dim"], "depth": pred_cfg["depth"],
                       "num_heads": pred_cfg["num_heads"]},
         "input": [length, grid[1] * patch], "grid": list(grid), "batch": batch, "steps": steps,
         "masking_mode": cfg.masking.mode, "compile": compile, "activation_checkpointing": activation_checkpointing,
         "compile_seconds": first_steps, "peak_memory": _peak_memory(dev, per_mode)}
    return {**r, **_mixed(per_mode, peaks, batch, _expected_tf_fraction(cfg.masking.mode, cfg.masking.curriculum_c0))}


def _mixed(per_mode: dict, peaks: list[float], batch: int, p_tf: float) -> dict:
    """The headline figures: the block and TF steps mixed in the proportion the masking mode draws."""
    weights = {"tf": p_tf, "block": 1 - p_tf}
    mix = {k: sum(w * per_mode[mode][k] for mode, w in weights.items())
           for k in ("seconds_per_step", "model_flops_per_step")}
    return {
        "tf_fraction": round(p_tf, 3),
        "peak_flops_per_s": sum(peaks) / len(peaks),
        "peak_measurements": peaks,  # before block, between, after tf
        # max / min - 1 of the three: how much the machine's speed drifted during the run
        "peak_spread": max(peaks) / min(peaks) - 1,
        "samples_per_s": batch / mix["seconds_per_step"],
        "model_flops_per_s": mix["model_flops_per_step"] / mix["seconds_per_step"],
        "modes": per_mode,
        # the model FLOPs of the mixed step over what the peak, as measured around each mode, does in its time
        "mfu": mix["model_flops_per_step"] / sum(
            w * per_mode[k]["seconds_per_step"] * per_mode[k]["peak_flops_per_s"] for k, w in weights.items()),
    }


def _bench_config(params, encoder: str, target_length: int | None, predictor_dim: int | None,
                  predictor_depth: int | None):
    """(pretrain config with the size overrides, input frames, patch grid, patch size)."""
    cfg = params.pretrain
    if encoder != "config":
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **SIZES[encoder]))
    pred = {k: v for k, v in (("embed_dim", predictor_dim), ("depth", predictor_depth)) if v is not None}
    if pred:
        cfg = dataclasses.replace(cfg, predictor=dataclasses.replace(cfg.predictor, **pred))
    patch = params.features.patch_size
    length = target_length or params.dataset(cfg.datasets[0]).target_length
    if length % patch:
        raise AjepaError(f"--target-length {length}: must be a multiple of features.patch_size ({patch})")
    return cfg, length, (length // patch, params.features.num_mel_bins // patch), patch


def _memory(dev: torch.device) -> int:
    """A memory mark in bytes. On CUDA the allocator's peak, which the call resets (a peak of what
    tensors use, without the allocator's cache); on the CPU the process's peak resident set so far
    (ru_maxrss, which never decreases), so a later mark minus an earlier one is the growth of the peak."""
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak_memory(dev: torch.device, per_mode: dict) -> dict:
    return {"what": "CUDA max_memory_allocated during the timed steps" if dev.type == "cuda" else
            "growth of the process's peak RSS (ru_maxrss) over the model, optimiser and timed steps",
            "bytes": max(m["peak_memory_bytes"] for m in per_mode.values())}


def _compile(model, opt, step_fn, x: torch.Tensor, cfg, grid) -> float:
    """torch.compile the blocks and time the first steps apart (seconds): two of each masking mode, since
    a block compiles for its first input size and again when a size changes, after which it takes any."""

    compile_blocks(model)
    t0 = time.perf_counter()
    for mode in ("block", "tf"):
        gen = masks.MaskGenerator(grid, mode=mode, seed=cfg.seed + 1, **_mask_kwargs(cfg))
        for s in range(2):
            mk = gen(x.shape[0], s)
            step_fn(model, opt, x, mk.context.to(x.device), mk.targets.to(x.device))
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def _time_mode(model, opt, step_fn, x: torch.Tensor, cfg, mode: str, grid, steps: int, warmup: int,
               peaks: list[float], baseline: int) -> dict:
    """Time `steps` real steps with `mode` masks; measure the matmul peak after them (appended to
    `peaks`) and relate the step's model FLOP/s to the mean of the peaks before and after (MFU)."""

    dev, batch = x.device, x.shape[0]
    enc_cfg, pred_cfg, _ = flops.model_configs(model)
    gen = masks.MaskGenerator(grid, mode=mode, seed=cfg.seed, **_mask_kwargs(cfg))
    drawn = [gen(batch, s) for s in range(warmup + steps)]
    batches = [(x, mk.context.to(dev), mk.targets.to(dev)) for mk in drawn]
    if dev.type == "cuda":
        _memory(dev)
    seconds = flops.measure_step(model, opt, lambda i: batches[i], steps=steps, warmup=warmup, step_fn=step_fn,
                                 reduce="mean")
    memory = _memory(dev) - (0 if dev.type == "cuda" else baseline)
    peaks.append(flops.matmul_peak_flops(dev, seconds=0.7))
    peak = (peaks[-2] + peaks[-1]) / 2
    step_flops = sum(flops.ajepa_step_flops(enc_cfg, pred_cfg, grid, batch, mk.context.shape[1], mk.targets.shape[1],
                                            mk.targets.shape[2]) for mk in drawn[warmup:]) / steps
    return {"seconds_per_step": seconds, "samples_per_s": batch / seconds, "model_flops_per_step": step_flops,
            "model_flops_per_s": step_flops / seconds, "peak_flops_per_s": peak, "mfu": step_flops / seconds / peak,
            "context_patches": sum(mk.context.shape[1] for mk in drawn[warmup:]) / steps, "peak_memory_bytes": memory}


def _mask_kwargs(cfg) -> dict:
    m = cfg.masking
    return dict(num_targets=m.num_targets, target_scale=tuple(m.target_scale), target_aspect=tuple(m.target_aspect),
                context_scale=tuple(m.context_scale), tf_num_targets=m.tf_num_targets, tf_scale=tuple(m.tf_scale),
                min_keep=m.min_keep)


def _format_pretrain(r: dict) -> str:
    e, p = r["encoder"], r["predictor"]
    lines = [f"bench pretrain: encoder {e['embed_dim']}/{e['depth']}/{e['num_heads']} (dim/depth/heads), predictor "
             f"{p['embed_dim']}/{p['depth']}/{p['num_heads']}, input {r['input'][0]}x{r['input'][1]} "
             f"({r['grid'][0]}x{r['grid'][1]} patches), batch {r['batch']}, {r['device']}, {r['dtype']}",
             f"  matmul peak      : {r['peak_flops_per_s'] / 1e9:9.1f} GFLOP/s (measured now, "
             f"{len(r['peak_measurements'])} times; spread {r['peak_spread']:.0%})"]
    for mode, m in r["modes"].items():
        lines.append(f"  {mode:5s} masks      : {m['seconds_per_step']:7.3f} s/step  {m['samples_per_s']:8.1f} samples/s  "
                     f"{m['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  MFU {m['mfu']:.2f}  "
                     f"({m['context_patches']:.0f} context patches)")
    lines.append(f"  {r['masking_mode']} ({r['tf_fraction']:.0%} TF): {r['samples_per_s']:8.1f} samples/s  "
                 f"{r['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  MFU {r['mfu']:.2f}  peak memory "
                 f"{r['peak_memory']['bytes'] / 2**20:.0f} MiB ({r['peak_memory']['what']})")
    options = [k.replace("_", " ") for k in ("compile", "activation_checkpointing") if r[k]]
    if options:
        lines.append(f"  with {' and '.join(options)}" + ("" if r["compile_seconds"] is None else
                     f"; the first 4 steps, compiling included, took {r['compile_seconds']:.1f} s (not in the above)"))
    if r["cpu_busy_before"] is not None and r["cpu_busy_before"] > 0.1:
        lines.append(f"  warning: the CPU was {r['cpu_busy_before']:.0%} busy before the run; another process "
                     f"competes for the cores, so these figures understate a quiet machine")
    if r["peak_spread"] > 0.1:
        lines.append(f"  warning: the matmul peak varied by {r['peak_spread']:.0%} during the run (a shared or "
                     f"throttled machine); MFU is uncertain by about as much: rerun for a steadier figure")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# pretraining data loader

# The compute plan (docs/compute.md, "GPU-hours"): a paper-size step (ViT-B, predictor 16 x 512, 1024 x 128
# inputs, curriculum masks) costs 633 GFLOP per clip by the analytic counter (ajepa.tools.flops), and an
# H100 SXM runs 989 TFLOP/s dense bf16 at the plan's assumed MFU of 35%.
PLAN_FLOP_PER_CLIP, H100_PEAK_FLOPS, PLAN_MFU, PLAN_GPUS = 633e9, 989e12, 0.35, 8


def plan_clips_per_s_per_gpu() -> float:
    """Clips per second one H100 consumes at the compute plan's rate (about 547)."""
    return H100_PEAK_FLOPS * PLAN_MFU / PLAN_FLOP_PER_CLIP


def _loader_store(root: Path, clips: int, frames: int) -> Path:
    """A feature store of `clips` clips of `frames` x 128 (10 s clips: cropped, or padded as AudioSet's are
    to 1024), extracted from a few distinct synthetic clips repeated, so it is built in seconds."""
    if frames % 16:
        raise AjepaError(f"--frames {frames}: must be a multiple of the patch size 16")
    manifest = _bench_clips(root, clips)
    extract_features(manifest, root / "features", FrontEnd(), target_length=frames, shard_clips=256,
                     num_workers=0, max_reject_fraction=0.0, progress=False,
                     extra_stats={"grid": [frames // 16, 128 // 16], "patch_size": 16})
    return root / "features"


def _time_loader(store, batch: int, gen, workers: int, steps: int, warmup: int = 2) -> float:
    """Clips per second the pretraining loader (clips + the collate's masks) yields with `workers` processes."""

    loader = pretrain_loader(store, batch, gen, seed=0, total_steps=warmup + steps, num_workers=workers,
                             pin_memory=False)
    return _time_batches((b for b in loader), steps, warmup)


def _time_batches(batches, steps: int, warmup: int = 2) -> float:
    """Clips per second in `steps` batches (their `x`) drawn after `warmup` (the workers' start-up is not a
    steady-state cost); the iterator is closed after, so its workers end."""
    try:
        for _ in range(warmup):
            next(batches)
        t0 = time.perf_counter()
        n = sum(len(next(batches).x) for _ in range(steps))
        return n / (time.perf_counter() - t0)
    finally:
        batches.close()


def bench_loader(params, store: str | None = None, clips: int = 1024, frames: int = 1024, batch: int = 128,
                 steps: int = 8, workers: tuple[int, ...] = (1, 2), benchmark: str | None = None) -> dict:
    """Clips/s per loader worker reading `batch`-clip batches with pretraining masks from a feature store
    (the given one, else a temporary one of `clips` clips of `frames` x 128), and the workers a node needs
    to feed 8 H100s at the compute plan's rate; beside them, fine-tuning's batches from the same store
    (`bench_finetune_loader`). Reads come from the page cache (the store was just written or read): a
    cold disk can only be slower."""

    benchmark = benchmark or params.pipeline.benchmarks[0]
    params.recipe(benchmark)  # an unknown benchmark fails before any store is built
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ajepa-bench-") as tmp:
        fs = FeatureStore(store or _loader_store(Path(tmp), clips, frames))
        grid = tuple(fs.stats["grid"])
        gen = build_mask_generator(params.pretrain, grid, total_steps=steps + 2)
        rates = {w: _time_loader(fs, min(batch, len(fs)), gen, w, steps) for w in workers}
        tuning = bench_finetune_loader(params, fs, benchmark, min(batch, len(fs)), steps, workers)
    per_worker = min(r / max(w, 1) for w, r in rates.items())  # the conservative figure: scaling is rarely perfect
    need = plan_clips_per_s_per_gpu() * PLAN_GPUS
    return {"store": store or "temporary", "clips": len(fs), "clip_shape": list(fs.shape), "grid": list(grid),
            "batch": min(batch, len(fs)), "masking_mode": params.pretrain.masking.mode, "steps": steps,
            "clips_per_s": {str(w): round(r, 1) for w, r in rates.items()},
            "clips_per_s_per_worker": {str(w): round(r / max(w, 1), 1) for w, r in rates.items()},
            "plan_clips_per_s_per_gpu": round(need / PLAN_GPUS, 1), "plan_gpus": PLAN_GPUS,
            "plan_clips_per_s": round(need, 1), "workers_needed": math.ceil(need / per_worker),
            "plan_source": "docs/compute.md: 633 GFLOP per clip at 35% MFU of an H100's 989 TFLOP/s bf16",
            "finetune": tuning}


def bench_finetune_loader(params, store, benchmark: str, batch: int, steps: int, workers: tuple[int, ...]) -> dict:
    """Training clips/s of fine-tuning's batches (`benchmark`'s recipe: its sampling, and its mixup partners,
    read as well) from `store` clip by clip, as a benchmark too large to hold in memory is read, per loader
    worker count."""

    clips = np.arange(len(store))
    split = EvalSplit("bench", clips, clips[:0], clips[:0])  # every clip a training clip of one class
    task = Task(benchmark, "splits", ["clip"], torch.empty(0), torch.zeros(len(store), dtype=torch.long), store.index,
                [split], store)
    per_epoch = len(store) // batch
    cfg = dataclasses.replace(params.recipe(benchmark), batch_size=batch, samples_per_epoch=0,
                              epochs=math.ceil((steps + 2) / per_epoch))
    rates = {}
    for w in workers:
        stream = batch_stream(StepBatches(task, split, dataclasses.replace(cfg, num_workers=w), per_epoch), 0,
                              torch.device("cpu"))
        rates[w] = _time_batches(stream, steps)
    return {"benchmark": benchmark, "batch": batch, "mixup": cfg.mixup, "balanced_sampling": cfg.balanced_sampling,
            "prefetch": cfg.prefetch, "clips_per_s": {str(w): round(r, 1) for w, r in rates.items()},
            "clips_per_s_per_worker": {str(w): round(r / max(w, 1), 1) for w, r in rates.items()}}


def _format_loader(r: dict) -> str:
    lines = [f"bench loader: {r['clips']} clips of {r['clip_shape'][0]}x{r['clip_shape'][1]} ({r['store']} store), "
             f"batches of {r['batch']} with {r['masking_mode']} masks on a {r['grid'][0]}x{r['grid'][1]} grid"]
    for w, rate in r["clips_per_s"].items():
        lines.append(f"  {w} worker(s): {rate:8.1f} clips/s  ({r['clips_per_s_per_worker'][w]:.1f} per worker)")
    lines.append(f"  to feed {r['plan_gpus']} H100s at the compute plan's {r['plan_clips_per_s_per_gpu']:.0f} clips/s "
                 f"each ({r['plan_clips_per_s']:.0f} clips/s): {r['workers_needed']} loader workers on the node "
                 f"({r['plan_source']}; page-cache reads)")
    t = r["finetune"]
    lines.append(f"  fine-tuning batches of {t['batch']} ({t['benchmark']}'s recipe: mixup {t['mixup']:g}, each "
                 f"mixed clip's partner read too), clip by clip from the store:")
    for w, rate in t["clips_per_s"].items():
        lines.append(f"  {w} worker(s): {rate:8.1f} clips/s  ({t['clips_per_s_per_worker'][w]:.1f} per worker)")
    return "\n".join(lines)


def run(args) -> str:
    if args.bench == "pretrain":
        r = bench_pretrain(load_params(args.params), encoder=args.encoder, target_length=args.target_length,
                           batch=args.batch, predictor_dim=args.predictor_dim, predictor_depth=args.predictor_depth,
                           steps=args.steps, threads=args.threads, device=args.device, compile=args.compile,
                           activation_checkpointing=args.activation_checkpointing)
        return json.dumps(r) if args.json else _format_pretrain(r)
    if args.bench == "loader":
        r = bench_loader(load_params(args.params), store=args.store, clips=args.clips, frames=args.frames,
                         batch=args.batch, steps=args.steps, workers=tuple(args.workers), benchmark=args.benchmark)
        return json.dumps(r) if args.json else _format_loader(r)
    if args.bench == "probe":
        r = bench_probe(args.clips, args.width, block_mb=args.block_mb, max_iter=args.max_iter, device=args.device)
        return json.dumps(r) if args.json else format_probe(r)
    if args.bench == "scale":
        r = scale.bench_scale(args.params, args.clips, args.nofile, args.memory_gb, args.readonly, args.folder)
        return json.dumps(r) if args.json else scale.format_scale(r)
    if args.bench == "layers":
        r = layerprobe.probe_layers(load_params(args.params), args.benchmark, args.encoder)
        return json.dumps(r) if args.json else layerprobe.format_layers(r)
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
