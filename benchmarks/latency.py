"""File-to-verdict latency on a full 640x2400 px dual-energy 16-bit TIFF: ORT fp32, ORT int8, torch eager.

    .venv/bin/python benchmarks/latency.py [--checkpoint RUN/best.ckpt] [--threads 2] [--runs 20]

Without a checkpoint the default architecture (configs/default.yaml `model:`) is randomly
initialised: fine for timing, and the INT8 drift figures are then only a smoke test. Every backend
runs in its own process: torch's OpenMP threads slow onnxruntime by up to 40 % in a shared one.
Targets (2 cores): fp32 median <= 100 ms, int8 <= 50 ms, ORT >= 3x faster than torch eager.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
I0 = 60000.0


def synth_scan(path: Path, height: int = 640, width: int = 2400, dense: bool = False, seed: int = 0,
               compress: bool = True) -> Path:
    """A truck-like dual-energy uint16 TIFF: air, container wall, mixed cargo, chassis, optional dense block.
    compress=False writes raw strips, as scanners do (write_scan's zlib costs ~20 ms to decode)."""
    import tifffile

    from detector.scan import write_scan

    rng = np.random.default_rng(seed)
    att = np.zeros((height, width), np.float32)
    top, x0, x1 = height // 6, width // 12, width - width // 24
    att[top:, x0:x1] = 0.35
    for _ in range(12):  # cargo boxes of varying density
        y, x = rng.integers(top, height - 80), rng.integers(x0, x1 - 200)
        att[y:y + rng.integers(40, 160), x:x + rng.integers(60, 300)] += rng.uniform(0.2, 1.4)
    att[height - height // 12:, :] = 1.6  # chassis and wheels
    if dense:
        y, x = rng.integers(top + 40, height - 200), rng.integers(x0, x1 - 150)
        att[y:y + rng.integers(20, 80), x:x + rng.integers(20, 120)] += 3.5
    att += rng.normal(0, 0.02, att.shape).astype(np.float32)
    counts = rng.poisson(I0 * np.exp(-np.stack([att, 1.3 * att]).clip(0, None))).clip(0, 65535).astype(np.uint16)
    path = write_scan(path, counts, i0=(I0, I0), pitch_mm=5.0, energies=("high", "low"))
    if not compress:
        with tifffile.TiffFile(path) as t:
            desc = t.pages[0].description
        with tifffile.TiffWriter(path) as tw:
            for c in range(2):
                tw.write(counts[c], photometric="minisblack", description=desc if c == 0 else None, metadata=None)
    return path


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "min": float(a.min()), "n": len(a)}


# ---------------------------------------------------------------- subprocess roles

def role_export(work: Path, checkpoint: str | None, config: str, calib: Path) -> None:
    """(torch) Build/load the model, save its weights, export fp32 + int8 bundles, count FLOPs."""
    import torch

    from detector.calibration import threshold_table
    from detector.export import export_bundle, make_int8_bundle
    from detector.model import ModelConfig, build_model, count_flops
    from detector.bundle import read_metadata
    from detector.preprocess import Preprocessing, model_size, padded_size

    if checkpoint:
        from detector.checkpoint import CheckpointError, load_checkpoint
        try:
            model, info = load_checkpoint(checkpoint)
        except CheckpointError as e:   # a missing or wrong --checkpoint: one line for _sub to pass on
            sys.exit(str(e))
        cfg = model.cfg
    else:
        import dataclasses

        import yaml
        raw = (yaml.safe_load(Path(config).read_text()) or {}).get("model", {}) if Path(config).is_file() else {}
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in raw.items() if k in names and k != "weights"})
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        scores = np.linspace(0.01, 0.4, 300).tolist()
        info = dict(channels=cfg.in_channels, energies=["high", "low"][: cfg.in_channels] if cfg.in_channels == 2
                    else ["single"], preprocessing=Preprocessing().to_dict(), stride=cfg.stride,
                    score={"method": "topk_mean_logit", "k": cfg.topk}, thresholds=threshold_table(scores),
                    normal_scores=scores, validation={}, train_config={"model": dataclasses.asdict(cfg)},
                    data_fingerprint="random-init")
    torch.save({"cfg": cfg.__dict__, "state": model.state_dict()}, work / "weights.pt")
    export_bundle(model, info, work / "fp32.onnx", log=lambda s: None)
    drift = make_int8_bundle(work / "fp32.onnx", work / "int8.onnx", calib, read_metadata(work / "fp32.onnx"),
                             max_drop=100.0, log=lambda s: None)
    pre = Preprocessing.from_dict(info["preprocessing"])
    h, w = padded_size(*model_size(640, 2400, 5.0, pre), pre.pad_multiple)   # the timed scan at the model's pitch
    flops = count_flops(model, cfg.in_channels, h, w)
    (work / "export.json").write_text(json.dumps({"cfg": cfg.__dict__, "gflops": flops / 1e9, "input_hw": [h, w],
                                                  "int8": drift, "trained": bool(checkpoint)}))


def role_torch(work: Path, scan: Path, threads: int, runs: int) -> None:
    """(torch) Eager file-to-verdict: read, prepare, forward, decision + regions."""
    import cv2
    import torch

    from detector.bundle import default_threshold, read_metadata
    from detector.model import ModelConfig, build_model
    from detector.preprocess import Preprocessing, prepare
    from detector.scan import read_scan

    torch.set_num_threads(threads)
    saved = torch.load(work / "weights.pt", weights_only=False)
    model = build_model(ModelConfig(**saved["cfg"])).eval()
    model.load_state_dict(saved["state"])
    meta = read_metadata(work / "fp32.onnx")
    # the bundle's default rate, as the Inspector decides (thresholds[0] is only that row by the table's order)
    pre, ch, thr = Preprocessing.from_dict(meta["preprocessing"]), meta["channels"], default_threshold(meta)[0]
    total, infer, cpu = [], [], []
    for i in range(runs + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        x = prepare(read_scan(scan), pre, ch).x[None]
        t1 = time.perf_counter()
        with torch.inference_mode():
            heat, score = model(torch.from_numpy(x))
        t2 = time.perf_counter()
        hm = heat[0, 0].numpy()
        _ = ("INSPECT" if float(score[0]) >= thr else "RELEASE", cv2.connectedComponentsWithStats((hm >= 0.5).astype(np.uint8)))
        t3, c3 = time.perf_counter(), time.process_time()
        if i >= 2:
            total.append((t3 - t0) * 1e3)
            infer.append((t2 - t1) * 1e3)
            cpu.append((c3 - c0) * 1e3)
    print(json.dumps({"total": _stats(total), "infer": _stats(infer), "cpu": _stats(cpu)}))


def role_ort(model: Path, scan: Path, threads: int, runs: int) -> None:
    """(no torch) Inspector file-to-verdict."""
    from detector.runtime import Inspector

    assert "torch" not in sys.modules
    ins = Inspector(model, threads=threads)
    total, infer, cpu = [], [], []
    for i in range(runs + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        v = ins.inspect(scan)
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= 2:
            total.append((t1 - t0) * 1e3)
            infer.append(v.timings_ms["infer"])
            cpu.append((c1 - c0) * 1e3)
    print(json.dumps({"total": _stats(total), "infer": _stats(infer), "cpu": _stats(cpu), "stages": v.timings_ms}))


def _sub(*args: str) -> dict | None:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        err = out.stderr.strip()
        sys.exit(f"{args[1]} failed: {err}" if "\n" not in err else f"{args[1]} failed:\n{err[-3000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--zlib", dest="raw_tiff", action="store_false",
                    help="time a zlib-compressed TIFF (write_scan's default) instead of a raw one")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scan", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "export":
        return role_export(Path(a.work), a.checkpoint, a.config, Path(a.work) / "calib")
    if a.role == "torch":
        return role_torch(Path(a.work), Path(a.scan), a.threads, a.runs)
    if a.role == "ort":
        return role_ort(Path(a.model), Path(a.scan), a.threads, a.runs)

    if not Path(a.config).is_file():   # else the export would time ModelConfig's defaults, not the config's network
        sys.exit(f"{a.config}: no such config file")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scan = synth_scan(work / "scan.tiff", dense=True, seed=99, compress=not a.raw_tiff)
        for i in range(4):
            synth_scan(work / "calib" / "normal" / f"n{i}.tiff", seed=i)
            synth_scan(work / "calib" / "anomalous" / f"a{i}.tiff", dense=True, seed=100 + i)
        load0 = os.getloadavg()
        t = time.perf_counter()
        # the roles run in ROOT: paths the user gave relative to where they are must be made absolute
        ck = ["--checkpoint", str(Path(a.checkpoint).resolve())] if a.checkpoint else []
        _sub("--role", "export", "--work", tmp, "--config", str(Path(a.config).resolve()), *ck)
        info = json.loads((work / "export.json").read_text())
        print(f"model: {info['cfg']['backbone']} (stride {info['cfg']['stride']}, decoder {info['cfg']['decoder_channels']}, "
              f"{'trained' if info['trained'] else 'random init'}), input {info['input_hw']} from a 640x2400 px scan, "
              f"{info['gflops']:.2f} GFLOPs; export {time.perf_counter() - t:.0f} s")
        d = info["int8"]
        print(f"int8 drift on 8 synthetic scans: AUROC {d.get('auroc_fp32')} -> {d.get('auroc_int8')}, "
              f"score |diff| max {d['score_max_abs_diff']:.4f}")
        common = ["--scan", str(scan), "--threads", str(a.threads), "--runs", str(a.runs)]
        res = {"ORT fp32": _sub("--role", "ort", "--model", str(work / "fp32.onnx"), *common),
               "ORT int8": _sub("--role", "ort", "--model", str(work / "int8.onnx"), *common),
               "torch eager": _sub("--role", "torch", "--work", tmp, *common)}
        load1 = os.getloadavg()
    print(f"\nfile -> verdict ({'raw' if a.raw_tiff else 'zlib'} TIFF), {a.threads} thread(s), {a.runs} runs each "
          f"(separate processes)")
    print(f"{'backend':<12} {'median ms':>10} {'p95 ms':>8} {'infer med':>10} {'GFLOP/s':>8} {'CPU ms':>8} {'CPU ms/thread':>14}")
    for name, r in res.items():
        gfs = info["gflops"] / (r["infer"]["median"] / 1e3)
        c = r["cpu"]["median"]
        print(f"{name:<12} {r['total']['median']:>10.1f} {r['total']['p95']:>8.1f} {r['infer']['median']:>10.1f} "
              f"{gfs:>8.1f} {c:>8.1f} {c / a.threads:>14.1f}")
    print("(CPU ms: process CPU time per verdict, barely affected by other load; CPU ms/thread approximates the "
          "median on an idle machine when the threads scale perfectly)")
    tt = res["torch eager"]["total"]["median"]
    f32, i8 = res["ORT fp32"]["total"]["median"], res["ORT int8"]["total"]["median"]
    print(f"stages ORT fp32 (last run, ms): {json.dumps({k: round(v, 1) for k, v in res['ORT fp32']['stages'].items()})}")
    print(f"speed-up vs torch eager: fp32 {tt / f32:.1f}x, int8 {tt / i8:.1f}x (ratio ORT/torch {f32 / tt:.2f} / {i8 / tt:.2f})")
    print(f"targets: fp32 <= 100 ms {'OK' if f32 <= 100 else 'MISSED'}, int8 <= 50 ms {'OK' if i8 <= 50 else 'MISSED'}, "
          f">= 3x torch {'OK' if tt / f32 >= 3 else 'MISSED'}")
    from detector.cpus import quota_words, usable_cpus
    print(f"machine load (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} cores, "
          f"{usable_cpus()} usable{quota_words()}")


if __name__ == "__main__":
    main()
