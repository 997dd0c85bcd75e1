"""Time to first token with and without prefix caching, on three workloads, one LLM each.

    python benchmarks/prefix_cache.py [-m smollm2] [--system-tokens 1024] [--questions 8]
                                      [--turns 8] [--choices 4] [--reply-tokens 32] [--json out.json]

"shared system prompt": --questions chats in turn, each a long system prompt (--system-tokens
tokens of this project's README) and a different short question. "multi-turn chat": one
conversation of --turns turns, each request resending the whole history with a new question.
There requests go one at a time, greedy. "n choices at once": --choices requests of one chat
with the long system prompt, submitted together (a server's `n`), sampled with seeds 0, 1, ...
The same workloads run on an LLM with prefix caching and on one without; the table gives the
mean and median time to first token (queue and prefill), the prompt tokens found in the cache,
and the ratio without / with. Answers are compared too: with the cache they should be the same
text.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import greedy, machine_name, print_table, write_json  # noqa: E402
from lisa_rt import LLM  # noqa: E402

QUESTIONS = ["What is this project for?", "How do I run the tests?", "Which models can it load?",
             "What does LiSA change in the KV cache?", "How do I start the HTTP server?",
             "What happens on bad input?", "Where do converted models go?", "What is still missing?",
             "Summarise the command line.", "Which GPUs were used?", "How is a model converted?",
             "What does eval measure?"]


def system_prompt(llm: LLM, tokens: int) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return llm.tokenizer.decode(llm.tokenizer.encode(text)[:tokens])


def shared_system_prompt(llm: LLM, system: str, count: int, reply: int) -> list:
    return [llm.chat([{"role": "system", "content": system},
                      {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], greedy(reply))
            for i in range(count)]


def multi_turn(llm: LLM, turns: int, reply: int) -> list:
    history, out = [], []
    for i in range(turns):
        history.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        completion = llm.chat(history, greedy(reply))
        history.append({"role": "assistant", "content": completion.text})
        out.append(completion)
    return out


def choices_at_once(llm: LLM, system: str, count: int, reply: int) -> list:
    ids = llm.tokenizer.encode_chat([{"role": "system", "content": system},
                                     {"role": "user", "content": QUESTIONS[0]}])
    params = greedy(reply).replace(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0)
    handles = llm.submit_many([(ids, params.replace(seed=i)) for i in range(count)])
    return [h.result() for h in handles]


def row(workload: str, caching: bool, completions: list) -> dict:
    ttft = [(c.timings["queue_s"] + c.timings["prefill_s"]) * 1e3 for c in completions]
    return {"workload": workload, "prefix cache": "on" if caching else "off", "requests": len(completions),
            "prompt tok (mean)": round(statistics.mean(c.prompt_tokens for c in completions)),
            "cached tok (mean)": round(statistics.mean(c.cached_tokens for c in completions)),
            "TTFT ms (mean)": round(statistics.mean(ttft), 1), "TTFT ms (median)": round(statistics.median(ttft), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rows, answers = [], {}
    for caching in (True, False):
        with LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=4, prefix_caching=caching) as llm:
            llm.generate(["Hello"], greedy(4))  # warm-up
            system = system_prompt(llm, args.system_tokens)
            shared = shared_system_prompt(llm, system, args.questions, args.reply_tokens)
            chat = multi_turn(llm, args.turns, args.reply_tokens)
            # A system prompt of its own: nothing of it is cached yet.
            choices = choices_at_once(llm, "Answer as you like. " + system, args.choices, args.reply_tokens)
            device, dtype = str(llm.model.device), str(llm.model.dtype).removeprefix("torch.")
        rows += [row("shared system prompt", caching, shared), row("multi-turn chat", caching, chat),
                 row("n choices at once", caching, choices)]
        answers[caching] = [c.text for c in shared + chat + choices]

    machine = machine_name()
    print(f"# {machine}; model {args.model} on {device}, {dtype}; chats one request at a time, greedy; "
          f"{args.choices} choices together, sampled; {args.reply_tokens}-token replies")
    print_table(rows, list(rows[0]))
    ratios = {}
    for workload in ("shared system prompt", "multi-turn chat", "n choices at once"):
        on, off = (next(r for r in rows if r["workload"] == workload and r["prefix cache"] == state)
                   for state in ("on", "off"))
        ratios[workload] = round(off["TTFT ms (mean)"] / on["TTFT ms (mean)"], 2)
        print(f"{workload}: time to first token without / with the prefix cache: {ratios[workload]:.2f}x (mean)")
    same = sum(a == b for a, b in zip(answers[True], answers[False]))
    print(f"identical answers with and without: {same}/{len(answers[True])}")
    write_json(args.json, {"benchmark": "prefix_cache", "machine": machine, "model": args.model, "device": device,
                           "dtype": dtype, "system_tokens": args.system_tokens, "reply_tokens": args.reply_tokens,
                           "rows": rows, "ratios": ratios, "identical_answers": same,
                           "requests": len(answers[True])})


if __name__ == "__main__":
    main()
