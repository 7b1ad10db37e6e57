"""Fine-tuning (model.init / train --init): a run that starts from another run's network."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from test_train import TINY, write_dataset

ONE_EPOCH = [*TINY, "trainer.max_epochs=1", "trainer.test=false"]


def _net(channels: int, seed: int):
    import torch

    from detector.config import load_config
    from detector.model import build_model
    torch.manual_seed(seed)
    return build_model(load_config(None, [*TINY, f"model.in_channels={channels}"]).model).eval()


def _ck(model, channels: int) -> dict:
    from detector.config import load_config, to_dict
    return {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"config": to_dict(load_config(None, [*TINY, f"model.in_channels={channels}"]))}}


@pytest.mark.parametrize("was, now", [(2, 2), (2, 1), (1, 2)])
def test_the_started_network_answers_as_the_checkpoints_did(was, now):
    """Every weight is copied; a stem for another channel count sees one image in every channel as the checkpoint's
    network saw it in all of its own (a dual-energy model started on single-energy scans, or back)."""
    import torch

    from detector.checkpoint import load_initial_weights
    source, started = _net(was, 0), _net(now, 1)
    load_initial_weights(started, _ck(source, was), "src.ckpt")
    x = torch.rand(1, 1, 64, 96) * 2
    with torch.no_grad():
        want, got = source(x.expand(-1, was, -1, -1)), started(x.expand(-1, now, -1, -1))
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    fresh = _net(now, 1)
    with torch.no_grad():
        assert not torch.allclose(fresh(x.expand(-1, now, -1, -1))[0], want[0], atol=1e-3)   # the copy did it


def test_a_checkpoint_older_than_model_width_is_refused_by_that_setting():
    """A checkpoint from before model.width (64 wide) started with quick.yaml's width 32 passed the settings check and
    was refused only by its weights' shapes, naming no setting to change."""
    from detector.checkpoint import check_initialisable
    from detector.config import ConfigError, load_config, to_dict
    from test_train import _predating
    ck = {"hyper_parameters": {"config": _predating(to_dict(load_config(None, TINY)), "model.width")}}
    with pytest.raises(ConfigError, match=r"model\.width=32 \(the checkpoint's 64\)"):
        check_initialisable(ck, load_config(None, [*TINY, "model.width=32"]), "src.ckpt")
    assert check_initialisable(ck, load_config(None, TINY), "src.ckpt") == []


def test_a_checkpoint_of_another_network_is_refused_by_its_settings():
    from detector.checkpoint import check_initialisable
    from detector.config import ConfigError, load_config
    ck = _ck(_net(2, 0), 2)
    for same in ("model.topk=8", "model.in_channels=1", "model.prior=0.1"):   # no weight depends on them
        assert check_initialisable(ck, load_config(None, [*TINY, same]), "src.ckpt") == []
    with pytest.raises(ConfigError, match=r"model\.init src\.ckpt: .*model\.decoder_channels=32 \(the checkpoint's 16\)"):
        check_initialisable(ck, load_config(None, [*TINY, "model.decoder_channels=32"]), "src.ckpt")
    said = check_initialisable(ck, load_config(None, [*TINY, "preprocessing.clip_max=8.0"]), "src.ckpt")
    assert said == ["preprocessing.clip_max=8.0 (was 12.0)"]


def test_a_fine_tune_starts_from_the_checkpoint_and_records_it(tmp_path):
    """With a learning rate too small to move them, the fine-tuned run's conv weights are the source run's (a run
    without --init ends far from them); metrics.json and the checkpoint say where it started."""
    from detector.checkpoint import load_checkpoint
    from detector.config import ConfigError
    from detector.train import run_training
    data = write_dataset(tmp_path / "d")
    run_training(None, data, tmp_path / "src", ONE_EPOCH, quiet=True)
    src = tmp_path / "src" / "last.ckpt"
    tiny_lr, clip = [*ONE_EPOCH, "optim.lr=1e-9", "seed=3"], "preprocessing.clip_max=11.0"
    with warnings.catch_warnings(record=True) as said:   # the same network, learnt under another clip
        warnings.simplefilter("always")
        res = run_training(None, data, tmp_path / "ft", [*tiny_lr, clip], quiet=True, init=str(src))
    assert any("other preprocessing settings than this run's: preprocessing.clip_max=11.0 (was 12.0)"
               in str(w.message) for w in said)
    scratch = run_training(None, data, tmp_path / "scratch", tiny_lr, quiet=True)
    assert res["initialised_from"] == {"checkpoint": str(src), "epochs": 1,
                                       "data_fingerprint": scratch["data_fingerprint"]}
    assert scratch["initialised_from"] is None
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["initialised_from"]["checkpoint"] == str(src)
    convs = lambda m: {k: v for k, v in m.state_dict().items() if k.endswith("weight") and v.dim() == 4}  # noqa: E731
    was, ft, fresh = (convs(load_checkpoint(Path(r) / "last.ckpt")[0]) for r in (src.parent, tmp_path / "ft",
                                                                                  tmp_path / "scratch"))
    assert max(float((ft[k] - was[k]).abs().max()) for k in was) < 1e-5
    assert max(float((fresh[k] - was[k]).abs().max()) for k in was) > 1e-2
    _, info = load_checkpoint(tmp_path / "ft" / "best.ckpt")
    assert info["train_config"]["model"]["init"] == str(src) and info["initialised_from"]["epochs"] == 1
    # the same command with --resume, as a stopped run prints it, goes on; a run that did not start there does not
    more = [*tiny_lr, "trainer.max_epochs=2"]
    again = run_training(None, data, tmp_path / "ft", [*more, clip], quiet=True, init=str(src),
                         resume=str(tmp_path / "ft" / "last.ckpt"))
    assert again["epochs"] == 2 and again["initialised_from"] == res["initialised_from"]
    with pytest.raises(ConfigError, match=r"model\.init .*last\.ckpt with --resume .*did not start from it"):
        run_training(None, data, tmp_path / "scratch", more, quiet=True, init=str(src),
                     resume=str(tmp_path / "scratch" / "last.ckpt"))


def test_init_mistakes_are_refused_in_one_line_before_the_scans_are_cached(tmp_path, capsys):
    from detector import cli
    data = write_dataset(tmp_path / "d")
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    run = tmp_path / "run"
    cases = [(["--init", str(tmp_path / "missing.ckpt")], "model.init: .*missing.ckpt: no such checkpoint file"),
             (["--init", str(not_ckpt)], "model.init: .*notes.txt: not a readable torch checkpoint"),
             ([f"model.init={not_ckpt}", f"model.weights={not_ckpt}", "model.width=64"], "model.weights and model.init both")]
    for extra, said in cases:
        rc = cli.main(["train", "--data", str(data), "--out", str(run), *ONE_EPOCH, "trainer.val_every=1", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(said, err), err
        assert not (run / "cache").exists()
