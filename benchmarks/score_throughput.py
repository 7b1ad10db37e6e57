"""Batch-scoring throughput (scans/s) and peak memory of `detector score`, run by hand.

    .venv/bin/python benchmarks/score_throughput.py                     # N=500, default model
    .venv/bin/python benchmarks/score_throughput.py --model model.onnx --n 500 --rss-counts 100,500

Synthetic full-size scans are generated once (detector synth) into --cache and reused. Each count
runs in a fresh subprocess that reads its own ru_maxrss, so the peak RSS of 100 vs 500 scans shows
whether memory grows with the folder size (it must not: scoring streams). Target: >= 10 scans/s
with the default model on the station CPU.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_scans(cache: Path, n: int, seed: int) -> list[Path]:
    """At least n synthetic scans in cache/ (generated with `detector synth` on first use)."""
    from detector.scan import SCAN_SUFFIXES
    images = cache / "images"
    have = sorted(p for p in images.glob("*") if p.suffix.lower() in SCAN_SUFFIXES) if images.is_dir() else []
    if len(have) < n:
        print(f"generating {n} synthetic scans in {cache} (once) ...", file=sys.stderr)
        try:
            import detector.synth.dataset  # noqa: F401
            subprocess.run([sys.executable, "-m", "detector.cli", "synth", str(cache), "--count", str(n),
                            "--seed", str(seed), "--anomaly-fraction", "0.5"], check=True, cwd=ROOT)
        except ImportError:
            print("detector.synth is not available: writing plain stand-in truck scans", file=sys.stderr)
            fallback_scans(images, n, seed)
        have = sorted(p for p in images.glob("*") if p.suffix.lower() in SCAN_SUFFIXES)
    if len(have) < n:
        raise SystemExit(f"{cache}: only {len(have)} scans after generation, wanted {n}")
    return have[:n]


def fallback_scans(images: Path, n: int, seed: int, height: int = 700, width: int = 3000) -> None:
    """Full-size dual-energy stand-ins (air, container, noisy cargo, wheels, a dense block in half)."""
    import numpy as np
    from detector.scan import write_scan
    rng = np.random.default_rng(seed)
    for i in range(n):
        att = np.full((height, width), 0.02, np.float32)
        att[150:650, 200:2800] = 1.0 + 0.4 * rng.random((500, 2600), dtype=np.float32)
        att[640:, 300:600] = att[640:, 2300:2600] = 2.5
        if i % 2:
            y, x = rng.integers(200, 550), rng.integers(300, 2600)
            att[y:y + 60, x:x + 80] += 3.0
        counts = np.stack([53000 * np.exp(-att), 53000 * np.exp(-1.3 * att)])
        write_scan(images / f"bench_{i:05d}.tiff", rng.poisson(counts).clip(0, 65535).astype(np.uint16),
                   i0=(53000.0, 53000.0))


def default_model(cache: Path) -> Path:
    """The default network (configs/default.yaml `model:`), untrained, exported to an fp32 bundle:
    same graph and cost as a trained one, which is all throughput depends on. The file is named by a hash of
    that section, so a changed config (e.g. model.width) exports again instead of timing the old network."""
    import hashlib

    import yaml
    cfg_path = ROOT / "configs" / "default.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}).get("model", {}) if cfg_path.is_file() else {}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = cache / f"default_model_{key}.onnx"
    cache.mkdir(parents=True, exist_ok=True)
    if not out.is_file():
        print(f"exporting the default (untrained) network to {out} ...", file=sys.stderr)
        # cwd=cache: torch.onnx export may leave scratch *.data files in the working directory
        subprocess.run([sys.executable, __file__, "--export-default", str(out.resolve())], check=True, cwd=cache)
    return out


def export_default(out: Path) -> None:
    """Training side (torch): build AnomalyNet from the default config and write a bundle."""
    import tempfile as tf

    import yaml

    from detector.bundle import make_metadata
    from detector.calibration import threshold_table
    from detector.export import export_onnx, write_bundle
    from detector.model import ModelConfig, build_model
    from detector.preprocess import Preprocessing
    cfg_path = ROOT / "configs" / "default.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}).get("model", {}) if cfg_path.is_file() else {}
    mcfg = ModelConfig(**{k: v for k, v in cfg.items() if k in ModelConfig.__dataclass_fields__})
    mcfg.weights = None
    model = build_model(mcfg)
    pre = Preprocessing()
    scores = [i / 1000 for i in range(1, 1000)]  # placeholder calibration: benchmark only
    meta = make_metadata(channels=mcfg.in_channels, energies=["high", "low"][: mcfg.in_channels],
                         pitch_mm=pre.model_pitch_mm, preprocessing=pre.to_dict(), stride=mcfg.stride,
                         score={"method": "topk_mean_logit", "k": mcfg.topk}, thresholds=threshold_table(scores),
                         default_false_alarm_rate=0.01, normal_scores=scores,
                         validation={"note": "untrained default network, for benchmarks only"},
                         train_config={"model": cfg or "ModelConfig defaults"}, data_fingerprint="none")
    with tf.TemporaryDirectory() as tmp:
        write_bundle(export_onnx(model, Path(tmp) / "raw.onnx", mcfg.in_channels), meta, out)


def child(args) -> None:
    """Score the first n cached scans in this (fresh) process; print one JSON line."""
    from detector.runtime import Inspector
    from detector.score import Item, score_items
    scans = sorted(p for p in (Path(args.cache) / "images").glob("*"))[: args.n]
    inspector = Inspector(args.model, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        c = score_items([Item(p.resolve()) for p in scans], inspector, Path(tmp) / "results.csv",
                        workers=args.workers, progress=False)
        dt = time.perf_counter() - t0
        import csv
        with open(Path(tmp) / "results.csv", newline="") as f:
            errors = [r["error"] for r in csv.DictReader(f) if r.get("error")]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"n": c.scanned, "failed": c.failed, "first_error": errors[0] if errors else None,
                      "seconds": dt, "scans_per_s": c.scanned / dt, "peak_rss_mb": rss_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="scans for the throughput figure")
    p.add_argument("--rss-counts", default="100,500", help="counts whose peak RSS is compared")
    p.add_argument("--model", default=None, help="model.onnx (default: export the default network)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_scans"), help="folder of cached synthetic scans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--export-default", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.export_default:
        return export_default(Path(args.export_default))
    if args.child:
        return child(args)
    counts = sorted({int(c) for c in args.rss_counts.split(",") if c} | {args.n})
    cache = Path(args.cache).resolve()   # absolute: the children run in ROOT
    from detector.bundle import BundleError, read_metadata
    from detector.cpus import quota_words, usable_cpus
    from detector.scan import read_scan
    try:   # before the scans are generated: a wrong --model fails at once, in one line
        meta = read_metadata(Path(args.model).resolve()) if args.model else None
    except BundleError as e:
        raise SystemExit(f"score_throughput: {e}") from None
    scans = ensure_scans(cache, max(counts), args.seed)
    model = Path(args.model).resolve() if args.model else default_model(cache)
    meta = meta or read_metadata(model)
    precision = "int8" if meta.get("int8") else "fp32"
    s0 = read_scan(scans[0])
    print(f"model {model} ({precision}, {meta.get('channels')} channels), scans {s0.channels}x{s0.height}x{s0.width}, "
          f"cpu cores {usable_cpus()}{quota_words()}, threads {args.threads or 'default'}, workers {args.workers}")
    runs = {}
    for n in counts:
        cmd = [sys.executable, __file__, "--child", "--n", str(n), "--model", str(model), "--cache", str(cache),
               "--workers", str(args.workers)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:   # its last line (the exception) is the message
            raise SystemExit(f"score_throughput: scoring {n} scans failed: "
                             f"{(out.stderr.strip().splitlines() or ['exit ' + str(out.returncode)])[-1]}")
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
        r = runs[n]
        if r["failed"]:   # a rejected scan costs a header read: the figure would be the rate of rejections
            raise SystemExit(f"score_throughput: {r['failed']} of {r['n']} scans in {cache} failed to score with "
                             f"{model.name}, e.g. {r['first_error']}: no throughput from failed scans")
        print(f"n={n:5d}: {r['scans_per_s']:.2f} scans/s ({r['seconds']:.1f} s, {r['failed']} failed), "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB")
    lo, hi = runs[counts[0]], runs[counts[-1]]
    growth = hi["peak_rss_mb"] / lo["peak_rss_mb"]
    print(f"throughput {runs[args.n]['scans_per_s']:.2f} scans/s at n={args.n} ({precision}; target >= 10); "
          f"peak RSS {lo['peak_rss_mb']:.0f} MiB at n={counts[0]} vs {hi['peak_rss_mb']:.0f} MiB at n={counts[-1]} "
          f"(x{growth:.2f}: {'flat' if growth < 1.15 else 'GROWS with the count'})")


if __name__ == "__main__":
    main()
