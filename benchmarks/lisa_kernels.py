"""Kernel time of LiSA decode attention against full decode attention, side by side.

For each head shape (LLaMA-2-7B: 32 heads / 32 KV heads of dim 128; LLaMA-3-8B: 32 / 8 of dim
128), context and batch, one decode step of one layer's attention over a paged cache:

  full        paged_decode_attention (q . k over the full key cache, softmax, P V)
  full + S    paged_attention_scores (the same, also writing the logits a LiSA layer reads)
  LiSA        lisa_attention reading those logits: head aligner + low-rank delta over the
              rank-r key cache, softmax, P V (r = max(8, d/8) = 16, aligner width = heads)
  LiSA + S    lisa_attention that also hands its logits on (a chain)

Times are medians of CUDA-event-timed repetitions (or wall time on the CPU), in microseconds;
the ratio is LiSA / full. Random inputs; the cache holds exactly the context.

    python benchmarks/lisa_kernels.py [--device cuda] [--contexts 512,2048,8192] [--batches 1,32] [--json F]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import machine_name, print_table, write_json  # noqa: E402
from lisa_rt import ops  # noqa: E402
from lisa_rt.lisa import default_rank  # noqa: E402

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}
BLOCK = 16


def time_us(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000)
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e6)
    return statistics.median(samples)


def measure(shape: str, context: int, batch: int, device: torch.device, dtype: torch.dtype, reps: int) -> dict:
    heads, kv_heads, dim = SHAPES[shape]
    rank = default_rank(dim)
    blocks_per_seq = math.ceil(context / BLOCK)
    num_blocks = batch * blocks_per_seq
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, dtype=dtype):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    key_cache, value_cache = randn(num_blocks, BLOCK, kv_heads, dim), randn(num_blocks, BLOCK, kv_heads, dim)
    key_lr_cache = randn(num_blocks, BLOCK, kv_heads, rank)
    tables = torch.randperm(num_blocks, device=device, generator=gen).view(batch, blocks_per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
    query, query_lr = randn(batch, heads, dim), randn(batch, heads, rank)
    out = torch.empty_like(query)
    scores = [torch.zeros(batch, heads, blocks_per_seq * BLOCK, device=device) for _ in range(2)]
    aligner = (torch.eye(heads, device=device), randn(heads, heads, dtype=torch.float32) * 0.1,
               torch.zeros(heads, device=device), randn(heads, heads, dtype=torch.float32) * 0.1,
               torch.zeros(heads, device=device))
    scale = 1 / math.sqrt(dim)
    ops.paged_attention_scores(out, scores[0], query, key_cache, value_cache, tables, cu, seq_lens, scale)

    kernels = {
        "full": lambda: ops.paged_decode_attention(out, query, key_cache, value_cache, tables, seq_lens, scale),
        "full + S": lambda: ops.paged_attention_scores(out, scores[0], query, key_cache, value_cache, tables, cu,
                                                       seq_lens, scale),
        "LiSA": lambda: ops.lisa_attention(out, None, scores[0], query_lr, key_lr_cache, value_cache, tables, cu,
                                           seq_lens, *aligner, 1 / math.sqrt(rank)),
        "LiSA + S": lambda: ops.lisa_attention(out, scores[1], scores[0], query_lr, key_lr_cache, value_cache,
                                               tables, cu, seq_lens, *aligner, 1 / math.sqrt(rank)),
    }
    row = {"shape": shape, "heads": f"{heads}/{kv_heads}x{dim}", "context": context, "batch": batch, "rank": rank}
    for name, fn in kernels.items():
        row[f"{name} us"] = round(time_us(fn, device, reps), 1)
    row["LiSA / full"] = round(row["LiSA us"] / row["full us"], 3)
    row["LiSA + S / full + S"] = round(row["LiSA + S us"] / row["full + S us"], 3)
    # Cache bytes a step reads per layer, full over LiSA (K + V against k' + V): what LiSA saves.
    row["KV read full / LiSA"] = round((2 * dim) / (dim + rank), 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [measure(shape, context, batch, device, dtype, args.reps)
            for shape in args.shapes.split(",")
            for context in map(int, args.contexts.split(","))
            for batch in map(int, args.batches.split(","))]
    print(f"LiSA vs full decode attention, one layer, {args.dtype}, {machine_name()}")
    print_table(rows, ["shape", "heads", "context", "batch", "full us", "full + S us", "LiSA us", "LiSA + S us",
                       "LiSA / full", "LiSA + S / full + S", "KV read full / LiSA"])
    write_json(args.json, {"machine": machine_name(), "dtype": args.dtype, "rows": rows})


if __name__ == "__main__":
    main()
