"""What log probabilities cost: decode speed with and without them, and scoring a prompt (echo
with logprobs, as lm-evaluation-harness asks) against prefilling it alone. One LLM, one machine.

    python benchmarks/logprobs.py [-m smollm2] [--batch 1,8] [--decode-tokens 64]
                                  [--prompt-tokens 1024] [--repeats 3] [--json out.json]

Decode: --batch requests at once, greedy, --decode-tokens each, with logprobs None (off), 0 (the
chosen token's), 5 and 20 alternatives; the table gives generated tokens per second and the
ratio to off. Scoring: one --prompt-tokens prompt (this project's README), one token generated,
with prompt_logprobs None, 0 and 5, without the prefix cache (a scored prompt never takes it);
the table gives the median seconds of --repeats runs and the ratio to the plain prefill.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_name, print_table, write_json  # noqa: E402
from lisa_rt import LLM, SamplingParams  # noqa: E402

SETTINGS = (None, 0, 5, 20)


def readme_tokens(llm: LLM, count: int) -> list[int]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return llm.tokenizer.encode(text)[:count]


def decode_rows(llm: LLM, batch: int, tokens: int, repeats: int) -> list[dict]:
    prompts = [f"Request {i}: the history of" for i in range(batch)]
    rows = []
    for k in SETTINGS:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=k)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            done = llm.generate(prompts, params)
            rates.append(sum(c.completion_tokens for c in done) / (time.perf_counter() - start))
        rows.append({"work": f"decode, batch {batch}", "logprobs": "off" if k is None else k,
                     "tok/s": round(statistics.median(rates), 1)})
    for row in rows:
        row["vs off"] = round(row["tok/s"] / rows[0]["tok/s"], 2)
    return rows


def scoring_rows(llm: LLM, ids: list[int], repeats: int) -> list[dict]:
    rows = []
    for k in SETTINGS[:3]:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate([ids], params)
            seconds.append(time.perf_counter() - start)
        rows.append({"work": f"prefill {len(ids)} tokens", "logprobs": "off" if k is None else k,
                     "s": round(statistics.median(seconds), 3)})
    for row in rows:
        row["vs off"] = round(row["s"] / rows[0]["s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with LLM(args.model, device=args.device, dtype=args.dtype, prefix_caching=False) as llm:
        llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        decode = [row for batch in (int(b) for b in args.batch.split(",")) for row in
                  decode_rows(llm, batch, args.decode_tokens, args.repeats)]
        scoring = scoring_rows(llm, readme_tokens(llm, args.prompt_tokens), args.repeats)
        device, dtype = str(llm.model.device), str(llm.model.dtype).removeprefix("torch.")

    machine = machine_name()
    print(f"# {machine}; model {args.model} on {device}, {dtype}; greedy; median of {args.repeats}")
    print_table(decode, list(decode[0]))
    print()
    print_table(scoring, list(scoring[0]))
    write_json(args.json, {"benchmark": "logprobs", "machine": machine, "model": args.model, "device": device,
                           "dtype": dtype, "decode": decode, "scoring": scoring})


if __name__ == "__main__":
    main()
