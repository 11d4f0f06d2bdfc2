"""glibc heap settings for CPU training: keep freed tensor memory in the heap for reuse.

glibc serves each allocation above its mmap threshold (32 MiB at most) with a fresh mapping and unmaps it on
free, so every large activation of every step page-faults its memory again: on a 1-thread mobilenetv2 CPU step
(batch 128) that is a third of the time, spent in the kernel. With mmap off and a high trim threshold freed blocks
stay in the heap and are reused (fp step 2104 → 1252 ms; resnet20 −4 %; docs/performance.md). The process keeps
its peak heap until it exits, which a training process does anyway. Linux/glibc only.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "OPT_OUT"]

OPT_OUT = "BITBENCH_HEAP"  # =default: leave glibc's settings alone
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_state: bool | None = None


def keep_freed_memory() -> bool:
    """Switch glibc to keep freed memory (once per process); False where it does not apply: not glibc, opted out
    with `BITBENCH_HEAP=default`, or malloc settings already chosen through `GLIBC_TUNABLES`."""
    global _state
    if _state is None:
        _state = False
        if (sys.platform.startswith("linux") and os.environ.get(OPT_OUT) != "default"
                and "glibc.malloc" not in os.environ.get("GLIBC_TUNABLES", "")):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _state = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
            except (OSError, AttributeError):  # another C library
                _state = False
    return _state
