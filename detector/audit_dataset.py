"""The `manifest` verb's other source: a station's audit log (detector.audit, or its `audit export` CSV) with the
officers' outcomes, written as a dataset of its verified trucks (core; no torch).

Each verdict with an outcome becomes a row: its scan is found in the scanner's archive by content (the verdict's
file_sha256; files of its name are tried first, then the others are hashed once), label 1 where the inspection found
something, 0 where it was clear (the latest outcome per request counts, as everywhere). A truck without an outcome is
left out and counted: a released truck was never checked, so it is not known to be normal. A verdict whose scan the
archive lacks, or holds only with other content under its name, is left out; one scan served twice gives one row (its
latest outcome), an archive holding one scan twice one row; each of these is listed in left_out.csv with the reason.
"""
from __future__ import annotations

import csv
import io
import os
import sqlite3
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from detector.audit import OUTCOMES, parse_time
from detector.audit_report import (_LATEST, FORMULA_START, SQLITE_MAGIC, _head, _later, _number, _reader,
                                   is_audit_log)
from detector.bundle import file_sha256
from detector.labels_to_dataset import SHOWN, _write_csv, write_left_out
from detector.manifest import SPLIT_ALIASES, read_text, relative_name, shown
from detector.scan import SCAN_SUFFIXES, ScanError

FOUND, CLEAR = OUTCOMES
# manifest columns: those detector reads, then three for the lab that no step reads (manifest.COLUMNS lacks them, and
# misspelt_column takes none for one of its): the verdict's request_id (its row in the audit log), the decision served
# (a found truck that was RELEASEd is a miss) and the officer's note. The score is left out: a feature no model may learn
COLS = ("path", "label", "mask", "boxes", "anomaly_type", "pitch_mm", "request_id", "decision", "note")
TRAIN_NEXT = ("detector train --config configs/quick.yaml --data {out} --out runs/site --init SYNTH_RUN/best.ckpt "
              "data.normal_only=true optim.lr=0.001")
EVAL_NEXT = ("detector score {out}/manifest.csv --model LIVE.onnx --out {out}/live.csv && detector eval "
             "{out}/live.csv --truth {out} --out {out}/live_report")


@dataclass
class Verdict:
    request_id: str
    time: str
    file_name: str
    sha256: str
    size: int | None          # file_bytes; None where not recorded
    decision: str
    outcome: str | None       # the latest; None where none was recorded
    outcome_time: str
    outcome_id: int           # the outcomes table's id, which orders outcomes of one time; 0 from an export
    note: str
    pitch_mm: float | None    # the pitch the station read a file that carries none at (untagged_pitch_mm)


@dataclass
class Summary:
    verdicts: int = 0
    no_outcome: int = 0
    rows: list[dict] = field(default_factory=list)
    left_out: list[tuple[str, str, str]] = field(default_factory=list)   # (file, kind, why)

    def line(self, src: str, out: Path, window: str) -> str:
        """The one-line summary of the conversion."""
        found = sum(r["label"] for r in self.rows)
        kinds = ", ".join(f"{n} {k}" for k, n in Counter(k for _, k, _ in self.left_out).most_common())
        return (f"audit log {src}: {self.verdicts} verdicts{window}, {self.verdicts - self.no_outcome} with an outcome "
                f"-> {len(self.rows)} trucks ({len(self.rows) - found} cleared, {found} found); left out: "
                f"{self.no_outcome} without an outcome (never checked: not known normal), {len(self.left_out)} in "
                f"left_out.csv{f' ({kinds})' if kinds else ''} -> {out / 'manifest.csv'}")


def convert(src: str | Path, images: str | Path, out: str | Path, since: str | None = None,
            until: str | None = None, split: str | None = None, force: bool = False) -> Summary:
    """Write the verified trucks of the audit log `src` whose scans lie in the archive `images` as the dataset folder
    `out` (manifest.csv, left_out.csv)."""
    out = Path(out)
    if (out / "manifest.csv").exists() and not force:
        raise ScanError(out / "manifest.csv", "exists: pass --force to replace it, or another --out")
    if split is not None and split.strip().lower() not in SPLIT_ALIASES:
        raise ScanError(src, f"--split {split!r} is not one of {', '.join(sorted(SPLIT_ALIASES))}")
    if not Path(images).is_dir():
        raise ScanError(images, "no such --images folder (the scanner's archive)")
    verdicts = read_verdicts(src, since, until)
    checked = [v for v in verdicts if v.outcome]
    summary = Summary(len(verdicts), len(verdicts) - len(checked))
    if not checked:
        raise ScanError(src, f"none of its {len(verdicts)} verdicts{_window(since, until)} has an outcome: the station "
                             "records them with POST /v1/outcome (README, Recording inspection outcomes)")
    archive = Archive(Path(images))
    placed = archive.locate(checked)
    for sha, group in _by_scan(checked).items():
        _add(sorted(group, key=lambda v: (v.outcome_time, v.outcome_id)), placed.get(sha, []), archive, out, summary)
    if not summary.rows:
        raise ScanError(src, f"no verified truck's scan was found in {images} ({len(summary.left_out)} left out: "
                             f"{'; '.join(f'{f}: {w}' for f, _, w in summary.left_out[:3])})")
    _write(out, summary, split)
    return summary


def read_verdicts(src: str | Path, since: str | None, until: str | None) -> list[Verdict]:
    """The verdicts at or after `since` and before `until` (ISO, UTC if naive) with their latest outcomes, from an
    audit database or its `detector audit export` CSV, oldest first; ValueError for a time that is none."""
    start, end = (parse_time(t) if t else None for t in (since, until))
    src = Path(src)
    rows = _from_database(src) if _head(src).startswith(SQLITE_MAGIC) else _from_export(src)
    return [v for v in rows if (start is None or v.time >= start) and (end is None or v.time < end)]


def _from_database(src: Path) -> list[Verdict]:
    """Every verdict of an audit database with its latest outcome (read only: a service may be serving from it)."""
    db = _reader(src)
    try:
        pitch = _later(db)[0]   # untagged_pitch_mm, NULL in a database written before it
        rows = db.execute(f"SELECT v.request_id, v.time, v.file_name, v.file_sha256, v.file_bytes, v.decision, "
                          f"o.outcome, o.time, o.id, o.note, {pitch} FROM {_LATEST} ORDER BY v.time, v.id").fetchall()
    finally:
        db.close()
    return [Verdict(r[0], r[1], r[2] or "", (r[3] or "").lower(), r[4], r[5], r[6], r[7] or "", r[8] or 0,
                    r[9] or "", r[10]) for r in rows]


def _from_export(src: Path) -> list[Verdict]:
    """Every verdict of a `detector audit export` CSV (its text cells' formula guard taken off)."""
    reader = csv.DictReader(io.StringIO(read_text(src), newline=""))
    out = []
    for i, r in enumerate(reader, start=2):
        size, pitch = (_number(src, i, name, r.get(name)) for name in ("file_bytes", "untagged_pitch_mm"))
        out.append(Verdict(r["request_id"], r["time"], _text(r["file_name"]), r["file_sha256"].lower(),
                           None if size is None else int(size), r["decision"], r.get("outcome") or None,
                           r.get("outcome_time") or "", 0, _text(r.get("outcome_note") or ""), pitch))
    return out


def _text(cell: str) -> str:
    """An export's text cell as served: the export writes a ' before one that starts like a formula."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell


def _window(since: str | None, until: str | None) -> str:
    """' since T until T' as the summary names the verdicts' window."""
    return (f" since {parse_time(since)}" if since else "") + (f" until {parse_time(until)}" if until else "")


def _by_scan(verdicts: list[Verdict]) -> dict[str, list[Verdict]]:
    """The verdicts per scan (file_sha256; a verdict without one is a scan of its own, keyed by its request)."""
    groups: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        groups[v.sha256 or f"request {v.request_id}"].append(v)
    return groups


class Archive:
    """The scan files below a folder, indexed by name, each hashed at most once."""

    def __init__(self, root: Path):
        self.root = root
        self.files = _scan_files(root)
        self.named: dict[str, list[Path]] = defaultdict(list)
        for p in self.files:
            self.named[p.name].append(p)
        self.hashes: dict[Path, str] = {}

    def sha(self, path: Path) -> str:
        """The file's SHA-256 (hex), read in chunks; "" where it cannot be read."""
        if path not in self.hashes:
            self.hashes[path] = _sha256(path)
        return self.hashes[path]

    def of_name(self, file_name: str) -> list[Path]:
        """The archive's files of a served file's name (its last part: a client may send a path)."""
        return self.named.get(Path(file_name.replace("\\", "/")).name, []) if file_name else []

    def locate(self, verdicts: list[Verdict]) -> dict[str, list[Path]]:
        """The archive's files of each wanted file_sha256: first those of the served names, verified by their hash,
        then, for the hashes still wanted, every file not yet hashed whose size one of them was served at."""
        wanted = {v.sha256 for v in verdicts if v.sha256}
        placed: dict[str, list[Path]] = defaultdict(list)
        for p in sorted({p for v in verdicts if v.sha256 for p in self.of_name(v.file_name)}):
            if self.sha(p) in wanted:
                placed[self.sha(p)].append(p)
        rest = [v for v in verdicts if v.sha256 and v.sha256 not in placed]
        sizes = None if any(v.size is None for v in rest) else {v.size for v in rest}
        todo = [p for p in self.files if rest and p not in self.hashes and (sizes is None or _size(p) in sizes)]
        for p in _progress(todo, f"hashing {self.root}"):
            if self.sha(p) in wanted:
                placed[self.sha(p)].append(p)
        return placed


def _scan_files(root: Path) -> list[Path]:
    """The scan files below `root` (any depth; hidden names aside), sorted."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in SCAN_SUFFIXES]
    return sorted(out)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _sha256(path: Path) -> str:
    """A file's SHA-256 hex digest, streamed (bundle.file_sha256); "" where it cannot be read (it then matches no
    verdict)."""
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _progress(paths: list[Path], desc: str):
    """The paths with a progress bar over their bytes on a terminal (an archive can hold 100,000 scans)."""
    from tqdm import tqdm
    with tqdm(total=sum(max(0, _size(p)) for p in paths), unit="B", unit_scale=True, desc=desc, file=sys.stderr,
              disable=None if len(paths) >= 20 else True) as bar:
        for p in paths:
            yield p
            bar.update(max(0, _size(p)))


def _add(group: list[Verdict], files: list[Path], archive: Archive, out: Path, summary: Summary) -> None:
    """The row of one scan (its latest outcome counts where it was served more than once), or why it is left out."""
    v, earlier = group[-1], group[:-1]
    for e in earlier:
        summary.left_out.append((shown(e.file_name), "served again",
                                 f"request {e.request_id} ({e.outcome}) served the scan of request {v.request_id}, "
                                 f"whose later outcome ({v.outcome}) gives its one row"))
    if not v.sha256:
        summary.left_out.append((shown(v.file_name), "no file hash", f"request {v.request_id}: the verdict records "
                                                                     "no file_sha256 (no scan was received)"))
        return
    if not files:
        summary.left_out.append((shown(v.file_name), *_not_found(v, archive)))
        return
    for p in files[1:]:
        summary.left_out.append((shown(p), "duplicate file", f"the same scan as {shown(files[0])} (request "
                                                             f"{v.request_id}), which gives its one row"))
    summary.rows.append({"path": relative_name(files[0].resolve(), out.resolve()),
                         "label": int(v.outcome == FOUND), "mask": "", "boxes": "",
                         "anomaly_type": FOUND if v.outcome == FOUND else "none",
                         "pitch_mm": "" if v.pitch_mm is None else f"{v.pitch_mm:g}", "request_id": v.request_id,
                         "decision": v.decision, "note": f"'{v.note}" if v.note.startswith(FORMULA_START) else v.note})


def _not_found(v: Verdict, archive: Archive) -> tuple[str, str]:
    """(kind, why) of a verdict whose scan the archive does not hold."""
    served = f"request {v.request_id} ({v.outcome}, sha256 {v.sha256[:12]}..., {v.size} bytes)"
    same = archive.of_name(v.file_name)
    if same:
        return "hash mismatch", (f"{served}: {', '.join(shown(p) for p in same[:3])} bear(s) its name but other "
                                 "content (changed or re-exported since it was served), and no file holds its content")
    return "missing", f"{served}: no file in {shown(archive.root)} holds its content"


def _write(out: Path, summary: Summary, split: str | None) -> None:
    """manifest.csv (and left_out.csv, where anything was left out), each written whole."""
    cols = list(COLS) + (["split"] if split else [])
    rows = [{**r, "split": SPLIT_ALIASES[split.strip().lower()]} if split else r for r in summary.rows]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "manifest.csv", cols, rows)
    write_left_out(out, [{"file": f, "reason": f"{k}: {w}"} for f, k, w in summary.left_out])


def found_note(found: int) -> str:
    """How training treats the found trucks, which carry a label but no box or mask."""
    return (f"the {found} found trucks carry a label alone (no box, no mask): training leaves those larger than one "
            "training crop out of its train split (data.label_only_crops) and validates on them, where a label is "
            "enough; with data.normal_only=true it trains on the cleared trucks alone. To train on the finds, draw "
            "their boxes in a labelling tool and convert its export with `detector manifest`")


def main(args) -> int:
    """CLI entry for an audit log as SRC: convert, name what was left out, print the summary and the next commands."""
    if not is_audit_log(args.src):
        print(f"detector manifest: --since/--until select the verdicts of an audit log; {args.src} is none",
              file=sys.stderr)
        return 2
    wrong = [o for o, given in (("--format", args.format), ("--classes", args.classes),
                                ("--append", getattr(args, "append", False))) if given]
    if wrong or not args.images:
        print(f"detector manifest: {args.src} is an audit log: "
              + (f"{' and '.join(wrong)} apply to a labelling tool's export" if wrong else
                 "--images names the scanner's archive, where its scans are found by content"), file=sys.stderr)
        return 2
    try:
        [parse_time(t) for t in (args.since, args.until) if t]
    except ValueError as e:
        print(f"detector manifest: --since/--until is not an ISO date/time ({e})", file=sys.stderr)
        return 2
    try:   # the times were read above: a ValueError here (a ScanError is one) is the log's or the dataset's own
        s = convert(args.src, args.images, args.out, args.since, args.until, args.split, args.force)
    except (ValueError, OSError, sqlite3.DatabaseError) as e:
        print(f"detector manifest: {e}", file=sys.stderr)
        return 2
    for f, kind, why in s.left_out[:SHOWN]:
        print(f"warning: {f}: left out, {kind}: {why}", file=sys.stderr)
    if len(s.left_out) > SHOWN:
        print(f"warning: {len(s.left_out) - SHOWN} more left out: all in {Path(args.out) / 'left_out.csv'}",
              file=sys.stderr)
    found = sum(r["label"] for r in s.rows)
    if found:
        print(f"note: {found_note(found)}", file=sys.stderr)
    print(s.line(args.src, Path(args.out), _window(args.since, args.until)))
    print(f"next (the cleared traffic, fine-tuned from the synthetic model): {TRAIN_NEXT.format(out=args.out)}")
    print(f"next (the live model on these verified trucks): {EVAL_NEXT.format(out=args.out)}")
    return 0
