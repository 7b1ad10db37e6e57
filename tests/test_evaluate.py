"""`detector eval` on a crafted results table with hand-computed metrics."""
import csv
import html
import json
import re
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from detector import evaluate
from detector import metrics as M
from detector.scan import write_scan

COLS = ["path", "score", "decision", "threshold", "regions", "latency_ms", "error"]
TRUE_BOX = [5, 5, 15, 15]
# name, label, score, anomaly_type, cargo, best region
ROWS = [("n0", 0, 0.1, "", "wood", None), ("n1", 0, 0.2, "", "wood", None),
        ("n2", 0, 0.3, "", "metal", None), ("n3", 0, 0.4, "", "metal", None),
        ("a0", 1, 0.35, "cash", "wood", [40, 20, 50, 30]),
        ("a1", 1, 0.5, "cash", "metal", [0, 0, 10, 10]),  # IoU 1/7 with TRUE_BOX: a hit
        ("a2", 1, 0.6, "drugs", "wood", [14, 14, 25, 25])]  # IoU 1/220: overlap but no hit
THRESHOLD = 0.38


def _dataset(tmp_path, failed=()):
    data = tmp_path / "data"
    counts = np.full((2, 40, 120), 50000, np.uint16)
    counts[:, 5:15, 5:15] = 3000
    data.mkdir()
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "boxes", "anomaly_type", "cargo_class"])
        for name, label, _, kind, cargo, _ in ROWS:
            write_scan(data / "images" / f"{name}.tiff", counts, i0=(60000.0, 60000.0))
            w.writerow([f"images/{name}.tiff", label, json.dumps([TRUE_BOX]) if label else "", kind, cargo])
    res = tmp_path / "results.csv"
    with open(res, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        for name, label, score, _, _, box in ROWS:
            path = str((data / "images" / f"{name}.tiff").resolve())
            if name in failed:
                w.writerow([path, "", "INSPECT", "", "[]", "1.0", "truncated TIFF"])
                continue
            regions = [{"box": box, "score": score}, {"box": [100, 0, 110, 10], "score": score / 2}] if box else []
            w.writerow([path, score, "INSPECT" if score >= THRESHOLD else "RELEASE", THRESHOLD,
                        json.dumps(regions), "12.0", ""])
    return data, res


def test_eval_metrics_match_hand_computed(tmp_path):
    data, res = _dataset(tmp_path)
    out = tmp_path / "report"
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    m = json.loads((out / "metrics.json").read_text())
    o = m["overall"]
    assert (o["n"], o["n_normal"], o["n_anomalous"], o["n_failed"]) == (7, 4, 3, 0)
    assert o["auroc"] == pytest.approx(11 / 12) and o["ap"] == pytest.approx((1 + 1 + 0.75) / 3)
    lo, hi = o["intervals"]["auroc"]                 # 7 scans: a wide interval around the figure
    assert lo <= 11 / 12 <= hi <= 1.0 and hi - lo > 0.1 and o["intervals"]["level"] == 0.95
    assert o["detection_at_far"][0]["false_alarm_rate"] == 0.01
    assert o["detection_at_far"][0]["detection_rate"] == pytest.approx(2 / 3)
    assert o["far_at_detection"][0]["false_alarm_rate"] == 0.25  # 90% of 3 -> all 3 -> 0.4 alarms
    assert o["decisions"] == {"inspected": 3, "detection_rate": pytest.approx(2 / 3), "false_alarm_rate": 0.25,
                              "tp": 2, "fn": 1, "fp": 1, "tn": 3}
    loc = m["localisation"]
    assert loc["n"] == 2 and loc["hit_rate"] == 0.5 and loc["overlap_rate"] == 1.0 and loc["criterion"] == "iou>=0.1"
    assert m["by_anomaly_type"]["cash"]["n"] == 6 and m["by_anomaly_type"]["cash"]["auroc"] == pytest.approx(7 / 8)
    assert m["by_anomaly_type"]["drugs"]["auroc"] == 1.0
    metal = m["by_cargo"]["metal"]  # n2 0.3, n3 0.4 vs a1 0.5
    assert metal["auroc"] == 1.0 and metal["false_alarm_rate"] == 0.5 and metal["detection_rate"] == 1.0
    html = (out / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", html)
    # roc + histogram + one miss (a0) + one false alarm (n3), all inlined
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "a0.tiff" in html and "n3.tiff" in html and (out / "roc.png").is_file()


def test_eval_failures_fail_closed_and_single_class(tmp_path):
    data, res = _dataset(tmp_path, failed=("n0", "a0"))
    m = evaluate.evaluate(res, data / "manifest.csv", tmp_path / "r1", thumbs=False)
    assert "Failed scans (2, counted as INSPECT)" in (tmp_path / "r1" / "report.html").read_text()
    assert m["overall"]["n_failed"] == 2 and {f["error"] for f in m["failures"]} == {"truncated TIFF"}
    assert ("2 scans failed to score: counted as INSPECT (fail-closed), so 1 of the detections and 1 of the false "
            "alarms are failures, not scores") in m["notes"]
    lo, hi = m["overall"]["intervals"]["auroc"]     # around the fail-closed figure, not the scored rows' alone
    assert lo <= m["overall"]["auroc"] <= hi
    assert m["overall"]["detection_at_far"][0]["detection_rate"] is None   # 4 normals, one failed: no 1 % point
    assert m["overall"]["intervals"]["detection_at_1pct"] is None          # and so no interval around it
    assert m["overall"]["decisions"]["tp"] == 3 and m["overall"]["decisions"]["fp"] == 2
    # only the normal rows: AUROC undefined, reported as null with a note
    lines = res.read_text().splitlines()
    res.write_text("\n".join(lines[:5]) + "\n")
    m = evaluate.evaluate(res, data, tmp_path / "r2", thumbs=False)
    assert m["overall"]["auroc"] is None and any("undefined" in n for n in m["overall"]["notes"])
    assert m["overall"]["intervals"]["auroc"] is None
    assert m["unscored_truth"] == 3
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["overall"]["auroc"] is None



def test_a_run_where_every_scan_failed_is_reported_without_warnings(tmp_path):
    import warnings
    data, res = _dataset(tmp_path, failed=tuple(name for name, *_ in ROWS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # matplotlib warned of an empty legend on the command line
        m = evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
    assert m["overall"]["n_failed"] == len(ROWS) and (tmp_path / "r" / "hist.png").is_file()

def test_plain_layout_and_relative_paths(tmp_path):
    counts = np.full((2, 20, 40), 50000, np.uint16)
    counts[:, 10:, 10:30] = 9000
    for sub in ("normal", "anomalous"):
        write_scan(tmp_path / "ds" / sub / f"{sub}1.tiff", counts)
    res = tmp_path / "elsewhere" / "results.csv"
    res.parent.mkdir()
    res.write_text(",".join(COLS) + "\n/other/machine/normal/normal1.tiff,0.2,RELEASE,0.5,[],1,\n"
                   "/other/machine/anomalous/anomalous1.tiff,0.7,INSPECT,0.5,[],1,\n")
    m = evaluate.evaluate(res, tmp_path / "ds", tmp_path / "r", thumbs=False)
    assert m["overall"]["auroc"] == 1.0 and m["unmatched_results"] == 0


def test_a_damaged_results_row_is_named(tmp_path):
    data, res = _dataset(tmp_path)
    lines = res.read_text().splitlines()
    cells = lines[3].split(",")
    cells[1] = "0.4x"                                   # the score cell of the third result row
    res.write_text("\n".join([*lines[:3], ",".join(cells), *lines[4:]]) + "\n")
    with pytest.raises(ValueError, match=r"results\.csv: row 4: could not convert string to float: '0\.4x'"):
        evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)



def test_a_row_cut_off_by_an_interrupted_run_is_named_not_read_as_a_score(tmp_path):
    data, res = _dataset(tmp_path)
    text = res.read_text()
    res.write_text(text[:text.rindex("0.6") + 1])       # the last row (a2, score 0.6) cut after '0'
    with pytest.raises(ValueError, match=r"row 8 is cut off after '.*a2\.tiff'.*run the same score command"):
        evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)

def test_two_rows_for_one_scan_are_refused(tmp_path):
    data, res = _dataset(tmp_path)
    lines = res.read_text().splitlines()
    other = [ln.replace(",0.1,", ",0.97,") for ln in lines[1:]]    # another model's run appended to the CSV
    res.write_text("\n".join(lines + other) + "\n")
    with pytest.raises(ValueError, match=r"results\.csv: rows 2 and 9 both give a result for images/n0\.tiff"):
        evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(tmp_path / "r"))) == 2


def test_a_results_csv_saved_by_a_spreadsheet_is_read(tmp_path):
    data, res = _dataset(tmp_path)
    res.write_bytes(b"\xef\xbb\xbf" + res.read_bytes())           # UTF-8 byte-order mark, as Excel saves it
    assert evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)["overall"]["auroc"] == pytest.approx(11 / 12)


def test_results_scored_on_a_windows_station_match(tmp_path):
    data, res = _dataset(tmp_path)
    text = res.read_text().replace(str((data / "images").resolve()) + "/", "D:\\station\\data\\images\\")
    res.write_text(text)
    assert "D:\\station\\data\\images\\a0.tiff" in text
    m = evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
    assert (m["overall"]["n"], m["unmatched_results"]) == (7, 0) and m["overall"]["auroc"] == pytest.approx(11 / 12)


def test_a_single_class_run_leaves_no_earlier_roc_behind(tmp_path, capsys):
    data, res = _dataset(tmp_path)
    out = tmp_path / "report"
    evaluate.evaluate(res, data, out, thumbs=False)
    assert (out / "roc.png").is_file()
    res.write_text("\n".join(res.read_text().splitlines()[:5]) + "\n")   # the normal rows only: no ROC curve
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    assert not (out / "roc.png").exists()                                 # not the first run's curve
    assert "(metrics.json, hist.png, report.html)" in capsys.readouterr().out


@pytest.mark.parametrize("cell", ['{"box": [0, 0, 10, 10], "score": 0.5}', '[[0, 0, 10, 10]]', '[{"box": [0, 0, 10]}]'])
def test_a_regions_cell_of_another_shape_is_named(tmp_path, cell):
    data, res = _dataset(tmp_path)
    with open(res, newline="") as f:
        rows = list(csv.reader(f))
    rows[6][4] = cell                                       # a1, a detected anomaly with a true box
    with open(res, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(ValueError, match=r"results\.csv: row 7: regions .* is not a JSON list of"):
        evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)


def test_a_truth_that_is_no_dataset_says_what_would_be(tmp_path, capsys):
    """--truth at the dataset's images/ folder names the dataset; a folder of scans without labels says how to
    label them; a path that does not exist says so (before: one 'no manifest.csv' line for all three)."""
    data, res = _dataset(tmp_path)
    (tmp_path / "scans").mkdir()
    (data / "images" / "n0.tiff").rename(tmp_path / "scans" / "n0.tiff")
    for truth, said in ((data / "images", f"lists these scans: pass the dataset folder {data}"),
                        (tmp_path / "scans", "scans but no labels: put them in normal/ and anomalous/ sub-folders"),
                        (tmp_path / "nowhere", "no such dataset folder or manifest.csv")):
        assert evaluate.main(Namespace(results=str(res), truth=str(truth), out=str(tmp_path / "r"))) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"detector eval: {truth}: ") and said in err and len(err.splitlines()) == 1, err
    assert evaluate.main(Namespace(results=str(tmp_path / "gone.csv"), truth=str(data), out=str(tmp_path / "r"))) == 2
    assert capsys.readouterr().err.startswith(f"detector eval: {tmp_path / 'gone.csv'}: no such results file")
    assert not (tmp_path / "r").exists()         # a mistake leaves no empty report folder behind


def test_truth_boxes_come_from_masks_at_any_bit_depth(tmp_path):
    """A 16-bit truth mask (saved from a uint16 array, 0/255 or 0/1) was read as grey, divided by 256, and gave no
    box, so its scan silently dropped out of the localisation figures; training reads masks the same way now."""
    import cv2
    for name, dtype, value in (("m8.png", np.uint8, 255), ("m16.png", np.uint16, 255), ("m01.png", np.uint16, 1)):
        m = np.zeros((40, 60), dtype)
        m[10:20, 30:45] = value
        cv2.imwrite(str(tmp_path / name), m)
        t = evaluate.Truth(path=tmp_path / "s.tiff", rel="s.tiff", label=1, mask=tmp_path / name)
        assert evaluate._truth_boxes(t) == [[30, 10, 45, 20]], name


def test_scans_of_the_manifests_train_and_val_splits_are_noted(tmp_path, capsys):
    """A manifest with a split column, scored whole as `detector score DATA` does and evaluated as its printed next
    command says: the training and validation scans were judged with the test scans without a word."""
    data, res = _dataset(tmp_path)
    rows = (data / "manifest.csv").read_text().splitlines()
    splits = ["split", "train", "", "val", "test", "test", "test", "test"]     # an empty cell is train
    (data / "manifest.csv").write_text("\n".join(f"{r},{s}" for r, s in zip(rows, splits)) + "\n")
    out = tmp_path / "report"
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    note = "3 of the 7 scans are in the train or val split of the truth's manifest"
    assert note in capsys.readouterr().err
    assert any(note in n for n in json.loads((out / "metrics.json").read_text())["notes"])
    assert html.escape(note) in (out / "report.html").read_text()
    (data / "manifest.csv").write_text("\n".join(f"{r},{s if i == 0 else 'test'}" for i, (r, s)
                                                  in enumerate(zip(rows, splits))) + "\n")
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    assert "split" not in capsys.readouterr().err                              # a test split alone: nothing to say


def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    """--out report.html (or the results file itself): a FileExistsError traceback."""
    data, res = _dataset(tmp_path)
    for out in (res, tmp_path / "report.html"):
        out.touch()
        assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 2
        assert capsys.readouterr().err == (f"detector eval: --out {out} is a file: give a folder for metrics.json, "
                                           "roc.png, hist.png and report.html\n")


def test_the_summary_line_says_the_false_alarm_rate_detection_was_measured_at(tmp_path, capsys):
    """200 clean trucks saturated at 1.0, which no threshold releases: the line read "detection 100.0% at 1% false
    alarms" for a model that inspects every truck (the measured rate was only in a note above it)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [(f"n{i}", 0, 1.0) for i in range(200)] + [(f"a{i}", 1, 1.0) for i in range(10)]
    (data / "manifest.csv").write_text("path,label\n" + "".join(f"images/{n}.tiff,{y}\n" for n, y, _ in rows))
    res = tmp_path / "results.csv"
    res.write_text(",".join(COLS) + "\n" + "".join(f"{data}/images/{n}.tiff,{s},INSPECT,0.5,[],1,\n"
                                                   for n, _, s in rows))
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(tmp_path / "r"))) == 0
    assert "detection 100.0% at 100.0% false alarms (1% not reachable: see the notes)" in capsys.readouterr().out


def test_report_thumbnails_name_scans_by_their_path_in_the_dataset(tmp_path):
    """Two sites' scans named 0001.tiff: both missed trucks were captioned "0001.tiff", and the auditor could not
    tell which one the report showed."""
    data = tmp_path / "data"
    counts = np.full((2, 40, 120), 50000, np.uint16)
    rows = [("site1/0001.tiff", 1, 0.1), ("site2/0001.tiff", 1, 0.2), ("site1/0002.tiff", 0, 0.9),
            ("site2/0002.tiff", 0, 0.3)]
    for rel, _, _ in rows:
        write_scan(data / rel, counts, i0=(60000.0, 60000.0))
    (data / "manifest.csv").write_text("path,label\n" + "".join(f"{rel},{y}\n" for rel, y, _ in rows))
    res = tmp_path / "results.csv"
    res.write_text(",".join(COLS) + "\n" + "".join(
        f"{data / rel},{s},{'INSPECT' if s >= 0.5 else 'RELEASE'},0.5,[],1,\n" for rel, _, s in rows))
    evaluate.evaluate(res, data, tmp_path / "r")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", (tmp_path / "r" / "report.html").read_text())
    assert sorted(c.split(":")[0] for c in captions) == ["site1/0001.tiff", "site1/0002.tiff", "site2/0001.tiff"]


def test_the_report_names_the_model_that_scored_the_results(tmp_path, heuristic_model, normal_scan_path,
                                                          anomalous_scan_path, monkeypatch):
    """report.html and metrics.json named the results and the truth but not the model: two models' reports on the
    same scans could not be told apart. The model comes from the routing file `detector score` writes beside the CSV."""
    import hashlib
    import shutil

    from detector import score
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(normal_scan_path, data / "images" / "n.tiff")
    shutil.copy(anomalous_scan_path, data / "images" / "a.tiff")
    (data / "manifest.csv").write_text("path,label\nimages/n.tiff,0\nimages/a.tiff,1\n")
    res = tmp_path / "results.csv"
    args = Namespace(src=str(data), model=str(heuristic_model), out=str(res), jsonl=None, overlays=None,
                     overlays_flagged=False, policy=None, threshold=None, threads=1, workers=1, no_resume=False)
    assert score.main(args) == 0
    sha = hashlib.sha256(heuristic_model.read_bytes()).hexdigest()
    m = evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
    assert m["model"] == {"path": str(heuristic_model), "sha256": sha}
    page = (tmp_path / "r" / "report.html").read_text()
    assert f"model: <code>{html.escape(str(heuristic_model))}</code> (sha256 {sha[:12]})" in page
    monkeypatch.chdir(tmp_path)                                 # typed relative: named absolute, since a report is
    args.model, args.out = heuristic_model.name, "rel.csv"      # read later, from elsewhere
    shutil.copy(heuristic_model, tmp_path / heuristic_model.name)
    assert score.main(args) == 0
    m = evaluate.evaluate("rel.csv", "data", "r2", thumbs=False)
    assert (m["results"], m["truth"], m["model"]["path"]) == (
        str(tmp_path / "rel.csv"), str(data / "manifest.csv"), str(tmp_path / heuristic_model.name))
    (tmp_path / "results.csv.routing.json").unlink()            # a CSV from elsewhere: said, not guessed
    m = evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
    assert m["model"] is None and "model: unknown" in (tmp_path / "r" / "report.html").read_text()


def test_a_scan_whose_name_is_not_utf8_is_matched_to_its_truth(tmp_path, heuristic_model, normal_scan_path,
                                                                 anomalous_scan_path):
    """`detector score` writes b'tr\\xfcck.tiff' (a Latin-1 name) as tr\\xfcck.tiff in its UTF-8 CSV: eval matched
    that row to no scan of the plain layout that holds the file, and left both out of the figures."""
    import os
    import shutil

    from detector import score
    data = tmp_path / "data"
    (data / "normal").mkdir(parents=True)
    (data / "anomalous").mkdir()
    shutil.copy(normal_scan_path, data / "normal" / "n.tiff")
    try:
        with open(os.path.join(os.fsencode(data / "anomalous"), b"tr\xfcck.tiff"), "wb") as f:
            f.write(anomalous_scan_path.read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    res = tmp_path / "results.csv"
    args = Namespace(src=str(data), model=str(heuristic_model), out=str(res), jsonl=None, overlays=None,
                     overlays_flagged=False, policy=None, threshold=1.0, threads=1, workers=1, no_resume=False)
    assert score.main(args) == 0
    m = evaluate.evaluate(res, data, tmp_path / "r")
    assert (m["overall"]["n"], m["unmatched_results"], m["unscored_truth"]) == (2, 0, 0)
    assert "anomalous/tr\\xfcck.tiff" in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")


def test_the_scans_left_out_are_named_not_only_counted(tmp_path):
    """"2 truth scans have no result row": the auditor had to diff the CSV against the manifest to find which trucks
    were never scored, and which rows matched no truth."""
    data, res = _dataset(tmp_path)
    lines = res.read_text().splitlines()
    stray = lines[1].replace("n0.tiff", "zz.tiff")
    res.write_text("\n".join([lines[0], *lines[3:], stray]) + "\n")     # n0 and n1 not scored, zz not in the truth
    m = evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
    assert m["unscored"] == ["images/n0.tiff", "images/n1.tiff"]
    assert (m["unscored_truth"], m["unmatched_results"]) == (2, 1)
    assert [p.rsplit("/", 1)[-1] for p in m["unmatched"]] == ["zz.tiff"]
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Truth scans without a result (2, left out)" in page and "Result rows without truth (1, left out)" in page


def test_a_truth_manifest_reaching_one_scan_twice_is_refused(tmp_path):
    """Two rows through a link (images/n0.tiff and alias/n0.tiff, alias -> images) are one scan: eval kept the
    second row's label for the result and reported the first as a truth scan without a result."""
    data, res = _dataset(tmp_path)
    (data / "alias").symlink_to(data / "images", target_is_directory=True)
    with open(data / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerow(["alias/n0.tiff", 1, json.dumps([TRUE_BOX]), "cash", "wood"])
    with pytest.raises(ValueError, match=r"manifest\.csv: row 9: alias/n0\.tiff is the scan of row 2 \(images/n0\.tiff"):
        evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(tmp_path / "r"))) == 2


def test_names_composed_in_the_truth_and_decomposed_on_disk_match(tmp_path, heuristic_model, normal_scan_path,
                                                                  anomalous_scan_path):
    """A manifest typed on Linux spells ü composed (NFC); the scans copied from a Mac keep their decomposed names
    (NFD). Scoring the folder wrote the names as on disk, and eval matched none of them to the manifest's rows; scoring
    the manifest failed every such scan as not found."""
    import shutil
    import unicodedata

    from detector import score
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    names = {"müller_a.tiff": (anomalous_scan_path, 1), "müller_n.tiff": (normal_scan_path, 0)}
    for name, (src, _) in names.items():
        shutil.copy(src, data / "images" / unicodedata.normalize("NFD", name))
    with open(data / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([f"images/{unicodedata.normalize('NFC', n)}", label] for n, (_, label) in names.items())
    for src in (data / "images", data):   # the folder as found on disk, and the manifest
        res = tmp_path / f"results_{src.name}.csv"
        args = Namespace(src=str(src), model=str(heuristic_model), out=str(res), jsonl=None, overlays=None,
                         overlays_flagged=False, policy=None, threshold=None, threads=1, workers=1, no_resume=False)
        assert score.main(args) == 0
        assert "not found" not in res.read_text(encoding="utf-8")
        m = evaluate.evaluate(res, data, tmp_path / "r", thumbs=False)
        assert (m["overall"]["n"], m["unmatched_results"], m["unscored_truth"]) == (2, 0, 0), src
        assert m["overall"]["auroc"] == 1.0


def _a1_mask_a2_boxes(data, mask: np.ndarray, a2_boxes: str) -> tuple[Path, list]:
    """_dataset's manifest with a mask column: a1's truth the mask `mask` (a1.png, its boxes dropped), a2's the boxes
    cell `a2_boxes`; the manifest and its lines."""
    import cv2
    cv2.imwrite(str(data / "a1.png"), mask)
    manifest = data / "manifest.csv"
    rows = manifest.read_text().splitlines()
    rows[0] += ",mask"
    rows = [r + ("," if i else "") for i, r in enumerate(rows)]
    rows[6] = rows[6].replace(f'"{json.dumps([TRUE_BOX])}"', "") + "a1.png"
    rows[7] = rows[7].replace(f'"{json.dumps([TRUE_BOX])}"', a2_boxes)
    manifest.write_text("\n".join(rows) + "\n")
    return manifest, rows


def test_truth_that_cannot_place_an_anomaly_is_named_not_scored_as_a_miss(tmp_path, capsys):
    """An officer's mask drawn on a zoomed view (another size than the scan), a mask file that is missing, boxes in
    another pixel unit that lie outside the scan: training refuses each, eval scored the first and the last as
    localisation misses (IoU 0) and dropped the second, all without a word. They are now left out and named."""
    data, res = _dataset(tmp_path)
    big = np.zeros((80, 240), np.uint8)
    big[10:30, 10:30] = 255                                     # TRUE_BOX on a 2x view of the 120x40 scan
    manifest, rows = _a1_mask_a2_boxes(data, big, '"[[500, 500, 520, 520]]"')   # a2: boxes in mm
    out = tmp_path / "report"
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["localisation"]["n"] == 0
    note = next(n for n in m["notes"] if "cannot place" in n)
    assert note.startswith("2 detected anomalies whose truth cannot place the anomaly are left out of the localisation")
    assert "a1.png: mask is 240x80, scan is 120x40" in note and "box [500, 500, 520, 520] covers no pixel" in note
    assert note in capsys.readouterr().err
    rows[6] = rows[6].replace("a1.png", "gone.png")
    manifest.write_text("\n".join(rows) + "\n")
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    assert "gone.png: mask file not found" in capsys.readouterr().err


def test_truth_and_regions_of_a_scan_with_non_square_pixels_meet_in_the_files_pixels(tmp_path, heuristic_model,
                                                                                      normal_scan_path, monkeypatch):
    """A line scanner's TIFF of 4 x 5 mm pixels, squared by its reader (200 rows become 160). Its truth, boxes and a
    mask drawn on the file, was judged against regions in the squared grid (IoU 0.23 for a region on the block), and
    a mask at the file's size was left out as "mask is 600x200, scan is 600x160". Regions and truth are both in the
    file's pixels now, so a region on the block scores a high IoU; a mask drawn at the squared size (as training
    required) still places the anomaly; the report's thumbnails draw both on the squared picture."""
    import shutil

    import cv2
    from conftest import write_nonsquare_scan

    from detector import report, score
    data, box = tmp_path / "data", [400, 110, 480, 160]
    for name in ("boxes", "file", "squared"):
        write_nonsquare_scan(data / f"{name}.tiff", 4.0, 5.0, tuple(box))
    shutil.copy(normal_scan_path, data / "normal.tiff")
    for name, h, (y0, y1) in (("file", 200, (110, 160)), ("squared", 160, (88, 128))):
        mask = np.zeros((h, 600), np.uint8)
        mask[y0:y1, box[0]:box[2]] = 255
        cv2.imwrite(str(data / f"{name}.png"), mask)
    (data / "manifest.csv").write_text(f'path,label,mask,boxes\nboxes.tiff,1,,"{[box]}"\nfile.tiff,1,file.png,\n'
                                       "squared.tiff,1,squared.png,\nnormal.tiff,0,,\n")
    res = tmp_path / "results.csv"
    args = Namespace(src=str(data), model=str(heuristic_model), out=str(res), jsonl=None, overlays=None,
                     overlays_flagged=False, policy=None, threshold=None, threads=1, workers=1, no_resume=False)
    assert score.main(args) == 0
    m = evaluate.evaluate(res, data, tmp_path / "report", thumbs=False)
    assert not [n for n in m["notes"] if "cannot place" in n], m["notes"]
    loc = m["localisation"]
    assert loc["n"] == 3 and loc["hit_rate"] == 1.0 and loc["mean_iou"] > 0.6, loc
    drawn = []
    monkeypatch.setattr(report, "render", lambda att, **kw: drawn.append((att.shape, kw)) or np.zeros((9, 9, 3)))
    results = {Path(r.path).name: r for r in evaluate.load_results(res)}
    truth = {t.path.name: t for t in evaluate.load_truth(data)[0]}
    for name in ("boxes.tiff", "file.tiff", "squared.tiff"):
        evaluate._thumb(results[name], truth[name])
    for shape, kw in drawn:                                     # on the squared picture: the block at rows 88-128
        assert shape[1:] == (160, 600)
        assert M.iou(kw["truth_boxes"][0], [400, 88, 480, 128]) > 0.9, kw["truth_boxes"]
        assert M.iou(kw["regions"][0]["box"], [400, 88, 480, 128]) > 0.6, kw["regions"]


def test_results_of_other_scans_with_the_same_names_are_not_matched_to_the_truth(tmp_path, capsys):
    """A scanner names its files by sequence (scans/0001.tiff in every day's folder): results of one folder evaluated
    against another folder's manifest were matched by the relative name, so eval (and calibrate --truth) judged one
    day's trucks by another day's labels. The name-suffix match is for results scored elsewhere, whose paths name no
    file here; a result whose file is here and is not the truth's scan has no truth."""
    data, res = _dataset(tmp_path)
    other = tmp_path / "other_day"
    (other / "images").mkdir(parents=True)
    for p in (data / "images").iterdir():   # another day's trucks under the same names
        write_scan(other / "images" / p.name, np.full((2, 40, 120), 41000, np.uint16), i0=(60000.0, 60000.0))
    (other / "images" / "a1.tiff").write_bytes((data / "images" / "a1.tiff").read_bytes())   # one copied over
    text = res.read_text()
    res.write_text(text.replace(str((data / "images").resolve()), str((other / "images").resolve())))
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(tmp_path / "report"))) == 0
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["overall"]["n"] == 1 and m["unmatched_results"] == 6      # the copy of a1 is a1; the other trucks are not
    write_scan(other / "images" / "a1.tiff", np.full((2, 40, 120), 41000, np.uint16), i0=(60000.0, 60000.0))
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(tmp_path / "report"))) == 2
    assert f"no result in {res} matches a scan of" in capsys.readouterr().err
    windows = text.replace(str((data / "images").resolve()) + "/", "D:\\site\\images\\")   # scored on a station
    res.write_text(windows)
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(tmp_path / "report"))) == 0


def test_a_true_box_past_the_scans_edge_is_judged_on_the_scan(tmp_path):
    """A box an annotator dragged past the scan's left edge ([-100, 0, 10, 10] on a 120x40 scan: the anomaly lies at
    its edge) is clipped to the scan, as training clips it; unclipped, the region [0, 0, 10, 10] that covers the whole
    of it met IoU 0.09 and counted as a localisation miss."""
    data, res = _dataset(tmp_path)
    manifest = data / "manifest.csv"
    rows = manifest.read_text().splitlines()
    rows[6] = rows[6].replace(f'"{json.dumps([TRUE_BOX])}"', '"[[-100, 0, 10, 10]]"')   # a1, region [0, 0, 10, 10]
    manifest.write_text("\n".join(rows) + "\n")
    m = evaluate.evaluate(res, data, tmp_path / "report", thumbs=False)
    assert m["localisation"]["n"] == 2 and m["localisation"]["hit_rate"] == 0.5     # a1 hits, a2 does not
    assert m["localisation"]["mean_iou"] == pytest.approx((1.0 + 1 / 220) / 2)


def test_detected_anomalies_the_localisation_leaves_out_are_counted(tmp_path, capsys):
    """An anomalous scan's mask that marks no pixel (an export that lost the drawing; training refuses it) and an
    anomaly labelled with no box or mask were left out of the localisation without a word: 'localisation 100.0%'
    read as over every detected anomaly where it was over one of three."""
    data, res = _dataset(tmp_path)
    manifest, rows = _a1_mask_a2_boxes(data, np.zeros((40, 120), np.uint8), "")   # a1 blank, a2 a label alone
    rows.append("images/a3.tiff,1,\"[[5, 5, 15, 15]]\",cash,wood,")
    write_scan(data / "images" / "a3.tiff", np.full((2, 40, 120), 50000, np.uint16), i0=(60000.0, 60000.0))
    manifest.write_text("\n".join(rows) + "\n")
    with open(res, "a", newline="") as f:
        csv.writer(f).writerow([str((data / "images" / "a3.tiff").resolve()), 0.9, "INSPECT", THRESHOLD,
                                json.dumps([{"box": [5, 5, 15, 15], "score": 0.9}]), "12.0", ""])
    out = tmp_path / "report"
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["localisation"]["n"] == 1 and m["localisation"]["hit_rate"] == 1.0
    err = capsys.readouterr().err
    assert "a1.png: mask marks no pixel" in next(n for n in m["notes"] if "cannot place" in n)
    note = next(n for n in m["notes"] if "no true box or mask" in n)
    assert note == "1 detected anomalies have no true box or mask: left out of the localisation (measured on 1)"
    assert note in err


def test_an_inspection_a_risk_flag_forced_is_not_a_localisation_miss(tmp_path, capsys):
    """a0 scored 0.35 under its 0.38 threshold and was INSPECTed because a risk flag forced it (score --policy): the
    model detected nothing there, yet its region off the anomaly counted as a localisation miss of the model."""
    data, res = _dataset(tmp_path)
    rows = res.read_text().splitlines()
    rows[5] = rows[5].replace(",RELEASE,", ",INSPECT,")              # a0: forced
    res.write_text("\n".join(rows) + "\n")
    out = tmp_path / "report"
    assert evaluate.main(Namespace(results=str(res), truth=str(data), out=str(out))) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["localisation"]["n"] == 2 and m["localisation"]["hit_rate"] == 0.5
    assert m["overall"]["decisions"]["tp"] == 3                      # the station's routing still counts it
    note = ("1 anomalies INSPECTed under their threshold (a risk flag forced it) are left out of the localisation: "
            "the model detected nothing there")
    assert note in m["notes"] and note in capsys.readouterr().err


def test_metrics_per_cargo_class_and_anomaly_type_read_each_truth_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Grouping by cargo class (HS codes: thousands in an archive) or anomaly type went over every pair once per
    class: quadratic in the scans where the classes grow with them (20,000 scans, 2,000 classes: 25 s of 53)."""
    reads = {"cargo": 0, "anomaly_type": 0}

    class Counted(evaluate.Truth):
        def __getattribute__(self, name):
            if name in reads:
                reads[name] += 1
            return super().__getattribute__(name)
    n = 120
    truth = [Counted(tmp_path / f"t{i}.png", f"t{i}.png", i % 2, anomaly_type=f"type{i % 20}" if i % 2 else None,
                     cargo=f"HS{i % 60:04d}") for i in range(n)]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "decision", "threshold", "regions", "latency_ms", "error"])
        for t in truth:
            w.writerow([t.path, 0.3 + 0.2 * t.label + 0.001 * len(t.rel), "RELEASE", 0.9, "[]", 1.0, ""])
    monkeypatch.setattr(evaluate, "load_truth", lambda src: (truth, tmp_path / "manifest.csv"))
    m = evaluate.evaluate(tmp_path / "results.csv", tmp_path, tmp_path / "report", thumbs=False)
    assert len(m["by_cargo"]) == 60 and m["by_cargo"]["HS0001"]["n"] == 2 and len(m["by_anomaly_type"]) == 10
    assert m["by_anomaly_type"]["type1"]["n"] == n // 2 + 6
    assert reads["cargo"] <= 4 * n and reads["anomaly_type"] <= 6 * n, reads


def test_the_roc_marks_the_operating_point_the_results_were_routed_at(tmp_path, monkeypatch):
    """The ROC marked the points eval's own thresholds would give (1 %, 0.5 %, 0.1 % false alarms), not the one the
    model's threshold routed these trucks at: an officer could not see where the station runs. It is now marked."""
    from detector import report
    data, res = _dataset(tmp_path)
    drawn = []
    plot = report.plot_roc
    monkeypatch.setattr(report, "plot_roc", lambda curves, path, marks=(): drawn.append(list(marks)) or
                        plot(curves, path, marks))
    evaluate.evaluate(res, data, tmp_path / "report", thumbs=False)
    # 1 of 4 clean trucks and 2 of 3 anomalies inspected
    assert (0.25, pytest.approx(2 / 3), "as routed (model threshold)") in drawn[0]
