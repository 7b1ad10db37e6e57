"""`detector info`: a bundle's facts from its metadata, for the file a station runs (torch- and onnx-free)."""
import csv
import hashlib
import json

import numpy as np

from conftest import make_heuristic_bundle, run_without
from detector.bundle import read_metadata
from detector.bundle_info import describe
from detector.cli import main as cli


def _row(lines, rate):
    return next(ln for ln in lines if ln.strip().startswith(f"{100 * rate:.2f}%"))


def test_info_names_the_file_its_thresholds_and_what_they_rest_on(tmp_path, capsys):
    model = make_heuristic_bundle(tmp_path / "model.onnx")   # 300 normal scores: 1 % and 0.5 % resolved, 0.1 % not
    meta = read_metadata(model)
    assert cli(["info", str(model)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{model}: detector model bundle") and "fp32" in out[0]
    assert any(ln.split() == ["sha256", hashlib.sha256(model.read_bytes()).hexdigest()] for ln in out)
    assert any("2 channel(s) (high, low)" in ln for ln in out)
    for row in meta["thresholds"]:
        line = _row(out, row["false_alarm_rate"])
        assert f"{row['threshold']:.4f}" in line and "300 normal validation scans" in line
        assert ("too few" in line) == (not row["resolvable"])
        assert ("default" in line.split()) == (row["false_alarm_rate"] == 0.01)
    assert [r["resolvable"] for r in meta["thresholds"]] == [True, True, False]
    assert out[-1].startswith("next: detector score cleared/") and f"calibrate cleared.csv --model {model}" in out[-1]

    resolved = make_heuristic_bundle(tmp_path / "resolved.onnx", normal_scores=np.linspace(0.01, 0.4, 2000))
    assert cli(["info", str(resolved)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any("too few" in ln for ln in out) and out[-1] == f"next: detector serve --model {resolved}"
    spaced = make_heuristic_bundle(tmp_path / "site 1" / "m.onnx", normal_scores=np.linspace(0.01, 0.4, 2000))
    assert cli(["info", str(spaced)]) == 0   # the next command pastes into a shell as one argument
    assert capsys.readouterr().out.splitlines()[-1] == f"next: detector serve --model '{spaced}'"


def test_info_after_calibrate_shows_the_site_and_json_is_the_metadata(tmp_path, capsys):
    model = make_heuristic_bundle(tmp_path / "model.onnx")
    scores = np.random.default_rng(0).beta(4, 6, 1500).round(6)
    res = tmp_path / "cleared.csv"
    with open(res, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "decision", "threshold", "regions", "latency_ms", "error"])
        w.writerows([f"t{i}.tiff", f"{s:.6f}", "RELEASE", "0.5", "[]", "9", ""] for i, s in enumerate(scores))
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    res.with_name("cleared.csv.routing.json").write_text(json.dumps({"model_sha256": sha}))
    site = tmp_path / "site.onnx"
    assert cli(["calibrate", str(res), "--model", str(model), "--out", str(site)]) == 0
    capsys.readouterr()
    assert cli(["info", str(site)]) == 0
    out = capsys.readouterr().out.splitlines()
    meta = read_metadata(site)
    for row in meta["thresholds"]:
        line = _row(out, row["false_alarm_rate"])
        assert f"{row['threshold']:.4f}" in line and "1500 cleared scans of the site" in line
    site_line = next(ln for ln in out if ln.strip().startswith("site"))
    assert f"on 1500 cleared scans of {res}" in site_line and "before: 300 scans of training validation" in site_line
    assert cli(["info", str(site), "--json"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["metadata"] == json.loads(json.dumps(meta))
    assert dumped["sha256"] == hashlib.sha256(site.read_bytes()).hexdigest() != sha
    assert dumped["bytes"] == site.stat().st_size


def test_info_shows_int8_and_refuses_what_is_no_bundle(tmp_path, capsys):
    model = make_heuristic_bundle(tmp_path / "model.onnx")
    meta = read_metadata(model)
    drift = {"quantization": {"format": "QDQ", "activations": "uint8", "weights": "int8 per-channel"},
             "auroc_fp32": 0.9512, "auroc_int8": 0.9498, "detection_fp32": 0.8, "detection_int8": 0.79,
             "normal": 40, "anomalous": 20, "threshold": 0.61, "detection_at_threshold_fp32": 0.75,
             "detection_at_threshold_int8": 0.7}
    lines = describe(model, {**meta, "int8": drift})
    assert "INT8 (QDQ, uint8 activations, int8 per-channel weights)" in lines[0]
    assert any("AUROC 0.9512 -> 0.9498" in ln and "80.0 % -> 79.0 %" in ln for ln in lines)
    # the drop at the shipped threshold, the operating point export also judges the drift at
    assert any("at the shipped threshold 0.6100 75.0 % -> 70.0 %" in ln for ln in lines), lines
    older = {k: v for k, v in drift.items() if "threshold" not in k}   # a bundle exported before it was measured
    assert not any("shipped threshold" in ln for ln in describe(model, {**meta, "int8": older}))
    (tmp_path / "notes.onnx").write_text("not a model")
    for bad, why in ((tmp_path / "notes.onnx", "not a loadable ONNX model"), (tmp_path / "gone.onnx", "not found")):
        assert cli(["info", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"detector info: {bad}") and why in err


def test_info_runs_on_a_station_without_torch_or_onnx(tmp_path):
    model = make_heuristic_bundle(tmp_path / "model.onnx")
    out = run_without(f"from detector.cli import main\nraise SystemExit(main(['info', {str(model)!r}]))\n",
                      blocked=("torch", "torchvision", "lightning", "albumentations", "onnx"))
    assert out.returncode == 0, out.stderr
    assert "detector model bundle" in out.stdout


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`detector info --json | head`: the pipe closes before the output is written; a BrokenPipeError traceback
    (and a second one at exit's flush) was printed to stderr."""
    import subprocess
    import sys
    model = make_heuristic_bundle(tmp_path / "model.onnx", normal_scores=np.linspace(0, 0.4, 20000).round(6).tolist())
    proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "info", str(model), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                    # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_info_says_which_checkpoint_a_fine_tuned_network_started_from(tmp_path):
    meta = read_metadata(make_heuristic_bundle(tmp_path / "model.onnx"))
    for init, said in ((None, False), ("runs/synth/best.ckpt", True)):
        meta["train_config"] = {"model": {"backbone": "resnet18", "width": 32, "init": init}}
        network = next(ln for ln in describe(tmp_path / "model.onnx", meta) if ln.strip().startswith("network"))
        assert ("fine-tuned from runs/synth/best.ckpt" in network) == said, network


def test_thresholds_crowded_under_one_are_printed_apart(tmp_path, capsys):
    """A confident model's normal scores crowd just under 1: its thresholds for 1 %, 0.5 % and 0.1 % printed alike
    at 4 decimals (0.9999 or 1.0000, a threshold no score below 1 reaches), in `info`, `calibrate`'s table and the
    service's tier line. They get the decimals that keep them apart and below 1 now; other thresholds keep 4."""
    from detector.calibration import threshold_texts
    from detector.policy import Policy
    assert threshold_texts(0.9675) == ["0.9675"] and threshold_texts(0.99996, 0.99997) == ["0.99996", "0.99997"]
    assert threshold_texts(0.999996) == ["0.999996"] and threshold_texts(0.5, 0.5) == ["0.5000", "0.5000"]
    scores = 1 - np.geomspace(1e-3, 1e-6, 2000)
    model = make_heuristic_bundle(tmp_path / "model.onnx", normal_scores=scores)
    meta = read_metadata(model)
    assert cli(["info", str(model)]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [_row(lines, r["false_alarm_rate"]).split()[1] for r in meta["thresholds"]]
    assert len(set(shown)) == len(meta["thresholds"]) and all(float(s) < 1 for s in shown), shown
    for s, r in zip(shown, meta["thresholds"]):
        assert abs(float(s) - r["threshold"]) < 10 ** -(len(s.split(".")[1])), (s, r)
    policy = Policy({"a": 0.01, "b": 0.001}, "a")
    policy.bind(meta)
    assert all(float(part.rsplit(" ", 1)[1]) < 1 for part in policy.describe().split("; ")), policy.describe()
