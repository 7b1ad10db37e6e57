"""Station runtime: decisions, regions, fail-closed paths, tiling, threads, and no torch."""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAINING_PACKAGES, make_scan_counts, run_without, write_nonsquare_scan, write_test_scan

from detector.bundle import BundleError, read_metadata
from detector.metrics import iou
from detector.runtime import InspectionError, Inspector, own_cells_score, topk_mean_logit_score
from detector.scan import ScanError, read_scan


@pytest.fixture(scope="module")
def inspector(heuristic_model):
    return Inspector(heuristic_model, threads=1)


@pytest.fixture(scope="module")
def wide_anomalous(scan_dir):
    """200x1800 px: 100x900 model px, so it runs whole or as 256-px tiles."""
    return write_test_scan(scan_dir / "wide.tiff", width=1800, dense=True, seed=7)


def test_known_inputs_route_as_expected(inspector, normal_scan_path, anomalous_scan_path):
    ok, bad = inspector.inspect(normal_scan_path), inspector.inspect(anomalous_scan_path)
    assert ok.decision == "RELEASE" and not ok.regions and ok.score < ok.threshold
    assert bad.decision == "INSPECT" and bad.score > 0.9 and bad.threshold == pytest.approx(inspector.threshold)
    assert bad.reason.startswith(f"score {bad.score:.2f} >= threshold") and "1% false-alarm rate" in bad.reason
    assert "<" in ok.reason
    (x0, y0, x1, y1) = bad.regions[0].box  # the dense block sits at x 260..340, y 70..130 of 200x600
    assert x0 <= 260 + 16 and x1 >= 340 - 16 and y0 <= 70 + 16 and y1 >= 130 - 16
    assert x1 - x0 < 160 and y1 - y0 < 120 and bad.regions[0].score > 0.9
    assert set(bad.timings_ms) == {"read", "preprocess", "infer", "postprocess"}
    assert bad.latency_ms >= sum(bad.timings_ms.values()) * 0.99
    assert bad.heatmap.shape == (13, 38) and bad.heatmap_scale_yx == pytest.approx((16.0, 16.0 * 600 / 600))
    assert bad.model_sha256 == inspector.model_sha256 and len(bad.model_sha256) == 64
    d = bad.to_dict()
    assert json.loads(json.dumps(d))["regions"][0]["box"] == list(bad.regions[0].box) and "heatmap" not in d


@pytest.mark.parametrize("row_mm, col_mm", [(4.0, 5.0), (5.0, 4.0)])
def test_regions_of_a_scan_with_non_square_pixels_are_in_the_files_pixels(inspector, tmp_path, row_mm, col_mm):
    """A line scanner's pixels are often not square; the reader squares them at the coarser spacing, and the regions
    came out in that squared grid: a station drawing them on the file it sent put them 20 % off along the finer axis
    (4 x 5 mm: IoU 0.2 with the block; 5 x 4 mm: no overlap). They are in the file's pixels now, whatever the source
    kind, clipped to the file, and heatmap_scale_yx counts file pixels per heatmap cell."""
    box = (400, 110, 480, 160)
    path = write_nonsquare_scan(tmp_path / "line.tiff", row_mm, col_mm, box)
    v = inspector.inspect(path)
    assert v.decision == "INSPECT" and v.regions
    assert iou(v.regions[0].box, box) > 0.6, v.regions[0].box
    for other in (read_scan(path), (path.read_bytes(), "upload.tiff")):
        assert inspector.inspect(other).regions == v.regions
    assert all(0 <= r.box[0] < r.box[2] <= 600 and 0 <= r.box[1] < r.box[3] <= 200 for r in v.regions)
    cells = np.multiply(v.heatmap.shape, v.heatmap_scale_yx)
    assert abs(cells[0] - 200) < v.heatmap_scale_yx[0] and abs(cells[1] - 600) < v.heatmap_scale_yx[1]


def test_a_squared_scan_the_station_cropped_gets_regions_in_the_array_it_passed(inspector, tmp_path):
    """A station that reads a line scanner's file, then crops the Scan (the cab cut off) before inspecting it, keeps the
    file's geometry in meta: the regions were scaled to the uncropped file, off the block. Where the file, squared, no
    longer gives the array's size, the regions are in the array's own pixels."""
    import dataclasses
    path = write_nonsquare_scan(tmp_path / "line.tiff", 4.0, 5.0, (400, 110, 480, 160))
    whole = read_scan(path)                                   # 160 x 600 squared (5 mm), from 200 x 600 at 4 x 5 mm
    cut = dataclasses.replace(whole, attenuation=np.ascontiguousarray(whole.attenuation[:, :, 200:]), counts=None)
    v = inspector.inspect(cut)
    assert v.decision == "INSPECT" and v.regions
    squared_box = (200, 88, 280, 128)                         # the block in the cropped array: x - 200, y * 4 / 5
    assert iou(v.regions[0].box, squared_box) > 0.6, v.regions[0].box
    assert all(r.box[2] <= cut.width and r.box[3] <= cut.height for r in v.regions)


def test_regions_of_square_pixels_are_those_they_always_were(inspector, tmp_path):
    """Mapping regions to the file's pixels changes nothing where the pixels are square: these are the boxes and cell
    sizes the runtime gave before it, for odd sizes (no whole-number scale to the model's pitch) at 5 mm and at 4 mm
    from equal resolution tags."""
    import tifffile
    odd = write_test_scan(tmp_path / "odd.tiff", height=251, width=733, dense=True, seed=9)
    with tifffile.TiffWriter(tmp_path / "sq4.tiff") as tw:
        for page in make_scan_counts(height=251, width=733, dense=True, seed=9):
            tw.write(page, photometric="minisblack", resolution=(2.5, 2.5), resolutionunit="CENTIMETER")
    for path, boxes, cell in ((odd, [[320, 95, 401, 160]], (15.936507936507937, 16.02185792349727)),
                              (tmp_path / "sq4.tiff", [[320, 100, 401, 161]], (20.08, 20.013651877133107))):
        v = inspector.inspect(path)
        assert [r.to_dict()["box"] for r in v.regions] == boxes and v.heatmap_scale_yx == cell
        assert read_scan(path).meta == {}


def test_every_source_kind_gives_the_same_verdict(inspector, anomalous_scan_path):
    scores = [inspector.inspect(s).score for s in (anomalous_scan_path, str(anomalous_scan_path),
                                                    read_scan(anomalous_scan_path),
                                                    (anomalous_scan_path.read_bytes(), "upload.tiff"))]
    assert max(scores) - min(scores) < 1e-6


def test_channels(heuristic_model, heuristic_model_1ch, normal_scan_1ch_path, anomalous_scan_path, inspector):
    with pytest.raises(ScanError, match="1 energy channel.*needs 2"):
        inspector.inspect(normal_scan_1ch_path)
    v = inspector.inspect_safe(normal_scan_1ch_path)
    assert v.decision == "INSPECT" and "needs 2" in v.reason and v.error and np.isnan(v.score)
    one = Inspector(heuristic_model_1ch, threads=1)
    assert one.channels == 1 and one.inspect(anomalous_scan_path).decision == "INSPECT"  # keeps high energy
    assert one.inspect(normal_scan_1ch_path).decision == "RELEASE"


def test_fail_closed_never_raises(inspector, normal_scan_path, tmp_path):
    data = normal_scan_path.read_bytes()
    (tmp_path / "cut.tiff").write_bytes(data[: len(data) // 3])
    cases = {tmp_path / "cut.tiff": "corrupt or truncated", tmp_path / "nope.tiff": "file not found",
             (b"", "empty.png"): "empty file", None: "expected a path"}
    for src, why in cases.items():
        v = inspector.inspect_safe(src)
        assert v.decision == "INSPECT" and why in v.reason and v.reason.startswith("fail-closed"), (src, v.reason)
        assert json.loads(json.dumps(v.to_dict()))["score"] is None
    with pytest.raises(ScanError, match="corrupt or truncated"):
        inspector.inspect(tmp_path / "cut.tiff")


def test_deadline_overrun_inspects(inspector, anomalous_scan_path, normal_scan_path):
    v = inspector.inspect_safe(normal_scan_path, deadline_ms=0.001)
    assert v.decision == "INSPECT" and "deadline exceeded" in v.reason
    assert inspector.inspect_safe(normal_scan_path, deadline_ms=60_000).decision == "RELEASE"
    tiled = Inspector(inspector.path, threads=1, max_width=256, tile_overlap=64, warmup=False)
    x = np.zeros((2, 128, 1024), np.float32)
    with pytest.raises(InspectionError, match="deadline exceeded after 0 of"):
        tiled._infer(x, time.perf_counter() - 1, time.perf_counter())


def test_tiling_matches_whole_scan(heuristic_model, wide_anomalous, inspector):
    tiled = Inspector(heuristic_model, threads=1, max_width=256, tile_overlap=64)
    assert tiled.max_width == 256
    a, b = inspector.inspect(wide_anomalous), tiled.inspect(wide_anomalous)
    assert a.heatmap.shape == b.heatmap.shape == (13, 113)
    assert np.abs(a.heatmap - b.heatmap).max() < 1e-5 and abs(a.score - b.score) < 1e-5
    assert [r.box for r in a.regions] == [r.box for r in b.regions] and b.decision == "INSPECT"


def test_topk_rule_matches_max_for_k1():
    hm = np.array([[0.1, 0.7], [0.95, 0.2]], np.float32)
    assert topk_mean_logit_score(hm, 1) == pytest.approx(0.95, abs=1e-6)
    lg = np.log(np.array([0.95, 0.7]) / (1 - np.array([0.95, 0.7])))
    assert topk_mean_logit_score(hm, 2) == pytest.approx(1 / (1 + np.exp(-lg.mean())), abs=1e-6)


def test_thresholds(inspector, anomalous_scan_path):
    assert inspector.threshold_for_rate(0.01) == pytest.approx(inspector.threshold)
    assert inspector.threshold_for_rate(0.1) < inspector.threshold
    v = inspector.inspect(anomalous_scan_path, threshold=1.0)
    assert v.decision == "RELEASE" and v.threshold == 1.0 and "custom threshold" in v.reason
    assert v.reason.startswith(f"score {v.score:.5f} < threshold 1.00000")  # digits until they differ
    v = inspector.inspect(anomalous_scan_path, threshold=0.0)   # every clean validation truck above it
    assert "(custom threshold: 100% false alarms on validation)" in v.reason, v.reason   # not "1e+02%"
    v = inspector.inspect_safe(anomalous_scan_path, threshold=float("nan"))
    assert v.decision == "INSPECT" and "in [0, 1]" in v.reason  # NaN would otherwise release everything
    for above in (1.5, float("inf")):                               # and so would any threshold above 1
        v = inspector.inspect_safe(anomalous_scan_path, threshold=above)
        assert v.decision == "INSPECT" and f"got {above}" in v.reason
    assert json.loads(json.dumps(v.to_dict(), allow_nan=False))["threshold"] == inspector.threshold
    strict = Inspector(inspector.path, threads=1, threshold=0.0, warmup=False)
    assert strict.threshold == 0.0 and strict.inspect(anomalous_scan_path).decision == "INSPECT"


def test_concurrent_calls_agree(inspector, normal_scan_path, anomalous_scan_path):
    srcs = [normal_scan_path, anomalous_scan_path] * 6
    expected = {p: inspector.inspect(p).score for p in srcs[:2]}
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(inspector.inspect, srcs))
    assert all(v.score == pytest.approx(expected[p], abs=1e-6) for p, v in zip(srcs, got))


def test_bad_bundles_are_refused_on_load(tmp_path, heuristic_model):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        Inspector(tmp_path / "bad.onnx")
    with pytest.raises(BundleError, match="cannot read model file"):
        Inspector(tmp_path / "missing.onnx")
    import onnx

    m = onnx.load(str(heuristic_model))
    m.metadata_props[0].value = m.metadata_props[0].value.replace('"channels": 2', '"channels": 1')
    m.metadata_props[0].value = m.metadata_props[0].value.replace('"energies": ["high", "low"]', '"energies": ["x"]')
    onnx.save(m, str(tmp_path / "mismatch.onnx"))
    with pytest.raises(BundleError, match="metadata says 1 channel"):
        Inspector(tmp_path / "mismatch.onnx")


def test_a_checkpoint_or_run_folder_as_model_says_what_to_pass(tmp_path):
    """The usual mix-ups after `detector train`: the checkpoint (a zip archive) or the run folder as --model."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "best.ckpt", "w") as z:     # what torch.save writes
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(BundleError, match="a training checkpoint, not an ONNX bundle: export it first") as e:
        Inspector(tmp_path / "best.ckpt")
    assert f"detector export {tmp_path / 'best.ckpt'} --out model.onnx" in str(e.value)
    with pytest.raises(BundleError, match="a folder, not a model file"):
        Inspector(tmp_path)
    with pytest.raises(BundleError, match="a training checkpoint"):
        read_metadata(tmp_path / "best.ckpt")


def test_runtime_works_with_torch_unimportable(tmp_path, heuristic_model, anomalous_scan_path, normal_scan_path):
    out = run_without(
        "from detector.runtime import Inspector\n"
        f"ins = Inspector({str(heuristic_model)!r}, threads=1)\n"
        f"print(ins.inspect({str(anomalous_scan_path)!r}).decision, ins.inspect({str(normal_scan_path)!r}).decision)\n",
        blocked=(*TRAINING_PACKAGES, "onnx"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["INSPECT", "RELEASE"]


def test_regions_are_ranked_and_capped(tmp_path, heuristic_model):
    from conftest import I0, make_scan_counts
    from detector.scan import write_scan

    counts = make_scan_counts(width=1200, dense=True, seed=9)  # block 1 (attenuation 4.6) at x 560..640
    counts[:, 80:130, 100:180] = (I0 * np.exp(-2.6 * np.array([1.0, 1.3])))[:, None, None]  # fainter block 2
    path = write_scan(tmp_path / "two.tiff", counts, i0=(I0, I0), pitch_mm=5.0)
    v = Inspector(heuristic_model, threads=1, warmup=False).inspect(path)
    assert len(v.regions) == 2 and v.regions[0].score > v.regions[1].score > 0.5
    assert v.regions[0].box[0] > 500 and v.regions[1].box[0] < 200
    capped = Inspector(heuristic_model, threads=1, max_regions=1, warmup=False).inspect(path)
    assert [r.box for r in capped.regions] == [v.regions[0].box]


def _edited(src, dst, graph=None, meta=None):
    """Copy of a bundle with its graph and/or its detector metadata changed in place by the given functions."""
    import onnx

    m = onnx.load(str(src))
    if graph:
        graph(m.graph)
    for p in m.metadata_props:
        if p.key == "detector" and meta:
            d = json.loads(p.value)
            meta(d)
            p.value = json.dumps(d)
    onnx.save(m, str(dst))
    return dst


def test_outputs_off_the_contract_are_refused(heuristic_model, tmp_path, anomalous_scan_path, normal_scan_path):
    """Logits instead of probabilities routed on the wrong scale (-5 < 0.4: RELEASE); a stride other than
    the metadata's put every region in the wrong place; a scalar score crashed with an IndexError; NaN stays
    refused (now at load too)."""
    def logits(g):
        next(n for n in g.node if n.op_type == "Sigmoid").op_type = "Identity"

    def log_of_negative(g):
        next(n for n in g.node if n.op_type == "Sigmoid").op_type = "Log"

    def scalar_score(g):
        next(n for n in g.node if n.op_type == "ReduceMax").input[1] = "ax0123"
        g.initializer.append(onnx.helper.make_tensor("ax0123", onnx.TensorProto.INT64, [4], [0, 1, 2, 3]))

    import onnx

    cases = {"logits": (dict(graph=logits), r"not probabilities in \[0, 1\]"),
             "stride": (dict(meta=lambda d: d.update(stride=16)), r"the bundle \(stride 16\) needs"),
             "scalar": (dict(graph=scalar_score), r"score \(\)"),
             "nan": (dict(graph=log_of_negative), "non-finite output")}
    for name, (edit, message) in cases.items():
        path = _edited(heuristic_model, tmp_path / f"{name}.onnx", **edit)
        with pytest.raises(BundleError, match="warm-up run: .*" + message):
            Inspector(path, threads=1)
        lazy = Inspector(path, threads=1, warmup=False)
        with pytest.raises(InspectionError, match=message):
            lazy.inspect(anomalous_scan_path)
        for src in (normal_scan_path, anomalous_scan_path):
            v = lazy.inspect_safe(src)
            assert v.decision == "INSPECT" and v.reason.startswith("fail-closed") and np.isnan(v.score), (name, v.reason)


def test_deadline_values_that_are_not_a_time(inspector, anomalous_scan_path, monkeypatch):
    """A string deadline raised TypeError out of inspect_safe; NaN raced a timer fired at once; inf crashed the
    timer thread with an OverflowError traceback. Non-numbers now INSPECT with the reason; inf is no deadline."""
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    for bad in ("500", float("nan"), [500], True):
        v = inspector.inspect_safe(anomalous_scan_path, deadline_ms=bad)
        assert v.decision == "INSPECT" and "deadline_ms must be a number" in v.reason, (bad, v.reason)
    for endless in (float("inf"), 1e30):   # 1e30 ms is past what the timer can wait, as inf is
        v = inspector.inspect_safe(anomalous_scan_path, deadline_ms=endless)
        assert v.decision == "INSPECT" and v.reason.startswith("score") and not v.error
    time.sleep(0.05)
    assert not crashed


def test_a_scan_built_in_memory_is_checked_like_a_file(inspector, anomalous_scan_path):
    """A Scan handed over directly skipped every reader check: pitch 0 or -5 shrank the truck to one model
    pixel and a negated attenuation read as air, and the anomalous truck was RELEASED."""
    import dataclasses

    scan = read_scan(anomalous_scan_path)
    assert inspector.inspect(scan).decision == "INSPECT"
    att = scan.attenuation
    cases = {"pitch 0": (dict(pitch_mm=0.0), "pixel pitch 0 mm"), "pitch -5": (dict(pitch_mm=-5.0), "pixel pitch -5"),
             "negated": (dict(attenuation=-att), "blank scan"), "2-D": (dict(attenuation=att[0]), r"\(C, H, W\)"),
             "nan": (dict(attenuation=att * np.float32("nan")), "NaN"),
             "three energies": (dict(attenuation=np.concatenate([att, att[:1]])), "at most 2")}
    for name, (change, message) in cases.items():
        bad = dataclasses.replace(scan, **change)
        with pytest.raises(ScanError, match=message):
            inspector.inspect(bad)
        v = inspector.inspect_safe(bad)
        assert v.decision == "INSPECT" and v.error, (name, v.reason)


def test_default_threads_are_the_cpus_this_process_may_use_not_the_hosts(monkeypatch):
    """A container given 2 of a host's 64 cores (cpuset, taskset): os.cpu_count says 64."""
    import os

    from detector import runtime
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    assert runtime._session_options(None).intra_op_num_threads == 2
    assert runtime._session_options(5).intra_op_num_threads == 5


def test_default_threads_respect_a_containers_cpu_quota(cgroup, monkeypatch):
    """docker run --cpus=2 on a 64-core host: the affinity is every core, the cgroup quota 2 CPUs. 64 onnxruntime
    threads used up each 100 ms period's quota within milliseconds and waited out the rest: deadlines missed."""
    import os

    from detector import runtime
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    cgroup("0::/\n", {"cpu.max": "200000 100000\n"})
    assert runtime._session_options(None).intra_op_num_threads == 2


def test_a_truck_inspected_under_the_region_cut_off_still_gets_its_region(heuristic_model, tmp_path):
    """A site's or a tier's threshold can lie under the 0.5 region cut-off: the truck is inspected, and the officer is
    shown where (the hottest cell is at least the score, a top-k mean of the heatmap)."""
    from conftest import I0, make_scan_counts
    from detector.scan import write_scan
    c = make_scan_counts(seed=5).astype(np.float64)
    block = np.stack([I0 * np.exp(-2.0 * r) * np.ones((60, 96)) for r in (1.0, 1.3)])
    c[:, 80:140, 240:336] = np.random.default_rng(7).poisson(block)   # a moderately dense block: score ~0.3
    scan = write_scan(tmp_path / "m.tiff", c.astype(np.uint16), i0=(I0, I0), pitch_mm=5.0, energies=("high", "low"))
    low = Inspector(heuristic_model, threads=1, threshold=0.2).inspect(scan)
    assert low.decision == "INSPECT" and 0.2 <= low.score < 0.5 and low.regions
    x0, y0, x1, y1 = low.regions[0].box
    assert x0 < 336 and x1 > 240 and y0 < 140 and y1 > 80                # on the block
    assert low.regions[0].score >= low.score
    high = Inspector(heuristic_model, threads=1).inspect(scan, threshold=0.6)   # above the cut-off: as before
    assert high.decision == "RELEASE" and not high.regions


def test_a_threshold_that_is_not_a_number_is_refused(inspector, anomalous_scan_path):
    """True was read as threshold 1.0 and released every truck (False as 0.0); a text or a list gave a bare
    "ValueError: could not convert string to float" naming no threshold. deadline_ms refuses them already."""
    for bad in (True, False, "0.5", "abc", b"0.5", [0.3], {"t": 0.3}):
        v = inspector.inspect_safe(anomalous_scan_path, threshold=bad)
        assert v.decision == "INSPECT" and "threshold must be a number in [0, 1]" in v.reason, (bad, v.reason)
        assert v.threshold == inspector.threshold
        with pytest.raises(InspectionError, match=r"threshold must be a number in \[0, 1\]"):
            Inspector(inspector.path, threads=1, threshold=bad, warmup=False)
    assert inspector.inspect(anomalous_scan_path, threshold=np.float32(0.25)).threshold == pytest.approx(0.25)


def test_a_name_and_bytes_in_the_wrong_order_do_not_become_the_verdicts_source(inspector, normal_scan_path):
    """(name, data) instead of (data, name) is refused, but the verdict's source was str(data): the repr of the whole
    file (1.4 MB for a 200x600 scan) in every log line of verdict.to_dict()."""
    data = normal_scan_path.read_bytes()
    v = inspector.inspect_safe(("scan.tiff", data))
    assert v.decision == "INSPECT" and "expected a path, a Scan, (bytes, name)" in v.reason
    assert v.source is None and len(json.dumps(v.to_dict())) < 1000
    assert inspector.inspect_safe((data, "scan.tiff")).source == "scan.tiff"
    assert inspector.inspect_safe((b"", "empty.tiff")).source == "empty.tiff"


def test_a_scan_far_taller_or_shorter_than_the_training_scans_is_inspected(heuristic_model, normal_scan_path, tmp_path):
    """A pixel pitch 10x too fine shrinks a truck until its cargo cannot be seen: the bundle records its training
    scans' heights, and a scan outside them widened 4x is refused (fail-closed: INSPECT with the reason)."""
    from dataclasses import replace

    from detector.bundle import BundleError, replace_metadata_bytes
    meta = read_metadata(heuristic_model)
    sited = tmp_path / "heights.onnx"
    sited.write_bytes(replace_metadata_bytes(heuristic_model.read_bytes(), {**meta, "scan_height_mm": [800, 1200]}))
    insp = Inspector(sited, threads=1)
    from detector.bundle_info import describe
    said = "\n".join(describe(sited))
    assert "training scans 0.80-1.20 m high, scans 0.20-4.80 m accepted" in said
    assert "scan heights not recorded" in "\n".join(describe(heuristic_model))
    scan = read_scan(normal_scan_path)                          # 200 px at 5 mm: 1 m, inside 0.2-4.8 m
    assert insp.inspect(scan).decision == "RELEASE"
    for pitch in (0.5, 50.0):                                   # 0.1 m and 10 m high
        wrong = replace(scan, pitch_mm=pitch)
        with pytest.raises(InspectionError, match=f"200 px at {pitch:g} mm per pixel .* outside the 0.20-4.80 m "):
            insp.inspect(wrong)
        v = insp.inspect_safe(wrong)
        assert v.decision == "INSPECT" and "is the scan's pixel pitch right" in v.reason
    old = Inspector(heuristic_model, threads=1).inspect(replace(scan, pitch_mm=0.5))   # no record: nothing checked
    assert old.decision == "RELEASE" and np.isfinite(old.score)
    for bad in ([800], [0, 1200], [1200, 800], ["a", 1]):
        with pytest.raises(BundleError, match="scan_height_mm"):
            replace_metadata_bytes(heuristic_model.read_bytes(), {**meta, "scan_height_mm": bad})


@pytest.mark.parametrize("option, value, message", [
    ("threads", -2, "threads must be a whole number >= 1"), ("threads", 1.5, "threads must be"),
    ("max_regions", -1, "max_regions must be a whole number >= 0"),
    ("region_threshold", float("nan"), "region_threshold must be a number in"),
    ("region_threshold", 1.5, "region_threshold must be a number in")])
def test_inspector_options_that_would_misroute_are_refused(heuristic_model, option, value, message):
    # max_regions=-1 dropped the best region (a slice), a NaN cut-off gave none, threads=-2 went to onnxruntime
    with pytest.raises(InspectionError, match=message):
        Inspector(heuristic_model, **{option: value})


def test_a_model_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    import os
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)                  # reading it waited forever for a writer
    with pytest.raises(BundleError, match="not a regular file"):
        Inspector(fifo)


def _air_lights_up(g):
    """The heuristic graph with its slope negated: cells of air (the padding) fire, dense cells do not."""
    import onnx

    a = next(t for t in g.initializer if t.name == "a")
    a.CopyFrom(onnx.helper.make_tensor("a", onnx.TensorProto.FLOAT, [], [-onnx.numpy_helper.to_array(a).item()]))


@pytest.mark.parametrize("max_width", [2048, 128])   # whole, and in width tiles
def test_the_score_pools_the_scans_own_cells_not_the_padding(heuristic_model, tmp_path, max_width):
    """Training's validation scores a scan over its own heatmap cells (the padding masked), and the thresholds are
    set on those scores; the station took the graph's score, which also pooled the cells wholly over the padding.
    A model firing at a scan's cut edge then scored the truck higher at the station than in validation."""
    from conftest import I0

    from detector.scan import scan_from_counts

    model = _edited(heuristic_model, tmp_path / "air.onnx", graph=_air_lights_up)
    dense = np.full((2, 208, 624), 3.0) * np.array([1.0, 1.3])[:, None, None]   # the low energy attenuates more
    counts = np.random.default_rng(0).poisson(I0 * np.exp(-dense)).astype(np.uint16)
    # dense to the edges: 104 x 312 model px, whole cells (no cell straddles the padding)
    v = Inspector(model, threads=1, max_width=max_width, warmup=False).inspect(scan_from_counts(counts, i0=(I0, I0)))
    assert v.heatmap.shape == (13, 39)                              # the graph saw 128 x 320: 16 x 40 cells
    assert v.score == pytest.approx(float(v.heatmap.max()), abs=1e-6) and v.score < 0.2
    assert v.decision == "RELEASE" and v.regions == []


def test_the_graphs_score_stands_unless_the_padding_enters_the_top_k():
    """An INT8 heatmap is quantized to 1/255 steps: a cell that reads 255/255 (logit >= 6.2 in the graph) comes back
    as logit 13.8, so a score recomputed from it is far off the graph's (top 4 of 1.0, 0.3, 0.3, 0.3: 0.944 where the
    graph said 0.714). The graph's score is kept unless a padding cell is among the top k."""
    hm = np.full((6, 8), 0.3, np.float32)
    hm[1, 1] = 1.0
    own = hm[:5, :7]                                       # the last row and column lie over the padding
    assert topk_mean_logit_score(own, 4) == pytest.approx(0.944, abs=1e-3)
    assert own_cells_score(hm, own, 0.714, 4) == 0.714
    hm[5, 3] = 0.9                                         # the model fires at the cut edge: the score is the scan's
    assert own_cells_score(hm, own, 0.95, 4) == pytest.approx(topk_mean_logit_score(own, 4))
    assert own_cells_score(own, own, 0.714, 4) == 0.714   # no padding cells: the graph's


def _as_int8(g):
    """The heuristic graph as an INT8 export makes it: the heatmap and the score quantized to 1/255 steps after their
    sigmoids (uint8 QDQ), the score sigmoid(mean of the top 4 logits)."""
    import onnx
    from onnx import TensorProto, helper

    def quantized(x, out):
        return [helper.make_node("QuantizeLinear", [x, "q_scale", "q_zero"], [out + "_q"]),
                helper.make_node("DequantizeLinear", [out + "_q", "q_scale", "q_zero"], [out])]

    nodes = [n for n in g.node if n.op_type != "ReduceMax"]
    next(n for n in nodes if n.op_type == "Sigmoid").output[0] = "probability"
    nodes += quantized("probability", "heatmap") + [
        helper.make_node("Flatten", ["logit"], ["flat"], axis=1),
        helper.make_node("TopK", ["flat", "k"], ["top", "top_index"], axis=1),
        helper.make_node("ReduceMean", ["top", "ax1"], ["top_mean"], keepdims=0),
        helper.make_node("Sigmoid", ["top_mean"], ["score_raw"])] + quantized("score_raw", "score")
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend([helper.make_tensor("q_scale", TensorProto.FLOAT, [], [1 / 255]),
                          helper.make_tensor("q_zero", TensorProto.UINT8, [], [0]),
                          helper.make_tensor("k", TensorProto.INT64, [1], [4])])
    onnx.checker.check_model(onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize("max_width", [2048, 256])   # whole, and in width tiles
def test_an_int8_graph_scores_a_scan_alike_whole_and_in_tiles(heuristic_model, tmp_path, max_width):
    """A scan wider than max_width runs in tiles and the runtime pools their heatmaps into its score. It pooled the
    probabilities, which an INT8 graph quantizes to 1/255 steps: a cell at logit 8 (p 0.9997) read 255/255, logit
    13.8, and with k = 4 a truck whose logits give 0.881 scored 0.970 once tiled (INSPECT at a 0.95 threshold),
    0.882 whole (the graph's score, quantized too). Both now pool the graph's logits."""
    from conftest import DENSE_ATT, I0, SLOPE

    from detector.scan import scan_from_counts

    model = _edited(heuristic_model, tmp_path / "q.onnx", graph=_as_int8,
                    meta=lambda d: d.update(score={"method": "topk_mean_logit", "k": 4}))
    att = np.full((208, 1792), 0.6)
    att[80:96, 800:816] = DENSE_ATT + 8 / SLOPE        # one cell at logit 8
    att[80:96, 816:864] = DENSE_ATT                    # three at logit 0
    pair = np.stack([att, att * 1.3]) / 1.15           # high and low (it attenuates more), their mean att
    counts = np.round(I0 * np.exp(-pair)).astype(np.uint16)
    inspector = Inspector(model, threads=1, max_width=max_width, tile_overlap=64, threshold=0.95, warmup=False)
    assert inspector.logits_name == "logit"                                  # the Sigmoid's input, past the QDQ
    v = inspector.inspect(scan_from_counts(counts, i0=(I0, I0)))
    assert v.heatmap.shape == (13, 112) and v.heatmap.max() == 1.0           # the hot cell is quantized to 255/255
    assert v.score == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-4) and v.decision == "RELEASE"


def _needs_multiples_of_32(g):
    """The heuristic graph with a stride-32 branch added back onto its stride-8 map, as a network's decoder does:
    it runs only on inputs whose height and width are multiples of 32."""
    from onnx import TensorProto, helper

    i = next(i for i, n in enumerate(g.node) if n.op_type == "Mul")
    g.node[i].input[0] = "centred_32"
    g.node.insert(i, helper.make_node("Add", ["centred", "deep_zero"], ["centred_32"]))
    g.node.insert(i, helper.make_node("Mul", ["deep_up", "zero"], ["deep_zero"]))
    g.node.insert(i, helper.make_node("Resize", ["deep", "", "up4"], ["deep_up"], mode="nearest"))
    g.node.insert(i, helper.make_node("AveragePool", ["mean"], ["deep"], kernel_shape=[32, 32], strides=[32, 32]))
    g.initializer.extend([helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                          helper.make_tensor("up4", TensorProto.FLOAT, [4], [1, 1, 4, 4])])


@pytest.mark.parametrize("warmup", [True, False])
def test_a_pad_multiple_the_graph_cannot_take_is_refused_at_load(heuristic_model, tmp_path, anomalous_scan_path,
                                                                 warmup):
    """A hand-edited pad_multiple (8 where the network needs 32) loaded and passed the warm-up, whose size is a
    multiple of 32, then failed closed on most trucks with an onnxruntime message about Add or Conv shapes."""
    good = _edited(heuristic_model, tmp_path / "m32.onnx", graph=_needs_multiples_of_32)
    assert Inspector(good, threads=1, warmup=warmup).inspect(anomalous_scan_path).decision == "INSPECT"
    edited = _edited(good, tmp_path / "pad8.onnx", meta=lambda d: d["preprocessing"].update(pad_multiple=8))
    with pytest.raises(BundleError, match=r"pad8\.onnx: preprocessing pad_multiple 8 does not suit this graph"):
        Inspector(edited, threads=1, warmup=warmup)


def test_untagged_scans_are_read_at_the_bundles_pitch_unless_the_station_says_otherwise(heuristic_model_1ch, tmp_path):
    """A 16-bit PNG carries no pitch: the station read it at 5 mm, whatever the site's scanner. An Inspector now reads
    such a file (path, bytes, or a counts array) at the bundle's default_pitch_mm (its training run's data.pitch_mm),
    or at its own default_pitch_mm where given; a tagged file keeps its pitch. 200 x 600 px at 4 mm is 80 x 240 px at
    the 10 mm model pitch (heatmap 10 x 30 cells at stride 8), at 5 mm 100 x 300 (13 x 38)."""
    import cv2

    from detector.bundle import replace_metadata_bytes
    from detector.scan import write_scan
    counts = make_scan_counts(channels=1, dense=True, seed=7)
    cv2.imwrite(str(tmp_path / "bare.png"), counts[0])
    tagged = write_scan(tmp_path / "tagged.tiff", counts, i0=(53000.0,), pitch_mm=5.0)
    meta = read_metadata(heuristic_model_1ch)
    site = tmp_path / "site.onnx"
    site.write_bytes(replace_metadata_bytes(heuristic_model_1ch.read_bytes(), {**meta, "default_pitch_mm": 4.0}))
    at4, plain = Inspector(site, threads=1), Inspector(heuristic_model_1ch, threads=1)
    over = Inspector(site, threads=1, default_pitch_mm=5)
    assert (at4.default_pitch_mm, plain.default_pitch_mm, over.default_pitch_mm) == (4.0, 5.0, 5.0)
    png = tmp_path / "bare.png"
    for src in (png, (png.read_bytes(), "bare.png"), counts[0]):
        assert at4.inspect(src).heatmap.shape == (10, 30)
        assert plain.inspect(src).heatmap.shape == over.inspect(src).heatmap.shape == (13, 38)
    assert at4.inspect(tagged).heatmap.shape == plain.inspect(tagged).heatmap.shape == (13, 38)


@pytest.mark.parametrize("bad", [0, -4.0, float("nan"), float("inf"), 500, "4", True])
def test_a_default_pitch_that_is_no_pitch_is_refused_at_start_up(heuristic_model, bad):
    with pytest.raises(InspectionError, match=r"default pixel pitch .* must be a number in 0\.01-100 mm") as e:
        Inspector(heuristic_model, threads=1, warmup=False, default_pitch_mm=bad)
    assert "\n" not in str(e.value)



FORK_CHILD = """
import json, os, signal, sys, time
from detector.runtime import Inspector
inspector = Inspector(MODEL, threads=2)
pid = os.fork()
if pid == 0:
    out = {"score": inspector.inspect(SCAN).score, "threads": len(os.listdir("/proc/self/task"))}
    inspector = Inspector(MODEL, threads=2, warmup=False)   # a reload drops the inherited one
    print(json.dumps(out), flush=True)
    os._exit(0)   # as multiprocessing's children end (a normal exit hangs in onnxruntime's own teardown: README)
parent = inspector.inspect(SCAN).score
end = time.monotonic() + 20
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    if time.monotonic() > end:
        os.kill(pid, signal.SIGKILL)
        print(json.dumps({"child": "hung"}))
        sys.exit(0)
    time.sleep(0.05)
print(json.dumps({"parent": parent}))
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"), reason="POSIX fork, Linux /proc")
def test_an_inspector_made_before_a_fork_runs_in_the_child_on_its_own_session(heuristic_model, anomalous_scan_path):
    """A preloading app server (gunicorn --preload) or multiprocessing's fork hands workers the Inspector their
    parent made: its onnxruntime session lost its thread pool's threads in the fork, so the child's inference ran on
    one thread, and dropping the Inspector there (a reload) waited on the parent's threads forever."""
    code = FORK_CHILD.replace("MODEL", repr(str(heuristic_model))).replace("SCAN", repr(str(anomalous_scan_path)))
    run = run_without(code, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "hung" not in run.stdout, "the forked child hung dropping the Inspector it inherited"
    child, parent = (json.loads(line) for line in run.stdout.splitlines())
    assert child["score"] == pytest.approx(parent["parent"], abs=1e-6)
    assert child["threads"] >= 2   # its own session's pool (threads=2), not the calling thread alone


def test_an_inspector_pickles_for_spawned_workers_and_refuses_a_bundle_changed_since(tmp_path, heuristic_model,
                                                                                       anomalous_scan_path):
    """multiprocessing's spawn (and any pool that pickles its task) hands the Inspector over by pickling: that
    raised onnxruntime's "cannot pickle InferenceSession". The copy opens the same file; one whose bytes have
    changed since is refused, not run under the thresholds the copy carries."""
    import pickle
    import shutil

    from conftest import make_heuristic_bundle
    model = Path(shutil.copy(heuristic_model, tmp_path / "model.onnx"))
    inspector = Inspector(model, threads=1, max_width=512, default_pitch_mm=4.0, warmup=False)
    want = inspector.inspect(anomalous_scan_path)
    copy = pickle.loads(pickle.dumps(inspector))
    got = copy.inspect(anomalous_scan_path)
    assert (got.score, got.decision, got.threshold) == (want.score, want.decision, want.threshold)
    assert (copy.max_width, copy.default_pitch_mm, copy.threads) == (512, 4.0, 1)
    stale = pickle.loads(pickle.dumps(inspector))
    make_heuristic_bundle(model, normal_scores=np.linspace(0.01, 0.9, 300))   # a new bundle dropped in its place
    with pytest.raises(InspectionError, match="model file changed since this Inspector loaded it"):
        stale.inspect(anomalous_scan_path)
    assert stale.inspect_safe(anomalous_scan_path).decision == "INSPECT"


def test_close_releases_the_model_and_a_closed_inspector_fails_closed(heuristic_model, anomalous_scan_path):
    """A station reloading its model each shift releases the old one's session (memory, threads) at close() or the
    end of a with block, whatever still holds the Inspector (a callback bound to inspect_safe); a call after that
    raises, or answers INSPECT, naming the reason, rather than reopening a model the station let go of."""
    with Inspector(heuristic_model, threads=1, warmup=False) as inspector:
        assert inspector.inspect(anomalous_scan_path).decision == "INSPECT"
    assert inspector.session is None
    with pytest.raises(InspectionError, match="closed"):
        inspector.inspect(anomalous_scan_path)
    late = inspector.inspect_safe(anomalous_scan_path)
    assert late.decision == "INSPECT" and "this Inspector was closed" in late.reason
    inspector.close()   # twice is fine


def test_embedded_scan_warnings_are_remembered_within_a_bound(heuristic_model_1ch, monkeypatch):
    """A station embedding the Inspector under Python's default warning action: each warned scan's text names its
    file, and warnings.warn remembered every one for good (one registry entry per truck, 8.9 MB per 20,000). Now at
    most SCAN_WARNINGS_KEPT; a text still remembered is shown once, as before."""
    import sys
    import warnings

    import cv2

    import detector.scan as scan_mod
    monkeypatch.setattr(scan_mod, "SCAN_WARNINGS_KEPT", 20, raising=False)
    rgb = np.random.default_rng(0).integers(0, 255, (64, 96, 3)).astype(np.uint8)   # a colour rendering: warned
    png = cv2.imencode(".png", rgb)[1].tobytes()
    station = Inspector(heuristic_model_1ch, threads=1)

    def registries() -> int:   # what warnings.warn remembers in the modules' own registries
        return sum(len(vars(m).get("__warningregistry__", {})) for name, m in list(sys.modules.items())
                   if name.startswith("detector"))

    before = registries()   # earlier tests' warnings of other kinds may be remembered there
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default", scan_mod.ScanWarning)
        for i in range(200):
            assert station.inspect_safe((png, f"lane1/truck_{i}.png")).error is None
        station.inspect_safe((png, "lane1/truck_199.png"))   # read again: not shown again
    assert [w.message.path for w in shown] == [f"lane1/truck_{i}.png" for i in range(200)]
    assert registries() - before <= 2
    assert len([k for k in getattr(scan_mod, "_SHOWN", {}) if k != "version"]) <= 20
