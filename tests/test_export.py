"""ONNX export: parity with torch on several sizes, bundle metadata, INT8 drift and refusal, the verb."""
import shutil
import sys
import types
from argparse import Namespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from conftest import NORMAL_SCORES, write_test_scan  # noqa: E402

from detector.bundle import read_metadata  # noqa: E402
from detector.calibration import threshold_table  # noqa: E402
from detector.export import ExportError, export_bundle, make_int8_bundle, parity_check  # noqa: E402
from detector.model import ModelConfig, build_model  # noqa: E402
from detector.preprocess import Preprocessing, prepare  # noqa: E402
from detector.runtime import Inspector  # noqa: E402
from detector.scan import read_scan, write_scan  # noqa: E402

CFG = ModelConfig(backbone="resnet18", in_channels=2, decoder_channels=16, topk=4, stage_blocks=1,
                  context_dilations=(2, 4))  # the default architecture, narrower


def _info(cfg=CFG):
    return dict(channels=cfg.in_channels, energies=["high", "low"], preprocessing=Preprocessing().to_dict(),
                stride=cfg.stride, score={"method": "topk_mean_logit", "k": cfg.topk},
                thresholds=threshold_table(NORMAL_SCORES), normal_scores=NORMAL_SCORES,
                validation={"auroc": 0.5}, train_config={"model": vars(cfg)}, data_fingerprint="sha256:test")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CFG).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    lines = []
    summary = export_bundle(model, _info(), out, log=lines.append)
    return out, summary, lines


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    for i in range(3):
        write_test_scan(d / "normal" / f"n{i}.tiff", seed=20 + i)
        write_test_scan(d / "anomalous" / f"a{i}.tiff", dense=True, seed=30 + i)
    return d


def test_export_matches_torch_on_three_sizes(exported):
    out, summary, lines = exported
    p = summary["parity"]
    assert len(p["sizes"]) == 3 and "155x407->(96, 224)" in p["sizes"]  # odd scan, padded
    assert p["max_abs_heatmap"] < 1e-4 and p["max_abs_score"] < 1e-4
    assert sum("parity" in line for line in lines) == 3
    proto = onnx.load(str(out))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert proto.graph.input[0].name == "scan" and [o.name for o in proto.graph.output] == ["heatmap", "score"]
    assert dims[1].dim_value == 2 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))


def test_bundle_metadata_and_station_score_match_torch(exported, model, anomalous_scan_path):
    out, _, _ = exported
    meta = read_metadata(out)
    assert meta["channels"] == 2 and meta["score"] == {"method": "topk_mean_logit", "k": 4}
    assert meta["export"]["opset"] == 20 and meta["data_fingerprint"] == "sha256:test"
    v = Inspector(out, threads=1).inspect(anomalous_scan_path)
    x = prepare(read_scan(anomalous_scan_path), Preprocessing(), 2).x[None]
    with torch.no_grad():
        heat, score = model(torch.from_numpy(x))
    assert v.score == pytest.approx(float(score[0]), abs=1e-5)
    assert np.abs(v.heatmap - heat[0, 0, : v.heatmap.shape[0], : v.heatmap.shape[1]].numpy()).max() < 1e-4


def test_the_training_scans_heights_travel_in_the_bundle_when_the_checkpoint_has_them():
    from detector.export import bundle_metadata
    assert bundle_metadata({**_info(), "scan_height_mm": [350.0, 450.0]})["scan_height_mm"] == [350.0, 450.0]
    assert "scan_height_mm" not in bundle_metadata(_info())      # an older checkpoint: the station checks nothing


def test_parity_failure_is_loud(exported):
    out, _, _ = exported
    torch.manual_seed(1)
    other = build_model(CFG).eval()
    with torch.no_grad():
        other.head[-1].bias += 3.0  # a different network: must not pass as this export
    with pytest.raises(ExportError, match="differs from torch.*tolerance"):
        parity_check(other, out, 2, Preprocessing(), log=lambda s: None)


def test_parity_check_does_not_drop_a_nan(exported, model):
    """max(0.0, nan) is 0.0: a NaN difference used to pass as parity 0.0 and the export went ahead."""
    out, _, _ = exported

    def nan_cell(x):
        heatmap, score = model(x)
        heatmap = heatmap.clone()
        heatmap[..., 0, 0] = float("nan")
        return heatmap, score

    with pytest.raises(ExportError, match="heatmap nan"):
        parity_check(nan_cell, out, 2, Preprocessing(), log=lambda s: None)


def test_int8_writes_drift_and_refuses_past_the_limit(exported, calibration_dir, tmp_path, monkeypatch):
    out, _, _ = exported
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # quantization must not drop temp files into the working directory
    meta = read_metadata(out)
    q = tmp_path / "q.onnx"
    said: list[str] = []
    drift = make_int8_bundle(out, q, calibration_dir, meta, max_drop=100.0, log=said.append)
    # 3 + 3 scans set the ranges and judge the drift: accepted, with a warning that says so
    assert any("only 3 normal and 3 anomalous calibration scans" in line for line in said), said
    saved = read_metadata(q)["int8"]
    assert saved == drift and saved["scans"] == 6 and saved["normal"] == 3
    for k in ("auroc_fp32", "auroc_int8", "detection_fp32", "detection_int8", "detection_drop_points",
              "detection_at_threshold_fp32", "detection_at_threshold_int8", "threshold_drop_points"):
        assert isinstance(saved[k], float)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    v = Inspector(q, threads=1).inspect(calibration_dir / "anomalous" / "a0.tiff")
    assert 0.0 <= v.score <= 1.0
    with pytest.raises(ExportError, match=r"INT8 refused: AUROC .* detection at 1% false alarms"):
        make_int8_bundle(out, tmp_path / "r.onnx", calibration_dir, meta, max_drop=-101.0, log=lambda s: None)
    assert not (tmp_path / "r.onnx").exists() and list(cwd.iterdir()) == []
    unlabelled = tmp_path / "unl"
    write_test_scan(unlabelled / "x.tiff")
    with pytest.raises(ExportError, match="labelled normal and anomalous"):
        make_int8_bundle(out, tmp_path / "u.onnx", unlabelled, meta, log=lambda s: None)
    broken = tmp_path / "broken"   # every scan left out: the refusal says so, not "0 scans without both classes"
    shutil.copytree(calibration_dir, broken)
    for f in broken.rglob("*.tiff"):
        f.write_bytes(b"II*\x00 cut short")
    with pytest.raises(ExportError, match=r"found 0 usable of 6 \(the others left out above\) scan\(s\)"):
        make_int8_bundle(out, tmp_path / "b.onnx", broken, meta, log=lambda s: None)


def test_int8_refuses_a_score_shift_at_the_shipped_threshold(heuristic_model, calibration_dir, tmp_path,
                                                             monkeypatch):
    """The INT8 bundle keeps the fp32 thresholds. A quantization that scales every score by 0.3 keeps the
    ranking (detection at 1 % false alarms, each model at its own threshold: +0.0 points) and was accepted,
    yet at the shipped threshold 0.40 it released every anomalous calibration scan."""
    import detector.export as export
    from onnx import TensorProto, helper

    def shifted(fp32, out, paths, pre, channels, default_pitch_mm=None):
        m = onnx.load(str(fp32))
        sig = next(n for n in m.graph.node if n.op_type == "Sigmoid")
        sig.output[0] = "sig"
        m.graph.initializer.append(helper.make_tensor("k", TensorProto.FLOAT, [], [0.3]))
        m.graph.node.insert(list(m.graph.node).index(sig) + 1, helper.make_node("Mul", ["sig", "k"], ["heatmap"]))
        onnx.save(m, str(out))
        return out

    monkeypatch.setattr(export, "quantize_int8", shifted)
    with pytest.raises(ExportError, match=r"\+0.0 points\), at the shipped threshold 0.396 100.0% -> 0.0%"):
        make_int8_bundle(heuristic_model, tmp_path / "q.onnx", calibration_dir, read_metadata(heuristic_model),
                         log=lambda s: None)
    assert not (tmp_path / "q.onnx").exists()


def test_int8_calibration_leaves_out_scans_it_cannot_use_and_says_so(exported, calibration_dir, tmp_path):
    from detector.export import calibration_items, usable_items
    d = tmp_path / "cal"
    shutil.copytree(calibration_dir, d)
    (d / "normal" / "cut.tiff").write_bytes((d / "normal" / "n0.tiff").read_bytes()[:500])
    single = np.full((64, 256), 40000, np.uint16)
    single[20:, 50:150] = 9000
    write_scan(d / "anomalous" / "single.png", single)   # 1 energy, model has 2
    meta, lines = read_metadata(exported[0]), []
    items = calibration_items(d)
    kept = usable_items(items, Preprocessing.from_dict(meta["preprocessing"]), meta["channels"], lines.append)
    assert len(items) == 8 and sorted(p.name for p, *_ in kept) == sorted(p.name for p, *_ in items
                                                                        if p.name not in ("cut.tiff", "single.png"))
    assert len(lines) == 1 and "left out 2 of 8 calibration scans" in lines[0]


def test_export_verb(model, exported, tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("detector.checkpoint")
    fake.load_checkpoint = lambda path: (model, _info())
    fake.unfinished_run = lambda path: None
    fake.CheckpointError = type("CheckpointError", (ValueError,), {})
    monkeypatch.setitem(sys.modules, "detector.checkpoint", fake)
    from detector import export

    # reuse the module's dynamo export (slow); parity, metadata and the summary still run for real
    monkeypatch.setattr(export, "export_onnx", lambda m, path, c, opset: shutil.copy(exported[0], path))

    args = Namespace(checkpoint="run/best.ckpt", out=str(tmp_path / "m.onnx"), int8=True, calibration=None,
                     opset=20, max_drop=1.0)
    assert export.main(args) == 1 and "--int8 needs --calibration" in capsys.readouterr().err
    args.int8 = False
    assert export.main(args) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert text[-2].startswith(f"exported {args.out} (fp32, 2 channel(s)")
    assert text[-1] == f"next: detector score SCANS --model {args.out} --out results.csv"
    assert read_metadata(args.out)["channels"] == 2
    # INT8: the summary gave the fp32 graph's parity (1e-7) as if it were the INT8 bundle's; its figure is the drift
    drift = {"scans": 6, "score_max_abs_diff": 0.046}
    monkeypatch.setattr(export, "make_int8_bundle", lambda fp32, out, *a, **k: shutil.copy(fp32, out) and drift)
    args.int8, args.calibration = True, "cal/"
    assert export.main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-2]
    assert line.startswith(f"exported {args.out} (int8 (QDQ), 2 channel(s)")
    assert "score |diff| from fp32 max 0.046 on 6 calibration scans; fp32 parity max |diff| heatmap" in line


def test_export_verb_names_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    import torch

    from detector import export
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x04junk")
    torch.save({"epoch": 3}, tmp_path / "other.ckpt")
    (tmp_path / "run").mkdir()
    (tmp_path / "bundle.onnx").write_bytes(b"\x08\x07onnx")
    for name, why in (("junk.ckpt", "not a readable torch checkpoint"), ("missing.ckpt", "no such checkpoint file"),
                      ("other.ckpt", "not a detector training checkpoint"),
                      ("run", f"a run folder, not a checkpoint file: name one in it, {tmp_path / 'run' / 'best.ckpt'}"),
                      ("bundle.onnx", "an exported ONNX bundle, not a training checkpoint")):
        args = Namespace(checkpoint=str(tmp_path / name), out=str(tmp_path / "m.onnx"), int8=False, calibration=None,
                         opset=20, max_drop=1.0)
        assert export.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"detector export: {tmp_path / name}: {why}") and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_cnn_tiling_matches_whole_scan(exported, scan_dir):
    """A real CNN sees no context across tile edges: trusted tile centres keep the stitched map close."""
    out, _, _ = exported
    wide = write_test_scan(scan_dir / "wide_cnn.tiff", width=2400, dense=True, seed=11)  # 1200 model px
    whole = Inspector(out, threads=1, warmup=False).inspect(wide)
    tiled_ins = Inspector(out, threads=1, max_width=512, tile_overlap=256, warmup=False)
    tiled = tiled_ins.inspect(wide)
    assert tiled_ins.max_width == 512 and whole.heatmap.shape == tiled.heatmap.shape == (13, 150)
    assert np.abs(whole.heatmap - tiled.heatmap).max() < 1e-3 and abs(whole.score - tiled.score) < 1e-3


def test_deadline_terminates_a_running_inference(exported):
    """The deadline stops onnxruntime mid-run (RunOptions.terminate), so a late verdict cannot pile up."""
    import time

    from detector.runtime import InspectionError

    ins = Inspector(exported[0], threads=1, warmup=False)
    x = np.random.default_rng(0).uniform(0, 1, (2, 320, 1024)).astype(np.float32)
    t = time.perf_counter()
    ins._run(x, None)
    full = time.perf_counter() - t
    t = time.perf_counter()
    with pytest.raises(InspectionError, match="deadline exceeded during inference"):
        ins._infer(x, t + 0.1 * full, t)
    assert time.perf_counter() - t < 0.6 * full


def test_material_input_exports_with_parity_and_stays_fp32_in_int8(calibration_dir, tmp_path):
    cfg = ModelConfig(**{**vars(CFG), "material_gain": 10.0})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = tmp_path / "m.onnx"
    p = export_bundle(model, _info(cfg), out, log=lambda s: None)["parity"]
    assert p["max_abs_heatmap"] < 1e-4 and p["max_abs_score"] < 1e-4
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[1].dim_value == 2   # the station still sends (high, low)
    q = tmp_path / "q.onnx"
    make_int8_bundle(out, q, calibration_dir, read_metadata(out), max_drop=100.0, log=lambda s: None)
    qg = onnx.load(str(q)).graph
    # the mix amplifies a ~5 % difference of the two energies tenfold: quantizing its inputs to 8 bits
    # would erase it, so no QuantizeLinear may sit between the input and the mix's Sub
    sub = next(n for n in qg.node if n.op_type == "Sub")
    producers = {o: n for n in qg.node for o in n.output}
    todo, seen = list(sub.input), set()
    while todo:
        t = todo.pop()
        n = producers.get(t)
        if n is None or t in seen:
            continue
        seen.add(t)
        assert n.op_type != "QuantizeLinear" and n.op_type != "DequantizeLinear", n.name
        todo.extend(n.input)


def test_export_verb_refuses_an_out_folder_before_exporting(tmp_path, capsys):
    """--out runs/r1 (the run folder): the export ran, then ended in an IsADirectoryError traceback."""
    from detector import export
    (tmp_path / "run").mkdir()
    args = Namespace(checkpoint=str(tmp_path / "missing.ckpt"), out=str(tmp_path / "run"), int8=False,
                     calibration=None, opset=20, max_drop=1.0)
    assert export.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"detector export: --out {tmp_path / 'run'} is a folder: give the bundle file, e.g. "
                   f"{tmp_path / 'run' / 'model.onnx'}\n")


def test_int8_calibration_reads_each_untagged_file_at_its_manifest_rows_pitch(tmp_path, heuristic_model_1ch,
                                                                            monkeypatch):
    """A site's dataset mixing 4 mm and 5 mm scanners' untagged PNGs gives each row its pitch (pitch_mm): the INT8
    calibration and its drift check read every such file at the bundle's one pitch, so the 4 mm trucks were
    calibrated on and judged 25 % too large. Each file is now read at its row's pitch, an empty cell at the
    bundle's."""
    import cv2

    from detector.export import _Reader, calibration_items, int8_drift, usable_items
    counts = np.full((120, 320), 50000, np.uint16)
    counts[30:, 10:-10] = 20000
    for name in ("four.png", "plain.png"):
        cv2.imwrite(str(tmp_path / name), counts)
    (tmp_path / "manifest.csv").write_text("path,label,pitch_mm\nfour.png,1,4\nplain.png,0,\n")
    pre = Preprocessing()
    items = usable_items(calibration_items(tmp_path), pre, 1, lambda s: None, default_pitch_mm=5.0)
    assert [(p.name, label, pitch) for p, label, pitch in items] == [("four.png", 1, 4.0), ("plain.png", 0, 5.0)]
    reader = _Reader([(p, pitch) for p, _, pitch in items], pre, 1)
    assert [reader.get_next()["scan"].shape for _ in items] == [(1, 1, 64, 128), (1, 1, 64, 160)]   # 48x128, 60x160
    seen = []
    inspect = Inspector.inspect
    monkeypatch.setattr(Inspector, "inspect", lambda self, scan, threshold=None: seen.append(
        (scan.source.rsplit("/", 1)[-1], scan.pitch_mm)) or inspect(self, scan, threshold))
    assert int8_drift(heuristic_model_1ch, heuristic_model_1ch, items)["scans"] == 2
    assert seen == [("four.png", 4.0)] * 2 + [("plain.png", 5.0)] * 2


def test_parity_and_int8_calibration_sessions_keep_to_a_cpu_quota(exported, model, calibration_dir, tmp_path,
                                                                  monkeypatch, cgroup):
    """`detector export` in a container with --cpus=1: onnxruntime sizes a session whose threads nobody sets from the
    host's cores, not the quota, so the parity check and the INT8 calibration (quantize_static's own session) ran a
    thread pool the quota throttled. Both now run on usable_cpus threads; an ORT_INTRA_OP_NUM_THREADS given is kept."""
    import os

    import onnxruntime as ort

    from detector.export import quantize_int8
    monkeypatch.delenv("ORT_INTRA_OP_NUM_THREADS", raising=False)
    cgroup("0::/\n", {"cpu.max": "100000 100000\n"})
    made, real = [], ort.InferenceSession

    def recording(path, sess_options=None, *a, **kw):
        made.append((getattr(sess_options, "intra_op_num_threads", 0), os.environ.get("ORT_INTRA_OP_NUM_THREADS")))
        return real(path, sess_options, *a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    out, _, _ = exported
    parity_check(model, out, 2, Preprocessing(), log=lambda s: None)
    assert made and all(n == 1 for n, _ in made), made
    made.clear()
    scans = [(p, None) for p in sorted(calibration_dir.rglob("*.tiff"))]
    quantize_int8(out, tmp_path / "q.onnx", scans, Preprocessing(), 2)
    assert made and all(n == 1 or env == "1" for n, env in made), made
    assert "ORT_INTRA_OP_NUM_THREADS" not in os.environ
    made.clear()
    monkeypatch.setenv("ORT_INTRA_OP_NUM_THREADS", "3")
    quantize_int8(out, tmp_path / "q.onnx", scans, Preprocessing(), 2)
    assert made and all(env == "3" for _, env in made), made
