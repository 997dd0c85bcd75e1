"""`lisa-rt bench`: decode speed through the engine, with and without LiSA, side by side.

What it measures, on one device in one run:
- decode throughput for every batch x context of a grid, for the base model and for the same
  model with LiSA layers (the LiSA/base ratio at each point);
- batch-1 decode latency, with the bytes a step streams (weights plus the keys and values it
  reads) and the model-bandwidth utilisation against a device-to-device copy measured here;
- the largest batch that fits one fixed KV budget at a context, with and without LiSA (LiSA
  layers cache rank-r keys, so more sequences fit), and the throughput at that batch.

Decode at context C starts from a cache whose first C-1 positions hold random keys and values
(`Engine.add_prefilled`): a kernel's speed does not depend on the numbers it reads, and a real
prefill of batch 128 x 2048 tokens would cost more than the measurement. Every step then goes
through the engine as in serving: scheduling, the forward pass (a CUDA graph on CUDA), greedy
sampling and stopping checks.

Models: a converted model (its own LiSA adapter, `--lisa PATH`, or a random one) or a named
shape with random weights made directly on the device, with a random adapter on 60% of its
layers. This module never imports transformers; benchmarks/gpu_bench.py adds HF's generate.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ops
from .checkpoint import expected_shapes
from .config import LisaConfig, ModelConfig
from .engine import Engine, Request, overlap_by_default
from .errors import UserError
from .kv_cache import KVCache
from .lisa import Adapter, default_rank, param_shapes, tensor_name
from .model import Model
from .quant import QuantizedWeight
from .sampling import SamplingParams

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                    head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, vocab_size=32000, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
}
DEFAULT_LISA_RATIO = 0.6
CPU_KV_BUDGET = 1 << 30
CUDA_KV_FRACTION = 0.7  # of the memory left free once the base model is loaded


# -- models ----------------------------------------------------------------------------------

def random_tensors(config: ModelConfig, device, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a model's shapes, made directly on the device.

    Matrices are scaled by 1/sqrt(fan_in), as in a trained model, so activations stay in range
    and greedy decoding is not a tie between near-equal logits.
    """
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
    return tensors


def random_model(shape: dict, device, dtype: torch.dtype, seed: int = 0,
                 adapter: Adapter | None = None, quantize: str | None = None) -> Model:
    """A model of the given shape (SHAPES entry or ModelConfig fields) with random weights
    (quantize: as Model's)."""
    config = ModelConfig(**shape)
    return Model(config, random_tensors(config, device, dtype, seed), device, dtype, adapter=adapter,
                 quantize=quantize)


def spread_layers(num_layers: int, ratio: float) -> list[int]:
    """floor(ratio x layers) LiSA layers spread evenly over 1..L-1 (layer 0 is never LiSA)."""
    count = min(math.floor(ratio * num_layers), num_layers - 1)
    if count < 1:
        raise UserError(f"a LiSA ratio of {ratio:g} leaves no LiSA layer in {num_layers} layers")
    return [1 + (i * (num_layers - 1)) // count for i in range(count)]


def random_adapter(config: ModelConfig, ratio: float = DEFAULT_LISA_RATIO, rank: int | None = None,
                   seed: int = 0) -> Adapter:
    """An adapter of real shapes with random values (a random head matching in A), for speed
    measurements only: its numbers mean nothing."""
    lisa = LisaConfig(layers=spread_layers(config.num_layers, ratio),
                      rank=rank or default_rank(config.head_dim), align_hidden=config.num_heads,
                      fit={"random": True, "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in lisa.layers:
        for param, dims in param_shapes(config, lisa).items():
            if param == "align_a":
                value = torch.eye(dims[0])[torch.randperm(dims[0], generator=gen)]
            elif param in ("align_b1", "align_b2"):
                value = torch.zeros(dims)
            else:
                value = torch.randn(dims, generator=gen) / dims[-1] ** 0.5
            tensors[tensor_name(layer, param)] = value
    return Adapter(lisa, tensors)


def streamed_weight_bytes(model: Model) -> int:
    """Weight bytes one decode step reads: every layer, the final norm and the LM head (the
    embedding table is only gathered from, one row per token)."""
    weights = [model.norm, model.lm_head] + [value for layer in model.layers for value in vars(layer).values()]
    tensors = {}
    for value in weights:
        if isinstance(value, QuantizedWeight):
            value = tuple(value.tensors())
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- measurements ----------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int | None = None, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and written."""
    megabytes = megabytes or (1024 if device.type == "cuda" else 256)
    src = torch.ones(megabytes << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    seconds = time.perf_counter() - start
    return 2 * src.numel() * repeats / seconds / 1e9


def fill_cache_randomly(cache: KVCache, seed: int = 0) -> None:
    """Random keys and values in every pool (unit scale: logits stay in a sane range)."""
    gen = torch.Generator(device=cache.key_pools[0].device).manual_seed(seed)
    for pool in cache.key_pools + cache.value_pools:
        pool.normal_(generator=gen)


@dataclass
class Measurement:
    variant: str          # "base" or "lisa"
    batch: int
    context: int
    # Each step() call's wall time: with overlap a call launches one step and reads the one
    # before, so these are host times per call, not step times.
    call_ms: list[float] = field(default_factory=list)
    total_ms: float = 0.0  # all timed steps, up to their last token on the host

    @property
    def median_call_ms(self) -> float:
        return statistics.median(self.call_ms)

    @property
    def mean_ms(self) -> float:
        """Time per step, as tok_per_s counts it."""
        return self.total_ms / len(self.call_ms)

    @property
    def tok_per_s(self) -> float:
        return self.batch * 1e3 / self.mean_ms


def add_prefilled_batch(engine: Engine, batch: int, context: int, max_tokens: int, seed: int = 0) -> None:
    """`batch` greedy sequences of `context` random tokens, taken as already in the cache (its
    contents are whatever it holds), each with room for `max_tokens` more."""
    model = engine.model
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for _ in range(batch):
        prompt = torch.randint(0, model.config.vocab_size, (context,), generator=gen).tolist()
        engine.add_prefilled(Request(model, prompt, params, params.max_tokens))


def measure_decode(engine: Engine, batch: int, context: int, steps: int, warmup: int,
                   variant: str, seed: int = 0) -> Measurement:
    """Decode `steps` timed steps of `batch` sequences that start at `context` tokens.

    The steps run back to back as in serving: with the engine's overlap a step() call returns
    while the GPU still computes, so only the whole run, up to the last step's tokens on the
    host, is timed as one; each call's own time is kept as well."""
    model = engine.model
    add_prefilled_batch(engine, batch, context, warmup + steps + 1, seed)
    try:
        for _ in range(warmup):  # the first one captures this batch size's CUDA graph
            engine.step()
        engine.settle()
        synchronize(model.device)
        result = Measurement(variant, batch, context)
        begin = time.perf_counter()
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            result.call_ms.append((time.perf_counter() - start) * 1e3)
        engine.settle()  # the last step's tokens on the host
        result.total_ms = (time.perf_counter() - begin) * 1e3
        if len(engine.running) != batch:
            raise RuntimeError(f"bench: {batch - len(engine.running)} sequence(s) left the batch early")
    finally:
        engine.abort_all()
    return result


# -- the whole benchmark ---------------------------------------------------------------------

@dataclass
class BenchOptions:
    batches: list[int]
    contexts: list[int]
    steps: int = 32
    warmup: int = 3
    max_batch_contexts: list[int] | None = None   # default: the largest of `contexts`
    kv_budget_bytes: int | None = None            # default: see default_kv_budget
    cuda_graphs: bool = True
    overlap: bool = True                          # the engine's overlapped steps where it has them (CUDA)
    seed: int = 0

    def validate(self, config: ModelConfig) -> None:
        for name in ("steps", "warmup"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1")
        longest = max(self.contexts + (self.max_batch_contexts or []))
        if longest + self.warmup + self.steps + 1 > config.max_position_embeddings:
            raise UserError(f"context {longest} plus {self.warmup + self.steps + 1} decode steps exceeds "
                            f"the model's context of {config.max_position_embeddings}")
        if min(self.contexts + (self.max_batch_contexts or [])) < 1:
            raise UserError("contexts must be >= 1")


def default_kv_budget(device: torch.device) -> int:
    """With the base model loaded: most of the free GPU memory, or 1 GiB of host memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # memory torch holds but no tensor uses is free for the cache
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_KV_FRACTION * free)
    return CPU_KV_BUDGET


class Bench:
    """Runs the grid and the max-batch comparison on one model builder, variant by variant, so
    that only one model and one cache are in memory at a time."""

    def __init__(self, build, options: BenchOptions, device: torch.device, log=print):
        self.build = build  # build(lisa: bool) -> Model
        self.options = options
        self.device = device
        self.log = log

    def tokens_per_sequence(self, context: int) -> int:
        return context + self.options.warmup + self.options.steps + 1

    def run_variant(self, model: Model, variant: str, budget: int) -> tuple[list[dict], list[dict]]:
        opts = self.options
        cache = KVCache.for_budget(model.config, budget, model.device, model.dtype, lisa=model.lisa)
        fill_cache_randomly(cache, opts.seed)

        def fitting(context: int) -> int:
            return cache.num_blocks // cache.blocks_for(self.tokens_per_sequence(context))

        max_contexts = opts.max_batch_contexts or [max(opts.contexts)]
        max_batches = {c: fitting(c) for c in max_contexts}
        largest = max([b for c in opts.contexts for b in opts.batches if b <= fitting(c)]
                      + list(max_batches.values()) + [1])
        engine = Engine(model, cache, max_num_seqs=largest, cuda_graphs=opts.cuda_graphs,
                        overlap=None if opts.overlap else False)  # None: the engine's default
        grid, at_max = [], []
        for context in opts.contexts:
            for batch in opts.batches:
                if batch > fitting(context):
                    grid.append({"variant": variant, "batch": batch, "context": context,
                                 "skipped": "exceeds the KV budget"})
                    continue
                m = measure_decode(engine, batch, context, opts.steps, opts.warmup, variant, opts.seed)
                grid.append(self.row(model, m))
                self.log(_progress(grid[-1]))
        for context, batch in max_batches.items():
            if batch < 1:
                at_max.append({"variant": variant, "context": context, "batch": 0,
                               "skipped": "not one sequence fits the KV budget"})
                continue
            m = measure_decode(engine, batch, context, opts.steps, opts.warmup, variant, opts.seed)
            at_max.append(self.row(model, m))
            self.log(_progress(at_max[-1], "max batch"))
        del engine, cache
        return grid, at_max

    def row(self, model: Model, m: Measurement) -> dict:
        weights = streamed_weight_bytes(model)
        kv = m.batch * m.context * model.kv_bytes_per_token()
        step_s = m.mean_ms / 1e3
        return {"variant": m.variant, "batch": m.batch, "context": m.context,
                "step_ms_mean": round(m.mean_ms, 3), "call_ms_p50": round(m.median_call_ms, 3),
                "tok_per_s": round(m.tok_per_s, 1), "weight_bytes": weights, "kv_bytes_read": kv,
                "streamed_gb_per_s": float(f"{(weights + kv) / step_s / 1e9:.3g}")}

    def run(self, lisa: bool) -> dict:
        opts = self.options
        base = self.build(lisa=False)
        opts.validate(base.config)
        budget = opts.kv_budget_bytes or default_kv_budget(self.device)
        copy_gbps = copy_bandwidth(self.device)
        self.log(f"bench: KV budget {budget / 2**30:.2f} GiB; device copy {copy_gbps:.0f} GB/s (read + write)")
        grid, at_max = self.run_variant(base, "base", budget)
        config = base.config
        base_kv = base.kv_bytes_per_token()
        lisa_info = None
        del base
        empty_cache(self.device)
        if lisa:
            model = self.build(lisa=True)
            lisa_info = {"layers": model.lisa.layers, "rank": model.lisa.rank,
                         "kv_bytes_per_token": model.kv_bytes_per_token()}
            more_grid, more_max = self.run_variant(model, "lisa", budget)
            grid += more_grid
            at_max += more_max
            del model
            empty_cache(self.device)
        for row in grid + at_max:
            if "tok_per_s" in row:
                # Three significant figures: a tiny model streams a few thousandths of the
                # bandwidth, which three decimals would round to 0.
                row["bandwidth_utilisation"] = float(f"{row['streamed_gb_per_s'] / copy_gbps:.3g}")
        return {"machine": machine_name(self.device), "torch": torch.__version__,
                "device": str(self.device), "config": config.to_dict(), "kv_budget_bytes": budget,
                "copy_gb_per_s": round(copy_gbps, 1), "kv_bytes_per_token": base_kv, "lisa": lisa_info,
                "steps": opts.steps, "warmup": opts.warmup, "cuda_graphs": opts.cuda_graphs,
                "overlap": opts.overlap and overlap_by_default(self.device),
                "grid": grid, "lisa_vs_base": ratios(grid, ("batch", "context")),
                "max_batch": at_max, "max_batch_lisa_vs_base": ratios(at_max, ("context",))}


def ratios(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """LiSA tok/s over base tok/s at each point both measured."""
    measured = {(r["variant"], *(r[k] for k in key)): r for r in rows if "tok_per_s" in r}
    out = []
    for (variant, *point), lisa in measured.items():
        base = measured.get(("base", *point))
        if variant == "lisa" and base is not None:
            entry = dict(zip(key, point))
            if "batch" not in key:
                entry.update(base_batch=base["batch"], lisa_batch=lisa["batch"])
            entry.update(base_tok_per_s=base["tok_per_s"], lisa_tok_per_s=lisa["tok_per_s"],
                         ratio=round(lisa["tok_per_s"] / base["tok_per_s"], 3))
            out.append(entry)
    return out


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, {ops.kernel_isa()} kernels "
            f"({platform.machine()}, {os.cpu_count()} CPUs)")


def _progress(row: dict, what: str = "") -> str:
    label = f"{row['variant']} batch {row['batch']} context {row['context']}" + (f" ({what})" if what else "")
    return f"bench: {label}: {row['tok_per_s']} tok/s, step {row['step_ms_mean']} ms"


# -- the report ------------------------------------------------------------------------------

def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table of the given (key, heading) columns."""
    cells = [[heading for _, heading in columns]]
    cells += [["" if r.get(key) is None else str(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    # Numbers line up on the right, words on the left.
    lines = ["  ".join(cell.rjust(w) if _numeric(cell) else cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def report(result: dict) -> str:
    parts = [f"{result['machine']} ({result['device']}), torch {result['torch']}; "
             f"{result['steps']} timed decode steps per point; KV budget "
             f"{result['kv_budget_bytes'] / 2**30:.2f} GiB; copy bandwidth {result['copy_gb_per_s']:g} GB/s"]
    if result["lisa"]:
        lisa = result["lisa"]
        parts.append(f"LiSA: {len(lisa['layers'])} of {result['config']['num_layers']} layers, rank "
                     f"{lisa['rank']}; KV {lisa['kv_bytes_per_token']:,} vs {result['kv_bytes_per_token']:,} "
                     f"B/token without")
    parts.append(format_table(result["grid"], [("variant", "variant"), ("batch", "batch"), ("context", "context"),
                                               ("step_ms_mean", "step ms"), ("tok_per_s", "tok/s"),
                                               ("streamed_gb_per_s", "GB/s streamed"),
                                               ("bandwidth_utilisation", "of copy bw"), ("skipped", "")]))
    if result["lisa_vs_base"]:
        parts.append("LiSA vs base, same batch:\n" + format_table(
            result["lisa_vs_base"], [("batch", "batch"), ("context", "context"), ("base_tok_per_s", "base tok/s"),
                                     ("lisa_tok_per_s", "LiSA tok/s"), ("ratio", "LiSA/base")]))
    parts.append("Largest batch in the KV budget:\n" + format_table(
        result["max_batch"], [("variant", "variant"), ("context", "context"), ("batch", "batch"),
                              ("tok_per_s", "tok/s"), ("skipped", "")]))
    if result["max_batch_lisa_vs_base"]:
        parts.append(format_table(result["max_batch_lisa_vs_base"],
                                  [("context", "context"), ("base_batch", "base batch"),
                                   ("lisa_batch", "LiSA batch"), ("ratio", "LiSA/base tok/s")]))
    return "\n\n".join(parts) + "\n"
