"""LiSA against the base model, decode steps taken in turn: the two models in one process, each
with its own cache of the same KV budget, one step of each after the other.

`lisa-rt bench` measures the base model's points and then LiSA's; on a machine whose speed
drifts from minute to minute (a shared VM) the two halves can land in different minutes. Here
every LiSA step has a base step beside it, so the ratio holds while the absolute speed moves.
The two caches together take twice the budget: this is a CPU benchmark (on a GPU, `lisa-rt
bench` gives each variant most of the memory in turn).

    python benchmarks/lisa_paired.py --contexts 512,2048,6144 --batches 1,8,max \
        --json benchmarks/results/cpu_lisa_paired.json

`max` is the largest batch each model's cache holds at that context (LiSA's is larger).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import adapter_to_compare, machine_name, print_table, run_main, write_json  # noqa: E402
from lisa_rt import bench  # noqa: E402
from lisa_rt.checkpoint import load_config, load_tensors  # noqa: E402
from lisa_rt.engine import Engine  # noqa: E402
from lisa_rt.errors import UserError  # noqa: E402
from lisa_rt.kv_cache import DEFAULT_BLOCK_SIZE, KVCache  # noqa: E402
from lisa_rt.model import Model, parse_device, parse_dtype  # noqa: E402
from lisa_rt.registry import resolve_model  # noqa: E402
from lisa_rt.tokenizer import load_tokenizer  # noqa: E402


def parse_sizes(spec: str, option: str, allow_max: bool = False) -> list[int | None]:
    """Positive integers from "1,8,max" (None for max where allowed)."""
    sizes: list[int | None] = []
    for part in spec.split(","):
        if allow_max and part == "max":
            sizes.append(None)
            continue
        try:
            size = int(part)
        except ValueError:
            size = 0
        if size < 1:
            raise UserError(f"{option} takes positive integers{' or max' if allow_max else ''}, got {spec!r}")
        sizes.append(size)
    return sizes


def sequences_fitting(config, dtype: torch.dtype, lisa, budget: int, tokens: int) -> int:
    """Sequences of `tokens` tokens a cache of `budget` bytes holds."""
    blocks = budget // KVCache.bytes_per_block(config, dtype, lisa=lisa)
    return blocks // -(-tokens // DEFAULT_BLOCK_SIZE)


class Variant:
    """One model and, for one point at a time, its cache and engine decoding a batch."""

    def __init__(self, name: str, model: Model, budget: int):
        self.name, self.model, self.budget = name, model, budget
        self.engine: Engine | None = None
        self.batch = 0

    def fits(self, tokens: int) -> int:
        return sequences_fitting(self.model.config, self.model.dtype, self.model.lisa, self.budget, tokens)

    def start(self, batch: int, context: int, tokens: int, seed: int) -> None:
        """`batch` sequences of `context` random tokens taken as prefilled, room for `tokens`."""
        cache = KVCache.for_budget(self.model.config, self.budget, self.model.device, self.model.dtype,
                                   lisa=self.model.lisa)
        bench.fill_cache_randomly(cache, seed)
        self.engine = Engine(self.model, cache, max_num_seqs=batch, overlap=False)
        self.batch = batch
        bench.add_prefilled_batch(self.engine, batch, context, tokens - context, seed)

    def step_seconds(self) -> float:
        begin = time.perf_counter()
        self.engine.step()
        bench.synchronize(self.model.device)
        return time.perf_counter() - begin

    def stop(self) -> None:
        if len(self.engine.running) != self.batch:
            raise RuntimeError(f"{self.name}: {self.batch - len(self.engine.running)} sequence(s) left the batch early")
        self.engine.abort_all()
        self.engine = None


def measure(variants: list[Variant], batch: int | None, context: int, steps: int, warmup: int,
            seed: int) -> dict:
    tokens = context + warmup + steps + 1
    row = {"context": context, "batch": "max" if batch is None else batch}
    fits = [v.fits(tokens) for v in variants]
    if min(fits) < (batch or 1):
        row["skipped"] = f"the KV budget holds {fits[0]} sequence(s) of {tokens} tokens of the base model"
        return row
    batches = [batch or most for most in fits]
    for v, b in zip(variants, batches):
        v.start(b, context, tokens, seed)
    for _ in range(warmup):
        for v in variants:
            v.step_seconds()
    seconds: list[list[float]] = [[] for _ in variants]
    for _ in range(steps):
        for v, times in zip(variants, seconds):
            times.append(v.step_seconds())
    for v in variants:
        v.stop()
    rates = []
    for v, b, times in zip(variants, batches, seconds):
        step = statistics.median(times)
        rates.append(b / step)
        row.update({f"{v.name} batch": b, f"{v.name} step ms": round(step * 1e3, 2),
                    f"{v.name} tok/s": round(b / step, 1)})
    row["LiSA/base"] = round(rates[1] / rates[0], 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lisa", default=None, help="adapter to compare (default: the model's own)")
    parser.add_argument("--contexts", default="512,2048", help="tokens in the cache when decoding starts")
    parser.add_argument("--batches", default="1,8,max", help="batch sizes; max: the largest each cache holds")
    parser.add_argument("--steps", type=int, default=16, help="timed steps of each model per point")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kv-budget-gb", type=float, default=1.0, help="each model's KV cache (1 GiB)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: lisa-rt's for the device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    contexts = parse_sizes(args.contexts, "--contexts")
    batches = parse_sizes(args.batches, "--batches", allow_max=True)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    if not math.isfinite(args.kv_budget_gb) or args.kv_budget_gb <= 0:
        raise UserError(f"--kv-budget-gb must be a positive number, got {args.kv_budget_gb}")
    path = resolve_model(args.model)
    config = load_config(path)
    longest = max(contexts) + args.warmup + args.steps + 1
    if longest > config.max_position_embeddings:
        raise UserError(f"context {max(contexts)} plus {args.warmup + args.steps + 1} decode steps exceeds "
                        f"the model's context of {config.max_position_embeddings}")
    adapter = adapter_to_compare(args.lisa, path, config)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    budget = int(args.kv_budget_gb * 2**30)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cpu" and 2 * budget > memory:
        raise UserError(f"two caches of {args.kv_budget_gb:g} GiB do not fit this machine's {memory / 2**30:.0f} GiB")
    def fitting(context: int) -> int:
        return sequences_fitting(config, dtype, None, budget, context + args.warmup + args.steps + 1)

    if all(fitting(context) < (batch or 1) for context in contexts for batch in batches):
        shortest = min(contexts)
        raise UserError(f"no point fits the base model's KV budget of {budget:,} bytes: it holds "
                        f"{fitting(shortest)} sequence(s) at context {shortest}")
    tensors = load_tensors(path, config)
    tokenizer = load_tokenizer(path, extra_eos_ids=config.eos_token_ids)
    variants = [Variant(name, Model(config, tensors, device, dtype, tokenizer=tokenizer, adapter=a), budget)
                for name, a in (("base", None), ("LiSA", adapter))]
    rows = []
    with torch.inference_mode():
        for context in contexts:
            for batch in batches:
                rows.append(measure(variants, batch, context, args.steps, args.warmup, args.seed))
                outcome = rows[-1].get("skipped") or f"LiSA/base {rows[-1]['LiSA/base']}"
                print(f"lisa_paired: context {context}, batch {rows[-1]['batch']}: {outcome}", file=sys.stderr,
                      flush=True)

    dtype_name = str(dtype).removeprefix("torch.")
    print(f"\nLiSA against the base model, steps in turn, {args.model} ({len(adapter.config.layers)} of "
          f"{config.num_layers} layers LiSA), {dtype_name}, {machine_name()}, KV budget {args.kv_budget_gb:g} GiB "
          f"each, median of {args.steps} steps")
    print(f"command: python benchmarks/lisa_paired.py {' '.join(sys.argv[1:])}\n")
    print_table(rows, ["context", "batch", "base batch", "base step ms", "base tok/s", "LiSA batch", "LiSA step ms",
                       "LiSA tok/s", "LiSA/base", "skipped"])
    write_json(args.json, {"machine": machine_name(), "torch": torch.__version__, "model": str(path),
                           "dtype": dtype_name, "lisa_layers": adapter.config.layers,
                           "kv_budget_bytes": budget, "steps": args.steps, "warmup": args.warmup, "rows": rows})
    return 0


if __name__ == "__main__":
    run_main(main)
