"""`detector calibrate`: a bundle re-thresholded on a site's cleared traffic, graph unchanged, torch- and onnx-free."""
import csv
import json
import uuid

import numpy as np
import onnx
import pytest

from conftest import NORMAL_SCORES, TRAINING_PACKAGES, make_heuristic_bundle, run_without, write_test_scan
from detector.bundle import BundleError, file_sha256, read_metadata, replace_metadata_bytes
from detector.cli import main as cli
from detector.runtime import Inspector


def _results(path, scores, model, errors=(), sha=None):
    """A results CSV as `detector score` writes it, with the .routing.json naming the model that scored it."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "decision", "threshold", "regions", "latency_ms", "error"])
        for i, s in enumerate(scores):
            w.writerow([f"scans/t{i:05d}.tiff", f"{s:.6f}", "RELEASE", "0.5", "[]", "10.0", ""])
        for i, e in enumerate(errors):
            w.writerow([f"scans/bad{i}.tiff", "", "INSPECT", "", "[]", "1.0", e])
    routing = {"model": str(model), "model_sha256": sha or file_sha256(model), "thresholds": {}, "force_flags": []}
    path.with_name(path.name + ".routing.json").write_text(json.dumps(routing))
    return path


@pytest.fixture
def model(tmp_path):
    return make_heuristic_bundle(tmp_path / "model.onnx")


def _site_scores(n, seed=0):
    """A site whose cleared trucks score higher than the training validation (NORMAL_SCORES, 0.01-0.40)."""
    return np.random.default_rng(seed).beta(4, 6, n).round(6)


def test_site_thresholds_hit_each_rate_on_the_sites_traffic_and_the_graph_is_unchanged(tmp_path, model, capsys):
    scores = _site_scores(3000)
    res = _results(tmp_path / "cleared.csv", scores, model)
    assert cli(["calibrate", str(res), "--model", str(model), "--out", str(tmp_path / "site.onnx")]) == 0
    old, new = read_metadata(model), read_metadata(tmp_path / "site.onnx")
    assert new["normal_scores"] == sorted(float(s) for s in scores)
    for row in new["thresholds"]:
        rate, thr = row["false_alarm_rate"], row["threshold"]
        assert np.mean(scores >= thr) <= rate                          # the rate holds on the site's traffic
        assert np.mean(scores >= np.nextafter(thr, 0) - 1e-6) > rate   # and it is the lowest threshold that holds
    shipped = next(r["threshold"] for r in old["thresholds"] if r["false_alarm_rate"] == 0.01)
    assert np.mean(scores >= shipped) > 0.2      # the shipped threshold would have inspected far more than 1 %
    cal = new["site_calibration"]
    assert cal["scans"] == 3000 and cal["scored_with_sha256"] == file_sha256(model)
    assert cal["previous"] == {"thresholds": old["thresholds"], "normal_scans": len(NORMAL_SCORES),
                               "source": "training validation"}
    g_old, g_new = onnx.load(str(model)), onnx.load(str(tmp_path / "site.onnx"))
    assert g_old.graph.SerializeToString() == g_new.graph.SerializeToString()
    onnx.checker.check_model(g_new, full_check=True)
    site = Inspector(tmp_path / "site.onnx", threads=1)
    assert site.threshold == pytest.approx(next(r["threshold"] for r in new["thresholds"]
                                                if r["false_alarm_rate"] == 0.01))
    assert site.threshold_for_rate(0.02) == pytest.approx(np.sort(scores)[-61], abs=1e-6)   # a policy's tier rate
    out = capsys.readouterr()
    assert "3000 cleared scans" in out.out and "next: detector serve --model" in out.out
    assert "0.10 %" in out.err and "pin" in out.err    # 3000 scans hold a 0.1 % rate loosely: said so


def test_failed_rows_and_the_truths_anomalies_are_left_out(tmp_path, model, capsys):
    clean = _site_scores(400, seed=1)
    hot = np.full(20, 0.99)
    res = _results(tmp_path / "day.csv", np.concatenate([clean, hot]), model, errors=["unreadable", "truncated"])
    truth = tmp_path / "manifest.csv"
    truth.write_text("path,label\n" + "".join(f"scans/t{i:05d}.tiff,{int(i >= 400)}\n" for i in range(420))
                     + "scans/bad0.tiff,0\n")
    assert cli(["calibrate", str(res), "--model", str(model), "--out", str(tmp_path / "site.onnx"),
                "--truth", str(truth)]) == 0
    new = read_metadata(tmp_path / "site.onnx")
    assert new["normal_scores"] == sorted(float(s) for s in clean)
    assert new["site_calibration"]["left_out"] == {"failed": 1, "anomalous": 20, "not_in_truth": 1,
                                                        "other_model": 0}
    assert "400 cleared scans" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("other_model", "scored by another model"),
    ("no_routing", "which model scored these rows is unknown"),
    ("no_results", "cleared.csv: no such results file"),   # a typo'd path: not "score them again"
    ("too_few", "cannot set a 1.00 % false-alarm rate: at least 100"),
    ("all_failed", "no cleared scan with a score"),
    ("out_is_model", "is the model itself"),
    ("out_is_a_folder", "is a folder: give the site's bundle file"),
    ("not_a_bundle", "not a loadable ONNX model"),
    ("edited_score", "row 3: score 1.5 is outside [0, 1]"),
])
def test_refusals_name_the_file_and_write_nothing(tmp_path, model, capsys, case, message):
    res, out, mdl = tmp_path / "cleared.csv", tmp_path / "site.onnx", model
    scores = _site_scores(50 if case == "too_few" else 500)
    scores[1] = 1.5 if case == "edited_score" else scores[1]     # a hand-edited row
    if case == "all_failed":
        _results(res, [], model, errors=["unreadable"] * 3)
    else:
        _results(res, scores, model, sha="0" * 64 if case == "other_model" else None)
    if case == "no_routing":
        res.with_name(res.name + ".routing.json").unlink()
    if case == "no_results":
        res.unlink()
        res.with_name(res.name + ".routing.json").unlink()
    if case == "out_is_model":
        out = model
    if case == "out_is_a_folder":
        out = tmp_path / "site"
        out.mkdir()
    if case == "not_a_bundle":
        mdl = tmp_path / "model.ckpt.onnx"
        mdl.write_bytes(b"not onnx")
    before = model.read_bytes()
    assert cli(["calibrate", str(res), "--model", str(mdl), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert model.read_bytes() == before
    assert not (tmp_path / "site.onnx").exists() and not list(tmp_path.glob(".*.tmp"))


def test_score_then_calibrate_end_to_end_and_recalibrate_the_site_bundle(tmp_path, model):
    d = tmp_path / "cleared"
    for i in range(100):
        write_test_scan(d / f"truck{i:03d}.tiff", height=64, width=192, seed=i)
    res = tmp_path / "cleared.csv"
    assert cli(["score", str(d), "--model", str(model), "--out", str(res), "--threads", "1"]) == 0
    site = tmp_path / "site.onnx"
    assert cli(["calibrate", str(res), "--model", str(model), "--out", str(site)]) == 0
    scores = np.array([float(r["score"]) for r in csv.DictReader(open(res))])
    assert sorted(read_metadata(site)["normal_scores"]) == pytest.approx(sorted(scores), abs=1e-6)
    a, b = Inspector(model, threads=1), Inspector(site, threads=1)
    va, vb = a.inspect(d / "truck000.tiff"), b.inspect(d / "truck000.tiff")
    assert va.score == vb.score and vb.threshold == pytest.approx(np.sort(scores)[-2], abs=1e-6)
    # the site bundle's own scores calibrate it again; the record says what it replaced
    res2 = tmp_path / "again.csv"
    assert cli(["score", str(d), "--model", str(site), "--out", str(res2), "--threads", "1"]) == 0
    assert cli(["calibrate", str(res2), "--model", str(site), "--out", str(tmp_path / "site2.onnx")]) == 0
    assert read_metadata(tmp_path / "site2.onnx")["site_calibration"]["previous"]["source"] == str(res)
    # the original model's results do not calibrate the site bundle (another file, another sha)
    assert cli(["calibrate", str(res), "--model", str(site), "--out", str(tmp_path / "x.onnx")]) == 2


def test_metadata_rewrite_keeps_other_entries_and_refuses_a_cut_file(tmp_path, model):
    proto = onnx.load(str(model))
    proto.metadata_props.add(key="vendor", value="acme")
    onnx.save(proto, str(tmp_path / "m.onnx"))
    meta = read_metadata(tmp_path / "m.onnx")
    meta["site_calibration"] = {"results": "x"}
    data = replace_metadata_bytes((tmp_path / "m.onnx").read_bytes(), meta)
    data = replace_metadata_bytes(data, meta)                     # twice: still one "detector" entry
    back = onnx.load_from_string(data)
    assert sorted(p.key for p in back.metadata_props) == ["detector", "vendor"]
    assert json.loads(next(p.value for p in back.metadata_props if p.key == "detector"))["site_calibration"]
    with pytest.raises(BundleError, match="not a readable ONNX protobuf"):
        replace_metadata_bytes(model.read_bytes()[:-7], meta, model)
    bad = dict(meta, thresholds=[{"threshold": 2.0, "false_alarm_rate": 0.01}])
    with pytest.raises(BundleError, match="must lie in"):
        replace_metadata_bytes(model.read_bytes(), bad)


def test_calibrate_runs_on_a_station_without_torch_or_onnx(tmp_path, model):
    res = _results(tmp_path / "cleared.csv", _site_scores(300), model)
    code = (f"from detector.cli import main\n"
            f"raise SystemExit(main(['calibrate', {str(res)!r}, '--model', {str(model)!r}, '--out', "
            f"{str(tmp_path / 'site.onnx')!r}]))\n")
    proc = run_without(code, TRAINING_PACKAGES + ("onnx",))
    assert proc.returncode == 0, proc.stderr
    assert read_metadata(tmp_path / "site.onnx")["site_calibration"]["scans"] == 300


def _served(audit, model_sha, scores, decision="RELEASE", outcome=None, day="2026-11-02", pitch=None):
    """Verdicts a station served with the bundle of `model_sha` (score None: a failed scan), each with an outcome;
    `pitch`: the pitch their files, which carry none, were read at (serve --pitch-mm)."""
    from detector.audit import AuditLog
    log = AuditLog(audit)
    try:
        for i, s in enumerate(scores):
            rid = uuid.uuid4().hex
            log.write({"time": f"{day}T08:{i // 60:02d}:{i % 60:02d}.000+00:00", "request_id": rid,
                       "model_sha256": model_sha, "score": s, "threshold": 0.5, "tier": "standard",
                       "decision": decision if s is not None else "INSPECT", "reason": "test",
                       "untagged_pitch_mm": pitch})
            if outcome:
                log.record_outcome(rid, outcome)
    finally:
        log.close()


def test_a_stations_audit_log_calibrates_on_its_cleared_traffic(tmp_path, model, capsys):
    """Released and inspected-clear trucks count, those whose inspection found something, failed scans and other
    models' verdicts do not; the database and its CSV export give the same thresholds; --since picks the days."""
    audit, sha = tmp_path / "audit.sqlite", file_sha256(model)
    released, clear, unchecked = _site_scores(400, seed=2), np.full(15, 0.93), np.full(5, 0.91)
    _served(audit, sha, released)
    _served(audit, sha, clear, "INSPECT", "clear")
    _served(audit, sha, unchecked, "INSPECT")
    _served(audit, sha, np.full(10, 0.99), "INSPECT", "found")
    _served(audit, sha, [None] * 3)
    _served(audit, "0" * 64, _site_scores(50, seed=3))
    _served(audit, sha, np.full(200, 0.02), day="2026-10-01")          # before the scanner's service: --since
    assert cli(["calibrate", str(audit), "--model", str(model), "--out", str(tmp_path / "site.onnx"),
                "--since", "2026-11-01"]) == 0
    new = read_metadata(tmp_path / "site.onnx")
    assert new["normal_scores"] == sorted(float(s) for s in np.concatenate([released, clear, unchecked]))
    cal = new["site_calibration"]
    assert cal["left_out"] == {"failed": 3, "anomalous": 10, "not_in_truth": 0, "other_model": 50}
    assert cal["since"] == "2026-11-01" and cal["results"] == str(audit)
    out = capsys.readouterr().out
    assert "420 cleared scans" in out and "10 found something" in out and "50 by another model" in out
    assert "5 inspected without a recorded outcome taken as cleared" in out
    assert cli(["info", str(tmp_path / "site.onnx")]) == 0
    assert f"on 420 cleared scans of {audit} since 2026-11-01 (63 left out)" in capsys.readouterr().out
    # the same traffic from the export
    export = ["audit", "export", "--audit", str(audit), "--since", "2026-11-01", "--out", str(tmp_path / "a.csv")]
    assert cli(export) == 0
    assert cli(["calibrate", str(tmp_path / "a.csv"), "--model", str(model), "--out", str(tmp_path / "csv.onnx")]) == 0
    assert read_metadata(tmp_path / "csv.onnx")["thresholds"] == new["thresholds"]
    bom = tmp_path / "bom.csv"            # the export opened and saved again by a spreadsheet: a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.csv").read_bytes())
    assert cli(["calibrate", str(bom), "--model", str(model), "--out", str(tmp_path / "bom.onnx")]) == 0
    assert read_metadata(tmp_path / "bom.onnx")["thresholds"] == new["thresholds"]
    # without --since the October trucks (all 0.02) count too
    assert cli(["calibrate", str(audit), "--model", str(model), "--out", str(tmp_path / "all.onnx")]) == 0
    assert len(read_metadata(tmp_path / "all.onnx")["normal_scores"]) == 620


def test_a_site_bundle_calibrates_again_on_verdicts_served_by_it_and_by_its_parent(tmp_path, model):
    audit, sha = tmp_path / "audit.sqlite", file_sha256(model)
    _served(audit, sha, _site_scores(300, seed=4))
    assert cli(["calibrate", str(audit), "--model", str(model), "--out", str(tmp_path / "site.onnx")]) == 0
    site_sha = file_sha256(tmp_path / "site.onnx")
    _served(audit, site_sha, _site_scores(200, seed=5), day="2026-11-03")   # the site bundle in service
    _served(audit, "f" * 64, _site_scores(70, seed=6), day="2026-11-03")
    site = tmp_path / "site.onnx"
    assert cli(["calibrate", str(audit), "--model", str(site), "--out", str(tmp_path / "s2.onnx")]) == 0
    cal = read_metadata(tmp_path / "s2.onnx")["site_calibration"]
    assert cal["scans"] == 500 and cal["left_out"]["other_model"] == 70     # same graph: its parent's scores count
    # a bundle two calibrations away is another lineage as far as the log can tell
    _served(audit, file_sha256(tmp_path / "s2.onnx"), _site_scores(100, seed=7), day="2026-11-04")
    assert cli(["calibrate", str(audit), "--model", str(tmp_path / "s2.onnx"), "--out", str(tmp_path / "s3.onnx")]) == 0
    assert read_metadata(tmp_path / "s3.onnx")["site_calibration"]["scans"] == 300   # s2's own and site.onnx's


@pytest.mark.parametrize("args, message", [
    (["--truth", "manifest.csv"], "--truth is for a `detector score` results CSV"),
    (["--since", "last tuesday"], "--since 'last tuesday': not an ISO date"),
    (["--since", "2027-01-01"], "no verdict of this model with a score to calibrate on since 2027-01-01"),
])
def test_audit_calibration_refusals(tmp_path, model, capsys, args, message):
    audit = tmp_path / "audit.sqlite"
    _served(audit, file_sha256(model), _site_scores(150))
    assert cli(["calibrate", str(audit), "--model", str(model), "--out", str(tmp_path / "s.onnx"), *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "s.onnx").exists()


def test_since_is_refused_for_a_results_csv(tmp_path, model, capsys):
    res = _results(tmp_path / "cleared.csv", _site_scores(300), model)
    out = tmp_path / "s.onnx"
    assert cli(["calibrate", str(res), "--model", str(model), "--out", str(out), "--since", "2026-11-01"]) == 2
    assert "--since selects verdicts of an audit log" in capsys.readouterr().err


def test_a_site_scored_at_its_scanners_pitch_gets_a_bundle_that_reads_its_files_so(tmp_path, capsys):
    """A 4 mm site scores its cleared trucks (16-bit PNGs, no pitch in them) with `score --pitch-mm 4` and calibrates
    on them: the site bundle kept the model's 5 mm for such files, and `detector serve --model site.onnx`, as
    calibrate's next line says, read every truck at 5 mm against thresholds set on them read at 4 mm (with this
    test's bundle, 120 such trucks of 250 x 750 px: all inspected, 1 at 4 mm). The scores' pitch now becomes the site bundle's default_pitch_mm."""
    import cv2

    from conftest import make_scan_counts
    from detector.bundle_info import describe
    model = make_heuristic_bundle(tmp_path / "model.onnx", channels=1)
    d = tmp_path / "cleared"
    d.mkdir()
    for i in range(100):
        cv2.imwrite(str(d / f"truck{i:03d}.png"), make_scan_counts(120, 360, 1, seed=100 + i)[0])
    res, site = tmp_path / "cleared.csv", tmp_path / "site.onnx"
    assert cli(["score", str(d), "--model", str(model), "--out", str(res), "--threads", "1", "--pitch-mm", "4"]) == 0
    assert cli(["calibrate", str(res), "--model", str(model), "--out", str(site)]) == 0
    assert "read at 4 mm by" in capsys.readouterr().out
    meta = read_metadata(site)
    assert meta["default_pitch_mm"] == 4.0 and meta["site_calibration"]["default_pitch_mm"] == 4.0
    scored = {r["path"]: float(r["score"]) for r in csv.DictReader(open(res))}
    b = Inspector(site, threads=1)
    assert b.default_pitch_mm == 4.0
    assert b.inspect(d / "truck007.png").score == pytest.approx(scored[str(d / "truck007.png")], abs=1e-6)
    assert any("read at 4 mm (the site calibration's" in line for line in describe(site))
    plain = tmp_path / "plain.csv"   # scored at the bundle's own pitch: the key stays as it was
    assert cli(["score", str(d), "--model", str(model), "--out", str(plain), "--threads", "1"]) == 0
    assert cli(["calibrate", str(plain), "--model", str(model), "--out", str(tmp_path / "p.onnx")]) == 0
    assert "default_pitch_mm" not in read_metadata(tmp_path / "p.onnx")


def test_a_station_served_at_its_scanners_pitch_gets_a_bundle_that_reads_its_files_so(tmp_path, model, capsys):
    """A 4 mm site runs `detector serve --pitch-mm 4` (its files carry no pitch) and calibrates on the audit log: the
    site bundle kept the model's 5 mm for such files, so serving it as calibrate's next line says read every truck
    at 5 mm against thresholds set on them read at 4 mm. The log now records the pitch each untagged file was read
    at, and calibrate makes it the bundle's, from the database and from its export alike; verdicts at two pitches are
    refused (one bundle holds one), and --since picks one of them."""
    audit, sha = tmp_path / "audit.sqlite", file_sha256(model)
    _served(audit, sha, _site_scores(300, seed=8), pitch=4.0)
    _served(audit, sha, _site_scores(20, seed=9))                        # files with a pitch of their own
    _served(audit, "0" * 64, _site_scores(20, seed=10), pitch=6.0)       # another model's verdicts: not calibrated on
    export = tmp_path / "audit.csv"
    assert cli(["audit", "export", "--audit", str(audit), "--out", str(export)]) == 0
    for source in (audit, export):
        site = tmp_path / f"site_{source.suffix[1:]}.onnx"
        assert cli(["calibrate", str(source), "--model", str(model), "--out", str(site)]) == 0
        assert "read at 4 mm by" in capsys.readouterr().out
        meta = read_metadata(site)
        assert meta["default_pitch_mm"] == 4.0 and meta["site_calibration"]["default_pitch_mm"] == 4.0
    _served(audit, sha, _site_scores(300, seed=11), day="2026-11-05", pitch=5.0)   # restarted without --pitch-mm
    out = tmp_path / "mixed.onnx"
    assert cli(["calibrate", str(audit), "--model", str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "without a pitch of their own at 4 mm and at 5 mm" in err, err
    assert "those at 5 mm with --since 2026-11-05T08:00:00.000+00:00" in err
    assert not out.exists()
    assert cli(["calibrate", str(audit), "--model", str(model), "--out", str(out), "--since", "2026-11-05"]) == 0
    assert "default_pitch_mm" not in read_metadata(out)    # the bundle's own 5 mm: nothing to change


@pytest.fixture
def int8_model(tmp_path, model):
    """The heuristic bundle as an INT8 export makes it (heatmap and score quantized after their sigmoids): the
    runtime's rule for its scores changed on 2026-12-07 (the graph's logits pooled, not its 1/255 steps)."""
    from test_runtime import _as_int8, _edited
    return _edited(model, tmp_path / "int8.onnx", graph=_as_int8,
                   meta=lambda d: d.update(score={"method": "topk_mean_logit", "k": 4}))


def _ruled(results, rule):
    """The results' routing file as `detector score` writes it now: with the rule its scores were made by."""
    routing = results.with_name(results.name + ".routing.json")
    routing.write_text(json.dumps({**json.loads(routing.read_text()), "score_rule": rule}))


def test_an_int8_bundle_is_not_calibrated_on_scores_of_an_unknown_rule(tmp_path, model, int8_model, capsys):
    """An INT8 bundle's scores changed with the scoring rule (2026-12-07); results scored before it was recorded
    would set thresholds on old-rule scores that the runtime then applies to new-rule ones: refused, score again.
    Results that record the bundle's rule, and an fp32 bundle's unrecorded ones (both rules give them alike), pass."""
    assert Inspector(int8_model, warmup=False).score_rule == "heatmap_logits"
    old = _results(tmp_path / "old.csv", _site_scores(300), int8_model)
    out = tmp_path / "site.onnx"
    assert cli(["calibrate", str(old), "--model", str(int8_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "before the scoring rule was recorded" in err and "score the cleared scans again" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    _ruled(old, "score_output")
    assert cli(["calibrate", str(old), "--model", str(int8_model), "--out", str(out)]) == 2
    assert "by the rule 'score_output'" in capsys.readouterr().err and not out.exists()
    _ruled(old, "heatmap_logits")
    assert cli(["calibrate", str(old), "--model", str(int8_model), "--out", str(out)]) == 0
    assert read_metadata(out)["site_calibration"]["score_rule"] == "heatmap_logits"
    fp32 = _results(tmp_path / "fp32.csv", _site_scores(300), model)
    assert cli(["calibrate", str(fp32), "--model", str(model), "--out", str(tmp_path / "f.onnx")]) == 0


def test_an_int8_bundle_is_calibrated_only_on_verdicts_that_record_its_rule(tmp_path, int8_model, capsys):
    """A station's log holds the verdicts served before the rule was recorded (NULL) and those after: refused, naming
    the --since of the first recorded one; that --since calibrates, and the export's score_rule column reads so."""
    from detector.audit import AuditLog
    audit, sha = tmp_path / "audit.sqlite", file_sha256(int8_model)
    _served(audit, sha, _site_scores(150, seed=8))                       # an older service: no rule recorded
    log = AuditLog(audit)
    for i, s in enumerate(_site_scores(150, seed=9)):
        log.write({"time": f"2026-12-08T08:{i // 60:02d}:{i % 60:02d}.000+00:00", "request_id": uuid.uuid4().hex,
                   "model_sha256": sha, "score": s, "threshold": 0.5, "decision": "RELEASE",
                   "score_rule": "heatmap_logits"})
    log.close()
    out = tmp_path / "site.onnx"
    assert cli(["calibrate", str(audit), "--model", str(int8_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "were scored before the scoring rule was recorded" in err and "--since 2026-12-08T08:00:00" in err
    assert not out.exists()
    assert cli(["audit", "export", "--audit", str(audit), "--out", str(tmp_path / "a.csv")]) == 0
    assert cli(["calibrate", str(tmp_path / "a.csv"), "--model", str(int8_model), "--out", str(out)]) == 2
    assert cli(["calibrate", str(audit), "--model", str(int8_model), "--out", str(out),
                "--since", "2026-12-08T08:00:00"]) == 0
    assert read_metadata(out)["site_calibration"]["scans"] == 150


def test_score_records_its_rule_and_will_not_resume_int8_rows_of_an_unknown_one(tmp_path, int8_model, capsys):
    """`detector score` writes the rule into the routing file, so its results calibrate the INT8 bundle; a CSV scored
    before that is not resumed (one CSV would hold scores of two rules, and the routing file then name the new)."""
    d = tmp_path / "cleared"
    for i in range(3):
        write_test_scan(d / f"truck{i:03d}.tiff", height=64, width=192, seed=i)
    res = tmp_path / "cleared.csv"
    assert cli(["score", str(d), "--model", str(int8_model), "--out", str(res), "--threads", "1"]) == 0
    routing = res.with_name(res.name + ".routing.json")
    recorded = json.loads(routing.read_text())
    assert recorded["score_rule"] == "heatmap_logits"
    del recorded["score_rule"]                                        # as an older `detector score` wrote it
    routing.write_text(json.dumps(recorded))
    res.write_text("".join(res.read_text().splitlines(keepends=True)[:2]))   # a run stopped after one row
    assert cli(["score", str(d), "--model", str(int8_model), "--out", str(res), "--threads", "1"]) == 2
    assert "before the scoring rule was recorded" in capsys.readouterr().err
    assert "score_rule" not in json.loads(routing.read_text())
