"""The scan cache: each record read once, resampled to the model's pitch and stored as .npy (with its mask) that
every loader worker memory-maps, so RAM holds each scan once however many workers run."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.formats import file_geometry, file_view
from detector.hard_types import write_atomic
from detector.manifest import absolute, read_mask
from detector.preprocess import Preprocessing, model_attenuation
from detector.records import Record
from detector.scan import ScanError, file_shape, map_box, read_scan
from detector.synth.stream import MASK_KEEP, mask_centres, model_mask


def _scan_mask(rec: Record, shape: tuple[int, int], file_hw: tuple[int, int] | None = None) -> np.ndarray | None:
    """(H, W) float32 0/1 mask at scan resolution from the mask PNG or the boxes; None if label-only. A mask
    that contradicts the label (an anomalous scan's marks nothing, a normal scan's marks something) is an
    error: it would teach every crop of the scan the wrong class. `file_hw`: the file's own size where its reader
    squared its pixels (shape is then the squared one): boxes and a mask of that size are in the file's pixels, as
    the manifest's contract has them, and are carried onto the squared grid; a mask of the squared size is taken
    as it is."""
    h, w = shape
    fh, fw = file_hw or shape
    if rec.mask:
        m = _read_scan_mask(rec, shape, (fh, fw))
        m, source = (m > 0).astype(np.float32), rec.mask   # 0/255 as documented; 0/1 from many labelling tools
    elif rec.boxes:
        m, source = np.zeros(shape, np.float32), rec.path
        for box in rec.boxes:
            x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
            x1, y1 = min(fw, int(np.ceil(box[2]))), min(fh, int(np.ceil(box[3])))
            if x1 <= x0 or y1 <= y0:
                raise ScanError(rec.path, f"box {box} ([x0, y0, x1, y1]) covers no pixel of the {fw}x{fh} scan")
            x0, y0, x1, y1 = map_box([x0, y0, x1, y1], (fh, fw), shape)
            m[y0:y1, x0:x1] = 1
    else:
        return None if rec.label else np.zeros(shape, np.float32)
    marked = int(np.count_nonzero(m))
    if rec.label and not marked:
        raise ScanError(source, "anomalous scan (label 1) whose mask marks no pixel: draw the anomaly, or leave the "
                                "mask out to train from the label alone")
    if not rec.label and marked:
        raise ScanError(source, f"normal scan (label 0) whose mask marks {marked} pixels: label it 1 or clear the mask")
    return m


def _read_scan_mask(rec: Record, shape: tuple[int, int], file_hw: tuple[int, int]) -> np.ndarray:
    """The record's mask PNG on the scan's grid (shape): one of the file's size (file_hw) area-resampled onto it,
    a pixel kept when MASK_KEEP of it is marked (as model_mask keeps a thin anomaly); ScanError when it is missing or
    of another size."""
    if not os.path.exists(rec.mask):
        raise ScanError(rec.mask, f"mask file not found (named for {Path(rec.path).name})")
    m = read_mask(rec.mask)
    if m.shape == shape:
        return m
    if m.shape != file_hw:
        squared = f" ({shape[1]}x{shape[0]} once its pixels are squared)" if file_hw != shape else ""
        raise ScanError(rec.mask, f"mask is {m.shape[1]}x{m.shape[0]}, scan is {file_hw[1]}x{file_hw[0]}{squared}")
    marked = (m > 0).astype(np.float32)
    return (cv2.resize(marked, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) > MASK_KEEP).astype(np.uint8)


def _save(path: Path, a: np.ndarray, source: str) -> None:
    """Atomic .npy write: DDP ranks may build the same cache entry at once. A failed write (a full disk)
    leaves no partial file and names the cache, the scan and the way out."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, a)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: cannot write the scan cache entry of {source} ({e}); the cache needs ~{a.nbytes / 1e6:.0f} "
                      f"MB per scan like it: free disk space or point data.cache_dir at a larger disk") from e


def _stamp(path: str) -> str:
    """'size|mtime_ns' of a file, which changes when it is rewritten; ScanError naming it if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ScanError(path, "file not found" if isinstance(e, FileNotFoundError) else
                        f"cannot read the file ({e.strerror or e})") from None
    return f"{st.st_size}|{st.st_mtime_ns}"


def _squared(path: str) -> bool:
    """Whether the file's header says its reader squares its pixels (the scan's grid is not the file's)."""
    g = file_geometry(path)
    return g is not None and (g.height, g.width) != (g.file_height, g.file_width)


class ScanCache:
    """Model-pitch attenuation (+ mask) of each record, computed once and memory-mapped from .npy."""

    def __init__(self, folder: str | os.PathLike, pre: Preprocessing, channels: int | None = None,
                 default_pitch_mm: float | None = None) -> None:
        """`default_pitch_mm`: the pitch of a scan whose file carries none (data.pitch_mm; None: 5 mm), where its
        record (manifest row) gives none of its own."""
        self.folder, self.pre, self.channels = Path(folder), pre, channels
        self.default_pitch_mm = default_pitch_mm
        self.folder.mkdir(parents=True, exist_ok=True)

    def _key(self, rec: Record) -> str:
        """The entry's name: changes with anything its arrays or meta come from. The label and the mask file's
        size and mtime are in it: a mask redrawn in place, or a scan relabelled (a seizure found after release),
        must not reuse the old mask, nor skip the check that the mask agrees with the label."""
        # absolute paths: one scan named through another manifest (../data/x.tiff) or another working directory
        # is one entry, not a second copy of its arrays
        path, mask = absolute(rec.path), rec.mask and absolute(rec.mask)   # as the OS goes: up from a link's target
        s = f"{path}|{_stamp(rec.path)}|{mask}|{rec.boxes}|{self.pre.model_pitch_mm}|{self.channels}"
        s += f"|label{rec.label}" + (f"|{_stamp(rec.mask)}" if rec.mask and os.path.exists(rec.mask) else "")
        s += "|rows2" if self.pre.repair_rows else ""   # caches made without the row repair stay valid; rows2:
                                                         # runs of dead rows found too (older entries rebuilt)
        # a squared scan's boxes were once laid on the squared grid as they stood: its entries with marks are rebuilt
        s += "|file-px" if (rec.mask or rec.boxes) and _squared(rec.path) else ""
        # entries before a JPEG, PNG or TIFF was turned as its EXIF orientation says are rebuilt (1: key as before),
        # and before transparent pixels were laid over air (read as the black under them): files with alpha only
        orientation, alpha = file_view(rec.path)
        s += "|exif-turned" if orientation != 1 else ""
        s += "|alpha-air" if alpha else ""
        # the pitch of files without one (the row's pitch_mm, else data.pitch_mm): another value resamples them to
        # another size (None keeps older entries; a row's cell and data.pitch_mm of one value make the same arrays)
        pitch = rec.untagged_pitch(self.default_pitch_mm)
        s += f"|default-pitch{float(pitch)!r}" if pitch is not None else ""
        return hashlib.sha1(s.encode()).hexdigest()[:20]

    def build(self, rec: Record) -> dict[str, Any]:
        """Read, resample and store one record (no-op when cached); returns its meta. An entry whose arrays are
        gone (a clean-up of big .npy files, a partial copy of the cache) is rebuilt: its meta alone sent every
        run to a FileNotFoundError in a loader worker."""
        key = self._key(rec)
        meta_path = self.folder / f"{key}.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if all(p.exists() for p in self._arrays(meta)):
                return meta
        scan = read_scan(rec.path, default_pitch_mm=rec.untagged_pitch(self.default_pitch_mm))
        att = model_attenuation(scan.attenuation, scan.pitch_mm, self.pre, self.channels, scan.source)
        mask = _scan_mask(rec, (scan.height, scan.width), file_shape(scan))
        _save(self.folder / f"{key}.att.npy", att.astype(np.float32), rec.path)
        meta: dict[str, Any] = {"key": key, "shape": list(att.shape), "has_mask": mask is not None,
                                "pitch_mm": scan.pitch_mm, "energies": list(scan.energies), "centres": []}
        if mask is not None:
            mm = model_mask(mask, scan.pitch_mm, self.pre)
            _save(self.folder / f"{key}.mask.npy", mm, rec.path)
            meta["centres"] = [list(c) for c in mask_centres(mm)]
        write_atomic(meta_path, meta)  # meta last: a crashed build is redone
        return meta

    def _arrays(self, meta: dict[str, Any]) -> list[Path]:
        """The .npy files of a cache entry."""
        return [self.folder / f"{meta['key']}.{part}.npy" for part in ("att", "mask")[:1 + bool(meta["has_mask"])]]

    def load(self, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        att, *mask = (np.load(p, mmap_mode="r") for p in self._arrays(meta))
        return att, mask[0] if mask else None
