"""The `score` verb: stream a folder (glob, list, manifest) of scans through the model -> results CSV.

Decoding runs in a few threads ahead of inference through a bounded window of pending reads, so
memory stays flat whatever the number of files: at most `workers + 2` decoded scans wait at once and
no heatmap outlives its row. Every input file gets exactly one row, failures included (decision
INSPECT, fail-closed, with the reason). Rows are flushed as they are written, which makes a run
resumable: re-running skips the paths already in the output (`--retry-failed` scores the failed ones again).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from detector.atomic import replacing
from detector.bundle import rule_words, unrecorded_rule
from detector.manifest import dataset_above, has_labels, has_layout, shown
from detector.policy import load_policy
from detector.scan import (DEFAULT_PITCH_MM, SCAN_SUFFIXES, ScanError, file_shape, map_box, read_scan,
                           summarised_scan_warnings)
from detector.sources import Item, discover, drop_overlays, remove_overlay

COLUMNS = ("path", "score", "decision", "threshold", "regions", "latency_ms", "error")
def _result_rows(out: Path) -> list[list[str]]:
    """The complete rows of a results CSV, header left out ([] when there is no file or only a header)."""
    if not out.is_file() or out.stat().st_size == 0:
        return []
    with open(out, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        if tuple(header) != COLUMNS:
            raise ValueError(f"{out}: not a results CSV (header {header}); use --no-resume or another --out")
        return [row for row in reader if len(row) == len(COLUMNS)]


def done_paths(out: Path) -> set[str]:
    """Paths already in a results CSV (complete rows only), for resuming."""
    return {row[0] for row in _result_rows(out)}


def drop_failed_rows(out: Path, jsonl: Path | None, listed: set[str]) -> int:
    """Remove the failed rows (non-empty error) of the files this run lists (`listed`: as the CSV names them) from a
    results CSV, and their lines from its JSON lines, so that the run scores those files again (a scan still being
    copied, a share that was down); returns how many. Another manifest's failed rows stay: no run scores them again."""
    failed = {r[0] for r in _result_rows(out) if r[-1] and r[0] in listed}
    _drop_paths(out, jsonl, failed, failed)
    return len(failed)


def match_jsonl(out: Path, jsonl: Path, listed: set[str]) -> int:
    """Make a results CSV and its JSON lines hold the same files before a resume. A run killed between a file's
    row and its line left the row without the line, and resuming never wrote it: such rows of the files this run
    lists (`listed`) are removed (the files are scored again), as are lines without a row; returns how many rows.
    Rows before the first one with a line are left alone: those were scored before --jsonl was first given, not cut
    short; so are the rows of files this run does not list (another manifest's), which it would not score again."""
    if not (out.is_file() and jsonl.is_file() and jsonl.stat().st_size):
        return 0
    _cut_partial_line(jsonl)
    rows = [r[0] for r in _result_rows(out)]
    in_jsonl = {_jsonl_path(ln) for ln in jsonl.read_text(encoding="utf-8").splitlines()}
    first = next((i for i, path in enumerate(rows) if path in in_jsonl), len(rows))
    unmatched = {path for path in rows[first:] if path not in in_jsonl and path in listed}
    _drop_paths(out, jsonl, unmatched, in_jsonl - set(rows))
    return len(unmatched)


def match_overlays(out: Path, jsonl: Path | None, names: dict[Path, Path], flagged_only: bool) -> int:
    """Before a resume with --overlays, remove the rows (and JSON lines) whose overlay is missing or empty, so that
    those files are scored and drawn again; returns how many. Overlays are drawn behind the rows: a run killed
    (kill -9, a power cut) left its last rows without one, and resuming never drew them. Failed rows, and RELEASE
    ones with `flagged_only`, have none to miss; rows before the first one with its overlay are left alone, as
    match_jsonl leaves them: those were scored before --overlays was first given."""
    png = {shown(p): dest for p, dest in names.items()}   # rows name their files as shown() writes them
    wanted = [r[0] for r in _result_rows(out)
              if not r[-1] and not (flagged_only and r[2] == "RELEASE") and r[0] in png]
    drawn = [_drawn(png[path]) for path in wanted]
    first = drawn.index(True) if True in drawn else len(wanted)
    lost = {path for path, ok in zip(wanted[first:], drawn[first:]) if not ok}
    _drop_paths(out, jsonl, lost, lost)
    return len(lost)


def _drawn(png: Path) -> bool:
    try:
        return png.stat().st_size > 0
    except OSError:
        return False


def _drop_paths(out: Path, jsonl: Path | None, rows: set, lines: set) -> None:
    """Remove the CSV rows of the paths in `rows` and the JSON lines of those in `lines`. Each file is rewritten
    to a temporary one and swapped in: a crash leaves the old one whole."""
    if rows:
        kept = [r for r in _result_rows(out) if r[0] not in rows]
        with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows(kept)
    if lines and jsonl is not None and jsonl.is_file():
        text = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
        with replacing(jsonl) as tmp:
            tmp.write_text("".join(ln for ln in text if _jsonl_path(ln) not in lines), encoding="utf-8")


def routing_file(out: Path) -> Path:
    """Beside a results CSV: the model (SHA-256) and thresholds its rows were routed with."""
    return out.with_name(out.name + ".routing.json")


def lock_file(out: Path) -> Path:
    """Beside a results CSV: the lock a run holds while it writes it."""
    return out.with_name(out.name + ".lock")


def own_files(out: Path, jsonl: Path | None) -> set[Path]:
    """The files a run writes besides overlays (resolved): never its input, whatever SRC names (a glob like
    scans/* with the results in scans/ scored them as failed trucks, and exited 1 when they were all that was new)."""
    return {p.resolve() for p in (out, lock_file(out), routing_file(out), jsonl) if p is not None}


def hold_lock(path: Path, busy: str):
    """An exclusive lock on the file `path` for this process: the open file, whose closing (or the process ending,
    however it ends) releases it; BlockingIOError(`busy`) when another process holds it."""
    f = open(path, "a+b")
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise BlockingIOError(busy) from None
    return f


def lock_results(out: Path):
    """Hold `out` for this run through a lock on `out.lock` (hold_lock); BlockingIOError when another run holds it.
    Two runs appending to one CSV scored the same files twice, rows that `detector eval` then refused."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return hold_lock(lock_file(out), f"{out} is being written by another `detector score` (lock {lock_file(out)}): "
                                     "wait for it to end, or give another --out")


def row_pitches(items: list[Item]) -> dict:
    """{"row_pitch_mm": {path as the CSV writes it: pitch}} of the items whose manifest row gives their file's pitch,
    for the routing file; {} where none does (the routing file of a run without the column is as it was)."""
    rows = {shown(i.path): i.pitch_mm for i in items if i.pitch_mm is not None}
    return {"row_pitch_mm": rows} if rows else {}


def _repitched_row(out: Path, before: dict, now: dict, listed: set[str]) -> tuple[str, float, float] | None:
    """The first scored row of `out` that this run lists (`listed`: its files as the CSV names them) and would read at
    another pitch than it was (its manifest row's pitch_mm added, changed or gone, the default the same), with the
    pitch it was scored with and the one it gives now; None if none. A row this run does not list is neither scored
    nor kept by it (a second manifest into one CSV). A failed row has no score to keep: a cell mended after it failed
    is scored again by --retry-failed."""
    was, will = before.get("row_pitch_mm") or {}, now.get("row_pitch_mm") or {}
    if was == will:
        return None
    for p in (r[0] for r in _result_rows(out) if not r[-1] and r[0] in listed):
        then, given = was.get(p, before["default_pitch_mm"]), will.get(p, now.get("default_pitch_mm"))
        if then != given:
            return p, then, given
    return None


def _pitch_words(path: str, routing: dict) -> str:
    """How a routing gives a row its pitch: its manifest row's pitch_mm cell, else the default for untagged files."""
    rows = routing.get("row_pitch_mm") or {}
    if path in rows:
        return f"{rows[path]:g} mm (its manifest row's pitch_mm)"
    return f"{routing.get('default_pitch_mm', DEFAULT_PITCH_MM):g} mm (no pitch_mm cell: the default for files without one)"


def check_same_routing(out: Path, routing: dict, listed: set[str], unrecorded: str | None = None) -> None:
    """ValueError when resuming `out` would add rows routed by another model or other thresholds than the rows
    already in it, scored by another rule, or read at another pitch for files without one (--pitch-mm, or a row's
    pitch_mm for a row already scored that this run lists; `listed`: its files as the CSV names them): one CSV, one
    routing (a CSV from before the routing file is resumed as it is). `unrecorded`: the rule of rows scored before
    the rule was recorded (bundle.unrecorded_rule; None: unknown, an INT8 bundle's)."""
    f = routing_file(out)
    if not (out.is_file() and f.is_file()):
        return
    try:
        before = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        return
    now = json.loads(json.dumps(routing))   # as it would read back
    before.setdefault("default_pitch_mm", DEFAULT_PITCH_MM)   # rows from before it was recorded: read at 5 mm
    before.setdefault("score_rule", unrecorded)
    differ = [k for k in ("model_sha256", "thresholds", "force_flags", "default_pitch_mm", "score_rule")
              if before.get(k) != now.get(k, before.get(k))]
    if differ == ["score_rule"]:
        raise ValueError(f"{out} holds rows scored {rule_words(before['score_rule'])}, and this bundle's scores are "
                         f"now {rule_words(now['score_rule'])}; resuming would mix them: use --no-resume or "
                         "another --out")
    if differ:
        what = (f"model {before.get('model')} (sha256 {str(before.get('model_sha256'))[:12]})"
                if "model_sha256" in differ else f"other {' and '.join(differ)} ({f})")
        raise ValueError(f"{out} holds rows routed with {what}; resuming would mix them: use --no-resume or "
                         "another --out")
    row = _repitched_row(out, before, now, listed)
    if row is not None:
        raise ValueError(f"{out} holds the row of {row[0]} scored at {_pitch_words(row[0], before)}; this "
                         f"run gives it {_pitch_words(row[0], now)} ({f}); resuming would keep a row read at another "
                         "pitch: use --no-resume or another --out")


def _unrecorded_rule(inspector) -> str | None:
    """The rule of the bundle's scores that record none (bundle.unrecorded_rule); None where it is unknown."""
    try:
        return unrecorded_rule(inspector.path.read_bytes())
    except OSError:
        return None


def kept_row_pitches(out: Path, routing: dict, listed: set[str], done: set[str]) -> dict:
    """`routing` with the row pitches of the rows in `out` (`done`: done_paths) that this run does not list carried
    over from its routing file: a second manifest into one CSV keeps the first one's rows, and a later resume must
    know their pitches."""
    try:
        before = json.loads(routing_file(out).read_text(encoding="utf-8")).get("row_pitch_mm") or {}
    except (OSError, ValueError, AttributeError):
        return routing
    kept = {p: v for p, v in before.items() if p in done and p not in listed}
    rows = {**kept, **(routing.get("row_pitch_mm") or {})}
    return {**routing, "row_pitch_mm": rows} if rows else routing


def _jsonl_path(line: str) -> str | None:
    try:
        return json.loads(line).get("path")
    except (ValueError, AttributeError):
        return None


def _cut_partial_line(path: Path) -> None:
    """Drop a last line cut off by a crash (everything after the last newline). Completing it with a newline
    instead could leave an open quote that swallows the next row."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                f.truncate(pos - step + i + 1)
                return
            pos -= step
        f.truncate(0)


def _open_append(path: Path, header: Iterable[str] | None):
    """Open for appending, dropping a last line cut off by a crash; write the header if new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        _cut_partial_line(path)
    fresh = not path.exists() or path.stat().st_size == 0
    f = open(path, "a", newline="", encoding="utf-8")
    if fresh and header is not None:
        csv.writer(f).writerow(header)
        f.flush()
    return f


def _reason(e: BaseException) -> str:
    """A failed row's error: the reason alone where the exception names the file, which the row's path names."""
    from detector.runtime import InspectionError
    if isinstance(e, ScanError) and getattr(e, "reason", None):
        return str(e.reason)
    if isinstance(e, InspectionError) and e.path is not None:   # the height refusal: a judgement of this scan
        return e.reason
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, (ScanError, ValueError, OSError)) else f"{type(e).__name__}: {text}"


def _load(item: Item, default_pitch_mm: float | None = None) -> tuple[Item, Any, str | None, float]:
    """Read one item's scan (a file without a pitch at its manifest row's pitch_mm, else `default_pitch_mm`):
    (item, scan, error, milliseconds)."""
    t0 = time.perf_counter()
    if item.error:
        return item, None, item.error, 0.0
    try:
        scan = read_scan(item.path, default_pitch_mm=default_pitch_mm if item.pitch_mm is None else item.pitch_mm)
        scan.counts = None  # the raw counts are only for lossless write-back: free them early
        return item, scan, None, (time.perf_counter() - t0) * 1e3
    except Exception as e:  # any bad file becomes a failed row, never a crash
        return item, None, _reason(e), (time.perf_counter() - t0) * 1e3


def _load_policy(path: str | None, inspector):
    """detector.policy's Policy from YAML (None: the built-in one: the inspector's threshold, any risk flag
    forces INSPECT), bound to the model's calibration (tier -> threshold)."""
    policy = load_policy(path)
    policy.bind(inspector)
    return policy


def _decide(policy, score: float | None, item: Item, error: str | None) -> tuple[str, float | None, str]:
    """(decision, threshold, reason) from the policy for this item's tier and risk flags."""
    d = policy.decide(score, item.tier, item.risk_flags, **({"error": error} if error else {}))
    return d if isinstance(d, tuple) else (d.decision, d.threshold, d.reason)


def _overlay_name(path: Path, root: Path | None) -> Path:
    """A scan's overlay below the overlays folder; a `..` its path keeps (up from a linked folder) becomes `_up_`:
    the overlay stays in the folder, apart from the scan's namesake there."""
    try:
        rel = path.relative_to(root) if root else Path(path.name)
    except ValueError:
        rel = Path(path.name)
    return Path(*("_up_" if part == ".." else part for part in rel.parts)).with_suffix(".png")


def overlay_paths(items: list[Item], overlays: Path) -> dict[Path, Path]:
    """Overlay PNG of each scan: its path below the scans' common folder, .png for its suffix (x/a.tiff ->
    overlays/x/a.png). Scans whose PNG would be one file (a.tiff and a.npy) or an input scan itself (PNG scans with
    --overlays on their own folder) keep their whole name (a.tiff.png): one truck's overlay never replaces
    another's, nor a scan. Chosen among all of a run's items, so a resumed run names them as the first did."""
    root = Path(os.path.commonpath([str(i.path.parent) for i in items])) if items else None
    where = overlays.resolve()   # compared with the scans' folders resolved: a scan there may be a link to keep
    short = {i.path: where / _overlay_name(i.path, root) for i in items}
    folders = {f: f.resolve() for f in {i.path.parent for i in items}}   # once per folder, not per file
    inputs = {folders[i.path.parent] / i.path.name for i in items} | {i.real for i in items}
    seen = Counter(short.values())
    return {p: d.with_name(p.name + ".png") if seen[d] > 1 or d in inputs else d for p, d in short.items()}


def _write_overlay(dest: Path, scan, verdict, decision: str, threshold: float | None,
                   forced: str | None = None) -> str | None:
    """Draw one overlay PNG; returns an error text instead of raising (a picture never stops a run). The picture is
    the scan's attenuation, so the regions (in the file's pixels) are drawn mapped to its grid. `forced`: why the
    truck is inspected though it scored under its threshold (a risk flag), written on the banner before its name."""
    from detector import report
    try:
        grids = file_shape(scan), (scan.height, scan.width)
        regions = [{"box": map_box(r.box, *grids), "score": float(r.score)} for r in verdict.regions]
        extra = f"{forced}  {shown(dest.stem)}" if forced else shown(dest.stem)
        img = report.render(scan.attenuation, regions=regions, heatmap=verdict.heatmap,
                            banner=report.verdict_banner(decision, verdict.score, threshold, extra),
                            flagged=decision != "RELEASE")
        report.write_png(dest, img)
        return None
    except Exception as e:
        return f"overlay {dest}: {_reason(e)}"


def _csv_fields(row: dict) -> list[str]:
    """A result row in the CSV contract's column order and formats. Score and threshold keep 9 decimals (float32's
    resolution near 1): at 6, saturated scores of clean and anomalous trucks tied at 1.000000 in `detector eval`,
    and a score could print equal to a threshold it was released under."""
    return [row["path"], "" if row["score"] is None else f"{row['score']:.9f}", row["decision"],
            "" if row["threshold"] is None else f"{row['threshold']:.9f}",
            json.dumps(row["regions"], separators=(",", ":")), f"{row['latency_ms']:.1f}",
            row["error"].replace("\n", " ")]


SHOWN_FAILURES, SHOWN_OVERLAY_ERRORS = 10, 5   # the summary's lines; the error column has every failure


@dataclass
class Counts:
    """A run's counts and the first few failures and overlays not written: all of them held ~200 bytes each for the
    whole run, which on an archive of millions of files with a share down grew without bound."""
    scanned: int = 0
    flagged: int = 0
    failed: int = 0
    overlays_missing: int = 0
    failures: list[str] = field(default_factory=list)
    overlay_errors: list[str] = field(default_factory=list)


def score_items(items: list[Item], inspector, out: Path, *, jsonl: Path | None = None,
                overlays: Path | None = None, overlays_flagged: bool = False, policy=None,
                threshold: float | None = None, workers: int = 2, progress: bool = True,
                on_row: Callable[[dict], None] | None = None, run_items: list[Item] | None = None) -> Counts:
    """Score items in order, appending one row per item to `out` (and `jsonl`), as they finish. Routing is
    `policy`'s, else the built-in one at `threshold` (else the inspector's): a risk flag forces INSPECT.
    Overlay names are chosen among `run_items` (all of the run's files, when `items` is what a resume has left)."""
    from tqdm import tqdm
    if policy is None:
        policy = _load_policy(None, inspector)
        if threshold is not None:
            policy.thresholds[policy.default_tier] = threshold
    elif threshold is not None:
        raise ValueError("score_items: give a policy or a threshold, not both (the policy's tiers set it)")
    counts = Counts()
    names = overlay_paths(run_items or items, overlays) if overlays else {}
    files = ExitStack()
    f = files.enter_context(_open_append(out, COLUMNS))
    writer = csv.writer(f)
    fj = files.enter_context(_open_append(jsonl, None)) if jsonl else None
    depth = workers + 2  # decoded scans waiting for inference: bounds memory
    pending: deque[Future] = deque()
    drawing: deque[Future] = deque()
    todo = iter(items)
    pitch = getattr(inspector, "default_pitch_mm", None)   # the Inspector's, as it reads a file itself
    bar = tqdm(total=len(items), unit="scan", disable=None if progress else True, file=sys.stderr)
    with files, ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="overlay") as painter:
        def fill() -> None:
            while len(pending) < depth:
                item = next(todo, None)
                if item is None:
                    return
                pending.append(pool.submit(_load, item, pitch))

        fill()
        while pending:
            item, scan, error, load_ms = pending.popleft().result()
            fill()
            verdict, decision, thr = None, "INSPECT", None
            t0 = time.perf_counter()
            if scan is not None:
                try:
                    # the tier's threshold, as the service passes it: the regions are cut at or under it
                    verdict = inspector.inspect(scan, threshold=policy.threshold_for(item.tier))
                    decision, thr, why = _decide(policy, verdict.score, item, None)
                except Exception as e:  # fail-closed: the row says why
                    error, verdict = _reason(e), None
            if error:  # INSPECT regardless; the row still shows the tier's threshold
                try:
                    thr = _decide(policy, None, item, error)[1]
                except Exception:
                    pass
            infer_ms = (time.perf_counter() - t0) * 1e3
            regions = [] if verdict is None else [
                {"box": [int(v) for v in r.box], "score": round(float(r.score), 4)} for r in verdict.regions]
            row = {"path": shown(item.path), "score": None if verdict is None else float(verdict.score),
                   "decision": decision if error is None else "INSPECT", "threshold": thr,
                   "regions": regions, "latency_ms": load_ms + infer_ms, "error": shown(error or "")}
            draw = overlays and not error and (row["decision"] != "RELEASE" or not overlays_flagged)
            while draw and len(drawing) >= 2:  # bound the scans waiting to be drawn; waited for before the row is
                _note(counts, drawing.popleft().result())   # written, so a stop here never leaves it without one
            writer.writerow(_csv_fields(row))
            f.flush()
            if draw:   # an INSPECT under its threshold (a risk flag forced it) shows why on the picture
                forced = why if row["decision"] == "INSPECT" and thr is not None and verdict.score < thr else None
                drawing.append(painter.submit(_write_overlay, names[item.path],
                                              scan, verdict, row["decision"], thr, forced))
            elif overlays:   # an earlier run's picture of this truck would contradict its row now
                remove_overlay(names[item.path])
            if fj:
                extra = {"tier": item.tier, "risk_flags": item.risk_flags,
                         "reason": error or (why if verdict is not None else None)}
                if verdict is not None:
                    extra.update(timings_ms=getattr(verdict, "timings_ms", None),
                                 model_sha256=getattr(verdict, "model_sha256", None))
                fj.write(json.dumps({**row, **extra}, default=str) + "\n")
                fj.flush()
            counts.scanned += 1
            counts.flagged += row["decision"] != "RELEASE"
            if error:
                counts.failed += 1
                if len(counts.failures) < SHOWN_FAILURES:
                    counts.failures.append(f"{item.path}: {error}")
            if on_row:
                on_row(row)
            del scan, verdict
            bar.update(1)
        for d in drawing:
            _note(counts, d.result())
    bar.close()
    return counts


def _note(counts: Counts, overlay_error: str | None) -> None:
    if overlay_error:
        counts.overlays_missing += 1
        if len(counts.overlay_errors) < SHOWN_OVERLAY_ERRORS:
            counts.overlay_errors.append(overlay_error)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a service manager, `timeout`, `kill`) stops a run as Ctrl-C does: overlays in flight are drawn and
    the files closed. By default it ended the process at once, and rows already written lost their overlays for
    good (a resumed run skips those rows)."""
    if threading.current_thread() is not threading.main_thread():   # signals are only for the main thread
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt
    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(args) -> int:
    """CLI entry: discover, resume, score, summarise. Exit 1 only when nothing could be scored."""
    from detector.runtime import InspectionError, Inspector, valid_default_pitch, valid_threshold
    out = Path(args.out)
    if out.is_dir():
        print(f"detector score: --out {out} is a folder: give the results file, e.g. {out / 'results.csv'}",
              file=sys.stderr)
        return 2
    for flag in ("workers", "threads"):   # 0 or none: the default
        if (getattr(args, flag, None) or 0) < 0:
            print(f"detector score: --{flag} must be a count (0 for the default), got {getattr(args, flag)}",
                  file=sys.stderr)
            return 2
    bad = _bad_coco_options(args)
    if bad:
        print(f"detector score: {bad}", file=sys.stderr)
        return 2
    unlisted: list[str] = []   # folders that cannot be listed: warned now, repeated after a long run
    try:
        items, how = discover(args.src, unlisted)
    except (FileNotFoundError, ValueError) as e:
        print(f"detector score: {e}", file=sys.stderr)
        return 2
    own = own_files(out, Path(args.jsonl) if args.jsonl else None)
    items = [i for i in items if i.real not in own]
    if args.overlays:
        items, skipped = drop_overlays(items, Path(args.overlays))
        if skipped:
            print(f"skipping {skipped} overlay PNG(s) already in {args.overlays}", file=sys.stderr)
    if not items:
        print(f"detector score: no scan files ({', '.join(SCAN_SUFFIXES)}) in {how}", file=sys.stderr)
        return 1
    if args.threshold is not None and args.policy:
        print("detector score: --threshold and --policy both set the threshold; the policy's tiers set it per "
              "truck: give one of them", file=sys.stderr)
        return 2
    if args.threshold is not None:   # the Inspector's own bound, checked before any scan: above 1 releases all
        try:
            valid_threshold(args.threshold)
        except InspectionError:
            print(f"detector score: --threshold must be in [0, 1] (scores lie in [0, 1]), got {args.threshold}",
                  file=sys.stderr)
            return 2
    try:
        valid_default_pitch(getattr(args, "pitch_mm", None))
    except InspectionError as e:
        print(f"detector score: --pitch-mm: {e}", file=sys.stderr)
        return 2
    try:
        inspector = Inspector(args.model, threads=args.threads, threshold=args.threshold,
                              default_pitch_mm=getattr(args, "pitch_mm", None))
        policy = _load_policy(args.policy, inspector)   # without --policy the built-in one, as serve's
    except Exception as e:
        print(f"detector score: {e}", file=sys.stderr)
        return 2
    routing = {"model": str(Path(args.model).resolve()), "model_sha256": inspector.model_sha256,
               "thresholds": policy.thresholds, "force_flags": policy.force_flags,
               "default_pitch_mm": inspector.default_pitch_mm, "score_rule": inspector.score_rule,
               **row_pitches(items)}
    try:
        lock = lock_results(out)
    except OSError as e:
        print(f"detector score: {e}", file=sys.stderr)
        return 2
    with lock:
        return _run(args, out, items, how, inspector, policy, routing, unlisted)


def _bad_coco_options(args) -> str | None:
    """Why --coco / --coco-min-score cannot be used as given (a folder, a score outside [0, 1]), else None."""
    coco, least = getattr(args, "coco", None), getattr(args, "coco_min_score", None)
    if coco and Path(coco).is_dir():
        return f"--coco {coco} is a folder: give the JSON file, e.g. {Path(coco) / 'preds.json'}"
    if least is not None and not coco:
        return "--coco-min-score applies to --coco: give both"
    if least is not None and not 0 <= least <= 1:
        return f"--coco-min-score must be in [0, 1] (region scores lie in [0, 1]), got {least}"
    return _bad_coco_images(args)


def _bad_coco_images(args) -> str | None:
    """Why --coco-images cannot be used as given, else None: without --coco, a file, or SRC's folder (its renderings
    would sit among the scans, a PNG scan's replaced) or a folder inside a scanned one (the next run scores them)."""
    images = getattr(args, "coco_images", None)
    if not images:
        return None
    if not getattr(args, "coco", None):
        return "--coco-images applies to --coco: give both"
    if Path(images).exists() and not Path(images).is_dir():
        return f"--coco-images {images} is a file: give a folder for the PNGs"
    from detector.preannotate import coco_root
    root, where = coco_root(args.src).resolve(), Path(images).resolve()
    scanned = Path(args.src).is_dir() or glob.has_magic(args.src)
    if where == root or (scanned and where.is_relative_to(root)):
        return (f"--coco-images {images} is {'SRC' if where == root else 'inside SRC'} ({root}): the renderings "
                f"would be {'scored as scans by the next run' if scanned else 'mixed with the scans'}: give a "
                f"folder of their own, e.g. {root.parent / (root.name + '_labelling')}")
    return None


def _write_coco(args, out: Path) -> str:
    """--coco: the regions of every scored row of `out` (a resumed run's earlier rows too) as a COCO JSON, written
    whole; the summary's words on it ('' without --coco). Failed rows have no regions and are left out."""
    from detector.preannotate import coco_root, write_coco
    root = coco_root(args.src)
    rows = _result_rows(out)
    images = Path(args.coco_images) if getattr(args, "coco_images", None) else None
    coco, left_out = write_coco(rows, Path(args.coco), root, getattr(args, "coco_min_score", None), images)
    for line in left_out[:SHOWN_FAILURES]:
        print(f"warning: --coco leaves out {line}", file=sys.stderr)
    failed = sum(1 for r in rows if r[-1])
    names = f"PNGs drawn in {images}, names relative to it" if images else f"file names relative to {root}"
    return (f"; {args.coco}: {len(coco['images'])} scans, {len(coco['annotations'])} boxes ({names}; {failed} "
            f"failed and {len(left_out)} unreadable scans left out)")


def _run(args, out: Path, items: list[Item], how: str, inspector, policy, routing: dict,
         unlisted: list[str]) -> int:
    """main's part under the results lock: resume, score, summarise (`unlisted`: folders discover could not list)."""
    from detector.cpus import usable_cpus
    jsonl = Path(args.jsonl) if args.jsonl else None
    if getattr(args, "no_resume", False):
        for p in (out, jsonl, routing_file(out)):
            if p and p.exists():
                p.unlink()
    listed = {shown(i.path) for i in items}
    redo = listed | {shown(i.real) for i in items}   # a row under a link's target (an earlier version's) is its row
    try:
        check_same_routing(out, routing, listed, _unrecorded_rule(inspector))
        if out.is_file():
            _cut_partial_line(out)   # a row cut off by a crash is scored again, not counted as done
            unmatched = match_jsonl(out, jsonl, redo) if jsonl is not None else 0
            if unmatched:
                print(f"scoring {unmatched} file(s) again: their rows in {out} have no line in {jsonl} (a run "
                      "stopped between the two)", file=sys.stderr)
            if args.overlays:
                lost = match_overlays(out, jsonl, overlay_paths(items, Path(args.overlays)), args.overlays_flagged)
                if lost:
                    print(f"scoring {lost} file(s) again: their rows in {out} have no overlay in {args.overlays} (a "
                          "run killed before drawing them)", file=sys.stderr)
        if getattr(args, "retry_failed", False):
            retried = drop_failed_rows(out, jsonl, redo)
            if retried:
                print(f"retrying {retried} failed file(s) from {out}", file=sys.stderr)
        done = done_paths(out)
        routing = kept_row_pitches(out, routing, listed, done)
    except ValueError as e:
        print(f"detector score: {e}", file=sys.stderr)
        return 2
    # a row under the file's resolved name (written before rows kept a link's own) is done too
    todo = [i for i in items if shown(i.path) not in done and shown(i.real) not in done]
    if done:
        print(f"resuming: {len(items) - len(todo)} of {len(items)} files already in {out}", file=sys.stderr)
    workers = args.workers or max(1, min(4, usable_cpus() - 1))
    t0 = time.perf_counter()
    converted: list[str] = []
    try:
        with replacing(routing_file(out)) as tmp:
            tmp.write_text(json.dumps(routing, indent=1) + "\n", encoding="utf-8")
        with summarised_scan_warnings(converted.append), _stop_on_sigterm():
            c = score_items(todo, inspector, out, jsonl=jsonl,
                            overlays=Path(args.overlays) if args.overlays else None,
                            overlays_flagged=args.overlays_flagged, policy=policy, workers=workers, run_items=items)
    except KeyboardInterrupt:
        print(f"interrupted: {len(done_paths(out))} of {len(items)} files in {out}; the same command resumes",
              file=sys.stderr)
        return 130
    except OSError as e:   # the results themselves (disk full, share gone): stop, keeping the rows written
        print(f"detector score: cannot write the results: {e}; the rows written so far are kept: fix that (make room, "
              "reconnect the share) and run the same command again to resume", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    try:
        coco = _write_coco(args, out) if getattr(args, "coco", None) else ""
    except OSError as e:
        print(f"detector score: cannot write --coco {args.coco}: {e}; the results in {out} are complete: fix that "
              "and run the same command again (it scores nothing more and writes it)", file=sys.stderr)
        return 2
    for line in converted:
        print(f"warning: {line}", file=sys.stderr)
    for line in c.failures:
        print(f"failed: {line}", file=sys.stderr)
    if c.failed > len(c.failures):
        print(f"... and {c.failed - len(c.failures)} more failures (see the error column)", file=sys.stderr)
    for line in c.overlay_errors:
        print(f"warning: {line}", file=sys.stderr)
    if c.overlays_missing > len(c.overlay_errors):
        print(f"... and {c.overlays_missing - len(c.overlay_errors)} more overlays not written", file=sys.stderr)
    if unlisted:   # warned before the run began, hours of progress bar ago: its summary says so again
        print(f"warning: {len(unlisted)} folder(s) could not be listed, their scans not scored (e.g. {unlisted[0]}): "
              "make them readable and run the same command again", file=sys.stderr)
    where = f"{out}" + (f", {args.jsonl}" if args.jsonl else "") + (f", overlays in {args.overlays}" if args.overlays else "")
    missing = f", {c.overlays_missing} overlays not written" if c.overlays_missing else ""
    missing += f", {len(unlisted)} folder(s) not listed" if unlisted else ""
    print(f"scanned {c.scanned} ({how}), flagged {c.flagged} INSPECT, failed {c.failed}{missing}, "
          f"{c.scanned / dt if dt > 0 else 0:.1f} scans/s -> {where}{coco}")
    src = Path(args.src)
    manifest = src / "manifest.csv" if src.is_dir() else src
    labelled = has_layout(src) or (manifest.suffix.lower() == ".csv" and manifest.is_file() and has_labels(manifest))
    above = None if labelled or not src.is_dir() else dataset_above(src)   # a dataset's images/ folder was scored
    truth = shlex.quote(str(args.src if labelled else above)) if labelled or above is not None else "DATA"
    print(f"next: detector eval {shlex.quote(str(out))} --truth {truth} --out report/")   # quoted: pasted into a shell
    return 1 if todo and c.scanned == c.failed else 0
