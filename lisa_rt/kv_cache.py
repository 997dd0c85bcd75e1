"""Paged KV cache: a block allocator, per-sequence block tables and per-layer block pools.

Each layer's keys and values live in pools shaped [num_blocks, block_size, kv_heads, head_dim]
(a LiSA layer's key pool holds its rank-r keys k' instead: [..., kv_heads, rank]);
a sequence owns a list of block ids (its block table) and token t of it sits in block
table[t // block_size] at offset t % block_size. A full block whose keys and values are
computed is offered for sharing (prefix caching, see BlockAllocator): a sequence admitted later
whose tokens up to its end are the same takes it instead of computing it (two sequences that
compute the same block at once keep a copy each). It is never written again, and outlives its
sequences until its room is needed.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np
import torch

from . import huge_pages
from .config import LisaConfig, ModelConfig
from .errors import UserError

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocks(RuntimeError):
    """Raised when the pool cannot hold a request; the caller preempts or reports it."""


ROOT = 0  # the prefix node of the empty prefix


class PrefixMatch(NamedTuple):
    """Cached blocks holding a prompt's first `tokens` tokens: `blocks` in order, the prefix
    node of the last one, and how many of them nobody uses now (taking those shrinks the free
    count)."""
    blocks: list[int]
    tokens: int
    node: int
    idle: int


NO_MATCH = PrefixMatch([], 0, ROOT, 0)


class BlockAllocator:
    """Hands out block ids from a fixed pool and keeps computed prefixes for reuse.

    A block is free, in use (a count of the tables that hold it), or cached: in nobody's table
    but holding the keys and values of a full block of some token prefix, which a new sequence
    with that prefix takes instead of computing them again (automatic prefix caching). Cached
    blocks count as free: allocation takes never-used or uncached blocks first, then the cached
    block released longest ago.

    A prefix is named by a node: node = the node of (the node of the tokens before the block,
    the block's tokens), ROOT for the empty prefix. Lookups compare the tokens themselves, and
    a node is never reused, so a hit is exact.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # Pop from the end so low ids go first (keeps small workloads compact in memory).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._users = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # unused, with a prefix; oldest first
        self._by_key: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # -> (node, block)
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its key
        self._nodes = itertools.count(ROOT + 1)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_unused(self) -> int:
        """Free blocks that hold no cached prefix (taken before the cached ones)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks nobody uses that still hold a prefix."""
        return len(self._cached)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise OutOfBlocks(f"need {count} KV blocks, {self.num_free} free")
        fresh = min(count, len(self._free))
        taken = self._free[len(self._free) - fresh :][::-1]
        del self._free[len(self._free) - fresh :]
        for _ in range(count - fresh):
            block, _ = self._cached.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
            taken.append(block)
        for block in taken:
            self._users[block] = 1
        return taken

    def free(self, blocks: list[int]) -> None:
        # A sequence's last blocks go first into the cache's eviction order: its early blocks
        # are the prefix others are likelier to share.
        for block in reversed(blocks):
            self._users[block] -= 1
            if self._users[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def match(self, tokens: Callable[[int, int], list[int]], num_tokens: int, block_size: int) -> PrefixMatch:
        """The cached blocks holding the longest prefix of tokens(0, num_tokens) made of whole
        blocks; changes nothing."""
        blocks, node, idle = [], ROOT, 0
        for start in range(0, num_tokens - block_size + 1, block_size):
            hit = self._by_key.get((node, tuple(tokens(start, start + block_size))))
            if hit is None:
                break
            node, block = hit
            blocks.append(block)
            idle += self._users[block] == 0
        return PrefixMatch(blocks, len(blocks) * block_size, node, idle) if blocks else NO_MATCH

    def share(self, blocks: list[int]) -> None:
        """One more table holds each of these (in-use or cached) blocks."""
        for block in blocks:
            if self._users[block] == 0:
                del self._cached[block]
            self._users[block] += 1

    def register(self, node: int, tokens: tuple[int, ...], block: int) -> int:
        """Records that `block` holds the block of `tokens` after prefix `node`; returns the
        node of the longer prefix. Where another block already holds it, that one stays the
        cached copy and this block is freed as uncached when its table lets go."""
        key = (node, tokens)
        hit = self._by_key.get(key)
        if hit is not None:
            return hit[0]
        child = next(self._nodes)
        self._by_key[key] = (child, block)
        self._key_of[block] = key
        return child


def nbytes_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an allocation failed for want of memory: torch.OutOfMemoryError on CUDA, the CPU
    allocator's RuntimeError, or Python's MemoryError."""
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError))
            or "can't allocate memory" in str(exc) or "out of memory" in str(exc))


def check_fits(nbytes: int, device: torch.device) -> None:
    """A UserError when nbytes of KV pools cannot fit in the memory the device has free now (on
    the CPU, MemAvailable: past it the OOM killer, not an exception, would answer)."""
    if device.type == "cpu":
        free = huge_pages.available_memory()
    elif device.type == "cuda":
        # Memory torch's caching allocator holds for no tensor is free to the pools too.
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = None
    if free is not None and nbytes > free:
        raise UserError(f"a KV cache of {nbytes_text(nbytes)} does not fit in the {nbytes_text(free)} free on "
                        f"{device.type}: lower the KV budget (kv_cache_gb, --kv-cache-gb)")


class KVCache:
    """The per-layer key and value pools and the allocator that shares them out.

    With a LiSA config, the LiSA layers' key pools hold rank-r keys, which is what lets the same
    memory budget hold more tokens.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, device: torch.device | str,
                 dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE, lisa: LisaConfig | None = None):
        if num_blocks <= 0:
            raise UserError("the KV cache budget holds no block; raise it")
        self.block_size = block_size
        self.num_blocks = num_blocks
        lisa_layers = set(lisa.layers) if lisa is not None else set()

        key_widths = [lisa.rank if i in lisa_layers else config.head_dim for i in range(config.num_layers)]
        shapes = [(num_blocks, block_size, config.num_kv_heads, width)
                  for width in key_widths + [config.head_dim] * config.num_layers]
        nbytes = sum(math.prod(shape) for shape in shapes) * torch.empty((), dtype=dtype).element_size()
        check_fits(nbytes, torch.device(device))
        # On the CPU in one huge-page arena where there is one (huge_pages.py).
        pools = None
        if torch.device(device).type == "cpu":
            pools = huge_pages.zeros_packed([(shape, dtype) for shape in shapes])
        if pools is None:
            try:
                pools = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):  # a device fault is not a budget to lower
                    raise
                raise UserError(f"could not allocate a KV cache of {nbytes_text(nbytes)} on {device}: lower the "
                                f"KV budget (kv_cache_gb, --kv-cache-gb; {str(exc).splitlines()[0][:120]})") from None
        self.key_pools, self.value_pools = pools[: config.num_layers], pools[config.num_layers :]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(config: ModelConfig, dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE,
                        lisa: LisaConfig | None = None) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return config.kv_bytes_per_token(element, lisa) * block_size

    @classmethod
    def for_tokens(cls, config: ModelConfig, token_counts: list[int], device, dtype,
                   block_size: int = DEFAULT_BLOCK_SIZE, lisa: LisaConfig | None = None) -> "KVCache":
        """A cache exactly large enough for sequences of the given final lengths."""
        blocks = sum(math.ceil(n / block_size) for n in token_counts)
        return cls(config, max(blocks, 1), device, dtype, block_size, lisa)

    @classmethod
    def for_budget(cls, config: ModelConfig, budget_bytes: int, device, dtype,
                   block_size: int = DEFAULT_BLOCK_SIZE, lisa: LisaConfig | None = None) -> "KVCache":
        return cls(config, budget_bytes // cls.bytes_per_block(config, dtype, block_size, lisa),
                   device, dtype, block_size, lisa)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def match(self, tokens: Callable[[int, int], list[int]], num_tokens: int) -> PrefixMatch:
        """The cached blocks of the longest whole-block prefix of a sequence's tokens, leaving
        its last token out: that one must go through the model for the next token's logits."""
        return self.allocator.match(tokens, num_tokens - 1, self.block_size)


class BlockTable:
    """The blocks one sequence owns, grown on demand from the shared allocator."""

    def __init__(self, cache: KVCache, shareable: bool = True):
        self.cache = cache
        self.blocks: list[int] = []
        self.shareable = shareable  # False: its blocks hold no known tokens (bench's fake prefills)
        self.registered = 0  # leading blocks whose prefix the allocator knows
        self.node = ROOT     # the prefix node of block registered - 1

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.cache.block_size

    def ensure(self, num_tokens: int) -> None:
        """Make room for num_tokens tokens in total; raises OutOfBlocks and changes nothing."""
        missing = self.cache.blocks_for(num_tokens) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(self.cache.allocator.allocate(missing))

    def adopt(self, match: PrefixMatch) -> None:
        """Starts this (empty) table with the cached blocks of a prefix match."""
        self.cache.allocator.share(match.blocks)
        self.blocks = list(match.blocks)
        self.registered, self.node = len(match.blocks), match.node

    def register(self, tokens: Callable[[int, int], list[int]], num_tokens: int) -> None:
        """Offers for sharing the full blocks among the first num_tokens tokens, whose keys and
        values must be final (computed from exactly these tokens, never written again)."""
        size = self.cache.block_size
        if not self.shareable:
            return
        while (self.registered + 1) * size <= num_tokens:
            start = self.registered * size
            self.node = self.cache.allocator.register(self.node, tuple(tokens(start, start + size)),
                                                      self.blocks[self.registered])
            self.registered += 1

    def shrink(self, num_tokens: int) -> None:
        """Returns the blocks past those num_tokens tokens need (never a registered one): the
        room rejected drafts took. The list is replaced, not cut in place, so BlockTableRows
        rewrites the row."""
        keep = max(self.cache.blocks_for(num_tokens), self.registered)
        if keep < len(self.blocks):
            self.cache.allocator.free(self.blocks[keep:])
            self.blocks = self.blocks[:keep]

    def slots(self, start: int, end: int) -> list[int]:
        """Cache slots of token positions start..end-1."""
        size = self.cache.block_size
        return [self.blocks[p // size] * size + p % size for p in range(start, end)]

    def release(self) -> None:
        self.cache.allocator.free(self.blocks)
        self.blocks = []
        self.registered, self.node = 0, ROOT


class BlockTableRows:
    """The block tables of a batch, row by row, in a host int32 tensor [rows, width], kept up
    to date across steps by writing only what changed: a decode step mostly adds no block, or
    one. Rewriting every row each step cost about 1.5 ms of Python at 128 sequences x 128
    blocks, time a GPU decode step waits for.

    A row is matched to a table through the table's block list, which grows in place and is
    replaced when the blocks are released; the list is held here, so it cannot be recycled
    into a look-alike. Entries past a table's length are stale and never read (a sequence's
    length bounds the kernels' reads).
    """

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self._view = buffer.numpy()
        self._lists: list[list[int] | None] = [None] * buffer.shape[0]
        self._written = [0] * buffer.shape[0]

    def update(self, tables: list[BlockTable]) -> None:
        """Rows 0..len(tables)-1 now hold these tables' blocks."""
        for row, table in enumerate(tables):
            blocks = table.blocks
            start = self._written[row] if self._lists[row] is blocks else 0
            if len(blocks) > start:
                self._view[row, start : len(blocks)] = blocks[start:]
            self._lists[row] = blocks
            self._written[row] = len(blocks)
