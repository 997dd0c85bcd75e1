"""Prefill time of SmolLM2-135M-Instruct, with and without its LiSA adapter, side by side.

    python benchmarks/cpu_prefill.py [--lengths 512 2048] [--device cpu] [--dtype bfloat16] [--ops] [--json F]

Each length is one prompt of that many tokens (the licence texts of /usr/share/common-licenses,
repeated as needed) prefilled by `Model.prefill_logits` (chunks of 512 tokens, the logits of
every token, as `lisa-rt eval` does), median of three after a warm-up. With --ops, one more
prefill runs under torch's profiler and a second table gives the seconds spent in each of the
decoder's main ops (each op's own time plus the ops it calls).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import machine_name, print_table, write_json  # noqa: E402

import lisa_rt  # noqa: E402
from lisa_rt.kv_cache import BlockTable  # noqa: E402

TEXTS = Path("/usr/share/common-licenses")


def prompt_ids(model, length: int) -> list[int]:
    text = "\n".join(p.read_text(errors="replace") for p in sorted(TEXTS.glob("*")) if p.is_file())
    ids = model.tokenizer.encode(text or "The quick brown fox jumps over the lazy dog. ")
    return (ids * (length // max(len(ids), 1) + 1))[:length]


def prefill_seconds(model, length: int, repeats: int = 3) -> float:
    ids = prompt_ids(model, length)
    cache = model.new_cache([length])
    table = BlockTable(cache)
    table.ensure(length)
    model.prefill_logits(ids[:64], cache, table)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.prefill_logits(ids, cache, table)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# The ops a prefill's time goes to: the layers' matrix products and the three attentions (the
# full one, the one that hands its logits on to a LiSA layer, LiSA's own).
PROFILED_OPS = ("lisa_rt::linear", "lisa_rt::paged_prefill_attention", "lisa_rt::paged_attention_scores",
                "lisa_rt::lisa_attention")


def op_seconds(model, length: int) -> dict[str, float]:
    """Seconds of one prefill of `length` tokens spent in each of PROFILED_OPS, and in all."""
    from torch.profiler import ProfilerActivity, profile

    ids = prompt_ids(model, length)
    cache = model.new_cache([length])
    table = BlockTable(cache)
    table.ensure(length)
    model.prefill_logits(ids[:64], cache, table)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.prefill_logits(ids, cache, table)
        total = time.perf_counter() - start
    spent = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PROFILED_OPS}
    return {**{name.split("::")[1]: round(spent.get(name, 0.0), 3) for name in PROFILED_OPS},
            "total": round(total, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: the device's")
    ap.add_argument("--ops", action="store_true", help="also the seconds spent in each main op")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows, op_rows = [], []
    for lisa in (False, None):
        model = lisa_rt.load_model("smollm2", device=args.device, dtype=args.dtype, lisa=lisa, progress=False)
        for length in args.lengths:
            seconds = prefill_seconds(model, length)
            rows.append({"model": "LiSA" if lisa is None else "base", "tokens": length, "seconds": round(seconds, 3),
                         "tok_per_s": round(length / seconds, 1), "dtype": str(model.dtype).split(".")[-1]})
            if args.ops:
                op_rows.append({"model": rows[-1]["model"], "tokens": length, **op_seconds(model, length)})
    print(f"prefill, SmolLM2-135M-Instruct, {machine_name()}")
    print_table(rows, ["model", "tokens", "dtype", "seconds", "tok_per_s"])
    if op_rows:
        print("\nseconds in each op, one profiled prefill (the op and what it calls)")
        print_table(op_rows, ["model", "tokens"] + [name.split("::")[1] for name in PROFILED_OPS] + ["total"])
    write_json(args.json, {"machine": machine_name(), "rows": rows, **({"ops": op_rows} if op_rows else {})})


if __name__ == "__main__":
    main()
