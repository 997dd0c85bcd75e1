"""Where in the window a LiSA adapter costs: perplexity of the base model by position bucket, and
each adapter's ratio to it in the same buckets, side by side on one text.

The windows are `lisa-rt eval`'s (non-overlapping, each scored from position 0); position p is
the prediction made from the first p + 1 tokens of a window. A ratio that grows with the
position means the shared attention loses far context more than near context.

    python benchmarks/lisa_data.py /tmp/lisa-data
    python benchmarks/lisa_positions.py --text /tmp/lisa-data/held_out.txt \
        --lisa fit5=old.safetensors --lisa shipped=lisa_rt/adapters/smollm2-135m-instruct.safetensors \
        --json benchmarks/results/lisa_positions.json
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_name, write_json  # noqa: E402
from lisa_rt.checkpoint import load_config, load_tensors  # noqa: E402
from lisa_rt.errors import UserError  # noqa: E402
from lisa_rt.eval import check_ctx, nll_by_position  # noqa: E402
from lisa_rt.lisa import find_adapter, load_adapter  # noqa: E402
from lisa_rt.model import Model  # noqa: E402
from lisa_rt.registry import resolve_model  # noqa: E402
from lisa_rt.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_BUCKETS = "0,16,64,128,256,512,768"


def parse_buckets(spec: str, ctx: int) -> list[tuple[int, int]]:
    """[(first, end)) position ranges from ascending starts "0,16,64", the last ending at ctx - 1."""
    try:
        starts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(f"--buckets must be comma-separated positions, got {spec!r}") from None
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= ctx - 1:
        raise UserError(f"--buckets must rise from 0 and stay below --ctx - 1 ({ctx - 1}), got {spec!r}")
    return list(zip(starts, starts[1:] + [ctx - 1]))


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """(name, path) of each --lisa NAME=PATH (or PATH, named by its file stem)."""
    named = []
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).stem, "", spec)
        if not name or not path:
            raise UserError(f"--lisa takes NAME=PATH or PATH, got {spec!r}")
        named.append((name, path))
    return named


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", required=True, help="text to score")
    parser.add_argument("--lisa", action="append", default=[],
                        help="NAME=PATH of an adapter to compare (repeatable; default: the model's own)")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--buckets", default=DEFAULT_BUCKETS, help=f"bucket starts ({DEFAULT_BUCKETS})")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    check_ctx(args.ctx, config.max_position_embeddings)
    buckets = parse_buckets(args.buckets, args.ctx)
    adapters = [(name, load_adapter(path, config)) for name, path in parse_adapters(args.lisa)]
    if not adapters:
        own = find_adapter(model_dir, config)
        if own is None:
            raise UserError("the model has no adapter of its own: give --lisa")
        adapters = [("adapter", own)]
    tensors = load_tensors(model_dir, config)
    tokenizer = load_tokenizer(model_dir, extra_eos_ids=config.eos_token_ids)
    text = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))[: args.max_tokens]

    def by_bucket(adapter) -> list[tuple[float | None, int]]:
        """(mean negative log-likelihood, None where no prediction falls; predictions) of each
        bucket, and of all positions last."""
        model = Model(config, tensors, "cpu", torch.float32, tokenizer=tokenizer, adapter=adapter)
        sums, counts = nll_by_position(model, text, args.ctx)
        means = []
        for a, b in buckets + [(0, args.ctx - 1)]:
            count = int(counts[a:b].sum())
            means.append((sums[a:b].sum().item() / count if count else None, count))
        return means

    base = by_bucket(None)
    rows = [{"name": name, "layers": len(adapter.config.layers),
             "ratios": [math.exp(nll - base_nll) if count else None
                        for (nll, _), (base_nll, count) in zip(by_bucket(adapter), base)]}
            for name, adapter in adapters]
    base_ppl = [math.exp(nll) if count else None for nll, count in base]

    def cells(values, form: str, unit: str = "") -> str:
        """Table cells, "-" for a bucket no prediction falls in."""
        return " | ".join("-" if value is None else format(value, form) + unit for value in values)

    labels = [f"{a}-{b}" for a, b in buckets] + ["all"]
    print(f"\nLiSA cost by position, {args.model}, {Path(args.text).name} ({len(text)} tokens, "
          f"ctx {args.ctx}), {machine_name()}")
    print(f"command: python benchmarks/lisa_positions.py {' '.join(sys.argv[1:])}\n")
    print("| positions | " + " | ".join(labels) + " |")
    print("| --- " * (len(labels) + 1) + "|")
    print("| predictions | " + " | ".join(f"{count:,}" for _, count in base) + " |")
    print("| base ppl | " + cells(base_ppl, ".2f") + " |")
    for row in rows:
        print(f"| {row['name']} / base | " + cells(row["ratios"], ".3f", "x") + " |")
    write_json(args.json, {"machine": machine_name(), "model": args.model, "text": args.text, "ctx": args.ctx,
                           "tokens": len(text), "buckets": labels, "predictions": [count for _, count in base],
                           "base_ppl": base_ppl, "adapters": rows,
                           "options": vars(args)})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, OSError, UnicodeDecodeError) as exc:  # bad paths, files or options: one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
