"""What the DataLoader worker processes set up: OpenCV on one thread (the workers are the parallelism) and
glibc keeping freed memory for reuse. Importing this module registers the fork hooks that keep forked workers safe."""
from __future__ import annotations

import ctypes
import os

import cv2
import torch


def single_threaded_worker() -> None:
    """In a DataLoader worker process, run OpenCV on one thread: the workers are the parallelism, and
    each one's OpenCV would otherwise start a thread per core (14 workers x 16 threads on a 16-core GPU
    host; on 2 cores its threads compete with the training processes). A no-op in the main process.
    Forked workers already start on one thread (the os.register_at_fork hooks below); this call acts
    only in spawned ones, whose OpenCV thread pool is fresh and safe to resize. Also keeps the worker's
    freed memory for reuse (keep_freed_memory)."""
    if torch.utils.data.get_worker_info() is None:
        return
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    if not _malloc_tuned:
        keep_freed_memory()


_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks of up to 32 MB for reuse instead of handing them back to the
    kernel. A fresh synthetic truck allocates tens of MB of temporaries, and by default each one came back as
    new pages, faulted in and zeroed again: ~4,500 page faults and 114-121 ms per truck, 30 and 94-98 ms with
    this (docs/experiments.md). The process's heap then stays at its peak, so the loader workers call it, not
    the training processes (no gain measured there). False where the C library lacks glibc's mallopt."""
    global _malloc_tuned
    _malloc_tuned = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3          # glibc's malloc.h
    return all([mallopt(m_mmap_threshold, 32 << 20),    # glibc's ceiling on 64-bit; bigger arrays stay mmap'd
                mallopt(m_trim_threshold, 1 << 30), mallopt(m_top_pad, 64 << 20)])


_threads_before_fork: list[int] = []


def _opencv_to_one_thread() -> None:
    _threads_before_fork.append(cv2.getNumThreads())
    cv2.setNumThreads(1)


def _opencv_threads_back() -> None:
    if _threads_before_fork:
        cv2.setNumThreads(_threads_before_fork.pop())


# Every fork (DataLoader workers) inherits OpenCV on one thread. Resizing OpenCV's pthreads pool inside a
# forked child deadlocks once the parent's pool has run (its threads do not survive fork), so the parent
# drops to one thread just before the fork and takes its threads back just after.
os.register_at_fork(before=_opencv_to_one_thread, after_in_parent=_opencv_threads_back,
                    after_in_child=_threads_before_fork.clear)
