"""The shipped configs are found from any directory, in a checkout and in a plain (non-editable) install."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from detector import cli
from detector.policy import load_policy
from detector.shipped import resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_and_policy_resolve_outside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_config("configs/default.yaml")).samefile(ROOT / "configs" / "default.yaml")
    assert load_policy("configs/policy.yaml").tiers["standard"] == 0.01
    # `detector train` with its default --config gets past the config to the data (before: config not found)
    assert cli.main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no such dataset folder" in err and "default.yaml" not in err


def test_a_users_own_file_wins_and_unknown_paths_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quick.yaml").write_text("name: mine\n")
    assert resolve_config("configs/quick.yaml") == "configs/quick.yaml"
    assert resolve_config("configs/nope.yaml") == "configs/nope.yaml"      # the reader's error names it
    assert resolve_config("other/default.yaml") == "other/default.yaml"   # only configs/NAME.yaml falls back


@pytest.mark.slow
def test_wheel_ships_configs_and_every_module(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    litter = [p for p in (ROOT / "build", ROOT / "detector.egg-info") if not p.exists()]   # setuptools builds in-tree
    try:
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                                "-w", str(wheels), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    finally:
        for p in litter:
            shutil.rmtree(p, ignore_errors=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-300:]}")
    wheel = next(wheels.glob("detector-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "detector").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    code = ("import detector, detector.shipped as s, detector.policy as p; "
            "print(detector.__file__); print(s.resolve_config('configs/default.yaml')); "
            "print(p.load_policy('configs/policy.yaml').default_tier)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(site)) and out[1] == str(site / "detector" / "configs" / "default.yaml")
    assert out[2] == "standard"
