"""Labelling tools' exports read into one record per image (core; no torch): COCO JSON (CVAT, Label Studio, Roboflow),
Pascal VOC XML, LabelMe JSON, YOLO txt and CVAT for images 1.1 XML.

Shapes come out in the manifest's convention: pixel edges, [x0, y0] the first pixel's corner and [x1, y1] one past the
last, in the pixels of the picture the tool showed (the file as read, turned by its EXIF orientation). Each reader
converts its own convention to that (VOC's 1-based inclusive corners, YOLO's normalised centres); a malformed entry
makes its image's `problem`, a malformed export as a whole is a ScanError naming the file and the reason.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from detector.scan import ScanError

FORMATS = {"coco": "COCO JSON", "voc": "Pascal VOC XML", "labelme": "LabelMe JSON", "yolo": "YOLO txt",
           "cvat": "CVAT XML"}


@dataclass
class Shape:
    """One labelled region: a box, polygons (each (N, 2) x, y) or a COCO RLE; `normalised`: in fractions of the
    image's width and height (YOLO), scaled once the image's size is known."""

    category: str
    box: tuple[float, float, float, float] | None = None
    polygons: list[np.ndarray] = field(default_factory=list)
    rle: dict | None = None
    normalised: bool = False

    def bounds(self) -> tuple[float, float, float, float]:
        """[x0, y0, x1, y1] around the shape (an RLE's marked pixels; (0, 0, 0, 0) where it marks none)."""
        if self.box is not None:
            return self.box
        if self.polygons:
            xy = np.concatenate(self.polygons)
            return (*xy.min(0).tolist(), *xy.max(0).tolist())
        ys, xs = np.nonzero(decode_rle(self.rle))
        return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, 0, 0)


@dataclass
class Annotated:
    """One image of an export: its name as the export gives it (relative to `base`), the (width, height) the export
    gives (None: none), its shapes, and why it cannot be used (a malformed entry) or ""."""

    file: str
    base: Path
    source: Path
    size: tuple[int, int] | None
    shapes: list[Shape] = field(default_factory=list)
    problem: str = ""


@dataclass
class Export:
    """A whole export: its format, images, every category it names, the folders its image names may be relative to
    (tried in order when no --images is given) and notes on what it holds that no image takes."""

    fmt: str
    images: list[Annotated]
    categories: set[str]
    roots: list[Path]
    notes: list[str] = field(default_factory=list)


def read_export(src: str | Path, fmt: str | None = None) -> Export:
    """The export at `src` (a file or a folder), its format detected unless `fmt` names it."""
    src = Path(src)
    if not src.exists():
        raise ScanError(src, "no such export file or folder")
    fmt = fmt or detect_format(src)
    return {"coco": read_coco, "voc": read_voc, "labelme": read_labelme, "yolo": read_yolo,
            "cvat": read_cvat}[fmt](_coco_file(src) if fmt == "coco" else src)


def detect_format(src: Path) -> str:
    """Which tool format `src` holds, from its files' content: a COCO JSON has images and annotations, a LabelMe
    JSON shapes, a CVAT XML <annotations>, a VOC XML <annotation>; YOLO is a folder of .txt label files."""
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for p in (p for p in files if p.suffix.lower() == ".json"):
        head = p.read_bytes()[:1 << 16]
        if b'"annotations"' in head and b'"images"' in head:
            return "coco"
        if b'"shapes"' in head:
            return "labelme"
    for p in (p for p in files if p.suffix.lower() == ".xml"):
        head = p.read_bytes()[:4096]
        if b"<annotations" in head:
            return "cvat"
        if b"<annotation" in head:
            return "voc"
    if any(p.suffix.lower() == ".txt" and p.name != "classes.txt" for p in files):
        return "yolo"
    raise ScanError(src, "no COCO or LabelMe JSON, VOC or CVAT XML or YOLO .txt labels here (--format names one)")


def _coco_file(src: Path) -> Path:
    """The COCO JSON of `src`: the file, or the one COCO JSON of a folder (Roboflow's _annotations.coco.json)."""
    if src.is_file():
        return src
    found = [p for p in sorted(src.rglob("*.json")) if b'"annotations"' in p.read_bytes()[:1 << 16]]
    if len(found) != 1:
        raise ScanError(src, f"{len(found) or 'no'} COCO JSON files here: pass the one to convert")
    return found[0]


def _json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ScanError(path, f"malformed JSON ({e})") from None


def _xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise ScanError(path, f"malformed XML ({e})") from None


def _size(width, height) -> tuple[int, int] | None:
    """(width, height) an export gives, None where it gives none (VOC's 0 x 0 from some tools)."""
    w, h = int(float(width or 0)), int(float(height or 0))
    return (w, h) if w > 0 and h > 0 else None


def _polygon(flat) -> np.ndarray:
    """A flat [x, y, x, y, ...] polygon as (N, 2); ValueError below three points."""
    xy = np.asarray(flat, dtype=np.float64)
    if xy.ndim != 1 or len(xy) < 6 or len(xy) % 2 or not np.isfinite(xy).all():
        raise ValueError(f"polygon {list(flat)[:8]} is not x, y pairs of three points or more")
    return xy.reshape(-1, 2)


def _box(x0, y0, x1, y1) -> tuple[float, float, float, float]:
    """A box from two corners in any order; ValueError where a value is no number."""
    x0, y0, x1, y1 = (float(v) for v in (x0, y0, x1, y1))
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {[x0, y0, x1, y1]} is not four numbers")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


# ---------------------------------------------------------------- COCO


def read_coco(path: Path) -> Export:
    """A COCO JSON: bbox [x, y, w, h], segmentation polygons or RLE (crowd regions too: they mark anomalous pixels)."""
    data = _json(path)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise ScanError(path, "not a COCO export: no 'images' and 'annotations' lists")
    cats = {c.get("id"): str(c.get("name")) for c in data.get("categories") or [] if isinstance(c, dict)}
    cats = _without_group_rows(data, cats)
    images: dict = {}
    out = Export("coco", [], set(cats.values()), [path.parent, path.parent / "images", path.parent.parent / "images"])
    for i, im in enumerate(data["images"]):
        try:
            images[im["id"]] = Annotated(str(im["file_name"]), path.parent, path, _size(im.get("width"),
                                                                                        im.get("height")))
        except (KeyError, TypeError, ValueError):
            out.notes.append(f"images[{i}] has no id and file_name: left out")
    orphans = 0
    for a in data["annotations"]:
        im = images.get(a.get("image_id")) if isinstance(a, dict) else None
        if im is None:
            orphans += 1
            continue
        try:
            im.shapes.append(_coco_shape(a, cats))
        except (KeyError, TypeError, ValueError) as e:
            im.problem = im.problem or f"annotation {a.get('id')}: {e}"
    if orphans:
        out.notes.append(f"{orphans} annotation(s) of no listed image: ignored")
    out.images = list(images.values())
    return out


def _without_group_rows(data: dict, cats: dict) -> dict:
    """`cats` less Roboflow's dataset-name row (category 0 "contraband", the supercategory of every real class): no
    annotation uses it, and `--classes contraband` accepted it and then matched no shape, so every image was normal."""
    used = {a.get("category_id") for a in data["annotations"] if isinstance(a, dict)}
    groups = {str(c.get("supercategory")) for c in data.get("categories") or []   # of another class, not its own
              if isinstance(c, dict) and c.get("supercategory") != c.get("name")}
    return {k: v for k, v in cats.items() if k in used or v not in groups}


def _coco_shape(a: dict, cats: dict) -> Shape:
    """One COCO annotation as a Shape: its segmentation where it has one, else its bbox."""
    if a["category_id"] not in cats:
        raise ValueError(f"category_id {a['category_id']} is not in the export's categories")
    seg, name = a.get("segmentation"), cats[a["category_id"]]
    if isinstance(seg, dict):
        decode_rle(seg)   # malformed: the image's problem now, not a crash when its mask is drawn
        return Shape(name, rle=seg)
    if seg:
        return Shape(name, polygons=[_polygon(p) for p in seg])
    x, y, w, h = (float(v) for v in a["bbox"])
    return Shape(name, box=_box(x, y, x + w, y + h))


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE ({"size": [h, w], "counts": a list of run lengths or COCO's compressed string}) as an (h, w) bool
    mask: runs alternate unmarked, marked, starting unmarked, down the columns (Fortran order)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = np.asarray(_rle_from_string(counts) if isinstance(counts, str) else counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any() or runs.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(runs.sum())}, not the {h}x{w} = {h * w} pixels of its size")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape((h, w), order="F")


def _rle_from_string(s: str) -> list[int]:
    """COCO's compressed RLE string (pycocotools' rleFrString): each count in 5-bit groups, char - 48, 0x20 marks
    more groups, 0x10 in the last group the sign; from the fourth count (index 3) on, each is stored less the count
    two back."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("compressed RLE string ends inside a count")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more, p, k = bool(c & 0x20), p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


# ---------------------------------------------------------------- Pascal VOC, CVAT


def read_voc(src: Path) -> Export:
    """Pascal VOC XML, one file per image (a folder of them, its Annotations/, or one file): <bndbox> corners are
    1-based and inclusive, so pixel xmin..xmax is [xmin - 1, xmax) in pixel edges."""
    files = [src] if src.is_file() else sorted(src.rglob("*.xml"))
    root = src.parent if src.is_file() else src
    return _per_file(Export("voc", [], set(), [root / "JPEGImages", root / "images", root,
                                                root.parent / "JPEGImages", root.parent / "images"]), files, _voc_image)


def _per_file(out: Export, files: list[Path], read_one) -> Export:
    """`out` with each file's image (a file `read_one` cannot read: an image named by its stem, with the reason)."""
    for path in files:
        try:
            im = read_one(path)
        except (ScanError, KeyError, TypeError, ValueError, AttributeError) as e:
            im = Annotated(path.stem, path.parent, path, None, problem=getattr(e, "reason", str(e)))
        out.categories |= {s.category for s in im.shapes}
        out.images.append(im)
    return out


def _voc_image(path: Path) -> Annotated:
    ann = _xml(path)
    if ann.tag != "annotation":
        raise ValueError(f"<{ann.tag}> is not a VOC <annotation>")
    size = ann.find("size")
    im = Annotated(ann.findtext("filename", "").strip() or path.stem, path.parent, path,
                   None if size is None else _size(size.findtext("width"), size.findtext("height")))
    for obj in ann.iter("object"):
        b = obj.find("bndbox")
        if b is None:
            raise ValueError(f"object {obj.findtext('name')!r} has no <bndbox>")
        x0, y0, x1, y1 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        im.shapes.append(Shape(obj.findtext("name", "").strip(), box=_box(x0 - 1, y0 - 1, x1, y1)))
    return im


def read_cvat(path: Path) -> Export:
    """CVAT for images 1.1 XML: <image name width height> with <box xtl ytl xbr ybr> and <polygon points="x,y;...">
    in pixel edges."""
    root = _xml(path)
    names = {lab.findtext("name", "") for lab in root.iter("label")} - {""}
    out = Export("cvat", [], names, [path.parent / "images", path.parent])
    for node in root.iter("image"):
        im = Annotated(node.get("name", ""), path.parent, path, _size(node.get("width"), node.get("height")))
        for s in node:
            try:
                im.shapes.append(_cvat_shape(s))
            except (TypeError, ValueError) as e:
                im.problem = im.problem or f"<{s.tag} label={s.get('label')!r}>: {e}"
        out.images.append(im)
    return out


def _cvat_shape(s: ET.Element) -> Shape:
    name = s.get("label", "")
    if s.tag == "box":
        return Shape(name, box=_box(*(s.get(k) for k in ("xtl", "ytl", "xbr", "ybr"))))
    if s.tag == "polygon":
        return Shape(name, polygons=[_polygon([v for xy in s.get("points", "").split(";") for v in xy.split(",")])])
    raise ValueError(f"a {s.tag} marks no area this converter reads (boxes and polygons; export masks as COCO)")


# ---------------------------------------------------------------- LabelMe


def read_labelme(src: Path) -> Export:
    """LabelMe JSON, one file per image: rectangle (two corners), polygon, circle (centre and a point on it)."""
    files = [src] if src.is_file() else sorted(src.rglob("*.json"))
    return _per_file(Export("labelme", [], set(), []), files, _labelme_image)


def _labelme_image(path: Path) -> Annotated:
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise ValueError("not a LabelMe JSON (no 'shapes' list)")
    name = str(data.get("imagePath") or path.stem).replace("\\", "/")
    im = Annotated(name, path.parent, path, _size(data.get("imageWidth"), data.get("imageHeight")))
    for s in data["shapes"]:
        kind, label, pts = s.get("shape_type") or "polygon", str(s["label"]), np.asarray(s["points"], float)
        if kind == "rectangle" and pts.shape == (2, 2):
            im.shapes.append(Shape(label, box=_box(*pts[0], *pts[1])))
        elif kind == "polygon":
            im.shapes.append(Shape(label, polygons=[_polygon(pts.ravel())]))
        elif kind == "circle" and pts.shape == (2, 2):
            r, t = np.hypot(*(pts[1] - pts[0])), np.linspace(0, 2 * np.pi, 48, endpoint=False)
            im.shapes.append(Shape(label, polygons=[pts[0] + r * np.c_[np.cos(t), np.sin(t)]]))
        else:
            raise ValueError(f"shape {label!r} ({kind}, {len(pts)} points) marks no area (rectangles, polygons, "
                             "circles do)")
    return im


# ---------------------------------------------------------------- YOLO


def read_yolo(src: Path) -> Export:
    """YOLO txt, one file per image (labels/ beside images/, or beside the images): `class cx cy w h` normalised to
    the image's size, or `class x y x y ...` (a polygon, YOLO segmentation); an empty file: an image with nothing.
    Class names from classes.txt or data.yaml's names, else the class numbers."""
    labels = src / "labels" if (src / "labels").is_dir() else src
    return read_yolo_labels(labels, [src / "images", src], _yolo_names(src))


def read_yolo_labels(labels: Path, roots: list[Path], names: dict[int, str]) -> Export:
    """The YOLO label files below `labels`, of the images below `roots`, classes named by `names`."""
    out = Export("yolo", [], set(names.values()), roots)
    for path in sorted(p for p in labels.rglob("*.txt") if p.name != "classes.txt"):
        rel = path.relative_to(labels).with_suffix("")
        im = Annotated(rel.as_posix(), labels, path, None)
        try:
            im.shapes = [_yolo_shape(line, names) for line in path.read_text(encoding="utf-8").splitlines()
                         if line.strip()]
        except (OSError, ValueError) as e:
            im.problem = str(e)
        out.categories |= {s.category for s in im.shapes}
        out.images.append(im)
    if not names:
        out.notes.append("no classes.txt or data.yaml names: categories are the class numbers")
    return out


def _yolo_names(src: Path) -> dict[int, str]:
    """Class number -> name from classes.txt (a name a line) or data.yaml (names: a list or a mapping), the first
    folder that has either; ScanError where it has both and they differ (which would be a guess)."""
    for folder in (src, src.parent, src / "labels"):
        found = [(p, names) for p in (folder / n for n in ("classes.txt", "data.yaml", "dataset.yaml"))
                 if p.is_file() for names in [_names_in(p)] if names]
        if any(names != found[0][1] for _, names in found):
            raise ScanError(found[0][0], f"names the classes {found[0][1]}, {found[1][0].name} beside it "
                                         f"{found[1][1]}: make them agree")
        if found:
            return found[0][1]
    return {}


def _names_in(path: Path) -> dict[int, str]:
    """The class names of a classes.txt (a name a line) or a data.yaml (its `names`)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return {i: s.strip() for i, s in enumerate(text.splitlines()) if s.strip()}
    try:
        return yolo_names((yaml.safe_load(text) or {}).get("names"))
    except (yaml.YAMLError, AttributeError) as e:
        raise ScanError(path, f"malformed YAML ({e})") from None


def yolo_names(got) -> dict[int, str]:
    """A data.yaml's `names` (a list, or a mapping of class number to name) as class number -> name."""
    return {int(k): str(v) for k, v in (got.items() if isinstance(got, dict) else enumerate(got or []))}


def _yolo_shape(line: str, names: dict[int, str]) -> Shape:
    """One label line: a normalised box (centre, size) or polygon, of class `names[n]`."""
    parts = line.split()
    try:
        cls, values = int(parts[0]), [float(v) for v in parts[1:]]
    except ValueError:
        raise ValueError(f"line {line.strip()[:60]!r} is not a class number and numbers") from None
    if names and cls not in names:
        raise ValueError(f"class {cls} is not one of the {len(names)} classes named")
    name = names.get(cls, str(cls))
    if len(values) == 4:
        cx, cy, w, h = values
        return Shape(name, box=_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), normalised=True)
    return Shape(name, polygons=[_polygon(values)], normalised=True)
