"""GPU checks of the foundation, run on a lent GPU (see benchmarks/gpu_run.sh).

1. CPU-vs-GPU agreement: a SmolLM2-shaped model with random weights, float32 on both devices:
   max |logit difference| over a prompt, and the same 32 greedy tokens.
2. What CUDA graphs and overlapped steps buy: bf16 decode through the engine, eager, with
   CUDA-graph decode, and with CUDA-graph decode whose steps overlap the host's work, side by side, SmolLM2-shaped and LLaMA-2-7B-shaped random models (the full speed grid, LiSA and
   HF transformers are benchmarks/gpu_bench.py).

    python benchmarks/gpu_check.py [--json out.json] [--skip-7b]
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import greedy, machine_name, print_table, write_json  # noqa: E402
from lisa_rt.bench import SHAPES, random_model, streamed_weight_bytes  # noqa: E402
from lisa_rt.engine import Engine, run_to_completion  # noqa: E402

import lisa_rt  # noqa: E402
from lisa_rt import ops  # noqa: E402


def agreement(tokens: int = 32) -> dict:
    # The same seed on both devices draws different numbers: copy the CPU model's weights over.
    cpu = random_model(SHAPES["smollm2"], "cpu", torch.float32, seed=1)
    gpu = random_model(SHAPES["smollm2"], "cuda", torch.float32, seed=1)
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
    """Decode tok/s at each batch size, eager, with CUDA graphs, and with CUDA graphs and
    overlapped steps, on one engine per mode."""
    model = random_model(shape, "cuda", torch.bfloat16)
    weight_bytes = streamed_weight_bytes(model)
    rows = []
    for batch in batches:
        prompts = [torch.randint(0, shape["vocab_size"], (context,)).tolist() for _ in range(batch)]
        for graphs, overlap in ((False, False), (True, False), (True, True)):
            cache = model.new_cache([context + tokens + 1] * batch)
            engine = Engine(model, cache, max_num_seqs=batch, cuda_graphs=graphs, overlap=overlap)
            run_to_completion(engine, prompts, greedy(4))  # warm-up (and graph capture)
            results = run_to_completion(engine, prompts, greedy(tokens))
            decode_s = results[0].timings["decode_s"]
            steps = results[0].timings["decode_steps"]
            step_ms = decode_s / steps * 1e3
            rows.append({"model": name, "batch": batch, "context": context,
                         "mode": ("cuda graph" if graphs else "eager") + (" + overlap" if overlap else ""),
                         "decode tok/s": round(batch * steps / decode_s, 1),
                         "step ms": round(step_ms, 3),
                         "weight GB/s": round(weight_bytes / (step_ms / 1e3) / 1e9, 1)})
            print(rows[-1], flush=True)
            del engine, cache
    del model
    torch.cuda.empty_cache()
    return rows


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
    rows = decode_speed("SmolLM2-135M-shaped", SHAPES["smollm2"], [1, 8, 64], context=128, tokens=128)
    if not args.skip_7b:
        rows += decode_speed("LLaMA-2-7B-shaped", SHAPES["llama2-7b"], [1, 32], context=128, tokens=64)
    result["decode_bf16"] = rows
    print(f"\nmachine: {result['machine']}, torch {result['torch']}")
    print(f"CPU vs GPU (fp32, SmolLM2 shape): max |logit diff| {result['agreement_fp32']['max_abs_logit_diff']:.2e}, "
          f"same 32 greedy tokens: {result['agreement_fp32']['same_greedy_tokens']}")
    print_table(rows, ["model", "batch", "context", "mode", "decode tok/s", "step ms", "weight GB/s"])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
