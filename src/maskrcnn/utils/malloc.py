"""Let the process reuse the memory it frees instead of handing it back to the OS.

glibc's ``malloc`` serves each large block (from a few MiB, at most 32 MiB, upward) with a
fresh memory map and unmaps it when the block is freed, so the next image's block of the
same size starts over from untouched pages: one page fault per 4 KiB on first write. A
Mask R-CNN forward pass on a CPU allocates and frees hundreds of MiB of activations; on an
800 x 1088 image torchvision's model takes about 500,000 page faults per image, which on a
virtual machine is a fifth of its time. With larger map and trim thresholds the blocks come
from the heap, which keeps freed pages mapped and reuses them: after the first image almost
no page faults. The cost is that the process holds on to its peak memory until it exits.

The ``maskrcnn`` command applies this at start-up (opt out with ``MASKRCNN_MALLOC=system``);
library users can call :func:`retain_freed_memory` themselves.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "MASKRCNN_MALLOC"
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MAP_THRESHOLD = 256 << 20  # larger blocks (a whole paste output) still get their own map
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap beyond this goes back

_applied = False


def retain_freed_memory() -> bool:
    """Raise glibc's map and trim thresholds for this process (see the module's docstring).
    Returns whether they were set: False on other platforms and C libraries, or when the
    environment variable ``MASKRCNN_MALLOC`` is ``system``."""
    global _applied
    if os.environ.get(ENV, "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc; musl has neither file nor call
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _applied


def setting() -> str:
    """``retained`` once :func:`retain_freed_memory` has applied, else ``system``."""
    return "retained" if _applied else "system"


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``, which also
    releases free pages inside the heap). Long loops of differently sized blocks of a few
    MiB, such as sliced prediction over hundreds of tiles, otherwise fragment the heap and
    the process grows tile after tile. Returns whether anything could be called."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
