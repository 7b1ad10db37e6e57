"""The `manifest` verb: a labelling tool's export (detector.annotations) written as a dataset folder, manifest.csv and
masks/ for polygons and RLE, that `train --data`, `eval --truth` and `score` read as they are (core; no torch).

Each image is checked against its file as the readers see it (size from the header, EXIF orientation applied); an
image that cannot be placed (missing, unreadable, another size, a shape far outside it, a malformed entry) is left
out with its reason, and the others are converted. Images beside the listed ones that the export does not list are
left out too: nobody said they are normal."""
from __future__ import annotations

import csv
import io
import math
import re
import struct
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from detector.annotations import FORMATS, Annotated, Export, Shape, decode_rle
from detector.atomic import replacing
from detector.audit_report import is_audit_log
from detector.export_splits import read_parts
from detector.formats import file_geometry
from detector.manifest import SPLIT_ALIASES, relative_name, shown
from detector.scan import SCAN_SUFFIXES, ScanError, file_shape, read_scan

SLACK = 0.02        # a shape may pass the edge by this share of the side (at least 2 px): clipped; more: refused
SHOWN = 20          # left-out images named on the terminal (all of them in left_out.csv)
MARK = b"Software\x00detector manifest"   # in each mask's PNG: the masks --force may clear
RENDERING = b"Software\x00detector score --coco-images"   # in each 8-bit rendering: never a scan to train on
NEXT = "detector train --config configs/quick.yaml --data {out} --out runs/mine"


@dataclass
class Summary:
    fmt: str
    rows: list[dict] = field(default_factory=list)
    left_out: list[tuple[str, str, str]] = field(default_factory=list)   # (file, kind, why)
    unlisted: list[Path] = field(default_factory=list)
    ignored_shapes: int = 0
    notes: list[str] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)   # --append: the rows the dataset had, as they were
    split_from: str = ""                             # what the split column says: "--split", "the export's folders"

    def line(self, src: str, out: Path) -> str:
        """The one-line summary of the conversion."""
        anomalous = [r for r in self.rows if r["label"] == 1]
        masks = sum(1 for r in anomalous if r["mask"])
        kinds = ", ".join(f"{n} {k}" for k, n in Counter(k for _, k, _ in self.left_out).most_common())
        return (f"{FORMATS[self.fmt]} {src}: {len(self.rows)} images ({len(self.rows) - len(anomalous)} normal, "
                f"{len(anomalous)} anomalous: {len(anomalous) - masks} with boxes, {masks} with masks); left out: "
                f"{len(self.left_out)} listed{f' ({kinds})' if kinds else ''}, {len(self.unlisted)} not in the "
                f"export; {self.ignored_shapes} shape(s) of other classes ignored{self._splits()}"
                f"{f', added to {len(self.kept)} rows there' if self.kept else ''} -> {out / 'manifest.csv'}")

    def _splits(self) -> str:
        """How many rows of each split, and where the split came from ("" with no split column)."""
        n = Counter(r.get("split", "") for r in self.rows)
        return f"; split ({self.split_from}): {', '.join(f'{n[k]} {k}' for k in sorted(n))}" if any(n) else ""


def convert(src: str | Path, out: str | Path, images: str | Path | None = None, fmt: str | None = None,
            split: str | None = None, classes: list[str] | None = None, force: bool = False,
            append: bool = False) -> Summary:
    """Write the export at `src` as the dataset folder `out` (manifest.csv, masks/, left_out.csv); `append`: add its
    rows to the manifest.csv there."""
    out = Path(out)
    if (out / "manifest.csv").exists() and not (force or append):
        raise ScanError(out / "manifest.csv", "exists: pass --force to replace it, --append to add to it, or another "
                                              "--out")
    if split is not None and split.strip().lower() not in SPLIT_ALIASES:
        raise ScanError(src, f"--split {split!r} is not one of {', '.join(sorted(SPLIT_ALIASES))}")
    parts = read_parts(src, fmt)
    _check_classes(Export("", [], set().union(*(e.categories for _, e in parts)), []), classes, src)
    if images and not Path(images).is_dir():
        raise ScanError(images, "no such --images folder")
    summary = Summary(parts[0][1].fmt, notes=[n for _, e in parts for n in e.notes])
    summary.split_from = "--split" if split else "the export's folders" if parts[0][0] else ""
    kept, stale = _existing(out, append)
    used, names, listed = _taken(out, kept, stale)
    summary.kept = [{k: v for k, v in r.items() if not k.startswith("_")} for r in kept]
    found = [(part, im, *_locate(im, [Path(images)] if images else e.roots, bool(images)))
             for part, e in parts for im in e.images]
    claims = _claims(found)
    for part, im, path, missing in found:
        listed |= {path.resolve()} if path else set()
        why = missing or _contested(path, claims) or _row(im, path, out, summary, used, names, classes)
        if why:
            summary.left_out.append((shown(path or Path(im.base, im.file)), *why))
        elif split or part:
            summary.rows[-1]["split"] = SPLIT_ALIASES[(split or part).strip().lower()]
    summary.unlisted = _unlisted(images, listed, out)
    if not summary.rows:
        raise ScanError(src, f"no image of the export could be used ({len(summary.left_out)} left out: "
                             f"{'; '.join(f'{f}: {w}' for f, _, w in summary.left_out[:3]) or 'none listed'})")
    _write(out, summary)
    _clear(out, stale - {r["mask"] for r in summary.rows})
    return summary


def _claims(found: list[tuple]) -> dict[Path, list[str]]:
    """For each image file found, the different names of the export that reached it (a name listed twice is one)."""
    claims: dict[Path, dict[tuple, str]] = {}
    for _, im, path, _ in found:
        if path is not None:
            key = (im.base, PurePosixPath(im.file.replace("\\", "/")))
            claims.setdefault(path.resolve(), {}).setdefault(key, im.file)
    return {p: list(names.values()) for p, names in claims.items()}


def _contested(path: Path | None, claims: dict[Path, list[str]]) -> tuple[str, str] | None:
    """(kind, why) where different names reached the file (two trucks' s0.tiff uploaded from two folders, both found
    as --images' s0.tiff): which truck it is is unknown, so none of them labels it."""
    names = claims.get(path.resolve(), []) if path else []
    if len(names) < 2:
        return None
    return "ambiguous", (f"{len(names)} different names of the export ({', '.join(names)}) reach this one file: which "
                         f"of them it is is unknown; give --images the folders that tell them apart")


def _existing(out: Path, append: bool) -> tuple[list[dict], set[str]]:
    """The rows of the manifest.csv at `out` that --append keeps (each with its `_row`), and the masks a replaced one
    names that this verb wrote (masks/NAME.png marked as its own): stale unless this run writes them again."""
    path = out / "manifest.csv"
    if not path.is_file():
        return [], set()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [{**r, "_row": n} for n, r in enumerate(csv.DictReader(f), start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        if append:
            raise ScanError(path, f"unreadable, cannot add to it ({e})") from None
        return [], set()
    if append:
        return rows, set()
    named = {r.get("mask") or "" for r in rows}
    return [], {m for m in named if re.fullmatch(r"masks/[^/\\]+\.png", m) and _ours(out / m)}


def _taken(out: Path, kept: list[dict], stale: set[str]) -> tuple[dict, set[str], set[Path]]:
    """What the new rows must not take: the kept rows' files (-> where they are listed), the mask names on disk (a
    user's own mask, another run's) but the stale ones, and the kept files as listed (not 'unlisted')."""
    used = {(out / r["path"]).resolve(): f"{out / 'manifest.csv'} row {r['_row']}" for r in kept if r.get("path")}
    names = {p.name for p in (out / "masks").glob("*")} - {Path(m).name for m in stale}
    return used, names, set(used)


def _ours(mask: Path) -> bool:
    """Whether the PNG at `mask` is one this verb wrote (its MARK chunk)."""
    return _has_mark(mask, MARK)


def _has_mark(path: Path, mark: bytes) -> bool:
    """Whether the PNG at `path` carries `mark` (marked's tEXt chunk, right after its header); False if unreadable."""
    try:
        with open(path, "rb") as f:
            return mark in f.read(256)
    except OSError:
        return False


def _clear(out: Path, stale: set[str]) -> None:
    """Remove the masks an earlier run of this verb wrote that the manifest now written names no more."""
    for m in sorted(stale):
        (out / m).unlink(missing_ok=True)


def _check_classes(export: Export, classes: list[str] | None, src) -> None:
    """ScanError naming a --classes name the export has no category of: a typo would make every image normal."""
    unknown = [c for c in classes or [] if c not in export.categories]
    if unknown:
        raise ScanError(src, f"--classes {', '.join(unknown)}: no such category in the export (it has "
                             f"{', '.join(sorted(export.categories)) or 'none'})")


def _locate(im: Annotated, roots: list[Path], given: bool) -> tuple[Path | None, tuple[str, str] | None]:
    """The image file an entry names: under the export's own folder (by its name, then its file name alone: LabelMe's
    imagePath from another machine) unless --images is given, then each root, by its name as given, its file name
    alone and that without Label Studio's upload prefix (HASH-name.tiff: the original's name), the file name alone only
    where the name's folder is not there (_by_name); a name without a scan
    suffix (YOLO's stems) with each suffix. A PNG that is not there, or is an 8-bit rendering (score --coco-images),
    stands for its original scan (originals). None and (kind, why) where only a rendering or two originals are found."""
    name = Path(im.file.replace("\\", "/"))
    bare = _without_upload_hash(name)
    tries = ([] if given else [im.base / name, *_by_name(im.base, name)])
    tries += [p for r in roots for p in (r / name, *_by_name(r, name, bare))]
    drawn = None
    for p in tries:
        suffixes = [""] if p.suffix.lower() in SCAN_SUFFIXES else [s for x in SCAN_SUFFIXES for s in (x, x.upper())]
        for q in (p.with_name(p.name + s) for s in suffixes):
            if q.is_file() and not is_rendering(q):
                return q, None
            found = originals(q) if p.suffix.lower() == ".png" else []   # a name given as .png, not a YOLO stem
            if len(found) > 1:
                return None, ("ambiguous", f"{shown(q)} may stand for {' or '.join(map(shown, found))}: rename one")
            if found:
                return found[0], None
            drawn = drawn or (q if q.is_file() else None)
    if drawn:
        return None, ("rendering", f"{shown(drawn)} is an 8-bit picture drawn by score --coco-images, not a scan, and "
                                   "no scan of its name is there: --images names the original scans' folder")
    return None, None


def _without_upload_hash(name: Path) -> str:
    """The file name without Label Studio's upload prefix (HASH-name: 8 hex digits of a uuid4); an all-digit prefix
    (a scanner's date, 20240101-0001.tiff) is one only in Label Studio's upload folder, else the name is its own."""
    hashed = r"[0-9a-f]{8}-" if "upload" in name.parts[:-1] else r"(?=[0-9]*[a-f])[0-9a-f]{8}-"
    return re.sub("^" + hashed, "", name.name)


def _by_name(root: Path, name: Path, *others: str) -> list[Path]:
    """`name`'s file name alone (and `others`) in `root`, where its folder is not there (another machine's, a tool's
    upload folder); none where it is: the file missing there is missing, never another truck's scan of that name."""
    if name.parent != Path(".") and (root / name.parent).is_dir():
        return []
    return [root / n for n in (name.name, *others)]


def originals(png: Path) -> list[Path]:
    """The scans a rendering named `png` stands for (score --coco-images names sub/a.tiff's sub/a.png, or a.tiff.png
    where two scans shared the stem): the scan files of its name with another scan suffix, or without .png."""
    inner = png.with_name(png.name[:-4])
    names = [inner] if inner.suffix.lower() in SCAN_SUFFIXES else \
        [inner.with_name(inner.name + s) for x in SCAN_SUFFIXES if x != ".png" for s in dict.fromkeys((x, x.upper()))]
    found: dict[tuple[int, int], Path] = {}
    for q in names:
        try:
            st = q.stat()   # one file under two spellings (x.tiff, x.TIFF on a case-blind disk) is one original
        except OSError:
            continue
        if q.is_file() and not is_rendering(q):
            found.setdefault((st.st_dev, st.st_ino), q)
    return list(found.values())


def is_rendering(path: Path) -> bool:
    """Whether the file at `path` is an 8-bit picture of a scan drawn by score --coco-images (its RENDERING mark)."""
    return _has_mark(path, RENDERING)


def _row(im: Annotated, path: Path | None, out: Path, summary: Summary, used: dict, names: set,
         classes: list[str] | None) -> tuple[str, str] | None:
    """Add the image's manifest row to the summary; (kind, why) where it is left out."""
    if im.problem:
        return "malformed", f"{shown(im.source)}: {im.problem}"
    if path is None:
        return "missing image", f"no such image file (listed in {shown(im.source)}; --images names their folder)"
    real = path.resolve()
    if real in used:
        return "listed again", f"listed again in {shown(im.source)} (first in {shown(used[real])})"
    try:
        w, h = image_size(path)
    except ScanError as e:
        return "unreadable", e.reason
    if im.size is not None and tuple(im.size) != (w, h):
        turned = " (turned by a quarter: its EXIF orientation, which the tool did not apply)" if im.size == (h, w) \
            else ""
        return "size mismatch", (f"{shown(im.source)} says {im.size[0]}x{im.size[1]}, the image is {w}x{h} as "
                                 f"read{turned}")
    kept = [_scaled(s, w, h) for s in im.shapes if classes is None or s.category in classes]
    summary.ignored_shapes += len(im.shapes) - len(kept)
    try:
        boxes = [_box_in(s, w, h) for s in kept]
    except ValueError as e:
        return "outside the image", f"{shown(im.source)}: {e}"
    used[real] = im.source
    mask = _write_mask(out, path, kept, boxes, w, h, names) if any(s.box is None for s in kept) else ""
    summary.rows.append({"path": relative_name(real, out.resolve()), "label": int(bool(kept)),
                         "mask": mask, "boxes": str(boxes).replace(" ", "") if boxes else "",
                         "anomaly_type": "+".join(sorted({s.category for s in kept})) or "none"})
    return None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the picture the readers give (turned by its orientation): from the header, else read."""
    g = file_geometry(path)
    if g is not None:
        return g.file_width, g.file_height
    h, w = file_shape(read_scan(path))
    return w, h


def _scaled(s: Shape, w: int, h: int) -> Shape:
    """A shape in pixels: a normalised one (YOLO) scaled by the image's size."""
    if not s.normalised:
        return s
    box = None if s.box is None else (s.box[0] * w, s.box[1] * h, s.box[2] * w, s.box[3] * h)
    return Shape(s.category, box, [p * (w, h) for p in s.polygons])


def _box_in(s: Shape, w: int, h: int) -> list[int]:
    """The shape's box in whole pixels (outward; 0.01 px of rounding forgiven) clipped to the image; ValueError where
    the shape lies further outside than SLACK, covers no pixel, or is an RLE of another size."""
    if s.rle is not None and [int(v) for v in s.rle["size"]] != [h, w]:
        raise ValueError(f"{s.category} RLE of size {s.rle['size'][1]}x{s.rle['size'][0]} on a {w}x{h} image")
    x0, y0, x1, y1 = (float(v) for v in s.bounds())
    sx, sy = max(2.0, SLACK * w), max(2.0, SLACK * h)
    rounded = [round(v, 2) for v in (x0, y0, x1, y1)]
    if x0 < -sx or y0 < -sy or x1 > w + sx or y1 > h + sy:
        raise ValueError(f"{s.category} shape {rounded} lies outside the {w}x{h} image")
    box = [max(0, math.floor(x0 + 0.01)), max(0, math.floor(y0 + 0.01)),
           min(w, math.ceil(x1 - 0.01)), min(h, math.ceil(y1 - 0.01))]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{s.category} shape {rounded} covers no pixel of the {w}x{h} image")
    return box


def draw_mask(shapes: list[Shape], boxes: list[list[int]], w: int, h: int) -> np.ndarray:
    """(h, w) uint8 0/255: each polygon's pixels whose centre lies inside it, each RLE's marked pixels, each box."""
    m = np.zeros((h, w), bool)
    for s, (x0, y0, x1, y1) in zip(shapes, boxes):
        if s.rle is not None:
            m |= decode_rle(s.rle)
        elif s.polygons:
            for poly in s.polygons:
                m[y0:y1, x0:x1] |= _inside(poly, x0, y0, x1, y1)
        else:
            m[y0:y1, x0:x1] = True
    return m.astype(np.uint8) * 255


def _inside(poly: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Which pixels of the window [x0, x1) x [y0, y1) have their centre inside the polygon."""
    from matplotlib.path import Path as Outline   # imported when a polygon is drawn: most exports are boxes
    gy, gx = np.mgrid[y0:y1, x0:x1]
    return Outline(poly).contains_points(np.c_[gx.ravel() + 0.5, gy.ravel() + 0.5]).reshape(gy.shape)


def _write_mask(out: Path, image: Path, shapes: list[Shape], boxes: list[list[int]], w: int, h: int,
                names: set) -> str:
    """Write masks/<stem>.png (a -2, -3 ... where another image took the stem); its path in the manifest."""
    stem, n = image.stem, 1
    while f"{stem}.png" in names:
        n += 1
        stem = f"{image.stem}-{n}"
    names.add(f"{stem}.png")
    ok, png = cv2.imencode(".png", draw_mask(shapes, boxes, w, h))
    (out / "masks").mkdir(parents=True, exist_ok=True)
    with replacing(out / "masks" / f"{stem}.png") as tmp:
        tmp.write_bytes(marked(png.tobytes()))
    return f"masks/{stem}.png"


def marked(png: bytes, mark: bytes = MARK) -> bytes:
    """The PNG with a tEXt chunk after its header saying who wrote it: this verb (--force then clears only its own
    masks), or score --coco-images (RENDERING: this verb never takes the picture for the scan)."""
    chunk = b"tEXt" + mark
    return png[:33] + struct.pack(">I", len(mark)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def _unlisted(images: str | Path | None, listed: set[Path], out: Path) -> list[Path]:
    """Scan files the export does not list: below --images, else beside the listed ones (its masks/ and the PNGs
    score --coco-images drew there aside: pictures of the listed scans, no scans)."""
    folders = [(Path(images), True)] if images else [(f, False) for f in {p.parent for p in listed}]
    found = {p.resolve() for f, deep in folders for p in (f.rglob("*") if deep else f.glob("*"))
             if p.suffix.lower() in SCAN_SUFFIXES and p.is_file() and not p.name.startswith(".")
             and not (p.suffix.lower() == ".png" and is_rendering(p))}
    masks = (out / "masks").resolve()
    return sorted(p for p in found - listed if masks not in p.parents)


def _write(out: Path, summary: Summary) -> None:
    """manifest.csv, the kept rows and then the new ones (and left_out.csv, where anything was left out), each
    written whole; a split column where any row has a split."""
    rows = summary.kept + summary.rows
    cols = ["path", "label", "mask", "boxes", "anomaly_type"] + (["split"] if any(r.get("split") for r in rows) else [])
    cols += [k for k in dict.fromkeys(k for r in summary.kept for k in r) if k not in cols]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "manifest.csv", cols, rows)
    left = _csv_rows(out / "left_out.csv") if summary.kept else []
    left += [{"file": f, "reason": f"{k}: {w}"} for f, k, w in summary.left_out]
    left += [{"file": shown(p), "reason": "not in the export"} for p in summary.unlisted]
    write_left_out(out, left)


def write_left_out(out: Path, rows: list[dict]) -> None:
    """DATASET/left_out.csv (file, reason) of what a conversion left out; none where nothing was (an earlier one's
    removed, so it never describes another run)."""
    if rows:
        _write_csv(out / "left_out.csv", ["file", "reason"], rows)
    else:
        (out / "left_out.csv").unlink(missing_ok=True)


def _csv_rows(path: Path) -> list[dict]:
    """The rows of a CSV this verb wrote, [] where there is none."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with replacing(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def main(args) -> int:
    """CLI entry: convert, name what was left out, print the summary and the next command."""
    if args.since or args.until or is_audit_log(args.src):   # a station's verified trucks: detector.audit_dataset
        from detector.audit_dataset import main as from_audit_log
        return from_audit_log(args)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        s = convert(args.src, args.out, args.images, args.format, args.split, classes, args.force, args.append)
    except (ScanError, OSError) as e:
        print(f"detector manifest: {e}", file=sys.stderr)
        return 2
    for note in s.notes:
        print(f"note: {note}", file=sys.stderr)
    for f, kind, why in s.left_out[:SHOWN]:
        print(f"warning: {f}: left out, {kind}: {why}", file=sys.stderr)
    more = len(s.left_out) - SHOWN
    if more > 0 or s.unlisted:
        extra = f"{more} more left out, " if more > 0 else ""
        print(f"warning: {extra}{len(s.unlisted)} image(s) not in the export left out (e.g. "
              f"{shown(s.unlisted[0]) if s.unlisted else '-'}): all in {Path(args.out) / 'left_out.csv'}",
              file=sys.stderr)
    print(s.line(args.src, Path(args.out)))
    print(f"next: {NEXT.format(out=args.out)}")
    return 0
