"""Training throughput (crops/s) of a config's network on this CPU (fp32, and bf16 autocast where the CPU
has native bf16: what `precision: auto` then trains in), and on a GPU in bf16 if present.

    .venv/bin/python benchmarks/train_speed.py [--config configs/default.yaml] [--steps 10]

Also prints the forward FLOPs on a full 640x2400 px scan at 5 mm (320x1216 model px at the default 10 mm).

With --data, times the whole training pipeline instead (crop loaders, fresh synthetic trucks, DDP
processes, validation, hard-negative mining) for a few epochs on that folder: what an epoch of the
config really costs on this machine, to compare layouts (trainer.cpu_processes, data.workers, ...):

    .venv/bin/python benchmarks/train_speed.py --data runs/quality/data_s100_1200_100_600 --epochs 4 \
        data.cache_dir=runs/quality/data_s100_1200_100_600/cache data.workers=0
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from detector.model import build_model, count_flops, nhwc
from detector.preprocess import model_size, padded_size
from detector.scan import ScanError
from detector.config import ConfigError, load_config
from detector.hardware import cpu_flags, cpu_has_native_bf16, resolve_precision


def crops_per_s(model: torch.nn.Module, batch: int, crop: int, channels: int, steps: int, device: str,
                bf16: bool) -> float:
    model = model.to(device, memory_format=torch.channels_last).train()  # as AnomalyModule trains it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = nhwc(torch.rand(batch, channels, crop, crop, device=device))
    t = torch.zeros(batch, 1, crop // model.stride, crop // model.stride, device=device)
    t0 = 0.0
    for i in range(steps + 2):
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            z = model.logits(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z.float(), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def cpu_description() -> str:
    """This CPU's model name and bf16 units: the same 2-core machine has come up on AMD Zen 4 (AVX512-BF16)
    and on Intel Xeon (AMX) hosts on different days, at different speeds for the same code."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_flags()]
    return f"{name} ({', '.join(units) or 'no native bf16'})"


def pipeline(a: argparse.Namespace) -> None:
    """Train a.epochs epochs of the config on a.data (no test) and print the seconds per epoch."""
    import tempfile

    from detector.train import run_training

    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        ov = [*a.overrides, f"trainer.max_epochs={a.epochs}", "trainer.test=false", "trainer.patience=0",
              *([f"trainer.threads={a.threads}"] if a.threads else [])]   # --threads held for the network alone only
        res = run_training(a.config, a.data, tmp, ov, quiet=True)
    if not res:   # a DDP worker process: rank 0 reports
        return
    cfg = load_config(a.config, ov)
    s = res["epoch_s"]
    steady = sorted(s[1:] or s)[len(s[1:] or s) // 2]   # median without the first (pool fill, warm-up)
    print(f"CPU: {cpu_description()}")
    print(f"{cfg.name} {' '.join(a.overrides)}: {len(s)} epochs of {cfg.data.crops_per_epoch} crops, "
          f"{steady:.1f} s per epoch after the first ({s[0]:.1f} s), {cfg.data.crops_per_epoch / steady:.0f} "
          f"crops/s with loading, validation every {cfg.trainer.val_every} and mining; per epoch {s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--data", help="a scan folder: time whole training epochs on it instead")
    ap.add_argument("--epochs", type=int, default=4, help="with --data: epochs to time")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    try:   # a mistyped config, override or --data: one line, as `detector train` says it
        if a.data:
            return pipeline(a)
        cfg = load_config(a.config, a.overrides)
    except (ConfigError, ScanError) as e:
        raise SystemExit(f"train_speed: {e}") from None
    if a.threads:
        torch.set_num_threads(a.threads)
    c, d = cfg.model.in_channels, cfg.data
    model = build_model(cfg.model)
    pre = cfg.preprocessing   # the full scan at the config's model pitch, padded as the station pads it
    h, w = padded_size(*model_size(640, 2400, 5.0, pre), pre.pad_multiple)
    gflop = count_flops(model, c, h, w) / 1e9
    print(f"{cfg.name}: {cfg.model.backbone} width={cfg.model.width} stage_blocks={cfg.model.stage_blocks} "
          f"backbone_stride={cfg.model.backbone_stride} decoder={cfg.model.decoder_channels}: "
          f"{gflop:.2f} GFLOP forward on 640x2400 px @5 mm ({h}x{w} @{pre.model_pitch_mm:g} mm), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    print(f"CPU: {cpu_description()}")
    used = resolve_precision(cfg.trainer.precision, "cpu")
    for bf16 in (False, True) if cpu_has_native_bf16() else (False,):
        cpu = crops_per_s(model, d.batch_size, d.crop, c, a.steps, "cpu", bf16)
        name = "bf16-mixed" if bf16 else "32-true"
        print(f"CPU ({torch.get_num_threads()} threads): {cpu:.1f} crops/s ({d.crop}px, batch {d.batch_size}, {name}"
              f"{', what training uses' if name == used else ''}) -> {d.crops_per_epoch / cpu / 60:.1f} min per "
              f"epoch of {d.crops_per_epoch} crops")
    if torch.cuda.is_available():
        for batch in (d.batch_size, 64, 256):
            for bf16 in (True, False):
                gpu = crops_per_s(build_model(cfg.model), batch, d.crop, c, a.steps * 3, "cuda", bf16)
                name = ("bf16-mixed" if bf16 else "32-true") + (", what training uses" if bf16 and
                                                                 batch == d.batch_size else "")
                print(f"GPU {torch.cuda.get_device_name()}: {gpu:.0f} crops/s ({d.crop}px, batch {batch}, {name}) -> "
                      f"{d.crops_per_epoch / gpu:.1f} s of network per epoch of {d.crops_per_epoch} crops")
    else:
        print("GPU: none available")


if __name__ == "__main__":
    main()
