"""CUDA-graph decode: the whole decode step of a batch, captured once per batch size, replayed.

A decode step launches a dozen kernels per layer; at small batch sizes launching them from
Python costs more than running them. Captured as a CUDA graph the step is one launch. Inputs
live in static device buffers (token ids, positions, cache slots, block tables, sequence
lengths) that each step refills with one copy apiece; a batch is padded up to the nearest
captured size with rows that write no cache slot (slot -1) and attend to no key (length 0).
Graphs are captured lazily, the first time a padded size is needed.
"""
from __future__ import annotations

import math

import torch

from .kv_cache import BlockTable, BlockTableRows, KVCache
from .model import Batch, Model

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def capture_sizes(max_batch: int) -> list[int]:
    """The batch sizes captured for up to max_batch sequences: CAPTURE_SIZES below it, every
    power of two past them below it, and max_batch itself. The CUDA decode attention divides its
    work by the batch's next power of two, so a batch and the captured size it pads up to (never
    past that power) divide it alike and attend bit for bit alike. (The matrix products do not
    promise that: cuBLAS may pick another kernel for another number of rows.)"""
    sizes = [s for s in CAPTURE_SIZES if s < max_batch]
    power = 2 * CAPTURE_SIZES[-1]
    while power < max_batch:
        sizes.append(power)
        power *= 2
    return sizes + [max_batch]


def padded_size(sizes: list[int], batch: int) -> int | None:
    """The smallest of sizes that holds batch, or None."""
    return next((s for s in sizes if s >= batch), None)


class CudaGraphDecoder:
    """Runs pure-decode batches of one model and cache through captured CUDA graphs."""

    def __init__(self, model: Model, cache: KVCache, max_batch: int):
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        self.model = model
        self.cache = cache
        self.sizes = capture_sizes(max_batch)
        size = self.sizes[-1]
        width = math.ceil(model.max_context / cache.block_size)
        dev = model.device

        def buffers(dtype: torch.dtype, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
            """A static device buffer and the pinned host buffer that fills it."""
            return (torch.zeros(*shape, dtype=dtype, device=dev),
                    torch.zeros(*shape, dtype=dtype, pin_memory=True))

        self.input_ids = buffers(torch.long, size)
        self.positions = buffers(torch.long, size)
        self.slot_mapping = buffers(torch.long, size)
        self.seq_lens = buffers(torch.int32, size)
        self.block_tables = buffers(torch.int32, size, width)
        self.table_rows = BlockTableRows(self.block_tables[1])
        self.rows = torch.arange(size, device=dev)
        self.cu_query_lens = torch.arange(size + 1, dtype=torch.int32, device=dev)
        # size -> (graph, its output logits, the workspace it was captured with: held so that
        # a later, larger eager pass that regrows the model's workspace cannot free memory a
        # graph still writes to)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]] = {}
        self._copied = torch.cuda.Event()
        # Grown outside any capture, so that captures allocate no workspace of their own (LiSA
        # logits buffers included: they span every key a block table row can address).
        self.max_keys = width * cache.block_size
        model.workspace(size, self.max_keys)

    def padded_size(self, batch: int) -> int | None:
        return padded_size(self.sizes, batch)

    def _batch(self, size: int) -> Batch:
        return Batch(input_ids=self.input_ids[0][:size], positions=self.positions[0][:size],
                     slot_mapping=self.slot_mapping[0][:size], block_tables=self.block_tables[0][:size],
                     seq_lens=self.seq_lens[0][:size], cu_query_lens=self.cu_query_lens[: size + 1],
                     logits_rows=self.rows[:size], is_decode=True)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]:
        batch = self._batch(size)
        workspace = self.model.workspace(size, self.max_keys)
        # Padding rows only: the warm-up (cuBLAS handles, lazy init) writes no cache slot.
        self.slot_mapping[0].fill_(-1)
        self.seq_lens[0].zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model.forward(batch, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model.forward(batch, self.cache)
        return graph, logits, workspace

    @torch.inference_mode()
    def run(self, chunks: list[tuple[list[int], int, BlockTable]], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [len(chunks), vocab] for chunks of one token each (see build_batch);
        input_ids (on the device), when given, replace the chunks' token ids."""
        count = len(chunks)
        size = self.padded_size(count)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        # The previous step's copies must be done before the pinned buffers are rewritten.
        self._copied.synchronize()
        block = self.cache.block_size
        pad = size - count
        fields = [
            (self.positions, [start for _, start, _ in chunks] + [0] * pad),
            # Padding rows write no cache slot and attend to no key.
            (self.slot_mapping, [table.blocks[start // block] * block + start % block
                                 for _, start, table in chunks] + [-1] * pad),
            (self.seq_lens, [start + 1 for _, start, _ in chunks] + [0] * pad),
        ]
        if input_ids is None:
            fields.append((self.input_ids, [tokens[0] for tokens, _, _ in chunks] + [0] * pad))
        else:
            # Padding rows keep whatever ids they had: any valid id will do for them.
            self.input_ids[0][:count].copy_(input_ids)
        for (device_buf, host_buf), values in fields:
            host_buf[:size] = torch.tensor(values, dtype=host_buf.dtype)
            device_buf[:size].copy_(host_buf[:size], non_blocking=True)
        self.table_rows.update([table for _, _, table in chunks])
        self.block_tables[0][:size].copy_(self.block_tables[1][:size], non_blocking=True)
        self._copied.record(torch.cuda.current_stream(self.model.device))  # the copies' stream
        graph, logits, _ = self.graphs[size]
        graph.replay()
        return logits[:count]
