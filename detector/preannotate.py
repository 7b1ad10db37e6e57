"""`detector score --coco`: the model's regions of a results CSV as a COCO JSON that labelling tools import as
pre-annotations (CVAT "COCO 1.0", Label Studio through its COCO converter), for a labeller to correct rather than
draw every box (core; no torch).

Images are the scored scans (a failed row has no regions: it is left out), named relative to `root` (SRC's folder:
see coco_root), with the width and height the readers give (header size, EXIF orientation applied: the results'
frame). Each region is an annotation of category 1 "anomaly": bbox [x, y, w, h] in those pixels, its `score`, and
what CVAT's importer requires (`id` from 1, `iscrowd`, `area`, `segmentation` []). `detector manifest` reads it back.
"""
from __future__ import annotations

import glob
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from detector import __version__
from detector.atomic import replacing
from detector.labels_to_dataset import image_size
from detector.scan import ScanError

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


def file_name(path: str, root: Path) -> str:
    """A scan's name relative to `root`, with / between folders (`..` where it lies outside; absolute where no
    relative path reaches it, another Windows drive)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:
        rel = os.path.abspath(path)
    return rel.replace(os.sep, "/")


def coco_json(rows: list[list[str]], root: Path, min_score: float | None = None) -> tuple[dict, list[str]]:
    """The COCO dict of the scored rows of a results CSV (path, ..., regions at 4, error last), and a reason for
    each scored row left out (its file cannot be sized now). Regions under `min_score` are left out of it."""
    images, annotations, left_out = [], [], []
    for row in (r for r in rows if not r[-1]):
        try:
            w, h = image_size(Path(row[0]))
        except (OSError, ScanError) as e:
            left_out.append(f"{row[0]}: {getattr(e, 'reason', None) or e}")
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name(row[0], root), "width": w, "height": h})
        for r in json.loads(row[4] or "[]"):
            if min_score is None or r["score"] >= min_score:
                annotations.append(_annotation(len(annotations) + 1, image_id, r))
    info = {"description": "detector score: the model's regions, to correct in a labelling tool",
            "version": __version__, "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "image_root": str(Path(root).resolve())}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": [CATEGORY]}, left_out


def _annotation(ann_id: int, image_id: int, region: dict) -> dict:
    """One region ({"box": [x0, y0, x1, y1], "score": s}, pixel edges) as a COCO box annotation."""
    x0, y0, x1, y1 = (int(v) for v in region["box"])
    return {"id": ann_id, "image_id": image_id, "category_id": CATEGORY["id"], "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "segmentation": [], "score": float(region["score"])}


def write_coco(rows: list[list[str]], dest: Path, root: Path, min_score: float | None = None) -> tuple[dict, list]:
    """Write the COCO JSON of `rows` to `dest` whole (atomic: a crash leaves the previous file); (coco, left_out)."""
    coco, left_out = coco_json(rows, root, min_score)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp:
        tmp.write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
    return coco, left_out
