"""Prefill time of SmolLM2-135M-Instruct, with and without its LiSA adapter, side by side.

    python benchmarks/cpu_prefill.py [--lengths 512 2048] [--device cpu] [--dtype bfloat16] [--json F]

Each length is one prompt of that many tokens (the licence texts of /usr/share/common-licenses,
repeated as needed) prefilled by `Model.prefill_logits` (chunks of 512 tokens, the logits of
every token, as `lisa-rt eval` does), median of three after a warm-up.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: the device's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for lisa in (False, None):
        model = lisa_rt.load_model("smollm2", device=args.device, dtype=args.dtype, lisa=lisa, progress=False)
        for length in args.lengths:
            seconds = prefill_seconds(model, length)
            rows.append({"model": "LiSA" if lisa is None else "base", "tokens": length, "seconds": round(seconds, 3),
                         "tok_per_s": round(length / seconds, 1), "dtype": str(model.dtype).split(".")[-1]})
    print(f"prefill, SmolLM2-135M-Instruct, {machine_name()}")
    print_table(rows, ["model", "tokens", "dtype", "seconds", "tok_per_s"])
    write_json(args.json, {"machine": machine_name(), "rows": rows})


if __name__ == "__main__":
    main()
