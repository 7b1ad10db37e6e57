"""Pictures for people: windowed scan views, overlays, ROC/histogram plots, the HTML report.

Scans are shown like a radiograph viewer: the high-energy attenuation (already a log of the
transmission) windowed between robust percentiles, air bright and dense cargo dark. Drawing uses
OpenCV (fast enough for one overlay per scan); plots use matplotlib with the Agg backend.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from detector.atomic import replacing
from detector.calibration import score_digits, threshold_texts

RED, GREEN, YELLOW = (40, 40, 230), (60, 200, 60), (0, 215, 255)  # BGR
MAX_WIDTH, MAX_HEIGHT = 2400, 800  # overlays of long scans are downscaled to fit
ROWS_SHOWN = 100       # rows of a report table of scans (failed, unscored, unmatched); metrics.json holds them all
THUMB_KEY = ("In the pictures below, solid red boxes are the model's regions (with their score) and dashed green "
             "boxes the true anomaly.")
JSON_SHOWN = 20000     # characters of metrics.json the report shows


def window(att: np.ndarray, floor: float = 2.0, k: float = 20.0) -> np.ndarray:
    """uint8 greyscale of one attenuation channel (H, W), like a radiograph viewer: attenuation
    (the log of the transmission) windowed from the air level to the densest material, then a log
    curve so thin walls and light cargo keep their contrast next to wheels and engine blocks."""
    a = np.asarray(att, dtype=np.float32)
    sample = a[:: max(1, a.shape[0] // 256), :: max(1, a.shape[1] // 512)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    hi = max(float(hi), lo + floor)
    v = np.log1p(k * np.clip((a - lo) / (hi - lo), 0.0, 1.0)) / np.log1p(k)
    return (255.0 * (1.0 - v)).astype(np.uint8)  # air bright, dense dark


def fit_scale(h: int, w: int, max_w: int = MAX_WIDTH, max_h: int = MAX_HEIGHT) -> float:
    """Factor (<= 1) that fits an h x w scan in the display box, keeping the aspect ratio."""
    return min(1.0, max_w / max(w, 1), max_h / max(h, 1))


def scan_view(att: np.ndarray, scale: float) -> np.ndarray:
    """BGR uint8 view of the scan's first (high-energy) channel, resized by `scale`."""
    ch = att[0] if att.ndim == 3 else att
    if scale < 1.0:
        ch = cv2.resize(ch, (max(1, round(ch.shape[1] * scale)), max(1, round(ch.shape[0] * scale))),
                        interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(window(ch), cv2.COLOR_GRAY2BGR)


def _box(img: np.ndarray, box: Sequence[float], scale: float, color, label: str | None = None,
         dashed: bool = False) -> None:
    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    t = max(1, round(min(img.shape[:2]) / 250))
    x1, y1 = max(x0 + 1, x1 - 1), max(y0 + 1, y1 - 1)
    if dashed:
        _dashed_rect(img, (x0, y0), (x1, y1), color, t)
    else:
        cv2.rectangle(img, (x0, y0), (x1, y1), color, t, cv2.LINE_AA)
    if label:
        _label(img, label, x0, y0, color)


def _label(img: np.ndarray, label: str, x0: int, y0: int, color) -> None:
    """A region's score above its box's corner, moved left where it would run off the picture's right edge (a region
    at the truck's end lost its score there)."""
    fs = max(0.45, img.shape[1] / 2400)
    thick = max(1, round(fs))
    tw = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, thick)[0][0]
    x = max(0, min(x0, img.shape[1] - tw - 2))
    cv2.putText(img, label, (x, max(int(14 * fs), y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, fs, color, thick, cv2.LINE_AA)


def _dashed_rect(img: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], color, t: int) -> None:
    """A rectangle drawn in dashes: the true box apart from the model's solid one by its line, not by green against
    red alone (the same colour to a red-green colour-blind officer)."""
    (x0, y0), (x1, y1), dash = p0, p1, max(4, 3 * t)
    for a, b in (((x0, y0), (x1, y0)), ((x0, y1), (x1, y1)), ((x0, y0), (x0, y1)), ((x1, y0), (x1, y1))):
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        for s in range(0, n + 1, 2 * dash):
            e = min(n, s + dash)
            cv2.line(img, (a[0] + (b[0] - a[0]) * s // max(n, 1), a[1] + (b[1] - a[1]) * s // max(n, 1)),
                     (a[0] + (b[0] - a[0]) * e // max(n, 1), a[1] + (b[1] - a[1]) * e // max(n, 1)), color, t)


BARS = {True: ((30, 30, 200), (255, 255, 255)), False: ((215, 215, 215), (30, 30, 30))}  # flagged: (bar, text) BGR


def banner_size(width: int) -> float:
    """Font scale of a banner on a picture `width` px wide: grows with it, so a 2400 px overlay that a viewer fits to a
    1920 px screen still shows its decision, score and threshold in letters about 20 px high (at a fixed 0.55 they
    were 9 px there)."""
    return max(0.55, width / 1800)


def _banner(img: np.ndarray, text: str, flagged: bool) -> np.ndarray:
    """The picture under a bar holding `text`, wrapped at its double spaces, and a line still too wide drawn smaller:
    in one line it was cut off on a narrow picture (a 256 px baggage scan lost its threshold and name).
    INSPECT is a dark red bar with hazard stripes, RELEASE a light grey one: red against dark grey differed in hue
    alone (grey levels 81 and 60), the same bar to a red-green colour-blind officer or on a monochrome monitor."""
    font, size, room = cv2.FONT_HERSHEY_SIMPLEX, banner_size(img.shape[1]), img.shape[1] - 12
    thick = max(1, round(1.6 * size))
    width = lambda t: cv2.getTextSize(t, font, size, thick)[0][0]  # noqa: E731
    lines: list[str] = []
    for part in text.split("  "):
        if lines and width(f"{lines[-1]}  {part}") <= room:
            lines[-1] += f"  {part}"
        else:
            lines.append(part)
    fill, ink = BARS[bool(flagged)]
    step = round(40 * size)                  # 22 px a line at the smallest size
    bar = np.full((step * len(lines) + round(11 * size), img.shape[1], 3), fill, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(bar, line, (6, round(34.5 * size) + step * i), font, min(size, size * room / max(1, width(line))),
                    ink, thick, cv2.LINE_AA)
    if not flagged:   # a light bar above the scan's light air: a dark edge sets it apart
        bar[-2:] = (90, 90, 90)
    else:
        _hazard(bar, 6 + max(width(line) for line in lines) + bar.shape[0])
    return np.vstack([bar, img])


def _hazard(bar: np.ndarray, x0: int) -> None:
    """Yellow and black diagonal stripes over the bar from column x0 on: an alarm seen at a glance in any colour."""
    h, w = bar.shape[:2]
    if w - x0 < 2 * h:
        return
    yy, xx = np.mgrid[0:h, x0:w]
    bar[:, x0:w] = np.where((((xx + yy) // max(4, h // 2)) % 2 == 0)[..., None], YELLOW, (0, 0, 0))


def render(att: np.ndarray, *, regions: Iterable[dict] = (), heatmap: np.ndarray | None = None,
           truth_boxes: Iterable[Sequence[float]] = (), banner: str | None = None, flagged: bool = False,
           max_w: int = MAX_WIDTH, max_h: int = MAX_HEIGHT) -> np.ndarray:
    """BGR picture of a scan: windowed greyscale, heatmap blended in colour where it is high,
    predicted regions (solid red, with score), true boxes (dashed green), and an optional banner on top."""
    h, w = att.shape[-2:]
    scale = fit_scale(h, w, max_w, max_h)
    img = scan_view(att, scale)
    if heatmap is not None and np.size(heatmap):
        hm = np.asarray(heatmap, np.float32).squeeze()
        hm = cv2.resize(hm, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
        # red (0.5) to yellow (1): bright enough to show over dark, dense cargo
        colour = cv2.applyColorMap((255 * np.clip(hm, 0, 1)).astype(np.uint8), cv2.COLORMAP_AUTUMN)
        alpha = (0.6 * np.clip((hm - 0.2) / 0.6, 0, 1))[..., None]  # only confident cells tint the scan
        img = (img * (1 - alpha) + colour * alpha).astype(np.uint8)
    for b in truth_boxes:
        _box(img, b, scale, GREEN, dashed=True)
    for r in regions:
        _box(img, r["box"], scale, RED, f"{r['score']:.2f}")
    return _banner(img, banner, flagged) if banner else img


def verdict_banner(decision: str, score: float | None, threshold: float | None, extra: str = "") -> str:
    """One line: decision, score and threshold (and a reason or a name)."""
    d = 3 if score is None or threshold is None else score_digits(score, threshold, 3)
    s = "-" if score is None or score != score else f"{score:.{d}f}"
    t = "-" if threshold is None or threshold != threshold else f"{threshold:.{d}f}"
    return f"{decision}  score {s}  threshold {t}" + (f"  {extra}" if extra else "")


def write_png(path: str | Path, img: np.ndarray) -> Path:
    """Write an image, creating its folder, through a hidden temporary file renamed into place: a failed write (disk
    full) or a kill mid-write never leaves a cut-off picture that passes for a drawn one. Encoded by OpenCV, written
    by Python: cv2.imwrite crashed the process (a segmentation fault) on a file name that is not UTF-8."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", img)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path


def png_data_uri(img_or_path) -> str:
    """data: URI of a PNG (from a BGR array or a file), for a self-contained HTML page."""
    if isinstance(img_or_path, np.ndarray):
        ok, buf = cv2.imencode(".png", img_or_path)
        data = buf.tobytes()
    else:
        data = Path(img_or_path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plain(text: str) -> str:
    """Text for a plot drawn as written: matplotlib reads the span between two `$` as a formula, and an anomaly
    type named like `cash $_{x$` raised there, ending eval before its report was written."""
    return str(text).replace("$", r"\$")


def merged_marks(marks: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Operating points with one label each where several fall on one point: a confident model's 0.1 %, 0.5 % and 1 %
    points coincide, and their labels drawn over one another read '0.3% FA'."""
    at: dict[tuple[float, float], list[str]] = {}
    for far, det, label in marks:
        at.setdefault((round(max(far, 1e-4), 6), round(det, 6)), []).append(label)
    return [(far, det, ", ".join(labels)) for (far, det), labels in at.items()]


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
             marks: Sequence[tuple[float, float, str]] = (), title: str = "ROC", dashed: Sequence[str] = ()) -> Path:
    """ROC (detection vs false-alarm rate, log x so the 0.1-1% operating range is visible), operating points marked as
    black rings; the curves named in `dashed` drawn dashed (a baseline beside a new model, apart in any colour)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for name, (far, det) in curves.items():
        ax.plot(np.maximum(far, 1e-4), det, lw=1.6, label=_plain(name), drawstyle="steps-post",
                ls="--" if name in dashed else "-")
    for far, det, label in merged_marks(marks):
        ax.plot([max(far, 1e-4)], [det], "o", ms=6, color="k", mfc="white", mew=1.5, zorder=3)
        ax.annotate(_plain(label), (max(far, 1e-4), det), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-alarm rate (normal scans inspected)")
    ax.set_ylabel("detection rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(_plain(title))
    return _save_figure(plt, fig, path)


def plot_histogram(normal: np.ndarray, anomalous: np.ndarray, path: str | Path,
                   thresholds: Sequence[tuple[float, str]] = ()) -> Path:
    """Score histograms of normal and anomalous scans, with threshold lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    bins = np.linspace(0, 1, 41)
    if len(normal):
        ax.hist(np.clip(normal, 0, 1), bins=bins, alpha=0.6, label=f"normal (n={len(normal)})", color="tab:blue")
    if len(anomalous):
        ax.hist(np.clip(anomalous, 0, 1), bins=bins, alpha=0.6, label=f"anomalous (n={len(anomalous)})",
                color="tab:red")
    for t, label in thresholds:
        ax.axvline(t, color="k", ls="--", lw=1)
        ax.text(t, ax.get_ylim()[1] * 0.95, " " + _plain(label), fontsize=8, va="top")
    if len(normal) + len(anomalous) > 200:  # long tails matter at low false-alarm rates
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
    ax.set_xlabel("score")
    ax.set_ylabel("scans")
    if len(normal) or len(anomalous):   # nothing scored (all failed): an empty legend only warns
        ax.legend(fontsize=8)
    ax.set_title("Score distribution")
    return _save_figure(plt, fig, path)


def _save_figure(plt, fig, path: str | Path) -> Path:
    """Lay out, write and close a figure (closing keeps long batch runs from piling up figures)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:] or None)   # the format the name says, not the temporary's
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.3g}"
    return html.escape(str(v))


def _first(rows: Sequence) -> str:
    """The heading's word on a table cut to its first ROWS_SHOWN rows ('' when whole)."""
    return f"; the first {ROWS_SHOWN} shown, all in metrics.json" if len(rows) > ROWS_SHOWN else ""


def _thresholds_apart(rows: Sequence[dict]) -> list[dict]:
    """Rows whose thresholds are text with the decimals that keep them apart (calibration.threshold_texts): at 4,
    a confident model's 1 % and 0.1 % thresholds both read 1.0000."""
    known = [r for r in rows if isinstance(r.get("threshold"), float)]
    texts = dict(zip(map(id, known), threshold_texts(*(r["threshold"] for r in known))))
    return [{**r, "threshold": texts[id(r)]} if id(r) in texts else r for r in rows]


def _table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
.thumbs figure{display:inline-block;margin:6px;vertical-align:top}.thumbs img{max-width:680px;border:1px solid #999}
figcaption{font-size:12px;max-width:680px;word-break:break-all}.note{color:#a60}code{font-size:12px}"""


def _model(model: dict | None) -> str:
    """The model a report judges, as its header names it."""
    if not model:
        return "model: unknown (no routing file beside the results)"
    return f"model: <code>{html.escape(model['path'])}</code> (sha256 {html.escape(model['sha256'][:12])})"


FIGURES = {"auroc": "AUROC", "ap": "AP", "detection_at_1pct": "detection at 1% false alarms",
           "detection_at_0.5pct": "detection at 0.5% false alarms", "detection_at_0.1pct": "detection at 0.1% false alarms",
           "shipped_detection": "detection as shipped (own threshold)",
           "shipped_false_alarm": "false alarms as shipped (own threshold)"}


def _comparison(c: dict, roc: str | Path | None) -> str:
    """The report's section on new against baseline: the paired figures, what was left out, the misses at 1 %."""
    span = lambda f: "n/a" if f["low"] is None else f"{f['low']:+.4f} .. {f['high']:+.4f}"  # noqa: E731
    rows = [{"figure": FIGURES.get(k, k), "baseline": f["baseline"], "new": f["new"],
             "new - baseline": None if f["difference"] is None else f"{f['difference']:+.4f}",
             "95% interval": span(f), "new ahead in": None if f["p_new_ahead"] is None else f"{f['p_new_ahead']:.0%}",
             "better": f["better"]} for k, f in c["figures"].items()]
    base = c["baseline"]
    parts = ["<h2>Against the baseline</h2>",
             f"<p>baseline: <code>{html.escape(base['results'])}</code> &middot; {_model(base['model'])}. Paired over "
             f"the {c['n']} scans both scored ({c['n_normal']} normal, {c['n_anomalous']} anomalous): both models "
             f"resampled on the same {c['resamples']} test sets (seed {c['seed']}), so the test set's luck cancels; "
             "an interval that excludes 0 is a real difference.</p>",
             _table(rows, ["figure", "baseline", "new", "new - baseline", "95% interval", "new ahead in", "better"]),
             _table([c["left_out"]], list(c["left_out"]))]
    miss = c.get("misses_at_1pct")
    if miss:
        parts.append(f"<p>Anomalies missed at 1% false alarms (each model at its own threshold): new "
                     f"{miss['new']}, baseline {miss['baseline']}, both {miss['both']}; missed by the new model and "
                     f"found by the baseline {len(miss['new_only'])}, the reverse {len(miss['baseline_only'])} "
                     "(listed in metrics.json).</p>")
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in c.get("notes", [])]
    if roc:
        parts.append(f"<img alt='ROC, new and baseline' src='{png_data_uri(roc)}'>")
    return "".join(parts)


def html_report(path: str | Path, metrics: dict, images: dict[str, str | Path],
                thumbs: dict[str, list[tuple[np.ndarray, str]]], title: str = "detector evaluation") -> Path:
    """Write a self-contained HTML page: metric tables, plots and thumbnails, all inlined."""
    m = metrics
    ov = m["overall"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>results: <code>{html.escape(str(m.get('results', '')))}</code> &middot; truth: "
             f"<code>{html.escape(str(m.get('truth', '')))}</code> &middot; {_model(m.get('model'))}</p>"]
    ci = ov.get("intervals") or {}
    span = lambda v: "n/a" if not v else f"{v[0]:.3f} - {v[1]:.3f}"  # noqa: E731
    parts.append("<h2>Summary</h2>" + _table([{
        "scans": ov["n"], "normal": ov["n_normal"], "anomalous": ov["n_anomalous"], "failed": ov["n_failed"],
        "AUROC": ov["auroc"], "AUROC 95% interval": span(ci.get("auroc")), "AP": ov["ap"],
        "detection at 1%, 95% interval": span(ci.get("detection_at_1pct"))}],
        ["scans", "normal", "anomalous", "failed", "AUROC", "AUROC 95% interval", "AP",
         "detection at 1%, 95% interval"]))
    for note in ov.get("notes", []) + m.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    if m.get("comparison"):
        parts.append(_comparison(m["comparison"], images.get("comparison")))
    parts.append("<h2>Detection at a fixed false-alarm rate</h2>" + _table(
        _thresholds_apart(ov["detection_at_far"]),
        ["false_alarm_rate", "threshold", "detection_rate", "achieved_rate", "resolvable"]))
    parts.append("<h2>False alarms at a fixed detection rate</h2>" + _table(
        _thresholds_apart(ov["far_at_detection"]),
        ["detection_rate", "threshold", "false_alarm_rate", "achieved_detection"]))
    if "decisions" in ov:
        parts.append("<h2>Recorded decisions (as scored; failures count as INSPECT)</h2>" + _table(
            [ov["decisions"]], ["inspected", "detection_rate", "false_alarm_rate", "tp", "fn", "fp", "tn"]))
    loc = m.get("localisation")
    if loc:
        parts.append("<h2>Localisation</h2><p>Detected anomalies whose best region overlaps a true box "
                     f"(hit: {html.escape(loc['criterion'])}; overlap: IoU &gt; 0).</p>"
                     + _table([loc], ["n", "criterion", "hit_rate", "overlap_rate", "mean_iou"]))
    for key, name in (("by_anomaly_type", "anomaly type"), ("by_cargo", "cargo class")):
        if m.get(key):
            rows = [{name: k, **v} for k, v in m[key].items()]
            parts.append(f"<h2>By {name}</h2>" + _table(
                rows, [name, "n", "n_normal", "n_anomalous", "auroc", "detection_at_1pct", "detection_rate",
                       "false_alarm_rate"]))
    if m.get("failures"):
        parts.append(f"<h2>Failed scans ({len(m['failures'])}, counted as INSPECT{_first(m['failures'])})</h2>"
                     + _table(m["failures"][:ROWS_SHOWN], ["path", "label", "error"]))
    for key, name in (("unscored", "Truth scans without a result"), ("unmatched", "Result rows without truth")):
        if m.get(key):
            parts.append(f"<h2>{name} ({len(m[key])}, left out{_first(m[key])})</h2>"
                         + _table([{"path": p} for p in m[key][:ROWS_SHOWN]], ["path"]))
    parts.append("<h2>Plots</h2>" + "".join(
        f"<img alt='{html.escape(k)}' src='{png_data_uri(p)}'> " for k, p in images.items() if k != "comparison"))
    if any(thumbs.values()):
        parts.append(f"<p>{THUMB_KEY}</p>")
    for section, items in thumbs.items():
        parts.append(f"<h2>{html.escape(section)}</h2>")
        if not items:
            parts.append("<p>none</p>")
            continue
        parts.append("<div class='thumbs'>" + "".join(
            f"<figure><img src='{png_data_uri(img)}'><figcaption>{html.escape(cap)}</figcaption></figure>"
            for img, cap in items) + "</div>")
    dump = json.dumps(m, indent=1)
    cut = (f"\n... (the first {JSON_SHOWN:,} of {len(dump):,} characters: the whole is metrics.json beside this report)"
           if len(dump) > JSON_SHOWN else "")
    parts.append("<h2>metrics.json</h2><pre>" + html.escape(dump[:JSON_SHOWN] + cut) + "</pre>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path
