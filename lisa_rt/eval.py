"""Perplexity over a token stream, in non-overlapping windows.

The stream is cut into windows of `ctx` tokens (the last one may be shorter). Each window is
scored on its own, from position 0: its first token is context only, so a window of n tokens
makes n - 1 predictions, and a final window of a single token makes none. The token stream is
the tokenizer's encoding of the whole text, so its BOS (where it adds one) starts the first
window only: the windows after it start mid-text, as in HF's fixed-length perplexity recipe with
stride = ctx. Perplexity is exp(mean negative log-likelihood) over every prediction,
accumulated in float64 from float32 log-softmax (inf where that mean passes float64's range).

One KV cache sized for one window is allocated up front and reused: each window takes its blocks
from it and gives them back. A window is prefilled in chunks (Model.prefill_chunks), each
chunk's logits scored as they come: at most one chunk's exist at a time.
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


def _window_nll(model, token_ids: Sequence[int], ctx: int, progress: bool):
    """Yields each window's negative log-likelihoods [n - 1] (float64, on the model's device),
    position 0 first."""
    from tqdm import tqdm

    check_ctx(ctx, model.max_context)
    token_ids = [int(t) for t in token_ids]
    if len(token_ids) < 2:
        raise UserError(f"need at least 2 tokens to measure perplexity, got {len(token_ids)}")
    cache = model.new_cache([min(ctx, len(token_ids))])
    table = BlockTable(cache)
    for start, end in tqdm(windows(len(token_ids), ctx), desc="eval", unit="window", disable=not progress):
        window = token_ids[start:end]
        targets = torch.tensor(window[1:], device=model.device)
        table.ensure(len(window))
        nll, scored = [], 0
        try:
            # Each chunk's logits are scored as they come (the window's last token predicts nothing).
            for logits in model.prefill_chunks(window, cache, table):
                rows = min(len(logits), len(targets) - scored)
                chunk_targets = targets[scored : scored + rows, None]
                nll.append(-torch.log_softmax(logits[:rows], dim=-1).gather(1, chunk_targets)[:, 0].double())
                scored += rows
                del logits
        finally:
            table.release()
        yield torch.cat(nll)


def perplexity_of(mean_nll: float) -> float:
    """exp(mean_nll); inf past float64's range (a broken model), where math.exp raises."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


@torch.inference_mode()
def perplexity(model, token_ids: Sequence[int], ctx: int, progress: bool = False) -> dict:
    """Perplexity of `model` over token_ids in windows of ctx tokens.

    Returns {"ppl", "tokens" (scored predictions), "windows", "seconds"}.
    """
    start_time = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    scored = count = 0
    for nll in _window_nll(model, token_ids, ctx, progress):
        total += nll.sum()
        scored += len(nll)
        count += 1
    ppl = perplexity_of(total.item() / scored)  # .item() syncs the device before the clock stops
    seconds = time.perf_counter() - start_time
    return {"ppl": ppl, "tokens": scored, "windows": count, "seconds": seconds}


@torch.inference_mode()
def nll_by_position(model, token_ids: Sequence[int], ctx: int, progress: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `perplexity`, position by position: negative log-likelihood summed over the
    windows [ctx - 1] (float64) and the predictions counted [ctx - 1] (int64) at each position p
    of a window (p predicts the token at p + 1), on the CPU."""
    check_ctx(ctx, model.max_context)
    sums = torch.zeros(ctx - 1, dtype=torch.float64, device=model.device)
    counts = torch.zeros(ctx - 1, dtype=torch.int64)
    for nll in _window_nll(model, token_ids, ctx, progress):
        sums[: len(nll)] += nll
        counts[: len(nll)] += 1
    return sums.cpu(), counts
