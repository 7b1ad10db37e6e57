"""Smoke tests of the benchmark scripts: each runs as documented on tiny inputs, prints its figures with units,
and a wrong path ends in one line, not a traceback. Seconds each; the ones that train or export are left out."""
from __future__ import annotations

import csv
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_heuristic_bundle, write_test_scan

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """python benchmarks/SCRIPT ARGS with this checkout's package, as the docs run it."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert all(n in p.stderr for n in needles), p.stderr


def write_scores(path: Path, labels: list[int], scores: list[float]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "test_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "anomaly_type", "score", "top_region_hit"])
        w.writerows([f"scan_{i}.tiff", y, "none", s, ""] for i, (y, s) in enumerate(zip(labels, scores)))
    return path


def test_compare_runs_prints_both_runs_the_paired_difference_and_shared_misses(tmp_path):
    rng = np.random.default_rng(0)
    y = [0] * 40 + [1] * 20
    noisy = list(np.r_[rng.uniform(0, 0.6, 40), rng.uniform(0.3, 1.0, 20)].round(6))
    perfect = [0.1] * 40 + [0.9] * 20
    a, b = write_scores(tmp_path / "a", y, noisy), write_scores(tmp_path / "b", y, perfect)
    p = bench("compare_runs.py", str(a), str(b), "--resamples", "200")
    assert p.returncode == 0, p.stderr
    assert "60 test scans (20 anomalous)" in p.stdout
    auroc = re.search(r"AUROC\s+A ([\d.]+)\s+B ([\d.]+)\s+B-A \+([\d.]+)", p.stdout)
    assert 0.5 < float(auroc[1]) < 1.0 and float(auroc[2]) == 1.0
    assert abs(float(auroc[3]) - (1.0 - float(auroc[1]))) < 1e-3
    assert "B better" in p.stdout and re.search(r"missed at 1 %: A \d+, B 0, both 0 of 20 anomalies", p.stdout)
    one_line_error(bench("compare_runs.py", str(a), str(tmp_path / "none")), "none: not found")
    (tmp_path / "results.csv").write_text("path,score,decision\nscan_0.tiff,0.5,INSPECT\n")   # detector score's
    one_line_error(bench("compare_runs.py", str(a), str(tmp_path / "results.csv")), "not a test scores CSV")


@pytest.mark.parametrize("script", ["evaluate_checkpoint.py", "false_alarms.py", "heatmap_cells.py"])
def test_run_folder_scripts_say_what_is_missing_in_one_line(tmp_path, monkeypatch, script):
    """A run folder without the file the script needs (no test split, a typo): the file named in one line. In this
    process (torch is imported once for the suite): an error other than SystemExit would fail the test."""
    run = write_scores(tmp_path / "run", [0, 1], [0.1, 0.9])
    cases = {"evaluate_checkpoint.py": [([str(run), str(tmp_path)], "run/last.ckpt: no such checkpoint file")],
             "false_alarms.py": [([str(run)], "run/best.ckpt: no such checkpoint file"),
                                 ([str(tmp_path)], "test_scores.csv: not found")],
             "heatmap_cells.py": [([str(run), str(tmp_path / "data")], "data: no such dataset folder")]}[script]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))   # as when the script runs: heatmap_cells imports a sibling
    for args, needle in cases:
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and needle in e.value.code, e.value.code


def test_score_throughput_prints_scans_per_second_and_peak_memory(tmp_path):
    cache = tmp_path / "cache"
    for i in range(2):   # small stand-ins in the cache: no generation, no export
        write_test_scan(cache / "images" / f"s{i}.tiff", height=200, width=600, seed=i)
    model = make_heuristic_bundle(tmp_path / "heuristic.onnx")
    p = bench("score_throughput.py", "--model", str(model), "--cache", str(cache), "--n", "2", "--rss-counts", "1")
    assert p.returncode == 0, p.stderr
    rate = re.search(r"throughput ([\d.]+) scans/s at n=2 \(fp32; target >= 10\); peak RSS (\d+) MiB at n=1", p.stdout)
    assert rate and float(rate[1]) > 0 and int(rate[2]) > 20, p.stdout
    assert "n=    2:" in p.stdout and "0 failed" in p.stdout
    one_line_error(bench("score_throughput.py", "--model", str(tmp_path / "none.onnx"), "--cache", str(cache)),
                   "none.onnx", "not found")


def test_score_throughput_refuses_to_time_scans_that_fail(tmp_path):
    """Scans the model refuses (here: heights outside its training scans') fail in a header read: 30+ scans/s,
    'target >= 10' met, while not one was scored. One line naming the failure instead."""
    import onnx

    from detector.bundle import attach_metadata, read_metadata
    cache = tmp_path / "cache"
    for i in range(2):
        write_test_scan(cache / "images" / f"s{i}.tiff", height=200, width=600, seed=i)
    model = make_heuristic_bundle(tmp_path / "heuristic.onnx")
    meta = dict(read_metadata(model), scan_height_mm=[10.0, 20.0])
    onnx.save(attach_metadata(onnx.load(str(model)), meta), str(model))
    p = bench("score_throughput.py", "--model", str(model), "--cache", str(cache), "--n", "2", "--rss-counts", "1")
    one_line_error(p, "1 of 1 scans", "failed to score", "m high")
    assert "scans/s" not in p.stdout


def test_serve_load_prints_throughput_latency_and_server_memory(tmp_path):
    p = bench("serve_load.py", "--duration", "1", "--warmup", "0.3", "--clients", "1", "--height", "200",
              "--width", "400")
    assert p.returncode == 0, p.stderr
    rate = re.search(r"([\d.]+) verdicts/s\s+latency ms p50 ([\d.]+)\s+p95 ([\d.]+)", p.stdout)
    assert rate and float(rate[1]) > 0 and 0 < float(rate[2]) <= float(rate[3]), p.stdout
    assert re.search(r"status \{200: \d+\}", p.stdout) and "INSPECT" in p.stdout and "RELEASE" in p.stdout
    assert re.search(r"server RSS idle after warm-up [\d.]+ MB", p.stdout)
    one_line_error(bench("serve_load.py", "--scan", str(tmp_path / "none.tiff")), "no such scan file")


def test_serve_load_paces_its_clients_and_counts_the_shadow_rows(tmp_path):
    """--interval posts one truck every S s per client (a station's pace); --shadow serves a candidate beside the live
    model and counts its rows against the verdicts."""
    from conftest import make_heuristic_bundle
    cand = make_heuristic_bundle(tmp_path / "cand.onnx")
    p = bench("serve_load.py", "--duration", "2", "--warmup", "0", "--clients", "1", "--interval", "0.5", "--height",
              "200", "--width", "400", "--shadow", str(cand))
    assert p.returncode == 0, p.stderr
    n = int(re.search(r"status \{200: (\d+)\}", p.stdout)[1])
    assert 3 <= n <= 4 and "interval 0.5 s per client" in p.stdout, p.stdout   # back to back it posts dozens
    rows = re.search(r"shadow: (\d+) candidate rows for (\d+) verdicts", p.stdout)
    assert rows and int(rows[2]) >= n and 1 <= int(rows[1]) <= int(rows[2]), p.stdout


def test_windows_hold_the_anomaly_and_the_labels_only_manifest_drops_the_training_masks(tmp_path):
    """benchmarks/windows.py (labels alone on scans that fit in a crop): each anomalous window holds its anomaly,
    each normal scan gives two windows, every window is size x size, and training anomalies lose their masks."""
    import cv2

    from detector.scan import read_scan
    from detector.synth.dataset import write_dataset
    src = tmp_path / "d"
    rows = write_dataset(src, 4, seed=3, anomaly_fraction=0.5, workers=1, height=240, split="train", progress=False)
    p = bench("windows.py", str(src), str(tmp_path / "w"), "--size", "96")
    assert p.returncode == 0, p.stderr
    n_anomalous = sum(int(r["label"]) for r in rows)
    out = list(csv.DictReader(open(tmp_path / "w" / "manifest.csv")))
    assert len(out) == n_anomalous + 2 * (4 - n_anomalous) and n_anomalous > 0
    for r in out:
        assert read_scan(tmp_path / "w" / r["path"]).attenuation.shape[1:] == (96, 96)
        assert bool(r["mask"]) == (r["label"] == "1")
        if r["mask"]:
            assert cv2.imread(str(tmp_path / "w" / r["mask"]), cv2.IMREAD_UNCHANGED).any()   # the anomaly is in it
    weak = list(csv.DictReader(open(tmp_path / "w" / "labels_only" / "manifest.csv")))
    assert [r["path"] for r in weak] == [f"../{r['path']}" for r in out] and not any(r["mask"] for r in weak)
    one_line_error(bench("windows.py", str(tmp_path / "none"), str(tmp_path / "w2")), "manifest.csv not found")
    one_line_error(bench("windows.py", str(src), str(tmp_path / "w3"), "--size", "2000"), "smaller than a 2000 px window")


def test_windows_refuses_a_dataset_without_splits_and_writes_nothing_outside_out(tmp_path):
    """A plain `detector synth` folder (split column empty): its windows were written to OUT//images, i.e. /images."""
    from detector.synth.dataset import write_dataset
    src = tmp_path / "d"
    write_dataset(src, 2, seed=3, anomaly_fraction=0.5, workers=1, height=240, progress=False)
    assert not any(r["split"] for r in csv.DictReader(open(src / "manifest.csv")))
    p = bench("windows.py", str(src), str(tmp_path / "w"), "--size", "96")
    one_line_error(p, "no split column")
    assert not (tmp_path / "w").exists()


def test_site_calibration_prints_the_shipped_and_the_site_thresholds_on_the_test_set(tmp_path):
    model = make_heuristic_bundle(tmp_path / "model.onnx")
    test = tmp_path / "test"
    for i in range(6):
        write_test_scan(test / ("anomalous" if i % 2 else "normal") / f"t{i}.tiff", height=64, width=192,
                        dense=bool(i % 2), seed=i)
    cleared = tmp_path / "cleared"
    for i in range(100):
        write_test_scan(cleared / f"c{i:03d}.tiff", height=64, width=192, seed=100 + i)
    p = bench("site_calibration.py", str(model), str(test), "--out", str(tmp_path / "site"), "--cleared-dir", str(cleared))
    assert p.returncode == 0, p.stderr
    table = p.stdout[p.stdout.index("test set"):]
    assert "3 clean, 3 anomalous scans" in table
    rows = re.findall(r"^(shipped|site) +(\S+)% +([\d.]+) +(\d+) = .*\s([\d.]+)%$", table, re.M)
    assert [r[0] for r in rows] == ["shipped"] * 3 + ["site"] * 3
    assert all(r[4] == "100.0" for r in rows)            # the dense blocks are found at every threshold
    assert (tmp_path / "site" / "site.onnx").is_file()


@pytest.mark.parametrize("args, needle", [(["--test", "0"], "--test must be >= 1"),
                                          (["--anomaly-fraction", "1.5"], "--anomaly-fraction must be in [0, 1]"),
                                          (["--config", "configs/nope.yaml"], "nope.yaml")])
def test_quality_refuses_bad_arguments_before_generating_data(tmp_path, args, needle):
    """benchmarks/quality.py trains (left out above), but its argument checks come first: --test 0 trained a full run
    and then had no figures to print; a fraction outside [0, 1] ended in a ValueError traceback from the generator."""
    p = bench("quality.py", "--train", "4", "--val", "2", "--work", str(tmp_path / "q"), *args)
    one_line_error(p, needle)
    assert not (tmp_path / "q").exists()


def test_quality_refuses_a_data_folder_an_older_generator_made(tmp_path):
    """The data folder is reused by its name (seed and counts), which the generator's version was not part of: after
    the in_tyre / in_fuel_tank change a folder made before passed for today's scans, with other pixels."""
    old = tmp_path / "q" / "data_s100_4_2_1" / "train"
    old.mkdir(parents=True)
    (old / "manifest.csv").write_text("path,label\n")   # as every generator before version 2 left it: no synth.json
    p = bench("quality.py", "--train", "4", "--val", "2", "--test", "1", "--work", str(tmp_path / "q"))
    one_line_error(p, "was made by synthetic generator version 1")
    assert sorted(x.name for x in old.parent.iterdir()) == ["train"]



def test_synth_speed_prints_scans_per_second_in_memory_and_on_the_cli_path():
    p = bench("synth_speed.py", "--count", "2", "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert re.search(r"generate, 1 process: [\d.]+ scans/s \(\d+ ms per scan", p.stdout), p.stdout
    assert re.search(r"generate in memory: [\d.]+ scans/s on 1 workers", p.stdout), p.stdout
    assert re.search(r"detector synth OUT --count 2 \(CLI path, TIFF\+PNG\+manifest\): [\d.]+ scans/s", p.stdout)
    bad = bench("synth_speed.py", "--count", "0")   # argparse's usage line, then the error
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--count and --workers must be >= 1" in bad.stderr


def test_train_speed_prints_the_networks_flops_and_crops_per_second():
    p = bench("train_speed.py", "--config", "configs/quick.yaml", "--steps", "1", "--threads", "1",
              "data.batch_size=2")
    assert p.returncode == 0, p.stderr
    assert "3.12 GFLOP forward on 640x2400 px @5 mm (320x1216 @10 mm)" in p.stdout, p.stdout
    assert re.search(r"CPU \(1 threads\): [\d.]+ crops/s \(128px, batch 2, 32-true", p.stdout), p.stdout
    p = bench("train_speed.py", "--config", "configs/quick.yaml", "--steps", "1", "--threads", "1",
              "data.batch_size=2", "preprocessing.model_pitch_mm=5")
    assert "(640x2400 @5 mm)" in p.stdout, p.stdout   # the network's input at that pitch, not 10 mm's
    one_line_error(bench("train_speed.py", "--config", "configs/nope.yaml"), "nope.yaml")


def test_material_visibility_prints_a_median_per_anomaly_type():
    from detector.synth.scene import ANOMALY_TYPES
    p = bench("material_visibility.py", "--per-type", "1")
    assert p.returncode == 0, p.stderr
    rows = re.findall(r"^  (\w+) +high energy +[\d.]+ +material +-?[\d.]+ +\(medians", p.stdout, re.M)
    assert rows and set(rows) <= set(ANOMALY_TYPES), p.stdout


def test_tip_noise_measures_photon_noise_rising_with_attenuation_as_tip_models_it():
    """benchmarks/tip_noise.py: the generator's noise at model pitch grows with attenuation (fewer photons), and TIP's
    noise model (detector.augment's constants, set from this curve) stays within 40 % of it below the read-noise band."""
    from detector.augment import TIP_PHOTONS, TIP_READ
    p = bench("tip_noise.py", "--scans", "2", "--per-scan", "4")
    assert p.returncode == 0, p.stderr
    bands = [(float(lo), float(hi), float(sd)) for lo, hi, sd in
             re.findall(r"^  A +([\d.]+)- *([\d.]+): ([\d.]+) / [\d.]+$", p.stdout, re.M)]
    low = [(lo, sd) for lo, _, sd in bands if lo < 7]
    assert len(low) >= 8 and all(b[1] < a[1] for a, b in zip(low[1:], low[:-1])), p.stdout
    for lo, sd in low:
        a = lo + 0.25
        model = np.sqrt(np.exp(a) / TIP_PHOTONS + (TIP_READ / TIP_PHOTONS) ** 2 * np.exp(2 * a))
        assert 0.6 < model / sd < 1.4, (lo, sd, model)
    assert re.search(r"high energy: the noise left out / the threat's contrast: median [\d.]+", p.stdout), p.stdout


def test_finetune_keeps_the_high_energy_and_refuses_a_wrong_init_before_any_data(tmp_path):
    """benchmarks/finetune.py trains (left out), but its single-energy site copy and its argument checks run here."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from finetune import single_energy
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from detector.scan import read_scan
    from detector.synth.dataset import write_dataset
    src = tmp_path / "data"
    write_dataset(src, 2, seed=5, anomaly_fraction=0.5, workers=1, height=160)
    out = single_energy(src)
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    assert rows == list(csv.DictReader(open(src / "manifest.csv", newline="")))
    for r in rows:
        both, one = read_scan(src / r["path"]), read_scan(out / r["path"])
        assert both.energies == ("high", "low") and one.energies == ("high",)
        assert np.array_equal(one.counts[0], both.counts[0])
        assert not r["mask"] or (out / r["mask"]).read_bytes() == (src / r["mask"]).read_bytes()
    one_line_error(bench("finetune.py", "--init", str(tmp_path / "none.ckpt"), "--work", str(tmp_path / "w")),
                   "none.ckpt: no such checkpoint file")
    assert not (tmp_path / "w").exists()


def test_quality_reads_its_figures_again_above_each_visibility_floor(tmp_path):
    """Above each floor the fainter anomalies are left out: the AUROC, detection and top region of the rest, against
    all the clean scans (the re-scoping figures of issue 3's notes)."""
    import json
    from detector.synth.scene import GENERATOR_VERSION
    quality = runpy.run_path(str(ROOT / "benchmarks" / "quality.py"))
    vis = {"_generator": GENERATOR_VERSION}
    rows = [{"path": f"test/images/s9_{i:06d}.tiff", "label": "0", "score": f"{0.1 + 0.01 * i:.2f}", "top_region_hit": ""}
            for i in range(40)]   # clean: 0.10-0.49
    for i, (v, score, hit) in enumerate([(0.2, 0.2, "0"), (0.3, 0.3, "0"), (0.7, 0.455, "1"), (0.8, 0.9, "0"),
                                         (1.5, 0.95, "1"), (3.0, 0.99, "1")]):
        stem = f"s9_{100 + i:06d}"
        vis[stem] = v
        rows.append({"path": f"test/images/{stem}.tiff", "label": "1", "score": str(score), "top_region_hit": hit})
    (tmp_path / "visibility.json").write_text(json.dumps(vis))
    out = quality["by_visibility"](rows, tmp_path / "visibility.json")
    assert {k: f["n"] for k, f in out["floors"].items()} == {"0.5": 4, "1": 2}
    assert out["floors"]["1"]["auroc"] == 1.0 and out["floors"]["1"]["top_region"] == 1.0
    assert out["floors"]["0.5"]["auroc"] == pytest.approx((3 * 40 + 36) / (4 * 40))   # 0.455 beats 36 clean of 40
    assert out["floors"]["0.5"]["top_region"] == 0.75 and out["floors"]["0.5"]["det_at_1pct"] == 0.75
    assert (out["visible_auroc"], out["n_visible"]) == (1.0, 2)


def test_input_checks_prints_each_variant_refused_or_scored_and_a_missing_folder_in_one_line(tmp_path):
    from detector.synth.dataset import write_dataset
    data = tmp_path / "data"
    write_dataset(data, 2, seed=3, anomaly_fraction=0.5, workers=1, height=240, progress=False)
    model = make_heuristic_bundle(tmp_path / "m.onnx")
    p = bench("input_checks.py", "--model", str(model), "--data", str(data), "--n", "2")
    assert p.returncode == 0, p.stderr
    assert re.search(r"checks [\d.]+ ms a scan", p.stdout)
    lines = {line[:22].strip(): line for line in p.stdout.splitlines()[2:]}
    assert len(lines) == 10 and " 0/2 " in lines["as is"]
    for name in ("swapped (low, high)", "(high, high)", "inverted (65535 - I)", "inverted and swapped",
                 "log-scaled display"):
        assert " 2/2 " in lines[name], lines[name]
    assert " 0/2 " not in lines["upside down"]   # a 240 px scan may have too few air rows at its top to tell
    one_line_error(bench("input_checks.py", "--model", str(model), "--data", str(tmp_path / "none")), "not found")
