"""The YAML configs that ship with the package, found from any working directory.

`detector train` defaults to `--config configs/default.yaml`, the demo trains on `configs/quick.yaml` and the
README serves with `--policy configs/policy.yaml`: paths relative to the repository root. Run from anywhere
else, or after a plain `pip install` (no checkout at all), they named nothing. The files ship in the wheel as
`detector/configs/` (pyproject.toml maps the repository's `configs/` there), so such a path falls back to the
shipped copy. A file that exists where the user points always wins: the flags keep their meaning.
"""
from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def shipped_configs() -> Path | None:
    """The folder of shipped configs: detector/configs/ in an installed wheel, configs/ in a checkout."""
    if (_HERE / "configs").is_dir():
        return _HERE / "configs"
    root = _HERE.parent              # a checkout (editable install, PYTHONPATH): the repository's own folder
    if (root / "pyproject.toml").is_file() and (root / "configs").is_dir():
        return root / "configs"
    return None


def resolve_config(path: str | os.PathLike) -> str:
    """`path` when it exists; else, for a relative `configs/NAME.yaml` that names a shipped config, the shipped
    copy; else `path` unchanged, so the reader's error names what the user typed."""
    p = Path(path)
    if p.exists() or p.is_absolute() or p.parent != Path("configs"):
        return str(path)
    folder = shipped_configs()
    if folder is not None and (folder / p.name).is_file():
        return str(folder / p.name)
    return str(path)
