"""Sampling parameters and the sampler: repetition penalty, temperature, top-k, top-p, min-p.

Each request draws from its own seeded generator, so its tokens do not depend on what else
shares the batch. Temperature 0 is greedy decoding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import UserError

# Temperatures below this sample as greedy: dividing logits by them overflows to inf (then NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40            # 0 disables
    top_p: float = 0.95        # 1 disables
    min_p: float = 0.05        # 0 disables
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(message: str) -> UserError:
            return UserError(f"invalid sampling parameter: {message}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64):
            raise bad(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


class Sampler:
    """Picks the next token of one sequence from its logits."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: float32 [vocab] on any device; history: the prompt and tokens so far."""
        p = self.params
        logits = logits.detach().to("cpu", torch.float32, copy=True)  # never the caller's tensor
        if p.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), dtype=torch.long)
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            probs[order[drop]] = 0.0
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    @property
    def is_plain_greedy(self) -> bool:
        """Argmax of the raw logits: no state, so a whole batch can take it at once on the device."""
        return self.params.greedy and self.params.repetition_penalty == 1.0


def sample_batch(samplers: list[Sampler], logits: torch.Tensor,
                 history: Callable[[int], list[int]]) -> list[int]:
    """One token per row of logits [rows, vocab]; history(row) gives that row's tokens so far.

    Plain-greedy rows share one argmax on the logits' device and every other row shares one
    copy to the host, so a step costs two transfers at most, not one per sequence.
    """
    tokens: list[int] = [0] * len(samplers)
    greedy_rows = [i for i, s in enumerate(samplers) if s.is_plain_greedy]
    other_rows = [i for i, s in enumerate(samplers) if not s.is_plain_greedy]
    if not other_rows:  # all greedy: no row gather (on a GPU that is an index upload)
        return logits.argmax(dim=-1).tolist()
    if greedy_rows:
        picks = logits[greedy_rows].argmax(dim=-1).tolist()
        for row, token in zip(greedy_rows, picks):
            tokens[row] = token
    if other_rows:
        host = logits[other_rows].float().cpu()
        for row, row_logits in zip(other_rows, host):
            tokens[row] = samplers[row](row_logits, history(row))
    return tokens
