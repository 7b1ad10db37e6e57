"""Dataset folders, read one way for training, evaluation and scoring (torch-free).

A dataset is a folder with `manifest.csv` (columns path,label; optional mask, boxes, anomaly_type, cargo, split,
tier, risk_flags, pitch_mm; paths relative to the folder) or the plain layout normal/ + anomalous/ (any depth below
them) with optional masks/<stem>.png. A cell that cannot be used raises ScanError naming the manifest, the row and why.
"""
from __future__ import annotations

import codecs
import csv
import difflib
import functools
import io
import json
import os
import unicodedata
from pathlib import Path

import cv2
import numpy as np

from detector.formats import (file_view, jpeg_orientation, opencv_turns_tiff, orient_jpeg, png_cut_short,
                              png_orientation)
from detector.scan import PITCH_RANGE_MM, SCAN_SUFFIXES, ScanError, valid_pitch

LAYOUT = ((0, "normal"), (1, "anomalous"))
# a manifest's split cell -> the split it means (empty: train); any other value is an error
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
# the columns a step reads (train, eval, score): a header cell that misspells one is refused, since each step looked
# for its own name, found none and went on without the column (a risk_flag column released a flagged truck)
COLUMNS = ("path", "label", "mask", "boxes", "anomaly_type", "cargo", "cargo_class", "cargo_type", "split", "tier",
           "risk_flags", "pitch_mm")
# labelling tools' names for boxes; a pitch column without its unit
COLUMN_ALIASES = {"box": "boxes", "bbox": "boxes", "bboxes": "boxes", "pitch": "pitch_mm", "pixel_pitch": "pitch_mm",
                  "pixel_pitch_mm": "pitch_mm"}


def read_text(path: str | Path) -> str:
    """A text file that people write (a manifest, a list of scans), less a byte-order mark; ScanError naming the file
    and the line when it is not UTF-8: a spreadsheet's "CSV" in the Windows code page (an é in a file name) ended
    `detector train` in a UnicodeDecodeError traceback."""
    data = Path(path).read_bytes()
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ScanError(path, f"line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}): save it as UTF-8 (a "
                              "spreadsheet's \"CSV UTF-8\")") from None


def read_rows(manifest: str | Path, need: tuple[str, ...] = ("path", "label")) -> list[dict]:
    """The manifest's rows (each with `_row`, its line in the file), checked for the `need` columns and for a path
    listed twice: two rows of one scan could land in different splits (training on a test scan)."""
    manifest = Path(manifest)
    with io.StringIO(read_text(manifest), newline="") as f:
        reader = csv.DictReader(f)
        _check_column_names(manifest, reader.fieldnames or [])
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            names = reader.fieldnames or []
            hint = ("; its columns are separated by ';' (a spreadsheet's CSV in a comma-decimal locale): save it "
                    "with commas" if len(names) == 1 and ";" in names[0] else "")
            raise ScanError(manifest, f"manifest needs the column(s) {','.join(missing)} (has "
                                      f"{','.join(names) or 'none'}){hint}")
        rows, seen = [], {}
        for row in reader:
            line, path = reader.line_num, _native((row.get("path") or "").strip())   # line_num: blank lines count too
            if not path:
                continue
            key = absolute(manifest.parent / path)   # ./images/a.tiff and images/a.tiff are one scan
            if key in seen:
                raise ScanError(manifest, f"row {line}: {path} is listed again (row {seen[key]}); list each scan once")
            seen[key] = line
            mask = {"mask": _native(row["mask"].strip())} if row.get("mask") else {}
            rows.append({**row, "path": path, "_row": line, **mask})
    return rows


def misspelt_column(name: str) -> str | None:
    """The column of COLUMNS that a header cell which is none of them seems to mean (another case, spaces for
    underscores, a letter off, a labelling tool's bbox), or None for a column of its own (vehicle, notes)."""
    if name in COLUMNS:
        return None
    key = "_".join(name.strip().lower().replace("-", " ").split())
    if key in COLUMNS or key in COLUMN_ALIASES:
        return COLUMN_ALIASES.get(key, key)
    close = difflib.get_close_matches(key, COLUMNS, n=1, cutoff=0.8)
    return close[0] if close else None


def _check_column_names(manifest: Path, names: list[str]) -> None:
    """ScanError naming the first header cell that misspells a column detector reads, and the column it means."""
    for name in names:
        meant = misspelt_column(name or "")
        if meant is not None and meant not in names:
            raise ScanError(manifest, f"column {name!r} is not one detector reads: {meant!r}? (a misspelt column is "
                                      "ignored without a word; column names are lower case, as data/README.md lists "
                                      "them)")


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute with `.` and `name/..` dropped as the OS goes, never lexically alone: `..` after a link
    goes up from the link's target (os.path.normpath and abspath went up from the link, naming another file), and
    after a name that is no folder it fails; both keep their `..`."""
    parts = Path(os.getcwd(), path).parts
    out = Path(parts[0])
    for part in parts[1:]:
        if part == ".." and out.name not in ("", "..") and os.path.isdir(out) and not os.path.islink(out):
            out = out.parent
        elif part != ".." or out.parent != out:   # /.. is /
            out = out / part
    return out


def on_disk(path: Path) -> Path:
    """`path` as the file system spells it where only the Unicode form of its names differs: a manifest typed on Linux
    composes ü (NFC), scans copied from a Mac keep it decomposed (NFD), and each such scan was "file not found". Each
    part that is not on disk becomes the one entry of its folder that matches it under NFC (the folders above a scan
    may be in one form and its name in the other); none, or several, leave `path` as it is: no guessing."""
    if os.path.lexists(path):
        return path
    found = Path()
    for part in Path(path).parts:
        step = found / part
        if not os.path.lexists(step):
            twin = _nfc_twin(found, part)
            if twin is None:
                return path
            step = found / twin
        found = step
    return found


def relative_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` as a dataset or export names it from the folder `root`: relative, / between folders, `..` where it lies
    outside; absolute where no relative path reaches it (another Windows drive), which a manifest reads as it is."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:
        rel = os.path.abspath(path)
    return rel.replace(os.sep, "/")


def shown(text: str | os.PathLike) -> str:
    """A path (or a text naming one) as any UTF-8 file can hold it: the bytes of a name that are not UTF-8 (a scan
    copied from a Latin-1 system, b'tr\\xfcck.tiff') escaped as \\xfc, where writing them raised UnicodeEncodeError.
    Other text is unchanged."""
    raw = os.fspath(text)
    try:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # a surrogate that no file name's byte made
        return raw.encode("utf-8", "backslashreplace").decode("utf-8")


def one_row_per_file(src: Path, entries: list[tuple[str, str, Path]]) -> None:
    """ScanError naming both when two entries of a dataset ((where: 'row 3: ' or '', the path as listed, the file it
    reaches, resolved)) reach one file: a link and its target, a linked folder, or one name in two Unicode forms
    (on_disk). Eval matched the scan's result to one of them and called the other unscored; training took the scan
    twice, in two splits a test scan it had trained on."""
    seen: dict[Path, int] = {}
    for i, (where, listed, real) in enumerate(entries):
        j = seen.setdefault(real, i)
        if j != i:
            first = entries[j][0].rstrip(": ") or "another entry"
            raise ScanError(src, f"{where}{listed} is the scan of {first} ({entries[j][1]}, both reach {shown(real)}): "
                                 "list each scan once")


def _nfc_twin(folder: Path, name: str) -> str | None:
    """The one entry of `folder` whose name equals `name` under NFC normalisation, else None (none, or several)."""
    try:
        listed = _nfc_names(os.fspath(folder), os.stat(folder).st_mtime_ns)
    except OSError:
        return None
    twins = listed.get(unicodedata.normalize("NFC", name), ())
    return twins[0] if len(twins) == 1 else None


@functools.lru_cache(maxsize=16)
def _nfc_names(folder: str, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    """A folder's entries by their NFC form, listed once per change of the folder (a manifest whose every row is in
    the other form lists its folder once, not once a row)."""
    names: dict[str, list[str]] = {}
    for name in os.listdir(folder):
        names.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    return {k: tuple(v) for k, v in names.items()}


def _native(cell: str) -> str:
    """A manifest's path as this system names it: images\\a.tiff, as a Windows tool writes it, is images/a.tiff
    elsewhere (read as one file name, each scan of such a manifest was "file not found")."""
    return cell.replace("\\", "/") if os.sep == "/" else cell


def has_labels(manifest: str | Path) -> bool:
    """Whether a manifest has the label column that makes it a truth for `detector eval` (one of tiers and risk flags
    alone routes scans, and judges none)."""
    try:
        return "label" in next(csv.reader(io.StringIO(read_text(manifest))), [])
    except (OSError, ScanError):
        return False


def label_of(row: dict, manifest: str | Path) -> int:
    """The row's label, 0 (normal) or 1 (anomalous)."""
    text = (row.get("label") or "").strip()
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    label = int(value) if value in (0.0, 1.0) else -1   # 0.9 or 1.7 is no label, not a rounded one
    if label not in (0, 1):
        raise ScanError(manifest, f"row {row['_row']}: label {text!r} is not 0 (normal) or 1 (anomalous)")
    return label


def boxes_of(row: dict, manifest: str | Path) -> list[list]:
    """The row's boxes: a JSON list of [x0, y0, x1, y1] in scan pixels ([] when the cell is empty)."""
    text = (row.get("boxes") or "").strip()
    if not text:
        return []
    try:
        boxes = json.loads(text)
        ok = isinstance(boxes, list) and all(isinstance(b, list) and len(b) == 4 and
                                             all(isinstance(v, (int, float)) for v in b) for b in boxes)
    except ValueError:
        ok = False
    if not ok:
        raise ScanError(manifest, f"row {row['_row']}: boxes {text[:60]!r} is not a JSON list of [x0, y0, x1, y1]")
    return boxes


def pitch_of(row: dict, manifest: str | Path) -> float | None:
    """The row's pitch_mm: the pixel pitch in mm of its file where the file carries none (a site whose two scanners
    write untagged PNG/TIFF into one manifest); None when the cell is empty (data.pitch_mm, --pitch-mm, the bundle's
    or 5 mm then apply). A file's own pitch still wins when the scan is read."""
    text = (row.get("pitch_mm") or "").strip()
    if not text:
        return None
    try:
        return valid_pitch(str(manifest), text)
    except ScanError:
        lo, hi = PITCH_RANGE_MM
        raise ScanError(manifest, f"row {row['_row']}: pitch_mm {text!r} is not a pixel pitch in mm ({lo:g}-{hi:g}; "
                                  "empty: the default for files without one)") from None


def layout_files(root: str | Path) -> list[tuple[Path, int, Path | None]]:
    """(scan, label, mask or None) of the plain layout: every scan file below normal/ and anomalous/, the mask
    masks/<stem>.png of an anomalous scan when it exists. A mask that two anomalous scans' stems name (site1/0001.png
    and site2/0001.png, or a.tiff and a.png) is refused: one of them would be taught the other's anomaly."""
    root = Path(root)
    out = []
    for label, sub in LAYOUT:
        for p in sorted((root / sub).rglob("*")) if (root / sub).is_dir() else []:
            if p.suffix.lower() in SCAN_SUFFIXES and p.is_file() and not p.name.startswith("."):
                mask = root / "masks" / f"{p.stem}.png"
                out.append((p, label, mask if label and mask.is_file() else None))
    _check_one_scan_per_mask(root, out)
    return out


def _check_one_scan_per_mask(root: Path, files: list[tuple[Path, int, Path | None]]) -> None:
    """ScanError naming the mask and its scans when one masks/<stem>.png is the mask of several anomalous scans."""
    scans: dict[Path, list[Path]] = {}
    for p, _, mask in files:
        if mask is not None:
            scans.setdefault(mask, []).append(p)
    for mask, ps in scans.items():
        if len(ps) > 1:
            names = ", ".join(q.relative_to(root).as_posix() for q in ps)
            raise ScanError(mask, f"one mask for {len(ps)} anomalous scans with the stem {ps[0].stem!r} ({names}): "
                                  "rename the scans so each stem is one scan, or list them in a manifest.csv with a "
                                  "mask column")


def has_layout(root: str | Path) -> bool:
    return any((Path(root) / sub).is_dir() for _, sub in LAYOUT)


def dataset_above(folder: str | Path) -> Path | None:
    """The dataset folder whose manifest.csv lists the scans in `folder` (a synthetic dataset's images/), or None."""
    folder = Path(folder)
    parent = folder.parent if folder.name not in ("", "..") else folder.resolve().parent   # "." has no name to go up
    above = parent / "manifest.csv"
    if above.is_file() and f"{folder.resolve().name}/" in above.read_text(encoding="utf-8", errors="replace"):
        return parent
    return None


def not_a_dataset(root: str | Path) -> str:
    """Why a folder with neither manifest.csv nor normal/ + anomalous/ is no dataset, and what makes it one. The
    usual cases: a folder of scans with no labels, or a dataset's images/ folder given instead of the dataset."""
    root = Path(root)
    parent = dataset_above(root)
    if parent is not None:
        return (f"no manifest.csv and no normal/ or anomalous/ folder here, but {parent / 'manifest.csv'} lists these "
                f"scans: pass the dataset folder {parent}")
    cased = sorted(f"{p.name}/" for p in root.iterdir() if p.is_dir() and p.name.lower() in dict(LAYOUT).values())
    if cased:   # on a case-sensitive file system Normal/ is no normal/
        return f"no normal/ or anomalous/ folder, but {', '.join(cased)}: the layout's folder names are lower case"
    scans = (p for p in root.rglob("*") if p.suffix.lower() in SCAN_SUFFIXES and p.is_file())
    if next(scans, None) is not None:
        return ("scans but no labels: put them in normal/ and anomalous/ sub-folders, or list them in a manifest.csv "
                "with columns path,label (data/README.md shows both layouts)")
    return "no manifest.csv and no normal/ or anomalous/ folder (data/README.md shows the layouts)"


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask PNG as (H, W), nonzero where marked, at its own bit depth: OpenCV's grey conversion divides a 16-bit
    image by 256, so a mask saved from a uint16 array (np.zeros_like(scan), 0/255 or 0/1) read as blank. Colour
    masks count a pixel marked in any colour channel (alpha is ignored, as before)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ScanError(path, f"unreadable mask PNG ({e.strerror or e})") from None
    if data.startswith(b"\x89PNG") and png_cut_short(data):
        raise ScanError(path, "corrupt or truncated mask PNG (it stops before its IEND end chunk ends: cut short, or "
                              "still being copied)")
    m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if m is None:
        raise ScanError(path, "unreadable mask PNG")
    # turned as its scan is (EXIF orientation): a JPEG or PNG mask here, a TIFF one too where OpenCV's libtiff did not
    if data.startswith(b"\xff\xd8"):
        m = orient_jpeg(m, jpeg_orientation(data))
    elif data.startswith(b"\x89PNG"):
        m = orient_jpeg(m, png_orientation(data))
    elif data[:4] in (b"II*\x00", b"MM\x00*") and not opencv_turns_tiff():
        m = orient_jpeg(m, file_view(path)[0])
    return m[..., :3].max(-1) if m.ndim == 3 else m
