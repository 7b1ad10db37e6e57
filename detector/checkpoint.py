"""Training checkpoints: reading one (checked to be ours), what a resume may change, and the model and bundle info
it holds for export."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from detector.atomic import replacing
from detector.config import Config, ConfigError, from_dict, to_dict
from detector.model import AnomalyNet, build_model, state_mismatch
from detector.preprocess import Preprocessing


class CheckpointError(ValueError):
    """A file that is not a detector training checkpoint (missing, truncated, or another kind of file)."""


# what a resume may change without a word: the run's length (what a resume is for), where and how it runs, and what
# the data sets again
RESUME_FREE = {"trainer.max_epochs", "trainer.max_minutes", "trainer.accelerator", "trainer.devices", "trainer.strategy",
               "trainer.precision", "trainer.threads", "trainer.cpu_processes", "trainer.log_every_n_steps",
               "trainer.test", "data.workers", "data.cache_dir", "data.channels", "data.normal_only", "model.in_channels",
               "model.init"}
# what the checkpoint's optimiser state keeps whatever the config says
RESUME_KEPT = {"optim.lr", "optim.weight_decay"}


def _as_trained(was: dict) -> dict:
    """A checkpoint's config with each setting newer than it at the value its run had: the default (a new setting's
    default is the old behaviour), the row repair off (`Preprocessing.from_dict`). Left out, a run of quick.yaml's
    `model.width: 32` resumed a width-64 checkpoint and died in load_state_dict. As saved where a setting was since
    removed."""
    try:
        out = to_dict(from_dict(Config, was))
    except (ConfigError, TypeError):
        return was
    out["preprocessing"] = Preprocessing.from_dict(was.get("preprocessing") or {}).to_dict()
    return out


def _config_changes(was: dict, now: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (now, was)} of the settings that differ; a setting `now` lacks (removed since) is left out."""
    out: dict[str, tuple[Any, Any]] = {}
    for k, v in was.items():
        if k not in now:
            continue
        if isinstance(v, dict) and isinstance(now[k], dict):
            out.update(_config_changes(v, now[k], f"{prefix}{k}."))
        elif now[k] != v:
            out[f"{prefix}{k}"] = (now[k], v)
    return out


def check_resumable(ck: dict, cfg: Config, path: str | Path) -> list[str]:
    """ConfigError when the run asks for another network or preprocessing than the checkpoint it resumes (the weights
    would not load, or the last epochs and the exported bundle would disagree), or for another learning rate or weight
    decay (the optimiser state it restores keeps the old ones); the other settings it changes, `key=new (was old)`,
    for a warning."""
    was = _as_trained(json.loads(json.dumps(ck["hyper_parameters"]["config"], default=list)))
    changes = _config_changes(was, json.loads(json.dumps(to_dict(cfg), default=list)))
    said = {k: f"{k}={new!r} (was {old!r})" for k, (new, old) in sorted(changes.items())}
    kept = [said[k] for k in said if k in RESUME_KEPT or k.split(".")[0] in ("model", "preprocessing")
            and k not in RESUME_FREE]
    if kept:
        raise ConfigError(f"--resume {path}: a resumed run keeps its network, preprocessing, learning rate and weight "
                          f"decay, but this one asks {', '.join(kept)}; train into a new --out to change them")
    return [text for k, text in said.items() if k not in RESUME_FREE]


# the model settings a fine-tune may change: the data sets the channels (the stem is adapted), the rest hold no weight
INIT_FREE = {"in_channels", "init", "weights", "topk", "prior"}


def check_initialisable(ck: dict, cfg: Config, path: str | Path) -> list[str]:
    """ConfigError when `model.init`'s checkpoint holds another network than the run builds (its weights would not
    fit); the preprocessing settings that differ, `key=new (was old)`, for a warning: the network learnt its input
    under the checkpoint's, so a fine-tune on other ones starts further from where it was."""
    was = _as_trained(json.loads(json.dumps(ck["hyper_parameters"]["config"], default=list)))
    now = json.loads(json.dumps(to_dict(cfg), default=list))
    net = {k: v for k, v in _config_changes(was.get("model", {}), now["model"], "model.").items()
           if k.split(".", 1)[1] not in INIT_FREE}
    if net:
        said = ", ".join(f"{k}={new!r} (the checkpoint's {old!r})" for k, (new, old) in sorted(net.items()))
        raise ConfigError(f"model.init {path}: its network is not the one this config builds: {said}; "
                          "set them to the checkpoint's (its run's config.yaml has them) to start from it")
    prep = _config_changes(was.get("preprocessing", {}), now["preprocessing"], "preprocessing.")
    return [f"{k}={new!r} (was {old!r})" for k, (new, old) in sorted(prep.items())]


def load_initial_weights(model: AnomalyNet, ck: dict, path: str | Path) -> None:
    """Copy the checkpoint's network into `model` (fine-tuning). A stem conv for another channel count (a dual-energy
    model started on single-energy scans, or back) takes the mean of its input weights, scaled so that the same
    image in every channel gives the same response; any other mismatch is a ConfigError naming the file."""
    state = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    own = model.state_dict()
    for k in set(own) & set(state):
        a, b = own[k], state[k]
        if a.shape != b.shape and a.dim() == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]:
            c = a.shape[1]   # the stem: out, in, kh, kw with only `in` differing
            state[k] = b.mean(1, keepdim=True).expand(-1, c, -1, -1) * (b.shape[1] / c)
    if what := state_mismatch(own, state):
        raise ConfigError(f"model.init {path}: its weights do not fit this run's network ({what})")
    model.load_state_dict(state)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Each checkpoint written beside its final name, synced, and renamed over it: a kill, a power cut or a full disk
    leaves the previous whole file, never a cut one. Lightning's own writes a temporary file in $TMPDIR and moves it,
    which between two file systems (a tmpfs /tmp, a run on a data disk) is a copy over the old file in place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, checked to be one of ours; CheckpointError names the file and what is wrong."""
    if Path(path).is_dir():   # the run folder itself: name the checkpoint in it
        raise CheckpointError(f"{path}: a run folder, not a checkpoint file: name one in it, "
                              f"{Path(path) / 'best.ckpt'} to export, {Path(path) / 'last.ckpt'} to --resume")
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if Path(path).suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: an exported ONNX bundle, not a training checkpoint (RUN/best.ckpt); "
                              "score with it: detector score SCANS --model " + str(path) + " --out results.csv")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # zip, pickle and EOF errors of many kinds: not a torch checkpoint, or a cut one
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or "state_dict" not in ck or "config" not in (ck.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path}: not a detector training checkpoint (no model config and weights in it)")
    return ck


def unfinished_run(path: str | Path) -> str | None:
    """Why `path` is an interim model, None when its run finished or there is no telling: the last.ckpt beside it holds
    fewer epochs than its run planned (its time budget's plan, else trainer.max_epochs; early stopping ends a run) and
    no metrics.json, which only a run that finished writes, is there: the run was stopped, crashed or still trains."""
    run = Path(path).parent
    last = run / "last.ckpt"
    if (run / "metrics.json").exists() or not last.is_file():
        return None
    try:
        ck = read_checkpoint(last)
    except CheckpointError:
        return None
    states = ck.get("callbacks") or {}
    if any(k.startswith("EarlyStopping") and (v or {}).get("stopped_epoch", 0) > 0 for k, v in states.items()):
        return None
    plans = (states.get("TimeBudget") or {}).get("plans") or []
    planned = int(plans[-1]) if plans else int(ck["hyper_parameters"]["config"].get("trainer", {}).get("max_epochs", 0))
    done = int(ck.get("epoch", -1)) + 1
    if done >= planned:
        return None
    return (f"{path} is from a run that has not finished: {last} holds {done} of its {planned} epochs and there is no "
            f"{run / 'metrics.json'} (stopped, crashed, or still training)")


def read_init(path: str) -> dict:
    """model.init's checkpoint; its errors say model.init (CheckpointError's text names the file)."""
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"model.init: {e}") from None


def load_checkpoint(path: str | Path) -> tuple[AnomalyNet, dict]:
    """(AnomalyNet in eval mode on the CPU, info dict with everything the ONNX bundle's metadata needs)."""
    ck = read_checkpoint(path)
    hp = ck["hyper_parameters"]
    cfg = from_dict(Config, hp["config"])
    # the checkpoint holds every weight: the pretrained file it started from is not needed (nor read) any more
    model = build_model(dataclasses.replace(cfg.model, weights=None))
    state = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    info = dict(hp.get("info") or {})
    info.update(ck.get("detector_info", {}))
    info.setdefault("train_config", hp["config"])
    return model.eval(), info
