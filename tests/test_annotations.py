"""`detector manifest`: labelling tools' exports (COCO, VOC, LabelMe, YOLO, CVAT) -> a dataset training reads."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import write_test_scan
from detector.annotations import decode_rle, read_export
from detector.cli import main as cli
from detector.labels_to_dataset import convert
from detector.manifest import read_mask
from detector.scan import ScanError
from test_scan import _exif_jpeg

W, H = 600, 200


def _scans(folder: Path, n: int, **kw) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_test_scan(folder / f"s{i}.tiff", seed=i, **kw) for i in range(n)]


def _rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _coco(path: Path, images: list[dict], annotations: list[dict], names=("weapon", "drugs")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def _im(i: int, name: str | None = None, w: int = W, h: int = H) -> dict:
    return {"id": i, "file_name": name or f"s{i}.tiff", "width": w, "height": h}


def _ann(image_id: int, cat: int = 1, bbox=(10, 20, 30, 40), seg=None, crowd: int = 0) -> dict:
    return {"id": image_id * 10 + cat, "image_id": image_id, "category_id": cat, "bbox": list(bbox),
            "segmentation": seg if seg is not None else [], "iscrowd": crowd}


def _encode(runs: list[int]) -> str:
    """COCO's compressed RLE string of run lengths (pycocotools' rleToString), written from its spec."""
    out = []
    for i, x in enumerate(runs):
        x = x - runs[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a bool mask down its columns, starting with unmarked pixels."""
    flat = mask.ravel(order="F").astype(int)
    edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    return np.diff(np.r_[0, edges]).tolist()


def test_coco_boxes_polygons_and_unannotated_images_become_manifest_rows(tmp_path):
    _scans(tmp_path / "images", 3)
    src = _coco(tmp_path / "annotations" / "instances.json", [_im(0), _im(1), _im(2)],
                [_ann(1, 1, (10.5, 20, 30, 40)),
                 _ann(2, 2, (100, 50, 20, 20), seg=[[100, 50, 120, 50, 120, 70, 100, 70]])])
    s = convert(src, tmp_path / "ds")
    rows = {r["path"]: r for r in _rows(tmp_path / "ds")}
    assert s.fmt == "coco" and list(rows) == ["../images/s0.tiff", "../images/s1.tiff", "../images/s2.tiff"]
    assert rows["../images/s0.tiff"]["label"] == "0" and rows["../images/s0.tiff"]["anomaly_type"] == "none"
    one = rows["../images/s1.tiff"]
    assert (one["label"], json.loads(one["boxes"]), one["mask"], one["anomaly_type"]) == (
        "1", [[10, 20, 41, 60]], "", "weapon")   # [x, y, w, h] -> [x0, y0, x1, y1], outward to whole pixels
    two = rows["../images/s2.tiff"]
    assert json.loads(two["boxes"]) == [[100, 50, 120, 70]] and two["anomaly_type"] == "drugs"
    mask = read_mask(tmp_path / "ds" / two["mask"])
    want = np.zeros((H, W), np.uint8)
    want[50:70, 100:120] = 255
    assert mask.shape == (H, W) and np.array_equal(mask, want)   # the polygon's pixels, not one more


def test_a_polygon_mask_marks_the_pixels_whose_centre_is_inside(tmp_path):
    _scans(tmp_path, 1)
    tri = [300, 20, 400, 120, 200, 120]
    convert(_coco(tmp_path / "c.json", [_im(0)], [_ann(0, seg=[tri])]), tmp_path / "ds")
    mask = read_mask(tmp_path / "ds" / _rows(tmp_path / "ds")[0]["mask"]) > 0
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    inside = (ys >= 20) & (ys <= 120) & (np.abs(xs - 300) <= ys - 20)
    assert abs(int(mask.sum()) - 100 * 100) < 150   # the triangle's area, 100 x 200 / 2
    assert (mask != inside).sum() < 210             # differing at most along its edges
    assert mask[119, 300] and not mask[121, 300] and not mask[19, 300]


def test_rle_counts_and_compressed_strings_decode_to_the_mask_they_encode(tmp_path):
    assert decode_rle({"size": [3, 3], "counts": "151M"}).ravel(order="F").tolist() == [0, 1, 1, 1, 1, 1, 0, 1, 1]
    hand = np.zeros((H, W), bool)
    hand[40:90, 200:260] = True
    hand[100:110, 500:590] = True   # runs past 31: multi-group counts; deltas below zero: the sign bit
    assert np.array_equal(decode_rle({"size": [H, W], "counts": _runs(hand)}), hand)
    assert np.array_equal(decode_rle({"size": [H, W], "counts": _encode(_runs(hand))}), hand)
    _scans(tmp_path, 2)
    src = _coco(tmp_path / "c.json", [_im(0), _im(1)],
                [_ann(0, seg={"size": [H, W], "counts": _encode(_runs(hand))}, crowd=1),
                 _ann(1, seg={"size": [H, W], "counts": _runs(hand)[:-1]})])   # counts short of the pixels
    s = convert(src, tmp_path / "ds")
    row = _rows(tmp_path / "ds")[0]
    assert np.array_equal(read_mask(tmp_path / "ds" / row["mask"]) > 0, hand)
    assert json.loads(row["boxes"]) == [[200, 40, 590, 110]]
    assert [(f.endswith("s1.tiff"), k) for f, k, _ in s.left_out] == [(True, "malformed")]


def test_voc_corners_are_one_based_and_inclusive(tmp_path):
    _scans(tmp_path / "JPEGImages", 2)
    ann = tmp_path / "Annotations"
    ann.mkdir()
    (ann / "s0.xml").write_text(
        "<annotation><filename>s0.tiff</filename><size><width>600</width><height>200</height></size>"
        "<object><name>weapon</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>60</ymax></bndbox>"
        "</object></annotation>")
    (ann / "s1.xml").write_text("<annotation><filename>s1.tiff</filename><size><width>600")   # cut short
    s = convert(tmp_path, tmp_path / "ds")
    assert s.fmt == "voc"
    row, = _rows(tmp_path / "ds")
    assert json.loads(row["boxes"]) == [[10, 20, 50, 60]]   # pixels 11..50 (1-based) are 10..49: [10, 50)
    (f, kind, why), = s.left_out
    assert f.endswith("s1.tiff") and kind == "malformed" and "s1.xml" in why and "malformed XML" in why


def test_yolo_boxes_are_scaled_by_the_image_size_read_from_its_header(tmp_path):
    _scans(tmp_path / "images", 4)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "s0.txt").write_text("1 0.5 0.5 0.1 0.3\n")   # centre (300, 100), 60 x 60
    (labels / "s1.txt").write_text("")                        # listed, nothing in it: normal
    (labels / "s2.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")   # a polygon
    (tmp_path / "data.yaml").write_text("names: [weapon, drugs]\n")
    s = convert(tmp_path, tmp_path / "ds")   # s3 has no label file: not in the export
    rows = {r["path"]: r for r in _rows(tmp_path / "ds")}
    assert s.fmt == "yolo" and len(rows) == 3
    assert json.loads(rows["../images/s0.tiff"]["boxes"]) == [[270, 70, 330, 130]]
    assert rows["../images/s0.tiff"]["anomaly_type"] == "drugs" and rows["../images/s1.tiff"]["label"] == "0"
    assert json.loads(rows["../images/s2.tiff"]["boxes"]) == [[60, 20, 120, 40]]
    assert rows["../images/s2.tiff"]["mask"] == "masks/s2.png"
    assert [p.name for p in s.unlisted] == ["s3.tiff"]
    (tmp_path / "data.yaml").unlink()
    (tmp_path / "classes.txt").write_text("knife\ngun\n")
    convert(tmp_path, tmp_path / "ds", force=True)
    assert _rows(tmp_path / "ds")[0]["anomaly_type"] == "gun"


def test_labelme_rectangles_and_polygons_and_cvat_boxes_and_polygons(tmp_path):
    _scans(tmp_path / "img", 2)
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "s0.json").write_text(json.dumps({"imagePath": "..\\img\\s0.tiff", "imageWidth": W, "imageHeight": H,
                                            "shapes": [{"label": "gun", "shape_type": "rectangle",
                                                        "points": [[50, 60], [10, 20]]}]}))
    (lm / "s1.json").write_text(json.dumps({"imagePath": "../img/s1.tiff", "imageWidth": W, "imageHeight": H,
                                            "shapes": [{"label": "pkg", "shape_type": "polygon",
                                                        "points": [[0, 0], [10, 0], [10, 10], [0, 10]]}]}))
    s = convert(lm, tmp_path / "ds")
    rows = _rows(tmp_path / "ds")
    assert s.fmt == "labelme" and json.loads(rows[0]["boxes"]) == [[10, 20, 50, 60]]
    assert (read_mask(tmp_path / "ds" / rows[1]["mask"]) > 0).sum() == 100
    (tmp_path / "cvat.xml").write_text(
        '<annotations><meta><task><labels><label><name>gun</name></label></labels></task></meta>'
        f'<image id="0" name="s0.tiff" width="{W}" height="{H}"><box label="gun" xtl="10.0" ytl="20.0" '
        'xbr="50.0" ybr="60.0"/></image>'
        f'<image id="1" name="s1.tiff" width="{W}" height="{H}"><polygon label="gun" points="0,0;10,0;10,10;0,10"/>'
        '</image></annotations>')
    s = convert(tmp_path / "cvat.xml", tmp_path / "ds2", images=tmp_path / "img")
    rows = _rows(tmp_path / "ds2")
    assert s.fmt == "cvat" and json.loads(rows[0]["boxes"]) == [[10, 20, 50, 60]] and rows[1]["mask"]


def test_classes_limit_the_categories_that_count_and_a_typo_is_refused(tmp_path):
    _scans(tmp_path, 2)
    src = _coco(tmp_path / "c.json", [_im(0), _im(1)], [_ann(0, 1), _ann(0, 2, (100, 20, 10, 10)), _ann(1, 2)])
    s = convert(src, tmp_path / "ds", classes=["weapon"])
    rows = _rows(tmp_path / "ds")
    assert s.ignored_shapes == 2 and [r["label"] for r in rows] == ["1", "0"]
    assert json.loads(rows[0]["boxes"]) == [[10, 20, 40, 60]] and rows[0]["anomaly_type"] == "weapon"
    with pytest.raises(ScanError, match="--classes wepon: no such category"):
        convert(src, tmp_path / "ds", classes=["wepon"], force=True)


def test_missing_unlisted_mismatched_and_outside_images_are_left_out_and_the_rest_converted(tmp_path, capsys):
    _scans(tmp_path / "images", 5)
    src = _coco(tmp_path / "c.json",
                [_im(0), _im(1, w=1200, h=400), _im(2), _im(3), _im(5, "gone.tiff")],
                [_ann(2, bbox=(590, 190, 12, 12)), _ann(3, bbox=(5000, 20, 30, 40))])   # slightly out, far out
    out = tmp_path / "ds"
    assert cli(["manifest", str(src), "--out", str(out), "--images", str(tmp_path / "images")]) == 0
    rows = _rows(out)
    assert [r["path"] for r in rows] == ["../images/s0.tiff", "../images/s2.tiff"]
    assert json.loads(rows[1]["boxes"]) == [[590, 190, 600, 200]]   # clipped to the image
    left = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in csv.DictReader(open(out / "left_out.csv"))}
    assert left["s1.tiff"].startswith("size mismatch") and "says 1200x400, the image is 600x200" in left["s1.tiff"]
    assert left["s3.tiff"].startswith("outside the image") and left["gone.tiff"].startswith("missing image")
    assert left["s4.tiff"] == "not in the export"
    err, line = capsys.readouterr(), None
    line = err.out.splitlines()[0]
    assert "2 images (1 normal, 1 anomalous" in line and "left out: 3 listed" in line and "1 not in the export" in line
    assert err.out.splitlines()[1] == f"next: detector train --config configs/quick.yaml --data {out} --out runs/mine"
    assert "s1.tiff: left out, size mismatch" in err.err
    assert cli(["manifest", str(src), "--out", str(out)]) == 2   # an existing manifest is kept
    assert "exists: pass --force" in capsys.readouterr().err


def test_an_oriented_jpeg_is_checked_at_the_size_a_viewer_shows(tmp_path):
    img = np.full((40, 100), 200, np.uint8)   # stored 100 wide, 40 high; orientation 6: shown 40 wide, 100 high
    (tmp_path / "bag.jpg").write_bytes(_exif_jpeg(img, 6))
    (tmp_path / "raw.jpg").write_bytes(_exif_jpeg(img, 6))
    src = _coco(tmp_path / "c.json", [_im(0, "bag.jpg", 40, 100), _im(1, "raw.jpg", 100, 40)],
                [_ann(0, bbox=(5, 60, 30, 30)), _ann(1, bbox=(5, 5, 10, 10))])
    s = convert(src, tmp_path / "ds")
    row, = _rows(tmp_path / "ds")
    assert row["path"] == "../bag.jpg" and json.loads(row["boxes"]) == [[5, 60, 35, 90]]
    (f, kind, why), = s.left_out
    assert f.endswith("raw.jpg") and kind == "size mismatch" and "EXIF orientation" in why


def test_malformed_exports_name_the_file_and_the_reason(tmp_path):
    (tmp_path / "c.json").write_text('{"images": [, "annotations": []}')
    with pytest.raises(ScanError, match=r"c\.json: malformed JSON"):
        read_export(tmp_path / "c.json", "coco")
    (tmp_path / "d.json").write_text('{"images": 3, "annotations": []}')
    with pytest.raises(ScanError, match="not a COCO export"):
        read_export(tmp_path / "d.json")
    _scans(tmp_path / "lm", 2)
    (tmp_path / "lm" / "s0.json").write_text('{"imagePath": "s0.tiff", "shapes": [{"label": "a", "shape_')
    (tmp_path / "lm" / "s1.json").write_text(json.dumps({"imagePath": "s1.tiff", "shapes": [
        {"label": "a", "shape_type": "point", "points": [[3, 4]]}]}))
    with pytest.raises(ScanError, match="no image of the export could be used"):
        convert(tmp_path / "lm", tmp_path / "ds", fmt="labelme")
    assert not (tmp_path / "ds" / "manifest.csv").exists()


def test_a_coco_export_of_synthetic_scans_trains_as_converted(tmp_path):
    """End to end: what `detector train --data` reads (records, the scan cache's masks) from a converted export."""
    from detector.preprocess import Preprocessing
    from detector.records import load_records
    from detector.scan_cache import ScanCache
    from detector.synth.dataset import write_dataset
    write_dataset(tmp_path / "synth", 4, seed=3, anomaly_fraction=0.5, workers=1)
    truth = {r["path"]: r for r in csv.DictReader(open(tmp_path / "synth" / "manifest.csv"))}
    images, anns = [], []
    for i, (path, r) in enumerate(sorted(truth.items())):
        h, w = cv2.imread(str(tmp_path / "synth" / path), cv2.IMREAD_UNCHANGED).shape[:2]
        images.append(_im(i, Path(path).name, w, h))
        if r["label"] == "1":
            m = read_mask(tmp_path / "synth" / r["mask"]) > 0
            anns.append(_ann(i, seg={"size": [h, w], "counts": _runs(m)}))
    src = _coco(tmp_path / "export" / "instances.json", images, anns)
    assert cli(["manifest", str(src), "--images", str(tmp_path / "synth" / "images"), "--out",
                str(tmp_path / "ds"), "--split", "val"]) == 0
    recs = load_records(tmp_path / "ds")
    assert [Path(r.path).name for r in recs] == [Path(p).name for p in sorted(truth)]
    assert all(r.split == "val" for r in recs)
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=5.0, repair_rows=False))
    for rec, (path, r) in zip(recs, sorted(truth.items())):
        assert rec.label == int(r["label"]) and Path(rec.path).resolve() == (tmp_path / "synth" / path).resolve()
        _, mask = cache.load(cache.build(rec))
        if rec.label:
            assert np.array_equal(mask > 0, read_mask(tmp_path / "synth" / r["mask"]) > 0) and rec.boxes
        else:
            assert not mask.any() and rec.mask is None
