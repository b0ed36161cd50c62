"""What the kernel holds of a file in its page cache: dropping it (evict), and page by page
whether it still waits to be written out (Linux, root: the page frame numbers of
/proc/self/pagemap and the flags of /proc/kpageflags, proc(5))."""

from __future__ import annotations

import mmap
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

# linux/kernel-page-flags.h: the page was changed and not yet written out.
KPF_DIRTY = 4
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (written back first, so that they can go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def in_memory_filesystem(path: Path) -> bool:
    """Whether path is on tmpfs, which keeps every page in memory (nothing waits for a disk)."""
    found = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return found.stdout.strip() in ("tmpfs", "ramfs")


def require_page_flags(directory: Path) -> None:
    """Skip unless the pages of files in directory can be told dirty: root reads page frame
    numbers, and tmpfs pages are never written out."""
    if os.geteuid() != 0:
        pytest.skip("page flags (/proc/kpageflags) need root")
    if in_memory_filesystem(directory):
        pytest.skip("this filesystem keeps every page in memory (tmpfs)")


def dirty_pages(path: Path) -> tuple[int, int]:
    """(pages of the file still waiting to be written out, pages of the file)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        first = np.frombuffer(mapped, np.uint8).ctypes.data // mmap.PAGESIZE
        for page in range(pages):
            mapped[page * mmap.PAGESIZE]  # mapped in: now it shows in pagemap
        dirty = 0
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kpf:
            for page in range(pages):
                pagemap.seek((first + page) * 8)
                entry = int.from_bytes(pagemap.read(8), "little")
                assert entry & _PRESENT and entry & _PFN_MASK, "page frame not readable"
                kpf.seek((entry & _PFN_MASK) * 8)
                dirty += int.from_bytes(kpf.read(8), "little") >> KPF_DIRTY & 1
    return dirty, pages
