"""How much photon noise TIP leaves out: a threat projected into a scan adds attenuation but not the noise that
the fewer photons behind it would carry, so its inside is smoother than a real threat's.

    .venv/bin/python benchmarks/tip_noise.py [--scans 12] [--per-scan 8] [--seed 4100]

Prints (1) the generator's noise at the model's pitch by attenuation band, from two noise draws of the same truck,
and (2) for TIP threats projected into those trucks as training projects them (detector.tip.make_threat and
project into the cargo region, default config), the noise a real threat would add there, as a share of the threat's
own contrast and as the ratio of the noise a real one would show to the noise the projected one shows.
"""
from __future__ import annotations

import argparse

import numpy as np

from detector import tip
from detector.config import load_config
from detector.preprocess import Preprocessing, model_attenuation
from detector.scan import scan_from_counts
from detector.synth.dataset import scan_seed
from detector.synth.render import DetectorModel, detect
from detector.synth.scene import _stream, build_scene

BANDS = np.arange(0.0, 12.0, 0.5)


def model_att(counts: np.ndarray, pitch_mm: float, i0: float, pre: Preprocessing) -> np.ndarray:
    """Counts -> attenuation at the model's pitch, the scan cache's path."""
    scan = scan_from_counts(counts, i0=(i0, i0), pitch_mm=pitch_mm, energies=("high", "low"))
    return model_attenuation(scan.attenuation, scan.pitch_mm, pre, None, "synthetic").astype(np.float32)


def noise_curve(trucks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(channels, bands) noise std at model pitch: half the difference of two draws, binned by attenuation."""
    out = np.full((2, BANDS.size), np.nan)
    for c in range(2):
        for b, lo in enumerate(BANDS):
            parts = []
            for a1, a2 in trucks:
                mean = 0.5 * (a1[c] + a2[c])
                sel = (mean >= lo) & (mean < lo + 0.5)
                parts.append(((a1[c] - a2[c]) / np.sqrt(2))[sel])
            v = np.concatenate(parts)
            if v.size >= 500:
                out[c, b] = v.std()
    return out


def sigma(curve: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Noise std at attenuation a, log-linear between the measured bands (flat beyond them)."""
    ok = np.isfinite(curve)
    return np.exp(np.interp(a, BANDS[ok] + 0.25, np.log(curve[ok])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=12, help="normal trucks to draw")
    ap.add_argument("--per-scan", type=int, default=8, help="TIP threats projected into each")
    ap.add_argument("--seed", type=int, default=4100)
    ap.add_argument("--config", default="configs/default.yaml")
    a = ap.parse_args()
    pre = load_config(a.config, []).preprocessing
    det = DetectorModel(dose_jitter=0, row_gain=0, dead_rows=0, hot_rows=0, speed_var=0)  # photon + read noise only
    trucks = []
    for i in range(a.scans):
        cv, _, _ = build_scene(_stream(scan_seed(a.seed, i), 0), None, None, None)
        att = cv.attenuation().copy()
        trucks.append(tuple(model_att(detect(att, np.random.default_rng([a.seed, i, k]), det), cv.pitch_mm, det.i0,
                                      pre) for k in (1, 2)))
    curve = noise_curve(trucks)
    print(f"(1) noise std at {pre.model_pitch_mm:g} mm by attenuation (high / low energy), {a.scans} trucks:")
    for b, lo in enumerate(BANDS):
        if np.isfinite(curve[:, b]).any():
            print(f"  A {lo:4.1f}-{lo + 0.5:4.1f}: {curve[0, b]:.4f} / {curve[1, b]:.4f}")

    rng = np.random.default_rng(a.seed)
    share, ratio, dense = [[], []], [[], []], []
    for a1, _ in trucks:
        region = tip.cargo_region(a1)
        for _ in range(a.per_scan):
            try:
                new, m, _ = tip.project(a1, tip.make_threat(rng, pitch_mm=pre.model_pitch_mm), rng, region=region,
                                        min_inside=0.9)
            except ValueError:
                continue
            for c in range(2):
                a0, da = a1[c][m], (new - a1)[c][m]
                s0, s1 = sigma(curve[c], a0), sigma(curve[c], a0 + da)
                missing = np.sqrt(np.maximum(s1 ** 2 - s0 ** 2, 0))
                share[c].append(missing.mean() / max(da.mean(), 1e-6))
                ratio[c].append(s1.mean() / s0.mean())
            dense.append(float((a1[0][m] + (new - a1)[0][m] > 7.5).mean()))
    n = len(dense)
    print(f"(2) {n} TIP threats ({tip.THREAT_KINDS}) projected into the cargo of those trucks:")
    for c, name in enumerate(("high", "low")):
        s, r = np.array(share[c]), np.array(ratio[c])
        print(f"  {name} energy: the noise left out / the threat's contrast: median {np.median(s):.3f}, 90th percentile "
              f"{np.percentile(s, 90):.3f}, over 0.1 in {(s > 0.1).mean():.0%}; a real threat's noise / the projected "
              f"one's: median {np.median(r):.2f}, 90th percentile {np.percentile(r, 90):.2f}")
    print(f"  threat pixels at attenuation > 7.5 after projection (where read noise takes over): median "
          f"{np.median(dense):.1%}, mean {np.mean(dense):.1%}")


if __name__ == "__main__":
    main()
