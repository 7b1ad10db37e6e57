"""`detector score --coco`: the model's regions of a results CSV as a COCO JSON that labelling tools import as
pre-annotations (CVAT "COCO 1.0", Label Studio through its COCO converter), for a labeller to correct rather than
draw every box (core; no torch).

Images are the scored scans (a failed row has no regions: it is left out), named relative to `root` (SRC's folder:
see coco_root), with the width and height the readers give (header size, EXIF orientation applied: the results'
frame). Each region is an annotation of category 1 "anomaly": bbox [x, y, w, h] in those pixels, its `score`, and
what CVAT's importer requires (`id` from 1, `iscrowd`, `area`, `segmentation` []). `detector manifest` reads it back.

With `images_dir` (--coco-images DIR) each image is also drawn as an 8-bit grey PNG there, at the file's own pixel size,
and named by it: the tools show 8-bit pictures, and a 16-bit scan there was black, white or not shown at all. The PNG
carries a mark (labels_to_dataset.RENDERING), so `detector manifest` takes the original scan for it, never it.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from detector import __version__
from detector.atomic import replacing
from detector.labels_to_dataset import RENDERING, image_size, is_rendering, marked
from detector.manifest import relative_name
from detector.report import window
from detector.scan import SCAN_SUFFIXES, ScanError, file_shape, read_scan

CATEGORY = {"id": 1, "name": "anomaly", "supercategory": ""}


def coco_root(src: str) -> Path:
    """The folder the COCO file names are relative to: SRC itself when it is a folder, the folder of a manifest,
    list or single scan, else the folder before a glob's first wildcard (`day/*/x.tiff` -> day)."""
    p = Path(src)
    if p.is_dir():
        return p
    if p.is_file() or not glob.has_magic(src):
        return p.parent
    fixed = []
    for part in p.parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def coco_json(rows: list[list[str]], root: Path, min_score: float | None = None,
              images_dir: Path | None = None) -> tuple[dict, list[str]]:
    """The COCO dict of the scored rows of a results CSV (path, ..., regions at 4, error last), and a reason for
    each scored row left out (its file cannot be sized, or with `images_dir` drawn, now). Regions under `min_score`
    are left out of it. With `images_dir` the names are the renderings' there (rendering_names), drawn now."""
    scored = [r for r in rows if not r[-1]]
    names = rendering_names([r[0] for r in scored], root) if images_dir else {}
    inputs = {Path(r[0]).resolve() for r in rows} if images_dir else set()
    images, annotations, left_out = [], [], []
    for row in _drawing(scored, images_dir):
        try:
            w, h = image_size(Path(row[0]))
            name = relative_name(row[0], root)
            if images_dir:
                name = names[row[0]]
                draw_rendering(Path(row[0]), Path(images_dir) / name, (w, h), inputs)
        except (OSError, ScanError) as e:
            left_out.append(f"{row[0]}: {getattr(e, 'reason', None) or e}")
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for r in json.loads(row[4] or "[]"):
            if min_score is None or r["score"] >= min_score:
                annotations.append(_annotation(len(annotations) + 1, image_id, r))
    info = {"description": "detector score: the model's regions, to correct in a labelling tool",
            "version": __version__, "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "image_root": str(Path(images_dir or root).resolve())}
    if images_dir:
        info["scans_root"] = str(Path(root).resolve())   # where `detector manifest --images` finds the originals
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": [CATEGORY]}, left_out


def _drawing(rows: list[list[str]], images_dir: Path | None):
    """The rows, under a progress bar where each is drawn (a second read of every scan: minutes on an archive)."""
    if not images_dir:
        return rows
    from tqdm import tqdm
    return tqdm(rows, unit="scan", desc=f"drawing PNGs in {images_dir}", disable=None, file=sys.stderr)


def _annotation(ann_id: int, image_id: int, region: dict) -> dict:
    """One region ({"box": [x0, y0, x1, y1], "score": s}, pixel edges) as a COCO box annotation."""
    x0, y0, x1, y1 = (int(v) for v in region["box"])
    return {"id": ann_id, "image_id": image_id, "category_id": CATEGORY["id"], "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "segmentation": [], "score": float(region["score"])}


def write_coco(rows: list[list[str]], dest: Path, root: Path, min_score: float | None = None,
               images_dir: Path | None = None) -> tuple[dict, list]:
    """Write the COCO JSON of `rows` to `dest` whole (atomic: a crash leaves the previous file), and with
    `images_dir` the scans' renderings there; (coco, left_out)."""
    coco, left_out = coco_json(rows, root, min_score, images_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp:
        tmp.write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
    return coco, left_out


# ---------------------------------------------------------------- --coco-images: scans a labeller can see


def rendering_names(paths: list[str], root: Path) -> dict[str, str]:
    """Each scan's rendering below --coco-images: its name relative to `root` with .png for its suffix (sub/a.tiff
    -> sub/a.png), a `..` as `_up_` (kept inside the folder). A scan with another of its stem beside it (a.tiff and
    a.npy or a.png, scored or not) keeps its whole name (a.tiff.png), as do two scans that would take one name:
    `detector manifest` takes a.png for the scan a.png, else the one scan a.*, and a.tiff.png for a.tiff."""
    rel = {p: _inside(relative_name(p, root)) for p in paths}
    short = {p: str(r.with_suffix(".png")) for p, r in rel.items()}
    seen = Counter(short.values())
    return {p: n if seen[n] == 1 and _alone(Path(p)) else str(rel[p].with_name(rel[p].name + ".png"))
            for p, n in short.items()}


def _alone(scan: Path) -> bool:
    """Whether `scan` is the only scan file of its stem in its folder (x.tiff with no x.png, x.npy, x.dcm ...)."""
    for s in SCAN_SUFFIXES:
        for q in {scan.with_suffix(s), scan.with_suffix(s.upper())}:
            try:
                if q.is_file() and not os.path.samefile(q, scan):
                    return False
            except OSError:
                continue
    return True


def _inside(name: str) -> PurePosixPath:
    """A COCO file name as a path inside the renderings' folder: `..` as `_up_`, an absolute one by its name."""
    p = PurePosixPath(name)
    return PurePosixPath(p.name) if p.is_absolute() or ":" in p.parts[0] else \
        PurePosixPath(*("_up_" if part == ".." else part for part in p.parts))


def rendering(path: Path) -> np.ndarray:
    """uint8 (H, W) picture of a scan as an overlay shows it to an officer (report.window of the high-energy
    attenuation: air bright, dense cargo dark, log-curved so light cargo keeps its contrast), at the file's own pixel
    size (the frame of the results' regions: a line scanner's non-square pixels unsquared, EXIF orientation applied)."""
    scan = read_scan(path)
    h, w = file_shape(scan)
    att = scan.attenuation[0]
    if att.shape != (h, w):
        att = cv2.resize(att, (w, h), interpolation=cv2.INTER_LINEAR)
    return window(att)


def draw_rendering(scan: Path, dest: Path, size: tuple[int, int], inputs: set[Path]) -> None:
    """Write `scan`'s rendering at `dest` (marked as one), unless one drawn since the scan last changed is there (a
    resumed run); ScanError where it would replace an input scan or is not `size` (width, height) as the COCO says."""
    if dest.resolve() in inputs:
        raise ScanError(dest, f"the rendering of {scan} would replace this scan: give --coco-images a folder apart")
    if dest.is_file() and is_rendering(dest) and dest.stat().st_mtime >= scan.stat().st_mtime:
        return
    img = rendering(scan)
    if (img.shape[1], img.shape[0]) != tuple(size):
        raise ScanError(scan, f"reads as {img.shape[1]}x{img.shape[0]}, its header says {size[0]}x{size[1]}")
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"could not encode {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp:
        tmp.write_bytes(marked(png.tobytes(), RENDERING))
