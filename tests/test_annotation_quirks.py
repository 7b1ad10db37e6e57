"""`detector manifest` on the quirks of exports as the tools write them: Label Studio's and CVAT's COCO, LabelMe's
Windows paths, YOLO's class names, VOC's flags and suffix-less file names."""
from __future__ import annotations

import json

import pytest

from detector.labels_to_dataset import convert
from detector.scan import ScanError
from test_annotations import H, W, _ann, _coco, _im, _rows, _scans


def test_label_studio_names_with_its_upload_hash_and_windows_folders_find_the_original_images(tmp_path):
    _scans(tmp_path / "scans", 2)
    src = _coco(tmp_path / "export" / "result.json",
                [_im(0, "images\\cb0618f6-s0.tiff"),   # "Export COCO" before 1.16: images\HASH-NAME
                 _im(1, "..\\..\\label-studio\\media\\upload\\4\\1a2b3c4d-s1.tiff")], [_ann(1)])   # 1.16 on
    s = convert(src, tmp_path / "ds", images=tmp_path / "scans")
    assert [(r["path"], r["label"]) for r in _rows(tmp_path / "ds")] == [("../scans/s0.tiff", "0"),
                                                                         ("../scans/s1.tiff", "1")]
    assert s.left_out == []


def test_cvat_coco_boxes_with_empty_segmentation_and_attributes(tmp_path):
    _scans(tmp_path / "images", 2)
    ann = {"id": 1, "image_id": 2, "category_id": 1, "segmentation": [], "area": 1200.0, "bbox": [10, 20, 30, 40],
           "iscrowd": 0, "attributes": {"occluded": False, "rotation": 0.0}}
    src = _coco(tmp_path / "annotations" / "instances_default.json",
                [{**_im(1, "s0.tiff"), "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0},
                 _im(2, "s1.tiff")], [ann])   # CVAT's image ids start at 1
    convert(src, tmp_path / "ds")
    assert [(r["label"], r["boxes"], r["mask"]) for r in _rows(tmp_path / "ds")] == [
        ("0", "", ""), ("1", "[[10,20,40,60]]", "")]


def test_labelme_with_a_windows_absolute_image_path_finds_the_image_beside_its_json(tmp_path):
    _scans(tmp_path / "lm", 1)
    (tmp_path / "lm" / "s0.json").write_text(json.dumps({
        "imagePath": "C:\\Users\\officer\\Desktop\\scans\\s0.tiff", "imageWidth": W, "imageHeight": H,
        "imageData": None, "shapes": [{"label": "gun", "shape_type": "rectangle", "points": [[5, 5], [25, 25]]}]}))
    convert(tmp_path / "lm", tmp_path / "ds")
    assert [(r["path"], r["boxes"]) for r in _rows(tmp_path / "ds")] == [("../lm/s0.tiff", "[[5,5,25,25]]")]


def test_yolo_classes_txt_and_data_yaml_that_disagree_are_refused_naming_both(tmp_path):
    _scans(tmp_path / "images", 1)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "s0.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    (tmp_path / "classes.txt").write_text("gun\ndrugs\n")
    (tmp_path / "data.yaml").write_text("names:\n  0: gun\n  1: drugs\n")   # the same classes, as a mapping
    convert(tmp_path, tmp_path / "ds")
    assert _rows(tmp_path / "ds")[0]["anomaly_type"] == "drugs"
    (tmp_path / "data.yaml").write_text("names: [drugs, gun]\n")
    with pytest.raises(ScanError, match=r"classes\.txt.*data\.yaml|data\.yaml.*classes\.txt"):
        convert(tmp_path, tmp_path / "ds", force=True)


def test_voc_difficult_and_truncated_objects_count_and_a_filename_without_suffix_is_found(tmp_path):
    _scans(tmp_path / "JPEGImages", 1)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "s0.xml").write_text(
        f"<annotation><folder>x</folder><filename>s0</filename><size><width>{W}</width><height>{H}</height>"
        "<depth>1</depth></size><object><name>gun</name><pose>Unspecified</pose><truncated>1</truncated>"
        "<difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax></bndbox>"
        "</object></annotation>")
    convert(tmp_path / "Annotations", tmp_path / "ds")   # a hard-to-see anomaly is still one
    assert [(r["path"], r["label"], r["boxes"]) for r in _rows(tmp_path / "ds")] == [
        ("../JPEGImages/s0.tiff", "1", "[[0,0,20,10]]")]


def test_a_data_yaml_of_splits_alone_leaves_the_names_to_classes_txt(tmp_path):
    _scans(tmp_path / "images", 1)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "s0.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    (tmp_path / "classes.txt").write_text("gun\ndrugs\n")
    (tmp_path / "data.yaml").write_text("nc: 2\n")
    convert(tmp_path, tmp_path / "ds")
    assert _rows(tmp_path / "ds")[0]["anomaly_type"] == "drugs"


def test_a_name_whose_folder_is_there_is_never_taken_for_a_scan_of_its_file_name_elsewhere(tmp_path):
    """scans/sub/s0.tiff deleted since it was labelled: its box is never put on scans/s0.tiff, another truck of that
    file name (the file-name-alone fallback is for a tool's folders that are not there: Windows, upload paths)."""
    _scans(tmp_path / "scans", 2)
    (tmp_path / "scans" / "sub").mkdir()
    src = _coco(tmp_path / "export" / "result.json", [_im(1, "sub/s0.tiff"), _im(2, "s1.tiff")], [_ann(1)])
    s = convert(src, tmp_path / "ds", images=tmp_path / "scans")
    assert [(r["path"], r["label"]) for r in _rows(tmp_path / "ds")] == [("../scans/s1.tiff", "0")]
    assert [k for _, k, _ in s.left_out] == ["missing image"]


def test_a_date_prefix_is_no_label_studio_upload_hash(tmp_path):
    """20240101-s0.tiff (a scanner's date-named file, since moved) is not Label Studio's HASH-s0.tiff: never s0.tiff;
    an all-digit hash is still taken inside Label Studio's upload folder."""
    _scans(tmp_path / "scans", 2)
    src = _coco(tmp_path / "export" / "result.json",
                [_im(1, "20240101-s0.tiff"), _im(2, "/data/upload/3/20240102-s1.tiff")], [_ann(1)])
    s = convert(src, tmp_path / "ds", images=tmp_path / "scans")
    assert [(r["path"], r["label"]) for r in _rows(tmp_path / "ds")] == [("../scans/s1.tiff", "0")]
    assert [k for _, k, _ in s.left_out] == ["missing image"]


def test_two_names_that_find_one_scan_are_both_left_out(tmp_path):
    """Two uploads of one file name (two trucks' s0.tiff from two folders, cb0618f6-s0.tiff and 1a2b3c4d-s0.tiff) both
    reach --images' s0.tiff: which is that truck is unknown, so neither labels it (the first used to)."""
    _scans(tmp_path / "scans", 2)
    src = _coco(tmp_path / "export" / "result.json",
                [_im(1, "images\\cb0618f6-s0.tiff"), _im(2, "images\\1a2b3c4d-s0.tiff"), _im(3, "s1.tiff"),
                 _im(4, "s1.tiff")], [_ann(1)])
    s = convert(src, tmp_path / "ds", images=tmp_path / "scans")
    assert [(r["path"], r["label"]) for r in _rows(tmp_path / "ds")] == [("../scans/s1.tiff", "0")]
    assert [k for _, k, _ in s.left_out] == ["ambiguous", "ambiguous", "listed again"]
    assert "cb0618f6-s0.tiff" in s.left_out[0][2] and "1a2b3c4d-s0.tiff" in s.left_out[0][2]
