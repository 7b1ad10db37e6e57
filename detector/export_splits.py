"""Exports that come split, read as one (split, Export) per split (core; no torch): a YOLO data.yaml's train/val/test
(Ultralytics and Roboflow), sub-folders named by split each holding an export (Roboflow's train/, valid/, test/), and
COCO JSONs named by split (COCO's own annotations/instances_train2017.json, instances_val2017.json).

The split comes from the structure, in the manifest's words (valid -> val); an export with no such structure is one
part with no split.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from detector.annotations import (Export, _yolo_names, detect_format, read_coco, read_export, read_yolo_labels,
                                  yolo_names)
from detector.manifest import SPLIT_ALIASES
from detector.scan import ScanError

YAMLS = ("data.yaml", "dataset.yaml")


def read_parts(src: str | Path, fmt: str | None = None) -> list[tuple[str, Export]]:
    """(split, export) for each split of the export at `src`; [("", export)] where it comes in one piece."""
    src = Path(src)
    if not src.exists():
        raise ScanError(src, "no such export file or folder")
    yml = src if src.suffix.lower() in (".yaml", ".yml") else next(
        (src / n for n in YAMLS if (src / n).is_file()), None) if src.is_dir() else None
    if yml is not None and fmt in (None, "yolo") and _split_keys(yml):
        return _yolo_parts(yml)
    if src.is_dir():
        parts = _coco_parts(src) if fmt in (None, "coco") else []
        parts = parts or _folder_parts(src, fmt)
        if parts:
            return parts
    return [("", read_export(src, fmt))]


def _load(yml: Path) -> dict:
    try:
        data = yaml.safe_load(yml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ScanError(yml, f"malformed YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def _split_keys(yml: Path) -> list[str]:
    """The split keys (train, val, test) a data.yaml names a value for."""
    return [k for k in ("train", "val", "test") if _load(yml).get(k)]


def _yolo_parts(yml: Path) -> list[tuple[str, Export]]:
    """A data.yaml's splits: each an images folder (relative to `path:`, else to the yaml; Roboflow's `../train/images`
    read as Ultralytics does, from the yaml's own folder) whose labels are in the folder named labels in its place."""
    data = _load(yml)
    base = yml.parent / str(data["path"]) if data.get("path") else yml.parent
    names = (yml.name not in YAMLS and yolo_names(data.get("names"))) or _yolo_names(yml.parent)
    parts = []
    for key in _split_keys(yml):
        for entry in data[key] if isinstance(data[key], list) else [data[key]]:
            images = _images_dir(base, str(entry), yml)
            parts.append((key, read_yolo_labels(_labels_dir(images), [images], names)))
    return parts


def _images_dir(base: Path, entry: str, yml: Path) -> Path:
    """The images folder a data.yaml entry names; ScanError where there is none (or it is a list file)."""
    for p in (base / entry, base / entry[3:] if entry.startswith("../") else None):
        if p is not None and p.is_dir():
            return p
    raise ScanError(yml, f"{entry!r}: no such images folder (a .txt list of images is not read: name the folder)")


def _labels_dir(images: Path) -> Path:
    """YOLO's rule: the labels of .../images/... are in .../labels/... (the last `images` in the path)."""
    parts = list(images.parts)
    if "images" not in parts:
        return images
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:])


def _coco_parts(src: Path) -> list[tuple[str, Export]]:
    """COCO JSONs below `src` named by split (instances_train2017.json); their images also in the folder the name's
    split word names (train2017/), beside the JSON's folder."""
    found = [p for p in sorted(src.rglob("*.json")) if b'"annotations"' in p.read_bytes()[:1 << 16]]
    found = [p for p in found if p.name.startswith("instances_")] or found   # COCO's captions_, person_keypoints_
    named = [(p, _split_word(p.stem)) for p in found]
    if len(found) < 2 or not all(w for _, w in named):
        return []
    parts = []
    for path, word in named:
        export = read_coco(path)
        export.roots += [path.parent.parent / word, path.parent / word]
        parts.append((SPLIT_ALIASES[re.match(r"[a-z]+", word.lower()).group()], export))
    return parts


def _split_word(stem: str) -> str:
    """The word of a file name that names a split (`train2017` of instances_train2017), "" where none does."""
    words = [w for w in re.split(r"[_.\-\s]+", stem) if re.match(r"[a-z]+", w.lower())]
    return next((w for w in words if re.match(r"[a-z]+", w.lower()).group() in SPLIT_ALIASES), "")


def _folder_parts(src: Path, fmt: str | None) -> list[tuple[str, Export]]:
    """Sub-folders named by a split (train/, valid/, test/), each an export of its own (Roboflow's layout)."""
    folders = [p for p in sorted(src.iterdir()) if p.is_dir() and p.name.lower() in SPLIT_ALIASES]
    if not folders or _holds_labels(src, folders):
        return []
    return [(SPLIT_ALIASES[f.name.lower()], read_export(f, fmt or detect_format(f))) for f in folders]


def _holds_labels(src: Path, folders: list[Path]) -> bool:
    """Whether `src` has label files of its own outside the split folders (then it is one export, not split)."""
    return any(p.is_file() and p.suffix.lower() in (".json", ".xml", ".txt") and p.name != "classes.txt"
               and not p.name.lower().startswith("readme") for p in src.iterdir()) or any(
        q.suffix.lower() in (".json", ".xml", ".txt") for p in src.iterdir() if p.is_dir() and p not in folders
        for q in p.rglob("*"))
