"""A dataset folder's records: manifest.csv rows or the normal/ + anomalous/ layout, their train/val/test split and
a fingerprint of the data a model was trained on."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.manifest import (SPLIT_ALIASES, boxes_of, has_layout, label_of, layout_files, not_a_dataset, on_disk,
                               one_row_per_file, pitch_of, read_rows)
from detector.scan import ScanError

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    path: str
    label: int
    mask: str | None = None
    boxes: list | None = None
    anomaly_type: str = ""
    split: str = ""
    pitch_mm: float | None = None   # the manifest row's pitch_mm: its file's pitch where the file carries none

    def untagged_pitch(self, default_pitch_mm: float | None) -> float | None:
        """The pitch to read this scan's file at where it carries none: the row's pitch_mm, else `default_pitch_mm`
        (data.pitch_mm; None: 5 mm). A file's own pitch still wins."""
        return default_pitch_mm if self.pitch_mm is None else self.pitch_mm

    @property
    def label_alone(self) -> bool:
        """An anomalous scan with neither mask nor boxes: nobody said where its anomaly lies."""
        return self.label == 1 and not self.mask and not self.boxes


def _records_from_manifest(root: Path) -> list[Record]:
    manifest = root / "manifest.csv"
    out, rows = [], read_rows(manifest)
    for row in rows:
        text = (row.get("split") or "").strip()
        split = SPLIT_ALIASES.get(text.lower(), "")
        if text and not split:   # a typo would train on the scans meant to test the model
            raise ScanError(manifest, f"row {row['_row']}: split {text!r} is not one of "
                                      f"{', '.join(sorted(SPLIT_ALIASES))} (or empty: train)")
        out.append(Record(str(on_disk(root / row["path"])), label_of(row, manifest),
                          str(on_disk(root / row["mask"])) if (row.get("mask") or "").strip() else None,
                          boxes_of(row, manifest) or None, (row.get("anomaly_type") or "").strip(), split,
                          pitch_of(row, manifest)))
    one_row_per_file(manifest, [(f"row {row['_row']}: ", row["path"], Path(r.path).resolve())
                                for row, r in zip(rows, out)])
    return out


def _records_from_folders(root: Path) -> list[Record]:
    files = layout_files(root)
    one_row_per_file(root, [("", p.relative_to(root).as_posix(), p.resolve()) for p, _, _ in files])
    return [Record(str(p), label, str(m) if m else None) for p, label, m in files]


def check_dataset(data_dir: str | os.PathLike) -> None:
    """ScanError unless `data_dir` is a dataset folder (manifest.csv or normal/ + anomalous/): checked before a run
    writes anything, so a wrong --data leaves no run folder behind."""
    root = Path(data_dir)
    if root.is_file():    # eval --truth takes a manifest; --data takes the folder that holds it
        raise ScanError(root, f"a file, not a dataset folder: pass the folder that holds the scans and "
                              f"manifest.csv ({root.parent})")
    if not root.is_dir():
        raise ScanError(root, "no such dataset folder (make a synthetic one with `detector synth DIR`; the layouts "
                              "a folder of your own scans can take are in data/README.md)")
    if not ((root / "manifest.csv").exists() or has_layout(root)):
        raise ScanError(root, not_a_dataset(root))


def load_records(data_dir: str | os.PathLike) -> list[Record]:
    """All records of a dataset folder (manifest.csv, else normal/ + anomalous/)."""
    check_dataset(data_dir)
    root = Path(data_dir)
    recs = _records_from_manifest(root) if (root / "manifest.csv").exists() else _records_from_folders(root)
    if not recs:
        raise ScanError(root, "dataset has no scans")
    return recs


def split_records(recs: list[Record], val_fraction: float, test_fraction: float, seed: int
                  ) -> dict[str, list[Record]]:
    """Manifest split column when present, else a seeded split stratified by label."""
    if any(r.split for r in recs):
        return {s: [r for r in recs if (r.split or "train") == s] for s in SPLITS}
    rng = np.random.default_rng(seed)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for label in (0, 1):
        group = [r for r in recs if r.label == label]
        idx = rng.permutation(len(group))
        n_val = int(round(len(group) * val_fraction)) if len(group) > 2 else 0
        n_test = int(round(len(group) * test_fraction)) if len(group) > 2 else 0
        for j, i in enumerate(idx):
            out["val" if j < n_val else "test" if j < n_val + n_test else "train"].append(group[i])
    return out


def fingerprint(recs: list[Record], pitch_mm: float | None = None) -> str:
    """Hash of the manifest rows and file sizes: identifies the data a model was trained on. `pitch_mm` (data.pitch_mm,
    the pitch of files that carry none) is the data's physical scale, which those files lack: with it set, the same
    files are other scans (None hashes as before). A row's own pitch_mm is hashed with its row, only where set: the
    fingerprints of datasets without that column stay what they were."""
    h = hashlib.sha256()
    if pitch_mm is not None:
        h.update(f"default pitch {float(pitch_mm)!r} mm\n".encode())
    for r in sorted(recs, key=lambda r: r.path):
        size = os.path.getsize(r.path) if os.path.exists(r.path) else -1
        pitch = "" if r.pitch_mm is None else f",pitch {float(r.pitch_mm)!r}"
        h.update(f"{Path(r.path).name},{r.label},{r.split},{r.boxes},{size}{pitch}\n".encode())
    return h.hexdigest()[:16]
