"""Host memory: freed buffers kept for reuse, so each CPU train step does not fault its
temporaries in again.

XLA:CPU allocates a step's temporary buffer with malloc at every call and frees it at the end.
glibc's malloc serves a request above its mmap threshold (which adapts to the sizes freed, up to
32 MiB) with a fresh ``mmap`` and returns it to the kernel on free, so every step then pays one
page fault per 4 KiB page of its temporaries. RetinaNet's narrow step at 128 px, batch 4, needs
35 MiB of them (FCOS's stay under 32 MiB): 9,000 faults and about 8 ms of its 48 ms a step on
the project's 2-core CPU (benchmarks/README.md, "Freed host memory kept"). Served from malloc's
heap instead (no mmap, freed memory kept), the same buffer is reused from one step to the next.
The price is a process that keeps its peak heap resident, which a training process reaches on
its first step anyway. A thread's heap holds at most 64 MiB, so larger temporaries allocated on
XLA's worker threads are still mapped per call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from absl import logging

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt takes (an int): free space at the heap's top is kept up to
# 2 GiB.
MAX_TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Makes glibc's malloc serve large requests from its heap and keep what is freed (no
    ``mmap`` per allocation, no trimming under 2 GiB), for this whole process from now on.

    Returns:
      whether it took effect: False where the C library is not glibc (macOS, musl: nothing
      changes) or glibc refused a setting, either logged.
    """
    libc = _glibc()
    if libc is None:
        logging.info("Host memory: the C library is not glibc; malloc left as it is")
        return False
    settings = {
        "M_MMAP_MAX": (M_MMAP_MAX, 0),
        "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, MAX_TRIM_THRESHOLD),
    }
    refused = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
    if refused:
        logging.warning("Host memory: glibc's mallopt refused %s", ", ".join(refused))
        return False
    logging.info("Host memory: glibc's malloc keeps freed memory (no mmap per allocation)")
    return True


def apply_config(config) -> bool:
    """``retain_freed_memory()`` where ``config.train.retain_freed_host_memory`` asks for it
    (the default); returns whether malloc's settings were changed."""
    return bool(config.train.retain_freed_host_memory) and retain_freed_memory()
