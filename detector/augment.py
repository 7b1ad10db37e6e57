"""Augmentations for radiographs, applied to attenuation crops (H, W, C float32, before normalize).

Scanner physics, not photo tricks: trucks are scanned either way round (horizontal flip), pitch and
magnification vary a little (scale), dose varies (Poisson noise in the transmission domain), detector
rows have their own gain and each linac pulse its own intensity (row offsets, column stripes), and the
focal spot blurs. TIP inserts threats into normal crops on the fly so normal traffic alone can train.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # no network at run time: else each import asks PyPI
import albumentations as A  # noqa: E402
import cv2
import numpy as np

from detector import tip
from detector.synth.render import normal_noise

GAUSS_COUNTS = 100.0  # DoseNoise: above this many counts a Gaussian draw stands in for the Poisson one
# TIP's photon noise: the generator's noise at the 10 mm model pitch, var(A) = e^A / N + R^2 e^2A / N^2 (photons N and
# read noise R per model pixel, set from benchmarks/tip_noise.py's curve at attenuation 0-0.5 and 6-6.5: within 30 % of
# it below 7), its std capped where counts run out
TIP_PHOTONS, TIP_READ, TIP_MAX_STD = 4.4e5, 32.0, 1.0


@dataclass
class AugmentConfig:
    enabled: bool = True
    hflip: float = 0.5            # probability of a flip along the truck
    scale: float = 0.1            # +- relative scale (pitch) jitter
    scale_p: float = 0.3
    noise_p: float = 0.3          # dose change: Poisson noise at a random open-beam count
    photons: tuple[float, float] = (2e5, 2e6)  # open-beam photons per model pixel; dense cargo (A~8) keeps counts
    thickness: float = 0.0        # +- relative path-length jitter (0 = off): denser/thinner loads, same materials
    thickness_p: float = 0.3
    stripes_p: float = 0.3        # row gain and column (pulse) stripes
    stripes_sigma: float = 0.02   # attenuation offset std of one row / column
    blur_p: float = 0.2
    tip_rate: float = 0.0         # share of normal crops that get a TIP threat (normal-only mode sets it)
    tip_kinds: tuple[str, ...] = ()  # empty = all kinds of detector.tip
    tip_scale: tuple[float, float] = (1.0, 1.0)  # threat attenuation x U(lo, hi): thinner threats, or packages
                                                 # displacing fuel (the net is ~0.2-0.4 of cocaine's); 1,1 = off
    tip_conceal: float = 0.0      # share of TIP threats that are packages hidden in vehicle parts / dense matter
    tip_conceal_scale: tuple[float, float] = (0.25, 1.0)  # their net attenuation: displacing diesel .. in air
    tip_tyres: float = 0.0        # share of the random crops of normal training scans cut around a wheel the scan
                                  # shows (tip.find_wheels) with bags packed into its tyre: cleared traffic shows none
    tip_from_labels: float = 0.0  # share of TIP threats cut from the training scans' own labelled anomalies (their
                                  # masks) and projected elsewhere: a site's seizures as a TIP library, in new places
                                  # (0.5: no gain on the synthetic default, a loss on 160 scans: docs/experiments.md)
    tip_noise: bool = False       # TIP threats carry the photon noise of the fewer photons behind them


class DoseNoise(A.ImageOnlyTransform):
    """Photon noise at a random dose: counts ~ Poisson(N0 * exp(-A)), back to attenuation."""

    def __init__(self, photons: tuple[float, float] = (2e5, 2e6), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.photons = tuple(photons)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        lo, hi = np.log(self.photons[0]), np.log(self.photons[1])
        return {"n0": float(np.exp(self.random_generator.uniform(lo, hi))),
                "seed": int(self.random_generator.integers(2**31))}

    def apply(self, img: np.ndarray, n0: float = 1e4, seed: int = 0, **params: Any) -> np.ndarray:
        rng = np.random.default_rng(seed)
        lam = np.float32(n0) * np.exp(-img.astype(np.float32))
        # Poisson(lam) ~ N(lam, lam) rounded where lam >= GAUSS_COUNTS: 4x faster than numpy's Poisson
        # sampler over a whole crop; the few low-count pixels (dense cargo) keep the exact draw
        counts = np.rint(lam + np.sqrt(lam) * normal_noise(rng, lam.shape))
        low = lam < GAUSS_COUNTS
        if low.any():
            counts[low] = rng.poisson(lam[low].astype(np.float64))
        return (-np.log(np.maximum(counts, 1) / np.float32(n0))).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("photons",)


class Thickness(A.ImageOnlyTransform):
    """Every path length scaled by one factor: a denser or thinner load of the same materials.
    Both energies scale alike, so the dual-energy ratio (the material signature) is kept."""

    def __init__(self, limit: float = 0.15, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.limit = limit

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        return {"factor": float(self.random_generator.uniform(1 - self.limit, 1 + self.limit))}

    def apply(self, img: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:
        return (img * factor).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("limit",)


class Stripes(A.ImageOnlyTransform):
    """Per-row detector gain and per-column (pulse) intensity: additive attenuation offsets."""

    def __init__(self, sigma: float = 0.02, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.sigma = sigma

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        g = self.random_generator
        return {"rows": g.normal(0, self.sigma, (h, 1, 1)).astype(np.float32),
                "cols": g.normal(0, self.sigma, (1, w, 1)).astype(np.float32)}

    def apply(self, img: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None,
              **params: Any) -> np.ndarray:
        return np.maximum(img + rows + cols, 0).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma",)


class TIP(A.DualTransform):
    """Threat image projection: add a library threat's attenuation inside the cargo and mark its mask.

    Applied only where the mask is empty (normal crops); `pitch_mm` is the crop's pitch so threats keep
    their physical size. `scale` = (lo, hi): the threat's attenuation times U(lo, hi) (a thinner object of
    the same materials: the dual-energy ratio is kept), its mask unchanged. `conceal`: the share of
    threats that are instead wrapped packages hidden in the vehicle (`tip.make_package`, net attenuation
    x U(conceal_scale)), placed half the time in the denser half of the crop (tyres, tanks, engine, dense
    loads): a TIP library holds free-standing threats, so without these a model trained on cleared
    traffic never sees a package in a fuel tank or a tyre. `library`: threats cut from labelled scans
    (`tip.threats_from_mask`); `library_share` of the threats are drawn from it, flipped at random.
    """

    def __init__(self, pitch_mm: float = 10.0, kinds: tuple[str, ...] = (), p: float = 0.5,
                 scale: tuple[float, float] = (1.0, 1.0), conceal: float = 0.0,
                 conceal_scale: tuple[float, float] = (0.25, 1.0), library: Sequence[tip.Threat] = (),
                 library_share: float = 0.0, noise: bool = False) -> None:
        super().__init__(p=p)
        self.noise = bool(noise)
        self.pitch_mm = pitch_mm
        self.kinds = _check_kinds(kinds, "TIP kinds")
        self.scale = _check_range(scale, "TIP scale")
        self.conceal = float(conceal)
        if not 0 <= self.conceal <= 1:
            raise ValueError(f"TIP conceal must be a share in [0, 1], got {conceal!r}")
        self.conceal_scale = _check_range(conceal_scale, "TIP conceal_scale")
        self.library = tuple(library)
        self.library_share = float(library_share)
        if not 0 <= self.library_share <= 1:
            raise ValueError(f"TIP library_share must be a share in [0, 1], got {library_share!r}")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        img, mask = data["image"], data.get("mask")
        if mask is not None and np.any(mask):
            return {"add": None}
        seed = int(self.random_generator.integers(2**31))
        rng = np.random.default_rng(seed)
        scale_rng = np.random.default_rng([seed, 1])   # own stream: the scale never moves the threat
        att = np.moveaxis(img, -1, 0)
        region = tip.cargo_region(att)
        if region.sum() < 16:                      # no cargo (air, small 8-bit images): anywhere
            region = np.ones(att.shape[1:], bool)
        conceal_rng = np.random.default_rng([seed, 2])  # own stream: conceal=0 leaves the rest unchanged
        if self.conceal > 0 and conceal_rng.random() < self.conceal:
            if conceal_rng.random() < 0.5:          # the dense half only when drawn: a blur per crop
                dense = tip.dense_region(att, region)
                region = dense if dense.sum() >= 16 else region
            return self._noisy(img, seed, _insert(att, region, conceal_rng, lambda: tip.make_package(
                conceal_rng, self.pitch_mm, att.shape[0], conceal_rng.uniform(*self.conceal_scale))))

        library_rng = np.random.default_rng([seed, 3])   # own stream: library_share=0 leaves the rest unchanged
        from_library = bool(self.library) and library_rng.random() < self.library_share

        def threat() -> tip.Threat:
            if from_library:
                t = self.library[int(library_rng.integers(len(self.library)))]
                flip = (slice(None), slice(None, None, library_rng.choice([-1, 1])),
                        slice(None, None, library_rng.choice([-1, 1])))
                t = tip.Threat(t.attenuation[flip], t.mask[flip[1:]], t.kind)
            else:
                t = tip.make_threat(rng, str(rng.choice(self.kinds)) if self.kinds else None,
                                    pitch_mm=self.pitch_mm, channels=att.shape[0])
            if self.scale != (1.0, 1.0):
                t = tip.Threat(t.attenuation * scale_rng.uniform(*self.scale), t.mask, t.kind)
            return t
        return self._noisy(img, seed, _insert(att, region, rng, threat))

    def _noisy(self, img: np.ndarray, seed: int, params: dict[str, Any]) -> dict[str, Any]:
        """With `noise`, add to the threat the photon noise its attenuation would carry: the variance at the
        new attenuation less the one the crop already has, inside the threat only."""
        add = params["add"]
        if not self.noise or add is None:
            return params
        def std(a: np.ndarray) -> np.ndarray:
            a = np.minimum(a, 20.0)   # beyond counts: the cap below holds
            v = np.exp(a) / TIP_PHOTONS + (TIP_READ / TIP_PHOTONS) ** 2 * np.exp(2 * a)
            return np.minimum(np.sqrt(v), TIP_MAX_STD)
        a0 = img.astype(np.float32)
        missing = np.sqrt(np.maximum(std(a0 + add) ** 2 - std(a0) ** 2, 0)) * (add != 0)
        z = normal_noise(np.random.default_rng([seed, 4]), add.shape)
        return {**params, "add": (add + missing * z).astype(np.float32)}

    def apply(self, img: np.ndarray, add: np.ndarray | None = None, **params: Any) -> np.ndarray:
        return img if add is None else (img + add).astype(np.float32)

    def apply_to_mask(self, mask: np.ndarray, add: np.ndarray | None = None,
                      tip_mask: np.ndarray | None = None, **params: Any) -> np.ndarray:
        if add is None:
            return mask
        out = mask.copy()
        out[tip_mask] = 1
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("pitch_mm", "kinds", "scale", "conceal", "conceal_scale", "library_share", "noise")


def _insert(att: np.ndarray, region: np.ndarray, rng: np.random.Generator,
            make: Callable[[], tip.Threat], tries: int = 5) -> dict[str, Any]:
    """Project a threat from `make` into the region (a new one if it does not fit): TIP's params."""
    for _ in range(tries):
        try:
            new, m, _ = tip.project(att, make(), rng, region=region, min_inside=0.9)
        except ValueError:
            continue
        return {"add": np.moveaxis(new - att, 0, -1), "tip_mask": m}
    return {"add": None}


def _check_range(r: tuple[float, float], name: str) -> tuple[float, float]:
    """(lo, hi) as floats, or ValueError naming the setting: two numbers with 0 < lo <= hi."""
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers [lo, hi], got {r!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be 0 < lo <= hi, got {r!r}")
    return lo, hi


def _check_kinds(kinds: Sequence[str], name: str) -> tuple[str, ...]:
    """The TIP threat kinds, or ValueError naming an unknown one: `make_threat` raises it inside TIP's placement
    tries, which take a ValueError for a threat that does not fit, so a misspelled kind inserted nothing."""
    unknown = [k for k in kinds if k not in tip.THREAT_KINDS]
    if unknown:
        raise ValueError(f"{name}: unknown threat kind(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(tip.THREAT_KINDS)} (empty = all)")
    return tuple(kinds)


def check_augment_config(cfg: AugmentConfig) -> None:
    """ValueError naming the first augmentation setting that cannot work: checked when a config is loaded, so a
    misspelled TIP kind fails at once instead of training without a threat, and a bad range before the caching."""
    _check_kinds(cfg.tip_kinds, "data.augment.tip_kinds")
    for name in ("tip_scale", "tip_conceal_scale", "photons"):
        _check_range(getattr(cfg, name), f"data.augment.{name}")


def train_pipeline(cfg: AugmentConfig, pitch_mm: float, seed: int | None = None,
                   library: Sequence[tip.Threat] = ()) -> A.Compose:
    """The training augmentation; TIP first (on the clean crop), then the scanner effects. `library`: the
    training scans' own labelled threats (used when cfg.tip_from_labels > 0)."""
    ts: list[A.BasicTransform] = []
    if cfg.tip_rate > 0:
        ts.append(TIP(pitch_mm=pitch_mm, kinds=cfg.tip_kinds, p=cfg.tip_rate, scale=cfg.tip_scale,
                      conceal=cfg.tip_conceal, conceal_scale=cfg.tip_conceal_scale, library=library,
                      library_share=cfg.tip_from_labels, noise=cfg.tip_noise))
    if cfg.enabled:
        ts += [
            A.HorizontalFlip(p=cfg.hflip),
            A.Affine(scale=(1 - cfg.scale, 1 + cfg.scale), keep_ratio=True, interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0,
                     fill_mask=0, p=cfg.scale_p),
            *([Thickness(limit=cfg.thickness, p=cfg.thickness_p)] if cfg.thickness > 0 else []),
            Stripes(sigma=cfg.stripes_sigma, p=cfg.stripes_p),
            DoseNoise(photons=cfg.photons, p=cfg.noise_p),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.0), p=cfg.blur_p),
        ]
    return A.Compose(ts, seed=seed)
