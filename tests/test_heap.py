"""Giving freed heap memory back to the system (rcsr_flower.heap)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rcsr_flower.heap import releasing_freed_memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC = sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_freed_heap_pages_go_back_to_the_system():
    # in a child process: this one's heap is shared with the rest of the test session
    code = textwrap.dedent(
        f"""
        import ctypes, ctypes.util, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from rcsr_flower.heap import release_freed_memory
        def rss():
            pages = int(open("/proc/self/statm").read().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        blocks = [libc.malloc(64 * 1024) for _ in range(3000)]  # below the mmap threshold
        for b in blocks:
            libc.memset(b, 1, 64 * 1024)
        for b in blocks[:-1]:  # the last one keeps the heap's top: no automatic trim
            libc.free(b)
        before = rss()
        assert release_freed_memory()
        print(before, rss())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    before, after = map(float, out.split())
    assert before - after > 100, (before, after)  # 187 MB were freed but kept


def test_the_wrapper_releases_after_a_return_and_after_an_error(monkeypatch):
    calls = []
    monkeypatch.setattr("rcsr_flower.heap.release_freed_memory", lambda: calls.append(1))

    @releasing_freed_memory
    def ok(x: int) -> int:
        return x + 1

    @releasing_freed_memory
    def fails() -> None:
        raise ValueError("boom")

    assert ok(1) == 2 and calls == [1]
    with pytest.raises(ValueError, match="boom"):
        fails()
    assert calls == [1, 1]


def test_without_glibc_nothing_is_done(monkeypatch):
    from rcsr_flower import heap

    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_freed_memory() is False


def test_the_client_replies_release_what_they_freed():
    from rcsr_flower.client.handlers import REPLIES

    assert set(REPLIES) == {"query", "train", "evaluate"}
    assert all(fn.__wrapped__.__name__ == f"{kind}_reply" for kind, fn in REPLIES.items())
