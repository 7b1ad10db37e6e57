"""Which hardware a training run uses: CUDA or the CPU, its precision, CPU DDP processes and loader workers, each
checked before any scan is cached."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from detector.config import Config, ConfigError, TrainerConfig
from detector.cpus import usable_cpus
from detector.data import auto_workers


def uses_cuda(accelerator: str) -> bool:
    """Whether `trainer.accelerator` means CUDA GPUs: asked for by name, or `auto` with one present
    (the one rule for precision, CPU processes and loader workers)."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(p: str, accelerator: str = "auto") -> str:
    """auto: bf16-mixed on a bf16 GPU, or on a CPU with native bf16 (AVX512-BF16/AMX: ~2x the fp32
    training speed measured on a 2-core Zen 4), else 32-true."""
    if p != "auto":
        return p
    if uses_cuda(accelerator) and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with avx512_bf16 or amx_bf16 (elsewhere bf16 is emulated and slower)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and torch.backends.mkldnn.is_available()


def check_hardware(t: TrainerConfig) -> None:
    """ConfigError, before the scans are cached, for an accelerator or devices this machine cannot give: Lightning
    says so only once the trainer is built, as a traceback. On a CPU trainer.devices > 1 would run that many DDP
    processes with the whole batch and all the cores each: trainer.cpu_processes shares both out."""
    if t.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator must be auto, cpu or gpu (cuda), got {t.accelerator!r}")
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={t.accelerator}: torch sees no CUDA GPU on this machine (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); train with "
                          "trainer.accelerator=auto or cpu")
    if uses_cuda(t.accelerator) or t.devices in ("auto", 1, "1"):
        return
    if isinstance(t.devices, int) and not isinstance(t.devices, bool) and t.devices > 1:
        raise ConfigError(f"trainer.devices={t.devices} on the CPU would run {t.devices} processes with the whole batch "
                          f"and all the cores each: use trainer.cpu_processes={t.devices} (it shares both out)")
    raise ConfigError(f"trainer.devices={t.devices!r} asks for GPUs, but this run is on the CPU (torch sees no CUDA "
                      "GPU, or trainer.accelerator=cpu): leave it auto")


def resolve_cpu_processes(cfg: Config) -> int:
    """Split a CPU run over `trainer.cpu_processes` DDP processes (Lightning's own strategy): each gets
    its share of the cores and of the batch, so optimiser steps and schedule stay those of one process.
    On 2 cores, 2 single-thread processes train the default epoch in 42 s instead of 47 s for one
    2-thread process (small convolutions scale poorly over threads; the crop loaders overlap better).
    Returns the per-process batch size; leaves GPU runs alone."""
    t, n = cfg.trainer, cfg.trainer.cpu_processes
    on_cpu = t.accelerator in ("cpu", "auto") and not uses_cuda(t.accelerator)
    if n <= 1 or not on_cpu:
        return cfg.data.batch_size
    if cfg.data.batch_size % n:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be a multiple of trainer.cpu_processes ({n})")
    t.accelerator, t.devices = "cpu", n
    t.strategy = "ddp" if t.strategy == "auto" else t.strategy
    t.threads = t.threads or max(1, usable_cpus() // n)
    return cfg.data.batch_size // n


def cpu_threads(t: TrainerConfig, current: int) -> int:
    """torch's intra-op threads for a CPU run: trainer.threads where set, else `current` (torch's default) capped at
    usable_cpus. torch counts the affinity's cores but not a cgroup CPU quota: under `docker --cpus=4` on a 64-core
    host it ran 64 threads on 4 CPUs of time."""
    return t.threads or min(current, usable_cpus())


def resolve_workers(cfg: Config) -> int:
    """data.workers, checked, with "auto" resolved (`data.auto_workers`) for this run's accelerator and
    process count. Call after resolve_cpu_processes (it sets the CPU process count)."""
    w, t = cfg.data.workers, cfg.trainer
    if w != "auto":
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"data.workers must be a number >= 0 or auto, got {w!r}")
        return w
    d = t.devices
    if not uses_cuda(t.accelerator):
        return auto_workers(False, d if isinstance(d, int) and d > 0 else 1)
    n = d if isinstance(d, int) and d > 0 else len(d) if isinstance(d, (list, tuple)) else torch.cuda.device_count()
    return auto_workers(True, n)


def ddp_without_step_buffer_sync() -> dict[str, bool]:
    """DDP keyword that skips the BatchNorm buffer broadcast before every forward (AverageBatchNormStats
    averages them once an epoch instead): torch >= 2.14 calls it forward_sync_buffers and warns on the old
    broadcast_buffers in every rank's output; older torch knows only broadcast_buffers."""
    from torch.nn.parallel import DistributedDataParallel

    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}
