"""Where an end-to-end fitting step of `lisa-rt fit` spends its time, op by op, on the CPU or a
GPU: the teacher's targets for a batch, then forward + backward + Adam step, timed and then
profiled (torch.profiler), with the top ops by their own time per step.

The model is a lisa-rt model (--model), or random weights of a bench shape made on the device
(--shape: what a GPU session profiles, since real weights larger than a device call carries
stay home; the values do not change the work). The adapter is --lisa, else the model's own,
else the shipped one for the smollm2 shape, else a random one on 60% of the layers.

    python benchmarks/fit_profile.py --shape smollm2 --device cuda --batch 8 --seq-len 1024 \\
        --json benchmarks/results/fit_profile_cuda.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_us, machine_name, own_time_events, print_table, run_main, timed, write_json  # noqa: E402
from lisa_rt import bench  # noqa: E402
from lisa_rt.checkpoint import load_config, load_tensors  # noqa: E402
from lisa_rt.config import ModelConfig  # noqa: E402
from lisa_rt.errors import UserError  # noqa: E402
from lisa_rt.fit import FitOptions, Fitter  # noqa: E402
from lisa_rt.lisa import Adapter, LisaLayer, find_adapter, load_adapter  # noqa: E402
from lisa_rt.model import parse_device  # noqa: E402
from lisa_rt.registry import BUNDLED_ADAPTERS, bundled_adapter_path, resolve_model  # noqa: E402


def model_and_adapter(args, device: torch.device) -> tuple[ModelConfig, dict[str, torch.Tensor], Adapter]:
    """The model's config and float32 weights on the device, and the adapter to fit on."""
    if args.model is not None:
        model_dir = resolve_model(args.model)
        config = load_config(model_dir)
        tensors = load_tensors(model_dir, config)
    else:
        config = ModelConfig(**bench.SHAPES[args.shape])
        tensors = bench.random_tensors(config, device, torch.float32, seed=args.seed)
    if args.lisa:
        adapter = load_adapter(args.lisa, config)
    elif args.model is not None:
        adapter = find_adapter(model_dir, config)
    elif args.shape in BUNDLED_ADAPTERS:
        adapter = load_adapter(bundled_adapter_path(BUNDLED_ADAPTERS[args.shape]), config)
    else:
        adapter = None
    return config, tensors, adapter or bench.random_adapter(config, seed=args.seed)


def top_ops(prof, device: torch.device, steps: int, count: int) -> tuple[list[dict], float]:
    """The `count` ops (kernels on a GPU) with the most time of their own, per step, and the
    total of all of them per step (ms)."""
    events = own_time_events(prof, device)
    total = sum(device_us(e) for e in events)
    rows = [{"op": e.key[:80], "calls/step": round(e.count / steps, 1), "ms/step": round(device_us(e) / steps / 1e3, 2),
             "share": f"{device_us(e) / total:.1%}"} for e in events[:count]]
    return rows, total / steps / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="a lisa-rt model (dir, file or alias)")
    which.add_argument("--shape", default="smollm2", choices=sorted(bench.SHAPES),
                       help="random weights of this shape, made on the device (default: smollm2)")
    parser.add_argument("--lisa", default=None, help="adapter file (default: see above)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=8, help="sequences a step (gpu_fit.sh: 8)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--attn-weight", type=float, default=8.0, help="as gpu_fit.sh fits (8)")
    parser.add_argument("--steps", type=int, default=3, help="steps timed, then as many profiled")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--highest-precision", action="store_true",
                        help="float32 GEMMs at full precision (default on a GPU: TF32, as gpu_fit.sh fits)")
    parser.add_argument("--top", type=int, default=15, help="ops listed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.batch < 1 or args.seq_len < 8 or args.steps < 1 or args.warmup < 0 or args.top < 1:
        raise UserError("--batch, --steps and --top must be >= 1, --seq-len >= 8 and --warmup >= 0")
    device = parse_device(args.device)
    if not args.highest_precision:
        torch.set_float32_matmul_precision("high")

    config, tensors, adapter = model_and_adapter(args, device)
    if args.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} is past the model's {config.max_position_embeddings} positions")
    ids = torch.randint(config.vocab_size, (2 * args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    fitter = Fitter(config, tensors, ids, FitOptions(init=adapter, steps=1, seq_len=args.seq_len, batch_size=args.batch,
                                                     attn_weight=args.attn_weight, progress=False), device)
    del tensors  # the fitter holds its own float32 copies
    modules = {layer: fitter.for_training(LisaLayer(adapter.layer(layer))) for layer in adapter.config.layers}
    optimizer = torch.optim.Adam([p for m in modules.values() for p in fitter.trainable(m)], lr=1e-4)
    batch = fitter.train[: args.batch]
    targets = []

    def teacher():
        targets[:] = fitter.teacher_targets(batch)

    def step():
        loss = fitter.end_to_end_loss(modules, batch, *targets, 0)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        teacher()
        step()
    kind = device.type
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    teacher_s = min(timed(teacher, kind) for _ in range(args.steps))
    step_s = min(timed(step, kind) for _ in range(args.steps))
    peak = torch.cuda.max_memory_allocated(device) if kind == "cuda" else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if kind == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        bench.synchronize(device)
    rows, profiled_ms = top_ops(prof, device, args.steps, args.top)

    model_name = args.model or f"{args.shape} shape, random weights"
    print(f"\nEnd-to-end fitting step, {model_name}, {len(modules)} LiSA layers, batch {args.batch} x "
          f"{args.seq_len} tokens, attention weight {args.attn_weight:g}, "
          f"{'float32' if args.highest_precision else 'TF32 where the device has it'}; {machine_name()}")
    print(f"command: python benchmarks/fit_profile.py {' '.join(sys.argv[1:])}\n")
    print(f"teacher targets for the batch: {teacher_s * 1e3:.1f} ms; step (forward, backward, Adam): "
          f"{step_s * 1e3:.1f} ms, fastest of {args.steps}" + (f"; peak memory {peak / 2**30:.1f} GiB" if peak else ""))
    what = "kernels" if kind == "cuda" else "ops (self CPU time)"
    print(f"profiled: {profiled_ms:.1f} ms of {what} a step; the top {len(rows)}:\n")
    print_table(rows, ["op", "calls/step", "ms/step", "share"])
    write_json(args.json, {"machine": machine_name(), "options": vars(args), "lisa_layers": adapter.config.layers,
                           "teacher_ms": teacher_s * 1e3, "step_ms": step_s * 1e3, "peak_bytes": peak,
                           "profiled_ms_per_step": profiled_ms, "top": rows})
    return 0


if __name__ == "__main__":
    run_main(main)
