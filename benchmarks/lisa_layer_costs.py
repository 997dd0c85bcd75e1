"""What each LiSA layer of an adapter costs: held-out perplexity with the whole adapter and with
each layer left out (that layer runs its own attention again), side by side.

A layer's cost is ppl(whole adapter) / ppl(adapter without it): how much worse the model is for
sharing that layer, given all the others. Spread evenly, no layer choice fixes the total; one
layer far above the rest is the one to refit or swap.

    python benchmarks/lisa_data.py /tmp/lisa-data
    python benchmarks/lisa_layer_costs.py --held-out /tmp/lisa-data/held_out.txt --max-tokens 4096 \
        --json benchmarks/results/lisa_layer_costs.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_name, write_json  # noqa: E402
from lisa_rt.checkpoint import load_config, load_tensors  # noqa: E402
from lisa_rt.config import LisaConfig  # noqa: E402
from lisa_rt.errors import UserError  # noqa: E402
from lisa_rt.eval import perplexity  # noqa: E402
from lisa_rt.lisa import PARAMS, Adapter, find_adapter, load_adapter, tensor_name  # noqa: E402
from lisa_rt.model import Model  # noqa: E402
from lisa_rt.registry import resolve_model  # noqa: E402
from lisa_rt.tokenizer import load_tokenizer  # noqa: E402


def without(adapter: Adapter, layer: int) -> Adapter:
    """The adapter with one layer left out (it must keep at least one)."""
    layers = [l for l in adapter.config.layers if l != layer]
    config = LisaConfig(layers=layers, rank=adapter.config.rank, align_hidden=adapter.config.align_hidden)
    return Adapter(config, {tensor_name(l, p): adapter.tensors[tensor_name(l, p)] for l in layers for p in PARAMS})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lisa", default=None, help="adapter file (default: the model's own)")
    parser.add_argument("--held-out", required=True, help="text to score")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    tensors = load_tensors(model_dir, config)
    adapter = load_adapter(args.lisa, config) if args.lisa else find_adapter(model_dir, config)
    if adapter is None or len(adapter.config.layers) < 2:
        print("error: the model has no adapter with two or more layers (give --lisa)", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(model_dir, extra_eos_ids=config.eos_token_ids)
    text = tokenizer.encode(Path(args.held_out).read_text(encoding="utf-8"))[: args.max_tokens]

    def ppl(which: Adapter | None) -> float:
        model = Model(config, tensors, "cpu", torch.float32, tokenizer=tokenizer, adapter=which)
        return perplexity(model, text, args.ctx)["ppl"]

    base, whole = ppl(None), ppl(adapter)
    rows = []
    for layer in adapter.config.layers:
        left_out = ppl(without(adapter, layer))
        rows.append({"layer": layer, "ppl_without": left_out, "cost": whole / left_out})
        print(f"layer {layer:>3} left out: ppl {left_out:.3f}", file=sys.stderr)

    print(f"\nLiSA layer costs, {args.model}, {len(adapter.config.layers)} layers, held-out "
          f"{Path(args.held_out).name} ({len(text)} tokens, ctx {args.ctx}), {machine_name()}")
    print(f"base ppl {base:.3f}; whole adapter {whole:.3f} ({whole / base:.4f}x)")
    print(f"command: python benchmarks/lisa_layer_costs.py {' '.join(sys.argv[1:])}\n")
    print("| layer | ppl without it | cost (whole / without) |")
    print("| --- | --- | --- |")
    for row in sorted(rows, key=lambda row: -row["cost"]):
        print(f"| {row['layer']} | {row['ppl_without']:.3f} | {row['cost']:.4f}x |")
    write_json(args.json, {"machine": machine_name(), "model": args.model, "ctx": args.ctx, "tokens": len(text),
                           "base_ppl": base, "lisa_ppl": whole, "options": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, OSError, UnicodeDecodeError) as exc:  # bad paths or files: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
