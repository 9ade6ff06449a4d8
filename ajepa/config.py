"""Typed view of params.yaml: the single source of parameters for every stage.

Every key must be present (the dataclasses hold types and checks, not defaults, so the value a
stage runs with is always the value DVC and Snakemake see in params.yaml). An unknown key, a wrong
type or an impossible value raises ConfigError with one line naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ajepa.errors import ConfigError

PARAMS_FILE = "params.yaml"


# ---------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class SynthConfig:
    """Generator of the embedded default dataset (see ajepa.data.synth)."""

    seed: int
    pool_clips: int  # unlabeled pretraining pool
    clips_per_class: int  # labeled benchmark, spread evenly over the folds
    num_folds: int
    duration_s: float
    sample_rate: int
    snr_db: list[float]  # background-noise SNR range [low, high]

    def check(self, key: str) -> None:
        _positive(self, key, "pool_clips", "clips_per_class", "num_folds", "duration_s", "sample_rate")
        if self.clips_per_class < self.num_folds:
            _bad(key + ".clips_per_class", self.clips_per_class, f"must be at least num_folds ({self.num_folds})")
        if len(self.snr_db) != 2 or self.snr_db[0] > self.snr_db[1]:
            _bad(key + ".snr_db", self.snr_db, "must be [low, high] with low <= high")


@dataclass(frozen=True)
class SynthDataset:
    prepare: SynthConfig
    target_length: int  # frames after pad/crop


@dataclass(frozen=True)
class DatasetsConfig:
    synth: SynthDataset


@dataclass(frozen=True)
class FeaturesConfig:
    """The AudioMAE/AST front end and the feature store."""

    sample_rate: int
    num_mel_bins: int
    frame_shift_ms: float
    frame_length_ms: float
    patch_size: int  # square patches on the (time, frequency) grid
    shard_clips: int  # clips per memory-mapped shard
    num_workers: int  # worker processes; 0 = one per core
    max_reject_fraction: float

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


@dataclass(frozen=True)
class PipelineConfig:
    datasets: list[str]  # datasets that prepare@ and features@ run for


@dataclass(frozen=True)
class Params:
    pipeline: PipelineConfig
    datasets: DatasetsConfig
    features: FeaturesConfig

    def check(self, key: str) -> None:
        known = [f.name for f in dataclasses.fields(DatasetsConfig)]
        for name in self.pipeline.datasets:
            if name not in known:
                _bad("pipeline.datasets", name, f"unknown dataset (known: {', '.join(known)})")
        for name in known:
            length = getattr(self.datasets, name).target_length
            if length <= 0 or length % self.features.patch_size:
                _bad(f"datasets.{name}.target_length", length,
                     f"must be a positive multiple of features.patch_size ({self.features.patch_size})")

    def dataset(self, name: str):
        if name not in {f.name for f in dataclasses.fields(DatasetsConfig)}:
            raise ConfigError(f"unknown dataset {name!r} (known: {', '.join(f.name for f in dataclasses.fields(DatasetsConfig))})")
        return getattr(self.datasets, name)


# ---------------------------------------------------------------------------------------------
# loading


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root or pass --params)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return parse_params(raw, source=str(path))


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
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _bad(key, value, "must be a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name
