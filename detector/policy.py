"""Routing policy: risk tiers with their own false-alarm rates, risk flags that force inspection.

A tier's threshold is derived from the model's own calibration (the normal validation scores in
the bundle metadata), so one policy file works for every model and any rate, not only the three
pre-computed ones. Decisions fail closed: an error, a missing score or an unknown tier never
loosens routing. Every Decision says why in words an officer can read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from detector.calibration import score_digits, threshold_for_rate, threshold_texts
from detector.shipped import resolve_config

ANY = "any"


class PolicyError(ValueError):
    """A policy file (or its binding to a model) is unusable; names the file and the reason."""

    def __init__(self, path: Any, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Decision:
    """One routing answer: RELEASE or INSPECT, the threshold and tier applied, and why."""

    decision: str
    threshold: float | None
    tier: str
    reason: str

    def to_dict(self) -> dict:
        return {"decision": self.decision, "threshold": self.threshold, "tier": self.tier, "reason": self.reason}


@dataclass
class Policy:
    """Tiers (name -> target false-alarm rate, None = the model's default), the default tier for
    requests without one, and the risk flags that force INSPECT ("any" = every flag)."""

    tiers: dict[str, float | None] = field(default_factory=lambda: {"default": None})
    default_tier: str | None = None
    force_flags: str | list[str] = ANY
    source: str = "<built-in>"
    thresholds: dict[str, float] = field(default_factory=dict)   # filled by bind()

    def __post_init__(self) -> None:
        if not self.tiers:
            raise PolicyError(self.source, "no tiers defined")
        for name, rate in self.tiers.items():
            if not isinstance(name, str) or not name:
                raise PolicyError(self.source, f"tier names must be non-empty strings, got {name!r}")
            if rate is not None and not (isinstance(rate, (int, float)) and 0.0 <= float(rate) <= 1.0):
                raise PolicyError(self.source, f"tier {name!r}: false_alarm_rate must be in [0, 1], got {rate!r}")
        if self.default_tier is None:
            self.default_tier = next(iter(self.tiers))
        if self.default_tier not in self.tiers:
            raise PolicyError(self.source, f"default_tier {self.default_tier!r} is not one of {list(self.tiers)}")
        if isinstance(self.force_flags, str):
            if self.force_flags.lower() != ANY:
                raise PolicyError(self.source, f"risk_flags.force must be 'any' or a list, got {self.force_flags!r}")
            self.force_flags = ANY
        else:
            try:
                self.force_flags = [_flag(f) for f in self.force_flags]
            except ValueError as e:
                raise PolicyError(self.source, f"risk_flags.force: {e}") from None

    # ------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Policy":
        """Build from the YAML structure (see configs/policy.yaml)."""
        if not isinstance(d, dict) or not isinstance(d.get("tiers"), dict):
            raise PolicyError(source, "expected a mapping with a 'tiers' mapping (name: false_alarm_rate)")
        # a misspelt key would silently leave the model's default threshold in force: refuse it
        _known(d, ("tiers", "default_tier", "risk_flags"), "the policy", source)
        tiers: dict[str, float | None] = {}
        for name, v in d["tiers"].items():
            if isinstance(v, dict):
                _known(v, ("false_alarm_rate",), f"tier {name!r}", source)
            rate = v.get("false_alarm_rate") if isinstance(v, dict) else v
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))):
                raise PolicyError(source, f"tier {name!r}: false_alarm_rate must be a number, got {rate!r}")
            tiers[str(name)] = None if rate is None else float(rate)
        flags = d.get("risk_flags", {}) or {}
        if isinstance(flags, dict):
            _known(flags, ("force",), "risk_flags", source)
        force = flags.get("force", ANY) if isinstance(flags, dict) else flags
        if force is None:
            force = []
        if not isinstance(force, (str, list)):
            raise PolicyError(source, f"risk_flags.force must be 'any' or a list, got {force!r}")
        return cls(tiers=tiers, default_tier=d.get("default_tier"), force_flags=force, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Policy":
        """Read a policy file; raises PolicyError naming the file on any problem."""
        try:
            d = yaml.load(Path(resolve_config(path)).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
        except OSError as e:
            raise PolicyError(path, f"cannot read policy file ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise PolicyError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(d, source=str(path))

    # ------------------------------------------------------------ binding to a model

    def bind(self, model: Any) -> dict[str, float]:
        """Derive each tier's threshold from a model's calibration (an Inspector or its metadata
        dict); returns and keeps {tier: threshold}. A tier without a rate uses the model's default; a rate the
        bundle's threshold table lists, its threshold; another rate, the normal scores; a rate of 1 gets
        threshold 0 (scores lie in [0, 1]: every scan is inspected)."""
        meta = model if isinstance(model, dict) else getattr(model, "metadata", None)
        if not isinstance(meta, dict):
            raise PolicyError(self.source, f"bind() needs an Inspector or a metadata dict, got {type(model).__name__}")
        scores = meta.get("normal_scores") or []
        out: dict[str, float] = {}
        for name, rate in self.tiers.items():
            if rate is None:
                out[name] = _default_threshold(model, meta, self.source)
            elif rate >= 1.0:   # inspect every truck, also where the bundle has no normal scores
                out[name] = 0.0
            elif (row := _table_row(meta, rate)) is not None:   # the bundle's own, as the Inspector's default tier
                out[name] = row
            elif scores:
                out[name] = float(threshold_for_rate(scores, rate))
            else:
                raise PolicyError(self.source, f"tier {name!r}: model has no normal_scores and no threshold for rate "
                                               f"{rate:g}")
        self.thresholds = out
        return dict(out)

    def rate(self, tier: str) -> float | None:
        return self.tiers.get(tier)

    @property
    def strictest(self) -> str:
        """The tier with the lowest threshold (the most inspections); needs bind()."""
        self._need_bound()
        return min(self.thresholds, key=lambda t: (self.thresholds[t], t))

    def _need_bound(self) -> None:
        if not self.thresholds:
            raise PolicyError(self.source, "policy is not bound to a model: call policy.bind(inspector) first")

    # ------------------------------------------------------------ deciding

    def resolve_tier(self, tier: str | None) -> tuple[str, str]:
        """(tier applied, note): no tier -> the default tier; one named in another case (a targeting system's
        STANDARD, as risk flags are matched) -> that tier; an unknown one -> the strictest."""
        self._need_bound()
        if tier is None or (isinstance(tier, str) and not tier.strip()):
            return str(self.default_tier), ""
        tier = str(tier).strip()
        if tier in self.thresholds:
            return tier, ""
        same = [t for t in self.thresholds if t.casefold() == tier.casefold()]
        if len(same) == 1:
            return same[0], ""
        strict = self.strictest
        return strict, f"unknown tier {_short(tier)!r} -> strictest tier {strict!r}; "

    def threshold_for(self, tier: str | None) -> float:
        """The threshold decide() applies to a truck of this tier (the inspector cuts its regions at it)."""
        return self.thresholds[self.resolve_tier(tier)[0]]

    def forcing_flags(self, risk_flags: Iterable[str] | str | None) -> list[str]:
        flags = parse_flags(risk_flags)
        if self.force_flags == ANY:
            return flags
        forcing = {f.casefold() for f in self.force_flags}   # a targeting system's INTEL_HIT is intel_hit
        return [f for f in flags if f.casefold() in forcing]

    def decide(self, score: float | None, tier: str | None = None,
               risk_flags: Iterable[str] | str | None = None, error: str | None = None) -> Decision:
        """Route one scan: error, forcing risk flag or score >= tier threshold -> INSPECT."""
        applied, note = self.resolve_tier(tier)
        thr = self.thresholds[applied]
        if error:
            return Decision("INSPECT", thr, applied, f"{note}error: {error}")
        try:
            forcing = self.forcing_flags(risk_flags)
        except ValueError as e:
            return Decision("INSPECT", thr, applied, f"{note}error: unreadable risk flags ({e})")
        if forcing:
            return Decision("INSPECT", thr, applied, f"{note}risk flag {_short(', '.join(forcing))} forces inspection")
        if score is None or not isinstance(score, (int, float)) or not math.isfinite(score):
            return Decision("INSPECT", thr, applied, f"{note}error: no valid score ({score!r})")
        rate = self.tiers[applied]
        at = "the model's default rate" if rate is None else f"false-alarm rate {rate:g}"
        d = score_digits(score, thr, 4)
        if score >= thr:
            return Decision("INSPECT", thr, applied,
                            f"{note}score {score:.{d}f} >= threshold {thr:.{d}f} of tier {applied} at {at}")
        return Decision("RELEASE", thr, applied,
                        f"{note}score {score:.{d}f} < threshold {thr:.{d}f} of tier {applied} at {at}")

    def describe(self) -> str:
        """One line per tier for logs: name, rate, threshold."""
        rows, set_ = [], [t for t in self.thresholds.values() if t is not None]
        texts = dict(zip(set_, threshold_texts(*set_)))
        for name, rate in self.tiers.items():
            thr = self.thresholds.get(name)
            rows.append(f"{name}: rate {'default' if rate is None else f'{rate:g}'}"
                        + ("" if thr is None else f", threshold {texts[thr]}"))
        return "; ".join(rows)


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice: PyYAML keeps the last one without a word, so a
    second `whitelist:` further down would silently replace the rate an operator reviewed (a training config's
    second `trainer:` section, all of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
                seen.add(key)
            except TypeError:   # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def _short(text: str, limit: int = 80) -> str:
    """Request text quoted in a reason, cut to `limit` characters: a reason is stored with every
    verdict (audit row, results CSV) and a 1 MB tier name must not be, once per truck."""
    return text if len(text) <= limit else text[:limit] + "..."


def _known(d: dict, keys: tuple[str, ...], where: str, source: str) -> None:
    unknown = sorted(str(k) for k in d if k not in keys)
    if unknown:
        raise PolicyError(source, f"{where}: unknown key(s) {', '.join(unknown)} (expected {', '.join(keys)})")


def load_policy(path: str | Path | None) -> Policy:
    """The policy in a file, or (None) one tier 'default' at the model's calibrated threshold."""
    return Policy() if path is None else Policy.from_yaml(path)


def parse_flags(value: Iterable[str] | str | None) -> list[str]:
    """Risk flags from a list, a JSON list string or 'a,b' / 'a;b' text; empty -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"bad JSON list {text[:40]!r}: {e.msg}") from None
        else:
            value = text.replace(";", ",").replace("|", ",").split(",")
    if not isinstance(value, (list, tuple, set)):
        raise ValueError(f"expected a list of flags, got {type(value).__name__}")
    return [f for f in (_flag(v).strip() for v in value) if f]


def _flag(value: Any) -> str:
    """One risk flag as text: a string, or an integer (a targeting system's code). ValueError for anything else (null,
    a bool, an object, a list): stringified, it matched no forcing flag of a list policy and the truck was released."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise ValueError(f"a flag must be text, got {type(value).__name__} {_short(repr(value), 40)}")


def _default_threshold(model: Any, meta: dict, source: str) -> float:
    thr = getattr(model, "threshold", None)
    if isinstance(thr, (int, float)):
        return float(thr)
    try:
        from detector.bundle import default_threshold
        return float(default_threshold(meta)[0])
    except Exception as e:
        raise PolicyError(source, f"model metadata has no usable default threshold ({e})") from None


def _table_row(meta: dict, rate: float) -> float | None:
    """The bundle's threshold for this very rate, else None. Preferred to deriving it from normal_scores, which
    training stores rounded to 6 decimals: derived, a tier at the table's rate sat up to 5e-7 off the threshold
    `detector info`, `score` and the Inspector route at."""
    for row in meta.get("thresholds") or []:
        if abs(float(row.get("false_alarm_rate", -1)) - rate) < 1e-12:
            return float(row["threshold"])
    return None
