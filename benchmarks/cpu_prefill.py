"""Prefill time of a model with and without its LiSA adapter, side by side.

    python benchmarks/cpu_prefill.py [--model smollm2] [--lisa PATH] [--lengths 512 2048] [--device cpu]
                                     [--dtype bfloat16] [--ops] [--json F]

Each length is one prompt of that many tokens (the licence texts of /usr/share/common-licenses,
repeated as needed) prefilled by `Model.prefill_logits` (chunks of 512 tokens, the logits of
every token, as `lisa-rt eval` does), median of three after a warm-up. The adapter is --lisa or
the model's own. With --ops, one more prefill runs under torch's profiler and a second table
gives the seconds spent in each of the decoder's main ops (each op's own time plus the ops it
calls).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import adapter_to_compare, machine_name, print_table, run_main, write_json  # noqa: E402

from lisa_rt.checkpoint import load_config, load_tensors  # noqa: E402
from lisa_rt.errors import UserError  # noqa: E402
from lisa_rt.kv_cache import BlockTable  # noqa: E402
from lisa_rt.model import Model, parse_device, parse_dtype  # noqa: E402
from lisa_rt.registry import resolve_model  # noqa: E402
from lisa_rt.tokenizer import load_tokenizer  # noqa: E402

TEXTS = Path("/usr/share/common-licenses")

# The ops a prefill's time goes to: the layers' matrix products and the three attentions (the
# full one, the one that hands its logits on to a LiSA layer, LiSA's own).
PROFILED_OPS = ("lisa_rt::linear", "lisa_rt::paged_prefill_attention", "lisa_rt::paged_attention_scores",
                "lisa_rt::lisa_attention")


def prompt_ids(model, length: int) -> list[int]:
    text = "\n".join(p.read_text(errors="replace") for p in sorted(TEXTS.glob("*")) if p.is_file())
    ids = model.tokenizer.encode(text or "The quick brown fox jumps over the lazy dog. ")
    return (ids * (length // max(len(ids), 1) + 1))[:length]


def prefilled_cache(model, length: int):
    """A cache and block table for one sequence of `length` tokens, and its prompt, warmed up."""
    ids = prompt_ids(model, length)
    cache = model.new_cache([length])
    table = BlockTable(cache)
    table.ensure(length)
    model.prefill_logits(ids[:64], cache, table)  # warm-up
    return ids, cache, table


def prefill_seconds(model, length: int, repeats: int = 3) -> float:
    ids, cache, table = prefilled_cache(model, length)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.prefill_logits(ids, cache, table)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_seconds(model, length: int) -> dict[str, float]:
    """Seconds of one prefill of `length` tokens spent in each of PROFILED_OPS, and in all."""
    from torch.profiler import ProfilerActivity, profile

    ids, cache, table = prefilled_cache(model, length)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.prefill_logits(ids, cache, table)
        total = time.perf_counter() - start
    spent = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PROFILED_OPS}
    # Microseconds kept: a small model's ops take less than a millisecond.
    return {**{name.split("::")[1]: round(spent.get(name, 0.0), 6) for name in PROFILED_OPS},
            "total": round(total, 6)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lisa", default=None, help="adapter to compare (default: the model's own)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: the device's")
    ap.add_argument("--ops", action="store_true", help="also the seconds spent in each main op")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = resolve_model(args.model)
    config = load_config(path)
    if min(args.lengths) < 1 or max(args.lengths) > config.max_position_embeddings:
        raise UserError(f"--lengths must be 1 to the model's context of {config.max_position_embeddings}, "
                        f"got {' '.join(map(str, args.lengths))}")
    adapter = adapter_to_compare(args.lisa, path, config)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    tensors = load_tensors(path, config)
    tokenizer = load_tokenizer(path, extra_eos_ids=config.eos_token_ids)
    rows, op_rows = [], []
    with torch.inference_mode():
        for name, lisa in (("base", None), ("LiSA", adapter)):
            model = Model(config, tensors, device, dtype, tokenizer=tokenizer, adapter=lisa)
            for length in args.lengths:
                seconds = prefill_seconds(model, length)
                rows.append({"model": name, "tokens": length, "seconds": round(seconds, 3),
                             "tok_per_s": round(length / seconds, 1), "dtype": str(dtype).removeprefix("torch.")})
                if args.ops:
                    op_rows.append({"model": name, "tokens": length, **op_seconds(model, length)})
    print(f"prefill, {args.model} ({len(adapter.config.layers)} of {config.num_layers} layers LiSA), "
          f"{machine_name()}")
    print_table(rows, ["model", "tokens", "dtype", "seconds", "tok_per_s"])
    if op_rows:
        print("\nseconds in each op, one profiled prefill (the op and what it calls)")
        print_table(op_rows, ["model", "tokens"] + [name.split("::")[1] for name in PROFILED_OPS] + ["total"])
    write_json(args.json, {"machine": machine_name(), "model": str(path), "lisa_layers": adapter.config.layers,
                           "rows": rows, **({"ops": op_rows} if op_rows else {})})
    return 0


if __name__ == "__main__":
    run_main(main)
