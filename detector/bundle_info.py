"""`detector info MODEL`: what a model bundle is, from its metadata alone (torch-free, onnx-free).

A station engineer asks which model runs, how it was trained and validated, and what its thresholds rest on;
the audit log names models by SHA-256, and this maps a file back to those facts. `--json` prints the metadata
as stored, for scripts.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from detector.bundle import BundleError, file_sha256, height_range_mm, read_metadata, untagged_pitch_mm
from detector.calibration import threshold_texts


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f} %"


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def _precision(meta: dict) -> str:
    q = (meta.get("int8") or {}).get("quantization")
    if not q:
        return "fp32"
    return f"INT8 ({q.get('format', 'QDQ')}, {q.get('activations', '?')} activations, {q.get('weights', '?')} weights)"


def _network(meta: dict) -> str:
    model = (meta.get("train_config") or {}).get("model")
    score = meta.get("score") or {}
    pitch, stride = float(meta["pitch_mm"]), int(meta["stride"])
    how = (f"score = mean of the top {score['k']} cell logits" if score.get("method") == "topk_mean_logit"
           else f"score = {score.get('method', '?')}")
    cell = f"heatmap cell {stride} px ({stride * pitch:.0f} mm)"
    if not isinstance(model, dict):
        return f"{model or 'unknown network'}, {cell}, {how}"
    width = f" width {model['width']}" if model.get("width") else ""
    start = f"; fine-tuned from {model['init']}" if model.get("init") else ""   # a fine-tune (train --init)
    return f"{model.get('backbone', '?')}{width}, {cell}, {how}{start}"


def _validation(meta: dict) -> str:
    v = meta.get("validation") or {}
    if "auroc" not in v:
        return v.get("note", "none recorded")
    return (f"{v.get('n', '?')} scans ({v.get('n_normal', '?')} normal, {v.get('n_anomalous', '?')} anomalous): "
            f"AUROC {_num(v.get('auroc'))}, AP {_num(v.get('ap'))}, detection {_pct(v.get('det_at_1pct'))} at 1 % "
            f"and {_pct(v.get('det_at_0.1pct'))} at 0.1 % false alarms, top region on the anomaly "
            f"{_pct(v.get('top_region_hit'))}")


def _heights(meta: dict) -> str:
    """What scan heights the station accepts (a scan outside them is inspected: its pitch is likely wrong)."""
    accepted = height_range_mm(meta)
    if accepted is None:
        return "scan heights not recorded (not checked)"
    lo, hi = meta["scan_height_mm"]
    return (f"training scans {lo / 1000:.2f}-{hi / 1000:.2f} m high, scans {accepted[0] / 1000:.2f}-"
            f"{accepted[1] / 1000:.2f} m accepted")


def _untagged(meta: dict) -> str:
    """The pitch the station takes for scan files that carry none, and where it comes from."""
    site = (meta.get("site_calibration") or {}).get("default_pitch_mm")
    how = ("the site calibration's: its scores were read at it" if site is not None and site == untagged_pitch_mm(meta)
           else "the training run's data.pitch_mm" if meta.get("default_pitch_mm") is not None else
           "the default: the training run set no data.pitch_mm")
    return (f"files without a pitch of their own read at {untagged_pitch_mm(meta):g} mm ({how}; `score --pitch-mm` and "
            "`serve --pitch-mm` override it); a file's own pitch wins")


def _threshold_lines(meta: dict) -> list[str]:
    """One line per rate: the threshold, and what it was set on (and whether those scans can pin the rate)."""
    site = meta.get("site_calibration")
    source = f"{site['scans']} cleared scans of the site" if site else f"{len(meta['normal_scores'])} normal validation scans"
    default = float(meta["default_false_alarm_rate"])
    out = [f"  {'rate':>8}  {'threshold':>9}  {'':7}  set on"]
    rows = sorted(meta["thresholds"], key=lambda r: -float(r["false_alarm_rate"]))
    for r, text in zip(rows, threshold_texts(*(float(r["threshold"]) for r in rows))):
        rate = float(r["false_alarm_rate"])
        note = "" if r.get("resolvable", True) else " (too few for this rate: it sits above their highest score)"
        mark = "default" if abs(rate - default) < 1e-12 else ""
        out.append(f"  {100 * rate:>7.2f}%  {text:>9}  {mark:7}  {source}{note}")
    return out


def describe(path: str | Path, meta: dict | None = None) -> list[str]:
    """The lines `detector info` prints for a bundle (BundleError when it is none)."""
    path = Path(path)
    meta = read_metadata(path) if meta is None else meta
    pre = meta.get("preprocessing") or {}
    tc = meta.get("train_config") or {}
    export = meta.get("export") or {}
    lines = [f"{path}: detector model bundle, {path.stat().st_size / 1e6:.1f} MB, {_precision(meta)}"
             + (f", ONNX opset {export['opset']}" if export.get("opset") else ""),
             f"  sha256      {file_sha256(path)}",
             f"  graph       sha256 {meta['graph_sha256']}, as exported (checked)" if meta.get("graph_sha256") else
             "  graph       digest not recorded (exported before it was): not checked",
             f"  created     {meta.get('created', '?')} by detector {meta.get('package_version', '?')} "
             f"(bundle schema {meta.get('schema_version', '?')})",
             f"  input       {meta['channels']} channel(s) ({', '.join(meta.get('energies') or [])}) resampled to "
             f"{float(meta['pitch_mm']):g} mm; attenuation clipped at {pre.get('clip_max', '?')}, divided by "
             f"{pre.get('scale', '?')}; detector rows repaired: {'yes' if pre.get('repair_rows') else 'no'}; "
             + _heights(meta),
             f"  scan pitch  {_untagged(meta)}",
             f"  network     {_network(meta)}",
             f"  trained     config {tc.get('name', '?')!s}, seed {tc.get('seed', '?')!s}, data fingerprint "
             f"{meta.get('data_fingerprint', '?')}",
             f"  validation  {_validation(meta)}"]
    if meta.get("int8"):
        d = meta["int8"]
        lines.append(f"  int8 drift  AUROC {_num(d.get('auroc_fp32'), 4)} -> {_num(d.get('auroc_int8'), 4)}, detection "
                     f"at 1 % {_pct(d.get('detection_fp32'))} -> {_pct(d.get('detection_int8'))}"
                     + (f", at the shipped threshold {threshold_texts(d['threshold'])[0]} "
                        f"{_pct(d.get('detection_at_threshold_fp32'))} -> {_pct(d.get('detection_at_threshold_int8'))}"
                        if d.get("threshold") is not None else "")
                     + f" (on {d.get('normal', '?')} normal and {d.get('anomalous', '?')} anomalous calibration scans)")
    lines.append("  thresholds (a truck scoring at or above one is inspected):")
    lines += _threshold_lines(meta)
    site = meta.get("site_calibration")
    if site:
        left = site.get("left_out") or {}
        lines.append(f"  site        calibrated {site.get('created', '?')} on {site['scans']} cleared scans of "
                     f"{site.get('results', '?')}" + (f" since {site['since']}" if site.get("since") else "")
                     + f" ({sum(int(v or 0) for v in left.values())} left out){_scored_by(site)}; before: "
                     f"{site['previous']['normal_scans']} scans of {site['previous']['source']}")
    return lines


def _scored_by(site: dict) -> str:
    """Which bundle's scores a site calibration rests on, by the sha256 prefix `audit summary` names models by, and
    whether they were a candidate's in shadow (serve --shadow) rather than verdicts it served."""
    sha = str(site.get("scored_with_sha256") or "")[:12]
    if not sha:
        return ""
    some = int(site.get("shadow_scores") or 0)
    return f", scored by {sha}" + (" in shadow (serve --shadow)" if site.get("shadow") else
                                   f" ({some} of them in shadow, serve --shadow)" if some else "")


def next_step(path: Path, meta: dict) -> str:
    """What to run next: calibrate on the site's traffic where the thresholds cannot pin their rates, else serve."""
    loose = not meta.get("site_calibration") and any(not r.get("resolvable", True) for r in meta["thresholds"])
    path = shlex.quote(str(path))   # pasted into a shell: a folder with a space is one argument
    if loose:
        return (f"next: detector score cleared/ --model {path} --out cleared.csv && detector calibrate cleared.csv "
                f"--model {path} --out site.onnx   (thresholds for the site's own traffic)")
    return f"next: detector serve --model {path}"


def main(args: argparse.Namespace) -> int:
    path = Path(args.model)
    try:
        meta = read_metadata(path)
        if args.json:
            text = json.dumps({"file": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size,
                               "metadata": meta}, indent=1, sort_keys=True)
        else:
            text = "\n".join([*describe(path, meta), next_step(path, meta)])
    except (BundleError, OSError) as e:
        print(f"detector info: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
