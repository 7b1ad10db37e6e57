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
from detector.scan import ScanError
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


# ---------------------------------------------------------------- --coco-images: scans a labeller can see


def _drawn(dest: Path, name: str) -> np.ndarray:
    """The rendering `name` below `dest`, as a tool reads it (unchanged: its own depth and channels)."""
    import cv2
    img = cv2.imread(str(dest / name), cv2.IMREAD_UNCHANGED)
    assert img is not None, f"no rendering {dest / name}"
    return img


def _shows_the_cargo(img: np.ndarray, boxes: list) -> None:
    """An 8-bit grey picture, not blank: air bright, the truck's cargo in grey levels, each region darker than the
    picture (the dense block the labeller has to see)."""
    assert img.dtype == np.uint8 and img.ndim == 2
    assert img[:10].mean() > 200 and int(img.max()) - int(img.min()) > 150
    for x0, y0, x1, y1 in boxes:
        assert img[y0:y1, x0:x1].mean() < img.mean() - 30


def test_coco_images_are_8bit_pictures_of_each_scan_in_its_files_frame(tmp_path, heuristic_model):
    """Labelling tools show 8-bit pictures: a 16-bit (two-page) scan was black, white or not shown at all. Each scan
    is drawn as an 8-bit grey PNG as an overlay shows it, at its file's pixel size (a line scanner's non-square pixels
    unsquared: the regions' frame), named like it, and the COCO names those PNGs."""
    scans, pngs = tmp_path / "scans", tmp_path / "labelling"
    write_test_scan(scans / "a.tiff", dense=True, seed=1)
    write_test_scan(scans / "sub" / "b.tiff", dense=True, seed=2, width=500)
    write_nonsquare_scan(scans / "line.tiff", row_mm=4.0, col_mm=5.0)
    out, preds = tmp_path / "results.csv", tmp_path / "preds.json"
    assert score.main(_args(scans, heuristic_model, out, coco=str(preds), coco_images=str(pngs))) == 0
    coco = json.loads(preds.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["a.png", "line.png", "sub/b.png"]
    assert coco["info"]["image_root"] == str(pngs.resolve()) and coco["info"]["scans_root"] == str(scans.resolve())
    regions = _regions(out)
    for im, scan in zip(coco["images"], ("a.tiff", "line.tiff", "b.tiff")):
        img = _drawn(pngs, im["file_name"])
        assert (img.shape[1], img.shape[0]) == (im["width"], im["height"]) == ((500, 200) if scan == "b.tiff"
                                                                               else (600, 200))
        assert regions[scan]
        _shows_the_cargo(img, regions[scan])


def test_coco_images_of_an_exif_turned_jpeg_are_drawn_turned(tmp_path, heuristic_model_1ch):
    """A JPEG stored 320 wide and turned by its EXIF orientation is shown 128 wide: its PNG is drawn so (no EXIF in it
    for a tool to apply again)."""
    (tmp_path / "bags").mkdir()
    img = np.full((128, 320), 230, np.uint8)
    img[20:60, 200:260] = 1
    (tmp_path / "bags" / "bag.jpg").write_bytes(_exif_jpeg(img, 6))
    out, preds, pngs = tmp_path / "r.csv", tmp_path / "p.json", tmp_path / "pngs"
    assert score.main(_args(tmp_path / "bags", heuristic_model_1ch, out, coco=str(preds), coco_images=str(pngs))) == 0
    drawn = _drawn(pngs, "bag.png")
    assert drawn.dtype == np.uint8 and drawn.shape == (320, 128)
    assert drawn[200:260, 68:108].mean() < 60 < 200 < drawn[:150].mean()   # the block turned with the picture


def test_the_labellers_export_of_the_pngs_reads_back_as_the_original_scans(tmp_path, heuristic_model):
    """The way back: an export naming the PNGs (as CVAT keeps them, or with Label Studio's upload prefix) gives a
    dataset of the ORIGINAL 16-bit scans (training needs the attenuation), boxes the regions; a.png and a.tiff both
    scored are drawn as a.npy.png and a.tiff.png, each coming back to its own; a.tiff beside a 16-bit a.png (here
    failed: one energy) is never drawn as a.png, which would come back as that other scan. A rendering with no
    original there (--images naming the PNGs' folder) is refused, never trained on."""
    from detector.scan import write_scan
    from conftest import make_scan_counts
    scans, pngs = tmp_path / "scans", tmp_path / "labelling"
    write_test_scan(scans / "a.tiff", dense=True, seed=1)
    write_test_scan(scans / "a.npy", dense=True, seed=3, width=550)
    write_scan(scans / "a.png", make_scan_counts(channels=1, dense=True, seed=4), i0=50000.0, pitch_mm=5.0)
    write_test_scan(scans / "sub" / "b.tiff", dense=True, seed=2, width=500)
    out, preds = tmp_path / "results.csv", tmp_path / "preds.json"
    assert score.main(_args(scans, heuristic_model, out, coco=str(preds), coco_images=str(pngs))) == 0
    coco = json.loads(preds.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["a.npy.png", "a.tiff.png", "sub/b.png"]
    coco["images"][1]["file_name"] = "/data/upload/1/3f2a1b4c-a.tiff.png"   # Label Studio's name of an upload
    export = tmp_path / "export.json"
    export.write_text(json.dumps(coco))
    ds = tmp_path / "ds"
    convert(export, ds, images=scans)
    with open(ds / "manifest.csv", newline="") as f:
        rows = {r["path"]: json.loads(r["boxes"] or "[]") for r in csv.DictReader(f)}
    assert sorted(rows) == ["../scans/a.npy", "../scans/a.tiff", "../scans/sub/b.tiff"]
    regions = _regions(out)
    assert {Path(p).name: b for p, b in rows.items()} == regions and all(regions.values())

    with pytest.raises(ScanError, match="8-bit picture drawn by score --coco-images"):
        convert(preds, tmp_path / "ds2", images=pngs)
    shutil.copy(preds, pngs / "preds.json")   # beside the PNGs, no --images: not the PNGs either
    with pytest.raises(ScanError, match="--images names the original scans' folder"):
        convert(pngs / "preds.json", tmp_path / "ds3")


def test_coco_images_refuses_a_folder_among_the_scans(tmp_path, heuristic_model, capsys):
    """The PNGs mirror SRC's names: drawn into SRC they would sit among (a PNG scan: replace) the scans, and inside a
    scanned folder the next run scores them as trucks. Without --coco there is nothing to name them."""
    scans = tmp_path / "scans"
    write_test_scan(scans / "a.tiff", seed=1)
    out, preds = tmp_path / "r.csv", tmp_path / "p.json"
    for where, why in ((scans, "is SRC"), (scans / "pngs", "inside SRC")):
        assert score.main(_args(scans, heuristic_model, out, coco=str(preds), coco_images=str(where))) == 2
        assert why in capsys.readouterr().err
    assert score.main(_args(scans, heuristic_model, out, coco_images=str(tmp_path / "pngs"))) == 2
    assert "--coco-images applies to --coco" in capsys.readouterr().err
    assert not out.exists() and not (scans / "a.png").exists()


def test_pngs_drawn_below_the_scans_folder_are_not_scans_the_export_left_out(tmp_path, heuristic_model):
    """A manifest SRC's PNGs may be drawn below its folder (it is not listed, so not scored again); the way back with
    --images that folder takes the original scans and does not count the PNGs as scans the export left out."""
    scans = tmp_path / "scans"
    write_test_scan(scans / "a.tiff", dense=True, seed=1)
    (scans / "manifest.csv").write_text("path,label\na.tiff,1\n")
    out, preds, pngs = tmp_path / "r.csv", tmp_path / "p.json", scans / "labelling"
    assert score.main(_args(scans / "manifest.csv", heuristic_model, out, coco=str(preds), coco_images=str(pngs))) == 0
    assert (pngs / "a.png").is_file()
    s = convert(preds, tmp_path / "ds", images=scans)
    assert [r["path"] for r in s.rows] == ["../scans/a.tiff"] and s.unlisted == [] and s.left_out == []
