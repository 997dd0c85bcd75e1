"""Where a decode step's time goes: the kernels of eager engine steps under torch.profiler, for
random models of the bench shapes, base and LiSA, at a few batch x context points.

Eager (no CUDA graph) so that every kernel is attributed; the step is the same work the graph
replays, less the launch gaps the graph removes.

    python benchmarks/gpu_profile.py [--points llama2-7b:1x512,llama2-7b:32x2048] [--steps 5] [--json F]
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import device_us, machine_name, own_time_events, print_table, write_json  # noqa: E402
from lisa_rt import bench  # noqa: E402
from lisa_rt.config import ModelConfig  # noqa: E402
from lisa_rt.engine import Engine, Request  # noqa: E402
from lisa_rt.kv_cache import KVCache  # noqa: E402
from lisa_rt.sampling import SamplingParams  # noqa: E402

DEFAULT_POINTS = "smollm2:1x512,llama2-7b:1x512,llama2-7b:32x2048,llama3-8b:64x2048"


def profile_point(shape: str, batch: int, context: int, lisa: bool, steps: int, device: torch.device,
                  dtype: torch.dtype) -> list[dict]:
    config = ModelConfig(**bench.SHAPES[shape])
    adapter = bench.random_adapter(config) if lisa else None
    model = bench.random_model(bench.SHAPES[shape], device, dtype, adapter=adapter)
    per_seq = context + steps + 4
    cache = KVCache.for_tokens(model.config, [per_seq] * batch, device, dtype, lisa=model.lisa)
    bench.fill_cache_randomly(cache)
    engine = Engine(model, cache, max_num_seqs=batch, cuda_graphs=False)
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(batch):
        prompt = torch.randint(0, config.vocab_size, (context,), generator=gen).tolist()
        engine.add_prefilled(Request(model, prompt, params, params.max_tokens))
    engine.step()
    bench.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        bench.synchronize(device)
    engine.abort_all()
    events = own_time_events(prof, device)
    total = sum(device_us(e) for e in events)
    rows = []
    for e in events[:10]:
        rows.append({"point": f"{shape} {'lisa' if lisa else 'base'} {batch}x{context}",
                     "kernel": e.key[:70], "us/step": round(device_us(e) / steps, 1),
                     "share": f"{device_us(e) / total:.0%}", "calls/step": e.count // steps})
    rows.append({"point": rows[0]["point"] if rows else "", "kernel": "(all kernels)",
                 "us/step": round(total / steps, 1), "share": "100%", "calls/step": ""})
    del engine, cache, model
    bench.empty_cache(device)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=DEFAULT_POINTS, help="SHAPE:BATCHxCONTEXT,...")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for spec in args.points.split(","):
        shape, point = spec.split(":")
        batch, context = (int(v) for v in point.split("x"))
        for lisa in (False, True):
            rows += profile_point(shape, batch, context, lisa, args.steps, device, dtype)
            print_table(rows[-11:], ["point", "kernel", "us/step", "share", "calls/step"])
            sys.stdout.flush()
    write_json(args.json, {"machine": machine_name(), "rows": rows})


if __name__ == "__main__":
    main()
