"""`detector score`: one row per file (failures included), fail-closed, resumable, streaming."""
import csv
import json
import shutil
from pathlib import Path
from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest

from detector import score
from detector.scan import write_scan


def _args(src, model, out, **kw):
    base = dict(src=str(src), model=str(model), out=str(out), jsonl=None, overlays=None, overlays_flagged=False,
                policy=None, threshold=None, threads=1, workers=2, no_resume=False)
    return Namespace(**{**base, **kw})


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == score.COLUMNS
        return {r["path"].rsplit("/", 1)[-1]: r for r in reader}


@pytest.fixture
def mixed_folder(tmp_path, normal_scan_path, anomalous_scan_path):
    d = tmp_path / "scans"
    (d / "sub").mkdir(parents=True)
    shutil.copy(normal_scan_path, d / "good_normal.tiff")
    shutil.copy(anomalous_scan_path, d / "sub" / "good_anomalous.tiff")
    data = (d / "good_normal.tiff").read_bytes()
    (d / "corrupt.tiff").write_bytes(data[: len(data) // 3])  # truncated
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("not an image at all\n")
    single = np.full((64, 256), 40000, np.uint16)
    single[20:, 50:150] = 9000
    write_scan(d / "single.png", single)  # 1 energy for a 2-energy model
    (d / "readme.txt").write_text("ignored: not a scan suffix")
    return d


def test_every_file_gets_a_row_and_failures_fail_closed(mixed_folder, heuristic_model, tmp_path, capsys):
    out, ov = tmp_path / "results.csv", tmp_path / "overlays"
    rc = score.main(_args(mixed_folder, heuristic_model, out, overlays=str(ov), jsonl=str(tmp_path / "r.jsonl")))
    assert rc == 0
    rows = _rows(out)
    assert set(rows) == {"good_normal.tiff", "good_anomalous.tiff", "corrupt.tiff", "empty.png", "notes.png",
                         "single.png"}
    for name in ("corrupt.tiff", "empty.png", "notes.png", "single.png"):
        assert rows[name]["decision"] == "INSPECT" and rows[name]["error"], name
        assert rows[name]["score"] == "" and rows[name]["regions"] == "[]"
    assert "energ" in rows["single.png"]["error"].lower() or "channel" in rows["single.png"]["error"].lower()
    good, bad = rows["good_normal.tiff"], rows["good_anomalous.tiff"]
    for r in (good, bad):
        assert r["error"] == "" and 0.0 <= float(r["score"]) <= 1.0 and float(r["latency_ms"]) > 0
        assert r["decision"] == ("INSPECT" if float(r["score"]) >= float(r["threshold"]) else "RELEASE")
    assert float(bad["score"]) > float(good["score"])
    assert bad["decision"] == "INSPECT" and good["decision"] == "RELEASE"
    regions = json.loads(bad["regions"])
    assert regions and all(len(x["box"]) == 4 and 0 <= x["score"] <= 1 for x in regions)
    assert sorted(p.relative_to(ov).as_posix() for p in ov.rglob("*.png")) == ["good_normal.png",
                                                                              "sub/good_anomalous.png"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 6
    text = capsys.readouterr().out
    assert "scanned 6" in text and "failed 4" in text and "detector eval" in text


def test_nothing_scored_exits_nonzero(tmp_path, heuristic_model):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.tiff").write_bytes(b"II*\x00garbage")
    (d / "b.png").write_bytes(b"")
    out = tmp_path / "r.csv"
    assert score.main(_args(d, heuristic_model, out)) == 1
    assert {r["error"] != "" for r in _rows(out).values()} == {True} and len(_rows(out)) == 2


class Counting:
    """Wraps an Inspector and counts inference calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):   # metadata and threshold, which the routing policy binds to
        return getattr(self.inner, name)

    def inspect(self, scan, threshold=None):
        self.calls += 1
        return self.inner.inspect(scan, threshold=threshold)


def test_resume_skips_done_files(tmp_path, heuristic_model, normal_scan_path, anomalous_scan_path, monkeypatch):
    from detector import runtime
    d = tmp_path / "scans"
    d.mkdir()
    for i in range(3):
        shutil.copy(normal_scan_path, d / f"n{i}.tiff")
    out = tmp_path / "results.csv"
    real, made = runtime.Inspector, []

    def counting(*a, **k):
        made.append(Counting(real(*a, **k)))
        return made[-1]
    monkeypatch.setattr(runtime, "Inspector", counting)
    assert score.main(_args(d, heuristic_model, out)) == 0
    first = out.read_bytes()
    shutil.copy(anomalous_scan_path, d / "new.tiff")
    assert score.main(_args(d, heuristic_model, out)) == 0
    assert [m.calls for m in made] == [3, 1]
    assert out.read_bytes().startswith(first) and len(_rows(out)) == 4  # old rows untouched
    assert score.main(_args(d, heuristic_model, out)) == 0 and made[-1].calls == 0
    assert score.main(_args(d, heuristic_model, out, no_resume=True)) == 0 and made[-1].calls == 4
    assert len(_rows(out)) == 4


def test_inference_error_is_a_failed_row(tmp_path, normal_scan_path):
    class Broken:
        metadata, threshold = {}, 0.5

        def inspect(self, scan, threshold=None):
            raise RuntimeError("onnxruntime fell over")
    items = [score.Item(normal_scan_path)]
    c = score.score_items(items, Broken(), tmp_path / "r.csv", progress=False)
    row = _rows(tmp_path / "r.csv")[normal_scan_path.name]
    assert (c.scanned, c.failed) == (1, 1)
    assert row["decision"] == "INSPECT" and row["error"] == "RuntimeError: onnxruntime fell over"


def test_a_run_keeps_the_count_and_the_first_few_failures_not_all_of_them(tmp_path, heuristic_model, normal_scan_path,
                                                                          monkeypatch):
    """Every failure's text (~200 bytes) and every overlay not written were held for the whole run though the summary
    prints 10 and 5: on an archive of millions of files with a share down, memory grew with the failures. The run
    keeps their counts and the first few (the error column has them all)."""
    import errno
    import os

    from detector.runtime import Inspector

    class Broken:
        metadata, threshold = {}, 0.5

        def inspect(self, scan, threshold=None):
            raise RuntimeError("onnxruntime fell over")
    items = [score.Item(normal_scan_path) for _ in range(30)]
    c = score.score_items(items, Broken(), tmp_path / "r.csv", progress=False)
    assert (c.scanned, c.failed) == (30, 30) and len(c.failures) == 10   # the summary prints 10
    assert c.failures[0] == f"{normal_scan_path}: RuntimeError: onnxruntime fell over"

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    items = [score.Item(normal_scan_path) for _ in range(8)]
    c = score.score_items(items, Inspector(heuristic_model), tmp_path / "o.csv", overlays=tmp_path / "ov",
                          progress=False)
    assert len(c.overlay_errors) == 5 and c.overlays_missing == 8        # and 5 of these


def test_policy_decides_with_manifest_tier_and_flags(tmp_path, normal_scan_path):
    class Fixed:
        asked: list = []

        def inspect(self, scan, threshold=None):
            self.asked.append(threshold)
            return SimpleNamespace(score=0.2, decision="RELEASE", threshold=0.5, reason="below", regions=[],
                                   heatmap=None)

    class Pol:
        def __init__(self):
            self.seen = []

        def threshold_for(self, tier):
            return {"white": 0.5, "high": 0.1}[tier]

        def decide(self, s, tier, flags):
            self.seen.append((tier, flags))
            return ("INSPECT", 0.1, "high risk") if "watchlist" in flags else ("RELEASE", 0.5, "ok")
    m = tmp_path / "manifest.csv"
    shutil.copy(normal_scan_path, tmp_path / "a.tiff")
    shutil.copy(normal_scan_path, tmp_path / "b.tiff")
    m.write_text('path,label,tier,risk_flags\na.tiff,0,white,\nb.tiff,0,high,"watchlist;late"\n')
    items, _ = score.discover(str(m))
    pol = Pol()
    score.score_items(items, Fixed(), tmp_path / "r.csv", policy=pol, progress=False)
    rows = _rows(tmp_path / "r.csv")
    assert pol.seen == [("white", []), ("high", ["watchlist", "late"])]
    assert Fixed.asked == [0.5, 0.1]      # each scan inspected at its tier's threshold (its regions are cut by it)
    assert (rows["a.tiff"]["decision"], rows["b.tiff"]["decision"]) == ("RELEASE", "INSPECT")
    assert rows["b.tiff"]["threshold"] == "0.100000000"


def test_discover_sources(tmp_path):
    d = tmp_path / "ds"
    for rel in ("normal/a.tiff", "anomalous/b.tiff", "masks/b.png", "x/c.npy", ".hidden/d.tiff"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(b"x")
    names = lambda items: sorted(i.path.name for i in items)
    assert names(score.discover(str(d))[0]) == ["a.tiff", "b.tiff", "c.npy"]  # no masks, no hidden
    assert names(score.discover(str(d / "**" / "*.tiff"))[0]) == ["a.tiff", "b.tiff"]
    for other in ("Thumbs.db", "desktop.ini", "notes.txt", "manifest.csv"):  # a share's folder holds these too
        (d / "normal" / other).write_bytes(b"x")
    assert names(score.discover(str(d / "normal" / "*"))[0]) == ["a.tiff"]
    lst = tmp_path / "list.txt"
    lst.write_text("ds/normal/a.tiff\n# comment\n\n" + str(d / "x" / "c.npy") + "\n")
    items, _ = score.discover(str(lst))
    assert names(items) == ["a.tiff", "c.npy"] and all(i.path.is_absolute() for i in items)
    with pytest.raises(FileNotFoundError):
        score.discover(str(tmp_path / "nope"))




def _lock_folders_named(name: str, monkeypatch) -> None:
    """Listing a folder of this name raises PermissionError, as chmod 000 does (but not for root, who runs the tests
    here)."""
    import os
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)


def test_folder_walk_follows_symlinked_folders_once_and_reports_unlistable_ones(tmp_path, monkeypatch):
    d, day = tmp_path / "share", tmp_path / "elsewhere" / "day2"
    for f in (d / "day1" / "a.tiff", day / "b.tiff", d / "locked" / "c.tiff"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    (d / "day2").symlink_to(day)                   # a day's folder linked into the share
    (d / "day1" / "up").symlink_to(d)              # a link back up the tree
    _lock_folders_named("locked", monkeypatch)
    with pytest.warns(UserWarning, match="locked: cannot list this folder .*Permission denied.*not scored"):
        items, _ = score.discover(str(d))
    assert sorted(i.path.name for i in items) == ["a.tiff", "b.tiff"]


def test_a_folder_that_cannot_be_listed_is_repeated_in_the_summary_of_the_run(tmp_path, monkeypatch, capsys,
                                                                             heuristic_model, normal_scan_path):
    """An archive run warned about a folder it could not list before its progress bar, hours before its summary,
    which said nothing of it: the audit read the summary and missed a day of trucks."""
    d = tmp_path / "archive"
    for f in (d / "day1" / "a.tiff", d / "locked" / "b.tiff"):
        f.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(normal_scan_path, f)
    _lock_folders_named("locked", monkeypatch)
    with pytest.warns(UserWarning, match="locked: cannot list this folder"):
        assert score.main(_args(d, heuristic_model, tmp_path / "results.csv")) == 0
    out, err = capsys.readouterr()
    assert list(_rows(tmp_path / "results.csv")) == ["a.tiff"]
    assert "scanned 1 (folder" in out and "1 folder(s) not listed" in out, out
    assert f"1 folder(s) could not be listed, their scans not scored (e.g. {d / 'locked'})" in err

def test_the_runs_own_files_are_never_scored_whatever_src_names(tmp_path, heuristic_model, normal_scan_path):
    d = tmp_path / "day"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    args = _args(d / "*", heuristic_model, d / "results.csv", jsonl=str(d / "results.jsonl"))
    assert score.main(args) == 0
    shutil.copy(normal_scan_path, d / "b.tiff")                   # the next truck
    assert score.main(args) == 0                                   # exited 1: every new row had failed
    assert sorted(_rows(d / "results.csv")) == ["a.tiff", "b.tiff"]

def test_a_file_named_twice_gets_one_row_and_eval_accepts_the_csv(tmp_path, heuristic_model, normal_scan_path,
                                                                  anomalous_scan_path):
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    shutil.copy(anomalous_scan_path, d / "b.tiff")
    (d / "latest.tiff").symlink_to("b.tiff")              # a symlink beside its target
    lst = tmp_path / "list.txt"
    lst.write_text(f"{d / 'a.tiff'}\n{d / 'a.tiff'}\n")      # one file listed twice
    for src, n in ((d, 2), (lst, 1)):
        out = tmp_path / f"{Path(src).stem}.csv"
        with pytest.warns(UserWarning, match="1 names of files named more than once"):
            assert score.main(_args(src, heuristic_model, out)) == 0
        assert len(out.read_text().splitlines()) == 1 + n
    truth = tmp_path / "manifest.csv"
    truth.write_text("path,label\nscans/a.tiff,0\nscans/b.tiff,1\n")
    from detector import evaluate
    assert evaluate.evaluate(tmp_path / "scans.csv", truth, tmp_path / "report", thumbs=False)["overall"]["n"] == 2

def test_policy_file_tiers_and_risk_flags(tmp_path, heuristic_model, normal_scan_path):
    pol = tmp_path / "policy.yaml"
    pol.write_text("tiers:\n  standard: 0.01\n  high_risk: 0.5\ndefault_tier: standard\nrisk_flags:\n  force: [intel_hit]\n")
    for name in ("a", "b", "c"):
        shutil.copy(normal_scan_path, tmp_path / f"{name}.tiff")
    (tmp_path / "bad.tiff").write_bytes(b"")
    m = tmp_path / "manifest.csv"
    m.write_text("path,label,tier,risk_flags\na.tiff,0,,\nb.tiff,0,high_risk,\nc.tiff,0,standard,intel_hit\n"
                 "bad.tiff,0,high_risk,\n")
    out = tmp_path / "r.csv"
    assert score.main(_args(m, heuristic_model, out, policy=str(pol))) == 0
    rows = _rows(out)
    t_std, t_high = float(rows["a.tiff"]["threshold"]), float(rows["b.tiff"]["threshold"])
    assert t_high < t_std  # a higher inspection rate means a lower threshold
    assert rows["a.tiff"]["decision"] == rows["b.tiff"]["decision"] == "RELEASE"
    assert rows["c.tiff"]["decision"] == "INSPECT" and rows["c.tiff"]["error"] == ""  # forced by the flag
    assert rows["bad.tiff"]["decision"] == "INSPECT" and float(rows["bad.tiff"]["threshold"]) == t_high


def test_an_overlay_of_a_truck_a_risk_flag_forced_says_why(tmp_path, heuristic_model, normal_scan_path, monkeypatch):
    """A truck inspected because a risk flag forced it, though it scored under its threshold: its overlay's banner
    read "INSPECT score 0.30 threshold 0.95" and nothing else, an inspection the picture could not explain. The
    banner now gives the reason; a truck inspected by its score is drawn as before."""
    from detector import report
    banners: dict[str, str] = {}
    real = report.verdict_banner

    def spy(decision, score_, threshold, extra=""):
        text = real(decision, score_, threshold, extra)
        banners[extra.rsplit("  ", 1)[-1]] = text
        return text

    monkeypatch.setattr(report, "verdict_banner", spy)
    for name in ("a", "c"):
        shutil.copy(normal_scan_path, tmp_path / f"{name}.tiff")
    m = tmp_path / "manifest.csv"
    m.write_text("path,label,risk_flags\na.tiff,0,\nc.tiff,0,intel_hit\n")
    assert score.main(_args(m, heuristic_model, tmp_path / "r.csv", overlays=str(tmp_path / "ov"))) == 0
    assert banners["c"].startswith("INSPECT") and "risk flag intel_hit forces inspection" in banners["c"], banners
    assert banners["a"].startswith("RELEASE") and "forces" not in banners["a"]


def test_overlays_only_flagged_and_png_readable(tmp_path, heuristic_model, normal_scan_path, anomalous_scan_path):
    import cv2
    d = tmp_path / "s"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "n.tiff")
    shutil.copy(anomalous_scan_path, d / "a.tiff")
    lst = tmp_path / "list.txt"
    lst.write_text("s/n.tiff\ns/a.tiff\n")  # relative to the list's folder
    ov = tmp_path / "ov"
    assert score.main(_args(lst, heuristic_model, tmp_path / "r.csv", overlays=str(ov), overlays_flagged=True)) == 0
    assert [p.name for p in ov.rglob("*.png")] == ["a.png"]
    img = cv2.imread(str(ov / "a.png"))
    assert img.shape[1] == 600 and img.shape[0] == 200 + 28  # scan size plus the banner
    b, g, r = (int(v) for v in img[5, 300])
    assert r > 150 and b < 100  # red banner: flagged


def test_a_scan_with_non_square_pixels_gets_regions_in_its_files_pixels_and_overlays_on_the_picture(
        tmp_path, heuristic_model, monkeypatch):
    """A line scanner's TIFF of 4 x 5 mm pixels: the CSV's regions were in the squared grid the reader made, 20 % off
    the block on the file. They are in the file's pixels now; the overlay, a picture of the squared attenuation, draws
    them mapped back onto it, so the box still sits on the block there."""
    from conftest import write_nonsquare_scan

    from detector import report
    from detector.metrics import iou
    box = (400, 110, 480, 160)                                   # file pixels; rows are 0.8 as many once squared
    write_nonsquare_scan(tmp_path / "s" / "line.tiff", 4.0, 5.0, box)
    drawn = []
    render = report.render
    monkeypatch.setattr(report, "render", lambda att, **kw: drawn.append((att.shape, kw["regions"])) or
                        render(att, **kw))
    assert score.main(_args(tmp_path / "s", heuristic_model, tmp_path / "r.csv", overlays=str(tmp_path / "ov"))) == 0
    region = json.loads(_rows(tmp_path / "r.csv")["line.tiff"]["regions"])[0]["box"]
    assert iou(region, box) > 0.6, region
    (shape, regions), = drawn
    assert shape[1:] == (160, 600) and iou(regions[0]["box"], (400, 88, 480, 128)) > 0.6, regions


def test_colour_renderings_score_with_one_warning_line_and_a_labelled_folder_is_the_truth(tmp_path, heuristic_model_1ch, capsys):
    import cv2
    d = tmp_path / "bags"
    (d / "normal").mkdir(parents=True)
    rgb = np.full((80, 260, 3), 230, np.uint8)
    rgb[30:50, 100:140] = (40, 60, 90)
    for i in range(4):
        cv2.imwrite(str(d / "normal" / f"bag{i}.png"), rgb)
    rc = score.main(_args(d, heuristic_model_1ch, tmp_path / "r.csv"))
    assert rc == 0
    rows = _rows(tmp_path / "r.csv")
    assert len(rows) == 4 and all(r["error"] == "" for r in rows.values())
    out, err = capsys.readouterr()
    assert err.count("colour image converted") == 1 and "warning: 4 scan(s): colour image converted" in err
    assert f"next: detector eval {tmp_path / 'r.csv'} --truth {d} " in out   # a labelled folder is its own truth


def test_scoring_a_datasets_images_folder_suggests_that_dataset_as_the_truth(tmp_path, heuristic_model,
                                                                           normal_scan_path, capsys):
    """`detector synth` writes DATA/images/ + DATA/manifest.csv; scoring DATA/images names DATA for eval."""
    data = tmp_path / "test"
    (data / "images").mkdir(parents=True)
    shutil.copy(normal_scan_path, data / "images" / "t0.tiff")
    (data / "manifest.csv").write_text("path,label\nimages/t0.tiff,0\n")
    assert score.main(_args(data / "images", heuristic_model, tmp_path / "r.csv")) == 0
    assert f"next: detector eval {tmp_path / 'r.csv'} --truth {data} --out report/" in capsys.readouterr().out


def test_a_routing_manifest_without_labels_is_not_suggested_as_the_truth(tmp_path, heuristic_model, normal_scan_path,
                                                                         capsys):
    """A manifest of tiers and risk flags (path,tier,risk_flags) was named as eval's --truth, which refuses it: it
    has no label column."""
    shutil.copy(normal_scan_path, tmp_path / "t0.tiff")
    (tmp_path / "manifest.csv").write_text("path,tier\nt0.tiff,standard\n")
    for src in (tmp_path / "manifest.csv", tmp_path):
        assert score.main(_args(src, heuristic_model, tmp_path / "r.csv", no_resume=True)) == 0
        assert f"next: detector eval {tmp_path / 'r.csv'} --truth DATA --out report/" in capsys.readouterr().out
    (tmp_path / "manifest.csv").write_text("path,label,tier\nt0.tiff,0,standard\n")
    assert score.main(_args(tmp_path / "manifest.csv", heuristic_model, tmp_path / "r.csv", no_resume=True)) == 0
    assert f"--truth {tmp_path / 'manifest.csv'} --out report/" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["workers", "threads"])
def test_a_negative_worker_or_thread_count_is_refused_in_one_line(tmp_path, heuristic_model, normal_scan_path, flag,
                                                                  capsys):
    out = tmp_path / "r.csv"
    assert score.main(_args(normal_scan_path, heuristic_model, out, **{flag: -1})) == 2
    assert f"--{flag} must be a count" in capsys.readouterr().err and not out.exists()


def test_an_out_that_is_a_folder_is_refused_before_anything_is_written(tmp_path, heuristic_model, normal_scan_path,
                                                                       capsys):
    out = tmp_path / "report"
    out.mkdir()
    assert score.main(_args(normal_scan_path, heuristic_model, out)) == 2
    assert "is a folder: give the results file, e.g." in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"] and not list(out.iterdir())

def test_a_threshold_outside_the_score_range_is_refused_before_scoring(tmp_path, heuristic_model, normal_scan_path,
                                                                       capsys):
    for bad in (1.5, -0.1):
        assert score.main(_args(normal_scan_path, heuristic_model, tmp_path / "r.csv", threshold=bad)) == 2
        assert f"--threshold must be in [0, 1] (scores lie in [0, 1]), got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def _score_flagged_pair(tmp_path, model, scan_path, flags_a: str, flags_b: str) -> dict:
    """Rows of the same scan twice, a.tiff and b.tiff, scored through a manifest with these risk_flags cells."""
    for name in ("a", "b"):
        shutil.copy(scan_path, tmp_path / f"{name}.tiff")
    m = tmp_path / "manifest.csv"
    m.write_text(f'path,label,risk_flags\na.tiff,0,{flags_a}\nb.tiff,0,{flags_b}\n')
    assert score.main(_args(m, model, tmp_path / "r.csv")) == 0
    return _rows(tmp_path / "r.csv")


def test_risk_flags_force_inspection_without_a_policy_file(tmp_path, heuristic_model, normal_scan_path):
    rows = _score_flagged_pair(tmp_path, heuristic_model, normal_scan_path, "", "intel_hit")
    assert rows["a.tiff"]["decision"] == "RELEASE"           # the same scan without a flag
    assert rows["b.tiff"]["decision"] == "INSPECT" and rows["b.tiff"]["error"] == ""   # as serve routes it
    assert rows["a.tiff"]["threshold"] == rows["b.tiff"]["threshold"]


def test_threshold_routes_without_policy_and_is_refused_with_one(tmp_path, heuristic_model, normal_scan_path, capsys):
    shutil.copy(normal_scan_path, tmp_path / "a.tiff")
    assert score.main(_args(tmp_path / "a.tiff", heuristic_model, tmp_path / "r.csv", threshold=0.001)) == 0
    row = _rows(tmp_path / "r.csv")["a.tiff"]
    assert (row["decision"], row["threshold"]) == ("INSPECT", "0.001000000")
    pol = tmp_path / "policy.yaml"
    pol.write_text("tiers:\n  standard: 0.01\n")
    capsys.readouterr()
    assert score.main(_args(tmp_path / "a.tiff", heuristic_model, tmp_path / "r2.csv", threshold=0.001,
                            policy=str(pol))) == 2
    assert "--threshold and --policy" in capsys.readouterr().err and not (tmp_path / "r2.csv").exists()


def test_unreadable_risk_flags_inspect_their_row_and_the_batch_goes_on(tmp_path, heuristic_model, normal_scan_path):
    rows = _score_flagged_pair(tmp_path, heuristic_model, normal_scan_path, '"[intel"', "")
    assert rows["a.tiff"]["decision"] == "INSPECT" and "row 2: unreadable risk_flags" in rows["a.tiff"]["error"]
    assert rows["b.tiff"]["decision"] == "RELEASE" and rows["b.tiff"]["error"] == ""


def test_resume_after_a_row_cut_inside_its_regions_rescores_it(tmp_path, heuristic_model, normal_scan_path,
                                                               anomalous_scan_path):
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "n.tiff")
    shutil.copy(anomalous_scan_path, d / "z.tiff")   # scored last: it has regions
    out = tmp_path / "r.csv"
    assert score.main(_args(d, heuristic_model, out)) == 0
    full = out.read_bytes()
    first = _rows(out)
    cut = full.rindex(b'[{""box')   # a crash inside the quoted regions field of the last row
    out.write_bytes(full[:cut + 8])
    assert score.main(_args(d, heuristic_model, out)) == 0
    again = _rows(out)   # two whole rows again: the cut one dropped and written anew, not glued to its rest
    drop = lambda r: {k: v for k, v in r.items() if k != "latency_ms"}
    assert {k: drop(r) for k, r in again.items()} == {k: drop(r) for k, r in first.items()}
    assert out.read_bytes().count(b"\n") == full.count(b"\n") == 3



def test_a_second_run_on_the_same_csv_is_refused_while_the_first_runs(tmp_path, heuristic_model, normal_scan_path,
                                                                      capsys):
    d, out = tmp_path / "scans", tmp_path / "r.csv"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    with score.lock_results(out):                   # the first run, still scoring
        assert score.main(_args(d, heuristic_model, out)) == 2
        assert not out.exists()
    assert "being written by another `detector score`" in capsys.readouterr().err
    assert score.main(_args(d, heuristic_model, out)) == 0 and len(_rows(out)) == 1   # free again once it ends


def test_sigterm_stops_like_ctrl_c_and_every_written_row_keeps_its_overlay(tmp_path, heuristic_model,
                                                                          normal_scan_path):
    import os
    import subprocess
    import sys
    d, out, ov = tmp_path / "scans", tmp_path / "r.csv", tmp_path / "ov"
    d.mkdir()
    for i in range(6):
        shutil.copy(normal_scan_path, d / f"n{i}.tiff")
    args = _args(d, heuristic_model, out, overlays=str(ov))
    code = f"""if True:
        import os, signal, sys
        from argparse import Namespace
        from detector import score
        draw = score._write_overlay
        def drawing(dest, *a):   # stopped (systemctl stop, timeout) while n1's overlay is being drawn
            if dest.stem == "n1":
                os.kill(os.getpid(), signal.SIGTERM)
            return draw(dest, *a)
        score._write_overlay = drawing
        sys.exit(score.main(Namespace(**{vars(args)!r})))"""
    repo = str(Path(score.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 130, run.stderr
    assert "interrupted:" in run.stderr and "the same command resumes" in run.stderr
    rows = sorted(Path(p).stem for p in _rows(out))
    assert "n1" in rows and sorted(p.stem for p in ov.glob("*.png")) == rows   # no row without its overlay
    assert score.main(args) == 0 and sorted(p.stem for p in ov.glob("*.png")) == [f"n{i}" for i in range(6)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_stops_the_run_in_one_line_not_a_traceback(tmp_path, heuristic_model, normal_scan_path, capsys):
    d, out = tmp_path / "scans", tmp_path / "r.csv"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    out.symlink_to("/dev/full")                     # every write: ENOSPC
    assert score.main(_args(d, heuristic_model, out)) == 2
    err = capsys.readouterr().err
    assert "cannot write the results" in err and "No space left on device" in err and "to resume" in err


def test_overlays_that_cannot_be_written_are_counted_and_leave_no_cut_off_png(tmp_path, heuristic_model,
                                                                              normal_scan_path, monkeypatch, capsys):
    import errno
    import os
    d, ov = tmp_path / "scans", tmp_path / "ov"
    d.mkdir()
    for i in range(8):
        shutil.copy(normal_scan_path, d / f"n{i}.tiff")
    write_bytes = Path.write_bytes

    def full_disk(self, data):                       # the disk fills up: part of the file, then ENOSPC
        write_bytes(self, data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert score.main(_args(d, heuristic_model, tmp_path / "r.csv", overlays=str(ov))) == 0
    out, err = capsys.readouterr()
    assert "failed 0, 8 overlays not written" in out and "... and 3 more overlays not written" in err
    assert not list(ov.glob("*.png"))

def test_retry_failed_scores_a_file_again_once_it_is_readable(tmp_path, heuristic_model, normal_scan_path):
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    (d / "b.tiff").write_bytes(normal_scan_path.read_bytes()[:2000])   # still being copied
    out, jl = tmp_path / "r.csv", tmp_path / "r.jsonl"
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl))) == 0
    assert _rows(out)["b.tiff"]["error"] != ""
    shutil.copy(normal_scan_path, d / "b.tiff")                          # the copy has finished
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl))) == 0
    assert _rows(out)["b.tiff"]["error"] != ""                           # a plain resume keeps the failure
    first_line = out.read_text().splitlines()[1]
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl), retry_failed=True)) == 0
    rows = _rows(out)
    assert len(rows) == 2 and rows["b.tiff"]["error"] == "" and rows["b.tiff"]["decision"] == "RELEASE"
    assert out.read_text().splitlines()[1] == first_line                 # the good row untouched
    lines = [json.loads(ln) for ln in jl.read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in lines) == ["a.tiff", "b.tiff"]
    assert all(r["error"] == "" for r in lines)



def test_a_row_without_its_json_line_is_scored_again_on_resume(tmp_path, heuristic_model, normal_scan_path,
                                                               anomalous_scan_path, capsys):
    """A run killed after a file's CSV row but before its JSON line: the resume counted the file as done, so the
    JSON lines lacked it for good. Now such a row is scored again, and a line without a row (the reverse) dropped:
    both files end up holding each file once."""
    d = tmp_path / "scans"
    d.mkdir()
    for name, src in (("a.tiff", normal_scan_path), ("b.tiff", anomalous_scan_path), ("c.tiff", normal_scan_path)):
        shutil.copy(src, d / name)
    out, jl = tmp_path / "r.csv", tmp_path / "r.jsonl"
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl))) == 0
    full = {n: r["score"] for n, r in _rows(out).items()}
    lines = jl.read_text().splitlines(keepends=True)
    gone = json.loads(lines[1])["path"].rsplit("/", 1)[-1]
    jl.write_text(lines[0] + lines[2])                       # killed between b's row and its line
    capsys.readouterr()
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl))) == 0
    assert "scoring 1 file(s) again" in capsys.readouterr().err
    names = lambda: sorted(json.loads(ln)["path"].rsplit("/", 1)[-1] for ln in jl.read_text().splitlines())  # noqa: E731
    assert names() == ["a.tiff", "b.tiff", "c.tiff"] and len(out.read_text().splitlines()) == 4
    assert {n: r["score"] for n, r in _rows(out).items()} == full and gone in full
    text = out.read_text().splitlines(keepends=True)         # the reverse: a line whose row a power cut lost
    out.write_text("".join(ln for ln in text if "c.tiff" not in ln))
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl))) == 0
    assert names() == ["a.tiff", "b.tiff", "c.tiff"] and sorted(_rows(out)) == ["a.tiff", "b.tiff", "c.tiff"]
    jl.unlink()                 # --jsonl first given on a resume: the rows before it are not scored again, then or later
    shutil.copy(normal_scan_path, d / "d.tiff")
    for _ in range(2):
        assert score.main(_args(d, heuristic_model, out, jsonl=str(jl))) == 0
        assert "again" not in capsys.readouterr().err
        assert names() == ["d.tiff"] and sorted(_rows(out)) == ["a.tiff", "b.tiff", "c.tiff", "d.tiff"]

def test_resuming_with_another_model_or_threshold_is_refused(tmp_path, heuristic_model, heuristic_model_1ch,
                                                             normal_scan_path, anomalous_scan_path, capsys):
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    out = tmp_path / "r.csv"
    assert score.main(_args(d, heuristic_model, out)) == 0
    assert json.loads((tmp_path / "r.csv.routing.json").read_text())["model_sha256"]
    shutil.copy(anomalous_scan_path, d / "b.tiff")
    before = out.read_bytes()
    capsys.readouterr()
    assert score.main(_args(d, heuristic_model_1ch, out)) == 2
    assert "holds rows routed with model" in capsys.readouterr().err and out.read_bytes() == before
    assert score.main(_args(d, heuristic_model, out, threshold=0.01)) == 2
    assert "other thresholds" in capsys.readouterr().err and out.read_bytes() == before
    assert score.main(_args(d, heuristic_model, out)) == 0 and len(_rows(out)) == 2   # the same routing resumes
    assert score.main(_args(d, heuristic_model, out, threshold=0.01, no_resume=True)) == 0
    assert {r["threshold"] for r in _rows(out).values()} == {"0.010000000"}


def test_overlays_never_replace_one_another_nor_a_scan(tmp_path, heuristic_model_1ch):
    import cv2
    from conftest import write_test_scan
    d = tmp_path / "scans"
    write_test_scan(d / "a.tiff", channels=1, seed=1)               # released
    write_test_scan(d / "a.npy", channels=1, dense=True, seed=2)    # inspected: same stem, other suffix
    write_test_scan(d / "p.png", channels=1, dense=True, seed=3)
    scan_png = (d / "p.png").read_bytes()
    assert score.main(_args(d, heuristic_model_1ch, tmp_path / "r.csv", overlays=str(d))) == 0  # overlays beside scans
    assert (d / "p.png").read_bytes() == scan_png                   # the scan itself is left alone
    assert sorted(p.name for p in d.glob("*.*.png")) == ["a.npy.png", "a.tiff.png", "p.png.png"]
    assert not (d / "a.png").exists()
    banner = {name: [int(v) for v in cv2.imread(str(d / name))[5, 2]] for name in ("a.npy.png", "a.tiff.png")}
    assert banner["a.npy.png"][2] > 150 > banner["a.npy.png"][0]    # each banner on its own truck: red = INSPECT,
    assert max(banner["a.tiff.png"]) - min(banner["a.tiff.png"]) < 20   # grey = RELEASE



def test_overlays_inside_the_scanned_folder_are_not_scored_on_the_next_run(tmp_path, heuristic_model_1ch):
    from conftest import write_test_scan
    for where in ("overlays", "day"):                                       # a subfolder, or beside the scans
        d, out = tmp_path / where / "scans", tmp_path / f"{where}.csv"
        write_test_scan(d / "day" / "a.tiff", channels=1, seed=1)
        write_test_scan(d / "day" / "p.png", channels=1, dense=True, seed=3)   # a 16-bit PNG scan stays a scan
        ov = d / where
        assert score.main(_args(d, heuristic_model_1ch, out, overlays=str(ov))) == 0
        drawn = sorted(p.relative_to(d).as_posix() for p in ov.rglob("*.png") if p.name != "p.png")
        shutil.copy(d / "day" / "a.tiff", d / "day" / "b.tiff")             # a new truck arrives
        assert score.main(_args(d, heuristic_model_1ch, out, overlays=str(ov))) == 0
        assert sorted(_rows(out)) == ["a.tiff", "b.tiff", "p.png"], where
        assert sorted(p.relative_to(d).as_posix() for p in ov.rglob("*.png") if p.name != "p.png") == sorted(
            drawn + [drawn[0].replace("a.", "b.")]), where                  # no overlay of an overlay

def test_a_resumed_run_names_overlays_as_the_first(tmp_path, heuristic_model, normal_scan_path, anomalous_scan_path):
    d, ov, out = tmp_path / "scans", tmp_path / "ov", tmp_path / "r.csv"
    (d / "sub").mkdir(parents=True)
    shutil.copy(normal_scan_path, d / "t.tiff")
    shutil.copy(anomalous_scan_path, d / "sub" / "t.tiff")
    assert score.main(_args(d, heuristic_model, out, overlays=str(ov))) == 0
    first = (ov / "t.png").read_bytes()
    lines = out.read_text().splitlines()
    out.write_text("\n".join(ln for ln in lines if "/sub/" not in ln) + "\n")   # as if stopped before sub/t.tiff
    (ov / "sub" / "t.png").unlink()
    assert score.main(_args(d, heuristic_model, out, overlays=str(ov))) == 0  # resumes with sub/t.tiff alone
    assert (ov / "sub" / "t.png").is_file() and (ov / "t.png").read_bytes() == first


def test_result_csv_keeps_saturated_scores_apart():
    """Six decimals printed the float32 scores 0.99999988, 0.99999994 and 1.0 all as 1.000000: in `detector eval`
    clean and anomalous trucks near the top tied, and the achieved false-alarm rate read higher than it was."""
    from detector import score as S
    values = (np.float32(0.9999999), np.float32(0.99999994), 1.0)
    cells = [S._csv_fields({"path": "a.tiff", "score": float(v), "decision": "INSPECT", "threshold": 0.4,
                            "regions": [], "latency_ms": 1.0, "error": ""})[1] for v in values]
    assert len(set(cells)) == 3 and [float(c) for c in cells] == sorted(float(c) for c in cells)


def test_rows_whose_overlay_a_kill_lost_are_scored_again_on_resume(tmp_path, heuristic_model, normal_scan_path,
                                                                   anomalous_scan_path, capsys):
    """kill -9 (OOM killer, power cut) lands after a row is written but before its overlay, drawn in the background,
    is: the resume counted the row as done and that truck never got its overlay. Now such rows are scored again;
    rows scored before --overlays was first given (none of them has one) are left alone, as --jsonl's are."""
    d, ov, out = tmp_path / "scans", tmp_path / "ov", tmp_path / "r.csv"
    d.mkdir()
    for i, src in enumerate((normal_scan_path, anomalous_scan_path, normal_scan_path, anomalous_scan_path)):
        shutil.copy(src, d / f"t{i}.tiff")
    assert score.main(_args(d, heuristic_model, out, overlays=str(ov))) == 0
    full = {n: r["score"] for n, r in _rows(out).items()}
    (ov / "t2.png").unlink()                       # killed before the last two overlays were drawn
    (ov / "t3.png").write_bytes(b"")               # ... one of them cut off mid-write
    capsys.readouterr()
    assert score.main(_args(d, heuristic_model, out, overlays=str(ov))) == 0
    assert "scoring 2 file(s) again" in capsys.readouterr().err
    assert {n: r["score"] for n, r in _rows(out).items()} == full and len(out.read_text().splitlines()) == 5
    assert sorted(p.name for p in ov.glob("*.png")) == ["t0.png", "t1.png", "t2.png", "t3.png"]
    assert all(p.stat().st_size > 0 for p in ov.glob("*.png"))
    ov2 = tmp_path / "ov2"                         # --overlays first given on a resume: no row is scored again
    assert score.main(_args(d, heuristic_model, out, overlays=str(ov2))) == 0
    assert "again" not in capsys.readouterr().err and not ov2.exists()


def test_an_overlay_png_is_never_left_cut_off(tmp_path, monkeypatch):
    """write_png wrote the overlay in place: a kill mid-write left a cut-off PNG that passed for a drawn overlay."""
    import cv2
    from detector import report
    dest = tmp_path / "o" / "a.png"
    seen = []
    real = Path.write_bytes

    def watched(self, data):
        seen.append(self)
        assert not dest.exists()                   # the destination only ever holds a whole picture
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", watched)
    report.write_png(dest, np.zeros((8, 8, 3), np.uint8))
    assert cv2.imread(str(dest)).shape == (8, 8, 3) and seen and seen[0] != dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.png"]


def test_a_rescored_truck_that_gets_no_overlay_loses_the_one_an_earlier_run_drew(tmp_path, heuristic_model,
                                                                                 normal_scan_path):
    """--no-resume at another threshold with --overlays-flagged released a truck the first run inspected, and its red
    INSPECT overlay stayed in the folder beside a RELEASE row; a scan that now fails kept its old picture too."""
    d, ov, out = tmp_path / "scans", tmp_path / "ov", tmp_path / "r.csv"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    shutil.copy(normal_scan_path, d / "b.tiff")
    ov.mkdir()
    shutil.copy(normal_scan_path, ov / "keep.tiff")
    assert score.main(_args(d, heuristic_model, out, overlays=str(ov), overlays_flagged=True, threshold=0.0)) == 0
    assert {r["decision"] for r in _rows(out).values()} == {"INSPECT"}
    assert sorted(p.name for p in ov.glob("*.png")) == ["a.png", "b.png"]
    (d / "b.tiff").write_bytes(b"")                                   # b is unreadable now
    assert score.main(_args(d, heuristic_model, out, overlays=str(ov), overlays_flagged=True, threshold=0.99,
                            no_resume=True)) == 0
    rows = _rows(out)
    assert rows["a.tiff"]["decision"] == "RELEASE" and rows["b.tiff"]["error"]
    assert not list(ov.glob("*.png")) and (ov / "keep.tiff").is_file()


def test_the_next_command_can_be_pasted_when_paths_hold_spaces(tmp_path, heuristic_model, normal_scan_path, capsys):
    """An archive folder "day 1" printed `--truth .../day 1`, which a shell splits into two arguments."""
    import shlex
    data = tmp_path / "day 1"
    (data / "images").mkdir(parents=True)
    shutil.copy(normal_scan_path, data / "images" / "t0.tiff")
    (data / "manifest.csv").write_text("path,label\nimages/t0.tiff,0\n")
    out = tmp_path / "results é 1.csv"
    assert score.main(_args(data, heuristic_model, out)) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("next: "))
    assert shlex.split(line[len("next: "):]) == ["detector", "eval", str(out), "--truth", str(data), "--out", "report/"]


def test_a_file_name_that_is_not_utf8_gets_its_row_and_resumes(tmp_path, heuristic_model, normal_scan_path, capsys):
    """A scan copied from a Latin-1 system (b'tr\\xfcck.tiff'): writing its row raised UnicodeEncodeError, a traceback
    that ended the run, and every resume ended the same way at the same file. Its row now names it with the byte
    escaped (valid UTF-8, as eval and spreadsheets read the CSV), and a resume counts it as done."""
    import os
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    try:
        with open(os.path.join(os.fsencode(d), b"tr\xfcck.tiff"), "wb") as f:
            f.write(normal_scan_path.read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out, jl = tmp_path / "r.csv", tmp_path / "r.jsonl"
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl), overlays=str(tmp_path / "ov"))) == 0
    rows = _rows(out)                                  # _rows reads the CSV as UTF-8
    assert sorted(rows) == ["a.tiff", "tr\\xfcck.tiff"] and rows["tr\\xfcck.tiff"]["error"] == ""
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2   # its overlay too (cv2 crashed on the name's bytes)
    assert sorted(json.loads(ln)["path"] for ln in jl.read_text(encoding="utf-8").splitlines()) == sorted(
        r["path"] for r in rows.values())
    capsys.readouterr()
    assert score.main(_args(d, heuristic_model, out, jsonl=str(jl), overlays=str(tmp_path / "ov"))) == 0
    assert "resuming: 2 of 2 files" in capsys.readouterr().err and len(out.read_text().splitlines()) == 3


def test_a_misspelt_risk_flags_column_is_refused_not_ignored(tmp_path, heuristic_model, normal_scan_path, capsys):
    """A hand-written manifest whose column reads risk_flag (or Risk_Flags) routed every truck as if no flag were set:
    the flagged truck was RELEASEd. score now stops before scoring and names the column and the one it seems to mean."""
    shutil.copy(normal_scan_path, tmp_path / "a.tiff")
    for header in ("risk_flag", "Risk_Flags", "risk flags"):
        m = tmp_path / "manifest.csv"
        m.write_text(f"path,tier,{header}\na.tiff,standard,intel_hit\n")
        assert score.main(_args(m, heuristic_model, tmp_path / "r.csv")) == 2
        err = capsys.readouterr().err
        assert f"manifest.csv: column '{header}' is not one detector reads: 'risk_flags'?" in err, err
        assert not (tmp_path / "r.csv").exists()


def test_an_unreadable_risk_flags_cell_is_named_by_its_line_in_the_manifest(tmp_path, heuristic_model,
                                                                           normal_scan_path):
    """The row in the error was counted over the rows read, so a blank line (a spreadsheet's empty row) above the bad
    cell sent the engineer to the row before it; it is now the cell's line in the file, as training's errors say."""
    for name in ("a", "b"):
        shutil.copy(normal_scan_path, tmp_path / f"{name}.tiff")
    m = tmp_path / "manifest.csv"
    m.write_text('path,label,risk_flags\na.tiff,0,\n\n,,\nb.tiff,0,"[intel"\n')
    assert score.main(_args(m, heuristic_model, tmp_path / "r.csv")) == 0
    assert "manifest.csv row 5: unreadable risk_flags" in _rows(tmp_path / "r.csv")["b.tiff"]["error"]


def test_score_pitch_mm_reads_untagged_files_at_the_sites_pitch(tmp_path, heuristic_model_1ch, monkeypatch, capsys):
    """--pitch-mm gives the scanner's pitch for files that carry none (a 16-bit PNG); a tagged file keeps its own.
    The rows of one CSV are read at one pitch: resuming with another --pitch-mm is refused, as another model is;
    a value that is no pitch is refused in one line before any scan is read."""
    import cv2
    from conftest import make_scan_counts, write_test_scan

    from detector.runtime import Inspector
    d = tmp_path / "scans"
    d.mkdir()
    cv2.imwrite(str(d / "bare.png"), make_scan_counts(channels=1, dense=True, seed=7)[0])   # 200 x 600 px
    write_test_scan(d / "tagged.tiff", channels=1, dense=True, seed=7)                       # the same, at 5 mm
    seen: dict = {}
    inspect = Inspector.inspect
    monkeypatch.setattr(Inspector, "inspect", lambda self, scan, threshold=None: seen.update(
        {(Path(scan.source).name, self.default_pitch_mm): scan.pitch_mm}) or inspect(self, scan, threshold))
    for pitch in (None, 4.0):
        assert score.main(_args(d, heuristic_model_1ch, tmp_path / f"r{pitch}.csv", pitch_mm=pitch)) == 0
        assert json.loads((tmp_path / f"r{pitch}.csv.routing.json").read_text())["default_pitch_mm"] == (pitch or 5.0)
    assert seen == {("bare.png", 5.0): 5.0, ("tagged.tiff", 5.0): 5.0, ("bare.png", 4.0): 4.0, ("tagged.tiff", 4.0): 5.0}
    capsys.readouterr()
    assert score.main(_args(d, heuristic_model_1ch, tmp_path / "rNone.csv", pitch_mm=4.0)) == 2
    assert "other default_pitch_mm" in capsys.readouterr().err
    for bad in (0.0, -4.0, float("nan"), 500.0):
        assert score.main(_args(d, heuristic_model_1ch, tmp_path / "bad.csv", pitch_mm=bad)) == 2
        err = capsys.readouterr().err
        assert err.startswith("detector score: --pitch-mm: default pixel pitch") and err.count("\n") == 1, err
    assert not (tmp_path / "bad.csv").exists()


def _truck_at(pitch_mm: float) -> np.ndarray:
    """uint16 counts (H, W) of one physical truck (20 mm cells: air on top, cargo, a dense block of 320 x 640 mm)
    as an untagged scanner of `pitch_mm` (4 or 5) images it."""
    from conftest import I0
    att = np.zeros((24, 64), np.float32)
    att[4:, 2:-2] = 0.6
    att[8:16, 20:36] = 4.6
    k = round(20 / pitch_mm)
    return np.round(I0 * np.exp(-np.kron(att, np.ones((k, k), np.float32)))).astype(np.uint16)


def test_a_manifest_scores_each_untagged_file_at_its_rows_pitch(tmp_path, heuristic_model_1ch, capsys):
    """A site's 4 mm and 5 mm scanners write untagged PNGs into one manifest: `detector score manifest.csv` read them
    all at one pitch (--pitch-mm or the bundle's), so the 4 mm trucks were judged 25 % too large. A row's pitch_mm is
    now its file's: the 4 mm truck gets the verdict the same truck gets from the 5 mm scanner, its region on the
    block in its own file's pixels (x 1.25); the 5 mm rows, a tagged file (its own pitch wins over the cell) and an
    empty cell (the default) are scored as without the column; a bad cell inspects its own truck with the row named.
    The routing file records the rows' pitches: a scored row whose cell changed is not resumed at another pitch,
    and eval finds the 4 mm row's block where its truth box is."""
    import cv2

    from detector.evaluate import evaluate
    from detector.scan import write_scan
    d = tmp_path / "site"
    d.mkdir()
    for name in ("four.png", "bad.png"):
        cv2.imwrite(str(d / name), _truck_at(4))            # 120 x 320 px
    for name in ("five.png", "empty.png"):
        cv2.imwrite(str(d / name), _truck_at(5))            # 96 x 256 px
    write_scan(d / "tagged.tiff", _truck_at(5)[None], pitch_mm=5.0)
    manifest = d / "manifest.csv"
    manifest.write_text('path,label,boxes,pitch_mm\nfour.png,1,"[[100, 40, 180, 80]]",4\n'
                        'five.png,1,"[[80, 32, 144, 64]]",5\ntagged.tiff,1,,4\nempty.png,1,,\nbad.png,1,,four\n')
    out = tmp_path / "r.csv"
    assert score.main(_args(manifest, heuristic_model_1ch, out)) == 0
    rows = _rows(out)
    assert score.main(_args(d / "five.png", heuristic_model_1ch, tmp_path / "alone.csv")) == 0
    alone = _rows(tmp_path / "alone.csv")["five.png"]
    regions = {name: [r["box"] for r in json.loads(row["regions"])] for name, row in rows.items()}
    assert regions["five.png"] == [[80, 32, 144, 64]] == [r["box"] for r in json.loads(alone["regions"])]
    assert regions["four.png"] == [[100, 40, 180, 80]]               # the 5 mm box x 1.25: the block, file pixels
    assert regions["tagged.tiff"] == regions["empty.png"] == regions["five.png"]
    assert {rows[n]["score"] for n in ("four.png", "five.png", "tagged.tiff", "empty.png")} == {alone["score"]}
    assert rows["bad.png"]["decision"] == "INSPECT"
    assert rows["bad.png"]["error"].endswith("manifest.csv: row 6: pitch_mm 'four' is not a pixel pitch in mm "
                                             "(0.01-100; empty: the default for files without one)")
    routing = json.loads(score.routing_file(out).read_text())
    assert {Path(p).name: v for p, v in routing["row_pitch_mm"].items()} == {"four.png": 4.0, "five.png": 5.0,
                                                                              "tagged.tiff": 4.0}
    capsys.readouterr()
    assert score.main(_args(manifest, heuristic_model_1ch, out)) == 0           # the same cells resume
    assert "resuming: 5 of 5" in capsys.readouterr().err
    before, text = out.read_bytes(), manifest.read_text()
    manifest.write_text(text.replace("empty.png,1,,", "empty.png,1,,4"))       # it was read at the default 5 mm
    assert score.main(_args(manifest, heuristic_model_1ch, out)) == 2
    assert "holds the row of" in capsys.readouterr().err and out.read_bytes() == before
    manifest.write_text(text.replace(",four\n", ",4\n"))                      # a mended cell: its failed row rescored
    assert score.main(_args(manifest, heuristic_model_1ch, out, retry_failed=True)) == 0
    assert _rows(out)["bad.png"]["error"] == "" and _rows(out)["bad.png"]["regions"] == rows["four.png"]["regions"]
    m = evaluate(out, manifest, tmp_path / "report", thumbs=False)
    assert m["localisation"]["n"] == 2 and m["localisation"]["hit_rate"] == 1.0


def test_a_scan_refused_for_its_height_names_its_file_once(tmp_path, heuristic_model, normal_scan_path, capsys):
    """A scan far taller than the model's training scans (a wrong pixel pitch) got the error cell
    'InspectionError: /path/tall.tiff: 1200 px at ...', the file named again beside the path column, where an unreadable
    scan's cell holds the reason alone; the stderr line named it twice. Now it reads as the other refusals."""
    from conftest import write_test_scan

    from detector.bundle import read_metadata, replace_metadata_bytes
    model = tmp_path / "heights.onnx"
    model.write_bytes(replace_metadata_bytes(heuristic_model.read_bytes(),
                                             {**read_metadata(heuristic_model), "scan_height_mm": [800, 1200]}))
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    write_test_scan(d / "tall.tiff", height=1200, seed=1)                  # 6 m at 5 mm
    (d / "cut.tiff").write_bytes((d / "a.tiff").read_bytes()[:500])
    assert score.main(_args(d, model, tmp_path / "r.csv")) == 0
    rows = _rows(tmp_path / "r.csv")
    assert rows["a.tiff"]["decision"] == "RELEASE" and rows["tall.tiff"]["decision"] == "INSPECT"
    assert rows["tall.tiff"]["error"] == ("1200 px at 5 mm per pixel is 6.00 m high, outside the 0.20-4.80 m this model "
                                          "accepts (its training scans' heights, widened 4x): is the scan's pixel pitch "
                                          "right?")
    assert "cut.tiff" not in rows["cut.tiff"]["error"]                        # as an unreadable scan's reason reads
    failed = [ln for ln in capsys.readouterr().err.splitlines() if "tall.tiff" in ln]
    assert failed == [f"failed: {d / 'tall.tiff'}: {rows['tall.tiff']['error']}"]


def test_a_second_manifest_resumes_into_the_same_csv_judged_on_its_own_rows(tmp_path, heuristic_model_1ch, capsys):
    """Resuming a results CSV with a second manifest compared every scored row's recorded pitch with the one the new
    run gives it, also rows the new manifest does not list: a day's 4 mm manifest, then the next day's, was refused
    over the first day's truck ('read at another pixel pitch than its manifest row's pitch_mm now gives', a cell the
    user never changed). The routing file then kept only the last manifest's pitches, so the first one resumed again
    was refused in turn. Only rows the new run lists are compared now, the routing file keeps the other rows'
    pitches, and a refusal names the row and both pitches."""
    import cv2
    d = tmp_path / "site"
    d.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(d / name), _truck_at(4))
    day1, day2 = d / "day1.csv", d / "day2.csv"
    day1.write_text("path,pitch_mm\na.png,4\n")
    day2.write_text("path,pitch_mm\nb.png,\nc.png,4\n")
    out = tmp_path / "r.csv"
    assert score.main(_args(day1, heuristic_model_1ch, out)) == 0
    assert score.main(_args(day2, heuristic_model_1ch, out)) == 0, capsys.readouterr().err
    assert sorted(_rows(out)) == ["a.png", "b.png", "c.png"]
    routing = json.loads(score.routing_file(out).read_text())
    assert {Path(p).name: v for p, v in routing["row_pitch_mm"].items()} == {"a.png": 4.0, "c.png": 4.0}
    capsys.readouterr()
    for manifest in (day1, day2):                                         # each day's manifest resumes as it was
        assert score.main(_args(manifest, heuristic_model_1ch, out)) == 0
        assert "resuming: " in capsys.readouterr().err
    day1.write_text("path,pitch_mm\na.png,\n")                            # a listed row's cell changed: refused
    before = out.read_bytes()
    assert score.main(_args(day1, heuristic_model_1ch, out)) == 2
    err = capsys.readouterr().err
    assert f"row of {d / 'a.png'} scored at 4 mm (its manifest row's pitch_mm); this run gives it " in err and "5 mm (no pitch_mm cell" in err, err
    assert out.read_bytes() == before


def test_a_folder_of_links_into_an_archive_shows_the_links_names(tmp_path, heuristic_model_1ch):
    """A station's folder of symlinks into the scanner's archive (truck_B1234.tiff -> archive/2026/11/TRK_000123.tiff)
    was scored under the archive's names: the CSV's path column, the overlays and the resume named the links' targets,
    so the officer's list showed none of the names in the folder. Each file is now named by the path it was given
    (folder, manifest, list or glob) and read through the link; a link beside its target is still scored once, an
    overlay drawn into the folder never replaces a link, and eval matches the rows to a truth that lists the links."""
    from conftest import write_test_scan

    from detector.evaluate import evaluate
    archive, station, ov = tmp_path / "archive" / "2026" / "11", tmp_path / "station", tmp_path / "ov"
    write_test_scan(archive / "TRK_000123.tiff", channels=1, seed=1)
    write_test_scan(archive / "TRK_000124.png", channels=1, dense=True, seed=2)
    station.mkdir()
    (station / "truck_B1234.tiff").symlink_to(archive / "TRK_000123.tiff")
    (station / "truck_C5678.png").symlink_to(archive / "TRK_000124.png")
    names = {station / "truck_B1234.tiff", station / "truck_C5678.png"}
    out = tmp_path / "r.csv"
    assert score.main(_args(station, heuristic_model_1ch, out, overlays=str(ov))) == 0
    assert {Path(r["path"]) for r in _rows(out).values()} == names
    assert sorted(p.name for p in ov.iterdir()) == ["truck_B1234.png", "truck_C5678.png"]
    assert score.main(_args(station, heuristic_model_1ch, out, overlays=str(ov))) == 0       # resumes: no new rows
    assert len(out.read_text().splitlines()) == 3
    old = out.read_text().replace(str(station / "truck_B1234.tiff"), str(archive / "TRK_000123.tiff"))
    out.write_text(old)                                      # a row named by its target, as an earlier version wrote it
    assert score.main(_args(station, heuristic_model_1ch, out)) == 0 and out.read_text() == old
    manifest = station / "manifest.csv"
    manifest.write_text("path,label\ntruck_B1234.tiff,0\ntruck_C5678.png,1\n")
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{n}\n" for n in sorted(names)))
    for src, out in ((manifest, "manifest.csv"), (station / "truck_*", "glob.csv"), (listed, "list.csv")):
        assert score.main(_args(src, heuristic_model_1ch, tmp_path / out)) == 0
        assert {Path(r["path"]) for r in _rows(tmp_path / out).values()} == names, src
    assert evaluate(tmp_path / "manifest.csv", manifest, tmp_path / "report", thumbs=False)["overall"]["n"] == 2
    assert score.main(_args(manifest, heuristic_model_1ch, tmp_path / "beside.csv", overlays=str(station))) == 0
    assert (station / "truck_C5678.png").is_symlink() and (station / "truck_C5678.png.png").is_file()


def test_a_retry_with_another_manifest_keeps_the_rows_it_does_not_list(tmp_path, heuristic_model, normal_scan_path,
                                                                        capsys):
    """`--retry-failed` with a second manifest into one CSV removed every failed row, also those of files the second
    manifest does not list, which it then never scored again: the first day's unreadable truck vanished from the CSV,
    its JSON line and its pitch in the routing file; so did a row whose JSON line a crash had cut (match_jsonl).
    A resume or retry now removes only rows of files it scores again: the others stay exactly as they were."""
    d = tmp_path / "site"
    d.mkdir()
    for name in ("a.tiff", "b.tiff", "c.tiff"):
        shutil.copy(normal_scan_path, d / name)
    (d / "bad.tiff").write_bytes(b"not a scan")
    (d / "bad2.tiff").write_bytes(b"not a scan either")
    day1, day2 = d / "day1.csv", d / "day2.csv"
    day1.write_text("path,pitch_mm\na.tiff,5\nc.tiff,5\nbad.tiff,5\n")
    day2.write_text("path\nb.tiff\nbad2.tiff\n")
    out, jl = tmp_path / "r.csv", tmp_path / "r.jsonl"
    assert score.main(_args(day1, heuristic_model, out, jsonl=str(jl))) == 0
    lines = jl.read_text().splitlines(keepends=True)
    jl.write_text(lines[0] + lines[2])                          # c.tiff's line lost (a crash between row and line)
    first_rows, first_lines = out.read_text().splitlines()[1:], jl.read_text().splitlines()
    assert score.main(_args(day2, heuristic_model, out, jsonl=str(jl), retry_failed=True)) == 0, capsys.readouterr()
    rows = out.read_text().splitlines()[1:]
    assert rows[:3] == first_rows and sorted(_rows(out)) == ["a.tiff", "b.tiff", "bad.tiff", "bad2.tiff", "c.tiff"]
    assert jl.read_text().splitlines()[:2] == first_lines and len(jl.read_text().splitlines()) == 4
    routing = json.loads(score.routing_file(out).read_text())
    assert {Path(p).name for p in routing["row_pitch_mm"]} == {"a.tiff", "c.tiff", "bad.tiff"}
    assert "retrying" not in capsys.readouterr().err              # nothing of day 2 had failed before
    (d / "bad.tiff").write_bytes(normal_scan_path.read_bytes())  # day 1's truck readable now: day 1 retries it
    assert score.main(_args(day1, heuristic_model, out, jsonl=str(jl), retry_failed=True)) == 0
    assert _rows(out)["bad.tiff"]["error"] == "" and _rows(out)["bad2.tiff"]["error"] != ""


def test_a_path_up_from_a_linked_folder_reads_the_file_the_os_opens(tmp_path, heuristic_model, normal_scan_path,
                                                                     anomalous_scan_path):
    """`scans/linkdir/../x.tiff` (linkdir a link to a folder elsewhere) opens x.tiff beside the link's target, but the
    path was normalised lexically to scans/x.tiff: the row named, and the run read, another truck than the one given
    (and a manifest listing both was refused as a repeat). Now the file the OS opens is read, under the spelling given;
    both trucks get their own row and overlay."""
    (tmp_path / "elsewhere" / "target").mkdir(parents=True)
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "linkdir").symlink_to(tmp_path / "elsewhere" / "target")
    shutil.copy(normal_scan_path, scans / "x.tiff")
    shutil.copy(anomalous_scan_path, tmp_path / "elsewhere" / "x.tiff")
    given = scans / "linkdir" / ".." / "x.tiff"
    assert score.main(_args(given, heuristic_model, tmp_path / "one.csv")) == 0
    with open(tmp_path / "one.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["path"] == str(given) and row["decision"] == "INSPECT"      # the anomalous truck, named as given
    (scans / "m.csv").write_text("path\nlinkdir/../x.tiff\nx.tiff\n")
    out, ov = tmp_path / "r.csv", tmp_path / "ov"
    assert score.main(_args(scans / "m.csv", heuristic_model, out, overlays=str(ov))) == 0
    with open(out, newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert rows[str(given)]["score"] == row["score"] and rows[str(scans / "x.tiff")]["decision"] == "RELEASE"
    assert len(list(ov.rglob("*.png"))) == 2 and all(p.resolve().is_relative_to(ov.resolve()) for p in ov.rglob("*"))


def test_a_name_scored_under_another_is_named_in_the_warning(tmp_path, heuristic_model, normal_scan_path):
    """A folder holding a scan and a link to it gets one row (one per file: two made eval refuse the CSV), but the
    warning only counted the names left out ('1 file(s) named more than once'): among a day's thousands of scans an
    officer could not tell which truck's name has no row. The warning now names each name left out and the row it
    shares, the first ten of them, then how many more."""
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(normal_scan_path, d / "a.tiff")
    (d / "b.tiff").symlink_to("a.tiff")
    for k in range(12):
        (d / f"c{k:02d}.tiff").symlink_to("a.tiff")
    with pytest.warns(UserWarning) as caught:
        assert score.main(_args(d, heuristic_model, tmp_path / "r.csv")) == 0
    text = "\n".join(str(w.message) for w in caught)
    assert sorted(_rows(tmp_path / "r.csv")) == ["a.tiff"]
    assert f"{d / 'b.tiff'} is the file of {d / 'a.tiff'}" in text and f"{d / 'c08.tiff'} is the file of" in text
    assert f"{d / 'c09.tiff'}" not in text and "and 3 more" in text and "13 names" in text


def test_a_manifest_in_a_linked_folder_reads_its_dotdot_rows_through_the_link(tmp_path, heuristic_model_1ch):
    """A manifest in a linked folder (current -> big/run7) whose rows go up ('../scans/a.tiff': big/scans/a.tiff) was
    read at the path with '..' dropped as text (scans/a.tiff beside the link): another truck's file, or none, was
    scored and routed under the row (a dense block RELEASEd as the clean truck there). Each row is read where the file
    system takes its path, the link followed before '..', as eval and training read it; a plain path stays tidy."""
    from conftest import write_test_scan
    write_test_scan(tmp_path / "big" / "scans" / "a.tiff", channels=1, dense=True, seed=2)   # the row's truck
    write_test_scan(tmp_path / "scans" / "a.tiff", channels=1, seed=1)                       # another one
    (tmp_path / "big" / "run7").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "big" / "run7")
    manifest = tmp_path / "current" / "manifest.csv"
    manifest.write_text("path\n../scans/a.tiff\n")
    out = tmp_path / "r.csv"
    assert score.main(_args(manifest, heuristic_model_1ch, out)) == 0
    row = _rows(out)["a.tiff"]
    assert row["decision"] == "INSPECT" and json.loads(row["regions"]), row
    assert Path(row["path"]).resolve() == tmp_path / "big" / "scans" / "a.tiff"
    listed = tmp_path / "current" / "list.txt"
    listed.write_text("../scans/a.tiff\n")
    assert score.main(_args(listed, heuristic_model_1ch, tmp_path / "l.csv")) == 0
    assert _rows(tmp_path / "l.csv")["a.tiff"]["decision"] == "INSPECT"
    (tmp_path / "x").mkdir()
    assert score.main(_args(tmp_path / "x" / ".." / "scans", heuristic_model_1ch, tmp_path / "f.csv")) == 0
    assert list(_rows(tmp_path / "f.csv")["a.tiff"]["path"].split("/")[-3:]) == [tmp_path.name, "scans", "a.tiff"]


def test_two_rows_of_one_file_with_other_routing_inspect_it(tmp_path, heuristic_model, normal_scan_path):
    """Two manifest rows reaching one file (a link beside its target, one name in two Unicode forms) are scored
    once, under the first row; the second row's risk flags were dropped with it, and a truck flagged intel_hit there
    was RELEASEd under the first row's routing. Which row holds is unknown, so the truck is INSPECTed, the error
    naming both; rows that route alike still score as one."""
    pol = tmp_path / "policy.yaml"
    pol.write_text("tiers:\n  standard: 0.01\ndefault_tier: standard\nrisk_flags:\n  force: [intel_hit]\n")
    shutil.copy(normal_scan_path, tmp_path / "a.tiff")
    (tmp_path / "b.tiff").symlink_to("a.tiff")
    shutil.copy(normal_scan_path, tmp_path / "c.tiff")
    (tmp_path / "d.tiff").symlink_to("c.tiff")
    m = tmp_path / "manifest.csv"
    m.write_text("path,risk_flags\na.tiff,\nb.tiff,intel_hit\nc.tiff,late\nd.tiff,late\n")
    out = tmp_path / "r.csv"
    with pytest.warns(UserWarning, match="scored once"):
        assert score.main(_args(m, heuristic_model, out, policy=str(pol))) == 0
    rows = _rows(out)
    assert sorted(rows) == ["a.tiff", "c.tiff"]
    assert rows["a.tiff"]["decision"] == "INSPECT", rows["a.tiff"]
    assert "b.tiff with another risk_flags" in rows["a.tiff"]["error"]
    assert rows["c.tiff"]["decision"] == "RELEASE" and rows["c.tiff"]["error"] == ""
