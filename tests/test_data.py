"""Datasets: manifests and folders, splits, cached model-pitch scans, anomaly crops, whole-scan padding."""
from __future__ import annotations

import csv
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.data import CropDataset, DataConfig, ScanDataModule, ScanDataset
from detector.preprocess import Preprocessing
from detector.records import Record, load_records, split_records
from detector.scan import ScanError, attenuation_to_counts, write_scan
from detector.scan_cache import ScanCache
from detector.synth.stream import SynthPool, make_pool_scan
from test_train import allow_cpus, write_dataset, write_manifest  # tests/ is on sys.path (pytest rootdir-less import)


def test_stratified_split_is_seeded_and_keeps_both_labels():
    recs = [Record(f"s{i}", i % 4 == 0) for i in range(100)]
    a = split_records(recs, 0.2, 0.2, seed=1)
    b = split_records(recs, 0.2, 0.2, seed=1)
    assert [r.path for r in a["val"]] == [r.path for r in b["val"]]
    assert sum(len(v) for v in a.values()) == 100
    for s in ("train", "val", "test"):
        assert 0 < sum(r.label for r in a[s]) < len(a[s])


def test_manifest_split_column_boxes_and_bad_rows(tmp_path):
    root = write_dataset(tmp_path / "d", n=6)
    recs = load_records(root)
    assert {r.split for r in recs} == {"train", "val"}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.csv").write_text("path,label\nx.tiff,maybe\n")
    with pytest.raises(ScanError, match="label"):
        load_records(tmp_path / "bad")
    with pytest.raises(ScanError):
        load_records(tmp_path / "empty_nothing")
    (tmp_path / "bad" / "manifest.csv").write_text("path,label\nx.tiff,0\ny.tiff,1\nx.tiff,1\n")
    with pytest.raises(ScanError, match=r"row 4: x\.tiff is listed again \(row 2\)"):
        load_records(tmp_path / "bad")


def test_boxes_become_masks_and_small_anomalies_survive_resampling(tmp_path):
    att = np.full((2, 60, 100), 1.0, np.float32)
    att[:, 10:13, 50:53] += 3
    write_scan(tmp_path / "a.tiff", attenuation_to_counts(att, 5e4), i0=(5e4, 5e4), pitch_mm=5.0)
    rec = Record(str(tmp_path / "a.tiff"), 1, boxes=[[50, 10, 53, 13]])
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0))
    meta = cache.build(rec)
    a, m = cache.load(meta)
    assert a.shape == (2, 30, 50) and m.shape == (30, 50)
    ys, xs = np.nonzero(m)
    assert len(ys) >= 1 and 4 <= ys.min() <= 6 and 24 <= xs.min() <= 26  # 3 px at 5 mm -> kept at 10 mm
    assert cache.build(rec) == meta  # cached
    raw = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0, repair_rows=False))
    assert raw.build(rec)["key"] != meta["key"]   # a cache made with other preprocessing is not reused


def test_boxes_and_masks_of_a_scan_with_non_square_pixels_are_taken_in_the_files_pixels(tmp_path):
    """A line scanner's TIFF of 4 x 5 mm pixels is squared by its reader (200 rows become 160). A manifest's boxes,
    drawn on the file, were laid on the squared grid as they stood (the crops' masks 20 % below the block), and a mask
    drawn at the file's size was refused ("mask is 600x200, scan is 600x160"). Both are now taken in the file's
    pixels, and the crop's mask lands on the block; a mask drawn at the squared size, as earlier users had to, still
    trains; a mask of neither size is refused, naming both."""
    from conftest import write_nonsquare_scan
    root = tmp_path / "d"
    box = [400, 110, 480, 160]                                  # in the file's pixels
    write_nonsquare_scan(root / "line.tiff", 4.0, 5.0, tuple(box))
    for name, h, (y0, y1) in (("file.png", 200, (110, 160)), ("squared.png", 160, (88, 128))):
        mask = np.zeros((h, 600), np.uint8)
        mask[y0:y1, box[0]:box[2]] = 255
        cv2.imwrite(str(root / name), mask)
    cv2.imwrite(str(root / "zoomed.png"), cv2.resize(cv2.imread(str(root / "file.png")), (1200, 400)))
    rows = [f'line.tiff,1,,"{[box]}"', "line.tiff,1,file.png,", "line.tiff,1,squared.png,"]
    pre = Preprocessing(model_pitch_mm=10.0)
    cache = ScanCache(tmp_path / "cache", pre)
    for row in rows:
        (root / "manifest.csv").write_text(f"path,label,mask,boxes\n{row}\n")
        rec, = load_records(root)
        meta = cache.build(rec)
        att, mask = cache.load(meta)
        dense, marked = att[0] > 3.0, np.asarray(mask) > 0     # the block: rows 44-64, columns 200-240 at 10 mm
        overlap = (marked & dense).sum() / (marked | dense).sum()
        assert marked.shape == dense.shape and overlap > 0.8, (row, overlap)
        crops = CropDataset(cache, [rec], [meta], DataConfig(workers=0, crop=64), pre)
        img, m, _ = crops.crop(0, np.random.default_rng(0), centred=True)
        assert m.any() and (img[..., 0][m > 0] > 3.0).mean() > 0.8, row
    (root / "manifest.csv").write_text("path,label,mask\nline.tiff,1,zoomed.png\n")
    with pytest.raises(ScanError, match=r"mask is 1200x400, scan is 600x200 \(600x160 once its pixels are squared\)"):
        cache.build(load_records(root)[0])


def test_a_cache_entry_that_laid_file_pixel_boxes_on_the_squared_grid_is_not_reused(tmp_path, monkeypatch):
    """Entries the scan cache built before boxes were taken in the file's pixels hold the box where it stood on the
    squared grid, 20 % beside the block; their key was the same, so a new run went on training from them."""
    from conftest import write_nonsquare_scan

    from detector import scan_cache
    path = write_nonsquare_scan(tmp_path / "line.tiff", 4.0, 5.0, (400, 110, 480, 160))
    rec, cache = Record(str(path), 1, boxes=[[400, 110, 480, 160]]), ScanCache(tmp_path / "cache", Preprocessing())
    with monkeypatch.context() as old:                     # the earlier code: the squared grid was taken for the file's
        old.setattr(scan_cache, "file_shape", lambda scan: (scan.height, scan.width))
        old.setattr(scan_cache, "_squared", lambda path: False, raising=False)
        stale = cache.build(rec)
    fresh = cache.build(rec)
    assert fresh["key"] != stale["key"] and fresh["centres"] != stale["centres"]


def test_a_redrawn_mask_or_a_relabelled_scan_is_not_served_from_the_cache(tmp_path):
    att = np.random.default_rng(0).uniform(0.5, 1.5, (1, 60, 100)).astype(np.float32)
    write_scan(tmp_path / "a.tiff", attenuation_to_counts(att, 5e4), i0=(5e4,), pitch_mm=5.0)
    mask = np.zeros((60, 100), np.uint8)
    mask[10:20, 10:20] = 255
    cv2.imwrite(str(tmp_path / "a.png"), mask)
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0))
    rec = Record(str(tmp_path / "a.tiff"), 1, mask=str(tmp_path / "a.png"))
    assert cache.build(rec)["centres"][0] == [5, 5]
    mask[:] = 0
    mask[40:50, 70:90] = 255                                 # the labeller moved the anomaly, same file
    cv2.imwrite(str(tmp_path / "a.png"), mask)
    os.utime(tmp_path / "a.png", ns=(1, 10**18))              # a new mtime even on a coarse-clock file system
    assert cache.build(rec)["centres"][0] == [20, 35]
    assert cache.build(Record(rec.path, 0))["has_mask"]      # normal: trained as all-background
    assert not cache.build(Record(rec.path, 1))["has_mask"]  # relabelled anomalous, no mask: from the label alone
    with pytest.raises(ScanError, match="normal scan .label 0. whose mask marks"):
        cache.build(Record(rec.path, 0, mask=rec.mask))      # relabelled normal with its mask left: still refused


def test_a_cache_entry_whose_arrays_were_deleted_is_rebuilt_not_loaded(tmp_path):
    att = np.random.default_rng(0).uniform(0.5, 1.5, (1, 60, 100)).astype(np.float32)
    write_scan(tmp_path / "a.tiff", attenuation_to_counts(att, 5e4), i0=(5e4,), pitch_mm=5.0)
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0))
    rec = Record(str(tmp_path / "a.tiff"), 0)
    first = cache.load(cache.build(rec))
    for part in ("att", "mask"):                             # a clean-up of big files left the .json behind
        for f in (tmp_path / "cache").glob(f"*.{part}.npy"):
            f.unlink()
        a, m = cache.load(cache.build(rec))
        assert np.array_equal(a, first[0]) and np.array_equal(m, first[1])


def test_a_full_disk_names_the_cache_and_the_scan_and_leaves_no_partial_entry(tmp_path, monkeypatch):
    att = np.full((2, 40, 60), 1.0, np.float32)
    att[:, 20:30, 10:40] += 2   # a load: a uniform image is a blank scan
    write_scan(tmp_path / "a.tiff", attenuation_to_counts(att, 5e4), i0=(5e4, 5e4), pitch_mm=5.0)
    rec = Record(str(tmp_path / "a.tiff"), 0)
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0))

    def full(file, arr, *a, **k):
        Path(file).write_bytes(b"\x93NUMPY partial")           # what a write cut short leaves
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OSError, match=r"a\.tiff.*No space left.*data\.cache_dir"):
        cache.build(rec)
    assert list((tmp_path / "cache").iterdir()) == []          # no partial .npy, no meta: rebuilt next time
    monkeypatch.undo()
    assert cache.load(cache.build(rec))[0].shape == (2, 20, 30)


def test_caching_in_threads_matches_one_by_one_and_strict_mode_stops_at_a_truncated_scan_by_name(tmp_path):
    root = write_dataset(tmp_path / "d", n=24)
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    dm.prepare_data()                                        # a thread pool
    one = ScanCache(tmp_path / "one", Preprocessing())
    for r in dm.splits["train"][:5]:
        meta = one.build(r)
        assert np.array_equal(one.load(meta)[0], dm.cache.load(dm.cache.build(r))[0])
    bad = root / "images" / "s7.tiff"
    bad.write_bytes(bad.read_bytes()[:300])
    strict = ScanDataModule(root, DataConfig(workers=0, skip_unreadable=False), Preprocessing(), tmp_path / "cache2")
    with pytest.raises(ScanError, match=r"s7\.tiff"):
        strict.prepare_data()


def test_unreadable_scans_are_left_out_and_listed_and_training_goes_on(tmp_path):
    root = write_dataset(tmp_path / "d", n=24)
    bad = root / "images" / "s7.tiff"
    bad.write_bytes(bad.read_bytes()[:300])                                   # truncated
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"1 of 24 scans are unreadable and left out \(e\.g\. .*s7\.tiff: "):
        dm.prepare_data()
    dm.setup("fit")
    kept = [r.path for s in ("train", "val", "test") for r in dm.splits[s]]
    assert str(bad) not in kept and len(kept) == 23
    assert all(len(dm.metas[s]) == len(dm.splits[s]) for s in ("train", "val", "test"))
    assert dm.write_skipped(tmp_path / "skipped.csv") == 1
    with open(tmp_path / "skipped.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["path"] == str(bad) and row["split"] in ("train", "val", "test") and row["reason"]
    assert "s7.tiff" not in row["reason"]                                    # the path has its own column
    bad.unlink()                                                              # a manifest row without its file
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"s7\.tiff: file not found"):
        dm.prepare_data()
    assert list(dm.skipped) == [str(bad)]


def test_a_dataset_whose_training_scans_are_all_unreadable_stops_with_the_reason(tmp_path):
    root = write_dataset(tmp_path / "d", n=6)
    for p in (root / "images").glob("*.tiff"):
        p.write_bytes(b"II*\x00 not a tiff")
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    with pytest.raises(ScanError, match=r"no training scans after splitting \(6 unreadable, e\.g\. .*\.tiff: "):
        with pytest.warns(UserWarning, match="6 of 6 scans are unreadable"):
            dm.prepare_data()


def test_a_validation_split_whose_normal_scans_are_unreadable_says_so(tmp_path):
    """Its normal scans were listed in split=val but unreadable: the run stopped with "the validation split has no
    normal scans ... put some normal scans in split=val", which sent the user to a manifest that already did."""
    root = write_dataset(tmp_path / "d", n=6)
    (root / "images" / "s4.tiff").write_bytes(b"II*\x00 not a tiff")        # the only normal validation scan
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    with pytest.raises(ScanError, match=r"validation split has no normal scans \(1 unreadable, e\.g\. .*s4\.tiff: "):
        with pytest.warns(UserWarning, match="1 of 6 scans are unreadable"):
            dm.prepare_data()


def test_a_folder_of_test_scans_only_loads_for_scoring_but_not_for_training(tmp_path):
    root = write_dataset(tmp_path / "d", n=6, n_test=6)
    with pytest.raises(ScanError, match="no training scans"):
        ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache", require_train=False)
    assert len(dm.splits["test"]) == 6 and not dm.splits["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # no training scans: nothing to say about normal-only training
        dm.setup("test")
    assert dm.channels == 2 and len(dm.test_dataloader().dataset) == 6


def test_a_datamodule_made_outside_training_resolves_auto_workers(tmp_path, monkeypatch):
    allow_cpus(monkeypatch, 8)
    dm = ScanDataModule(write_dataset(tmp_path / "d", n=6), DataConfig(crop=32, crops_per_epoch=8), Preprocessing(),
                        tmp_path / "cache")
    dm.prepare_data()
    dm.setup()
    assert dm.cfg.workers == "auto" and dm.train_dataloader().num_workers == (6 if torch.cuda.is_available() else 2)


def test_loader_workers_and_caching_threads_follow_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """A container given 3 of a host's 64 cores (cpuset, taskset): os.cpu_count says 64, and the crop loaders and
    the caching threads were sized for 64."""
    import concurrent.futures

    from detector.data import auto_workers
    allow_cpus(monkeypatch, 3)
    assert auto_workers(False) == 1 and auto_workers(True) == 1          # a quarter of 3; 3 less two
    sizes: list[int] = []

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, workers: int, **kw) -> None:
            sizes.append(workers)
            super().__init__(workers, **kw)
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Pool)
    ScanDataModule(write_dataset(tmp_path / "d", n=6), DataConfig(workers=0), Preprocessing(),
                   tmp_path / "cache").prepare_data()
    assert sizes == [3]
    allow_cpus(monkeypatch, 12)
    assert auto_workers(False) == 3 and auto_workers(True) == 10 and auto_workers(True, 2) == 4


def _crop_dataset(tmp_path, cfg: DataConfig):
    """(datamodule, training CropDataset, preprocessing) on a small written dataset, no augmentation."""
    cfg.augment.enabled = False
    pre = Preprocessing()
    dm = ScanDataModule(write_dataset(tmp_path / "d", n=6), cfg, pre, tmp_path / "cache")
    dm.setup()
    return dm, CropDataset(dm.cache, dm.splits["train"], dm.metas["train"], cfg, pre), pre


def test_crops_oversample_anomalies_and_val_pads_to_32(tmp_path):
    cfg = DataConfig(crop=32, crops_per_epoch=40, anomaly_crop_fraction=0.8, workers=0)
    dm, ds, pre = _crop_dataset(tmp_path, cfg)
    items = [ds[i] for i in range(40)]
    assert items[0]["x"].shape == (2, 32, 32) and items[0]["mask"].shape == (1, 32, 32)
    pos = sum(float(it["label"]) for it in items)
    assert pos >= 20                                       # ~80 % + random hits
    for it in items:                                       # labels follow the crop's mask
        assert float(it["label"]) == float(it["mask"].sum() > 0)
    val = ScanDataset(dm.cache, dm.splits["val"], dm.metas["val"], pre)
    v = val[0]
    assert v["x"].shape[1] % 32 == 0 and v["x"].shape[2] % 32 == 0
    assert tuple(v["valid_hw"].tolist()) == tuple(dm.metas["val"][0]["shape"][1:])
    assert dm.channels == 2


def test_tip_from_labels_projects_the_training_scans_own_anomalies_into_normal_crops(tmp_path):
    cfg = DataConfig(crop=32, crops_per_epoch=60, anomaly_crop_fraction=0.0, hard_negative_fraction=0.0, workers=0)
    cfg.augment.tip_rate, cfg.augment.tip_from_labels = 1.0, 1.0
    dm, ds, _ = _crop_dataset(tmp_path, cfg)
    n_masked = sum(1 for m in dm.metas["train"] if m["centres"])
    assert n_masked and len(ds.library) >= n_masked and {t.kind for t in ds.library} == {"block"}
    assert all(max(t.shape) <= 32 * 2 // 3 for t in ds.library)      # each fits a training crop
    got = [ds[i] for i in range(60)]
    assert sum(float(g["label"]) for g in got) > 30                 # the normal crops get the scans' own blocks
    cfg2 = DataConfig(crop=32, crops_per_epoch=8, workers=0)
    cfg2.augment.tip_rate = 0.25
    assert _crop_dataset(tmp_path / "off", cfg2)[1].library == []    # off by default: nothing is cut


class _CropThreads(CropDataset):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "cv2_threads": cv2.getNumThreads()}


class _ScanThreads(ScanDataset):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "cv2_threads": cv2.getNumThreads()}


def test_loader_workers_run_opencv_on_one_thread_and_leave_the_main_process_alone(tmp_path):
    """Workers are the parallelism: an OpenCV thread per core in each would oversubscribe the machine.
    The main process runs OpenCV's thread pool first: resizing that pool inside a forked worker deadlocks
    (the loader's timeout turns such a hang into a failure)."""
    cfg = DataConfig(crop=32, crops_per_epoch=4, workers=0)
    dm, _, pre = _crop_dataset(tmp_path, cfg)
    saved = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        img = np.random.default_rng(0).random((1024, 1024), np.float32)
        for _ in range(3):
            cv2.GaussianBlur(cv2.resize(img, (1500, 1500)), (0, 0), 3)
        crops = _CropThreads(dm.cache, dm.splits["train"], dm.metas["train"], cfg, pre)
        scans = _ScanThreads(dm.cache, dm.splits["val"], dm.metas["val"], pre)
        for ds in (crops, scans):
            items = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, timeout=60))
            assert items and all(it["cv2_threads"] == 1 for it in items)
        crops[0], scans[0]                                 # in this process: untouched
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(saved)


_FAULTS = """
import resource
import numpy as np
from detector.loader_workers import keep_freed_memory

def faults():  # minor page faults of 20 allocations of a 16 MB array, each written and freed
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a = np.empty(4 << 20, np.float32)
        a.fill(1.0)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

before = faults()
tuned = keep_freed_memory()
faults()                                     # the first allocation after tuning grows the heap once
print(tuned, before, faults())
"""


def test_loader_workers_keep_freed_memory_instead_of_faulting_it_back_in():
    """glibc hands freed blocks of tens of MB back to the kernel, so every synthetic truck page-faulted its
    temporaries in again; keep_freed_memory (run in each loader worker) reuses them. Measured in a fresh
    process on its own page-fault counter."""
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    tuned, before, after = out.stdout.split()
    if tuned != "True":
        pytest.skip("no glibc mallopt here: keep_freed_memory changes nothing")
    assert int(before) > 100 and int(after) * 10 < int(before), (before, after)


def test_crops_reach_into_the_padding_the_station_adds(tmp_path):
    """The station pads a scan with air to a multiple of 32 below and right; crops are cut from the scan so
    padded, so the bottom edge (where tyres meet it) also lands mid-cell in training, never past the pad."""
    _, ds, pre = _crop_dataset(tmp_path, DataConfig(crop=64, crops_per_epoch=10, workers=0))
    assert pre.pad_multiple == 32
    h0, w0 = 100, 300                                   # the station pads this to 128 x 320
    att = np.broadcast_to(np.arange(1, h0 + 1, dtype=np.float32)[None, :, None], (2, h0, w0)).copy()
    rng = np.random.default_rng(0)
    tops, widths = [], []
    for centres in ([(h0 - 1, 150)], [(50, w0 - 1)], None):
        for _ in range(100):
            out, _ = ds.cut(att, None, rng, centres=centres)
            col = out[:, 0, 0]
            n = int((col > 0).sum())                    # real rows first, then only air
            assert (col[:n] > 0).all() and not (col[n:] > 0).any()
            assert n == 64 or col[n - 1] == h0          # air only below the image's last row
            tops.append(int(col[0]) - 1)
            widths.append(int((out[0, :, 0] > 0).sum()))   # real columns in the crop's first row
    assert max(tops) == 128 - 64                        # the crop may end where the station's padding ends
    assert any(h0 - 64 < t for t in tops)               # the bottom edge inside the crop (it used to be its border)
    assert min(widths) == w0 - (320 - 64)               # right: up to the 20 px the station pads there


def test_normal_only_drops_anomalous_training_scans_and_enables_tip(tmp_path):
    root = write_dataset(tmp_path / "d", n=6)
    cfg = DataConfig(normal_only=True, workers=0)
    dm = ScanDataModule(root, cfg, Preprocessing(), tmp_path / "cache")
    dm.setup()
    assert all(r.label == 0 for r in dm.splits["train"]) and cfg.augment.tip_rate >= 0.5


def test_a_dataset_of_normal_scans_alone_trains_in_normal_only_mode(tmp_path):
    root = write_dataset(tmp_path / "d", n=6)
    rows = (root / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join([rows[0], *(r for r in rows[1:] if ",0," in r)]) + "\n")
    cfg = DataConfig(workers=0)
    assert cfg.augment.tip_rate < 0.5
    dm = ScanDataModule(root, cfg, Preprocessing(), tmp_path / "cache")
    with pytest.warns(UserWarning, match="no anomalous training scans: training in normal-only mode"):
        dm.setup()
    assert cfg.normal_only and cfg.augment.tip_rate >= 0.5
    fresh = DataConfig(workers=0, synth_per_epoch=4)          # fresh synthetic trucks bring labelled anomalies
    ScanDataModule(root, fresh, Preprocessing(), tmp_path / "cache").setup()
    assert not fresh.normal_only and fresh.augment.tip_rate < 0.5


def test_on_the_fly_synthetic_scans_renew_and_their_masks_mark_the_anomaly(tmp_path):
    torch.manual_seed(0)                                 # the worker seed the pool's trucks derive from
    cfg = DataConfig(crop=64, crops_per_epoch=60, anomaly_crop_fraction=0.5, workers=0,
                     synth_per_epoch=10, synth_share=1.0, synth_pool=3)
    dm, ds, pre = _crop_dataset(tmp_path, cfg)
    items = [ds[i] for i in range(60)]
    pool = ds._pool
    assert pool is not None and pool.crops_per_scan == 6
    assert pool.made == 3 + 10                           # 3 to fill the pool, one new truck every 6 crops
    assert all(p.att.shape[0] == 2 and p.att.shape[1:] == p.mask.shape for p in pool.scans)
    for it in items:
        assert it["x"].shape == (2, 64, 64) and float(it["label"]) == float(it["mask"].sum() > 0)
    positives = [it for it in items if it["label"] > 0]
    assert len(positives) >= 8       # ~half the crops ask for an anomaly (when the small pool holds one)
    # the mask marks exactly the added attenuation: the same truck without the anomaly differs only there
    for k in range(3):
        seed = np.random.SeedSequence([0, 0x5EED, 7], spawn_key=(k,))
        a, n = make_pool_scan(seed, True, pre, 2), make_pool_scan(seed, False, pre, 2)
        d, m = a.att[0] - n.att[0], a.mask > 0
        assert a.centres and not n.centres and m.any()
        assert d[m].mean() > 0.1 and np.abs(d[~m]).mean() < 0.01 * d[m].mean()
    cfg.normal_only = True                               # normal-only: fresh trucks are clean, TIP adds threats
    ds3 = CropDataset(dm.cache, dm.splits["train"], dm.metas["train"], cfg, pre)
    ds3[0]
    assert ds3._pool.anomaly_fraction == 0 and not any(p.centres for p in ds3._pool.scans)
    # two workers (other torch seeds) make other trucks
    other = SynthPool(1, 1, pre, 2, [0, 0x5EED, 12345])
    assert other.draw(np.random.default_rng(0), False).att.shape != pool.scans[-1].att.shape or \
        not np.array_equal(other.scans[0].att, pool.scans[-1].att)


def test_pool_twins_are_negatives_cut_where_the_anomaly_was_in_the_same_truck_without_it(tmp_path):
    pre, entropy = Preprocessing(), [0, 0x5EED, 9]
    pool = SynthPool(2, 100, pre, 2, entropy, anomaly_fraction=1.0, twin_fraction=1.0)
    rng = np.random.default_rng(0)
    pos, neg = pool.draw(rng, True), pool.draw(rng, False)
    assert pos.centres and pos.mask.any() and pos.twin is not None
    assert neg.centres and not neg.mask.any()            # centred where an anomaly was, with nothing to find
    k = next(i for i, s in enumerate(pool.scans) if s.twin is neg.att)
    clean = make_pool_scan(np.random.SeedSequence(entropy, spawn_key=(k,)), False, pre, 2)
    np.testing.assert_array_equal(neg.att, clean.att)    # the same truck and noise, no anomaly
    assert neg.centres == pool.scans[k].centres
    plain = SynthPool(2, 100, pre, 2, entropy, anomaly_fraction=1.0)
    assert plain.draw(rng, True).twin is None and not plain.draw(rng, False).centres  # off: random negatives
    # in the crop dataset every negative crop from fresh trucks is then a twin: labelled normal
    torch.manual_seed(0)
    cfg = DataConfig(crop=64, crops_per_epoch=12, anomaly_crop_fraction=0.0, workers=0, synth_per_epoch=4,
                     synth_share=1.0, synth_pool=2, synth_anomaly_fraction=1.0, synth_twin_fraction=1.0)
    _, ds, _ = _crop_dataset(tmp_path, cfg)
    items = [ds[i] for i in range(12)]
    assert all(float(it["label"]) == 0 and float(it["mask"].sum()) == 0 for it in items)
    assert all(s.twin is not None for s in ds._pool.scans)


def test_pool_keeps_an_anomaly_fainter_than_the_floor_as_its_clean_truck():
    pre, entropy = Preprocessing(), [0, 0x5EED, 11]
    faint = SynthPool(2, 100, pre, 2, entropy, anomaly_fraction=1.0, min_visibility=1e9)  # every anomaly too faint
    s = faint.draw(np.random.default_rng(0), True)
    assert faint.faint == 2 and not s.centres and not s.mask.any() and s.twin is None
    k = next(i for i, p in enumerate(faint.scans) if p is s)
    clean = make_pool_scan(np.random.SeedSequence(entropy, spawn_key=(k,)), False, pre, 2)
    np.testing.assert_array_equal(s.att, clean.att)       # the same truck and noise, without its anomaly
    seen = SynthPool(2, 100, pre, 2, entropy, anomaly_fraction=1.0, min_visibility=1e-9)
    s = seen.draw(np.random.default_rng(0), True)
    assert seen.faint == 0 and s.centres and s.mask.any() and s.twin is None  # the twin is not kept


def test_faint_generator_anomalies_are_left_out_of_training_only(tmp_path, caplog):
    import json
    import logging
    cfg = DataConfig(crop=32, workers=0, min_visibility=0.5)
    root = write_dataset(tmp_path / "d", n=6)             # train: s0 s1 s2 s3, anomalous s1 s3
    cache = tmp_path / "cache"
    cache.mkdir()
    from detector.synth.scene import GENERATOR_VERSION
    (cache / "train_visibility.json").write_text(json.dumps({"_generator": GENERATOR_VERSION, "s1": 0.2, "s3": 3.0}))
    dm = ScanDataModule(root, cfg, Preprocessing(), cache)
    dm.prepare_data()
    with caplog.at_level(logging.INFO):
        dm.setup()
    assert "data.min_visibility=0.5: 1 faint training anomalies left out" in caplog.text   # the user is told
    assert sorted(Path(r.path).stem for r in dm.splits["train"]) == ["s0", "s2", "s3"]
    assert len(dm.metas["train"]) == 3 and len(dm.splits["val"]) == 2   # validation keeps all its scans
    off = ScanDataModule(root, DataConfig(crop=32, workers=0), Preprocessing(), cache)
    off.setup()
    assert len(off.splits["train"]) == 4


def test_in_a_log_file_the_caching_bar_ends_its_line_before_a_warning(tmp_path):
    """A terminal clears the bar; written to a file it stays, and a warning used to run on from it."""
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for i in range(24):
        sub = "anomalous" if i % 2 else "normal"
        img = (150 + 50 * rng.random((40, 60))).astype(np.uint8)
        (root / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / sub / f"b{i}.png"), np.stack([img, img, img // 2], -1))   # colour: a warning
    code = ("import sys\nfrom detector.data import ScanDataModule, DataConfig\nfrom detector.preprocess import Preprocessing\n"
            f"dm = ScanDataModule({str(root)!r}, DataConfig(crop=32, label_only_crops=True), Preprocessing(), "
            f"{str(tmp_path / 'cache')!r})\n"
            "dm.prepare_data()\n")
    with open(tmp_path / "log.txt", "w") as log:
        p = subprocess.run([sys.executable, "-c", code], stderr=log, stdout=subprocess.DEVNULL, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert p.returncode == 0, text[-2000:]
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if "colour image converted" in ln]
    assert len(lines) == 1 and "caching scans" not in lines[0] and "24/24" in text, text[-2000:]


def test_masks_and_boxes_that_contradict_the_label_are_refused_and_0_1_16_bit_and_colour_masks_count(tmp_path):
    from detector.scan_cache import _scan_mask
    m01 = np.zeros((40, 60), np.uint8)
    m01[10:20, 10:20] = 1                                   # a labelling tool's 0/1 mask: 100 anomaly pixels
    cv2.imwrite(str(tmp_path / "m01.png"), m01)
    assert _scan_mask(Record("a.tiff", 1, str(tmp_path / "m01.png")), (40, 60)).sum() == 100
    for value in (1, 255):                                  # saved from a uint16 array (np.zeros_like(scan))
        cv2.imwrite(str(tmp_path / "m16.png"), m01.astype(np.uint16) * value)
        assert _scan_mask(Record("a.tiff", 1, str(tmp_path / "m16.png")), (40, 60)).sum() == 100
        with pytest.raises(ScanError, match="normal scan .label 0. whose mask marks 100"):
            _scan_mask(Record("a.tiff", 0, str(tmp_path / "m16.png")), (40, 60))
    cv2.imwrite(str(tmp_path / "red.png"), np.dstack([0 * m01, 0 * m01, 255 * m01]))   # a colour overlay
    assert _scan_mask(Record("a.tiff", 1, str(tmp_path / "red.png")), (40, 60)).sum() == 100
    clipped = _scan_mask(Record("a.tiff", 1, boxes=[[-20, -5, 10, 8]]), (40, 60))   # a corner off the image
    assert clipped.sum() == 10 * 8 and clipped[:8, :10].all()
    cases = [(Record("a.tiff", 1, boxes=[[70, 5, 90, 9]]), "covers no pixel"),        # beside the scan
             (Record("a.tiff", 1, boxes=[[30, 5, 20, 9]]), "covers no pixel"),        # x1 < x0
             (Record("a.tiff", 0, str(tmp_path / "m01.png")), "normal scan .label 0. whose mask marks 100"),
             (Record("a.tiff", 1, str(tmp_path / "nope.png")), "mask file not found")]
    cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((40, 60), np.uint8))
    cases.append((Record("a.tiff", 1, str(tmp_path / "blank.png")), "anomalous scan .label 1. whose mask marks no"))
    for rec, why in cases:
        with pytest.raises(ScanError, match=why):
            _scan_mask(rec, (40, 60))
    assert _scan_mask(Record("a.tiff", 1), (40, 60)) is None   # no mask at all: trained from the label


def test_manifest_split_typos_duplicates_and_fractional_labels_are_refused(tmp_path):
    root = write_dataset(tmp_path / "d", n=6)
    text = (root / "manifest.csv").read_text()
    for bad, why in ((text.replace(",val\n", ",holdout\n", 1), "split 'holdout' is not one of"),
                     (text + "./images/s0.tiff,0,,,,train\n", r"\./images/s0\.tiff is listed again \(row 2\)"),
                     (text.replace("images/s0.tiff,0,", "images/s0.tiff,0.9,", 1), "label '0.9' is not 0")):
        (root / "manifest.csv").write_text(bad)
        with pytest.raises(ScanError, match=why):
            load_records(root)


def test_a_validation_split_without_normal_scans_stops_before_training(tmp_path):
    root = write_dataset(tmp_path / "d", n=6)
    rows = (root / "manifest.csv").read_text().splitlines()
    fixed = [r.replace(",val", ",train") if ",0," in r else r for r in rows]   # only anomalies left in val
    (root / "manifest.csv").write_text("\n".join(fixed) + "\n")
    with pytest.raises(ScanError, match="validation split has no normal scans"):
        ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")


def test_one_scan_named_two_ways_is_one_cache_entry(tmp_path, monkeypatch):
    """A manifest beside the data (../data/x.tiff, as benchmarks/quality.py --labels-only writes) or another working
    directory names the same scan: it is one cache entry, not a second copy of its arrays."""
    root = write_dataset(tmp_path / "d", n=2)
    cache = ScanCache(tmp_path / "cache", Preprocessing())
    scan = root / "images" / "s0.tiff"
    keys = {cache._key(Record(str(scan), 0)), cache._key(Record(str(root / ".." / "d" / "images" / "s0.tiff"), 0))}
    monkeypatch.chdir(root)
    keys.add(cache._key(Record("images/s0.tiff", 0)))
    assert len(keys) == 1
    assert cache._key(Record(str(scan), 1)) not in keys   # the label is in the key (a relabelled scan)


def test_anomalous_training_scans_with_a_label_alone_are_left_out_unless_they_fit_in_a_crop(tmp_path, caplog):
    """Crops of an anomalous scan whose anomaly nobody placed were cut anywhere and taught as anomalous: on the quick
    config that cost 0.14 test AUROC against training without those scans, so they are left out (and said), unless
    data.label_only_crops=true. A scan that fits in one crop is that crop whole, so its label holds: it stays.
    Marked anomalies, normal scans and the validation split keep every scan."""
    import csv
    import logging
    root = write_dataset(tmp_path / "d", n=12)   # 70x150 and 90x190 px at 5 mm: at most 45x95 px at 10 mm
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    blank = [r["path"] for r in rows if r["split"] == "train" and r["label"] == "1"][:2]
    for r in rows:
        if r["path"] in blank:
            r["mask"] = ""
    with open(root / "manifest.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    train_all = [r["path"] for r in rows if r["split"] == "train"]
    n_anomalous = sum(1 for r in rows if r["split"] == "train" and r["label"] == "1")

    def ready(**cfg) -> ScanDataModule:
        dm = ScanDataModule(root, DataConfig(workers=0, **cfg), Preprocessing(), tmp_path / "cache")
        dm.prepare_data()
        dm.setup()
        assert [m["key"] for m in dm.metas["train"]] == [dm.cache._key(r) for r in dm.splits["train"]]
        return dm

    with pytest.warns(UserWarning, match=f"2 of {n_anomalous} anomalous training scans have a label alone .* larger "
                                         "than a training crop"):
        dm = ready(crop=32)
    kept = sorted(Path(r.path).name for r in dm.splits["train"])
    assert kept == sorted(Path(p).name for p in train_all if p not in blank)
    assert any(r.label == 1 for r in dm.splits["train"])   # the marked anomalies stay
    assert len(dm.splits["val"]) == sum(r["split"] == "val" for r in rows)
    assert len(ready(crop=32, label_only_crops=True).splits["train"]) == len(train_all)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error")   # no left-out warning: both fit in a 96 px crop
        fit = ready(crop=96)
    assert len(fit.splits["train"]) == len(train_all)
    assert "2 anomalous training scans with a label alone fit in one training crop" in caplog.text


def _label_only_in_every_format(root: Path) -> dict[str, int]:
    """write_dataset's folder plus anomalous training scans with a label alone in every format the readers take,
    each pitch resolved its own way; returns each one's longer side at the model's 10 mm pitch."""
    import csv

    from conftest import dicom_bytes
    from test_train import I0, make_scan
    rng = np.random.default_rng(1)
    write_dataset(root, n=12)   # 70x150 and 90x190 px at 5 mm, labelled by masks

    def counts(h: int, w: int, channels: int = 1) -> np.ndarray:
        return attenuation_to_counts(make_scan(rng, h, w, True, channels)[0], I0)
    extra = root / "extra"
    extra.mkdir()
    write_scan(extra / "a.tiff", counts(70, 200, 2), i0=(I0, I0), pitch_mm=5.0)       # pitch in its description
    import tifffile
    tifffile.imwrite(extra / "r.tiff", counts(60, 240)[0], photometric="minisblack", resolution=(2.5, 2.5),
                     resolutionunit="CENTIMETER")                                    # 4 mm in resolution tags
    np.save(extra / "a.npy", counts(64, 193, 2))                                     # 5 mm default: 96.5 -> 96
    np.savez(extra / "a.npz", counts=counts(64, 160, 2), pitch_mm=np.array(6.0))
    cv2.imwrite(str(extra / "a.png"), counts(64, 190)[0])
    cv2.imwrite(str(extra / "a.jpg"), (counts(64, 196)[0] // 256).astype(np.uint8))
    (extra / "square.dcm").write_bytes(dicom_bytes(counts(64, 240)[0]))              # 4 mm
    (extra / "aniso.dcm").write_bytes(dicom_bytes(counts(120, 100)[0], ImagerPixelSpacing=[2.0, 6.0]))
    sides = {"a.tiff": 100, "r.tiff": 96, "a.npy": 96, "a.npz": 96, "a.png": 95, "a.jpg": 98, "square.dcm": 96,
             "aniso.dcm": 60}
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows += [{**rows[1], "path": f"extra/{name}", "mask": "", "split": "train"} for name in sides]
    with open(root / "manifest.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return sides


def test_label_only_scans_larger_than_a_crop_are_left_out_from_their_header_uncached(tmp_path, monkeypatch):
    """A site's thousands of whole trucks with a label alone were each read, resampled and cached, then left out of
    training for being larger than a crop. The size now comes from each file's header first: those left out are
    never read nor cached, and what is left out, and said, is what the cached size decided (that path stays for a
    header that cannot tell), in every format."""
    import detector.data as data
    sides = _label_only_in_every_format(tmp_path / "d")
    built: list[str] = []
    build = ScanCache.build
    monkeypatch.setattr(ScanCache, "build", lambda self, rec: built.append(Path(rec.path).name) or build(self, rec))

    def ready(crop: int, cache: Path) -> tuple[ScanDataModule, list[str]]:
        built.clear()
        dm = ScanDataModule(tmp_path / "d", DataConfig(workers=0, crop=crop, channels=1), Preprocessing(), cache)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm.prepare_data()
            dm.setup()
        return dm, [str(w.message) for w in caught if "label alone" in str(w.message)]

    for crop in (64, 96):
        out = {name for name, side in sides.items() if side > crop}
        dm, said = ready(crop, tmp_path / f"cache{crop}")
        assert not out & set(built), crop                                     # never read
        for rec in dm.records:
            if Path(rec.path).name in out:
                assert not list(dm.cache.folder.glob(dm.cache._key(rec) + ".*")), rec.path   # nor cached
        kept = [Path(r.path).name for r in dm.splits["train"]]
        assert not out & set(kept) and set(sides) - out <= set(kept), crop
        assert {Path(p).name for p in dm._left_out_uncached()} == out        # each format decided from its header
        assert len(said) == 1 and f"{len(out)} of " in said[0], said
        assert [m["key"] for m in dm.metas["train"]] == [dm.cache._key(r) for r in dm.splits["train"]]
        monkeypatch.setattr(data, "scan_geometry", lambda path, pitch: None)  # a header that cannot tell: cached first
        cached, said_cached = ready(crop, tmp_path / f"cached{crop}")
        monkeypatch.undo()
        monkeypatch.setattr(ScanCache, "build", lambda self, rec: built.append(Path(rec.path).name) or build(self, rec))
        assert out <= set(built) and not cached._left_out_uncached()
        assert [r.path for r in cached.splits["train"]] == [r.path for r in dm.splits["train"]] and said_cached == said


def _plain_rgb(root: Path, normal: int, anomalous: int) -> Path:
    """A site's own plain folder of 8-bit RGB pictures (no manifest, no masks), of varied sizes."""
    rng = np.random.default_rng(0)
    for sub, n in (("normal", normal), ("anomalous", anomalous)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = ((60, 100), (48, 160), (90, 70))[i % 3]
            img = (200 - 100 * rng.random((h, w, 3))).astype(np.uint8)
            cv2.imwrite(str(root / sub / f"{sub[0]}{i}.png"), img)
    return root


def test_plain_rgb_folder_caches_each_picture_once_and_says_what_to_add(tmp_path, monkeypatch):
    """A tiny plain folder validates on its training scans: the same records sit in two splits, and each picture was
    read (and counted in the conversion warning) once per split. The label-only warning named manifest boxes and a
    split column, which the plain layout has neither of."""
    root = _plain_rgb(tmp_path / "d", normal=3, anomalous=1)
    dm = ScanDataModule(root, DataConfig(crop=32, workers=0, val_fraction=0, test_fraction=0), Preprocessing(),
                        tmp_path / "cache")
    assert dm.splits["val"] == dm.splits["train"]          # no validation split: validated on the training scans
    built: list[str] = []
    build = ScanCache.build
    monkeypatch.setattr(ScanCache, "build", lambda self, rec: built.append(rec.path) or build(self, rec))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()
    assert sorted(built) == sorted(r.path for r in dm.splits["val"])     # 4 pictures, each read once
    said = [str(w.message) for w in caught if "colour image converted" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("4 scan(s)")
    with pytest.warns(UserWarning, match=r"Give each a mask \(.*masks/<same stem>\.png"):
        dm.setup()                                         # the anomalous picture is larger than a 32 px crop
    assert len(dm.splits["train"]) == 3 and len(dm.splits["val"]) == 4


def test_a_dataset_without_normal_scans_is_refused_as_such(tmp_path):
    root = _plain_rgb(tmp_path / "d", normal=0, anomalous=4)
    with pytest.raises(ScanError, match="the dataset has no normal scans"):   # not "put some in split=val"
        ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")


def _one_truck_at(pitch_mm: float, columns: int = 60) -> np.ndarray:
    """uint16 counts (H, W) of one physical truck (20 mm cells: air on top, cargo, a dense block) as a scanner of
    `pitch_mm` (4 or 5) images it: the same metres in 5 or 4 file pixels per cell."""
    att = np.zeros((20, columns), np.float32)
    att[4:, 3:-3] = 0.6
    att[18:, :] = 1.2
    att[8:12, 20:30] = 4.0
    k = round(20 / pitch_mm)
    return attenuation_to_counts(np.kron(att, np.ones((k, k), np.float32))[None], 53000.0)[0]


def test_a_manifest_of_two_scanners_reads_each_untagged_file_at_its_rows_pitch(tmp_path):
    """A site labels its 4 mm and 5 mm scanners' untagged 16-bit PNG/TIFFs in one manifest: data.pitch_mm gave one
    pitch to all, so one scanner's trucks were cached 25 % off in size. A row's pitch_mm is now its file's pitch: the
    4 mm truck is cached as the same truck from the 5 mm scanner is; a tagged file keeps its own pitch despite the
    cell; an empty cell falls back to data.pitch_mm; the header rule for label-only scans (fits in a crop) uses the
    row's pitch; a changed cell re-keys that entry alone and changes the data fingerprint, which stays what it was
    for rows without one."""
    import tifffile

    from detector.records import fingerprint
    root = write_dataset(tmp_path / "d", n=12)   # tagged 5 mm dual-energy scans, labelled by masks
    cv2.imwrite(str(root / "images" / "four.png"), _one_truck_at(4))                      # 100 x 300 px
    tifffile.imwrite(root / "images" / "five.tiff", _one_truck_at(5), photometric="minisblack")   # 80 x 240, no tag
    write_scan(root / "images" / "tagged.tiff", _one_truck_at(5), i0=(53000.0,), pitch_mm=5.0)
    cv2.imwrite(str(root / "images" / "empty.png"), _one_truck_at(4))
    cv2.imwrite(str(root / "images" / "wide.png"), _one_truck_at(4, columns=75))          # 100 x 375, label alone
    with open(root / "manifest.csv", newline="") as f:
        rows = [{**r, "pitch_mm": ""} for r in csv.DictReader(f)]
    cells = {"four.png": "4", "five.tiff": "5", "tagged.tiff": "4", "empty.png": "", "wide.png": "4"}
    rows += [{**rows[0], "path": f"images/{name}", "label": int(name == "wide.png"), "mask": "", "anomaly_type": "",
              "split": "train", "pitch_mm": cell} for name, cell in cells.items()]
    write_manifest(root, rows)
    cfg = DataConfig(workers=0, channels=1, crop=160, pitch_mm=4.5)
    dm = ScanDataModule(root, cfg, Preprocessing(), tmp_path / "cache")
    assert not {Path(p).name for p in dm._left_out_uncached()}   # wide: 150 model px at 4 mm, 169 at 4.5: past 160
    dm.prepare_data()
    dm.setup()
    metas = {Path(r.path).name: m for r, m in zip(dm.splits["train"], dm.metas["train"])}
    assert "wide.png" in metas
    shapes = {name: (tuple(metas[name]["shape"]), metas[name]["pitch_mm"]) for name in cells}
    assert shapes == {"four.png": ((1, 40, 120), 4.0), "five.tiff": ((1, 40, 120), 5.0),
                      "tagged.tiff": ((1, 40, 120), 5.0), "empty.png": ((1, 45, 135), 4.5),
                      "wide.png": ((1, 40, 150), 4.0)}
    four, five = (dm.cache.load(metas[name])[0] for name in ("four.png", "five.tiff"))
    np.testing.assert_allclose(four, five, atol=1e-5)          # one truck, whichever scanner imaged it

    keys, print_before = {r.path: dm.cache._key(r) for r in dm.records}, fingerprint(dm.records, 4.5)
    rows[-4]["pitch_mm"] = "4.8"                                # five.tiff's cell changed
    write_manifest(root, rows)
    again = load_records(root)
    changed = {Path(r.path).name for r in again if dm.cache._key(r) != keys[r.path]}
    assert changed == {"five.tiff"} and fingerprint(again, 4.5) != print_before
    assert fingerprint([Record("x/a.png", 0), Record("x/b.png", 1, boxes=[[1, 2, 3, 4]], split="val")]) \
        == "54d3b03830c6d3f5"                                   # as before the column: rows without a pitch
    assert fingerprint([Record("x/a.png", 0, pitch_mm=4.0), Record("x/b.png", 1, boxes=[[1, 2, 3, 4]], split="val")]) \
        != "54d3b03830c6d3f5"


def test_tip_tyres_cuts_crops_around_a_wheel_with_bags_packed_into_its_tyre(tmp_path):
    """Cleared traffic never shows a package in a tyre, and TIP inserts threats into the cargo: a share of the random
    normal crops is instead cut around a wheel the scan shows, with bags in that tyre's air space."""
    from detector import tip
    from detector.synth import vehicles
    from detector.synth.dataset import write_dataset as write_trucks
    write_trucks(tmp_path / "d", 3, seed=5, anomaly_fraction=0.0, workers=1, height=240, progress=False)   # ~10 mm
    pre = Preprocessing()

    def crops(tyres: float) -> tuple[CropDataset, list[dict]]:
        cfg = DataConfig(crop=160, crops_per_epoch=12, hard_negative_fraction=0.0, workers=0, val_fraction=0.34,
                         test_fraction=0.0)
        cfg.augment.enabled, cfg.augment.tip_tyres = False, tyres
        dm = ScanDataModule(tmp_path / "d", cfg, pre, tmp_path / "cache")
        with pytest.warns(UserWarning, match="normal-only mode"):
            dm.setup()
        ds = CropDataset(dm.cache, dm.splits["train"], dm.metas["train"], cfg, pre)
        return ds, [ds[i] for i in range(12)]

    off, items = crops(0.0)
    assert off._wheels == {} and sum(float(it["label"]) for it in items) < 12   # TIP alone: about half
    ds, items = crops(1.0)
    assert any(ds._wheels.values()) and all(float(it["label"]) == 1 for it in items)
    i = next(k for k, w in ds._wheels.items() if w)
    img, mask = ds._tyre_crop(i, np.random.default_rng(0))
    (x, y, r), = [w for w in tip.find_wheels(np.moveaxis(img, -1, 0), 10.0) if w[2] * 2 < 160][:1]
    ys, xs = np.nonzero(mask)
    rho = np.hypot(xs - x, ys - y)   # in the crop's wheel, between its rim flange and its tread
    assert mask.any() and vehicles.TYRE_AIR[0] * r - 3 <= rho.min() and rho.max() <= vehicles.TYRE_AIR[1] * r + 3


def test_a_scan_up_from_a_linked_folder_has_its_own_cache_entry(tmp_path):
    """The cache named an entry by os.path.abspath of its scan's path, which reads `scans/linkdir/../x.tiff` as
    scans/x.tiff where the OS opens x.tiff beside the link's target: two scans of one size and time shared one
    entry, and training read the first one's arrays for both. The entry now names the file the OS opens."""
    from conftest import write_test_scan
    (tmp_path / "elsewhere" / "target").mkdir(parents=True)
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "linkdir").symlink_to(tmp_path / "elsewhere" / "target")
    near, far = tmp_path / "scans" / "x.tiff", tmp_path / "elsewhere" / "x.tiff"
    write_test_scan(near, seed=1)
    write_test_scan(far, dense=True, seed=2)
    assert near.stat().st_size == far.stat().st_size
    os.utime(far, ns=(near.stat().st_atime_ns, near.stat().st_mtime_ns))
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0))
    a = cache.load(cache.build(Record(str(near), 0)))[0]
    b = cache.load(cache.build(Record(str(tmp_path / "scans" / "linkdir" / ".." / "x.tiff"), 0)))[0]
    assert not np.array_equal(a, b)


def test_a_turned_camera_jpeg_trains_with_the_mask_drawn_on_what_a_viewer_shows(tmp_path):
    """A JPEG stored portrait with an EXIF tag to show it landscape (a phone's or viewer's picture), masked on the
    picture a labelling tool shows: the mask was refused as the wrong size (500x300 against 300x500) and the scan
    left out of training. Now the scan is read turned, the mask fits and marks the threat where it is drawn."""
    from test_scan import _exif_jpeg
    shown = np.full((60, 100), 220, np.uint8)
    shown[10:20, 60:80] = 30                       # the threat, top right as the viewer shows it
    mask = np.zeros_like(shown)
    mask[10:20, 60:80] = 255
    (tmp_path / "a.jpg").write_bytes(_exif_jpeg(np.ascontiguousarray(np.rot90(shown, 1)), 6))   # 6: turn 90 cw
    cv2.imwrite(str(tmp_path / "a.png"), mask)
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # 8-bit input
        a, m = cache.load(cache.build(Record(str(tmp_path / "a.jpg"), 1, mask=str(tmp_path / "a.png"))))
    assert a.shape[1:] == m.shape == (30, 50)
    assert a[0][m > 0].mean() > a[0][m == 0].mean() + 1   # the mask lies on the dense threat


def test_a_turned_png_trains_with_its_mask_and_its_older_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    """A PNG whose eXIf chunk turns it (as a viewer shows it), masked on the shown picture: the mask was refused as
    the wrong size. Now it fits, and the entry's key differs from the one cached when the PNG was read unturned."""
    from test_scan import _exif_png

    from detector import scan_cache
    shown = np.full((60, 100), 220, np.uint8)
    shown[10:20, 60:80] = 30
    mask = np.zeros_like(shown)
    mask[10:20, 60:80] = 255
    (tmp_path / "a.png").write_bytes(_exif_png(np.ascontiguousarray(np.rot90(shown, 1)), 6))
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    cache, rec = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0)), Record(str(tmp_path / "a.png"), 1,
                                                                                          mask=str(tmp_path / "m.png"))
    a, m = cache.load(cache.build(rec))
    assert a.shape[1:] == m.shape == (30, 50)
    assert a[0][m > 0].mean() > a[0][m == 0].mean() + 1
    key = cache._key(rec)
    monkeypatch.setattr(scan_cache, "file_view", lambda path: (1, False))   # as the key was made before
    assert cache._key(rec) != key


def test_only_transparent_images_get_a_new_cache_key_since_alpha_is_laid_over_air(tmp_path, monkeypatch):
    """Cache entries made before transparent pixels were composited over air held the black under them (the densest
    material): an RGBA PNG, a palette PNG with tRNS and a grey+alpha TIFF get a new key, so they are rebuilt; an
    opaque PNG and a scanner's TIFF keep theirs."""
    import tifffile

    from detector import scan_cache
    grey = np.full((40, 60), 200, np.uint8)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    cv2.imwrite(str(tmp_path / "opaque.png"), grey)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgba[..., :3])
    for name, source, value in (("trns.png", "rgb.png", b"\x00" * 6), ("grey_trns.png", "opaque.png", b"\x00" * 2)):
        png, trns = (tmp_path / source).read_bytes(), b"tRNS" + value   # before IDAT: black is transparent
        chunk = struct.pack(">I", len(value)) + trns + struct.pack(">I", zlib.crc32(trns))
        (tmp_path / name).write_bytes(png[:33] + chunk + png[33:])
    # OpenCV reads an RGB PNG's tRNS as an alpha channel, a grey PNG's not
    assert [cv2.imread(str(tmp_path / n), cv2.IMREAD_UNCHANGED).shape[2:] for n in ("trns.png", "grey_trns.png")] \
        == [(4,), ()]
    tifffile.imwrite(tmp_path / "ga.tiff", np.dstack([grey, grey]), photometric="minisblack", extrasamples=[2])
    tifffile.imwrite(tmp_path / "scan.tiff", np.full((40, 60), 30000, np.uint16))
    tifffile.imwrite(tmp_path / "dual.tiff", np.full((40, 60, 2), 30000, np.uint16), photometric="minisblack",
                     extrasamples=[0])   # two energies: the second sample unspecified, no alpha
    cache = ScanCache(tmp_path / "cache", Preprocessing(model_pitch_mm=10.0))
    keys = {n: cache._key(Record(str(tmp_path / n), 0)) for n in ("rgba.png", "trns.png", "ga.tiff", "opaque.png",
                                                                   "grey_trns.png", "rgb.png", "scan.tiff", "dual.tiff")}
    monkeypatch.setattr(scan_cache, "file_view", lambda path: (1, False))   # as the key was made before
    old = {n: cache._key(Record(str(tmp_path / n), 0)) for n in keys}
    assert [n for n in keys if keys[n] != old[n]] == ["rgba.png", "trns.png", "ga.tiff"]


def test_a_split_left_without_anomalies_is_said(tmp_path):
    """A first labelled set: 21 normal scans and 3 seizures, no split column. The seeded split rounds each label's
    share (3 x 0.15 -> 0), so all 3 train and validation and test have none: their figures are n/a and best.ckpt
    cannot be ranked on them. That was said nowhere; a warning now names the splits and the counts."""
    root = write_dataset(tmp_path / "d", n=24)
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    rows = [{**r, "split": ""} for r in rows if r["label"] == "0" or r["path"] in ("images/s1.tiff", "images/s3.tiff",
                                                                                   "images/s5.tiff")]
    write_manifest(root, rows)
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    dm.prepare_data()
    with pytest.warns(UserWarning, match=r"the val and test splits have no anomalous scans \(train 3, val 0, "
                                         r"test 0\).*seeded split.*n/a.*split=val"):
        dm.setup("fit")
    assert [sum(r.label for r in dm.splits[s]) for s in ("train", "val", "test")] == [3, 0, 0]
    rows = [{**r, "split": "val" if r["path"] in ("images/s1.tiff", "images/s0.tiff", "images/s2.tiff") else ""}
            for r in rows]
    write_manifest(root, rows)    # one seizure in validation: the split column then decides, and nothing is missing
    dm = ScanDataModule(root, DataConfig(workers=0), Preprocessing(), tmp_path / "cache")
    dm.prepare_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert not [w for w in caught if "no anomalous scans" in str(w.message)]
