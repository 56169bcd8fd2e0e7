"""Keep freed memory for reuse (glibc ``mallopt``), so that drawing samples does not fault in fresh pages.

PyTorch on CPU allocates each intermediate tensor with ``malloc``. glibc serves a block of more than
128 KiB (raised dynamically up to 32 MiB) with a fresh ``mmap`` and returns it on ``free``, and it
gives the top of its heap back to the system once more than twice that is free; every page of the
next such block is then faulted in and zeroed again. Drawing 10⁴ samples from a flow allocates tens
of ``[10⁴, 64]`` tensors: about 3,000–5,000 page faults per call here, 13–14 % of its time with two
threads (README, "Benchmarks"). With blocks of up to 32 MiB taken from the heap and up to 128 MiB of free
heap kept, the faults stop after the first call. The cost is resident memory that stays at its
peak, as with the allocators PyTorch recommends for CPU inference (jemalloc, tcmalloc); a
process-wide setting, so the command line and the service's posterior cache set it, not the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["retain_freed_memory"]

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's own ceiling for its dynamic threshold
TRIM_THRESHOLD = 128 * 2**20


@functools.cache
def retain_freed_memory() -> bool:
    """Serve blocks of up to 32 MiB from the heap and keep up to 128 MiB of it free for reuse.
    True where it took effect (glibc), False elsewhere (then nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc (macOS, musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
