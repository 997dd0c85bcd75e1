"""Continuous batching through the Python API: N concurrent requests (threads) vs the same N
one at a time, same LLM, same run.

    python benchmarks/api_throughput.py [-m smollm2] [--requests 16] [--max-tokens 64]
                                        [--device cpu] [--dtype float32] [--no-lisa] [--json out/api.json]

Greedy decoding with ignore_eos, so every request makes exactly --max-tokens tokens and both
modes do the same work. Reports generated tokens/s of each mode and their ratio, and whether
the concurrent answers equal the one-at-a-time ones.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import machine_name, print_table, write_json  # noqa: E402

from lisa_rt.llm import LLM  # noqa: E402
from lisa_rt.sampling import SamplingParams  # noqa: E402

TOPICS = ["the printing press", "tides", "volcanoes", "the violin", "bread", "bees", "glaciers",
          "the telescope", "paper money", "the compass", "coffee", "chess", "lighthouses", "salt",
          "the bicycle", "clocks", "silk", "maps", "windmills", "the piano"]


def prompts(n: int) -> list[str]:
    return [f"Write a short history of {TOPICS[i % len(TOPICS)]}" + (f" (part {i // len(TOPICS) + 1})"
            if i >= len(TOPICS) else "") + "." for i in range(n)]


def one_at_a_time(llm: LLM, texts: list[str], params: SamplingParams):
    start = time.perf_counter()
    results = [llm.generate([t], params)[0] for t in texts]
    return results, time.perf_counter() - start


def concurrent(llm: LLM, texts: list[str], params: SamplingParams):
    results = [None] * len(texts)
    barrier = threading.Barrier(len(texts) + 1)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = llm.generate([texts[i]], params)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--no-lisa", action="store_true", help="the base model, not its LiSA adapter")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    texts = prompts(args.requests)
    with LLM(args.model, device=args.device, dtype=args.dtype, kv_cache_gb=args.kv_cache_gb,
             max_num_seqs=max(args.requests, 1), lisa=False if args.no_lisa else None) as llm:
        llm.generate([texts[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
        serial, serial_s = one_at_a_time(llm, texts, params)
        batched, batched_s = concurrent(llm, texts, params)
        device, dtype = str(llm.model.device), str(llm.model.dtype).removeprefix("torch.")
        stats = llm.stats()

    rows = []
    for mode, results, seconds in (("one at a time", serial, serial_s), (f"{args.requests} concurrent", batched, batched_s)):
        tokens = sum(r.completion_tokens for r in results)
        rows.append({"mode": mode, "requests": len(results), "tokens": tokens, "seconds": round(seconds, 3),
                     "tok_per_s": round(tokens / seconds, 1)})
    ratio = rows[1]["tok_per_s"] / rows[0]["tok_per_s"]
    same = sum(a.token_ids == b.token_ids for a, b in zip(serial, batched))
    machine = machine_name()
    print(f"# {machine}; model {args.model}{' without LiSA' if args.no_lisa else ''} on {device}, {dtype}; "
          f"{args.max_tokens} tokens per request, greedy")
    print_table(rows, ["mode", "requests", "tokens", "seconds", "tok_per_s"])
    print(f"concurrent / one at a time: {ratio:.2f}x; identical answers: {same}/{len(texts)}; "
          f"preemptions: {stats.get('preemptions')}")
    write_json(args.json, {"benchmark": "api_throughput", "machine": machine, "model": args.model,
                           "lisa": not args.no_lisa, "device": device, "dtype": dtype, "max_tokens": args.max_tokens,
                           "rows": rows, "ratio": round(ratio, 3), "identical_answers": same,
                           "preemptions": stats.get("preemptions")})


if __name__ == "__main__":
    main()
