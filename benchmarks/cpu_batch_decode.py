"""Batched decode on the CPU: how throughput grows with the number of sequences decoded together.

    python benchmarks/cpu_batch_decode.py [--batches 1 4 8 16] [--tokens 64] [--json out.json]

Model: SmolLM2-135M-Instruct (float32, its shipped LiSA adapter, as `lisa-rt generate` runs
it). Every sequence samples (temperature 1, min_p 0.02, its own seed) the same number of
tokens after a short prompt (top-k and top-p off), as `lisa-rt fit --data self` does; one
warm-up run per batch size.
"""
from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import machine_name, print_table, write_json  # noqa: E402

import lisa_rt  # noqa: E402
from lisa_rt.sampling import SamplingParams  # noqa: E402


def decode_rate(model, batch: int, tokens: int) -> dict:
    prompts = [model.tokenizer.encode("The city")] * batch
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.02, seed=i,
                             ignore_eos=True)
              for i in range(batch)]
    lisa_rt.generate(model, prompts, [p.replace(max_tokens=4) for p in params])  # warm-up
    start = time.perf_counter()
    lisa_rt.generate(model, prompts, params)
    seconds = time.perf_counter() - start
    return {"batch": batch, "tok_s": batch * tokens / seconds, "ms_per_step": seconds / tokens * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = lisa_rt.load_model("smollm2", device="cpu", dtype="float32", progress=False)
    results = [decode_rate(model, batch, args.tokens) for batch in args.batches]
    base = results[0]["tok_s"]
    print_table([{"batch": r["batch"], "tok/s": f"{r['tok_s']:.1f}", "ms/step": f"{r['ms_per_step']:.0f}",
                  f"vs batch {results[0]['batch']}": f"{r['tok_s'] / base:.2f}x"} for r in results],
                ["batch", "tok/s", "ms/step", f"vs batch {results[0]['batch']}"])
    write_json(args.json, {"machine": machine_name(), "model": "SmolLM2-135M-Instruct, fp32, LiSA adapter",
                           "tokens": args.tokens, "results": results})


if __name__ == "__main__":
    main()
