"""Keep freed tensor memory for reuse on the CPU (glibc's allocator).

With glibc's defaults, a freed block of tensor size goes back to the kernel (munmap, or a heap trim) and the
next tensor of that size is paged in again: one page fault per 4 KiB, every step. A CPU training step
allocates and frees the same large temporaries every step, so this is a real cost, and the larger the more
temporaries a model makes (Mixture-DAAM's gate makes several per block). Raising glibc's mmap threshold to
its maximum and the trim threshold to 1 GiB keeps those blocks in the heap for the next step (measured:
`benchmarks/bench_vqvae.py --glibc-defaults` against the default). `vqvae train` and `classify extract`
apply it on the CPU; GPU tensors are unaffected (PyTorch's caching allocator already reuses device memory).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest (64-bit): blocks up to this size come from the heap
TRIM_THRESHOLD_BYTES = 2**30  # free heap memory up to this much stays mapped for the next allocations


def user_chose_allocator() -> bool:
    """True when the environment already configures or replaces malloc (MALLOC_* variables, LD_PRELOAD of
    jemalloc/tcmalloc): then we leave it alone."""
    return bool(os.environ.get("LD_PRELOAD")) or any(name.startswith("MALLOC_") for name in os.environ)


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds so freed tensor memory is reused instead of returned and paged in
    again; for the whole process, from now on. Returns whether it was applied (not off glibc, nor when the
    user configured the allocator)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; the mmap threshold also switches off glibc's dynamic adjustment of both
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                       TRIM_THRESHOLD_BYTES) == 1
