"""GPU checks of the foundation, run on a lent GPU (see benchmarks/gpu_run.sh).

1. CPU-vs-GPU agreement: a SmolLM2-shaped model with random weights, float32 on both devices:
   max |logit difference| over a prompt, and the same 32 greedy tokens.
2. Decode speed in bfloat16 at batch 1 (and a few larger batches) on the GPU: SmolLM2-shaped
   and LLaMA-2-7B-shaped random models, with the weight-streaming bandwidth each step achieves,
   and transformers' generate on a SmolLM2-shaped model on the same card in the same run.

    python benchmarks/gpu_check.py [--json out.json] [--skip-7b]
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import (LLAMA2_7B_SHAPE, SMOLLM2_SHAPE, greedy, machine_name, print_table,  # noqa: E402
                               random_model, timed, write_json)
from lisa_rt.engine import Engine, run_to_completion  # noqa: E402

import lisa_rt  # noqa: E402
from lisa_rt import ops  # noqa: E402


def agreement(tokens: int = 32) -> dict:
    cpu = random_model(SMOLLM2_SHAPE, "cpu", torch.float32, seed=1)
    gpu = random_model(SMOLLM2_SHAPE, "cuda", torch.float32, seed=1)
    # Same weights on both devices: copy the CPU model's tensors over.
    for src, dst in zip(weights_of(cpu), weights_of(gpu)):
        dst.copy_(src)
    prompt = torch.randint(0, cpu.config.vocab_size, (61,), generator=torch.Generator().manual_seed(7)).tolist()
    diff = (cpu.logits(prompt) - gpu.logits(prompt).cpu()).abs().max().item()
    cpu_tokens = lisa_rt.generate(cpu, [prompt], greedy(tokens))[0].token_ids
    gpu_tokens = lisa_rt.generate(gpu, [prompt], greedy(tokens))[0].token_ids
    return {"max_abs_logit_diff": diff, "same_greedy_tokens": cpu_tokens == gpu_tokens,
            "greedy_tokens": tokens}


def weights_of(model) -> list[torch.Tensor]:
    tensors = [model.embed, model.norm]
    if model.lm_head is not model.embed:
        tensors.append(model.lm_head)
    for layer in model.layers:
        tensors.extend(v for v in vars(layer).values() if isinstance(v, torch.Tensor))
    return tensors


def decode_speed(name: str, shape: dict, batches: list[int], context: int, tokens: int) -> list[dict]:
    """Decode tok/s at each batch size, eager and with CUDA graphs, on one engine per mode."""
    model = random_model(shape, "cuda", torch.bfloat16)
    weight_bytes = sum(t.numel() * t.element_size() for t in weights_of(model)) - model.embed.numel() * 2
    if model.lm_head is model.embed:
        weight_bytes += model.embed.numel() * 2
    rows = []
    for batch in batches:
        prompts = [torch.randint(0, shape["vocab_size"], (context,)).tolist() for _ in range(batch)]
        for graphs in (False, True):
            cache = model.new_cache([context + tokens + 1] * batch)
            engine = Engine(model, cache, max_num_seqs=batch, cuda_graphs=graphs)
            run_to_completion(engine, prompts, greedy(4))  # warm-up (and graph capture)
            results = run_to_completion(engine, prompts, greedy(tokens))
            decode_s = results[0].timings["decode_s"]
            steps = results[0].timings["decode_steps"]
            step_ms = decode_s / steps * 1e3
            rows.append({"model": name, "batch": batch, "context": context,
                         "mode": "cuda graph" if graphs else "eager",
                         "decode tok/s": round(batch * steps / decode_s, 1),
                         "step ms": round(step_ms, 3),
                         "weight GB/s": round(weight_bytes / (step_ms / 1e3) / 1e9, 1)})
            print(rows[-1], flush=True)
            del engine, cache
    del model
    torch.cuda.empty_cache()
    return rows


def hf_decode_speed(shape: dict, context: int, tokens: int) -> dict:
    """transformers' generate (sdpa, bf16, batch 1) on a random model of the same shape."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=shape["max_position_embeddings"],
        rope_theta=shape["rope_theta"], tie_word_embeddings=shape["tie_word_embeddings"])
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, shape["vocab_size"], (1, context), device="cuda")
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n: int) -> float:
        with torch.no_grad():
            return timed(lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs), "cuda")

    run(4)
    prefill = run(1)
    total = run(tokens)
    del model
    torch.cuda.empty_cache()
    return {"model": "HF transformers (sdpa)", "batch": 1, "context": context,
            "decode tok/s": round((tokens - 1) / (total - prefill), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-7b", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert ops.HAVE_KERNELS, "lisa_rt._C is not built"
    result = {"machine": machine_name(), "torch": torch.__version__}
    result["agreement_fp32"] = agreement()
    print("CPU vs GPU fp32:", result["agreement_fp32"], flush=True)
    rows = decode_speed("SmolLM2-135M-shaped", SMOLLM2_SHAPE, [1, 8, 64], context=128, tokens=128)
    hf = hf_decode_speed(SMOLLM2_SHAPE, context=128, tokens=64)
    hf["model"] = "SmolLM2-135M-shaped, " + hf["model"]
    result["hf_smollm2_batch1"] = hf
    best_batch1 = max(r["decode tok/s"] for r in rows if r["batch"] == 1)
    result["speedup_vs_hf_batch1"] = best_batch1 / hf["decode tok/s"]
    print(hf, flush=True)
    if not args.skip_7b:
        rows += decode_speed("LLaMA-2-7B-shaped", LLAMA2_7B_SHAPE, [1, 32], context=128, tokens=64)
    result["decode_bf16"] = rows
    print(f"\nmachine: {result['machine']}, torch {result['torch']}")
    print(f"CPU vs GPU (fp32, SmolLM2 shape): max |logit diff| {result['agreement_fp32']['max_abs_logit_diff']:.2e}, "
          f"same 32 greedy tokens: {result['agreement_fp32']['same_greedy_tokens']}")
    print_table(rows + [hf], ["model", "batch", "context", "mode", "decode tok/s", "step ms", "weight GB/s"])
    print(f"lisa-rt / HF transformers, SmolLM2 shape, batch 1: {result['speedup_vs_hf_batch1']:.1f}x")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
