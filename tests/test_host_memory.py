"""host_memory: glibc's malloc keeps freed memory, so a large buffer freed and allocated again
is not faulted in again (counted in page faults, in a fresh process per setting)."""

from __future__ import annotations

import subprocess
import sys

import ml_collections
import pytest

from dfrdet_jax import host_memory

# Allocates, fills and frees a 40 MiB buffer (above glibc's largest mmap threshold, 32 MiB) on a
# worker thread, as XLA:CPU does its temporaries, and prints the page faults of the last 5
# cycles per cycle.
_FAULTS_PER_CYCLE = """
import ctypes, resource, sys, threading
from dfrdet_jax import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_freed_memory()
libc = host_memory._glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20

def cycle():
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    libc.free(pointer)

def cycles():
    cycle()  # the first one faults the buffer in either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        cycle()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)

thread = threading.Thread(target=cycles)
thread.start()
thread.join()
"""

glibc_only = pytest.mark.skipif(
    host_memory._glibc() is None, reason="mallopt's settings are glibc's"
)


def _faults_per_cycle(setting: str) -> float:
    command = [sys.executable, "-c", _FAULTS_PER_CYCLE, setting]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


@glibc_only
def test_a_freed_buffer_is_reused_without_faulting_it_in_again():
    pages = (40 << 20) // 4096
    retained, default = _faults_per_cycle("retain"), _faults_per_cycle("default")
    # glibc's default maps and unmaps the buffer each time: a fault per page (fewer where the
    # kernel backs it with huge pages); retained, it is reused as it is.
    assert retained < 0.02 * pages, (retained, default)
    assert default > retained, (retained, default)


def test_apply_config_follows_the_config(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
    config = ml_collections.ConfigDict({"train": {"retain_freed_host_memory": False}})
    assert not host_memory.apply_config(config)
    assert not calls
    config.train.retain_freed_host_memory = True
    assert host_memory.apply_config(config)
    assert calls == [1]


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert not host_memory.retain_freed_memory()
