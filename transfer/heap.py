"""Keep a server process's freed heap instead of handing it back to the kernel after every use.

glibc returns freed memory to the kernel as soon as more than ~2x the largest freed chunk sits free
at the top of a heap (`M_TRIM_THRESHOLD`, adjusted dynamically), and the next use faults it back in
one zeroed 4 KiB page at a time, ~5 us a page on this VM (a fresh 28 MiB buffer: 39 ms to fill
against 5 ms reused). Two hot paths free and re-allocate the same sizes over and over: libzmq
receives each message into a buffer it mallocs (it cannot receive into ours) that the receiver
copies into the pool and frees, ~120 page faults per 4 MiB ZMQ room and ~1100 per 16 MiB room here;
and a prefill's activations, 8000-15000 page faults per 512-token prefill of the small preset
(median prefill 466 -> 416 ms with them kept, five alternating pairs of processes).
`keep_freed_heap(n)` sets the trim threshold to `n` bytes (freed memory up to that stays for reuse)
and the mmap threshold to glibc's own upper bound for its dynamic one, 32 MiB on 64-bit (setting
either by hand turns the dynamic one off), so every allocation glibc's default would serve from a
heap still is. The process then holds on to what its peak needed, up to `n` per malloc arena. One
setting per process: the servers call it at start (`malloc_keep_freed_bytes`), a `TransferReceiver`
with its `keep_freed_heap_bytes`. glibc only; elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import struct

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 4 * 2**20 * struct.calcsize("l")  # glibc's DEFAULT_MMAP_THRESHOLD_MAX
_applied: int | None = None


def keep_freed_heap(nbytes: int) -> bool:
    """Keep up to `nbytes` of freed heap per arena (0: leave malloc as it is). True if it is set;
    the first call with a non-zero size wins, later ones only log a different request."""
    global _applied
    if nbytes <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    if _applied is not None:
        if _applied != nbytes:
            log.info("freed heap already kept up to %d bytes; not changing it to %d", _applied, nbytes)
        return True
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(nbytes, 2**31 - 1))) == 1 and ok
    if ok:
        _applied = nbytes
        log.info(
            "malloc keeps up to %.0f MiB of freed heap per arena (mmap above %d MiB)",
            nbytes / 2**20,
            MMAP_THRESHOLD_MAX >> 20,
        )
    else:
        log.warning("mallopt refused the heap settings; ZMQ receives will fault their pages in")
    return ok
