"""Giving freed heap memory back to the system between messages.

A client's train or evaluate message, and the server's evaluation, allocate and free a
few hundred MB of tensors and Python objects. glibc keeps what was freed inside its heaps
for reuse, so a process's resident memory stays at the high-water mark of the largest
message it has handled, and with several torch processes on one machine (the ServerApp,
each Ray actor) those marks add up. ``malloc_trim`` returns the free pages of every heap
to the system; it costs a walk over the heaps (5 ms after freeing 200 MB here), once per
message. A fixed ``MALLOC_MMAP_THRESHOLD_`` would return them as well, at every free,
and cost 36 % more CPU time in training (page faults of fresh pages for every tensor).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the free pages of the process's heaps to the system; True when the C
    library could (glibc), False where it cannot (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def releasing_freed_memory(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, followed by :func:`release_freed_memory` whether it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_freed_memory()

    return wrapper
