"""Sampling parameters and the sampler: repetition penalty, temperature, top-k, top-p, min-p.

Each request draws from its own seeded generator, one uniform number per sampled token, so its
tokens do not depend on what else shares the batch. Temperature 0 is greedy decoding.

A batch is sampled where its logits are (the GPU when serving on one) and only the chosen
tokens come back to the host. The filters are applied to the few candidates they can keep, not
to the whole vocabulary: a row's top_k most likely tokens, or, when top_p alone truncates, its
CANDIDATES most likely (more only when the nucleus reaches past them). Each row's token is then
found by inverse transform sampling: its uniform draw against the cumulative probabilities of
what the filters kept. Sorting whole 49,152-token rows and a multinomial over them on the host
cost about 2 ms per sequence and step on the CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import UserError

# Temperatures below this sample as greedy: dividing logits by them overflows to inf (then NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5
# Candidates a top_p-only row is filtered within, then more if its nucleus is wider (see
# _sample_candidates): topk over 49,152 logits costs 0.08 ms for 256 and 0.35 ms for 4,096 on
# this project's CPU, where a whole-row sort costs 1.7 ms.
CANDIDATES = 256
MORE_CANDIDATES = 4096


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
    """One sequence's sampling parameters and its seeded random stream."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """The next token from logits [vocab] (any device, never modified); history: the prompt
        and the tokens so far."""
        return sample_batch([self], logits[None], lambda row: history)[0]

    def uniform(self) -> float:
        """The sequence's next draw in [0, 1): one per sampled token."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    @property
    def is_plain_greedy(self) -> bool:
        """Argmax of the raw logits: no state, so a whole batch can take it at once on the device."""
        return self.params.greedy and self.params.repetition_penalty == 1.0


def sample_batch(samplers: list[Sampler], logits: torch.Tensor,
                 history: Callable[[int], list[int]]) -> list[int]:
    """One token per row of logits [rows, vocab] (on any device, never modified); history(row)
    gives that row's tokens so far (read for a repetition penalty only). One transfer to the host
    per step, two when a top_p-only row's nucleus has to be checked against its candidates."""
    if all(s.is_plain_greedy for s in samplers):
        return logits.argmax(dim=-1).tolist()
    penalised = [row for row, s in enumerate(samplers) if s.params.repetition_penalty != 1.0]
    x = logits.to(torch.float32, copy=bool(penalised))
    for row in penalised:
        penalise_repetition(x[row], history(row), samplers[row].params.repetition_penalty)
    sampled = [row for row, s in enumerate(samplers) if not s.params.greedy]
    if len(sampled) == len(samplers):
        tokens, finite = sample_rows(x, samplers)
    else:
        tokens = x.argmax(dim=-1)
        finite = torch.ones_like(tokens, dtype=torch.bool)
        if sampled:
            index = torch.tensor(sampled, device=x.device)
            tokens[index], finite[index] = sample_rows(x[index], [samplers[row] for row in sampled])
    tokens, finite = torch.stack([tokens, finite.long()]).tolist()
    if not all(finite):
        raise RuntimeError("the model's logits are not finite (NaN or infinite): nothing to sample from")
    return tokens


def penalise_repetition(row_logits: torch.Tensor, history: list[int], penalty: float) -> None:
    """As transformers does, in place: a seen token's logit is divided by the penalty when
    positive and multiplied by it when not."""
    if not history:
        return
    seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=row_logits.device)
    picked = row_logits[seen]
    row_logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)


def sample_rows(x: torch.Tensor, samplers: list[Sampler]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [rows], its distribution was finite [rows]) sampled from float32 logits x [rows,
    vocab], on x's device; each sampler draws one uniform number."""
    vocab = x.shape[-1]
    params = [s.params for s in samplers]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # 0: no cut
    # temperature, top_k, top_p (inf: off), min_p, the draw: one upload for the batch
    settings = torch.tensor([[p.temperature, k, p.top_p if p.top_p < 1.0 else math.inf, p.min_p, s.uniform()]
                             for p, k, s in zip(params, top_k, samplers)], dtype=torch.float64).to(x.device)
    scaled = x / settings[:, :1].float()
    cut = [row for row, (p, k) in enumerate(zip(params, top_k)) if k or p.top_p < 1.0]
    if len(cut) == len(params):
        return _sample_candidates(scaled, settings, top_k)
    tokens, finite = _sample_whole(scaled, settings)
    if cut:
        index = torch.tensor(cut, device=x.device)
        tokens[index], finite[index] = _sample_candidates(scaled[index], settings[index], [top_k[r] for r in cut])
    return tokens, finite


def _sample_whole(scaled: torch.Tensor, settings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that no top_k or top_p truncates: min_p and the draw over the whole vocabulary, in its
    own order (the cumulative sum needs no sorting)."""
    return _draw(scaled, scaled.logsumexp(dim=-1), settings, ordered=False)[:2]


def _sample_candidates(scaled: torch.Tensor, settings: torch.Tensor,
                       top_k: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that top_k or top_p truncates, filtered within their most likely tokens, most likely
    first: a row's top_k, or for a top_p-only row CANDIDATES of them, then MORE_CANDIDATES, then
    the whole row, as long as its nucleus keeps the last candidate (it may reach past it)."""
    vocab = scaled.shape[-1]
    by_k = settings[:, 1] > 0
    width = min(vocab, max(top_k + ([CANDIDATES] if not all(top_k) else [])))
    values, indices = scaled.topk(width, dim=-1)
    values = values.masked_fill(by_k[:, None] & (torch.arange(width, device=scaled.device) >= settings[:, 1:2]),
                                -math.inf)
    # top_p and min_p see probabilities renormalised over the top_k kept, or over the vocabulary.
    log_norm = values.logsumexp(dim=-1)
    if not all(top_k):
        log_norm = torch.where(by_k, log_norm, scaled.logsumexp(dim=-1))
    tokens, finite, last_kept = _draw_sorted(values, indices, log_norm, settings)
    for wider in (MORE_CANDIDATES, vocab):
        open_rows = (last_kept & ~by_k).nonzero()[:, 0] if width < vocab else []
        if not len(open_rows):
            break
        width = min(wider, vocab)
        values, indices = scaled[open_rows].topk(width, dim=-1)
        last_kept = torch.zeros_like(last_kept)
        tokens[open_rows], finite[open_rows], last_kept[open_rows] = _draw_sorted(
            values, indices, log_norm[open_rows], settings[open_rows])
    return tokens, finite


def _draw_sorted(values: torch.Tensor, indices: torch.Tensor, log_norm: torch.Tensor,
                 settings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_draw over candidates most likely first, values [rows, n] at vocabulary indices [rows, n]:
    (token, finite, the last candidate was kept)."""
    picks, finite, last_kept = _draw(values, log_norm, settings, ordered=True)
    return indices.gather(1, picks[:, None])[:, 0], finite, last_kept


def _draw(values: torch.Tensor, log_norm: torch.Tensor, settings: torch.Tensor,
          ordered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse transform sampling over values [rows, n] (scaled logits; -inf for cut tokens),
    probabilities exp(values - log_norm). ordered: most likely first, so top_p applies (drop a
    token once the more likely ones hold top_p of the mass). Returns (position [rows], finite
    [rows], the last position was kept [rows])."""
    probs = torch.exp(values - log_norm[:, None])
    if ordered:
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= settings[:, 2:3], 0.0)
        top = probs[:, :1]
    else:
        top = probs.amax(dim=-1, keepdim=True)
    probs = probs.masked_fill(probs < settings[:, 3:4] * top, 0.0)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    picks = torch.searchsorted(cdf, settings[:, 4:5] * total, right=True)[:, 0].clamp_(max=values.shape[-1] - 1)
    return picks, (total[:, 0] > 0) & total[:, 0].isfinite(), probs[:, -1] > 0
