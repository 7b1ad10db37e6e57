"""The model bundle's metadata: one JSON document under the ONNX `metadata_props` key "detector".

Thresholds, preprocessing constants and provenance travel inside the .onnx file, so a station
needs nothing else and can re-threshold without re-export. Reading uses onnxruntime only (core);
attaching at export uses the onnx package (training side); rewriting an exported bundle's metadata
(`detector calibrate`) edits the protobuf's metadata field directly, so the core needs no onnx package.
"""
from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from detector import __version__
from detector.atomic import replacing
from detector.scan import DEFAULT_PITCH_MM, PITCH_RANGE_MM

METADATA_KEY = "detector"
SCHEMA_VERSION = 1
SCORE_METHODS = ("topk_mean_logit",)
REQUIRED = ("schema_version", "channels", "energies", "pitch_mm", "preprocessing", "stride", "score",
            "thresholds", "default_false_alarm_rate", "normal_scores")
PREPROCESSING_KEYS = ("model_pitch_mm", "clip_max", "scale", "pad_multiple")
# a scan whose height (rows x pitch) lies outside the training scans' range widened this many times is refused: a
# pixel pitch 10x too fine shrank a truck until its cargo could not be seen, and the truck was released
HEIGHT_TOLERANCE = 4.0
# how the runtime makes a scan's score (`score_rule`): the graph's heatmap logits pooled over the scan's own cells
# (since 2026-12-07), or, where the graph's heatmap is no Sigmoid's, its score output (pooled probabilities where the
# scan is tiled or its padding is among the top cells): before 2026-12-07 every graph was scored so
LOGITS_RULE, OUTPUT_RULE = "heatmap_logits", "score_output"


class BundleError(ValueError):
    """A model file that is not a valid detector bundle; names the file and the reason."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = str(path) if path is not None else "<model>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def unloadable(path: str | Path, error: Exception) -> BundleError:
    """The BundleError for a file onnxruntime cannot load. A training checkpoint (a zip archive: torch.save)
    is the usual mix-up after `detector train`, so that one says which command makes the bundle from it."""
    try:
        with open(path, "rb") as f:
            checkpoint = f.read(4) == b"PK\x03\x04" or Path(path).suffix.lower() in (".ckpt", ".pt", ".pth")
    except OSError:
        checkpoint = False
    if checkpoint:
        return BundleError(path, f"a training checkpoint, not an ONNX bundle: export it first with "
                                 f"`detector export {path} --out model.onnx` and pass model.onnx")
    return BundleError(path, f"not a loadable ONNX model ({str(error).splitlines()[0][:200]})")


def _json_safe(obj: Any) -> Any:
    """numpy scalars/arrays, tuples and Paths -> plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def make_metadata(**fields: Any) -> dict:
    """Metadata dict with schema version, package version and creation time filled in, JSON-safe."""
    meta = {"schema_version": SCHEMA_VERSION, "package_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta.update(fields)
    if "normal_scores" in meta and meta["normal_scores"] is not None:
        meta["normal_scores"] = sorted(float(s) for s in meta["normal_scores"])
    meta.setdefault("default_false_alarm_rate", 0.01)
    return _json_safe(meta)


def attach_metadata(model_proto: Any, meta: dict) -> Any:
    """Validate `meta` and store it as JSON under metadata_props["detector"] (replacing any old one)."""
    validate_metadata(meta, "<metadata to attach>")
    text = json.dumps(_json_safe(meta), sort_keys=True)
    keep = [p for p in model_proto.metadata_props if p.key != METADATA_KEY]
    del model_proto.metadata_props[:]
    for p in keep:
        model_proto.metadata_props.add(key=p.key, value=p.value)
    model_proto.metadata_props.add(key=METADATA_KEY, value=text)
    return model_proto


def parse_metadata(custom: dict[str, str], path: str | Path | None, validate: bool = True) -> dict:
    """The bundle metadata from an onnxruntime custom_metadata_map; BundleError if absent or bad."""
    if METADATA_KEY not in custom:
        raise BundleError(path, f"no {METADATA_KEY!r} metadata: not a detector model bundle "
                                f"(a foreign ONNX file? export one with `detector export`)")
    try:
        meta = json.loads(custom[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise BundleError(path, f"metadata {METADATA_KEY!r} is not valid JSON ({e})") from None
    if validate:
        validate_metadata(meta, path)
    return meta


def read_metadata(path: str | Path, validate: bool = True) -> dict:
    """Read (and by default validate) the metadata of a bundle with onnxruntime only."""
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        raise BundleError(path, "a folder, not a model file: pass the .onnx bundle that `detector export` wrote")
    if not path.is_file():
        raise BundleError(path, "model file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(path, f"cannot read model file ({e.strerror or e})") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind types
        raise unloadable(path, e) from None
    if not validate:
        return parse_metadata(sess.get_modelmeta().custom_metadata_map, path, validate=False)
    return session_metadata(sess, data, path)


def session_metadata(sess: Any, model: bytes, path: str | Path | None) -> dict:
    """The validated metadata of a bundle loaded into an onnxruntime session from `model` (its bytes), with its graph
    checked against it: the digest export recorded, the input and outputs, the channels."""
    meta = parse_metadata(sess.get_modelmeta().custom_metadata_map, path)
    check_graph_sha256(model, meta, path)
    check_graph(sess, meta, path)
    return meta


def check_graph(sess: Any, meta: dict, path: str | Path | None) -> None:
    """BundleError unless the onnxruntime session's graph has the contract's input and outputs, and takes the
    channels the metadata says (else `detector info` described, and `detector calibrate` re-thresholded, a bundle
    no station can load)."""
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name for o in sess.get_outputs()}
    if "scan" not in inputs or not {"heatmap", "score"} <= outputs:
        raise BundleError(path, f"graph must have input 'scan' and outputs 'heatmap', 'score'; has "
                                f"inputs {sorted(inputs)} outputs {sorted(outputs)}")
    shape, channels = inputs["scan"].shape, meta["channels"]
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != channels):
        raise BundleError(path, f"input 'scan' has shape {shape}, metadata says {channels} channel(s)")


def _need(cond: bool, path: Any, reason: str) -> None:
    if not cond:
        raise BundleError(path, f"invalid {METADATA_KEY!r} metadata: {reason}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_metadata(meta: Any, path: str | Path | None = None) -> dict:
    """Check schema version and every field a station relies on; BundleError naming the first problem."""
    _need(isinstance(meta, dict), path, f"expected a JSON object, got {type(meta).__name__}")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(path, f"metadata schema_version {version!r} is not supported (this detector "
                                f"{__version__} reads version {SCHEMA_VERSION}); re-export the model")
    missing = [k for k in REQUIRED if k not in meta]
    _need(not missing, path, f"missing field(s) {', '.join(missing)}")
    ch = meta["channels"]
    _need(ch in (1, 2) and not isinstance(ch, bool), path, f"channels must be 1 or 2, got {ch!r}")
    _need(isinstance(meta["energies"], list) and len(meta["energies"]) == ch, path,
          f"energies {meta['energies']!r} must list {ch} name(s)")
    _need(_is_num(meta["pitch_mm"]) and meta["pitch_mm"] > 0, path, f"pitch_mm {meta['pitch_mm']!r} must be > 0")
    pre = meta["preprocessing"]
    _need(isinstance(pre, dict), path, "preprocessing must be an object")
    for k in PREPROCESSING_KEYS:   # clip_max or scale <= 0 maps every scan to air: every truck released
        _need(k in pre, path, f"preprocessing lacks {k!r}")
        _need(_is_num(pre[k]) and pre[k] > 0, path, f"preprocessing {k} {pre[k]!r} must be a number > 0")
    _need(pre["model_pitch_mm"] == meta["pitch_mm"], path,   # the runtime resamples to the one, `info` showed the other
          f"pitch_mm {meta['pitch_mm']!r} differs from preprocessing model_pitch_mm {pre['model_pitch_mm']!r}")
    _need(isinstance(pre["pad_multiple"], int), path,
          f"preprocessing pad_multiple {pre['pad_multiple']!r} must be an int")
    _need(isinstance(pre.get("repair_rows", False), bool), path,
          f"preprocessing repair_rows {pre.get('repair_rows')!r} must be true or false")
    _need(isinstance(meta["stride"], int) and meta["stride"] >= 1, path, f"stride {meta['stride']!r} must be an int >= 1")
    score = meta["score"]
    _need(isinstance(score, dict) and score.get("method") in SCORE_METHODS, path,
          f"score method must be one of {SCORE_METHODS}, got {score!r}")
    _need(isinstance(score.get("k"), int) and score["k"] >= 1, path, f"score k must be an int >= 1, got {score.get('k')!r}")
    rows = meta["thresholds"]
    _need(isinstance(rows, list) and len(rows) > 0, path, "thresholds must be a non-empty list")
    for r in rows:   # scores lie in [0, 1]: a threshold above 1 would release every truck (a hand-edit's typo)
        _need(isinstance(r, dict) and _is_num(r.get("threshold")) and _is_num(r.get("false_alarm_rate")),
              path, f"threshold row {r!r} needs numeric threshold and false_alarm_rate")
        _need(0 <= r["threshold"] <= 1 and 0 <= r["false_alarm_rate"] <= 1, path,
              f"threshold row {r!r}: threshold and false_alarm_rate must lie in [0, 1]")
    _check_table_order(rows, path)
    _need(_is_num(meta["default_false_alarm_rate"]) and 0 < meta["default_false_alarm_rate"] < 1, path,
          f"default_false_alarm_rate {meta['default_false_alarm_rate']!r} must be in (0, 1)")
    ns = meta["normal_scores"]
    _need(isinstance(ns, list) and all(_is_num(s) and 0 <= s <= 1 for s in ns), path,
          "normal_scores must be a list of numbers in [0, 1]")
    gs = meta.get("graph_sha256")   # optional: bundles exported before it was recorded have none
    _need(gs is None or (isinstance(gs, str) and len(gs) == 64 and all(c in "0123456789abcdef" for c in gs)), path,
          f"graph_sha256 {gs!r} must be 64 lowercase hex digits")
    hs = meta.get("scan_height_mm")   # optional: bundles exported before it was recorded have none
    _need(hs is None or (isinstance(hs, list) and len(hs) == 2 and all(_is_num(h) and h > 0 for h in hs)
                         and hs[0] <= hs[1]), path, f"scan_height_mm {hs!r} must be [lowest, highest] in mm, > 0")
    dp = meta.get("default_pitch_mm")   # optional: a run without data.pitch_mm (and older bundles) has none
    lo, hi = PITCH_RANGE_MM
    _need(dp is None or (_is_num(dp) and lo <= dp <= hi), path,
          f"default_pitch_mm {dp!r} must be a pitch in {lo:g}-{hi:g} mm (the pitch of scan files that carry none)")
    return meta


def untagged_pitch_mm(meta: dict) -> float:
    """The pitch a bundle's station takes for scan files that carry none: its training run's data.pitch_mm
    (`default_pitch_mm`), else DEFAULT_PITCH_MM."""
    dp = meta.get("default_pitch_mm")
    return DEFAULT_PITCH_MM if dp is None else float(dp)


def _check_table_order(rows: list[dict], path: Any) -> None:
    """One row per rate, and a lower rate never at a lower threshold (fewer inspections need a higher bar): a table
    edited out of order, or listing a rate twice, made the Inspector's default tier use one threshold and a policy
    tier at the same rate (derived from normal_scores) another."""
    rates = [float(r["false_alarm_rate"]) for r in rows]
    _need(len(set(rates)) == len(rates), path, f"thresholds list a false_alarm_rate twice ({rates})")
    ordered = sorted(rows, key=lambda r: -float(r["false_alarm_rate"]))
    for hi, lo in zip(ordered, ordered[1:]):
        _need(float(lo["threshold"]) >= float(hi["threshold"]), path,
              f"thresholds out of order: rate {lo['false_alarm_rate']:g} has threshold {lo['threshold']:g}, under "
              f"the {hi['threshold']:g} of the higher rate {hi['false_alarm_rate']:g}")


def height_range_mm(meta: dict) -> tuple[float, float] | None:
    """The scan heights (mm) a bundle accepts: its training scans' range widened HEIGHT_TOLERANCE times; None where
    the bundle does not record it."""
    hs = meta.get("scan_height_mm")
    return None if not hs else (hs[0] / HEIGHT_TOLERANCE, hs[1] * HEIGHT_TOLERANCE)


def default_threshold(meta: dict) -> tuple[float, float]:
    """(threshold, false-alarm rate) for the bundle's default rate: its table row, else derived."""
    rate = float(meta["default_false_alarm_rate"])
    for r in meta["thresholds"]:
        if abs(float(r["false_alarm_rate"]) - rate) < 1e-12:
            return float(r["threshold"]), rate
    if meta["normal_scores"]:
        from detector.calibration import threshold_for_rate
        return float(threshold_for_rate(np.asarray(meta["normal_scores"]), rate)), rate
    r = meta["thresholds"][0]
    return float(r["threshold"]), float(r["false_alarm_rate"])


# ------------------------------------------------------------------ rewriting the metadata without the onnx package
# A station re-thresholds a bundle (`detector calibrate`) with the core alone, which has onnxruntime but not the onnx
# package. Only ModelProto's top-level field 14 (metadata_props: entries {key = 1; value = 2}, onnx.proto) changes;
# every other field, the graph and its weights included, is copied byte for byte.
_METADATA_PROPS = 14


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The protobuf base-128 varint at buf[i]: (value, index after it)."""
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, int, int, int]]:
    """A message's top-level fields: (field number, start, payload start, end) each, in file order."""
    out, i = [], 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        payload = i
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            size, payload = _varint(buf, i)
            i = payload + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf) or number == 0:
            raise ValueError("truncated protobuf field")
        out.append((number, start, payload, i))
    return out


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def replace_metadata_bytes(model: bytes, meta: dict, path: str | Path | None = None) -> bytes:
    """The ONNX model's bytes with metadata_props["detector"] set to `meta` (validated), all else unchanged."""
    validate_metadata(meta, "<metadata to write>")
    try:
        fields = _fields(model)
        kept = bytearray()
        for number, start, payload, end in fields:
            if number == _METADATA_PROPS:
                entry = model[payload:end]
                keys = [entry[p:e] for n, _, p, e in _fields(entry) if n == 1]
                if keys and keys[0] == METADATA_KEY.encode():
                    continue
            kept += model[start:end]
    except ValueError as e:
        raise BundleError(path, f"not a readable ONNX protobuf ({e})") from None
    if not any(number == 7 for number, *_ in fields):   # ModelProto.graph
        raise BundleError(path, "no graph in this ONNX file")
    text = json.dumps(_json_safe(meta), sort_keys=True).encode()
    entry = _len_field(1, METADATA_KEY.encode()) + _len_field(2, text)
    return bytes(kept) + _len_field(_METADATA_PROPS, entry)


def _strings(message: bytes, number: int) -> list[str]:
    """The repeated string field `number` of a protobuf message."""
    return [message[p:e].decode("utf-8", "replace") for n, _, p, e in _fields(message) if n == number]


def _heatmap_logits(graph: bytes) -> str | None:
    """The name of the tensor the heatmap's Sigmoid takes (its logits), past an INT8 graph's QuantizeLinear and
    DequantizeLinear; None where the heatmap is made otherwise."""
    return _heatmap_source(graph)[0]


def _heatmap_source(graph: bytes) -> tuple[str | None, bool]:
    """The heatmap Sigmoid's input (None where the heatmap is made otherwise), and whether the heatmap output is
    quantized (an INT8 graph's DequantizeLinear makes it)."""
    producer = {}
    for number, _, payload, end in _fields(graph):
        if number == 1:   # GraphProto.node: NodeProto {input = 1; output = 2; op_type = 4; domain = 7}
            node = graph[payload:end]
            op = ("".join(_strings(node, 7)) or "ai.onnx") + "." + "".join(_strings(node, 4))
            producer.update({out: (op, _strings(node, 1)) for out in _strings(node, 2)})
    name = "heatmap"
    quantized = producer.get(name, ("", []))[0].endswith("DequantizeLinear")
    while producer.get(name, ("", []))[0].endswith(("QuantizeLinear", "DequantizeLinear")):
        name = producer[name][1][0]
    op, inputs = producer.get(name, ("", []))
    return (inputs[0] if op == "ai.onnx.Sigmoid" and inputs else None), quantized


def score_rule(model: bytes) -> str:
    """How the runtime scores this graph, recorded beside every score (results routing file, audit rows) so that
    `detector calibrate` sets thresholds only on scores of the rule the bundle is served with: LOGITS_RULE where it
    finds the heatmap's logits (bundle.with_logits_output), else OUTPUT_RULE."""
    return LOGITS_RULE if with_logits_output(model)[1] else OUTPUT_RULE


def rule_words(rule: str | None) -> str:
    """How scores were made, in words for a refusal; None: before the rule was recorded."""
    return (f"by the rule {rule!r}" if rule else
            "before the scoring rule was recorded (an INT8 bundle's scores changed with it on 2026-12-07)")


def unrecorded_rule(model: bytes) -> str | None:
    """The rule of this graph's scores that record none (scored before the rule was recorded), where their numbers
    tell it: both rules give an fp32 graph's scores alike (to 1e-7), and a graph without the logits was scored as it
    still is; an INT8 heatmap's scores changed with the rule (2026-12-07: the old pooled its 1/255 steps), so None."""
    try:
        graph = next((model[p:e] for n, _, p, e in _fields(model) if n == 7), b"")
        logits, quantized = _heatmap_source(graph)
    except ValueError:
        return None
    return None if logits and quantized else score_rule(model)


def with_logits_output(model: bytes) -> tuple[bytes, str | None]:
    """The model with the heatmap's logits as one more graph output, and their name; (model, None) where they
    cannot be found. An INT8 heatmap is quantized to 1/255 steps (every cell past logit 6.2 reads 255/255), too
    coarse to pool into a score; its logits are what the graph's own score pools."""
    try:
        fields = _fields(model)
        graph = next((model[p:e] for n, _, p, e in fields if n == 7), None)
        logits = None if graph is None else _heatmap_logits(graph)
    except ValueError:
        return model, None
    if logits is None:
        return model, None
    outputs = [_strings(graph[p:e], 1) for n, _, p, e in _fields(graph) if n == 12]
    if [logits] not in outputs:   # ValueInfoProto {name = 1; type = 2: TypeProto {tensor_type = 1: {elem_type = 1}}}
        float_tensor = _len_field(1, b"\x08\x01")
        graph += _len_field(12, _len_field(1, logits.encode()) + _len_field(2, float_tensor))
    out = b"".join(_len_field(7, graph) if n == 7 else model[s:e] for n, s, _, e in fields)
    return out, logits


def graph_sha256(model: bytes, path: str | Path | None = None) -> str:
    """SHA-256 of an ONNX model's bytes less its metadata_props: the graph, weights and opsets the metadata describes.
    Export records it in the metadata; a metadata rewrite (`detector calibrate`) leaves it as it was."""
    h = hashlib.sha256()
    try:
        for number, start, _, end in _fields(model):
            if number != _METADATA_PROPS:
                h.update(model[start:end])
    except ValueError as e:
        raise BundleError(path, f"not a readable ONNX protobuf ({e})") from None
    return h.hexdigest()


def check_graph_sha256(model: bytes, meta: dict, path: str | Path | None = None) -> None:
    """BundleError when the model's graph is not the one its metadata was exported with: a byte changed in the
    weights (a damaged copy) still loads and runs, and routes trucks on whatever it computes."""
    want = meta.get("graph_sha256")
    if want is None:   # exported before the digest was recorded: nothing to check against
        return
    got = graph_sha256(model, path)
    if got != want:
        raise BundleError(path, f"the graph is not the one this bundle was exported with (graph sha256 {got[:12]}, "
                                f"its metadata records {want[:12]}): the file was damaged or altered after export, "
                                "or its metadata was put on another model; copy the bundle again from its source")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 that names a bundle (as Inspector.model_sha256, a results CSV's routing file and the audit log do)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rewrite_metadata(src: str | Path, dst: str | Path, meta: dict, model: bytes | None = None) -> Path:
    """Write `src`'s model to `dst` with new bundle metadata (atomically: a temporary file, read back with
    onnxruntime and checked, then renamed), torch- and onnx-free. `model`: src's bytes where the caller has read
    them already (and hashed them: what is written is then the very model it hashed)."""
    src, dst = Path(src), Path(dst)
    data = replace_metadata_bytes(src.read_bytes() if model is None else model, meta, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dst) as tmp:
        tmp.write_bytes(data)
        back = read_metadata(tmp)
        if back != json.loads(json.dumps(_json_safe(meta), sort_keys=True)):
            raise BundleError(dst, "the metadata read back differs from what was written")
    return dst
