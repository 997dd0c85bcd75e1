"""Kernel time of LiSA decode attention against full decode attention, side by side.

For each head shape (LLaMA-2-7B: 32 heads / 32 KV heads of dim 128; LLaMA-3-8B: 32 / 8 of dim
128), context and batch, one decode step of one layer's attention over a paged cache:

  full        paged_decode_attention (q . k over the full key cache, softmax, P V)
  full + S    paged_attention_scores (the same, also writing the logits a LiSA layer reads)
  LiSA        lisa_attention reading those logits: head aligner + low-rank delta over the
              rank-r key cache, softmax, P V (r = max(8, d/8) = 16, aligner width = heads)
  LiSA + S    lisa_attention that also hands its logits on (a chain)

Times are medians of CUDA-event-timed repetitions (or wall time on the CPU), in microseconds;
the ratio is LiSA / full. Random inputs; the cache holds exactly the context. With --layers N
there are N sets of caches and each repetition reads the next, as a decode step's layers do:
on the CPU a single set stays in L2/L3 from one repetition to the next, which no model's does.

    python benchmarks/lisa_kernels.py [--device cuda] [--shapes llama2-7b,llama3-8b,smollm2]
        [--contexts 512,2048,8192] [--batches 1,32] [--layers 1] [--json F]
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

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
DEFAULT_SHAPES = "llama2-7b,llama3-8b"
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


def measure(shape: str, context: int, batch: int, device: torch.device, dtype: torch.dtype, reps: int,
            layers: int = 1) -> dict:
    heads, kv_heads, dim = SHAPES[shape]
    rank = default_rank(dim)
    blocks_per_seq = math.ceil(context / BLOCK)
    num_blocks = batch * blocks_per_seq
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, dtype=dtype):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    caches = [(randn(num_blocks, BLOCK, kv_heads, dim), randn(num_blocks, BLOCK, kv_heads, dim),
               randn(num_blocks, BLOCK, kv_heads, rank)) for _ in range(layers)]
    key_cache, value_cache, key_lr_cache = caches[0]
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

    turn = [0]

    def next_caches():  # the next layer's caches, round the sets
        turn[0] = (turn[0] + 1) % layers
        return caches[turn[0]]

    def full():
        keys, values, _ = next_caches()
        ops.paged_decode_attention(out, query, keys, values, tables, seq_lens, scale)

    def full_s():
        keys, values, _ = next_caches()
        ops.paged_attention_scores(out, scores[0], query, keys, values, tables, cu, seq_lens, scale)

    def lisa(handed_on):
        _, values, keys_lr = next_caches()
        ops.lisa_attention(out, handed_on, scores[0], query_lr, keys_lr, values, tables, cu, seq_lens, *aligner,
                           1 / math.sqrt(rank))

    kernels = {"full": full, "full + S": full_s, "LiSA": lambda: lisa(None), "LiSA + S": lambda: lisa(scores[1])}
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
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--layers", type=int, default=1, help="sets of caches read in turn (1)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.layers < 1:
        ap.error("--layers must be >= 1")
    unknown = [shape for shape in args.shapes.split(",") if shape not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r} (one of {', '.join(SHAPES)})")
    rows = [measure(shape, context, batch, device, dtype, args.reps, args.layers)
            for shape in args.shapes.split(",")
            for context in map(int, args.contexts.split(","))
            for batch in map(int, args.batches.split(","))]
    print(f"LiSA vs full decode attention, one layer, {args.dtype}, {args.layers} set(s) of caches, {machine_name()}")
    print_table(rows, ["shape", "heads", "context", "batch", "full us", "full + S us", "LiSA us", "LiSA + S us",
                       "LiSA / full", "LiSA + S / full + S", "KV read full / LiSA"])
    write_json(args.json, {"machine": machine_name(), "dtype": args.dtype, "layers": args.layers, "rows": rows})


if __name__ == "__main__":
    main()
