"""The training config: dataclasses for each section, read from YAML with `key=value` overrides and checked.

`load_config("configs/quick.yaml", ["trainer.max_epochs=2"])` -> Config. Sections of other modules (ModelConfig,
DataConfig, Preprocessing) are composed here; every range is checked when the config is read, before any scan is
cached, so a typo fails in a line and not after minutes of work.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detector.augment import check_augment_config
from detector.data import DataConfig
from detector.model import ModelConfig, build_model, check_model_config
from detector.policy import UniqueKeyLoader
from detector.preprocess import Preprocessing
from detector.scan import DEFAULT_PITCH_MM, PITCH_RANGE_MM, ScanError, default_pitch
from detector.shipped import resolve_config

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true", "64-true", "64")


@dataclass
class LossConfig:
    focal_gamma: float = 2.0
    focal_alpha: float = 0.75     # weight of positive cells (anomalies are rare)
    dice_weight: float = 0.5
    mil_weight: float = 0.5       # image-level BCE on the top-k score (the only loss for label-only scans)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.02


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    accelerator: str = "auto"
    devices: Any = "auto"         # e.g. 4 -> DDP over 4 GPUs (strategy auto)
    strategy: str = "auto"
    precision: str | int = "auto"  # auto: bf16-mixed on a GPU or CPU with native bf16, else 32-true; or Lightning's
    patience: int = 8             # early stopping on validation AUROC (validation runs, not epochs; 0 = off)
    val_every: int = 1            # validate (and checkpoint) every N epochs and after the last: it costs time
    log_every_n_steps: int = 10
    threads: int = 0              # torch intra-op threads on CPU (0 = torch default; per process with cpu_processes)
    cpu_processes: int = 1        # on a CPU: DDP over this many processes, each with its share of the cores and
                                  # of data.batch_size (same optimiser steps); ignored on a GPU
    ema_decay: float = 0.0        # > 0 (e.g. 0.999): validate, checkpoint and export an EMA of the weights (0 = off;
                                  # no gain measured with a 28-epoch cosine schedule: docs/experiments.md)
    test: bool = True             # evaluate the best checkpoint on the test split after fitting
    select_se: float = 2.0        # best.ckpt: the latest validated epoch whose detection at 1 % is within this many
                                  # standard errors of the best so far (within_noise; 0 = strictly the best). 1 still
                                  # passed over a last epoch that tested AUROC 0.921 vs 0.874 (docs/experiments.md)
    max_minutes: float = 0.0      # > 0: fit training (data caching included, test excluded) into this wall time:
                                  # fewer epochs on a slower machine, the cosine schedule shortened to match


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ---------------------------------------------------------------- config: YAML + dotted overrides
_SHARE = (lambda v: 0 <= v <= 1, "a share in [0, 1]")
_COUNT = (lambda v: v >= 1, "a whole number >= 1")
# the range of each numeric setting that has one: checked when the config is read, where torch's own checks (a batch
# of 0, a negative learning rate) fail after the scans are cached, and a share above 1 runs without a word
LIMITS: dict[str, tuple[Any, str]] = {
    **{f"data.{k}": _SHARE for k in ("anomaly_crop_fraction", "air_crop_fraction", "hard_negative_fraction",
                                      "mine_share", "synth_share", "synth_anomaly_fraction", "synth_twin_fraction",
                                      "hard_types", "val_fraction", "test_fraction")},
    **{f"data.augment.{k}": _SHARE for k in ("hflip", "scale_p", "noise_p", "thickness_p", "stripes_p", "blur_p",
                                              "tip_rate", "tip_conceal", "tip_from_labels", "tip_tyres")},
    **{f"data.{k}": _COUNT for k in ("batch_size", "val_batch_size", "crops_per_epoch", "synth_pool")},
    # scale 1 draws a zero (or negative) magnification, thickness 1 a zero or negative path length: they ran silently
    **{f"data.augment.{k}": (lambda v: 0 <= v < 1, "a relative jitter in [0, 1)") for k in ("scale", "thickness")},
    "data.augment.stripes_sigma": (lambda v: v >= 0, "a number >= 0"),
    "data.synth_per_epoch": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "data.min_visibility": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "trainer.threads": (lambda v: v >= 0, "a number >= 0 (0 = torch's default)"),
    "trainer.max_epochs": _COUNT,
    "trainer.cpu_processes": _COUNT,
    "trainer.log_every_n_steps": _COUNT,
    # more than max_epochs is fine: the final epoch is always validated (callbacks.ValidateLastEpoch), as when a time
    # budget cuts the epochs below it; 0 never validated (no best checkpoint, no thresholds)
    "trainer.val_every": _COUNT,
    "optim.lr": (lambda v: v > 0, "a number > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.warmup_fraction": _SHARE,
    "optim.min_lr_ratio": _SHARE,
}

class ConfigError(ValueError):
    """A config file, override or setting that cannot be used; the message says which and why."""


def _fits(v: Any, t: Any) -> bool:
    """Whether a YAML value fits a config field's type hint: `flase` is no bool, `2O` no int."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return any(_fits(v, a) for a in typing.get_args(t))
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    if t in (tuple, list) or typing.get_origin(t) in (tuple, list):
        return isinstance(v, (list, tuple))
    return True   # Any and the rest: the setting's own checks


def from_dict(cls: type, d: dict, where: str = "") -> Any:
    """A config dataclass from a plain dict (YAML's), checked key by key: unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:   # a typo: name the nearest real key, so `trainer.max_epoch=5` is one glance from fixed
        named = [f"{where}{k} (did you mean {where}{near[0]}?)" if (near := difflib.get_close_matches(k, names, 1))
                 else where + k for k in sorted(unknown)]
        raise ConfigError(f"unknown config key(s) {', '.join(named)}")
    kw = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}{k} is a section of settings, got {v!r}")
            v = from_dict(t, v, f"{where}{k}.")
        elif not _fits(v, t):
            if _fits(0.0, t) and isinstance(v, str):   # YAML reads 1e-3 (no dot) as a string
                try:
                    v = float(v)
                except ValueError:
                    pass
            if not _fits(v, t):
                raise ConfigError(f"{where}{k} must be {getattr(t, '__name__', str(t)).replace('typing.', '')}, "
                                  f"got {v!r}")
        elif isinstance(v, list) and "tuple" in str(t):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def to_dict(cfg: Any) -> dict:
    """Config tree -> plain dict (tuples as lists, YAML/JSON-safe)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _read_yaml(path: str | Path) -> dict:
    try:
        d = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (UTF-8): a config is YAML, like configs/quick.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if d is None:   # a failed copy would train with the code's built-in settings, neither quick.yaml nor default.yaml
        raise ConfigError(f"{path}: empty: a config sets its sections (model:, data:, trainer:, ...); start from "
                          "configs/quick.yaml or configs/default.yaml")
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping (model:, data:, ...), got a {type(d).__name__}")
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from YAML (or defaults) with `a.b=c` overrides (values parsed as YAML)."""
    d = _read_yaml(resolve_config(path)) if path else {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value")
        key, val = ov.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p} is a setting, not a section")
        node[parts[-1]] = yaml.safe_load(val)
    cfg = from_dict(Config, d)
    t = cfg.trainer
    if str(t.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be auto or one of Lightning's ({', '.join(PRECISIONS[1:])}), "
                          f"got {t.precision!r}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"trainer.ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0 <= t.max_minutes < math.inf:
        raise ConfigError(f"trainer.max_minutes must be >= 0 (0 = no time budget), got {t.max_minutes}")
    for key, (ok, what) in LIMITS.items():
        v = functools.reduce(getattr, key.split("."), cfg)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ConfigError(f"{key} must be {what}, got {v!r}")
    _check_data_pitch(cfg.data.pitch_mm)
    m = cfg.preprocessing.pad_multiple   # the network takes sides that are multiples of it, as the station pads
    if m < 1:
        raise ConfigError(f"preprocessing.pad_multiple must be >= 1, got {m}")
    try:   # a network that cannot be built fails here, not after the scans are cached
        check_model_config(cfg.model, m)
        check_augment_config(cfg.data.augment)
        if cfg.model.weights:   # the file named, read and matched to the backbone now
            build_model(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.crop <= 0 or cfg.data.crop % m:
        raise ConfigError(f"data.crop must be a positive multiple of preprocessing.pad_multiple ({m}), "
                          f"got {cfg.data.crop}")
    return cfg


def _check_data_pitch(pitch_mm: Any) -> None:
    """ConfigError unless data.pitch_mm is null or a pitch a file may carry (scan.PITCH_RANGE_MM): the scans without
    a pitch of their own are read at it, and the station at the exported bundle's copy of it."""
    try:
        default_pitch(pitch_mm)
    except ScanError:
        lo, hi = PITCH_RANGE_MM
        raise ConfigError(f"data.pitch_mm must be the pixel pitch in mm of the scans whose files carry none, "
                          f"{lo:g}-{hi:g} (or null: {DEFAULT_PITCH_MM:g} mm), got {pitch_mm!r}") from None


def flatten(d: dict, prefix: str = "") -> list[str]:
    """A config dict as the `key=value` overrides that rebuild it."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out
