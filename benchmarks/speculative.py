"""Decode speed with and without speculative decoding by prompt lookup (`speculate`).

    python benchmarks/speculative.py [-m smollm2] [--speculate 4,8] [--max-tokens 160]
                                     [--repeats 3] [--json out.json]

Six chat tasks, greedy, each answered alone (batch 1): three that copy from their prompt (a
function with a variable renamed, a paragraph with its typos fixed, a list reformatted), one
that summarises, and two that copy nothing (a story, a one-line answer), where drafts are
seldom proposed and, when they are, mostly rejected. Then the first two together in one batch,
and all six (on the CPU drafts wait until at most two sequences run: DRAFTING_BATCH).
First, what a draft costs: the time of one forward pass over a sequence's last token and k
drafts (k + 1 rows) at 128 tokens of context, median of 9. Then each configuration runs
--repeats times, interleaved; the table gives the median decode speed
(tokens after the first, per second of decoding), the draft tokens kept of those run, and the
ratio to decoding without drafts. The answers must be the same text with and without.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_name, print_table, run_main, write_json  # noqa: E402
import torch  # noqa: E402

from lisa_rt import SamplingParams, load_model  # noqa: E402
from lisa_rt.engine import generate  # noqa: E402
from lisa_rt.kv_cache import BlockTable  # noqa: E402
from lisa_rt.model import build_batch  # noqa: E402

PARAGRAPH = ("The quick brown fox jumpd over the lazy dog. It was a sunny day in the small vilage, and "
             "the children were playing in the park near the river. Their parents were siting on the "
             "benches, talking about the weather and the harvest. Later that afternoon, a storm came over "
             "the hills, and everyone hurried home before the rain began to fall.")
CODE = '''def add_all(numbers):
    x = 0
    for n in numbers:
        if n > 0:
            x = x + n
        else:
            x = x - n
    return x


def mean(numbers):
    return add_all(numbers) / len(numbers)'''
ARTICLE = ("The city council met on Tuesday to discuss the new library. The building will open next "
           "spring on Main Street, next to the old post office. It will hold more than forty thousand "
           "books, a room for children, and a small cafe. The council said that the library will be "
           "open every day from nine in the morning to eight in the evening, and that entry will be free.")

TASKS = {
    "rename a variable (copies)": f"Rename the variable `x` to `total` in this Python code and show all of it:\n\n{CODE}",
    "fix typos (copies)": f"Correct the spelling mistakes in this paragraph and write it out again in full:\n\n{PARAGRAPH}",
    "reformat a list (copies)": "Write each of these items on its own line, starting with a dash: apples, "
                                "green pears, red cherries, sweet oranges, ripe bananas, fresh strawberries, "
                                "dark grapes, yellow lemons.",
    "summarise": f"Summarise this article in two sentences:\n\n{ARTICLE}",
    "story (no copy)": "Write a short story about a dragon who learns to cook.",
    "question (no copy)": "What is the capital of France?",
}


def run(model, prompts: list[list[int]], max_tokens: int, speculate: int) -> tuple[list, float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    start = time.perf_counter()
    completions = generate(model, prompts, params, speculate=speculate)
    return completions, time.perf_counter() - start


@torch.inference_mode()
def pass_times(model, rows: list[int], context: int = 128, repeats: int = 9) -> list[dict]:
    """Milliseconds of one forward pass of k rows (a last token and k - 1 drafts, every row's
    logits) after `context` tokens in the cache."""
    cache = model.new_cache([context + max(rows)])
    table = BlockTable(cache, shareable=False)
    table.ensure(context + max(rows))
    ids = list(range(100, 100 + context + max(rows)))
    model.forward(build_batch([(ids[:context], 0, table)], model.device), cache)
    out = []
    for k in rows:
        times = []
        for _ in range(repeats):
            batch = build_batch([(ids[context:context + k], context, table)], model.device, [k])
            start = time.perf_counter()
            model.forward(batch, cache)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out.append({"rows": k, "ms": round(statistics.median(times) * 1e3, 1)})
    for row in out:
        row["vs 1 row"] = round(row["ms"] / out[0]["ms"], 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--speculate", default="4,8", help="draft tokens a step to compare with none")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    settings = [0] + [int(v) for v in args.speculate.split(",")]

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = {name: model.tokenizer.encode_chat([{"role": "user", "content": text}]) for name, text in TASKS.items()}
    run(model, [prompts["question (no copy)"]], 8, 0)  # warm-up
    costs = pass_times(model, [1, 2, 3, 5, 9, 17])
    rows, same = [], True
    batches = [("the first two at once", list(prompts.values())[:2]), ("all six at once", list(prompts.values()))]
    for name, ids in [*((name, [ids]) for name, ids in prompts.items()), *batches]:
        speeds = {n: [] for n in settings}
        outcome = {}
        for _ in range(args.repeats):
            for n in settings:
                completions, seconds = run(model, ids, args.max_tokens, n)
                if len(ids) == 1:
                    speeds[n].append(completions[0].timings["decode_tok_per_s"])
                else:  # the batch: every token of every answer over the whole run
                    speeds[n].append(sum(c.completion_tokens for c in completions) / seconds)
                outcome[n] = completions
        texts = {n: [c.text for c in outcome[n]] for n in settings}
        same = same and all(texts[n] == texts[0] for n in settings)
        row = {"task": name, "prompt tok": sum(len(p) for p in ids),
               "answer tok": sum(c.completion_tokens for c in outcome[0])}
        base = statistics.median(speeds[0])
        row["tok/s, no drafts"] = round(base, 1)
        for n in settings[1:]:
            drafted = sum(c.timings["draft_tokens"] for c in outcome[n])
            kept = sum(c.timings["accepted_draft_tokens"] for c in outcome[n])
            speed = statistics.median(speeds[n])
            row[f"tok/s, {n}"] = round(speed, 1)
            row[f"kept / drafted, {n}"] = f"{kept}/{drafted}"
            row[f"ratio, {n}"] = round(speed / base, 2)
        row["same text"] = all(texts[n] == texts[0] for n in settings)
        rows.append(row)

    machine = machine_name()
    device, dtype = str(model.device), str(model.dtype).removeprefix("torch.")
    lisa = f"LiSA on {len(model.lisa.layers)} layers" if model.lisa is not None else "no LiSA"
    print(f"# {machine}; model {args.model} on {device}, {dtype}, {lisa}; greedy, up to {args.max_tokens} "
          f"tokens; median of {args.repeats}; tok/s: single tasks decode (after the first token), "
          "the batch every token over the whole run")
    print_table(costs, list(costs[0]))
    print()
    print_table(rows, list(rows[0]))
    print(f"identical answers with and without drafts: {'yes' if same else 'NO'}")
    write_json(args.json, {"benchmark": "speculative", "machine": machine, "model": args.model, "device": device,
                           "dtype": dtype, "lisa": lisa, "max_tokens": args.max_tokens, "repeats": args.repeats,
                           "settings": settings, "pass_ms": costs, "rows": rows, "identical_answers": same})
    return 0


if __name__ == "__main__":
    run_main(main)
