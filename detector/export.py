"""`detector export`: checkpoint -> one ONNX bundle (graph + metadata), parity-checked, optional INT8.

The graph takes preprocessed attenuation `scan` (N, C, H, W) with dynamic N, H, W (H, W multiples
of 32) and returns `heatmap` and `score`. Export fails loudly when onnxruntime and torch disagree
by more than 1e-4, or when INT8 costs more than `max_drop` points of detection at 1 % false alarms or
at the threshold the bundle ships.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from detector.atomic import replacing
from detector.bundle import BundleError, attach_metadata, graph_sha256, make_metadata, replace_metadata_bytes
from detector.cpus import usable_cpus
from detector.preprocess import Preprocessing, prepare
from detector.scan import SCAN_SUFFIXES, ScanError, ScanWarning, read_scan, scan_from_counts

PARITY_TOL = 1e-4
DRIFT_RATE = 0.01  # detection is compared at this false-alarm rate
FEW_DRIFT_SCANS = 20   # fewer normal or anomalous calibration scans than this: the drift figures are warned about
# (height, width) in scan pixels at 5 mm; the last is odd-sized so padding is exercised
PARITY_SCANS = ((128, 192), (256, 640), (155, 407))
ORT_THREADS_ENV = "ORT_INTRA_OP_NUM_THREADS"   # sizes an onnxruntime session that sets no threads (>= 1.32)
Log = Callable[[str], None]


class ExportError(RuntimeError):
    """The exported model is unusable (parity, checker, INT8 drift); the message has the numbers."""


def export_onnx(model: Any, path: str | Path, channels: int, opset: int = 20) -> Path:
    """torch.onnx (dynamo) export with dynamic N, H, W and a full onnx.checker pass."""
    import onnx
    import torch

    Dim = torch.export.Dim
    dyn = ({0: Dim("n", min=1, max=64), 2: 32 * Dim("h", min=1, max=512), 3: 32 * Dim("w", min=1, max=1024)},)
    model = model.eval().cpu()
    x = torch.rand(2, channels, 64, 96)
    with torch.no_grad():
        prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["scan"],
                                 output_names=["heatmap", "score"], dynamic_shapes=dyn,
                                 opset_version=opset, optimize=True, verbose=False)
    path = Path(path)
    prog.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return path


def _parity_inputs(channels: int, pre: Preprocessing, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Realistic model inputs via the station's own prepare(): light cargo plus dense blocks."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in PARITY_SCANS:
        att = rng.uniform(0.0, 1.5, (1, h, w)).astype(np.float32)
        att[:, : h // 5] = 0.0                                  # air
        y, x = rng.integers(h // 4, h // 2), rng.integers(0, w // 2)
        att[:, y:y + h // 4, x:x + w // 4] += 4.0               # a dense block
        att = att * np.array([1.0, 1.3][:channels], np.float32)[:, None, None]   # the low energy attenuates more
        counts = np.clip(60000 * np.exp(-att), 0, 65535).astype(np.uint16)
        scan = scan_from_counts(counts, i0=60000.0, pitch_mm=5.0)
        out.append((f"{h}x{w}", prepare(scan, pre, channels).x[None]))
    out[1] = (out[1][0] + " (batch 2)", np.concatenate([out[1][1], out[1][1][:, :, :, ::-1].copy()]))
    return out


def parity_check(model: Any, onnx_path: str | Path, channels: int, pre: Preprocessing, log: Log = print) -> dict:
    """Max |torch - onnxruntime| on heatmap and score over several sizes; ExportError past 1e-4."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = usable_cpus()   # left unset, onnxruntime counts the host's cores, not a CPU quota
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    diffs: dict[str, list[float]] = {"heatmap": [], "score": []}
    sizes = []
    for name, x in _parity_inputs(channels, pre):
        with torch.no_grad():
            th, ts = (t.numpy() for t in model(torch.from_numpy(x)))
        oh, os_ = sess.run(["heatmap", "score"], {"scan": x})
        if oh.shape != th.shape or os_.shape != ts.shape:
            raise ExportError(f"{onnx_path}: output shapes differ on {name}: onnx {oh.shape}/{os_.shape} "
                              f"vs torch {th.shape}/{ts.shape}")
        dh, ds = float(np.abs(oh - th).max()), float(np.abs(os_ - ts).max())
        diffs["heatmap"].append(dh)
        diffs["score"].append(ds)
        sizes.append(f"{name}->{tuple(x.shape[2:])}")
        log(f"  parity {name:<16} input {tuple(x.shape)}: max |diff| heatmap {dh:.2e}, score {ds:.2e}")
    worst = {k: float(np.max(v)) for k, v in diffs.items()}   # np.max keeps a NaN (built-in max dropped it)
    if max(worst.values()) > PARITY_TOL or not all(np.isfinite(list(worst.values()))):
        raise ExportError(f"{onnx_path}: onnxruntime differs from torch by heatmap {worst['heatmap']:.2e}, "
                          f"score {worst['score']:.2e} (tolerance {PARITY_TOL:g}); not exporting")
    return {"sizes": sizes, "max_abs_heatmap": worst["heatmap"], "max_abs_score": worst["score"], "tol": PARITY_TOL}


def bundle_metadata(info: dict, **extra: Any) -> dict:
    """Metadata from load_checkpoint's info (+ export facts), with version and time."""
    pre = Preprocessing.from_dict(info["preprocessing"])
    fields = {k: info.get(k) for k in ("channels", "energies", "preprocessing", "stride", "score", "thresholds",
                                      "normal_scores", "validation", "train_config", "data_fingerprint")}
    fields["pitch_mm"] = info.get("pitch_mm", pre.model_pitch_mm)
    fields["default_false_alarm_rate"] = info.get("default_false_alarm_rate", DRIFT_RATE)
    if info.get("scan_height_mm"):   # checkpoints from before it was recorded have none: the station checks nothing
        fields["scan_height_mm"] = info["scan_height_mm"]
    pitch = ((info.get("train_config") or {}).get("data") or {}).get("pitch_mm")
    if pitch is not None:   # the site's pitch for files without one: the station's default for them too
        fields["default_pitch_mm"] = float(pitch)
    return make_metadata(**fields, **extra)


def write_bundle(onnx_path: str | Path, meta: dict, out: str | Path) -> Path:
    """Attach the metadata (validated) with the graph's SHA-256, so a station refuses a damaged copy, and save."""
    import onnx

    proto = onnx.load(str(onnx_path))
    attach_metadata(proto, meta)
    data = proto.SerializeToString()
    data = replace_metadata_bytes(data, {**meta, "graph_sha256": graph_sha256(data)}, out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        tmp.write_bytes(data)
    return out


# ------------------------------------------------------------------ INT8

CalibrationItem = tuple[Path, "int | None", "float | None"]   # path, label, the pitch of its file where it has none


def calibration_items(src: str | Path, limit: int | None = None) -> list[CalibrationItem]:
    """(path, label, the manifest row's pitch_mm or None) from a dataset folder (manifest.csv or normal/ +
    anomalous/), else every scan file (label and pitch None)."""
    src = Path(src)
    try:
        from detector.evaluate import load_truth
        items = [(t.path, int(t.label), t.pitch_mm) for t in load_truth(src)[0]]
    except FileNotFoundError:
        items = [(p, None, None) for p in sorted(src.rglob("*")) if p.suffix.lower() in SCAN_SUFFIXES]
    if not items:
        raise ExportError(f"{src}: no calibration scans found")
    if limit and len(items) > limit:  # keep both classes: take an even spread of the sorted list
        idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
        items = [items[i] for i in sorted(set(idx))]
    return items


def usable_items(items: list[CalibrationItem], pre: Preprocessing, channels: int,
                 log: Log = print, default_pitch_mm: float | None = None) -> list[CalibrationItem]:
    """The calibration scans this model can run on, each with the pitch its file is read at where it carries none
    (its manifest row's, else `default_pitch_mm`: the bundle's, as the station reads them); the others (unreadable,
    wrong energy count) are left out with one line saying how many and why, as a batch job records its failures and
    goes on."""
    import warnings

    ok, bad = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        for path, label, pitch in items:
            pitch = default_pitch_mm if pitch is None else pitch
            try:
                prepare(read_scan(path, default_pitch_mm=pitch), pre, channels)
                ok.append((path, label, pitch))
            except ScanError as e:
                bad.append(str(e))
    if bad:
        log(f"  int8: left out {len(bad)} of {len(items)} calibration scans that cannot be used (e.g. {bad[0]})")
    return ok


class _Reader:
    """onnxruntime CalibrationDataReader over prepared calibration scans (one scan per batch)."""

    def __init__(self, scans: list[tuple[Path, float | None]], pre: Preprocessing, channels: int):
        """`scans`: (path, the pitch of its file where it carries none)."""
        self.scans, self.pre, self.channels, self.i = scans, pre, channels, 0

    def get_next(self):
        if self.i >= len(self.scans):
            return None
        p, pitch = self.scans[self.i]
        self.i += 1
        scan = read_scan(p, default_pitch_mm=pitch)
        return {"scan": prepare(scan, self.pre, self.channels).x[None]}

    def rewind(self):
        self.i = 0


@contextlib.contextmanager
def ort_threads_bounded() -> Iterator[None]:
    """ORT_INTRA_OP_NUM_THREADS set to usable_cpus while inside, unless the user set it: quantize_static (and its
    pre-processing) make their sessions themselves, with no thread count, and onnxruntime sizes such a pool from the
    host's cores, not a container's CPU quota (onnxruntime >= 1.32 reads the variable; older ones ignore it)."""
    if os.environ.get(ORT_THREADS_ENV):
        yield
        return
    os.environ[ORT_THREADS_ENV] = str(usable_cpus())
    try:
        yield
    finally:
        os.environ.pop(ORT_THREADS_ENV, None)


def quantize_int8(fp32_path: str | Path, out: str | Path, scans: list[tuple[Path, float | None]], pre: Preprocessing,
                  channels: int) -> Path:
    """Static QDQ quantization: uint8 activations, per-channel int8 weights, MinMax calibration on `scans` (path,
    the pitch of its file where it carries none)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, ort_threads_bounded():
        pre_path = Path(tmp) / "pre.onnx"
        # skip ORT's symbolic shape inference: it fails on "32*h" dims and then dumps
        # sym_shape_infer_temp.onnx + a .data file into the working directory; ONNX's own is enough
        quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)
        quantize_static(str(pre_path), str(out), _Reader(scans, pre, channels),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=input_mix_nodes(onnx.load(str(pre_path))))
    return Path(out)


def input_mix_nodes(proto) -> list[str]:
    """Names of the nodes between the graph input and the first Conv (model.MaterialInput's mix): they stay
    fp32 in INT8, since 8-bit inputs would erase the few-% difference of the two energies it amplifies."""
    nodes = list(proto.graph.node)
    first = next((n for n in nodes if n.op_type == "Conv"), None)
    if first is None:
        return []
    producers = {o: n for n in nodes for o in n.output}
    names, todo = set(), [first.input[0]]
    while todo:
        n = producers.get(todo.pop())
        if n is not None and n.name not in names:
            names.add(n.name)
            todo.extend(n.input)
    return sorted(names)


def int8_drift(fp32_bundle: Path, int8_bundle: Path, items: list[CalibrationItem]) -> dict:
    """Scores of both bundles on the same scans: AUROC and detection at 1 % false alarms (each model's own
    threshold: the ranking), and detection at the bundle's shipped threshold, which the INT8 bundle keeps
    (the operating point: a uniform score shift leaves the ranking intact yet releases at that threshold)."""
    from detector.metrics import auroc, detection_at_far
    from detector.runtime import Inspector
    a, b = Inspector(fp32_bundle, warmup=False), Inspector(int8_bundle, warmup=False)
    scores = [[m.inspect(scan).score for m in (a, b)]   # each file at its own pitch, read once for both
              for scan in (read_scan(p, default_pitch_mm=pitch) for p, _, pitch in items)]
    sa, sb = (np.array(s) for s in zip(*scores))
    d = {"scans": len(items), "score_max_abs_diff": float(np.abs(sa - sb).max()),
         "score_mean_abs_diff": float(np.abs(sa - sb).mean()),
         "quantization": {"format": "QDQ", "activations": "uint8", "weights": "int8 per-channel",
                          "calibration": "MinMax"}}
    labels = [lab for _, lab, _ in items]
    if None not in labels and len(set(labels)) == 2:
        y = np.array(labels)
        da, db = detection_at_far(y, sa, DRIFT_RATE), detection_at_far(y, sb, DRIFT_RATE)
        d.update(normal=int((y == 0).sum()), anomalous=int((y == 1).sum()), false_alarm_rate=DRIFT_RATE,
                 auroc_fp32=auroc(y, sa), auroc_int8=auroc(y, sb),
                 detection_fp32=da["detection_rate"], detection_int8=db["detection_rate"])
        if da["detection_rate"] is not None and db["detection_rate"] is not None:
            d["detection_drop_points"] = 100.0 * (da["detection_rate"] - db["detection_rate"])
        ta, tb = float(np.mean(sa[y == 1] >= a.threshold)), float(np.mean(sb[y == 1] >= a.threshold))
        d.update(threshold=a.threshold, detection_at_threshold_fp32=ta, detection_at_threshold_int8=tb,
                 threshold_drop_points=100.0 * (ta - tb))
    return d


def _drift_text(d: dict) -> str:
    if "detection_drop_points" not in d:
        return f"score |diff| max {d['score_max_abs_diff']:.3f} mean {d['score_mean_abs_diff']:.4f}"
    return (f"AUROC {d['auroc_fp32']:.4f} -> {d['auroc_int8']:.4f}, detection at {DRIFT_RATE:.0%} false alarms "
            f"{d['detection_fp32']:.1%} -> {d['detection_int8']:.1%} ({0.0 - d['detection_drop_points']:+.1f} points), "
            f"at the shipped threshold {d['threshold']:.3f} {d['detection_at_threshold_fp32']:.1%} -> "
            f"{d['detection_at_threshold_int8']:.1%} ({0.0 - d['threshold_drop_points']:+.1f} points), "
            f"score |diff| max {d['score_max_abs_diff']:.3f}")


def make_int8_bundle(fp32_bundle: str | Path, out: str | Path, calibration: str | Path, meta: dict,
                     max_drop: float = 1.0, limit: int | None = 64, log: Log = print) -> dict:
    """Quantize a bundle on calibration scans, measure drift, refuse past `max_drop` points."""
    pre, channels = Preprocessing.from_dict(meta["preprocessing"]), int(meta["channels"])
    found = calibration_items(calibration, limit)
    items = usable_items(found, pre, channels, log, meta.get("default_pitch_mm"))
    if len({lab for _, lab, _ in items}) != 2 or any(lab is None for _, lab, _ in items):
        usable = f"{len(items)} usable of {len(found)} (the others left out above)" if len(items) < len(found) else \
            f"{len(items)}"
        raise ExportError(f"{calibration}: INT8 drift needs labelled normal and anomalous scans "
                          f"(manifest.csv or normal/ + anomalous/); found {usable} scan(s) without both "
                          f"classes. The fp32 bundle {fp32_bundle} is unaffected")
    log(f"  int8: calibrating on {len(items)} scans from {calibration}")
    counts = [sum(lab == c for _, lab, _ in items) for c in (0, 1)]
    if min(counts) < FEW_DRIFT_SCANS:   # the ranges and the drift come from these few: a flip elsewhere goes unseen
        log(f"  int8: warning: only {counts[0]} normal and {counts[1]} anomalous calibration scans: the quantization "
            f"ranges and the drift check rest on them alone; give {FEW_DRIFT_SCANS} or more of each (up to 64 are used)")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        raw = quantize_int8(fp32_bundle, Path(tmp) / "q.onnx", [(p, pitch) for p, _, pitch in items], pre, channels)
        q = write_bundle(raw, meta, Path(tmp) / "int8.onnx")  # metadata so Inspector can load it
        drift = int8_drift(Path(fp32_bundle), q, items)
        log(f"  int8 drift: {_drift_text(drift)}")
        drops = (drift.get("detection_drop_points"), drift.get("threshold_drop_points"))
        if None in drops or max(drops) > max_drop:
            raise ExportError(f"INT8 refused: {_drift_text(drift)}; the drop exceeds {max_drop:g} point(s). "
                              f"The fp32 bundle {fp32_bundle} is unaffected: deploy that one")
        write_bundle(raw, {**meta, "int8": drift}, out)
    return drift


# ------------------------------------------------------------------ the verb

def export_bundle(model: Any, info: dict, out: str | Path, *, opset: int = 20, int8: bool = False,
                  calibration: str | Path | None = None, max_drop: float = 1.0, log: Log = print) -> dict:
    """Export, check, attach metadata (and optionally quantize). Returns a summary dict."""
    out = Path(out)
    channels = int(info["channels"])
    if getattr(getattr(model, "cfg", None), "in_channels", channels) != channels:
        raise ExportError(f"checkpoint says {channels} channel(s) but the network takes {model.cfg.in_channels}")
    if int8 and not calibration:
        raise ExportError("--int8 needs --calibration DIR (real scans, labelled, to measure drift)")
    pre = Preprocessing.from_dict(info["preprocessing"])
    fp32_out = out.with_name(out.stem + ".fp32.onnx") if int8 else out
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        raw = export_onnx(model, Path(tmp) / "raw.onnx", channels, opset)
        log(f"  exported graph (opset {opset}) and passed onnx.checker (full check)")
        parity = parity_check(model, raw, channels, pre, log)
        meta = bundle_metadata(info, export={"opset": opset, "parity": parity})
        write_bundle(raw, meta, fp32_out)
    summary = {"out": str(out), "fp32": str(fp32_out), "parity": parity, "seconds": None}
    if int8:
        summary["int8"] = make_int8_bundle(fp32_out, out, calibration, meta, max_drop, log=log)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def main(args) -> int:
    """detector export CKPT --out model.onnx [--int8 --calibration DIR]"""
    from detector.checkpoint import CheckpointError, load_checkpoint, unfinished_run

    if Path(args.out).is_dir():   # checked first: the export ran, then failed to write
        print(f"detector export: --out {args.out} is a folder: give the bundle file, e.g. "
              f"{Path(args.out) / 'model.onnx'}", file=sys.stderr)
        return 2
    try:
        model, info = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"detector export: {e}", file=sys.stderr)
        return 2
    if (why := unfinished_run(args.checkpoint)) is not None:   # an interim model, which may be what is wanted
        last = Path(args.checkpoint).parent / "last.ckpt"
        print(f"warning: {why}: an interim model; the run's command with --resume {shlex.quote(str(last))} finishes "
              "it, then export its best.ckpt", file=sys.stderr)
    try:
        s = export_bundle(model, info, args.out, opset=args.opset, int8=args.int8, calibration=args.calibration,
                          max_drop=getattr(args, "max_drop", 1.0))
    except (ExportError, BundleError, ScanError) as e:  # ScanError: an unreadable calibration scan
        print(f"detector export: FAILED: {e}", file=sys.stderr)
        return 1
    size = Path(args.out).stat().st_size / 1e6
    p = s["parity"]
    parity = f"parity max |diff| heatmap {p['max_abs_heatmap']:.1e} score {p['max_abs_score']:.1e}"
    if args.int8:   # the parity figures are the fp32 graph's: the INT8 one is judged by its drift
        d = s["int8"]
        what = (f"int8 (QDQ), {info['channels']} channel(s), {size:.1f} MB, score |diff| from fp32 max "
                f"{d['score_max_abs_diff']:.3f} on {d['scans']} calibration scans; fp32 {parity}, kept at {s['fp32']}")
    else:
        what = f"fp32, {info['channels']} channel(s), {size:.1f} MB, {parity}"
    print(f"exported {args.out} ({what}) in {s['seconds']:.0f} s")
    print(f"next: detector score SCANS --model {shlex.quote(args.out)} --out results.csv")
    return 0
