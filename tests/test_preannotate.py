"""`detector score --coco`: the model's regions as a COCO JSON of pre-annotations that a labelling tool imports and
`detector manifest` reads back."""
from __future__ import annotations

import csv
import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from conftest import write_nonsquare_scan, write_test_scan
from detector import score
from detector.labels_to_dataset import convert
from test_scan import _exif_jpeg


def _args(src, model, out, **kw):
    base = dict(src=str(src), model=str(model), out=str(out), jsonl=None, overlays=None, overlays_flagged=False,
                policy=None, threshold=None, threads=1, workers=2, no_resume=False)
    return Namespace(**{**base, **kw})


def _regions(results: Path) -> dict[str, list]:
    """{file name: [box, ...]} of the scored rows of a results CSV."""
    with open(results, newline="") as f:
        return {Path(r["path"]).name: [x["box"] for x in json.loads(r["regions"])]
                for r in csv.DictReader(f) if not r["error"]}


def _boxes(dataset: Path) -> dict[str, list]:
    """{file name: [box, ...]} of a dataset's manifest."""
    with open(dataset / "manifest.csv", newline="") as f:
        return {Path(r["path"]).name: json.loads(r["boxes"] or "[]") for r in csv.DictReader(f)}


@pytest.fixture
def scans(tmp_path) -> Path:
    d = tmp_path / "scans"
    write_test_scan(d / "a.tiff", dense=True, seed=1)
    write_test_scan(d / "sub" / "b.tiff", dense=True, seed=2, width=500)
    write_test_scan(d / "c.tiff", seed=3)
    (d / "broken.tiff").write_bytes(b"II*\x00 not a scan")
    return d


def test_coco_of_scored_scans_reads_back_as_the_results_regions(scans, heuristic_model, tmp_path):
    """Label-only finds need boxes to train on: the model's regions go to the labelling tool as pre-annotations. The
    COCO JSON lists each scored scan relative to SRC (a failed one has no regions: left out), with what CVAT's COCO
    1.0 importer requires, and `detector manifest` reads it back to exactly the regions of results.csv."""
    out, preds = tmp_path / "results.csv", tmp_path / "preds.json"
    assert score.main(_args(scans, heuristic_model, out, coco=str(preds))) == 0
    coco = json.loads(preds.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["a.tiff", "c.tiff", "sub/b.tiff"]
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(600, 200), (600, 200), (500, 200)]
    assert [im["id"] for im in coco["images"]] == [1, 2, 3]
    assert coco["categories"] == [{"id": 1, "name": "anomaly", "supercategory": ""}]
    anns = coco["annotations"]
    assert len(anns) == 2 and [a["id"] for a in anns] == [1, 2]
    for a in anns:
        x, y, w, h = a["bbox"]
        assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["segmentation"] == [] and a["area"] == w * h
        assert 0 <= a["score"] <= 1
    convert(preds, tmp_path / "ds", images=scans)
    regions = _regions(out)
    assert set(regions) == {"a.tiff", "b.tiff", "c.tiff"} and regions["a.tiff"] and regions["b.tiff"]
    assert _boxes(tmp_path / "ds") == regions


def test_a_resumed_run_writes_the_coco_of_every_row(scans, heuristic_model, tmp_path):
    """The COCO JSON is written whole from the results: a resumed run's earlier rows are in it too."""
    out, preds = tmp_path / "results.csv", tmp_path / "preds.json"
    moved = tmp_path / "b.tiff"
    shutil.move(scans / "sub" / "b.tiff", moved)
    assert score.main(_args(scans, heuristic_model, out, coco=str(preds))) == 0
    assert len(json.loads(preds.read_text())["images"]) == 2
    shutil.move(moved, scans / "sub" / "b.tiff")
    assert score.main(_args(scans, heuristic_model, out, coco=str(preds))) == 0
    coco = json.loads(preds.read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == ["a.tiff", "c.tiff", "sub/b.tiff"]
    assert len(coco["annotations"]) == 2


def test_coco_min_score_keeps_the_stronger_regions_and_refuses_no_score(scans, heuristic_model, tmp_path, capsys):
    out, preds = tmp_path / "results.csv", tmp_path / "preds.json"
    assert score.main(_args(scans, heuristic_model, out, coco=str(preds), coco_min_score=1.0)) == 0
    strongest = sum(x["score"] >= 1.0 for boxes in _regions_scored(out) for x in boxes)
    assert len(json.loads(preds.read_text())["annotations"]) == strongest
    for bad, why in ((1.5, "[0, 1]"), (-0.1, "[0, 1]")):
        assert score.main(_args(scans, heuristic_model, out, coco=str(preds), coco_min_score=bad)) == 2
        assert why in capsys.readouterr().err
    assert score.main(_args(scans, heuristic_model, out, coco_min_score=0.5)) == 2
    assert "--coco" in capsys.readouterr().err
    assert score.main(_args(scans, heuristic_model, out, coco=str(tmp_path))) == 2
    assert "folder" in capsys.readouterr().err


def _regions_scored(results: Path) -> list[list[dict]]:
    with open(results, newline="") as f:
        return [json.loads(r["regions"]) for r in csv.DictReader(f) if not r["error"]]


def _round_trip(src: Path, model: Path, tmp_path: Path, name: str) -> tuple[dict, dict, dict]:
    """Score `src` with --coco and read the COCO back with `detector manifest`: (coco, regions, boxes read back)."""
    out, preds = tmp_path / f"{name}.csv", tmp_path / f"{name}.json"
    assert score.main(_args(src, model, out, coco=str(preds))) == 0
    convert(preds, tmp_path / f"{name}_ds", images=src)
    return json.loads(preds.read_text()), _regions(out), _boxes(tmp_path / f"{name}_ds")


def test_coco_sizes_and_boxes_are_in_the_files_pixels(tmp_path, heuristic_model, heuristic_model_1ch):
    """The labelling tool shows the file: a line scanner's non-square pixels are squared for the model, and a JPEG
    turned by its EXIF orientation; the image's size and boxes are those of the file as shown, as the regions are."""
    write_nonsquare_scan(tmp_path / "scans" / "line.tiff", row_mm=4.0, col_mm=5.0)
    coco, regions, boxes = _round_trip(tmp_path / "scans", heuristic_model, tmp_path, "line")
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (600, 200)
    assert boxes == regions and regions["line.tiff"]

    (tmp_path / "bags").mkdir()
    img = np.full((128, 320), 230, np.uint8)   # stored 320 wide; orientation 6: shown 128 wide, 320 high
    img[20:60, 200:260] = 1
    (tmp_path / "bags" / "bag.jpg").write_bytes(_exif_jpeg(img, 6))
    coco, regions, boxes = _round_trip(tmp_path / "bags", heuristic_model_1ch, tmp_path, "bags")
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (128, 320)
    assert boxes == regions and regions["bag.jpg"]


def test_coco_file_names_are_relative_to_the_manifests_folder(scans, heuristic_model, tmp_path):
    """A manifest SRC: the names are its rows' paths, so the pre-annotations read back against its folder."""
    (scans / "manifest.csv").write_text("path,label\na.tiff,1\nsub/b.tiff,1\n")
    out, preds = tmp_path / "results.csv", tmp_path / "preds.json"
    assert score.main(_args(scans / "manifest.csv", heuristic_model, out, coco=str(preds))) == 0
    assert [im["file_name"] for im in json.loads(preds.read_text())["images"]] == ["a.tiff", "sub/b.tiff"]
