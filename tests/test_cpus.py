"""usable_cpus under a container's CPU quota (docker --cpus, a pod's limits.cpu): fake cgroup v1 and v2 trees."""
import os

import pytest


def host(monkeypatch, n: int) -> None:
    """A 64-core host on which this process may run on n CPUs (its affinity)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)


def test_a_cgroup_v2_quota_caps_the_cpus_where_the_affinity_is_the_whole_host(cgroup, monkeypatch):
    """docker run --cpus=2 on a 64-core host: every core in the affinity, 200 ms of CPU time per 100 ms period."""
    from detector.runtime import usable_cpus
    host(monkeypatch, 64)
    cgroup("0::/\n", {"cpu.max": "200000 100000\n"})
    assert usable_cpus() == 2
    cgroup("0::/\n", {"cpu.max": "max 100000\n"})   # no limit
    assert usable_cpus() == 64


def test_the_tightest_quota_on_the_groups_path_counts_rounded_up(cgroup, monkeypatch):
    """A pod's limit (1.5 CPUs) on the parent of its container's group, whose own cpu.max is "max": 2 CPUs."""
    from detector.cpus import cpu_quota, quota_words
    from detector.runtime import usable_cpus
    host(monkeypatch, 64)
    cgroup("0::/kubepods/pod1/ctr\n", {"cpu.max": "max 100000", "kubepods/pod1/cpu.max": "150000 100000",
                                       "kubepods/pod1/ctr/cpu.max": "max 100000"})
    assert (cpu_quota(), usable_cpus()) == (1.5, 2)
    assert quota_words() == " (a CPU quota of 1.5 of the 64 cores)"
    cgroup("0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "50000 100000"})   # --cpus=0.5
    assert usable_cpus() == 1


def test_a_cgroup_v1_quota_and_a_container_that_sees_its_group_at_the_root(cgroup, monkeypatch):
    """cgroup v1 without a cgroup namespace: /proc/self/cgroup names /docker/ID, the container's cpu mount shows
    that group at its root."""
    from detector.runtime import usable_cpus
    host(monkeypatch, 64)
    cgroup("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
           {"cpu,cpuacct/cpu.cfs_quota_us": "400000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert usable_cpus() == 4
    cgroup("4:cpu,cpuacct:/docker/abc\n",
           {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert usable_cpus() == 64


def test_the_affinity_caps_a_looser_quota_and_the_count_is_read_once(cgroup, monkeypatch):
    from detector.cpus import quota_words
    from detector.runtime import usable_cpus
    host(monkeypatch, 2)
    cgroup("0::/\n", {"cpu.max": "800000 100000"})
    assert usable_cpus() == 2 and quota_words() == ""   # the cpuset set the count, not the quota
    host(monkeypatch, 64)
    cgroup("0::/\n", {"cpu.max": "300000 100000"})
    assert usable_cpus() == 3
    from detector import cpus
    (cpus.CGROUP_ROOT / "cpu.max").write_text("100000 100000")   # not read again: one read per process
    assert usable_cpus() == 3


@pytest.mark.parametrize("proc, files", [
    ("", {}),                                                    # no /proc/self/cgroup text (not Linux)
    ("0::/\n", {}),                                              # no cpu controller files (hybrid, a bare mount)
    ("0::/\n", {"cpu.max": "lots of them"}),                     # garbage
    ("0::/\n", {"cpu.max": "0 100000"}),                         # a nonsense quota
    ("0::/\n", {"cpu.max/x": ""}),                               # cpu.max a folder: unreadable
    ("4:cpu:/\n", {"cpu/cpu.cfs_quota_us": "200000"}),           # v1 with its period unreadable
    ("garbage line\n4:cpu\n", {}),
])
def test_missing_or_unreadable_cgroup_files_mean_no_quota(cgroup, monkeypatch, proc, files):
    from detector.runtime import usable_cpus
    host(monkeypatch, 6)
    cgroup(proc, files)
    assert usable_cpus() == 6
