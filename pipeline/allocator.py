"""How this process's C allocator keeps freed memory: for the network's activations, reuse, not page faults.

A forward pass allocates and frees the same few activation tensors every time. glibc's malloc, as
configured by default, hands many of them back to the operating system when they are freed: blocks
over its (dynamic) mmap threshold are unmapped, and every thread's arena trims its heap as it
empties. Each pass then page-faults the same memory back in, zero-filled by the kernel: 10-25
thousand faults per forward pass of the hippocampus network (batch 2, two lanes), 5-10% of its time
on 2 cores. Over a whole `segpipe predict` of 60 hippocampus cases the faults drop 5-20x and the
command is 1.05x faster without mirroring, 1.01x with (`benchmarks/results/allocator.md`).
PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for this; glibc does the same with three
settings, applied here with `mallopt`:

* blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap, not from fresh mappings;
* the heap keeps up to `TRIM_THRESHOLD` of freed memory instead of giving it back at once;
* one arena for every thread, so that a block freed by one forward lane is reused by the next
  pass on any lane, and one trim threshold bounds what is kept.

What is kept is the high-water mark of blocks the process already held, so peak memory does not
grow; a process that frees a lot for good holds on to at most `TRIM_THRESHOLD` more than it uses.
Settings the user made (glibc's `MALLOC_*` variables or `GLIBC_TUNABLES`) win: then nothing is
changed, so `GLIBC_TUNABLES=` (empty) keeps glibc's defaults. Elsewhere than glibc (macOS, musl)
this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 512 * 2**20
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed blocks (module docstring), once per process.

    Call it early, before the threads that run the network exist: an arena a thread already has is
    kept. True when the settings are in force."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # musl's mallopt does nothing
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            mallopt(M_ARENA_MAX, 1)]
    return all(done)
