"""The station core imports with torch, torchvision, lightning and albumentations unimportable."""
import re
import subprocess
import sys
from pathlib import Path

from conftest import run_without

CORE = ["detector.scan", "detector.formats", "detector.sources", "detector.preprocess", "detector.calibration",
        "detector.bundle", "detector.physics", "detector.tip", "detector.synth", "detector.runtime",
        "detector.policy", "detector.metrics", "detector.report", "detector.score", "detector.evaluate",
        "detector.eval_baseline",
        "detector.serve", "detector.audit", "detector.audit_report", "detector.audit_trend", "detector.cli", "detector.manifest", "detector.site_calibration",
        "detector.bundle_info", "detector.serve_metrics", "detector.serve_protocol", "detector.serve_throttle",
        "detector.serve_form", "detector.serve_shadow", "detector.serve_tls",
        "detector.records", "detector.atomic", "detector.cpus", "detector.shipped", "detector.annotations",
        "detector.labels_to_dataset", "detector.export_splits", "detector.audit_dataset", "detector.preannotate"]


def test_core_modules_import_without_torch():
    out = run_without(f"import importlib\nfor m in {CORE!r}:\n    importlib.import_module(m)\nprint('ok')\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_help_lists_every_verb_with_an_example():
    out = subprocess.run([sys.executable, "-m", "detector.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    verbs = ("demo", "synth", "train", "export", "score", "eval", "calibrate", "manifest", "info", "serve",
             "audit")
    for verb in verbs:
        assert f"  {verb} " in out.stdout
    assert out.stdout.count("e.g. detector") == len(verbs)


def test_cli_warnings_are_one_line_without_the_source_line():
    code = ("import warnings\nfrom detector import cli\ncli.main(['--version'])\n"
            "warnings.warn('48 scan(s): converted')\nwarnings.warn('old', DeprecationWarning, stacklevel=1)\n")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "warning: 48 scan(s): converted\nwarning (DeprecationWarning): old\n"


def test_training_verbs_on_a_station_install_say_what_to_install(tmp_path):
    """Without the extras `detector train` / `export` ended in a ModuleNotFoundError traceback."""
    out = run_without(
        "from detector import cli\n"
        f"print(cli.main(['train', '--data', {str(tmp_path)!r}]), "
        f"cli.main(['export', {str(tmp_path / 'best.ckpt')!r}, '--out', {str(tmp_path / 'm.onnx')!r}]))\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2"]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all("needs the training extras" in s and "detector[train]" in s for s in lines)
    assert lines[0].startswith("detector train:") and lines[1].startswith("detector export:")
    # the verbs a station install does run, all of them (calibrate and info, then manifest, were left out of the list)
    assert all("synth, score, eval, calibrate, manifest, info, serve and audit" in s for s in lines)


def _layout_entries() -> dict[str, str]:
    """docs/internals.md's Layout block: each `detector/NAME.py` (or `detector/synth/`) with its whole entry's text."""
    text = (Path(__file__).parents[1] / "docs" / "internals.md").read_text(encoding="utf-8")
    block = text.split("## Layout\n```\n", 1)[1].split("```", 1)[0]
    entries: dict[str, str] = {}
    name = ""
    for line in block.splitlines():
        if line.startswith("detector/"):
            name = line.split()[0].removesuffix(".py").removesuffix("/").replace("/", ".")
            entries[name] = ""
        entries[name] += line + "\n"
    return entries


def test_every_module_is_in_the_layouts_with_its_core_marking():
    """docs/internals.md maps every module for a newcomer, marked core where the station imports it without torch,
    and the README's Layout names each: new modules (cpus, serve_throttle, ...) went unlisted, records read as
    training-only."""
    root = Path(__file__).parents[1]
    modules = {f"detector.{p.stem}" for p in (root / "detector").glob("*.py")} | {"detector.synth"}
    entries = _layout_entries()
    assert modules - set(entries) == set()
    assert set(entries) - modules == set()
    assert [m for m in CORE if "core" not in entries[m]] == []
    assert [m for m in entries if "(core" in entries[m] and m not in CORE] == []
    layout = (root / "README.md").read_text(encoding="utf-8").split("## Layout\n", 1)[1]
    core, training = layout.split("; training:", 1)[0], layout.split("; training:", 1)[1].split(";", 1)[0]
    named = lambda part: {f"detector.{n.strip('/')}" for n in re.findall(r"`([a-z_]+/?)`", part)}  # noqa: E731
    assert modules - {"detector.__init__"} - named(layout) == set()
    assert [m for m in CORE if m not in named(core) and m not in ("detector.cli", "detector.shipped")] == []
    assert named(training) & set(CORE) == set()
