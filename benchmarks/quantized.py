"""Quantized weights on the CPU: decode and prefill speed, and perplexity, of float weights,
q8_0 and q4_1 (`--quantize`), side by side in one run.

    python benchmarks/quantized.py [-m smollm2] [--no-lisa] [--batch 1,8] [--tokens 64]
                                   [--repeats 3] [--text FILE] [--max-tokens 8192] [--json out.json]

Speed: the model in its default dtype (bfloat16 on AVX2 CPUs), --batch greedy requests of
--tokens each, the three weight settings taken in turn --repeats times (median decode tok/s);
the weight bytes a decode step streams and the read rate they imply; one 512-token prefill.
Quality (with --text): perplexity over the first --max-tokens tokens in 1,024-token windows, in
float32 (so that only the weights differ), and its ratio to the float weights'.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import greedy, machine_name, print_table, write_json  # noqa: E402
from lisa_rt import load_model  # noqa: E402
from lisa_rt.bench import streamed_weight_bytes  # noqa: E402
from lisa_rt.engine import generate  # noqa: E402
from lisa_rt.eval import perplexity  # noqa: E402

SETTINGS = (None, "q8_0", "q4_1")


def decode_rate(model, batch: int, tokens: int) -> float:
    prompts = [model.tokenizer.encode(f"Request {i}: the history of") for i in range(batch)]
    done = generate(model, prompts, greedy(tokens))
    return statistics.median(c.timings["decode_tok_per_s"] for c in done) * batch


def prefill_seconds(model, tokens: int = 512) -> float:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text)[:tokens]
    start = time.perf_counter()
    model.logits(ids)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--no-lisa", action="store_true")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text", default=None)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lisa = False if args.no_lisa else None
    batches = [int(b) for b in args.batch.split(",")]
    models = {q: load_model(args.model, device="cpu", lisa=lisa, quantize=q) for q in SETTINGS}
    for model in models.values():  # warm: first calls page weights in and size workspaces
        decode_rate(model, 1, 4)
    rates = {(q, b): [] for q in SETTINGS for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            for q in SETTINGS:  # in turn, so that the machine's drift falls on all alike
                rates[q, b].append(decode_rate(models[q], b, args.tokens))
    rows = []
    for q, model in models.items():
        weights = streamed_weight_bytes(model)
        one = statistics.median(rates[q, 1]) if 1 in batches else None
        row = {"weights": q or str(model.dtype).removeprefix("torch."),
               "MB a step": round(weights / 1e6, 1),
               "GB/s at batch 1": "-" if one is None else round(one * weights / 1e9, 1),
               "prefill 512 s": round(statistics.median(prefill_seconds(model) for _ in range(2)), 2)}
        for b in batches:
            rate = statistics.median(rates[q, b])
            row[f"batch {b} tok/s"] = round(rate, 1)
            row[f"batch {b} vs float"] = round(rate / statistics.median(rates[None, b]), 2)
        rows.append(row)
    del models
    if args.text:
        ids = None
        for row, q in zip(rows, SETTINGS):
            model = load_model(args.model, device="cpu", dtype="float32", lisa=lisa, quantize=q)
            if ids is None:
                ids = model.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))[: args.max_tokens]
            row["ppl (float32)"] = round(perplexity(model, ids, 1024, progress=False)["ppl"], 3)
            row["ppl vs float"] = round(row["ppl (float32)"] / rows[0]["ppl (float32)"], 4)
    print(f"{machine_name()}; model {args.model}, {'no LiSA' if args.no_lisa else 'its LiSA adapter'}")
    print_table(rows, list(rows[0]))
    write_json(args.json, {"machine": machine_name(), "model": args.model, "lisa": not args.no_lisa,
                           "tokens": args.tokens, "text": args.text, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
