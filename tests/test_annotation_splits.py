"""`detector manifest` on exports as the tools write them: split exports (Roboflow, Ultralytics, COCO 2017) into one
manifest's split column, --append of a second batch, --force clearing only its own stale masks."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from detector.cli import main as cli
from detector.labels_to_dataset import convert
from detector.records import load_records
from detector.scan import ScanError
from test_annotations import H, W, _ann, _coco, _im, _rows, _scans

SQUARE = [[10, 10, 60, 10, 60, 60, 10, 60]]


def _yolo_split(root: Path, split: str, n: int) -> None:
    """Roboflow's YOLO layout: SPLIT/images/sI.tiff and SPLIT/labels/sI.txt, the first image with a box."""
    scans = _scans(root / split / "images", n)
    (root / split / "labels").mkdir(parents=True)
    for i, p in enumerate(scans):
        (root / split / "labels" / f"{p.stem}.txt").write_text("0 0.5 0.5 0.1 0.1\n" if i == 0 else "")


def test_a_roboflow_yolo_export_fills_the_split_column_from_its_data_yaml(tmp_path, capsys):
    src = tmp_path / "export"
    for split, n in (("train", 3), ("valid", 2), ("test", 1)):
        _yolo_split(src, split, n)
    (src / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\nnc: 1\n"
                                   "names: ['gun']\n")   # Roboflow's paths, one up from the yaml's folder
    assert cli(["manifest", str(src), "--out", str(tmp_path / "ds")]) == 0
    rows = _rows(tmp_path / "ds")
    assert [(r["path"], r["split"]) for r in rows] == [
        ("../export/train/images/s0.tiff", "train"), ("../export/train/images/s1.tiff", "train"),
        ("../export/train/images/s2.tiff", "train"), ("../export/valid/images/s0.tiff", "val"),
        ("../export/valid/images/s1.tiff", "val"), ("../export/test/images/s0.tiff", "test")]
    assert [r["anomaly_type"] for r in rows if r["label"] == "1"] == ["gun"] * 3
    assert "split (the export's folders): 1 test, 3 train, 2 val" in capsys.readouterr().out
    assert sorted({r.split for r in load_records(tmp_path / "ds")}) == ["test", "train", "val"]
    convert(src, tmp_path / "ds", split="val", force=True)   # --split still forces one for all
    assert {r["split"] for r in _rows(tmp_path / "ds")} == {"val"}


def test_an_ultralytics_data_yaml_with_path_and_images_split_folders(tmp_path):
    root = tmp_path / "datasets" / "cargo"
    for split in ("train", "val"):
        for i, p in enumerate(_scans(root / "images" / split, 2)):
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{p.stem}.txt").write_text("0 0.5 0.5 0.1 0.1\n" if i else "")
    (tmp_path / "cargo.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: pkg\n")
    convert(tmp_path / "cargo.yaml", tmp_path / "ds")
    rows = _rows(tmp_path / "ds")
    assert [(Path(r["path"]).parent.name, r["label"], r["split"]) for r in rows] == [
        ("train", "0", "train"), ("train", "1", "train"), ("val", "0", "val"), ("val", "1", "val")]
    assert rows[1]["anomaly_type"] == "pkg"


def test_roboflow_coco_split_folders_and_its_supercategory_row(tmp_path):
    src = tmp_path / "export"
    for split in ("train", "valid"):
        _scans(src / split, 2)
        cats = [{"id": 0, "name": "contraband", "supercategory": "none"},   # Roboflow's dataset-name row
                {"id": 1, "name": "gun", "supercategory": "contraband"}]
        (src / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [_im(0), _im(1)], "annotations": [_ann(1, 1)], "categories": cats}))   # ids from 0
    (src / "README.roboflow.txt").write_text("exported from roboflow.com\n")
    s = convert(src, tmp_path / "ds")
    rows = _rows(tmp_path / "ds")
    assert [(Path(r["path"]).parent.name, r["label"], r["split"]) for r in rows] == [
        ("train", "0", "train"), ("train", "1", "train"), ("valid", "0", "val"), ("valid", "1", "val")]
    assert s.split_from == "the export's folders" and rows[1]["anomaly_type"] == "gun"


def test_cocos_own_instances_per_split_with_their_image_folders(tmp_path):
    for split in ("train2017", "val2017"):
        _scans(tmp_path / "coco" / split, 2)
        _coco(tmp_path / "coco" / "annotations" / f"instances_{split}.json", [_im(1), _im(0)], [_ann(1)])
    (tmp_path / "coco" / "annotations" / "captions_train2017.json").write_text(json.dumps(
        {"images": [_im(0)], "annotations": [{"image_id": 0, "caption": "a truck"}]}))   # not labels: passed over
    convert(tmp_path / "coco", tmp_path / "ds")
    rows = _rows(tmp_path / "ds")
    assert [(r["path"], r["label"], r["split"]) for r in rows] == [
        ("../coco/train2017/s1.tiff", "1", "train"), ("../coco/train2017/s0.tiff", "0", "train"),
        ("../coco/val2017/s1.tiff", "1", "val"), ("../coco/val2017/s0.tiff", "0", "val")]


def test_append_adds_a_second_batch_without_listing_a_scan_twice_or_clobbering_masks(tmp_path, capsys):
    _scans(tmp_path / "a", 2)
    _scans(tmp_path / "b", 1)
    first = _coco(tmp_path / "a" / "c.json", [_im(0), _im(1)], [_ann(0, seg=SQUARE)])
    second = _coco(tmp_path / "b" / "c.json", [_im(0), _im(1, "../a/s1.tiff")], [_ann(0, 2, seg=SQUARE)])
    convert(first, tmp_path / "ds", split="train")
    own = tmp_path / "ds" / "masks" / "notes.png"
    own.write_bytes(b"the user's own file")
    before = (tmp_path / "ds" / "masks" / "s0.png").read_bytes()
    assert cli(["manifest", str(second), "--out", str(tmp_path / "ds"), "--append", "--split", "val"]) == 0
    rows = _rows(tmp_path / "ds")
    assert [(r["path"], r["mask"], r["split"]) for r in rows] == [
        ("../a/s0.tiff", "masks/s0.png", "train"), ("../a/s1.tiff", "", "train"),
        ("../b/s0.tiff", "masks/s0-2.png", "val")]   # another s0: its own mask, the first batch's kept
    assert (tmp_path / "ds" / "masks" / "s0.png").read_bytes() == before and own.read_bytes() == b"the user's own file"
    left = list(csv.DictReader(open(tmp_path / "ds" / "left_out.csv", encoding="utf-8")))
    assert [r["file"].endswith("a/s1.tiff") for r in left] == [True]
    assert "listed again" in left[0]["reason"] and "manifest.csv row 3" in left[0]["reason"]
    assert "added to 2 rows there" in capsys.readouterr().out
    assert len(load_records(tmp_path / "ds")) == 3


def test_force_clears_the_masks_its_earlier_run_wrote_and_no_other_file(tmp_path):
    _scans(tmp_path, 3)
    src = _coco(tmp_path / "c.json", [_im(0), _im(1), _im(2)], [_ann(0, seg=SQUARE), _ann(1, seg=SQUARE)])
    out = tmp_path / "ds"
    convert(src, out)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["s0.png", "s1.png"]
    (out / "masks" / "hand.png").write_bytes((out / "masks" / "s1.png").read_bytes()[:8] + b"drawn by hand")
    with open(out / "manifest.csv", "a", encoding="utf-8") as f:
        f.write("s2.tiff,1,masks/hand.png,,pkg\n")   # the user's own row, naming their own mask
    _coco(tmp_path / "c.json", [_im(0), _im(1), _im(2)], [_ann(0, seg=SQUARE), _ann(1)])   # s1: a box now
    convert(src, out, force=True)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["hand.png", "s0.png"]
    assert [r["mask"] for r in _rows(out)] == ["masks/s0.png", "", ""]


def test_an_existing_manifest_is_kept_without_force_or_append(tmp_path):
    _scans(tmp_path, 1)
    src = _coco(tmp_path / "c.json", [_im(0)], [])
    convert(src, tmp_path / "ds")
    with pytest.raises(ScanError, match="exists: pass --force to replace it, --append to add to it"):
        convert(src, tmp_path / "ds")
    assert np.array_equal([r["path"] for r in _rows(tmp_path / "ds")], ["../s0.tiff"]) and W and H


def test_roboflows_dataset_name_row_is_no_class_for_classes(tmp_path):
    """Roboflow's category 0 (the dataset's name, every class's supercategory, used by no annotation) was a category:
    `--classes contraband` was accepted, matched no shape, and every image came out normal. COCO's own rows, whose
    supercategory is their own name ("person"), stay classes even where no annotation uses them."""
    _scans(tmp_path / "e", 2)
    cats = [{"id": 0, "name": "contraband", "supercategory": "none"},
            {"id": 1, "name": "gun", "supercategory": "contraband"},
            {"id": 2, "name": "knife", "supercategory": "knife"}]
    (tmp_path / "e" / "c.json").write_text(json.dumps({"images": [_im(0), _im(1)], "annotations": [_ann(1, 1)],
                                                       "categories": cats}))
    with pytest.raises(ScanError, match="--classes contraband: no such category"):
        convert(tmp_path / "e" / "c.json", tmp_path / "ds", classes=["contraband"])
    convert(tmp_path / "e" / "c.json", tmp_path / "ds2", classes=["gun", "knife"])
    assert [r["label"] for r in _rows(tmp_path / "ds2")] == ["0", "1"]
