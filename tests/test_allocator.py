"""The process setting that keeps freed memory for reuse (sbipipe.allocator)."""

import subprocess
import sys

import pytest

from sbipipe.allocator import retain_freed_memory

SCRIPT = """
import ctypes, ctypes.util, resource, sys, torch
from sbipipe.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.sbrk.restype = ctypes.c_void_p
block = torch.empty(4 * 2**20)  # 16 MiB: glibc maps a block this large anew unless told otherwise
on_heap = block.data_ptr() < libc.sbrk(0)  # below the program break: from the heap, not a fresh mmap
del block
def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        a = [torch.empty(2**20).fill_(1.0) for _ in range(3)]  # three 4 MiB tensors at once
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults()
print(int(on_heap), faults())
"""


def _run(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    on_heap, faults = out.stdout.split()[-2:]
    return int(on_heap), int(faults)


def test_retained_memory_serves_large_tensors_from_the_heap_without_page_faults():
    if not retain_freed_memory():
        pytest.skip("not glibc: the setting does not apply")
    assert _run("default")[0] == 0  # glibc's default: a fresh mapping, faulted in page by page
    on_heap, faults = _run("retain")
    assert on_heap == 1
    assert faults < 100  # 30 blocks of 4 MiB would be ~30,000 pages if each were faulted in anew
