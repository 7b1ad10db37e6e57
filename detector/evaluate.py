"""The `eval` verb: results CSV + truth (dataset folder or manifest) -> metrics.json, plots, report.html.

Results are matched to truth by resolved path (falling back to the truth's relative path as a
suffix, so results scored elsewhere still match). Rows whose scoring failed count as INSPECT
(fail-closed) and are listed. Operating points follow detector.calibration: INSPECT when
score >= threshold.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector import eval_baseline
from detector import metrics as M
from detector.atomic import replacing
from detector.manifest import (SPLIT_ALIASES, boxes_of, has_layout, label_of, layout_files, not_a_dataset, on_disk,
                               one_row_per_file, pitch_of, read_mask, read_rows, read_text, shown)
from detector.formats import file_geometry
from detector.scan import ScanError, file_shape, map_box

CARGO_COLUMNS = ("cargo_class", "cargo", "cargo_type")
N_THUMBS = 6
OUTPUTS = ("metrics.json", "roc.png", "hist.png", "report.html")   # roc.png only with both classes


@dataclass
class Truth:
    path: Path
    rel: str
    label: int
    boxes: list = field(default_factory=list)
    mask: Path | None = None
    anomaly_type: str | None = None
    cargo: str | None = None
    split: str = ""   # the manifest's split ("train", "val", "test"); "" where it has none
    pitch_mm: float | None = None   # the manifest's pitch_mm: the file's pitch where it carries none


@dataclass
class Result:
    path: str
    score: float
    decision: str
    threshold: float | None
    regions: list
    error: str
    row: int = 0   # its line in the results CSV

    @property
    def failed(self) -> bool:
        return bool(self.error) or not math.isfinite(self.score)

    @property
    def forced(self) -> bool:
        """INSPECTed with a score under its threshold: a risk flag forced it (score --policy), not the model. Both
        are written rounded alike, so a score the model INSPECTed never reads under its threshold."""
        return self.decision != "RELEASE" and not self.failed and self.threshold is not None \
            and self.score < self.threshold


def _none(v: str | None) -> str | None:
    v = (v or "").strip()
    return v or None


def load_truth(src: str | Path) -> tuple[list[Truth], Path]:
    """Truth rows from a manifest.csv, a folder with one, or a normal/ + anomalous/ folder."""
    src = Path(src)
    manifest = src / "manifest.csv" if src.is_dir() else src
    if manifest.is_file():
        root = manifest.parent
        out = []
        rows = read_rows(manifest)
        split = any(_none(r.get("split")) for r in rows)   # then an empty cell is train, as training reads it
        for r in rows:
            cargo = next((_none(r.get(c)) for c in CARGO_COLUMNS if _none(r.get(c))), None)
            label = label_of(r, manifest)
            out.append(Truth(on_disk(root / r["path"]).resolve(), r["path"], label, boxes_of(r, manifest),
                             on_disk(root / r["mask"]).resolve() if _none(r.get("mask")) else None,
                             (_none(r.get("anomaly_type")) or "anomaly") if label == 1 else None, cargo,
                             SPLIT_ALIASES.get((_none(r.get("split")) or "train").lower(), "") if split else "",
                             pitch_of(r, manifest)))
        one_row_per_file(manifest, [(f"row {r['_row']}: ", t.rel, t.path) for r, t in zip(rows, out)])
        return out, manifest
    if src.is_dir() and has_layout(src):
        out = [Truth(p.resolve(), p.relative_to(src).as_posix(), label, mask=m.resolve() if m else None,
                     anomaly_type="anomaly" if label else None) for p, label, m in layout_files(src)]
        one_row_per_file(src, [("", t.rel, t.path) for t in out])
        return out, src
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such dataset folder or manifest.csv")
    raise FileNotFoundError(f"{src}: {not_a_dataset(src)}")


def _regions(text: str | None) -> list:
    """A regions cell: a JSON list of {"box": [x0, y0, x1, y1], "score": s} ([] when empty). Anything else (a
    hand-edited cell, another tool's format) raises ValueError here rather than a TypeError deep in the localisation."""
    if not _none(text):
        return []
    regions = json.loads(text)
    number = lambda v: isinstance(v, (int, float))  # noqa: E731
    if not (isinstance(regions, list) and all(
            isinstance(r, dict) and isinstance(r.get("box"), list) and len(r["box"]) == 4 and all(map(number, r["box"]))
            and number(r.get("score")) for r in regions)):
        raise ValueError(f"regions {text[:60]!r} is not a JSON list of {{\"box\": [x0, y0, x1, y1], \"score\": s}}")
    return regions


def load_results(path: str | Path) -> list[Result]:
    """Rows of a results CSV written by `detector score` (or saved again by a spreadsheet, byte-order mark and all)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such results file (`detector score SCANS --model M --out {path}` "
                                "writes one)")
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "score", "decision", "error"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a results CSV (missing {sorted(missing)})")
        out = []
        for r in reader:
            if not r.get("path"):
                continue
            if None in (r[k] for k in reader.fieldnames):   # columns missing at the end: not a short score cell
                raise ValueError(f"{path}: row {reader.line_num} is cut off after {r['path']!r} (a `detector score` "
                                 "interrupted or still running?): run the same score command to complete it")
            try:
                score = float(r["score"]) if _none(r.get("score")) else float("nan")
                threshold = float(r["threshold"]) if _none(r.get("threshold")) else None
                regions = _regions(r.get("regions"))
            except ValueError as e:   # a hand-edited or cut row: say which
                raise ValueError(f"{path}: row {reader.line_num}: {e}") from None
            out.append(Result(r["path"], score, (r.get("decision") or "INSPECT").strip(), threshold, regions,
                              (r.get("error") or "").strip(), reader.line_num))
    return out


def match(results: list[Result], truth: list[Truth], results_dir: Path) -> tuple[list[tuple[Result, Truth]], list[Result], list[Truth]]:
    """Pairs by resolved path (then by the truth's relative path as a path suffix, either separator: a CSV scored
    on a Windows station reads D:\\data\\images\\a.tiff, and names no file here or a copy of the truth's);
    also the results without truth and the truth without results. Two rows for one scan raise ValueError:
    a CSV holding two runs (another model's rows appended) would otherwise be judged on whichever came first."""
    by_path = {_key(t.path): t for t in truth}   # as `detector score` writes a name that is not UTF-8
    by_rel = {_key(Path(t.rel).as_posix()): t for t in truth}
    pairs, orphans, used = [], [], {}
    for r in results:
        p = Path(r.path)
        cands = [p] if p.is_absolute() else [Path.cwd() / p, results_dir / p]
        t = next((by_path[k] for c in cands if (k := _key(c.resolve())) in by_path), None)
        if t is None:
            parts = [q for q in re.split(r"[\\/]", _key(r.path)) if q not in ("", ".")]
            t = next((by_rel[s] for k in range(len(parts)) if (s := "/".join(parts[k:])) in by_rel), None)
            t = t if t is None or _scored_elsewhere(cands, t.path) else None
        if t is None:
            orphans.append(r)
            continue
        if id(t) in used:
            raise ValueError(f"rows {used[id(t)]} and {r.row} both give a result for {t.rel} (two runs or models "
                             "in one CSV?): keep one row per scan")
        used[id(t)] = r.row
        pairs.append((r, t))
    return pairs, orphans, [t for t in truth if id(t) not in used]


def _scored_elsewhere(cands: list[Path], truth: Path) -> bool:
    """Whether a result matched to `truth` by its relative name alone can be its scan: its path names no file here
    (scored on another machine), or a copy of it (same size and first 64 KiB). Another file here is another truck:
    scanners name files by sequence, so each day's folder holds a scans/0001.tiff."""
    here = next((c for c in cands if c.is_file()), None)
    if here is None:
        return True
    try:
        if here.stat().st_size != truth.stat().st_size:
            return False
        with open(here, "rb") as a, open(truth, "rb") as b:
            return a.read(1 << 16) == b.read(1 << 16)
    except OSError:
        return False


def _key(path: str | Path) -> str:
    """A path as results and truth are matched by: as `detector score` writes it (shown), its Unicode composed (NFC),
    since a Mac's file names decompose ü (NFD) where a manifest typed elsewhere composes it."""
    return unicodedata.normalize("NFC", shown(path))


def scored_by(results: str | Path) -> dict | None:
    """{"path", "sha256"} of the model that scored a results CSV, from the routing file `detector score` writes
    beside it (None without one): a report names the model it judges."""
    from detector.score import routing_file
    try:
        routing = json.loads(routing_file(Path(results)).read_text(encoding="utf-8"))
        return {"path": str(routing["model"]), "sha256": str(routing["model_sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _truth_boxes(t: Truth) -> list:
    return placed_truth(t)[0]


def placed_truth(t: Truth) -> tuple[list, str | None]:
    """The true boxes of a truth entry in the file's pixels (where a result's regions are), and why they cannot place
    its anomaly (None when they can): a mask missing, unreadable, of another size than the scan (drawn on a zoomed
    view) or marking no pixel, boxes that cover no pixel of it (another pixel unit). Training refuses each of these;
    scored as they were, they made localisation misses or were dropped without a word. Boxes are cut to the scan, as
    training cuts them. A mask at the size the reader squares a scan of non-square pixels to (which training required
    before) is carried back to the file's pixels."""
    g = file_geometry(t.path, t.pitch_mm)   # the row's pitch: the header read as the scan was scored
    hw = None if g is None else (g.file_height, g.file_width)
    if t.boxes:
        if hw is None:
            return [list(b) for b in t.boxes], None
        inside = [_clip(b, hw) for b in t.boxes if _clipped(b, hw)]   # a box past the edge is judged on the scan
        return (inside, None) if inside else \
            ([], f"{t.rel}: box {list(t.boxes[0])} covers no pixel of the {hw[1]}x{hw[0]} scan")
    if t.mask is None:
        return [], None
    try:   # at its own bit depth: a 16-bit mask read as grey (divided by 256) lost its boxes
        mask = read_mask(t.mask) if t.mask.is_file() else None
    except ScanError as e:
        return [], f"{shown(t.mask)}: {e.reason}"
    if mask is None:
        return [], f"{shown(t.mask)}: mask file not found (named for {t.rel})"
    squared = None if g is None else (g.height, g.width)
    if hw is not None and mask.shape != hw and mask.shape != squared:
        also = f" ({squared[1]}x{squared[0]} once its pixels are squared)" if squared != hw else ""
        return [], f"{shown(t.mask)}: mask is {mask.shape[1]}x{mask.shape[0]}, scan is {hw[1]}x{hw[0]}{also}"
    boxes = M.mask_boxes(mask)
    if not boxes:   # an export that lost the drawing: training refuses it
        return [], f"{shown(t.mask)}: mask marks no pixel (of anomalous {t.rel})"
    if hw is not None and mask.shape == squared != hw:
        boxes = [map_box(b, squared, hw) for b in boxes]
    return boxes, None


def _clip(box: list, hw: tuple) -> list:
    """A [x0, y0, x1, y1] box cut to a scan of hw = (height, width, ...), as training cuts it: a box dragged past the
    edge counted the air beyond it in its IoU."""
    return [max(0, box[0]), max(0, box[1]), min(hw[1], box[2]), min(hw[0], box[3])]


def _clipped(box: list, hw: tuple) -> bool:
    """Whether a [x0, y0, x1, y1] box keeps a pixel once clipped to a scan of hw = (height, width, ...), as training
    clips it."""
    x0, y0, x1, y1 = _clip(box, hw)
    return x1 > x0 and y1 > y0


def _by(pairs, key) -> dict:
    """The pairs of each value of key(truth) (a falsy one left out), in the values' order, each in the pairs' order:
    one pass, where a pass per value made eval quadratic in an archive's cargo classes."""
    groups: dict = {}
    for r, t in pairs:
        value = key(t)
        if value:
            groups.setdefault(value, []).append((r, t))
    return dict(sorted(groups.items()))


def _group(groups: dict) -> dict:
    """Metrics per group of pairs (`_by`): counts, AUROC, recorded decision rates, detection at 1%."""
    out = {}
    for value, sub in groups.items():
        y = np.array([t.label for _, t in sub])
        s = np.array([r.score for r, _ in sub])
        f = np.array([r.failed for r, _ in sub])
        summ = M.summary(y, np.where(f, 0.0, s), f, [r.decision for r, _ in sub])
        out[value] = {"n": summ["n"], "n_normal": summ["n_normal"], "n_anomalous": summ["n_anomalous"],
                      "auroc": summ["auroc"], "ap": summ["ap"],
                      "detection_rate": summ["decisions"]["detection_rate"],
                      "false_alarm_rate": summ["decisions"]["false_alarm_rate"]}
    return out


def evaluate(results_path: str | Path, truth_src: str | Path, out_dir: str | Path, thumbs: bool = True,
             baseline: str | Path | None = None) -> dict:
    """Compute metrics, write metrics.json, roc.png, hist.png and report.html; return the metrics. With a baseline's
    results on the same truth, also the paired comparison with it (eval_baseline: metrics.json's `comparison`)."""
    from detector import report
    out_dir = Path(out_dir)
    results = load_results(results_path)
    truth, truth_file = load_truth(truth_src)
    try:
        pairs, orphans, missing = match(results, truth, Path(results_path).resolve().parent)
    except ValueError as e:
        raise ValueError(f"{results_path}: {e}") from None
    if not pairs:
        raise ValueError(f"no result in {results_path} matches a scan of {truth_file}")
    base = None if baseline is None else eval_baseline.load(baseline, truth, truth_file)
    out_dir.mkdir(parents=True, exist_ok=True)   # only once the inputs are good: a mistake leaves no empty report/
    y = np.array([t.label for _, t in pairs])
    f = np.array([r.failed for r, _ in pairs])
    s = np.where(f, 0.0, np.array([r.score for r, _ in pairs]))
    overall = M.summary(y, s, f, [r.decision for r, _ in pairs])
    # how far another test set of this size could move the figures (failed rows count as INSPECT in both)
    overall["intervals"] = M.intervals(y, s, f)
    notes = []
    if orphans:
        notes.append(f"{len(orphans)} result rows have no truth and were left out (listed in the report)")
    if missing:
        notes.append(f"{len(missing)} truth scans have no result row (not scored) and were left out (listed in the "
                     "report)")
    learnt = sum(t.split in ("train", "val") for _, t in pairs)
    if learnt:
        notes.append(f"{learnt} of the {len(pairs)} scans are in the train or val split of the truth's manifest: a "
                     "model trained on it learnt from them or set its thresholds on them, so its figures are "
                     "optimistic (score the test split's scans alone, e.g. from a .txt list, to judge it)")
    if f.any():
        fa, fn = int((f & (y == 1)).sum()), int((f & (y == 0)).sum())
        notes.append(f"{int(f.sum())} scans failed to score: counted as INSPECT (fail-closed), so {fa} of the "
                     f"detections and {fn} of the false alarms are failures, not scores")

    # operating threshold of the 1% false-alarm point, applied per group
    t1 = overall["detection_at_far"][0]["threshold"]
    types = np.array([t.anomaly_type or "" for _, t in pairs], dtype=object)   # read once: a mask per type below
    by_type = _group(_by(pairs, lambda t: t.anomaly_type))
    for k, v in by_type.items():  # each anomaly type against all normals
        sel = (y == 0) | (types == k)
        yy, ff, ss = y[sel], f[sel], s[sel]
        v.update(n=int(sel.sum()), n_normal=int((yy == 0).sum()), auroc=M.auroc(yy, ss, ff),
                 ap=M.average_precision(yy, ss, ff),
                 detection_at_1pct=None if t1 is None else M.rates_at(yy, ss, t1, ff)[0])
    cargos = _by(pairs, lambda t: t.cargo)
    by_cargo = _group(cargos)
    for k, v in by_cargo.items():
        sub = cargos[k]
        ff = np.array([r.failed for r, _ in sub])
        ss = np.where(ff, 0.0, np.array([r.score for r, _ in sub]))
        v["detection_at_1pct"] = None if t1 is None else M.rates_at([t.label for _, t in sub], ss, t1, ff)[0]

    ious, loc_rows, unplaced = [], [], []
    forced = sum(t.label == 1 and r.forced for r, t in pairs)
    for r, t in pairs:
        if t.label == 1 and not r.failed and r.decision != "RELEASE" and not r.forced:   # the model's detections
            boxes, why = placed_truth(t)
            if why:
                unplaced.append(why)
                continue
            v = M.best_iou(r.regions, boxes)
            ious.append(v)
            if v is not None:
                loc_rows.append({"path": r.path, "iou": v})
    loc = M.localisation(ious)
    loc["truth_from"] = "manifest boxes, else connected components of the mask"
    if unplaced:
        notes.append(f"{len(unplaced)} detected anomalies whose truth cannot place the anomaly are left out of the "
                     f"localisation: {'; '.join(unplaced[:3])}{'; ...' if len(unplaced) > 3 else ''}")
    if forced:
        notes.append(f"{forced} anomalies INSPECTed under their threshold (a risk flag forced it) are left out of the "
                     "localisation: the model detected nothing there")
    no_truth = sum(v is None for v in ious)
    if loc["n"] == 0 and not unplaced:
        notes.append("no detected anomaly has a true box or mask: localisation not measured")
    elif no_truth:   # labelled anomalies alone: the figure is over the others
        notes.append(f"{no_truth} detected anomalies have no true box or mask: left out of the localisation "
                     f"(measured on {loc['n']})")

    # absolute: a report is read later, from another folder
    m = {"results": shown(Path(results_path).resolve()), "truth": shown(truth_file.resolve()),
         "model": scored_by(results_path), "overall": overall, "localisation": loc,
         "by_anomaly_type": by_type, "by_cargo": by_cargo, "notes": notes,
         "failures": [{"path": r.path, "label": t.label, "error": r.error or "no score"} for r, t in pairs if r.failed],
         "unmatched_results": len(orphans), "unscored_truth": len(missing),
         "unscored": [shown(t.rel) for t in missing], "unmatched": [r.path for r in orphans]}   # which, to score them
    if base is not None:
        m["comparison"] = eval_baseline.compare(pairs, *base, truth, results_path, baseline)
    with replacing(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(m, indent=2), encoding="utf-8")

    images = {}
    curves = {}
    pts = M.roc_points(y, s, f)
    if pts is not None:
        curves[f"all (AUROC {overall['auroc']:.3f})"] = pts
        for k in by_type if len(by_type) > 1 else []:
            sel = (y == 0) | (types == k)
            p = M.roc_points(y[sel], s[sel], f[sel])
            if p is not None:
                curves[f"{k} ({by_type[k]['auroc']:.3f})"] = p
        marks = [(row["achieved_rate"], row["detection_rate"], f"{row['false_alarm_rate']:.1%} FA")
                 for row in overall["detection_at_far"] if row["detection_rate"] is not None]
        routed = overall.get("decisions") or {}
        if routed.get("false_alarm_rate") is not None and routed.get("detection_rate") is not None:
            marks.append((routed["false_alarm_rate"], routed["detection_rate"], "as routed (model threshold)"))
        images["roc"] = report.plot_roc(curves, out_dir / "roc.png", marks)
    else:   # one class, no curve: an earlier run's roc.png in this folder would pass for this one's
        (out_dir / "roc.png").unlink(missing_ok=True)
    if base is None or (roc := eval_baseline.plot(m["comparison"], pairs, base[0], out_dir)) is None:
        (out_dir / eval_baseline.FILE).unlink(missing_ok=True)   # an earlier comparison's would pass for this one's
    else:
        images["comparison"] = roc
    thr = [r.threshold for r, _ in pairs if r.threshold is not None]
    lines = [(float(np.median(thr)), "model threshold")] if thr else []
    images["histogram"] = report.plot_histogram(s[(y == 0) & ~f], s[(y == 1) & ~f], out_dir / "hist.png", lines)

    sections = {}
    if thumbs:
        misses = sorted([(r, t) for r, t in pairs if t.label == 1 and not r.failed and r.decision == "RELEASE"],
                        key=lambda p: p[0].score)[:N_THUMBS]
        alarms = sorted([(r, t) for r, t in pairs if t.label == 0 and not r.failed and r.decision != "RELEASE"],
                        key=lambda p: -p[0].score)[:N_THUMBS]
        sections["Worst misses (anomalous, released, lowest scores)"] = [_thumb(r, t) for r, t in misses]
        sections["Worst false alarms (normal, inspected, highest scores)"] = [_thumb(r, t) for r, t in alarms]
    report.html_report(out_dir / "report.html", m, images, sections)
    return m


def _thumb(r: Result, t: Truth):
    """A rendered scan with predicted (solid red) and true (dashed green) boxes, and its caption."""
    import warnings

    from detector import report
    from detector.scan import ScanWarning, read_scan
    # named by its path in the dataset: two sites' 0001.tiff are two trucks
    cap = f"{shown(t.rel)}: score {r.score:.3f}" + (f", {t.anomaly_type}" if t.anomaly_type else "") \
        + (f", cargo {t.cargo}" if t.cargo else "")
    try:
        with warnings.catch_warnings():     # a conversion was reported when the scan was scored
            warnings.simplefilter("ignore", ScanWarning)
            scan = read_scan(t.path, default_pitch_mm=t.pitch_mm)
    except Exception as e:
        return np.full((60, 400, 3), 200, np.uint8), f"{cap} (could not render: {e})"
    grids = file_shape(scan), (scan.height, scan.width)   # regions and truth in the file's pixels, drawn on the scan's
    regions = [{**region, "box": map_box(region["box"], *grids)} for region in r.regions]
    img = report.render(scan.attenuation, regions=regions, truth_boxes=[map_box(b, *grids) for b in _truth_boxes(t)],
                        banner=report.verdict_banner(r.decision, r.score, r.threshold), flagged=r.decision != "RELEASE",
                        max_w=1200, max_h=360)
    return img, cap


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def detection_phrase(overall: dict) -> str:
    """'detection 40.0% at 1% false alarms' from a metric block, or the rate it was measured at when 1 % is out of
    reach (normal scans saturated at 1.0 read 'detection 100.0% at 1%' for a model inspecting every truck)."""
    if not overall.get("detection_at_far"):
        return "detection n/a"
    first = overall["detection_at_far"][0]
    far = f"{first['false_alarm_rate']:.0%}"
    if first["achieved_rate"] is not None and first["achieved_rate"] > first["false_alarm_rate"]:
        far = f"{first['achieved_rate']:.1%} false alarms ({far} not reachable: see the notes)"
    else:
        far += " false alarms"
    return f"detection {_pct(first['detection_rate'])} at {far}"


def main(args) -> int:
    """CLI entry: evaluate and print a one-line summary."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"detector eval: --out {args.out} is a file: give a folder for {', '.join(OUTPUTS[:-1])} and "
              f"{OUTPUTS[-1]}", file=sys.stderr)
        return 2
    try:
        m = evaluate(args.results, args.truth, args.out, baseline=getattr(args, "baseline", None))
    except (FileNotFoundError, ValueError) as e:
        print(f"detector eval: {e}", file=sys.stderr)
        return 2
    o = m["overall"]
    auroc = "n/a" if o["auroc"] is None else f"{o['auroc']:.4f}"
    ci = o["intervals"]["auroc"]
    if ci:
        auroc += f" (95% {ci[0]:.3f}-{ci[1]:.3f})"
    c = m.get("comparison")
    for note in o["notes"] + m["notes"] + (c["notes"] if c else []):
        print(f"note: {note}", file=sys.stderr)
    files = ", ".join(n for n in (*OUTPUTS, eval_baseline.FILE) if (Path(args.out) / n).is_file())
    vs = f"; {eval_baseline.headline(c)}" if c else ""
    print(f"evaluated {o['n']} scans ({o['n_normal']} normal, {o['n_anomalous']} anomalous, {o['n_failed']} failed): "
          f"AUROC {auroc}, {detection_phrase(o)}, localisation {_pct(m['localisation']['hit_rate'])} "
          f"(IoU>=0.1){vs} -> {Path(args.out)}/ ({files})")
    return 0
