"""Hard anomaly types: hardness from validation rows, weights, and the crop workers drawing by them."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from detector.data import CropDataset, DataConfig, ScanDataModule
from detector.hard_types import WatchedJson, draw_kind, smooth, type_hardness, type_weights, write_atomic
from detector.preprocess import Preprocessing
from detector.synth import stream
from test_train import write_dataset


def _rows(normal, anomalies):
    return ([{"label": 0, "score": s, "type": ""} for s in normal]
            + [{"label": 1, "score": s, "type": t} for t, s in anomalies])


def test_hardness_is_the_share_of_normals_at_or_above_each_anomaly():
    normal = [0.1, 0.2, 0.3, 0.4]
    rows = _rows(normal, [("wall", 0.9), ("wall", 0.8), ("metal", 0.35), ("metal", 0.05), ("metal", 0.2)])
    h = type_hardness(rows)
    assert h["wall"] == 0.0                                  # above every normal scan
    assert h["metal"] == pytest.approx((1 / 4 + 4 / 4 + 3 / 4) / 3)   # a tie with a normal counts as above
    assert type_hardness(_rows([], [("wall", 0.9)])) == {}   # no normals: nothing to rank against
    assert "" not in type_hardness(rows + [{"label": 1, "score": 0.0, "type": ""}])   # untyped: no entry


def test_weights_follow_hardness_by_the_configured_share():
    h = {"wall": 0.0, "metal": 0.6, "tyre": 0.3}            # mean 0.3
    assert type_weights(h, 1.0) == {"wall": 0.0, "metal": 2.0, "tyre": 1.0}
    assert type_weights(h, 0.5) == {"wall": 0.5, "metal": 1.5, "tyre": 1.0}
    assert type_weights(h, 0.0) == {} and type_weights({"wall": 0.0}, 0.5) == {}   # off, or nothing harder
    assert smooth({"wall": 0.4}, {"wall": 0.0, "metal": 0.6}) == {"wall": 0.2, "metal": 0.6}


def test_draw_kind_follows_the_weights_and_defaults_unnamed_types_to_one():
    rng = np.random.default_rng(0)
    kinds = ("a", "b", "c")
    n = Counter(draw_kind(rng, kinds, {"a": 3.0, "b": 0.0}) for _ in range(4000))
    assert n["b"] == 0 and abs(n["a"] / 4000 - 0.75) < 0.03 and abs(n["c"] / 4000 - 0.25) < 0.03


def test_watched_json_rereads_only_a_changed_file_and_keeps_the_last_good_data(tmp_path):
    p = tmp_path / "w.json"
    w = WatchedJson(p)
    assert w.read() == (False, None)                        # not written yet
    write_atomic(p, {"weights": {"a": 2.0}})
    assert w.read() == (True, {"weights": {"a": 2.0}})
    assert w.read() == (False, {"weights": {"a": 2.0}})     # unchanged: not parsed again
    p.write_text("{half a fi")                              # a torn write is ignored
    assert w.read() == (False, {"weights": {"a": 2.0}})


def test_positive_crops_are_drawn_by_their_type_weight(tmp_path):
    cfg = DataConfig(crop=32, crops_per_epoch=10, workers=0, hard_types=0.5)
    cfg.augment.enabled = False
    pre = Preprocessing()
    dm = ScanDataModule(write_dataset(tmp_path / "d", n=12), cfg, pre, tmp_path / "cache")
    dm.setup()
    train = dm.splits["train"]
    pos = [i for i, m in enumerate(dm.metas["train"]) if m["centres"]]
    assert len(pos) >= 4
    for j, i in enumerate(pos):                             # two types among the anomalous training scans
        train[i].anomaly_type = "metal" if j % 2 else "wall"
    path = tmp_path / "hard_types.json"
    ds = CropDataset(dm.cache, train, dm.metas["train"], cfg, pre, hard_types_file=path)
    rng = np.random.default_rng(0)
    before = Counter(train[ds._positive(rng)].anomaly_type for _ in range(3000))
    assert abs(before["metal"] / 3000 - 0.5) < 0.04         # no file yet: uniform over the scans
    write_atomic(path, {"hardness": {"wall": 0.0, "metal": 0.5}, "weights": {"wall": 0.25, "metal": 1.75}})
    after = Counter(train[ds._positive(rng)].anomaly_type for _ in range(3000))
    assert abs(after["metal"] / 3000 - 1.75 / 2.0) < 0.04
    off = CropDataset(dm.cache, train, dm.metas["train"], DataConfig(crop=32, workers=0), pre, hard_types_file=path)
    assert off._type_weights() == {} and off._pos_cum is None   # data.hard_types 0: the file is not read


def test_fresh_trucks_take_their_anomaly_type_from_the_weights(monkeypatch):
    asked = []
    monkeypatch.setattr(stream, "make_pool_scan", lambda seed, anomaly, pre, ch, twin=False: asked.append(anomaly) or
                        stream.PoolScan(np.zeros((2, 4, 4), np.float32), np.zeros((4, 4), np.uint8), []))
    only = {k: 0.0 for k in ("firearm", "narcotics", "false_wall", "shielded_block", "in_chassis", "in_tyre",
                             "in_fuel_tank", "low_contrast")}   # every type but small_metal weighs 0
    pool = stream.SynthPool(8, 100, Preprocessing(), 2, [1, 2, 3], anomaly_fraction=1.0, kind_weights=lambda: only)
    pool.draw(np.random.default_rng(0), True)
    assert asked == ["small_metal"] * 8
    asked.clear()
    plain = stream.SynthPool(8, 100, Preprocessing(), 2, [1, 2, 3], anomaly_fraction=1.0)
    plain.draw(np.random.default_rng(0), True)
    assert asked == [True] * 8                               # no weights: the generator picks the type
    asked.clear()
    clean = stream.SynthPool(8, 100, Preprocessing(), 2, [1, 2, 3], anomaly_fraction=0.0, kind_weights=lambda: only)
    clean.draw(np.random.default_rng(0), False)
    assert asked == [False] * 8                              # normal trucks stay normal


def test_training_writes_the_type_weights_after_validation(tmp_path):
    from test_train import TINY

    from detector.train import run_training

    data = write_dataset(tmp_path / "data")
    run_training(None, data, tmp_path / "off", TINY, quiet=True)
    assert not (tmp_path / "off" / "hard_types.json").exists()        # data.hard_types 0: nothing written
    run_training(None, data, tmp_path / "on", [*TINY, "data.hard_types=0.5", "trainer.val_every=1"], quiet=True)
    table = json.loads((tmp_path / "on" / "hard_types.json").read_text())
    assert set(table["hardness"]) == {"block"} and 0 <= table["hardness"]["block"] <= 1
    assert table["weights"] == type_weights(table["hardness"], 0.5)


def test_a_resumed_run_smooths_on_from_the_hardness_it_had():
    """The smoothed per-type hardness is per-run state: a resume started again from an empty table, so its first
    validation set the sampling weights alone, the noise that smoothing is there to damp."""
    from detector.config import load_config, to_dict
    from detector.train import AnomalyModule

    saved = to_dict(load_config(None, ["data.hard_types=0.5"]))
    before = AnomalyModule(saved)
    before._hardness = {"firearm": 0.3, "small_metal": 0.6}
    checkpoint: dict = {}
    before.on_save_checkpoint(checkpoint)
    resumed = AnomalyModule(saved)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed._hardness == {"firearm": 0.3, "small_metal": 0.6}
