"""The GPU-speed figures, side by side in one run on one card: `lisa-rt bench` for the
SmolLM2-, LLaMA-2-7B- and LLaMA-3-8B-shaped random models (bf16, random LiSA adapters on 60% of
the layers), HF transformers' generate (sdpa) on the same shapes, and the targets of the
GPU-speed issue checked against what was measured.

    python benchmarks/gpu_bench.py [--shapes smollm2,llama2-7b,llama3-8b] [--skip-hf] [--json out.json]

A dry run of the script on the CPU before spending GPU time on it (small grid, float32):
    python benchmarks/gpu_bench.py --device cpu --dtype float32 --shapes smollm2 --batches 1,2 \
        --contexts 64 --steps 2 --hf-points 1x64,2x64
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import print_table, timed, write_json  # noqa: E402
from lisa_rt import bench  # noqa: E402
from lisa_rt.config import ModelConfig  # noqa: E402

# (what, shape, target): checked against the measured numbers at the end.
TARGETS = [
    ("batch-1 decode tok/s", "llama2-7b", 180.0),
    ("batch-1 decode tok/s", "smollm2", 1000.0),
    ("LiSA/base at the largest batch, context 2048", "llama2-7b", 1.30),
    ("LiSA/base at batch 64, context 2048", "llama2-7b", 1.15),
    ("LiSA/base at the largest batch, context 2048", "llama3-8b", 1.20),
    ("lisa-rt/HF at batch 64, context 512", "smollm2", 10.0),
    ("lisa-rt/HF at batch 64, context 512", "llama2-7b", 10.0),
]


def engine_bench(shape: str, args) -> dict:
    config = ModelConfig(**bench.SHAPES[shape])
    adapter = bench.random_adapter(config, bench.DEFAULT_LISA_RATIO)
    device = torch.device(args.device)

    def build(lisa: bool):
        return bench.random_model(bench.SHAPES[shape], device, args.dtype, adapter=adapter if lisa else None)

    options = bench.BenchOptions(batches=args.batches, contexts=args.contexts, steps=args.steps, warmup=args.warmup)
    with torch.inference_mode():
        result = bench.Bench(build, options, device, log=lambda line: print(line, flush=True)).run(lisa=True)
    print(bench.report(result), flush=True)
    return result


def hf_decode(shape: str, batch: int, prompt_len: int, tokens: int, device: str, dtype: torch.dtype) -> dict:
    """transformers' generate (sdpa) on a random model of the shape made on the device."""
    import transformers

    s = bench.SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"],
        max_position_embeddings=s["max_position_embeddings"], rope_theta=s["rope_theta"],
        tie_word_embeddings=s["tie_word_embeddings"], attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    prompt = torch.randint(0, s["vocab_size"], (batch, prompt_len), device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n: int) -> float:
        with torch.no_grad():
            return timed(lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs), device)

    run(4)
    prefill = run(1)
    total = run(tokens)
    del model
    bench.empty_cache(torch.device(device))
    return {"shape": shape, "batch": batch, "context": prompt_len,
            "tok_per_s": round(batch * (tokens - 1) / (total - prefill), 1)}


def point(result: dict, variant: str, batch: int, context: int) -> dict | None:
    return next((r for r in result["grid"] if r["variant"] == variant and r["batch"] == batch
                 and r["context"] == context and "tok_per_s" in r), None)


def checks(engine: dict[str, dict], hf: list[dict], batch1_context: int) -> list[dict]:
    rows = []
    for what, shape, target in TARGETS:
        result, measured, note = engine.get(shape), None, ""
        if result is None:
            continue
        if what == "batch-1 decode tok/s":
            row = point(result, "base", 1, batch1_context)
            if row:
                measured = row["tok_per_s"]
                note = f"{row['bandwidth_utilisation']:.0%} of copy bandwidth"
        elif what.startswith("LiSA/base at the largest batch"):
            entry = next((r for r in result["max_batch_lisa_vs_base"] if r["context"] == 2048), None)
            if entry:
                measured = entry["ratio"]
                note = f"batch {entry['base_batch']} vs {entry['lisa_batch']}"
        elif what.startswith("LiSA/base at batch 64"):
            entry = next((r for r in result["lisa_vs_base"] if r["batch"] == 64 and r["context"] == 2048), None)
            measured = entry["ratio"] if entry else None
            note = "" if entry else "base batch 64 exceeds the KV budget"
        else:
            ours = point(result, "base", 64, 512)
            theirs = next((h for h in hf if h["shape"] == shape and h["batch"] == 64 and h["context"] == 512), None)
            if ours and theirs:
                measured = round(ours["tok_per_s"] / theirs["tok_per_s"], 1)
                note = f"{ours['tok_per_s']} vs {theirs['tok_per_s']} tok/s"
        rows.append({"target": what, "shape": shape, "goal": f">= {target:g}",
                     "measured": "-" if measured is None else measured,
                     "met": "-" if measured is None else ("yes" if measured >= target else "NO"), "note": note})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,llama2-7b,llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--hf-points", default="1x512,64x512", help="BATCHxPROMPT,... for HF generate")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--hf-tokens", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert args.device == "cpu" or torch.cuda.is_available(), "needs a CUDA GPU (or --device cpu)"
    args.dtype = getattr(torch, args.dtype)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    hf_points = [tuple(int(v) for v in p.split("x")) for p in args.hf_points.split(",") if p]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(bench.SHAPES))
    assert not unknown, f"unknown shapes {unknown}"
    out = {"machine": bench.machine_name(torch.device(args.device)), "torch": torch.__version__, "engine": {}, "hf": []}
    for shape in shapes:
        print(f"== lisa-rt bench, {shape}-shaped", flush=True)
        out["engine"][shape] = engine_bench(shape, args)
        write_json(args.json, out)
        if not args.skip_hf and shape != "llama3-8b":
            for batch, prompt_len in hf_points:
                out["hf"].append(hf_decode(shape, batch, prompt_len, args.hf_tokens, args.device, args.dtype))
                print("HF:", out["hf"][-1], flush=True)
            write_json(args.json, out)
    out["targets"] = checks(out["engine"], out["hf"], min(args.contexts))
    print(f"\n{out['machine']}, torch {out['torch']}")
    if out["hf"]:
        print_table(out["hf"], ["shape", "batch", "context", "tok_per_s"])
    print_table(out["targets"], ["target", "shape", "goal", "measured", "met", "note"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
