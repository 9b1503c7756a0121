"""Allocator tuning for training: glibc keeps freed step buffers for reuse instead of returning them.

Every step allocates and frees a dozen ``(cells, genes)`` buffers (1 MB each at 128 x 2,000).
With glibc's default thresholds those blocks go back to the kernel when freed (mmap, or trimmed
off the top of the heap), and the next step touches them as fresh pages that the kernel
zero-fills: about 1,000 page faults per step. Training raises the thresholds once per process
(``train.train_svi`` calls ``keep_freed_memory`` when it starts), so freed blocks up to
``MMAP_THRESHOLD`` are reused and up to ``TRIM_THRESHOLD`` of free heap is kept. Environment
settings of the user (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ...) take
precedence: then nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed training buffers for reuse; True if this call changed it.

    Does nothing off glibc, when already done in this process, or when the environment sets any
    ``MALLOC_*_`` tunable (the user's choice wins).
    """
    global _allocator_tuned
    if _allocator_tuned or platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if _allocator_tuned:
        logger.debug("glibc keeps freed blocks up to %d bytes for reuse.", MMAP_THRESHOLD)
    return _allocator_tuned
