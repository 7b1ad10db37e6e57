"""The files a `detector score` run reads: a folder (its manifest.csv, else every scan file below it), a glob,
a .txt list or a manifest .csv, each file once, less the overlays an earlier run drew among them."""
from __future__ import annotations

import contextlib
import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from detector.manifest import absolute, on_disk, pitch_of, read_rows, read_text, shown
from detector.policy import parse_flags
from detector.formats import png_header
from detector.scan import SCAN_SUFFIXES, ScanError

SKIP_DIRS = {"masks"}  # dataset folders keep truth masks (PNG) beside the scans


@dataclass
class Item:
    """One file to score, with the routing inputs a manifest may carry; `error` marks a row that cannot
    be routed (e.g. unreadable risk flags): its scan is inspected with that reason. `path` is absolute as it was
    given (a link's own name: a station's folder of links into an archive shows its names), `real` the file it
    reaches (links resolved: one row per file, never a run's own output)."""
    path: Path
    tier: str | None = None
    risk_flags: list[str] = field(default_factory=list)
    error: str | None = None
    pitch_mm: float | None = None   # a manifest row's pitch_mm: its file's pitch where the file carries none
    real: Path | None = None        # None: `path` (an Item made by hand from a resolved path)

    def __post_init__(self) -> None:
        self.real = self.path if self.real is None else self.real


def given(path: Path, **routing) -> Item:
    """The item of a file as the user named it: absolute, links kept in its path and resolved in `real`."""
    return Item(absolute(path), real=path.resolve(), **routing)


def _item(path: Path, r: dict) -> Item:
    """One manifest row's item; an unreadable risk_flags or pitch_mm cell names its line in the file (r['_row'])."""
    item = given(on_disk(path.parent / r["path"]), tier=(r.get("tier") or "").strip() or None)
    try:
        item.risk_flags = parse_flags(r.get("risk_flags"))
    except ValueError as e:   # one bad cell inspects its own truck, not the whole batch
        item.error = f"{path} row {r['_row']}: unreadable risk_flags ({e})"
    try:
        item.pitch_mm = pitch_of(r, path)
    except ScanError as e:   # read at another pitch its truck would be judged at another size: inspected
        item.error = item.error or str(e)
    return item


def read_manifest(path: Path) -> list[Item]:
    """Items of a manifest.csv (column `path`, relative to its folder; optional tier, risk_flags, pitch_mm)."""
    return [_item(path, r) for r in read_rows(path, need=("path",))]


def discover(src: str, unlisted: list[str] | None = None) -> tuple[list[Item], str]:
    """The files named by SRC and a word on how they were found. SRC: a folder (its manifest.csv
    when present, else every scan file below it, skipping masks/), a glob, a .txt list or a .csv. The folders below
    it that cannot be listed are warned about and appended to `unlisted`, for a long run's summary to repeat."""
    items, how = _discover(src, [] if unlisted is None else unlisted)
    return unique(items), how


def unique(items: list[Item], named: int = 10) -> list[Item]:
    """Items less repeats of a file (a list naming it twice, a symlink beside its target), the first kept: one
    row per scan, where two made `detector eval` refuse the CSV. The warning names the first `named` names left out
    and the name each one's row has: an officer looks a truck up by the name in the folder. Where two rows route the
    file differently (tier, risk flags, pitch), the kept row fails and its truck is INSPECTed."""
    first: dict[Path, Item] = {}
    left = []   # (a name left out, the item its file is scored as)
    for i in items:
        kept = first.setdefault(i.real, i)
        if kept is not i:
            left.append((i, kept))
            differs = _routing_differs(kept, i)
            if differs and not kept.error:   # which row's routing holds is unknown: fail closed
                kept.error = (f"{shown(kept.path)} is named again as {shown(i.path)} with another {differs}: "
                              "which applies is unknown; list each scan once")
    if left:
        pairs = "; ".join(f"{shown(i.path)} again" if i.path == k.path else
                          f"{shown(i.path)} is the file of {shown(k.path)}" for i, k in left[:named])
        more = f"; and {len(left) - named} more" if len(left) > named else ""
        warnings.warn(f"{len(left)} names of files named more than once are scored once, each under its first "
                      f"name: {pairs}{more}")
    return list(first.values())


def _routing_differs(a: Item, b: Item) -> str:
    """What two rows naming one file route differently ('tier', 'risk_flags', 'pitch_mm'), '' when nothing: a
    second row's risk flags were dropped with it, and its truck could be RELEASEd under the first row's routing."""
    return ", ".join(name for name, x, y in (("tier", a.tier, b.tier), ("risk_flags", sorted(a.risk_flags),
                                             sorted(b.risk_flags)), ("pitch_mm", a.pitch_mm, b.pitch_mm)) if x != y)


def _walk(folder: Path, unlisted: list[str]) -> list[Path]:
    """Scan files below a folder, sorted, skipping masks/ and hidden names. Symlinked folders are followed (once
    each); a folder that cannot be listed is reported (and appended to `unlisted`), where os.walk skipped it and its
    scans without a word."""
    files, seen = [], set()

    def refused(e: OSError) -> None:
        unlisted.append(shown(e.filename))
        warnings.warn(f"{e.filename}: cannot list this folder ({e.strerror or e}); its scans are not scored")
    for root, dirs, names in os.walk(folder, onerror=refused, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:   # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(root, n) for n in sorted(names)
                  if not n.startswith(".") and Path(n).suffix.lower() in SCAN_SUFFIXES]
    return files


def _discover(src: str, unlisted: list[str]) -> tuple[list[Item], str]:
    """discover before repeats are dropped."""
    p = Path(src)
    if p.is_dir():
        if (p / "manifest.csv").is_file():
            return read_manifest(p / "manifest.csv"), f"{p / 'manifest.csv'}"
        return [given(f) for f in _walk(p, unlisted)], f"folder {p}"
    if p.suffix.lower() == ".csv" and p.is_file():
        return read_manifest(p), f"manifest {p}"
    if p.suffix.lower() == ".txt" and p.is_file():
        items = []
        for line in read_text(p).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line)
                if not q.is_absolute() and not on_disk(q).exists():
                    q = p.parent / q  # relative to the list when not relative to the working dir
                items.append(given(on_disk(q)))
        return items, f"list {p}"
    if p.is_file():
        return [given(p)], f"file {p}"
    if glob.has_magic(src):
        files = sorted(Path(f) for f in glob.glob(src, recursive=True)   # scan files, as in a folder: day/* on a
                       if Path(f).suffix.lower() in SCAN_SUFFIXES and Path(f).is_file())  # share also has Thumbs.db
        return [given(f) for f in files], f"glob {src}"
    raise FileNotFoundError(f"{src}: no such folder, file, list or glob match")


def _colour_png(path: Path) -> bool:
    """An 8-bit colour PNG, as overlays are (raw scans are 16-bit or grey), from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
        _, _, depth, colour = png_header(head, str(path))
    except (OSError, ScanError):
        return False
    return head[:8] == b"\x89PNG\r\n\x1a\n" and depth == 8 and colour in (2, 6)


def remove_overlay(png: Path) -> None:
    """Delete `png` if it is an overlay (a colour PNG, as `detector score` draws them); a scan or nothing there is left."""
    if png.is_file() and _colour_png(png):
        with contextlib.suppress(OSError):
            png.unlink()


def drop_overlays(items: list[Item], overlays: Path) -> tuple[list[Item], int]:
    """Items less the overlays an earlier run drew into the --overlays folder (colour PNGs below it), and how many:
    with that folder inside the scanned one, a resumed run scored them as trucks and named its overlays anew."""
    where = overlays.resolve()
    drop = {i.path for i in items if i.path.suffix.lower() == ".png" and i.real.is_relative_to(where)
            and _colour_png(i.path)}
    return [i for i in items if i.path not in drop], len(drop)
