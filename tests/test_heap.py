"""`benchmark.heap`: with glibc keeping freed memory a large tensor comes from the heap, not a fresh mapping that
each step would page-fault again; the opt-out leaves glibc's default."""
import subprocess
import sys

import pytest

PROBE = r"""
import sys
from benchmark.heap import keep_freed_memory
kept = keep_freed_memory()
import torch

def big_mappings():
    out = set()
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if hi - lo >= 48 * 2**20 and len(parts) == 5 and parts[1].startswith("rw"):  # anonymous data, not [heap]
            out.add(parts[0])
    return out

before = big_mappings()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB
print(kept, len(big_mappings() - before))
"""


def probe(env_extra: dict) -> tuple[bool, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BITBENCH_HEAP")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_extra}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap settings: Linux only")
def test_a_large_tensor_comes_from_the_heap_unless_opted_out():
    assert probe({}) == (True, 0)
    kept, new_mappings = probe({"BITBENCH_HEAP": "default"})
    assert not kept and new_mappings == 1, "glibc's default maps a 64 MiB block on its own"
    assert probe({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})[0] is False, "the environment's choice wins"
