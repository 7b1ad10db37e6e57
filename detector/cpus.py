"""How many CPUs this process may use: its affinity (taskset, a container's cpuset) and its cgroup's CPU quota
(`docker run --cpus=2`, a pod's `resources.limits.cpu`), where os.cpu_count gives the host's cores.

A quota leaves every core visible but lets the group run only `quota` microseconds of CPU time per `period`:
64 onnxruntime threads under a 2-CPU quota spend the period's 200 ms within ~3 ms, then all wait for the next
period, and a scan's latency grows from one inference to several periods. Measured on 2 cores (affinity, the
nearest local stand-in), one 2x640x2400 scan, quick network: 2 threads 56-72 ms median, 8 threads 256-264 ms,
32 threads 1.2-1.3 s (p95 1.7 s). The quota is read once per process
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) in the process's own group, named by
/proc/self/cgroup, and in each group above it (a limit on a parent, a pod's, binds too); a group whose folder is
not there (a container that sees its own group at the mount's root) counts from the root. Files missing or
unreadable, "max" or -1: no quota. Core: the standard library only.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")   # where cgroup v1 mounts the cpu controller


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity); os.cpu_count where there is no affinity API."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # no affinity API (Windows, macOS)
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_quota(folder: Path) -> float | None:
    """CPUs a cgroup v2 group's cpu.max ("QUOTA PERIOD", or "max PERIOD") allows; None: none or unreadable."""
    fields = (_read(folder / "cpu.max") or "max").split()
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
    except ValueError:   # "max": no limit
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    """CPUs a cgroup v1 group's cpu.cfs_quota_us / cpu.cfs_period_us allow (-1: no limit); None: none or unreadable."""
    try:
        quota, period = (int(_read(folder / f"cpu.cfs_{k}_us") or "-1") for k in ("quota", "period"))
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _groups() -> list[tuple[Path, str, bool]]:
    """(controller mount, the process's group path in it, cgroup v2?) for the hierarchies that hold the cpu
    controller, from /proc/self/cgroup ("0::/path" for v2, "N:cpu,cpuacct:/path" for v1)."""
    found = []
    for line in (_read(PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            found.append((CGROUP_ROOT, path, True))
        elif "cpu" in controllers.split(","):
            found.extend((CGROUP_ROOT / d, path, False) for d in V1_CPU_DIRS)
    return found


def _chain(mount: Path, group: str) -> list[Path]:
    """The group's folder and each above it up to the mount, those that exist."""
    parts = [p for p in group.strip("/").split("/") if p and p != ".."]
    folders = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [f for f in folders if f.is_dir()]


@functools.lru_cache(maxsize=1)
def cpu_quota() -> float | None:
    """The CPUs the process's cgroup quota allows (the tightest along its group's path, fractional: --cpus=1.5),
    None where no quota is set or none can be read. Read once: a quota seldom changes under a running process."""
    quotas = [(_v2_quota if v2 else _v1_quota)(folder)
              for mount, group, v2 in _groups() for folder in _chain(mount, group)]
    return min((q for q in quotas if q is not None), default=None)


def quota_cpus() -> int | None:
    """cpu_quota rounded up to whole CPUs (--cpus=0.5 gives 1, 1.5 gives 2); None: no quota."""
    q = cpu_quota()
    return None if q is None else max(1, math.ceil(q - 1e-9))


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup's CPU quota. Size every thread and process
    pool from this, never from os.cpu_count (the host's cores: onnxruntime ran more threads than cores, each scan
    1.65x slower with 2 threads on 1 allowed core; under a quota, far slower, see the module docstring)."""
    q = quota_cpus()
    return min(affinity_cpus(), q) if q is not None else affinity_cpus()


def quota_words() -> str:
    """' (a CPU quota of Q of the N cores)' where the cgroup quota sets usable_cpus, else '': for start lines."""
    q, n = quota_cpus(), affinity_cpus()
    return f" (a CPU quota of {cpu_quota():g} of the {n} cores)" if q is not None and q < n else ""
