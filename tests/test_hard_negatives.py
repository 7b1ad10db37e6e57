"""Hard-negative mining: peak picking, the miner's file after training, crops centred on mined cells."""
from __future__ import annotations

import json

import numpy as np

from detector.hard_negatives import hottest_cells
from detector.preprocess import pad_to_multiple


def test_hottest_cells_are_local_maxima_above_threshold_outside_exclusion():
    z = np.full((10, 12), -5.0, np.float32)
    z[2, 3], z[2, 4] = 3.0, 2.5          # one peak with a shoulder: only the peak counts
    z[7, 9] = 1.0
    z[5, 1] = 4.0                         # hottest, but excluded (a labelled anomaly)
    z[8, 2] = -3.5                        # below the threshold
    exclude = np.zeros_like(z, bool)
    exclude[5, 1] = True
    assert hottest_cells(z, exclude, k=5, min_logit=-3.0) == [(2, 3), (7, 9)]
    assert hottest_cells(z, None, k=2, min_logit=-3.0) == [(5, 1), (2, 3)]


def test_training_mines_cells_off_the_anomalies_and_crops_use_them(tmp_path):
    from test_train import TINY, write_dataset

    from detector.data import CropDataset, ScanDataModule
    from detector.config import load_config
    from detector.train import run_training

    data = write_dataset(tmp_path / "data")
    ov = [*TINY, "data.mine_share=1.0", "data.hard_negative_fraction=1.0", "data.anomaly_crop_fraction=0",
          "model.prior=0.5"]   # prior 0.5: the untrained net fires everywhere, so cells are found
    run_training(None, data, tmp_path / "run", ov, quiet=True)
    found = json.loads((tmp_path / "run" / "hard_negatives.json").read_text())
    assert found and all(len(v) <= 8 for v in found.values())

    cfg = load_config(None, ov)
    dm = ScanDataModule(data, cfg.data, cfg.preprocessing, tmp_path / "run" / "cache",
                        tmp_path / "run" / "hard_negatives.json")
    dm.setup()
    s = cfg.model.stride
    for meta in dm.metas["train"]:
        _, mask = dm.cache.load(meta)
        for y, x in found.get(meta["key"], []):
            assert 0 <= y < meta["shape"][1] + s and 0 <= x < meta["shape"][2] + s
            ys, xs = np.nonzero(np.asarray(mask)) if mask is not None else ((), ())
            if len(ys):   # never within two cells of a labelled anomaly
                assert np.min(np.maximum(abs(ys - y), abs(xs - x))) > 2 * s - s // 2
    ds = CropDataset(dm.cache, dm.splits["train"], dm.metas["train"], cfg.data, cfg.preprocessing,
                     dm.hard_negative_file)
    cells = ds._hard_negatives()
    assert len(cells) == sum(len(v) for v in found.values())
    rng = np.random.default_rng(0)
    i, y, x = cells[0]
    att, _ = dm.cache.load(dm.metas["train"][i])
    crop, _, _ = ds.crop(i, rng, centred=False, hard=(y, x))
    padded = pad_to_multiple(np.asarray(att), cfg.preprocessing.pad_multiple)   # crops come from the scan as
    S, H, W = cfg.data.crop, padded.shape[1], padded.shape[2]                      # the station pads it
    assert crop.shape == (S, S, att.shape[0])
    windows = [(y0, x0) for y0 in range(max(1, H - S + 1)) for x0 in range(max(1, W - S + 1))
               if y0 <= y < y0 + S and x0 <= x < x0 + S
               and np.array_equal(np.moveaxis(padded[:, y0:y0 + S, x0:x0 + S], 0, -1),
                                  crop[:min(S, H), :min(S, W)])]
    assert windows, "the crop is not a window of its (station-padded) scan around the mined cell"


def test_a_resumed_run_keeps_the_mined_cells_and_mines_on_where_it_stopped(tmp_path):
    """The miner's cells and its place in the rotation are per-run state: a resume started again from the first
    scans with an empty table, so the file shrank to one epoch's share (8 % of the scans in default.yaml)."""
    from types import SimpleNamespace

    import torch

    from detector.hard_negatives import HardNegativeMiner
    from detector.preprocess import Preprocessing

    class Hot(torch.nn.Module):
        stride = 8

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.full((x.shape[0], 1, x.shape[2] // 8, x.shape[3] // 8), -9.0)
            z[:, :, 1, 2] = 5.0                  # one hot cell in every scan
            return z

    att = np.ones((1, 64, 64), np.float32)
    dm = SimpleNamespace(hard_negative_file=tmp_path / "hard_negatives.json", pre=Preprocessing(),
                         metas={"train": [{"key": f"scan{i}"} for i in range(4)]},
                         cache=SimpleNamespace(load=lambda meta: (att, None)))
    trainer = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1, precision="32-true", is_global_zero=True)
    module = SimpleNamespace(model=Hot(), device=torch.device("cpu"), log=lambda *a, **k: None)
    first = HardNegativeMiner(share=0.5)
    first.on_train_epoch_end(trainer, module)
    assert sorted(json.loads(dm.hard_negative_file.read_text())) == ["scan0", "scan1"]
    resumed = HardNegativeMiner(share=0.5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))   # as it travels in last.ckpt
    resumed.on_train_epoch_end(trainer, module)
    found = json.loads(dm.hard_negative_file.read_text())
    assert sorted(found) == ["scan0", "scan1", "scan2", "scan3"] and found["scan2"] == [[12, 20]]
