"""Perplexity over a token stream, in non-overlapping windows.

The stream is cut into windows of `ctx` tokens (the last one may be shorter). Each window is
scored on its own, from position 0: its first token is context only, so a window of n tokens
makes n - 1 predictions, and a final window of a single token makes none. Perplexity is
exp(mean negative log-likelihood) over every prediction, accumulated in float64 from float32
log-softmax.

One KV cache sized for one window is allocated up front and reused: each window takes its blocks
from it and gives them back. A window is prefilled in chunks (Model.prefill_logits); at most
ctx x vocab logits exist at a time.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from .errors import UserError
from .kv_cache import BlockTable


def windows(num_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """(start, end) of every window that scores at least one token."""
    return [(s, min(s + ctx, num_tokens)) for s in range(0, num_tokens, ctx)
            if min(s + ctx, num_tokens) - s >= 2]


def check_ctx(ctx: int, max_context: int) -> None:
    if ctx < 2:
        raise UserError(f"--ctx must be >= 2, got {ctx}")
    if ctx > max_context:
        raise UserError(f"--ctx {ctx} exceeds the model's context of {max_context}")


@torch.inference_mode()
def perplexity(model, token_ids: Sequence[int], ctx: int, progress: bool = False) -> dict:
    """Perplexity of `model` over token_ids in windows of ctx tokens.

    Returns {"ppl", "tokens" (scored predictions), "windows", "seconds"}.
    """
    from tqdm import tqdm

    check_ctx(ctx, model.max_context)
    token_ids = [int(t) for t in token_ids]
    if len(token_ids) < 2:
        raise UserError(f"need at least 2 tokens to measure perplexity, got {len(token_ids)}")
    spans = windows(len(token_ids), ctx)
    device = model.device
    cache = model.new_cache([min(ctx, len(token_ids))])
    table = BlockTable(cache)
    total = torch.zeros((), dtype=torch.float64, device=device)
    scored = 0
    start_time = time.perf_counter()
    for start, end in tqdm(spans, desc="eval", unit="window", disable=not progress):
        window = token_ids[start:end]
        table.ensure(len(window))
        try:
            logits = model.prefill_logits(window, cache, table)[:-1]  # the last token predicts nothing here
        finally:
            table.release()
        targets = torch.tensor(window[1:], device=device)
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])
        total -= logp.double().sum()
        scored += len(window) - 1
        del logits, logp
    nll = total.item()  # syncs the device before the clock stops
    seconds = time.perf_counter() - start_time
    return {"ppl": math.exp(nll / scored), "tokens": scored, "windows": len(spans), "seconds": seconds}
