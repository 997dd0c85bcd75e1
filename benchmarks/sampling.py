"""What sampling costs: the sampler alone per decode step, and decode with it against greedy.

    python benchmarks/sampling.py [--rows 1 8 64] [--tokens 64] [--batches 1 8] [--random-weights]
        [--json out.json]

1. `sample_batch` alone on random logits of SmolLM2's vocabulary (49,152), per step of `rows`
   sequences, for the settings users send: the CLI's defaults (temperature 0.8, top_k 40, top_p
   0.95, min_p 0.05), the OpenAI server's (temperature 1, nothing cut), top_p 0.9 alone, and the
   CLI's with a repetition penalty. The logits are where the model leaves them (the GPU if there
   is one, else the CPU).
2. `lisa_rt.generate` on SmolLM2-135M-Instruct (the device's default dtype, its shipped adapter),
   `tokens` new tokens per sequence after a short prompt, with the CLI's default sampling and
   greedy, side by side; the ratio is what sampling leaves of greedy's rate. --random-weights
   decodes a SmolLM2-shaped model with random weights instead (no adapter): a lent GPU machine
   has no model to load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import greedy, machine_name, print_table, write_json  # noqa: E402

import torch  # noqa: E402

import lisa_rt  # noqa: E402
from lisa_rt.bench import SHAPES, random_model  # noqa: E402
from lisa_rt.sampling import Sampler, SamplingParams, sample_batch  # noqa: E402

SETTINGS = {
    "CLI defaults": SamplingParams(),
    "server defaults": SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    "top_p 0.9 alone": SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0),
    "CLI + repetition penalty 1.1": SamplingParams(repetition_penalty=1.1),
}
VOCAB = 49152


def sampler_ms(params: SamplingParams, rows: int, device: str, repeats: int) -> float:
    """Median milliseconds of one sample_batch over rows x VOCAB logits (spread like a model's)."""
    logits = (torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 3).to(device)
    samplers = [Sampler(params.replace(seed=row)) for row in range(rows)]
    history = list(range(300))
    for _ in range(3):
        sample_batch(samplers, logits, lambda row: (history, ()))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample_batch(samplers, logits, lambda row: (history, ()))  # returns host ints: the step is done
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_rate(model, batch: int, tokens: int, params: SamplingParams) -> float:
    prompts = [model.tokenizer.encode("The city") if model.tokenizer else [1, 2, 3]] * batch
    per_row = [params.replace(max_tokens=tokens, seed=row, ignore_eos=True) for row in range(batch)]
    lisa_rt.generate(model, prompts, [p.replace(max_tokens=4) for p in per_row])  # warm-up
    start = time.perf_counter()
    lisa_rt.generate(model, prompts, per_row)
    return batch * tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--random-weights", action="store_true", help="decode a random SmolLM2-shaped model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    alone = [{"settings": name, "rows": rows, "ms_per_step": sampler_ms(params, rows, device, args.repeats)}
             for name, params in SETTINGS.items() for rows in args.rows]
    print(f"sample_batch alone ({device}), median ms per step:")
    print_table([{"settings": r["settings"], "rows": r["rows"], "ms/step": f"{r['ms_per_step']:.3f}",
                  "ms/row": f"{r['ms_per_step'] / r['rows']:.3f}"} for r in alone],
                ["settings", "rows", "ms/step", "ms/row"])

    if args.random_weights:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = random_model(SHAPES["smollm2"], device, dtype)
        what = "a random SmolLM2-shaped model"
    else:
        model = lisa_rt.load_model("smollm2", device=device, progress=False)
        what = "SmolLM2-135M-Instruct with its adapter"
    decode = []
    for batch in args.batches:
        sampled = decode_rate(model, batch, args.tokens, SamplingParams())
        plain = decode_rate(model, batch, args.tokens, greedy(args.tokens))
        decode.append({"batch": batch, "sampled_tok_s": sampled, "greedy_tok_s": plain})
    print(f"\ndecode, {what}, {str(model.dtype).split('.')[-1]}, {args.tokens} tokens per sequence:")
    print_table([{"batch": r["batch"], "CLI-default sampling tok/s": f"{r['sampled_tok_s']:.1f}",
                  "greedy tok/s": f"{r['greedy_tok_s']:.1f}",
                  "sampled / greedy": f"{r['sampled_tok_s'] / r['greedy_tok_s']:.2f}"} for r in decode],
                ["batch", "CLI-default sampling tok/s", "greedy tok/s", "sampled / greedy"])
    write_json(args.json, {"machine": machine_name(), "device": device, "vocab": VOCAB, "model": what,
                           "sampler": alone, "decode": decode, "tokens": args.tokens})


if __name__ == "__main__":
    main()
