"""The allocator settings prediction runs under: freed activations are reused, not faulted back in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's; elsewhere reuse_freed_memory does nothing")

# What a forward pass does to the heap: a thread (a forward lane) allocates activations of a few
# sizes and frees them all, pass after pass. Prints the page faults of each pass.
FORWARD_PASSES = """
import json, resource, sys, threading
import numpy as np
from pipeline.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
faults = []
def passes():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        activations = [np.ones(int(mib * 2**20) // 8) for mib in (23, 11.5, 23, 5.8, 23, 11.5)]
        del activations
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
lane = threading.Thread(target=passes)
lane.start()
lane.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def forward_passes(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    environ.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", FORWARD_PASSES, mode], env=environ, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_glibc_defaults_fault_every_pass_back_in_and_reuse_freed_memory_stops_it():
    default = forward_passes("default")
    assert min(default["faults"][1:]) > 1000, default  # what the settings are for

    reused = forward_passes("reuse")
    assert reused["applied"] is True
    assert reused["faults"][0] > 1000  # the first pass takes the memory from the system once ...
    assert max(reused["faults"][1:]) < 50, reused  # ... and every later pass reuses it


def test_the_users_own_malloc_settings_win():
    run = forward_passes("reuse", MALLOC_ARENA_MAX="2")
    assert run["applied"] is False
    assert min(run["faults"][1:]) > 1000  # untouched: glibc as the user configured it
