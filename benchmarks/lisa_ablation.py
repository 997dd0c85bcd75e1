"""LiSA ablation: held-out perplexity of a model under each sharing variant, side by side.

Every variant is fitted by lisa-rt's own fitter on the same calibration text with the same
budget, then scored by the runtime (`lisa-rt eval`'s perplexity: non-overlapping windows of
--ctx tokens) on held-out text the fitter never saw:

  base                          the model as it is
  same head, direct sharing     layer l reuses layer l-1's logits head by head (A = I), no fitting
  matched heads, direct sharing A = the head matching, no fitting (the fitter's step 0)
  matched heads + FFN           the aligner fitted (A, W1, b1, W2, b2); no low-rank delta
  full LiSA                     aligner + low-rank delta fitted
and full LiSA at other layer ratios, and with the shallow third of the layers excluded.

    python benchmarks/lisa_data.py /tmp/lisa-data
    python benchmarks/lisa_ablation.py --model smollm2 --calibration /tmp/lisa-data/calibration.txt \
        --held-out /tmp/lisa-data/held_out.txt --json benchmarks/results/lisa_ablation.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_name  # noqa: E402
from lisa_rt.checkpoint import load_config, load_tensors  # noqa: E402
from lisa_rt.eval import perplexity  # noqa: E402
from lisa_rt.fit import SELECTIONS, FitOptions, Fitter, make_sequences  # noqa: E402
from lisa_rt.lisa import load_adapter  # noqa: E402
from lisa_rt.model import Model, load_model_dir  # noqa: E402
from lisa_rt.registry import resolve_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calibration", required=True, help="text the variants are fitted on")
    parser.add_argument("--held-out", required=True, help="text they are scored on")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    parser.add_argument("--ratios", default="0.3,0.55,0.7", help="layer ratios of the full-LiSA rows")
    parser.add_argument("--main-ratio", type=float, default=0.55,
                        help="ratio of the variant rows (0.55 of 30 layers: 16, the shipped adapter's count)")
    parser.add_argument("--steps", type=int, default=50, help="end-to-end steps per variant")
    parser.add_argument("--layerwise-steps", type=int, default=150)
    parser.add_argument("--max-sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--select", choices=SELECTIONS, default="fitted",
                        help="how each variant's layers are chosen (lisa-rt fit --select)")
    parser.add_argument("--shipped", default=None, help="also score this adapter file (e.g. the shipped one)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    tensors = load_tensors(model_dir, config)
    base = load_model_dir(model_dir, device="cpu", dtype="float32", lisa=False)
    tokenizer = base.tokenizer
    calibration, _, _ = make_sequences(tokenizer, [Path(args.calibration).read_text(encoding="utf-8")],
                                       args.seq_len, args.max_sequences)
    held_out = tokenizer.encode(Path(args.held_out).read_text(encoding="utf-8"))[: args.max_tokens]
    kv_base = config.kv_bytes_per_token(2)

    rows = []

    def score(name: str, adapter, fit_seconds: float | None) -> None:
        model = base if adapter is None else Model(config, tensors, "cpu", torch.float32, adapter=adapter)
        result = perplexity(model, held_out, args.ctx, progress=True)
        lisa = adapter.config if adapter is not None else None
        rows.append({"variant": name, "lisa_layers": list(lisa.layers) if lisa else [],
                     "ppl": result["ppl"], "tokens": result["tokens"],
                     "kv_bytes_per_token_bf16": config.kv_bytes_per_token(2, lisa), "fit_seconds": fit_seconds})
        print(f"{name:<40} {len(rows[-1]['lisa_layers']):>3} layers  ppl {result['ppl']:.3f}", file=sys.stderr)

    def fitted(name: str, ratio: float, **kw) -> None:
        settings = {"steps": args.steps, "layerwise_steps": args.layerwise_steps, **kw}
        options = FitOptions(ratio=ratio, seq_len=args.seq_len, max_sequences=args.max_sequences,
                             select=args.select, progress=False, **settings)
        started = time.perf_counter()
        result = Fitter(config, tensors, calibration, options).run()
        score(name, result.adapter, round(time.perf_counter() - started, 1))

    score("base", None, None)
    untrained = dict(steps=0, layerwise_steps=0, train_aligner=False, train_delta=False)
    fitted("same head, direct sharing", args.main_ratio, matched_heads=False, **untrained)
    fitted("matched heads, direct sharing", args.main_ratio, **untrained)
    fitted("matched heads + FFN", args.main_ratio, train_delta=False)
    for ratio in sorted({float(r) for r in args.ratios.split(",")} | {args.main_ratio}):
        fitted("full LiSA", ratio)
    shallow = config.num_layers // 3
    fitted(f"full LiSA, layers < {shallow} excluded", args.main_ratio, min_layer=shallow)
    if args.shipped:
        score("shipped adapter", load_adapter(args.shipped, config), None)

    base_ppl = rows[0]["ppl"]
    print(f"\nLiSA ablation, {args.model}, held-out {Path(args.held_out).name} ({rows[0]['tokens']} tokens, "
          f"ctx {args.ctx}), {machine_name()}")
    print(f"fitting per variant: {args.layerwise_steps} layer-wise steps per layer, {args.steps} end-to-end "
          f"steps, {len(calibration)} x {args.seq_len}-token calibration sequences, layers by --select {args.select}")
    print(f"command: python benchmarks/lisa_ablation.py {' '.join(sys.argv[1:])}\n")
    print("| variant | LiSA layers | held-out ppl | vs base | KV B/token (bf16) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {len(row['lisa_layers'])}/{config.num_layers} | {row['ppl']:.3f} | "
              f"{row['ppl'] / base_ppl:.3f}x | {row['kv_bytes_per_token_bf16']:,} ({kv_base:,} base) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_name(), "model": args.model, "ctx": args.ctx,
                                               "options": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
