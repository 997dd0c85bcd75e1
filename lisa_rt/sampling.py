"""Sampling parameters and the sampler: logit bias, repetition, presence and frequency
penalties, a JSON schema the output must follow (json_constraint.py), temperature, top-k,
top-p, min-p.

Each request draws from its own seeded generator, one uniform number per sampled token, so the
draws do not depend on what else shares the batch. The logits they draw from do, by rounding:
in bfloat16 enough to change greedy tokens, in float32 by about 1e-5, which can still move a
draw that lands where two tokens' probabilities nearly tie. Temperature 0 is greedy decoding.

Log probabilities (`logprobs`) are read from the raw logits of the rows that ask, on the same
device, as soon as a step's tokens are drawn (LogprobRows).

A batch is sampled where its logits are (the GPU when serving on one) and only the chosen
tokens come back to the host. The filters are applied to the few candidates they can keep, not
to the whole vocabulary: a row's top_k most likely tokens (with those tied with the k-th), or,
when top_p alone truncates, its CANDIDATES most likely (more only when the nucleus reaches past
them). Each row's token is then found by inverse transform sampling: its uniform draw against
the cumulative probabilities of what the filters kept. Sorting whole 49,152-token rows and a
multinomial over them on the host cost about 2 ms per sequence and step on the CPU.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import UserError
from .json_constraint import JsonConstraintError, JsonGrammar, JsonMatcher, check_schema

# Temperatures below this sample as greedy: dividing logits by them overflows to inf (then NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5
# Candidates a top_p-only row is filtered within, then more if its nucleus is wider (RowDraws):
# topk over 49,152 logits costs 0.08 ms for 256 and 0.35 ms for 4,096 on this project's CPU,
# where a whole-row sort costs 1.7 ms. A top_k row takes TIE_MARGIN candidates past its k-th, for
# the tokens tied with it (common in bfloat16 logits), and more only if they are all tied too.
CANDIDATES = 256
# The most alternatives a token's log probabilities may list (OpenAI's top_logprobs allows 20).
MAX_LOGPROBS = 20
# A logit bias: at most this many tokens, each biased by at most this much (OpenAI's range).
MAX_BIASED_TOKENS = 2048
MAX_LOGIT_BIAS = 100.0
MORE_CANDIDATES = 4096
TIE_MARGIN = 64


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40            # 0 disables
    top_p: float = 0.95        # 1 disables
    min_p: float = 0.05        # 0 disables
    repetition_penalty: float = 1.0    # over the prompt and the output; 1 disables
    presence_penalty: float = 0.0      # OpenAI's: over the output only; 0 disables
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # one string, or None for none, will do too
    ignore_eos: bool = False
    logprobs: int | None = None        # each token's log probability and this many alternatives
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit, before penalties
    prompt_logprobs: int | None = None # the same for every prompt token after the first
    json_schema: Any = None            # the output is JSON this schema accepts (True: any JSON)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises UserError for a bad value. Values of other numeric types (numpy's, a Fraction)
        become int or float, a single stop string a list and `stop=None` no stop strings, so
        that what the sampler reads is always plain Python."""
        def bad(message: str) -> UserError:
            return UserError(f"invalid sampling parameter: {message}")

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise bad(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
            return int(value)

        def real(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise bad(f"{name} must be a number, got {value!r} ({type(value).__name__})")
            try:
                return float(value)
            except OverflowError:  # an int past float's range: as far out of range as inf
                return math.inf if value > 0 else -math.inf

        self.max_tokens, self.top_k = integer("max_tokens"), integer("top_k")
        self.temperature, self.top_p, self.min_p = real("temperature"), real("top_p"), real("min_p")
        self.repetition_penalty = real("repetition_penalty")
        self.presence_penalty, self.frequency_penalty = real("presence_penalty"), real("frequency_penalty")
        if self.seed is not None:
            self.seed = integer("seed")
        self.logit_bias = checked_logit_bias(self.logit_bias, bad)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, integer(name))
                if not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                    raise bad(f"{name} must be in [0, {MAX_LOGPROBS}] (or None for none), got {getattr(self, name)}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise bad(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if not isinstance(self.ignore_eos, bool):
            raise bad(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise bad(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise bad(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise bad(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop strings must be non-empty strings")
        if self.json_schema is not None:
            check_schema(self.json_schema)
            if self.ignore_eos:
                raise bad("ignore_eos cannot be combined with json_schema, whose output ends with its JSON value")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def biased(self) -> bool:
        return bool(self.logit_bias)

    @property
    def penalised(self) -> bool:
        """Whether the logits are changed by what came before (a penalty is set)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def checked_logit_bias(bias, bad: Callable[[str], Exception]) -> dict[int, float] | None:
    """A logit bias as {int token id: float}, or None for none; raises bad(message) for a bad
    one (the vocabulary bound is the engine's to check, which knows the model)."""
    if bias is None or (isinstance(bias, dict) and not bias):
        return None
    if not isinstance(bias, dict):
        raise bad(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    if len(bias) > MAX_BIASED_TOKENS:
        raise bad(f"logit_bias names {len(bias)} tokens; at most {MAX_BIASED_TOKENS} are allowed")
    out = {}
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise bad(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:  # (NaN fails both)
            raise bad(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                      f"got {value!r} for token {token}")
        out[int(token)] = float(value)
    return out


class Sampler:
    """One sequence's sampling parameters and its seeded random stream."""

    def __init__(self, params: SamplingParams, json_grammar: JsonGrammar | None = None):
        """json_grammar: params.json_schema's over the model's vocabulary (when set)."""
        self.params = params
        self.json_matcher = None if json_grammar is None else JsonMatcher(json_grammar)
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self._given_back: list[float] = []
        self.penalties = PenaltyHistory()
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, values) on the logits' device

    def __call__(self, logits: torch.Tensor, prompt: Sequence[int], output: Sequence[int] = ()) -> int:
        """The next token from logits [vocab] (any device, never modified), after the prompt and
        the tokens generated so far (output)."""
        return sample_batch([self], logits[None], lambda row: (prompt, output))[0]

    def uniform(self) -> float:
        """The sequence's next draw in [0, 1): one per sampled token."""
        if self._given_back:
            return self._given_back.pop()
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def give_back(self, u: float) -> None:
        """Returns the last draw, whose token was dropped: the token drawn again gets it again."""
        self._given_back.append(u)

    @property
    def reads_history(self) -> bool:
        """A penalty or a JSON schema: the row's draw depends on the tokens before it."""
        return self.params.penalised or self.json_matcher is not None

    @property
    def is_plain_greedy(self) -> bool:
        """Argmax of the raw logits: no state, so a whole batch can take it at once on the device."""
        return self.params.greedy and not self.reads_history and not self.params.biased

    def add_bias(self, row_logits: torch.Tensor) -> None:
        """The logit bias, in place; its ids and values uploaded once per device."""
        if self._bias is None or self._bias[0].device != row_logits.device:
            bias = self.params.logit_bias
            self._bias = (upload(list(bias), torch.long, row_logits.device),
                          upload(list(bias.values()), torch.float32, row_logits.device))
        ids, values = self._bias
        row_logits[ids] += values


# history(row): that row's (prompt, output) tokens, read only for a row with a penalty.
History = Callable[[int], tuple[Sequence[int], Sequence[int]]]


def sample_batch(samplers: list[Sampler], logits: torch.Tensor, history: History) -> list[int]:
    """One token per row of logits [rows, vocab] (on any device, never modified), after the
    tokens history(row) gives. One transfer to the host
    per step; more only for the rare row whose kept tokens may reach past its candidates (a wide
    nucleus, or more ties with the k-th token than TIE_MARGIN). A sampled row whose distribution
    is not finite (NaN or infinite logits) raises RuntimeError; greedy rows take the argmax."""
    step = StepSample(samplers, logits, history)
    for exc in step.failed.values():
        raise exc
    return step.resolve(step.packed.tolist())


class StepSample:
    """One step's draws, made where the logits are: `tokens` [rows] on the device, and what
    `resolve` needs back on the host in one transfer (`packed`). Only a row that may keep tokens
    past its candidates can change in resolve (it is redrawn over more of them, with the same
    uniform number); a plain greedy batch never changes."""

    def __init__(self, samplers: list[Sampler], logits: torch.Tensor, history: History):
        self.samplers = samplers
        self.plain = all(s.is_plain_greedy for s in samplers)
        # A row whose schema cannot go on fails alone: its token is drawn unmasked and dropped.
        self.failed: dict[int, JsonConstraintError] = {}
        if self.plain:
            self.tokens = logits.argmax(dim=-1)
            self.packed = self.tokens
            self.scored = LogprobRows.of(logits, self.tokens, [s.params.logprobs for s in samplers], redrawable=False)
            return
        penalised = [row for row, s in enumerate(samplers) if s.params.penalised]
        biased = [row for row, s in enumerate(samplers) if s.params.biased]
        constrained = [row for row, s in enumerate(samplers) if s.json_matcher is not None]
        x = logits.to(torch.float32, copy=bool(penalised or biased or constrained))
        for row in biased:  # first, as vLLM applies it: what the penalties then scale
            samplers[row].add_bias(x[row])
        for row in penalised:
            prompt, output = history(row)
            samplers[row].penalties.update(prompt, output, x.shape[-1], x.device)
            samplers[row].penalties.penalise(x[row], samplers[row].params)
        for row in constrained:
            try:
                allowed = samplers[row].json_matcher.allowed()
            except JsonConstraintError as exc:
                self.failed[row] = exc
                continue
            x[row].masked_fill_(~allowed.to(x.device, non_blocking=True), -math.inf)
        self.sampled = [row for row, s in enumerate(samplers) if not s.params.greedy]
        if len(self.sampled) == len(samplers):
            self.draws = RowDraws(x, samplers)
            tokens, finite, open_rows = self.draws.first()
        else:
            tokens = x.argmax(dim=-1)
            finite, open_rows = torch.ones_like(tokens, dtype=torch.bool), torch.zeros_like(tokens, dtype=torch.bool)
            if self.sampled:
                index = upload(self.sampled, torch.long, x.device)
                self.draws = RowDraws(x[index], [samplers[row] for row in self.sampled])
                tokens[index], finite[index], open_rows[index] = self.draws.first()
        self.tokens = tokens
        self.packed = torch.stack([tokens, finite.long(), open_rows.long()])
        self.scored = LogprobRows.of(logits, tokens, [s.params.logprobs for s in samplers],
                                     redrawable=any(not s.params.greedy and s.params.logprobs is not None
                                                    for s in samplers))

    def resolve(self, packed: list, dropped: frozenset[int] = frozenset()) -> list[int]:
        """The tokens, from `packed` read back to the host (`.tolist()`); rows in `dropped`
        (whose tokens nobody will take) are neither redrawn nor checked."""
        if self.plain:
            return packed
        tokens, finite, open_rows = packed
        for row in dropped:
            open_rows[row], finite[row] = 0, 1
        if any(open_rows):
            rows = [row for row, is_open in enumerate(open_rows) if is_open]
            local = rows if len(self.sampled) == len(self.samplers) else [self.sampled.index(row) for row in rows]
            for row, (token, ok) in zip(rows, self.draws.refine(local)):
                tokens[row], finite[row] = token, ok
        if not all(finite):
            raise RuntimeError("the model's logits are not finite (NaN or infinite): nothing to sample from")
        return tokens

    def drawn(self, packed: list) -> list[int]:
        """The tokens drawn on the device, from `packed` as read back (before resolve)."""
        return list(packed if self.plain else packed[0])

    def logprobs(self, scored: list | None, drawn: list[int], tokens: list[int]) -> list[TokenLogprobs | None]:
        """Each row's log probabilities (None where the row does not ask), from scored (the
        `scored.packed` read back, None where no row asks); drawn: self.drawn(packed), tokens:
        resolve's."""
        if self.scored is None:
            return [None] * len(self.samplers)
        return self.scored.entries(scored, drawn, tokens)

    def uniforms(self) -> list[float | None]:
        """Each row's uniform number (None for a greedy row): a row whose token is dropped
        gives it back to its sampler (Sampler.give_back)."""
        drawn: list[float | None] = [None] * len(self.samplers)
        if not self.plain and self.sampled:
            for row, u in zip(self.sampled, self.draws.uniforms):
                drawn[row] = u
        return drawn


# A row's reported log probabilities: its token's, and the most likely (token, log probability).
TokenLogprobs = tuple[float, list[tuple[int, float]]]


class LogprobRows:
    """The log probabilities a step reports for its rows that ask (top[row] not None), under
    the model's own distribution (the raw logits: before penalties, temperature and filters, as
    vLLM reports by default): each asking row's token's, and its top[row] most likely (token,
    log probability), most likely first. Computed where the logits are, from tokens there, as
    soon as they are drawn, so that an overlapped step carries them back with its tokens:
    `packed` [asking rows, 1 + 2 width] float64 (ids are exact below 2**53). A row whose token
    changes on the host afterwards (redrawn) reads its own again from the kept log softmax."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, top: list[int | None], redrawable: bool = True):
        """redrawable: whether a row's token may still change on the host (a sampled row's);
        only then is the log softmax kept, [asking rows, vocab] float32, until the step is read."""
        self.top = top
        self.rows = [row for row, k in enumerate(top) if k is not None]
        device = logits.device
        index = None if len(self.rows) == len(top) else upload(self.rows, torch.long, device)
        picked, drawn = (logits, tokens) if index is None else (logits[index], tokens[index])
        log_probs = picked.float().log_softmax(dim=-1)
        self.log_probs = log_probs if redrawable else None
        chosen = log_probs.gather(1, drawn[:, None])
        self.width = max(top[row] for row in self.rows)
        values, ids = (log_probs.topk(self.width, dim=-1) if self.width
                       else (log_probs[:, :0], log_probs[:, :0].long()))
        self.packed = torch.cat([chosen.double(), values.double(), ids.double()], dim=1)

    @classmethod
    def of(cls, logits: torch.Tensor, tokens: torch.Tensor, top: list[int | None],
           redrawable: bool = True) -> "LogprobRows | None":
        """None where no row asks."""
        return cls(logits, tokens, top, redrawable) if any(k is not None for k in top) else None

    def entries(self, packed: list, drawn: list[int], tokens: list[int]) -> list[TokenLogprobs | None]:
        """Each row's (log probability, alternatives), None for a row that does not ask, from
        `packed` read back to the host; drawn: the tokens the rows were computed for, tokens:
        the ones they ended with (a row where they differ reads its value again)."""
        out: list[TokenLogprobs | None] = [None] * len(self.top)
        width = self.width
        for i, (row, line) in enumerate(zip(self.rows, packed)):
            k = self.top[row]
            chosen = line[0] if tokens[row] == drawn[row] else float(self.log_probs[i, tokens[row]])
            out[row] = (chosen, [(int(t), v) for v, t in zip(line[1:1 + k], line[1 + width:1 + width + k])])
        return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int | None]) -> list[TokenLogprobs | None]:
    """LogprobRows' entries for tokens known on the host (None for every row where none asks).
    One transfer to the host."""
    rows = LogprobRows.of(logits, upload(tokens, torch.long, logits.device), top)
    return [None] * len(top) if rows is None else rows.entries(rows.packed.tolist(), tokens, tokens)


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """values as a tensor on device without waiting for the device: from pinned memory on CUDA,
    where a copy from ordinary memory waits for all the stream's work queued before it (an
    overlapped engine step launches the next step before it samples)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class PenaltyHistory:
    """What a sequence's penalties read, kept where its logits are: which tokens the prompt or
    the output holds (the repetition penalty) and how often each was generated (presence and
    frequency). Each step adds only the tokens generated since the last, so a step costs a few
    vocabulary-wide operations on the device whatever the sequence's length, where a set and a
    count of the whole history on the host grew with it."""

    def __init__(self):
        self._prompt: Sequence[int] | None = None
        self._prompt_len = self._counted = 0
        self.seen: torch.Tensor | None = None     # [vocab] bool
        self.counts: torch.Tensor | None = None   # [vocab] float32

    def update(self, prompt: Sequence[int], output: Sequence[int], vocab: int, device: torch.device) -> None:
        """Brings the state up to prompt + output. Another prompt (or a shorter output) than
        last time starts it again: the engine passes one sequence's growing lists, a direct
        caller anything."""
        stale = (prompt is not self._prompt or len(prompt) != self._prompt_len or len(output) < self._counted
                 or self.seen is None or self.seen.shape[0] != vocab or self.seen.device != device)
        if stale:
            self._prompt, self._prompt_len, self._counted = prompt, len(prompt), 0
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            if prompt:
                self.seen[upload(list(prompt), torch.long, device)] = True
        if len(output) > self._counted:
            new = upload(list(output[self._counted:]), torch.long, device)
            self.seen[new] = True
            self.counts.index_add_(0, new, torch.ones(new.shape[0], device=device))
            self._counted = len(output)

    def penalise(self, row_logits: torch.Tensor, params: SamplingParams) -> None:
        """A row's penalties, in place. The repetition penalty, as transformers applies it: the
        logit of a token seen in the prompt or the output is divided by the penalty when positive
        and multiplied by it when not. Then OpenAI's (and vLLM's) presence and frequency
        penalties, over the output only: a token's logit loses presence_penalty once it has been
        generated, and frequency_penalty for every time it has been."""
        if params.repetition_penalty != 1.0:
            penalty = params.repetition_penalty
            scaled = torch.where(row_logits > 0, row_logits / penalty, row_logits * penalty)
            row_logits.copy_(torch.where(self.seen, scaled, row_logits))
        if params.presence_penalty or params.frequency_penalty:
            row_logits -= (self.counts > 0).float() * params.presence_penalty + self.counts * params.frequency_penalty


class RowDraws:
    """One step's sampled rows of float32 logits x [rows, vocab], on x's device; each sampler
    draws its one uniform number here. Rows that neither top_k nor top_p cuts are drawn over the
    whole vocabulary in its own order (min_p needs no sorting); the others within their most
    likely tokens, most likely first: top_k plus TIE_MARGIN of them (tokens tied with the k-th
    stay in, as transformers keeps them), or CANDIDATES for a top_p-only row. first() draws every
    row and says which may keep tokens past their candidates; refine() redraws those over more
    (MORE_CANDIDATES, then the whole row) with the same uniform numbers."""

    def __init__(self, x: torch.Tensor, samplers: list[Sampler]):
        self.vocab = x.shape[-1]
        params = [s.params for s in samplers]
        self.top_k = [p.top_k if 0 < p.top_k < self.vocab else 0 for p in params]  # 0: no cut
        self.uniforms = [s.uniform() for s in samplers]
        # temperature, top_k, top_p (inf: off), min_p, the draw: one upload for the batch
        self.settings = upload([[p.temperature, k, p.top_p if p.top_p < 1.0 else math.inf, p.min_p, u]
                                for p, k, u in zip(params, self.top_k, self.uniforms)], torch.float64, x.device)
        self.scaled = x / self.settings[:, :1].float()
        self.cut = [row for row, (p, k) in enumerate(zip(params, self.top_k)) if k or p.top_p < 1.0]

    def first(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token, finite, open) [rows], on the device."""
        rows = len(self.top_k)
        if len(self.cut) == rows:
            return self._candidates(list(range(rows)), self._first_width(self.top_k))
        tokens, finite = _draw(self.scaled, self.scaled.logsumexp(dim=-1), self.settings, ordered=False)[:2]
        open_rows = torch.zeros_like(finite)
        if self.cut:
            index = upload(self.cut, torch.long, self.scaled.device)
            tokens[index], finite[index], open_rows[index] = self._candidates(
                self.cut, self._first_width([self.top_k[row] for row in self.cut]))
        return tokens, finite, open_rows

    def refine(self, rows: list[int]) -> list[tuple[int, bool]]:
        """(token, finite) of each of the given open rows (indices into this step's rows), in order."""
        asked, done = rows, {}
        for width in (MORE_CANDIDATES, self.vocab):
            tokens, finite, open_rows = self._candidates(rows, min(width, self.vocab))
            still = []
            for row, token, ok, is_open in zip(rows, tokens.tolist(), finite.tolist(), open_rows.tolist()):
                if is_open:
                    still.append(row)
                else:
                    done[row] = (token, bool(ok))
            if not still:
                break
            rows = still
        return [done[row] for row in asked]

    def _first_width(self, top_k: list[int]) -> int:
        wanted = [k + TIE_MARGIN for k in top_k if k] + ([CANDIDATES] if not all(top_k) else [])
        return min(self.vocab, max(wanted))

    def _candidates(self, rows: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token, finite, open) of the given cut rows, filtered within their `width` most likely."""
        whole = rows == list(range(len(self.top_k)))
        index = None if whole else upload(rows, torch.long, self.scaled.device)
        scaled = self.scaled if whole else self.scaled[index]
        settings = self.settings if whole else self.settings[index]
        values, indices = scaled.topk(width, dim=-1)
        by_k = settings[:, 1] > 0
        # A top_k row keeps the tokens at least as likely as its k-th; the others keep all.
        kth = values.gather(1, (settings[:, 1:2].long() - 1).clamp_(min=0))
        values = values.masked_fill(by_k[:, None] & (values < kth), -math.inf)
        # top_p and min_p see probabilities renormalised over what top_k keeps, or over the vocabulary.
        log_norm = values.logsumexp(dim=-1)
        if not all(self.top_k[row] for row in rows):
            log_norm = torch.where(by_k, log_norm, scaled.logsumexp(dim=-1))
        picks, finite, last_kept = _draw(values, log_norm, settings, ordered=True)
        # Open: the last candidate was kept, so tokens past it may be too (for a top_k row, ties
        # with its k-th past the candidates, which its renormalisation missed).
        open_rows = last_kept & (width < self.vocab)
        return indices.gather(1, picks[:, None])[:, 0], finite, open_rows


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
    # The first position whose cumulative probability passes u x total; the target is kept below
    # the total, which u x total can round up to, so that a dropped token past the last kept one
    # can never be picked.
    target = torch.minimum(settings[:, 4:5] * total, torch.nextafter(total, torch.zeros_like(total)))
    picks = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=values.shape[-1] - 1)
    return picks, (total[:, 0] > 0) & total[:, 0].isfinite(), probs[:, -1] > 0
