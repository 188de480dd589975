"""The glibc heap policies: freed memory kept for a CPU forward, given back for a streamed
probe (each measured in a fresh process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

_FAULTS = """
import resource, sys
import torch
import probekit.extraction  # the libraries an extraction has loaded
from probekit._malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # a 200 MiB activation, written, freed, made again: batch after batch
    a = torch.ones(200 << 18)
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# a decoding thread's 3 MiB buffers, after a 16 MiB buffer was freed (which raises glibc's
# mapping threshold): kept in that thread's heap by default, given back under the policy
_KEPT = """
import sys, threading
import numpy as np
from probekit._malloc import keep_freed_memory, return_freed_memory
if sys.argv[1] == "return":
    keep_freed_memory()  # as an extraction earlier in the same process would
    return_freed_memory()
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
big = np.ones(16 << 17)
del big
def decode():
    bufs = [np.ones(3 << 17) for _ in range(8)]  # 8 buffers of 3 MiB, written
    del bufs
before = rss_mib()
t = threading.Thread(target=decode)
t.start()
t.join()
print(rss_mib() - before)
"""


def _run(code: str, mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def test_cpu_extraction_keeps_freed_memory_mapped() -> None:
    """After `keep_freed_memory` (which `extract` calls on a CPU) a large block freed and made
    again reuses its pages; by default each one is faulted in anew."""
    pages = (200 << 20) // 4096
    default, tuned = _run(_FAULTS, "default"), _run(_FAULTS, "tuned")
    assert default > 4 * pages and tuned < 3 * pages, (default, tuned)


def test_streaming_returns_freed_buffers() -> None:
    """After `return_freed_memory` (which a streamed probe calls) a thread's freed buffers
    leave the process, even after `keep_freed_memory`; by default its heap keeps them."""
    default, returned = _run(_KEPT, "default"), _run(_KEPT, "return")
    assert default > 16 and returned < 4, (default, returned)
