"""Write data/samples/: one tiny scan per supported format (tests and README use them).

The same synthetic truck (seed 7, with a concealed firearm) is written in every format, so
readers can be checked against each other. Run: python scripts/make_samples.py
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import tifffile

from detector.scan import write_scan
from detector.synth import generate_scan

OUT = Path(__file__).resolve().parents[1] / "data" / "samples"
HEIGHT = 96  # px; the generator scales the pitch so the whole truck fits


def write_dicom(path: Path, counts: np.ndarray, pitch_mm: float) -> None:
    """A minimal single-energy DICOM (DX-like) file."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])   # the same file each run
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    ds.Rows, ds.Columns = counts.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagerPixelSpacing = [pitch_mm, pitch_mm]
    ds.PixelData = counts.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, anomaly, seed in (("truck_normal", None, 3), ("truck_firearm", "firearm", 7)):
        s = generate_scan(seed, anomaly, height=HEIGHT)
        path = write_scan(OUT / f"{name}.tiff", s.counts, i0=(s.i0, s.i0), pitch_mm=s.pitch_mm)
        cv2.imwrite(str(OUT / f"{name}_mask.png"), (s.mask > 0).astype(np.uint8) * 255)
        rows.append({"path": path.name, "label": s.label, "mask": f"{name}_mask.png",
                     "boxes": json.dumps(s.boxes), "anomaly_type": s.anomaly_type,
                     "cargo": s.cargo, "vehicle": s.vehicle, "split": "test"})
    # the anomalous truck in every other format
    high = s.counts[0]
    write_scan(OUT / "truck_firearm_high16.png", high)
    cv2.imwrite(str(OUT / "truck_firearm_high8.png"), (high >> 8).astype(np.uint8))
    tifffile.imwrite(OUT / "truck_firearm_hw2.tiff", np.moveaxis(s.counts, 0, -1),
                     photometric="minisblack", planarconfig="contig")
    write_scan(OUT / "truck_firearm.npy", s.counts)
    write_scan(OUT / "truck_firearm.npz", s.counts, i0=(s.i0, s.i0), pitch_mm=s.pitch_mm)
    write_dicom(OUT / "truck_firearm_high.dcm", high, s.pitch_mm)
    grey = cv2.normalize(-np.log(np.clip(high / s.i0, 1e-6, 1)), None, 0, 255, cv2.NORM_MINMAX)
    colour = cv2.applyColorMap(255 - grey.astype(np.uint8), cv2.COLORMAP_JET)  # pseudo-colour view
    cv2.imwrite(str(OUT / "truck_firearm_pseudocolour.jpg"), colour, [cv2.IMWRITE_JPEG_QUALITY, 90])
    with open(OUT / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1e3:.0f} kB, to {OUT}")


if __name__ == "__main__":
    main()
