"""CPU tensors in transparent huge pages (2 MiB), where Linux offers them.

A decode step reads every weight once and every cached key and value of its context. With the
default 4 KiB pages those reads leave the TLB every few kilobytes, which on this project's CPU
machine held SmolLM2's matrix-vector products to about 19 GB/s of weights, where the same
weights in huge pages stream at about 27 GB/s (BENCHMARKS.md). So on the CPU the model's weights
and the KV cache's pools are laid out in anonymous mappings advised for huge pages
(madvise(MADV_HUGEPAGE)): a group of tensors shares one mapping, since most per-layer weights are
smaller than a huge page. (torch's own switch, THP_MEM_ALLOC_ENABLE, has to be set before torch
allocates anything and advises single allocations of 2 MiB or more only.)

Where the kernel has transparent huge pages off, or the platform has no madvise, tensors stay
where torch put them: nothing changes but the speed. LISA_RT_HUGE_PAGES=0 asks for that too.
"""
from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # bytes between the starts of packed tensors: whole cache lines
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_offered() -> bool:
    """Whether madvise(MADV_HUGEPAGE) can give this process huge pages: Linux with transparent
    huge pages set to "always" or "madvise" (the setting in brackets), and LISA_RT_HUGE_PAGES not 0."""
    if os.environ.get("LISA_RT_HUGE_PAGES") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def huge_page_arena(nbytes: int) -> torch.Tensor | None:
    """A uint8 CPU tensor of nbytes starting on a huge-page boundary, in an anonymous mapping
    advised for huge pages (zero until written, and taken from memory only then; freed with the
    last tensor that views it); None where huge pages are not offered or the advice is refused."""
    if nbytes <= 0 or not huge_pages_offered():
        return None
    # One huge page more than asked, so that the start can move up to a boundary.
    try:
        mapping = mmap.mmap(-1, math.ceil(nbytes / HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE,
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no address space for it: torch's own allocation will say so if it matters
        return None
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        mapping.close()
        return None
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping open
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def _packed_views(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """(arena, contiguous views of the given (shape, dtype)s one after another in it, each start
    64-byte aligned); None where no arena can be had."""
    nbytes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in specs]
    starts = [0]
    for size in nbytes:
        starts.append(starts[-1] + math.ceil(size / ALIGNMENT) * ALIGNMENT)
    arena = huge_page_arena(starts[-1])
    if arena is None:
        return None
    return arena, [arena[start : start + size].view(dtype).view(shape)
                   for (shape, dtype), start, size in zip(specs, starts, nbytes)]


def zeros_packed(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor] | None:
    """Zeroed contiguous tensors of the given (shape, dtype)s, one after another in one huge-page
    arena (each start 64-byte aligned); None where no arena can be had."""
    packed = _packed_views(specs)
    if packed is None:
        return None
    arena, views = packed
    # Written once, so that the memory is taken now, as torch.zeros takes it: an untouched mapping
    # would only fail (the OOM killer) when a pool first fills up mid-serving.
    arena.zero_()
    return views


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU tensors in one huge-page arena, in order; the tensors themselves where no
    arena can be had, any of them is not on the CPU, or the copies would take more than half of
    the memory available (the originals are still held while they are made)."""
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return tensors
    available = available_memory()
    if available is None or sum(t.numel() * t.element_size() for t in tensors) > available // 2:
        return tensors
    packed = _packed_views([(tuple(t.shape), t.dtype) for t in tensors])
    if packed is None:
        return tensors
    views = packed[1]
    for dst, src in zip(views, tensors):  # (the copies take the memory)
        dst.copy_(src)
    return views
