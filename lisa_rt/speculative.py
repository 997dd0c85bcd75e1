"""Draft tokens for speculative decoding, by prompt lookup (n-gram matching).

A sequence's next tokens often repeat an earlier stretch of it: a summary quotes its source,
an edit copies the code around the change, an extraction echoes field names and values. The
drafter looks up the sequence's last n tokens (n from MAX_NGRAM down to MIN_NGRAM) at their
latest earlier occurrence, in the prompt or the output, and proposes the tokens that followed
it. No draft model: the drafts cost a dictionary lookup.

The engine (engine.py) runs the drafts in the same forward pass as the sequence's last token
and keeps each draft only while it equals the token the sampler draws from the row before it,
so the output is the one decoding without drafts would give: each token is drawn as it would
be, from the same seed's next uniform number (up to rounding: see the engine's docstring).
"""
from __future__ import annotations

from typing import Callable

from .errors import UserError

MAX_NGRAM = 4
# A single matching token proposes too often to pay: most of its drafts are rejected.
MIN_NGRAM = 2
MAX_SPECULATE = 16  # draft tokens per step and sequence (`speculate`) at most
# Drafts run only while this many sequences run at most, by device type. A draft costs its row
# of the forward pass, which pays while a few rows more cost a pass little: on the CPU each row
# adds 15-20% of a one-row step (BENCHMARKS.md; six sequences drafting decoded 0.77x as fast),
# where a GPU's decode streams weights with rows to spare (not yet measured there).
DRAFTING_BATCH = {"cpu": 2, "cuda": 16}
# Positions indexed per call at most: a long prompt is indexed over several steps (a few ms
# each) instead of stalling one step for all of it; meanwhile drafts come from its beginning.
INDEX_PER_CALL = 4096


def check_speculate(speculate) -> int:
    """`speculate` as given, if it is a draft count the engine takes; else a UserError."""
    if isinstance(speculate, bool) or not isinstance(speculate, int) or not 0 <= speculate <= MAX_SPECULATE:
        raise UserError(f"speculate must be an integer in [0, {MAX_SPECULATE}], got {speculate!r}")
    return speculate


class NgramDrafter:
    """One sequence's n-gram index: each n-gram of its tokens (MIN_NGRAM <= n <= MAX_NGRAM) to
    the position right after its latest occurrence. Grown as the sequence grows; the tokens
    only ever get longer (a preempted sequence keeps them), so the index never goes stale.

    How many tokens it proposes adapts to how many the model kept (`observe`): a draft the
    model rejects costs its row of the forward pass for nothing, so after a miss the next
    draft is one longer than what was kept, and after a full match twice as long, up to
    `most`."""

    def __init__(self, most: int) -> None:
        self._after: dict[tuple[int, ...], int] = {}
        self._indexed = 1  # positions p < _indexed have the n-grams ending at p - 1 indexed
        self._most = most
        self._length = most  # of the next draft, at most

    def propose(self, tokens: Callable[[int, int], list[int]], length: int, count: int) -> list[int]:
        """Up to `count` tokens that followed the latest earlier occurrence of the sequence's
        longest matching suffix (among the positions indexed so far: all but on the first calls
        for a long prompt); [] when no suffix of MIN_NGRAM tokens or more occurred before.
        tokens(lo, hi) reads the sequence's tokens[lo:hi]; length: how many it has."""
        count = min(count, self._length)
        if count <= 0 or length < MIN_NGRAM + 1:
            return []
        end = min(length, self._indexed + INDEX_PER_CALL)
        if end > self._indexed:
            lo = max(0, self._indexed - MAX_NGRAM)
            window = tokens(lo, end)
            for p in range(self._indexed, end):  # n-grams ending at p - 1, followed by token p
                for n in range(MIN_NGRAM, min(MAX_NGRAM, p) + 1):
                    self._after[tuple(window[p - n - lo:p - lo])] = p
            self._indexed = end
        tail = tokens(max(0, length - MAX_NGRAM), length)
        for n in range(min(MAX_NGRAM, length - 1), MIN_NGRAM - 1, -1):
            start = self._after.get(tuple(tail[-n:]))
            # The suffix itself is indexed only once a token follows it, so start < length.
            if start is not None:
                return tokens(start, min(start + count, length))
        return []

    def observe(self, proposed: int, kept: int) -> None:
        """The model kept `kept` of the `proposed` tokens of the last draft."""
        self._length = min(self._most, 2 * self._length) if kept == proposed else max(1, kept + 1)
