"""Typed view of params.yaml: the single source of parameters for every stage.

Every key must be present (the dataclasses hold types and checks, not defaults, so the value a
stage runs with is always the value DVC and Snakemake see in params.yaml). An unknown key, a wrong
type or an impossible value raises ConfigError with one line naming the key and the value.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ajepa.choices import (
    ClassifierLoss,
    Encoder,
    HeadInit,
    HeadNorm,
    Loss,
    LrScaling,
    MaskMode,
    Pooling,
    PredictorInit,
    Selection,
    Split,
)
from ajepa.datasets.download import Checksum
from ajepa.datasets.registry import REGISTRY
from ajepa.errors import ConfigError

PARAMS_FILE = "params.yaml"
# The largest transformer (encoder or predictor) a parameter file may ask for: ViT-g, the largest
# audio ViT published, has 1.0 B weights; a depth or width far beyond is a typo (depth 100000 for 10)
# that would otherwise end in an out-of-memory kill without a word.
MAX_TRANSFORMER_WEIGHTS, MAX_DEPTH = 2_000_000_000, 256
# frames per clip: 16x AudioSet's 1024 (164 s at 10 ms), beyond any ViT's sequence on one GPU
MAX_TARGET_LENGTH = 16384


# ---------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class SynthConfig:
    """Generator of the embedded default dataset (see ajepa.datasets.synth)."""

    seed: int  # every clip is a pure function of (seed, split, index)
    pool_clips: int  # unlabeled pretraining pool
    clips_per_class: int  # labeled benchmark, spread evenly over the folds
    num_folds: int  # cross-validation folds of the labeled benchmark
    duration_s: float  # clip length in seconds
    sample_rate: int  # of the generated audio (Hz)
    snr_db: list[float]  # background-noise SNR range [low, high]
    gain_db: list[float]  # overall clip level range [low, high] (a nuisance: it says nothing of the class)

    def check(self, key: str) -> None:
        _positive(self, key, "pool_clips", "clips_per_class", "num_folds", "duration_s", "sample_rate")
        if self.clips_per_class < self.num_folds:
            _bad(key + ".clips_per_class", self.clips_per_class, f"must be at least num_folds ({self.num_folds})")
        _check_ranges(self, key)


@dataclass(frozen=True)
class WordsConfig:
    """Generator of the embedded spoken-words dataset (see ajepa.datasets.words)."""

    seed: int  # every clip is a pure function of (seed, split, index)
    speakers: list[int]  # labeled speakers [train, val, test]: disjoint, so every test voice is new
    repetitions: int  # times each labeled speaker says each of the ten words
    pool_clips: int  # unlabeled pretraining pool (pseudo-words of other speakers)
    pool_speakers: int  # speakers of the pool, none of them a labeled speaker
    duration_s: float  # clip length in seconds
    sample_rate: int  # of the generated audio (Hz)
    snr_db: list[float]  # background-noise SNR range [low, high] against the word's own level
    gain_db: list[float]  # overall clip level range [low, high]
    def check(self, key: str) -> None:
        _positive(self, key, "repetitions", "pool_clips", "pool_speakers", "duration_s", "sample_rate")
        if len(self.speakers) != 3 or min(self.speakers) < 1:
            _bad(key + ".speakers", self.speakers, "must be [train, val, test], each at least 1")
        _check_ranges(self, key)


def _check_micro_batch(value, key: str) -> None:
    if isinstance(value, int) and value < 1:
        _bad(key + ".micro_batch", value, "must be a positive number of clips, auto, or null (the whole batch)")


def _check_ranges(cfg, key: str) -> None:
    if len(cfg.snr_db) != 2 or cfg.snr_db[0] > cfg.snr_db[1]:
        _bad(key + ".snr_db", cfg.snr_db, "must be [low, high] with low <= high")
    if len(cfg.gain_db) != 2 or cfg.gain_db[0] > cfg.gain_db[1] or cfg.gain_db[1] > 0:
        _bad(key + ".gain_db", cfg.gain_db, "must be [low, high] with low <= high <= 0 (no clipping)")


@dataclass(frozen=True)
class FetchConfig:
    """Where a published dataset comes from (ajepa.datasets.sources; URLs and checksums in ajepa.datasets.registry)."""

    source: str | None  # a local archive or directory (downloads or extracted copies); null = download
    mirror: str | None  # base URL serving the registry's files under their own names; null = official URLs
    checksums: dict[str, str]  # file name -> 'sha256:HEX' or 'md5:HEX': replaces or adds to the registry's

    def check(self, key: str) -> None:
        if self.source is not None and not self.source:
            _bad(key + ".source", self.source, "must be a path, or null to download")
        if self.mirror is not None and not self.mirror.startswith(("http://", "https://")):
            _bad(key + ".mirror", self.mirror, "must be an http:// or https:// URL, or null for the official URLs")
        for name, value in self.checksums.items():
            try:
                Checksum.parse(value)
            except ValueError:
                _bad(f"{key}.checksums.{name}", value, "must be 'sha256:<64 hex digits>' or 'md5:<32 hex digits>'")


@dataclass(frozen=True)
class AudioSetFetchConfig(FetchConfig):
    """AudioSet: the CSVs as above; the audio from a directory of clips named by YTID (not distributed)."""

    audio_dir: str | None  # clips named YTID.*, YTID_start_end.*, or Y + YTID.*, in any sub-folder
    val_fraction: float  # training segments held out as `val` (by a hash of the YTID); AudioSet has no val split

    def check(self, key: str) -> None:
        super().check(key)
        if not 0.0 < self.val_fraction < 1.0:
            _bad(key + ".val_fraction", self.val_fraction, "must be in (0, 1): the protocol needs a validation split")


@dataclass(frozen=True)
class Dataset:
    """One dataset: how to get it (`prepare`, typed by the dataset: PREPARE_TYPES) and its clip length."""

    prepare: Any  # SynthConfig, WordsConfig, FetchConfig or AudioSetFetchConfig, by name (PREPARE_TYPES)
    target_length: int  # frames after pad/crop


# The `prepare` section each dataset reads; a published dataset not listed here is a plain download.
PREPARE_TYPES = {"synth": SynthConfig, "words": WordsConfig, "as20k": AudioSetFetchConfig,
                 "as2m": AudioSetFetchConfig}


@dataclass(frozen=True)
class FeaturesConfig:
    """The AudioMAE/AST front end and the feature store."""

    sample_rate: int  # audio is resampled to this rate (Hz) before the fbank
    num_mel_bins: int  # mel bins of the Kaldi fbank (AudioMAE/AST: 128)
    frame_shift_ms: float  # hop between fbank frames (10 ms)
    frame_length_ms: float  # fbank window (25 ms)
    patch_size: int  # square patches on the (time, frequency) grid
    shard_clips: int  # clips per memory-mapped shard
    num_workers: int  # worker processes; 0 = one per core
    max_reject_fraction: float  # the stage fails when more clips than this fraction are unreadable
    def check(self, key: str) -> None:
        _positive(self, key, "sample_rate", "num_mel_bins", "frame_shift_ms", "frame_length_ms", "patch_size",
                  "shard_clips")
        if self.num_workers < 0:
            _bad(key + ".num_workers", self.num_workers, "must be >= 0 (0 = one per core)")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            _bad(key + ".max_reject_fraction", self.max_reject_fraction, "must be in [0, 1]")
        if self.num_mel_bins % self.patch_size:
            _bad(key + ".num_mel_bins", self.num_mel_bins, f"must be a multiple of patch_size ({self.patch_size})")
        if self.frame_length_ms < self.frame_shift_ms:
            _bad(key + ".frame_length_ms", self.frame_length_ms, "must be >= frame_shift_ms")
        fft, empty = empty_mel_filters(self.num_mel_bins, self.sample_rate, self.frame_length_ms)
        if empty >= self.patch_size:
            _bad(key + ".num_mel_bins", self.num_mel_bins,
                 f"{empty} of its mel filters cover no bin of the {fft}-point FFT of a {self.frame_length_ms:g} ms "
                 f"frame at {self.sample_rate} Hz (rows of constants, a whole patch row or more); fewer mel bins, "
                 f"or a longer frame_length_ms (AudioMAE's 128 bins at 16 kHz and 25 ms leave 1)")


def empty_mel_filters(num_mel_bins: int, sample_rate: int, frame_length_ms: float) -> tuple[int, int]:
    """(FFT size, how many of Kaldi's triangular mel filters (20 Hz to Nyquist) hold no FFT bin): each
    of those makes a frequency row of the fbank a constant, whatever the audio."""
    window = int(sample_rate * frame_length_ms / 1000)
    fft = 1 << max(0, window - 1).bit_length()  # Kaldi rounds the window up to a power of two
    mel_low, mel_high = (1127.0 * math.log1p(f / 700.0) for f in (20.0, sample_rate / 2))
    edges = [mel_low + i * (mel_high - mel_low) / (num_mel_bins + 1) for i in range(num_mel_bins + 2)]
    bins = [1127.0 * math.log1p(i * sample_rate / fft / 700.0) for i in range(fft // 2)]  # ascending
    # filter b spans (edges[b], edges[b + 2]): empty when the first bin above its left edge is past its right
    firsts = [bisect.bisect_right(bins, edges[b]) for b in range(num_mel_bins)]
    return fft, sum(i == len(bins) or bins[i] >= edges[b + 2] for b, i in enumerate(firsts))


@dataclass(frozen=True)
class EncoderConfig:
    """ViT encoder. The paper's ViT-B is 768 / 12 / 12 (ViT-S 384 / 12 / 6, see ajepa.models.SIZES)."""

    embed_dim: int  # token width
    depth: int  # transformer blocks
    num_heads: int  # attention heads
    mlp_ratio: float  # MLP hidden width / token width
    drop_path: float  # stochastic depth in pretraining (the deepest block's rate)
    def check(self, key: str) -> None:
        _positive(self, key, "embed_dim", "depth", "num_heads", "mlp_ratio")
        _bounded_transformer(key, self.embed_dim, self.depth, self.mlp_ratio)
        if self.embed_dim % self.num_heads:
            _bad(key + ".embed_dim", self.embed_dim, f"must be divisible by num_heads ({self.num_heads})")
        if self.embed_dim % 4:
            _bad(key + ".embed_dim", self.embed_dim, "must be divisible by 4 (2-D sin-cos position embedding)")
        if not 0.0 <= self.drop_path < 1.0:
            _bad(key + ".drop_path", self.drop_path, "must be in [0, 1)")


def _bounded_transformer(key: str, width: int, depth: int, mlp_ratio: float) -> None:
    if depth > MAX_DEPTH:
        _bad(key + ".depth", depth, f"more than {MAX_DEPTH} blocks (ViT-g has 40): a typo?")
    weights = depth * width * width * (4 + 2 * mlp_ratio)  # attention 4 d^2, MLP 2 r d^2 per block
    if weights > MAX_TRANSFORMER_WEIGHTS:
        _bad(key, {"embed_dim": width, "depth": depth, "mlp_ratio": mlp_ratio},
             f"{weights / 1e9:.3g} B weights, more than {MAX_TRANSFORMER_WEIGHTS / 1e9:g} B (ViT-g has 1.0 B): a typo?")


@dataclass(frozen=True)
class PredictorConfig:
    """The narrow ViT that predicts target features from context tokens (discarded after pretraining)."""

    embed_dim: int  # paper: 512
    depth: int  # paper: 16
    num_heads: int  # attention heads
    init: PredictorInit  # I-JEPA's trunc_normal(0.02), or MAE's decoder init

    def check(self, key: str) -> None:
        _positive(self, key, "embed_dim", "depth", "num_heads")
        _bounded_transformer(key, self.embed_dim, self.depth, 4.0)
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            _bad(key + ".embed_dim", self.embed_dim, f"must be divisible by num_heads ({self.num_heads}) and by 4")


@dataclass(frozen=True)
class MaskingConfig:
    """Context and target masks (ajepa.masks): block (I-JEPA), time-frequency (paper) and the curriculum between them."""

    mode: MaskMode  # curriculum (paper) | block (I-JEPA) | tf (time-frequency) | inverse
    curriculum_c0: float  # curriculum: probability of a TF step at step 0
    num_targets: int  # block mode (I-JEPA): 4
    target_scale: list[float]  # block targets: fraction of the patches per target [low, high]
    target_aspect: list[float]  # block targets: time / frequency extent [low, high]
    context_scale: list[float]  # the context block's fraction of the patches [low, high], before targets are removed
    tf_num_targets: int  # time-frequency mode (paper): 3
    tf_scale: list[float]  # time-frequency targets: fraction of the patches per target [low, high]
    min_keep: int  # fewest context patches a sample may have
    def check(self, key: str) -> None:
        _positive(self, key, "num_targets", "tf_num_targets", "min_keep")
        if not 0.0 < self.curriculum_c0 <= 1.0:
            _bad(key + ".curriculum_c0", self.curriculum_c0, "must be in (0, 1]")
        for name in ("target_scale", "target_aspect", "context_scale", "tf_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                _bad(f"{key}.{name}", lo_hi, "must be [low, high] with 0 < low <= high")
        for name in ("target_scale", "context_scale", "tf_scale"):
            if getattr(self, name)[1] > 1.0:
                _bad(f"{key}.{name}", getattr(self, name), "a scale is a fraction of the patches: at most 1")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, warmup then cosine, weight-decay and EMA schedules stepped once per iteration (I-JEPA)."""

    epochs: int  # passes over the pretraining pool
    batch_size: int  # global batch, split evenly over torchrun processes
    lr: float  # peak learning rate after warmup, read as lr_scaling says
    lr_scaling: LrScaling  # absolute: lr is the peak (I-JEPA); per_256: a base lr, peak lr x batch / 256 (AudioMAE)
    final_lr: float  # learning rate at the end of the cosine (absolute either way)
    warmup_epochs: float  # linear warmup, in epochs
    warmup_start: float  # the warmup's first lr, as a fraction of the peak (0: from 0; I-JEPA: 0.2)
    weight_decay: list[float]  # [start, end], cosine (I-JEPA)
    betas: list[float]  # AdamW betas
    grad_clip: float  # 0 disables
    ema_momentum: list[float]  # [start, end], linear per iteration (I-JEPA)

    def check(self, key: str) -> None:
        _positive(self, key, "epochs", "batch_size", "lr")
        if self.final_lr < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            _bad(key, {"final_lr": self.final_lr, "warmup_epochs": self.warmup_epochs, "grad_clip": self.grad_clip},
                 "final_lr, warmup_epochs and grad_clip must be >= 0")
        if not 0.0 <= self.warmup_start <= 1.0:
            _bad(key + ".warmup_start", self.warmup_start, "a fraction of the peak lr: must be in [0, 1]")
        if len(self.weight_decay) != 2 or min(self.weight_decay) < 0:
            _bad(key + ".weight_decay", self.weight_decay, "must be [start, end], both >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _bad(key + ".betas", self.betas, "must be two numbers in [0, 1)")
        if len(self.ema_momentum) != 2 or not all(0 <= m <= 1 for m in self.ema_momentum):
            _bad(key + ".ema_momentum", self.ema_momentum, "must be [start, end] in [0, 1]")


@dataclass(frozen=True)
class PretrainAugmentConfig:
    """AudioMAE's pretraining augmentation (roll_mag_aug), on the cached log-mel (ajepa.data.augment)."""

    roll: bool  # each clip shifted circularly along time by a uniform number of frames
    magnitude: bool  # each clip's waveform scaled by Beta(10, 10) + 0.5 (a level shift of the log-mel)


@dataclass(frozen=True)
class CurveProbeConfig:
    """The learning curve: a linear probe of the model being pretrained, every `every` steps and at the end,
    on the train/val clips (never the test clips) of each pretraining dataset that has labels."""

    every: int  # steps between probes, a multiple of log_every; 0 = no learning curve
    encoders: list[Encoder]  # which encoders the curve probes: target, context or both
    l2: list[float]  # logistic-regression strengths, the best on the validation clips kept (as `linear`)

    def check(self, key: str) -> None:
        if self.every < 0:
            _bad(key + ".every", self.every, "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class PretrainConfig:
    """A-JEPA self-supervised pretraining."""

    datasets: list[str]  # feature stores under data/features/ whose clips are pooled for pretraining
    splits: list[Split]  # manifest splits used for pretraining
    seed: int  # initial weights, batch order and masks
    encoder: EncoderConfig
    predictor: PredictorConfig
    masking: MaskingConfig
    optim: OptimConfig
    augment: PretrainAugmentConfig
    loss: Loss  # paper: mean L2; smooth-L1 as in the I-JEPA code
    target_layers: int  # targets: the mean of the last K blocks' normalised outputs (paper and I-JEPA: 1)
    sigreg: float  # weight of LeJEPA's SIGReg term on the context tokens (paper: 0, off)
    probe: CurveProbeConfig
    checkpoint_every: int  # steps between resumable checkpoints
    log_every: int  # steps between logged points
    num_workers: int  # data-loader worker processes
    micro_batch: Literal["auto"] | int | None  # clips per forward/backward per process; null = its share of the batch; auto = the most that fit
    activation_checkpointing: bool  # recompute block activations in the backward pass: less memory, ~1/3 more compute
    compile: bool  # torch.compile the transformer blocks (docs/compute.md)

    def check(self, key: str) -> None:
        _positive(self, key, "checkpoint_every", "log_every")
        _check_micro_batch(self.micro_batch, key)
        if self.num_workers < 0:
            _bad(key + ".num_workers", self.num_workers, "must be >= 0")
        if not self.splits:
            _bad(key + ".splits", self.splits, "must name at least one split")
        if not 1 <= self.target_layers <= self.encoder.depth:
            _bad(key + ".target_layers", self.target_layers, f"must be in [1, encoder.depth = {self.encoder.depth}]")
        if not 0.0 <= self.sigreg < 1.0:
            _bad(key + ".sigreg", self.sigreg, "must be in [0, 1): the loss is (1 - w) prediction + w SIGReg")
        if self.probe.every % self.log_every:
            _bad(key + ".probe.every", self.probe.every, f"must be a multiple of log_every ({self.log_every})")
        if not self.datasets or len(set(self.datasets)) != len(self.datasets):
            _bad(key + ".datasets", self.datasets, "must name at least one dataset, each once")


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tuning of the pretrained encoder (AudioMAE recipe + A-JEPA's regularized masking)."""

    epochs: int  # passes over the training clips (or samples_per_epoch draws)
    batch_size: int  # clips per step
    lr: float  # peak lr, absolute: AudioMAE's blr x batch / 256 already applied (docs/recipes.md)
    final_lr: float  # learning rate at the end of the cosine
    warmup_epochs: float  # linear warmup, in epochs
    weight_decay: float  # not on norms, biases, positional tables
    layer_decay: float  # layer-wise lr decay (AudioMAE 0.75): layer l of L gets lr * decay^(L + 1 - l)
    pooling: Pooling  # head input: mean of every patch (AudioMAE) or over time, frequency kept
    head_init: HeadInit  # zero: AudioMAE's (std 2e-5); probe: the linear probe's solution (LP-FT)
    head_norm: HeadNorm  # encoder: its final norm on every token, pool, LayerNorm; fc_norm: AudioMAE's (no final norm, LayerNorm after the pool)
    drop_path: float  # stochastic depth (the deepest block's rate)
    key_mask_ratio: float  # regularized masking (paper 0.1); 0 disables
    specaug_time: int  # max frames of the one time mask per clip (AudioMAE timem); 0 disables
    specaug_freq: int  # max mel bins of the one frequency mask per clip (freqm); 0 disables
    mixup: float  # probability that a clip is mixed with a random training clip (AST/AudioMAE); 0 disables
    mixup_alpha: float  # the mixing weight's Beta(a, a) (AST/AudioMAE: 10)
    roll: bool  # random circular shift along time
    magnitude: bool  # waveform scaled by Beta(10, 10) + 0.5 (with roll: AudioMAE's roll_mag_aug)
    noise: bool  # AST's speech noise: uniform noise up to 0.1 and a shift of up to 10 frames
    loss: ClassifierLoss  # ce (single-label) | bce (multi-label, or mixup on single-label as AudioMAE)
    label_smoothing: float  # ce targets (1 - s) one-hot + s / classes (AudioMAE's ESC-50 script: 0.1); 0 disables
    balanced_sampling: bool  # draw clips by class-balanced weights (AudioMAE AS-2M; SUPERB keyword spotting)
    balanced_replacement: bool  # draw with replacement (SUPERB) or no clip twice per epoch (AudioMAE AS-2M)
    samples_per_epoch: int  # clips drawn per epoch; 0 = one pass over the training clips
    selection: Selection  # val: the best epoch on the validation clips; val_start: the start (epoch 0) too; last: they train too, last epoch
    random_init_baseline: bool  # also fine-tune the same architecture from random init
    runs: int  # the first `runs` runs of the protocol (folds); 0 = all of them
    seed: int  # head init, batch order, augmentation and the random-init baseline's weights
    micro_batch: Literal["auto"] | int | None  # clips per forward/backward; null = batch_size; auto = the most that fit (CUDA)
    activation_checkpointing: bool  # recompute block activations in the backward pass: less memory, ~1/3 more compute
    num_workers: int  # data-loader processes that build the batches ahead; 0 = in the training process
    prefetch: int  # batches each worker builds ahead (torch's prefetch_factor); unused at num_workers 0
    def check(self, key: str) -> None:
        _positive(self, key, "epochs", "batch_size", "lr", "prefetch")
        _check_micro_batch(self.micro_batch, key)
        for name in ("final_lr", "warmup_epochs", "weight_decay", "specaug_time", "specaug_freq", "mixup",
                     "samples_per_epoch", "runs", "num_workers"):
            if getattr(self, name) < 0:
                _bad(f"{key}.{name}", getattr(self, name), "must be >= 0")
        if not 0.0 < self.layer_decay <= 1.0:
            _bad(key + ".layer_decay", self.layer_decay, "must be in (0, 1] (1 = no decay)")
        for name in ("drop_path", "key_mask_ratio", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _bad(f"{key}.{name}", getattr(self, name), "must be in [0, 1)")
        if self.mixup > 1.0:
            _bad(key + ".mixup", self.mixup, "a probability: must be in [0, 1] (the Beta parameter is mixup_alpha)")
        if self.mixup_alpha <= 0:
            _bad(key + ".mixup_alpha", self.mixup_alpha, "must be positive")


@dataclass(frozen=True)
class AttentiveConfig:
    """V-JEPA's attentive probe on the frozen tokens: AdamW, early stopping on the validation clips."""

    epochs: int  # at most; 0 = no attentive probe
    patience: int  # epochs without a better validation score before stopping
    batch_size: int  # clips per step
    lr: float  # AdamW learning rate
    weight_decay: float  # AdamW weight decay
    num_heads: int  # heads of the cross-attention
    def check(self, key: str) -> None:
        _positive(self, key, "patience", "batch_size", "lr", "num_heads")
        if self.epochs < 0 or self.weight_decay < 0:
            _bad(key, {"epochs": self.epochs, "weight_decay": self.weight_decay}, "must be >= 0")


@dataclass(frozen=True)
class LinearConfig:
    """Frozen-encoder probes: logistic regression on pooled embeddings, and the attentive probe."""

    embed_batch_size: int  # clips per forward pass when embedding
    pooling: Pooling  # time: mean over time, frequency kept (MSM-MAE, EVAR); all: mean of every patch
    l2: list[float]  # L2 strengths tried; the best on the validation clips is kept
    max_iter: int  # L-BFGS iterations per strength
    block_mb: float  # MiB of embeddings read and fitted at a time; a set that fits in one block is held in memory
    seed: int  # of the random-init baseline encoder and the attentive probe
    attentive: AttentiveConfig

    def check(self, key: str) -> None:
        _positive(self, key, "embed_batch_size", "max_iter", "block_mb")
        if not self.l2 or min(self.l2) <= 0:
            _bad(key + ".l2", self.l2, "must be a non-empty list of positive strengths")


@dataclass(frozen=True)
class DownstreamConfig:
    """What the linear probe, fine-tuning and the report take from pretraining."""

    encoder: Encoder  # the EMA target encoder (I-JEPA evaluates it) or the context encoder


@dataclass(frozen=True)
class PipelineConfig:
    """Which datasets and benchmarks the pipeline runs."""

    datasets: list[str]  # datasets that prepare@ and features@ run for
    benchmarks: list[str]  # labeled datasets that finetune@ and linear@ run for, in report order


@dataclass(frozen=True)
class DistributedConfig:
    """Where the stages compute, and how many processes `ajepa pretrain` starts on its node by itself (not
    under torchrun or srun, which set WORLD_SIZE and start the processes themselves). How the run is spread,
    not what it computes: no stage depends on these keys, and the global batch is split over the processes
    (docs/cluster.md)."""

    device: Literal["auto", "cuda", "cpu"]  # cuda: stop in one line without a usable GPU; auto: the GPU when CUDA works, else the CPU
    processes: Literal["auto"] | int  # auto: one per visible CUDA device (1 without CUDA); N: N processes
    backend: Literal["auto", "nccl", "gloo"]  # auto: nccl on CUDA devices, gloo on the CPU
    stage_to: str | None  # pretrain reads its stores from a verified copy here ($VARS expanded); null: in place

    def check(self, key: str) -> None:
        if self.processes != "auto" and self.processes < 1:
            _bad(key + ".processes", self.processes, "must be 'auto' or a positive integer")
        if self.stage_to is not None and not self.stage_to.strip():
            _bad(key + ".stage_to", self.stage_to, "must be a folder, or null to read the stores in place")


@dataclass(frozen=True)
class Params:
    pipeline: PipelineConfig
    datasets: dict[str, Dataset]  # by name: the names of ajepa.datasets.registry
    features: FeaturesConfig
    pretrain: PretrainConfig
    downstream: DownstreamConfig
    linear: LinearConfig
    finetune: dict[str, FinetuneConfig]  # one recipe per benchmark (a benchmark is the dataset of that name)
    distributed: DistributedConfig

    def check(self, key: str) -> None:
        for name in self.datasets:
            if name not in REGISTRY:
                _bad("datasets", name, f"unknown dataset (known: {', '.join(REGISTRY)})")
        for name in self.finetune:
            if name not in self.datasets:
                _bad("finetune", name, "no dataset of that name under `datasets` (a benchmark is a dataset)")
        for where, names, known in (("pipeline.benchmarks", self.pipeline.benchmarks, self.finetune),
                                    ("pipeline.datasets", self.pipeline.datasets, self.datasets),
                                    ("pretrain.datasets", self.pretrain.datasets, self.datasets)):
            for name in names:
                if name not in known:
                    _bad(where, name, f"unknown {where.split('.')[1][:-1]} (known: {', '.join(known)})")
        for name, ds in self.datasets.items():
            if ds.target_length <= 0 or ds.target_length % self.features.patch_size:
                _bad(f"datasets.{name}.target_length", ds.target_length,
                     f"must be a positive multiple of features.patch_size ({self.features.patch_size})")
            if ds.target_length > MAX_TARGET_LENGTH:
                _bad(f"datasets.{name}.target_length", ds.target_length,
                     f"must be at most {MAX_TARGET_LENGTH} frames (a typo? AudioSet's 10 s clips take 1024)")
            for file_name in getattr(ds.prepare, "checksums", {}):
                if file_name not in REGISTRY[name].file_names:
                    _bad(f"datasets.{name}.prepare.checksums.{file_name}", ds.prepare.checksums[file_name],
                         f"not a file of {name} (its files: {', '.join(REGISTRY[name].file_names)})")

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise ConfigError(f"unknown dataset {name!r} (known: {', '.join(self.datasets)})")
        return self.datasets[name]

    def recipe(self, benchmark: str) -> FinetuneConfig:
        """The fine-tuning recipe of a benchmark (whose clips are the dataset of the same name)."""
        if benchmark not in self.finetune:
            raise ConfigError(f"unknown benchmark {benchmark!r} (known: {', '.join(self.finetune)})")
        return self.finetune[benchmark]


# ---------------------------------------------------------------------------------------------
# loading


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with three changes for parameter files. YAML 1.2 floats: PyYAML reads YAML
    1.1, where `1e-06` (no dot) is a string, and DVC writes floats that way (`dvc exp run -S
    pretrain.optim.final_lr=1e-6`). No aliases (`*name`): nine nested aliases of nine items make a
    600-byte file stand for 9^9 values, which any walk or message over them expands (a YAML "billion
    laughs"); the project's files use none. No duplicate keys: PyYAML keeps the last silently, DVC
    refuses the file, so a stage and DVC would disagree on the value."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed (write the "
                                              "value out: parameter files take no anchors and aliases)",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str, source: str = PARAMS_FILE) -> Any:
    """Parse the text of params.yaml or a preset (see _ParamsLoader: YAML 1.2 floats, no aliases, no
    duplicate keys); bad YAML is one ConfigError naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_ParamsLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root or pass --params)") from None
    return parse_params(read_yaml(text, str(path)), source=str(path))


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    try:
        return _build(Params, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _bad(key: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{key} = {value!r}: {why}")


def _positive(section: Any, key: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            _bad(f"{key}.{name}", value, "must be positive")


def _build(tp: Any, value: Any, key: str) -> Any:
    if tp is Dataset and isinstance(value, dict) and isinstance(value.get("prepare"), dict):
        # the prepare section's type follows the dataset's name (the last part of the key)
        prepare_type = PREPARE_TYPES.get(key.rsplit(".", 1)[-1], FetchConfig)
        value = {**value, "prepare": _build(prepare_type, value["prepare"], _join(key, "prepare"))}
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in typing.get_args(tp):
            _bad(key, value, f"must be one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            _bad(key, value, "must be a list")
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _bad(key, value, "must be a mapping")
        _, item = typing.get_args(tp)
        return {str(k): _build(item, v, _join(key, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _bad(key, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _bad(key, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _bad(key, value, "must be a number")
        if not math.isfinite(value):  # YAML's .nan and .inf pass as floats and slip past every `< 0` check
            _bad(key, value, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _bad(key, value, "must be a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _build_dataclass(tp: Any, value: Any, key: str) -> Any:
    """A section: every field present, no unknown key, each built by its type, then the section's check."""
    if not isinstance(value, dict):
        _bad(key or "<top level>", value, f"must be a mapping with keys {[f.name for f in dataclasses.fields(tp)]}")
    hints = typing.get_type_hints(tp)
    names = [f.name for f in dataclasses.fields(tp)]
    for k in value:
        if k not in names:
            _bad(_join(key, k), value[k], f"unknown key (expected one of: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in value:
            raise ConfigError(f"{_join(key, name)} is missing")
        kwargs[name] = _build(hints[name], value[name], _join(key, name))
    obj = tp(**kwargs)
    if hasattr(obj, "check"):
        obj.check(key)
    return obj


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name
