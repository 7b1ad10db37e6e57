"""`detector demo`: what it reuses from an earlier demo into the same --out (the full run is the notebook's test)."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest


def _fake_demo(monkeypatch, out: Path, count: int, seed: int) -> list[list[str]]:
    """Run `detector demo` with its steps faked (synth writes a manifest and one image named for its seed and count,
    score one overlay named for the test scans' seed); returns the synth steps it ran."""
    from detector import demo
    from detector.synth.dataset import SYNTH_INFO
    from detector.synth.scene import GENERATOR_VERSION
    calls: list[list[str]] = []

    def step(title: str, argv: list[str]) -> None:
        calls.append(argv)
        if argv[0] == "synth":
            name = f"s{argv[argv.index('--seed') + 1]}_{argv[argv.index('--count') + 1]}"
            (Path(argv[1]) / "images").mkdir(parents=True, exist_ok=True)
            (Path(argv[1]) / "images" / f"{name}.tiff").touch()
            (Path(argv[1]) / "manifest.csv").write_text("path,label\n")
            (Path(argv[1]) / SYNTH_INFO).write_text(json.dumps({   # as write_dataset records what made the scans
                "generator": GENERATOR_VERSION, "seed": int(argv[argv.index("--seed") + 1]),
                "count": int(argv[argv.index("--count") + 1])}))
        elif argv[0] == "score":
            Path(argv[argv.index("--out") + 1]).write_text("path,score,decision,threshold,regions,latency_ms,error\n"
                                                          "a.tiff,0.1,RELEASE,0.5,[],12,\n")
            overlays = Path(argv[argv.index("--overlays") + 1])
            overlays.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(overlays / f"{next((Path(argv[1])).iterdir()).stem}.png"), np.zeros((4, 4, 3), np.uint8))
        elif argv[0] == "eval":
            report = Path(argv[argv.index("--out") + 1])
            report.mkdir(parents=True, exist_ok=True)
            (report / "metrics.json").write_text(json.dumps({"overall": {"auroc": 0.5, "detection_at_far": []}}))

    monkeypatch.setattr(demo, "_step", step)
    assert demo.main(Namespace(out=str(out), config=None, count=count, seed=seed)) == 0
    return [c for c in calls if c[0] == "synth"]


def test_a_demo_into_the_same_folder_synthesises_again_only_for_another_count_or_seed(tmp_path, monkeypatch):
    """`detector demo --out D --count 24` after `--count 12` trained and tested on the first demo's 12 scans: it
    reused any data/train it found, and said nothing; the earlier demo's overlays stayed beside the new ones."""
    out = tmp_path / "demo"
    assert len(_fake_demo(monkeypatch, out, 12, 0)) == 2
    assert _fake_demo(monkeypatch, out, 12, 0) == []          # the same data: made once
    again = _fake_demo(monkeypatch, out, 24, 0)
    assert [c[c.index("--count") + 1] for c in again] == ["24", "20"]   # train, and test (at least 20)
    assert sorted(p.name for p in (out / "data" / "train" / "images").iterdir()) == ["s0_24.tiff"]   # no stale scans
    assert [c[c.index("--seed") + 1] for c in _fake_demo(monkeypatch, out, 24, 5)] == ["5", "10005"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["s10005_20.png"]   # this demo's test scans only


def test_a_demo_never_deletes_scans_or_pictures_it_did_not_make(tmp_path, monkeypatch):
    """The demo makes its scans again for another --count; pointed (--out) at a folder whose data/train holds someone's
    own scans, it would have deleted them, and every PNG of its overlays folder with them."""
    out = tmp_path / "mine"
    (out / "data" / "train").mkdir(parents=True)
    (out / "data" / "train" / "scan.tiff").write_bytes(b"a user's scan")
    with pytest.raises(SystemExit, match="holds scans this demo did not make"):
        _fake_demo(monkeypatch, out, 12, 0)
    assert (out / "data" / "train" / "scan.tiff").read_bytes() == b"a user's scan"
    (out / "data" / "train" / "scan.tiff").unlink()
    (out / "overlays").mkdir()
    cv2.imwrite(str(out / "overlays" / "grey.png"), np.zeros((4, 4), np.uint16))   # a 16-bit scan, not an overlay
    _fake_demo(monkeypatch, out, 12, 0)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["grey.png", "s10000_20.png"]
