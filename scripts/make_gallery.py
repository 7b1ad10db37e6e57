"""Render docs/gallery.png: synthetic scans across vehicle and cargo types, anomaly boxes in red,
shown like a radiograph viewer (high-energy attenuation, log window, dense = dark).

Usage: python scripts/make_gallery.py [--out docs/gallery.png] [--seed 0] [--cols 2] [--tile-width 1100]
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

from detector.physics import attenuation_from_counts
from detector.synth import generate_scan

CASES = [("tractor_40ft", "palletised", "narcotics"), ("tractor_20ft", "machinery", "shielded_block"),
         ("box_truck", "electronics", "firearm"), ("tanker", None, "in_fuel_tank"),
         ("flatbed", "vehicles", None), ("tractor_20ft", "liquid_drums", "false_wall"),
         ("tractor_40ft", "mixed", "low_contrast"), ("box_truck", "textiles", "in_tyre"),
         ("tractor_20ft", "bulk_sacks", "in_chassis"), ("tractor_20ft", "empty", "small_metal")]


def view(counts: np.ndarray, i0: float, a_max: float = 10.0, knee: float = 0.12) -> np.ndarray:
    """uint8 greyscale like a radiograph viewer's log window: grey ~ log(1 + A / knee) of the
    high-energy attenuation A = -ln(I / I0), air white, A >= a_max black (thin sheets stay visible,
    dense parts keep their structure and noise)."""
    a = np.clip(attenuation_from_counts(counts[0], i0), 0, a_max)
    x = np.log1p(a / knee) / np.log1p(a_max / knee)
    return (255 * (1 - x) + 0.5).astype(np.uint8)


def tile(seed: int, vehicle: str, cargo: str | None, anomaly: str | None, width: int) -> np.ndarray:
    s = generate_scan(seed, anomaly=anomaly, vehicle=vehicle, cargo=cargo)
    img = cv2.cvtColor(view(s.counts, s.i0), cv2.COLOR_GRAY2BGR)
    for x0, y0, x1, y1 in s.boxes:
        cv2.rectangle(img, (x0 - 6, y0 - 6), (x1 + 6, y1 + 6), (0, 0, 255), 5)
    f = width / img.shape[1]
    img = cv2.resize(img, (width, int(img.shape[0] * f)), interpolation=cv2.INTER_AREA)
    label = f"{s.vehicle} | {s.cargo} | {s.anomaly_type}"
    cv2.putText(img, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 160), 1, cv2.LINE_AA)
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/gallery.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cols", type=int, default=2)
    ap.add_argument("--tile-width", type=int, default=760)
    a = ap.parse_args(argv)
    tiles = [tile(a.seed + i, *case, a.tile_width) for i, case in enumerate(CASES)]
    th = max(t.shape[0] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 4, th - t.shape[0] + 4, 4, 4, cv2.BORDER_CONSTANT, value=(40, 40, 40))
             for t in tiles]
    rows = [np.hstack(tiles[i:i + a.cols]) for i in range(0, len(tiles), a.cols)]
    rows[-1] = np.hstack([rows[-1], np.full((rows[-1].shape[0], rows[0].shape[1] - rows[-1].shape[1], 3), 40, np.uint8)])
    grid = np.vstack(rows)
    grid &= 0xFE                         # 7-bit grey: invisible, but the noisy PNG stays < 1 MB
    cv2.imwrite(a.out, grid, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    size = os.path.getsize(a.out)
    print(f"gallery: {len(tiles)} scans -> {a.out} ({grid.shape[1]}x{grid.shape[0]}, {size / 1e6:.2f} MB)")
    if size > 1_000_000:
        print("warning: the gallery is over 1 MB; use a smaller --tile-width")
    return 0


if __name__ == "__main__":
    sys.exit(main())
