"""What JSON-schema-constrained output costs: decode speed with and without a schema. One LLM,
one machine.

    python benchmarks/json_constraint.py [-m smollm2] [--batch 1,8] [--max-tokens 96]
                                         [--repeats 3] [--json out.json]

Each row: --batch chat requests at once (greedy, one prompt per row asking for JSON), with no
schema (free text, to --max-tokens), {"type": "object"} (any object), or a typed schema (named
properties, an enum, an integer, an array). "cold" is the first batch after the grammars are
dropped (every state's token mask computed for the first time), "warm" the median of
--repeats batches after it (masks cached), the three settings taken in turn. Decode tok/s
counts generated tokens over the batch's wall time after its first token; "grammar ms/token"
is the time spent computing masks and advancing states per generated token (timed by wrapping
JsonGrammar.allowed and .advance), and "grammar share" that time over the batch's wall
time. Outputs of different lengths end at different steps, so tok/s across settings compare
batches that thin out differently; the grammar's share is the cost. The vocabulary's tries are
built once per tokenizer before any row (their time is printed).
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
from lisa_rt.json_constraint import JsonGrammar, vocabulary_of  # noqa: E402

TYPED = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "role": {"enum": ["engineer", "teacher", "doctor", "artist"]},
    "skills": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["name", "age", "role", "skills"]}
SCHEMAS = (("free text", None), ("any object", {"type": "object"}), ("typed", TYPED))


def prompts(llm: LLM, batch: int) -> list[list[int]]:
    asks = ["Describe a person as JSON with name, age, role and skills.",
            "Give a JSON record of a fictional employee.",
            "Write a JSON object about a musician.",
            "Return JSON describing a teacher named Ana."]
    return [llm.tokenizer.encode_chat([{"role": "user", "content": asks[i % len(asks)]}]) for i in range(batch)]


class GrammarClock:
    """Time spent in the grammar (masks and advancing), by wrapping JsonGrammar's two entry
    points while the benchmark runs (the engine calls them on its own thread, one at a time)."""

    def __init__(self):
        self.seconds = 0.0
        for name in ("allowed", "advance"):
            setattr(JsonGrammar, name, self._timed(getattr(JsonGrammar, name)))

    def _timed(self, method):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def lap(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    clock = GrammarClock()
    with LLM(args.model, kv_cache_gb=0.5) as llm:
        start = time.perf_counter()
        vocabulary = vocabulary_of(llm.tokenizer, llm.model.config.vocab_size)
        build_s = time.perf_counter() - start
        print(f"{machine_name()}; vocabulary tries built in {build_s:.2f} s")
        rows = []
        for batch in [int(b) for b in args.batch.split(",")]:
            ids = prompts(llm, batch)
            params = [SamplingParams(max_tokens=args.max_tokens, temperature=0, json_schema=schema,
                                     ignore_eos=schema is None) for _, schema in SCHEMAS]
            vocabulary.clear_grammars()
            cold = [run(llm, ids, p, clock) for p in params]
            # Settings taken in turn, so that the machine's drift falls on all of them alike.
            warm = [[] for _ in params]
            for _ in range(args.repeats):
                for i, p in enumerate(params):
                    warm[i].append(run(llm, ids, p, clock))
            for (label, _), first, runs in zip(SCHEMAS, cold, warm):
                rate = statistics.median(r[0] for r in runs)
                rows.append({"batch": batch, "output": label, "tokens": runs[0][1],
                             "cold tok/s": round(first[0], 1), "cold grammar ms/token": round(first[2], 2),
                             "warm tok/s": round(rate, 1),
                             "warm grammar ms/token": round(statistics.median(r[2] for r in runs), 3),
                             "cold grammar share": f"{first[3]:.1%}",
                             "warm grammar share": f"{statistics.median(r[3] for r in runs):.2%}"})
    print_table(rows, ["batch", "output", "tokens", "cold tok/s", "cold grammar ms/token", "cold grammar share",
                       "warm tok/s", "warm grammar ms/token", "warm grammar share"])
    write_json(args.json, {"machine": machine_name(), "model": args.model, "vocabulary_build_s": build_s,
                           "max_tokens": args.max_tokens, "rows": rows})
    return 0


def run(llm: LLM, ids: list[list[int]], params: SamplingParams, clock: GrammarClock) -> tuple:
    """(decode tok/s, tokens generated, grammar milliseconds per generated token, grammar
    seconds over the batch's wall time)."""
    clock.lap()
    start = time.perf_counter()
    done = llm.generate(ids, params)
    wall = time.perf_counter() - start
    first = max(c.timings["queue_s"] + c.timings["prefill_s"] for c in done)
    total = max(c.timings["queue_s"] + c.timings["prefill_s"] + c.timings["decode_s"] for c in done)
    tokens = sum(c.completion_tokens for c in done)
    grammar = clock.lap()
    return (sum(c.completion_tokens - 1 for c in done) / max(total - first, 1e-9), tokens,
            grammar * 1e3 / max(tokens, 1), grammar / wall)


if __name__ == "__main__":
    sys.exit(main())
