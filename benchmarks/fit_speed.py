"""The LiSA fitter's speed on this machine: the head aligner (forward + backward) by the CPU
kernel and in torch, and one end-to-end fitting step each way, side by side in one run.

The torch rows are what a build without the compiled kernels runs (and what the fitter runs on
a GPU). A step is the forward and backward pass of `Fitter.end_to_end_loss` with the model's
adapter (teacher targets made beforehand, as the fitter caches them; no optimiser step).

    python benchmarks/fit_speed.py --json benchmarks/results/fit_speed.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import adapter_to_compare, machine_name, run_main, timed, write_json  # noqa: E402
from lisa_rt import ops  # noqa: E402
from lisa_rt.checkpoint import load_config, load_tensors  # noqa: E402
from lisa_rt.errors import UserError  # noqa: E402
from lisa_rt.fit import FitOptions, Fitter  # noqa: E402
from lisa_rt.lisa import LisaLayer  # noqa: E402
from lisa_rt.registry import resolve_model  # noqa: E402


def best_of(repeats: int, fn) -> float:
    """Fastest of `repeats` timed calls (after one untimed warm-up), seconds."""
    fn()
    return min(timed(fn, "cpu") for _ in range(repeats))


def on_torch_path(fn):
    """fn run as a build without kernels runs it (LisaLayer.scores' torch aligner)."""
    def run():
        saved, ops.HAVE_KERNELS = ops.HAVE_KERNELS, False
        try:
            return fn()
        finally:
            ops.HAVE_KERNELS = saved
    return run


def aligner_rows(layer: LisaLayer, heads: int, seq_lens: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in seq_lens:
        s_prev = torch.randn(1, heads, n, n, generator=torch.Generator().manual_seed(n)).requires_grad_()
        grad = torch.randn(1, heads, n, n)

        def step():
            layer.zero_grad()
            layer.scores(s_prev, None, None, 0, 0, delta=False).backward(grad)

        kernel, torch_path = best_of(repeats, step), best_of(repeats, on_torch_path(step))
        rows.append({"seq_len": n, "kernel_ms": kernel * 1e3, "torch_ms": torch_path * 1e3, "speedup": torch_path / kernel})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lisa", default=None, help="adapter file (default: the model's own)")
    parser.add_argument("--seq-lens", default="256,512,1024,2048", help="aligner sizes (comma-separated)")
    parser.add_argument("--step-seq-len", type=int, default=1024, help="tokens in the end-to-end step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    try:
        seq_lens = [int(n) for n in args.seq_lens.split(",")]
    except ValueError:
        raise UserError(f"--seq-lens must be comma-separated integers, got {args.seq_lens!r}") from None
    if not ops.HAVE_KERNELS:
        raise UserError("lisa_rt._C is not built: there is no kernel to compare")
    if min(seq_lens) < 1 or args.step_seq_len < 8 or args.repeats < 1:
        raise UserError("--seq-lens must be >= 1, --step-seq-len >= 8 and --repeats >= 1")

    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    adapter = adapter_to_compare(args.lisa, model_dir, config)
    first = adapter.config.layers[0]
    aligner = aligner_rows(LisaLayer(adapter.layer(first)), config.num_heads, seq_lens, args.repeats)

    n = args.step_seq_len
    ids = torch.randint(config.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))
    fitter = Fitter(config, load_tensors(model_dir, config), ids,
                    FitOptions(init=adapter, steps=1, seq_len=n, batch_size=1, progress=False))
    modules = {layer: fitter.for_training(LisaLayer(adapter.layer(layer))) for layer in adapter.config.layers}
    indices, probs = fitter.teacher_targets(fitter.train[:1])

    def step():
        for module in modules.values():
            module.zero_grad()
        fitter.end_to_end_loss(modules, fitter.train[:1], indices, probs, 0)[0].backward()

    kernel, torch_path = best_of(args.repeats, step), best_of(args.repeats, on_torch_path(step))
    steps = {"seq_len": n, "lisa_layers": len(modules), "kernel_s": kernel, "torch_s": torch_path,
             "speedup": torch_path / kernel}

    print(f"\nLiSA fitter speed, {args.model} ({len(modules)} LiSA layers, {config.num_heads} heads, aligner "
          f"width {adapter.config.align_hidden}), {machine_name()}")
    print(f"command: python benchmarks/fit_speed.py {' '.join(sys.argv[1:])}\n")
    print("| head aligner, forward + backward, [1, h, n, n] | CPU kernel | torch | speedup |")
    print("| --- | --- | --- | --- |")
    for row in aligner:
        print(f"| n = {row['seq_len']} | {row['kernel_ms']:.1f} ms | {row['torch_ms']:.1f} ms | {row['speedup']:.2f}x |")
    print(f"\n| end-to-end step, batch 1 x {n} tokens | CPU kernel | torch | speedup |")
    print("| --- | --- | --- | --- |")
    print(f"| forward + backward | {kernel:.2f} s | {torch_path:.2f} s | {steps['speedup']:.2f}x |")
    write_json(args.json, {"machine": machine_name(), "threads": torch.get_num_threads(), "model": args.model,
                           "options": vars(args), "aligner": aligner, "end_to_end_step": steps})
    return 0


if __name__ == "__main__":
    run_main(main)
