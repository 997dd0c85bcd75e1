"""Shared helpers of the benchmark scripts: timing, random models of real shapes, tables, JSON."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from lisa_rt.checkpoint import expected_shapes
from lisa_rt.config import ModelConfig
from lisa_rt.model import Model
from lisa_rt.sampling import SamplingParams

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                     head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True)
LLAMA2_7B_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, head_dim=128, vocab_size=32000, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> Model:
    """A model of the given shape with random weights, made directly on the device.

    Matrices are scaled by 1/sqrt(fan_in), as in a trained model, so activations stay in range
    and greedy decoding is not a tie between near-equal logits.
    """
    config = ModelConfig(**shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, dims in expected_shapes(config).items():
        if len(dims) == 1:
            tensors[name] = 1.0 + 0.1 * torch.randn(dims, generator=gen, device=device, dtype=dtype)
        elif name == "embed.weight":
            # Small next to the layers' outputs, so the residual stream is not just the input
            # token's embedding (which would make a tied head repeat the last token).
            tensors[name] = 0.1 * torch.randn(dims, generator=gen, device=device, dtype=dtype)
        else:
            tensors[name] = torch.randn(dims, generator=gen, device=device, dtype=dtype) / dims[-1] ** 0.5
    return Model(config, tensors, device, dtype)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads ({platform.machine()})"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
