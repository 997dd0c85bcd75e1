"""The scheduler: continuous batching over a paged KV cache, with chunked prefill and preemption.

Requests enter a queue; each step admits waiting requests (first come, first served) while the
cache has blocks for them, builds ONE forward pass that mixes the decode token of every running
sequence with prefill chunks of new ones under a per-step token budget, samples, streams text
and retires finished sequences at once, returning their blocks.

Block policy. A request is admitted only when its whole prefill (prompt, plus the tokens it had
generated if it was preempted) fits in the free blocks; those blocks are taken at admission, so
prefill chunks never allocate. A decoding sequence takes one more block every `block_size`
tokens; when none is free the newest running sequence is preempted: its blocks are freed and it
goes back to the FRONT of the queue, keeping its generated tokens, its sampler (RNG state) and
its detokeniser. On re-admission it re-prefills prompt + generated tokens and goes on where it
stopped: nothing is sampled or streamed twice.

Prefix caching (on by default; prefix_caching=False turns it off). Each full block whose keys
and values are computed is offered to the cache under its token prefix (kv_cache.BlockAllocator);
an admitted request takes the cached blocks of its longest whole-block prefix, less its last
token, and prefills from there. A block is offered only once the tokens before its end are final
(behind the last sampled token, so an overlapped step's redrawn input is never in it). Chats that
resend their history, shared system prompts and preempted sequences skip what is cached. A
waiting request whose next block a running prefill is computing waits a step for it, keeping its
place in the queue (_RunningPrefills): prompts that arrive together are prefilled once.

Requests that can never fit. A prompt that alone needs more blocks than the whole cache holds is
rejected by `Engine.check` (UserError: the KV budget is too small). A prompt that fits but whose
prompt + max_tokens does not finishes with "length" once it is the only running sequence and its
next token has no room (its context cannot grow any more). Nothing deadlocks, nothing is dropped.

Overlap (on by default on CUDA; LISA_RT_OVERLAP=0 or overlap=False turns it off). A decode step
launches the GPU's work, tokens drawn there included (sampling.StepSample), and returns; the
next step launches the following decode step with those tokens as its input, gathered on the
device, and only then reads them back and streams them. The host's work of a step (scheduling,
input copies, detokenising, streaming) thus runs while the GPU computes, instead of between its
steps. A sequence that ended on the tokens
read back has had one more step computed for it, which is dropped. The pipeline holds while the
next step needs nothing the host must decide from those tokens: a row with a penalty
(its draw reads every token before it), a request to admit, or a full cache (preemption) make
the step read its tokens first and schedule as usual. A sampled row whose kept tokens may reach
past its candidates is redrawn on the host (rarely); if its token changes, the following step's
row for it, launched with the first draw, is dropped and the sequence steps back one token, its
uniform number given back: a seed draws the same tokens with and without overlap.

Speculative decoding (speculate=N > 0; off by default). While at most `drafting_batch`
sequences run or wait (by device: speculative.DRAFTING_BATCH), a chunk that reaches the end of its
sequence's tokens (a decode step, or a prompt's last prefill chunk) carries up to N draft
tokens after it, looked up in the sequence itself (speculative.py), within the step's token
budget the step's real tokens left and the blocks the sequence holds (blocks that hold
nothing too, when no request waits; the step gives back those its rejected drafts took). The
forward pass gives logits for the last token and each draft; the token drawn from each row is
accepted in turn, and the next row is read only while the token drawn equals the draft that
went in after it (and the request is not cancelled). Each token is drawn from the logits of
the sequence it really follows, with the sequence's own next uniform number: the output is the
one steps of one token give, but for rounding (a chunk's rows sum in another order than a
one-token step's, so a near tie may go the other way, as when batched: rarely in float32, more
often in bfloat16). The cache slots of rejected drafts are written over by the next step.
Drafts need the tokens on the host, so steps that may draft are not overlapped.

Threading. `add`, `cancel`, `close` and `stats` may be called from any thread; `step` from one
thread at a time (the LLM's engine thread, or the caller of the synchronous `generate`).
Deltas are delivered from the stepping thread through each request's `on_delta`.
"""
from __future__ import annotations

import itertools
import operator
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import UserError
from .cuda_graph import CudaGraphDecoder
from .json_constraint import vocabulary_of
from .kv_cache import NO_MATCH, BlockTable, KVCache, PrefixMatch
from .metrics import EngineMetrics
from .model import Model, build_batch
from .sampling import Sampler, SamplingParams, StepSample, token_logprobs, upload
from .speculative import DRAFTING_BATCH, NgramDrafter, check_speculate

DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_BATCH_TOKENS = 2048
# Prompt tokens a step prefills of the requests that score their prompt (prompt_logprobs), all
# of them together: each takes a row of float32 logits over the vocabulary (49,152 for SmolLM2:
# 100 MB per 512), scored SCORED_SLICE rows at a time.
SCORED_CHUNK = 512
SCORED_SLICE = 128


@dataclass
class TokenLogprob:
    """A generated token's log probability under the model (before penalties, temperature and
    filters), its most likely alternatives, and where its text begins in the completion's."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]    # (token id, log probability), most likely first
    text_offset: int                # characters of text before this token's


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (EOS or a stop string), "length" or "cancelled"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0      # prompt tokens whose keys and values came from the prefix cache
    # One per token id, and one for the end-of-sequence token that ended it, when the params ask.
    logprobs: list[TokenLogprob] | None = None
    # One per prompt token, when the params asked (prompt_logprobs): None for the first, which
    # nothing predicts; offsets are into the prompt's text with its special tokens spelt.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class StreamDelta:
    text: str                              # new visible text (may be "")
    finish_reason: str | None = None       # "stop" | "length" | "cancelled" on the last delta
    completion: Completion | None = None   # set on the last delta
    # The tokens' log probabilities since the last delta, when asked for: a token whose text
    # is held back (a possible stop string, an unfinished character) comes with its text.
    logprobs: list[TokenLogprob] | None = None
    # The prompt's log probabilities (Completion.prompt_logprobs), on a request's first delta.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class StopStringFilter:
    """Streams text while holding back any tail that could still become a stop string.

    Each stop string is matched as the text arrives by Knuth-Morris-Pratt: per stop, the length
    of the longest tail of the text that begins it, updated in amortised constant time per
    character, so a long stop string costs no more per token than a short one.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._fallback = [_kmp_fallback(stop) for stop in stops]
        self._matched = [0] * len(stops)

    def push(self, delta: str) -> str:
        if self.stopped:  # text after a stop string is dropped
            return ""
        start = len(self.text)
        self.text += delta
        cut = None  # where the earliest stop string completed in this delta begins
        for k, (stop, fallback) in enumerate(zip(self.stops, self._fallback)):
            matched = self._matched[k]
            for i, char in enumerate(delta, start):
                while matched and stop[matched] != char:
                    matched = fallback[matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    begin = i + 1 - matched
                    cut = begin if cut is None else min(cut, begin)
                    break
            self._matched[k] = matched
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self.flush()
        safe = len(self.text) - max(self._matched, default=0)
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def _kmp_fallback(pattern: str) -> list[int]:
    """fallback[i]: the length of the longest proper prefix of pattern[:i + 1] that is also its
    suffix (where a match of i + 1 characters goes on from when the next character differs)."""
    fallback = [0] * len(pattern)
    length = 0
    for i in range(1, len(pattern)):
        while length and pattern[i] != pattern[length]:
            length = fallback[length - 1]
        if pattern[i] == pattern[length]:
            length += 1
        fallback[i] = length
    return fallback


_ids = itertools.count()


class Request:
    """One sequence through the engine: its tokens, sampler, detokeniser and cache blocks.

    tokens = prompt + output; `computed` of them have their keys and values in the cache. A
    decoding sequence has computed == len(tokens) - 1 (the last sampled token goes in next),
    or computed == len(tokens) while a step that drew its next token is in flight (overlap:
    that token went in on the device and is not yet in `output`), or len(tokens) +
    len(drafts) during a step that runs drafts (until its tokens are accepted).
    """

    def __init__(self, model: Model, prompt: list[int], params: SamplingParams, max_new: int,
                 on_delta: Callable[[StreamDelta], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 request_id: str | None = None):
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt = list(prompt)
        self.params = params
        self.max_new = max_new
        self.on_delta = on_delta
        self.on_error = on_error
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self._prompt_decoder = None  # the prompt's text so far, for prompt_logprobs' offsets
        self.prompt_logprobs_sent = False
        self._prompt_chars = 0
        self._logprobs_sent = 0
        self._decoded_chars = 0  # text the detokeniser has made of the output so far
        tok = model.tokenizer
        self._tokenizer = tok
        self.decoder = tok.stream_decoder(self.prompt) if tok else None
        self.filter = StopStringFilter(params.stop)
        eos = tok.eos_token_ids if tok else model.config.eos_token_ids
        self.eos = set() if params.ignore_eos else set(eos)
        grammar = None
        if params.json_schema is not None:  # (check_prompt saw to the tokenizer)
            grammar = vocabulary_of(tok, model.config.vocab_size).grammar(params.json_schema, eos)
        self.sampler = Sampler(params, grammar)
        self.table: BlockTable | None = None
        self.computed = 0
        self.drafter: NgramDrafter | None = None  # made by an engine that speculates
        self.drafts: list[int] = []  # this step's draft tokens, run after the last token
        self.drafted = 0   # draft tokens run, and of them kept
        self.accepted = 0
        self.finish_reason: str | None = None
        self.completion: Completion | None = None
        self.cancel_requested = False
        self.preemptions = 0
        self.decode_steps = 0
        self.cached_tokens: int | None = None  # at its first admission
        self.t_submit = time.perf_counter()
        self.t_admit: float | None = None
        self.t_first: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt tokens' log probabilities are still to come: its prefill wants the
        logits of every row, and cannot take cached blocks (they skip those rows)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt)

    def score_prompt(self, targets: list[int], entries: list[tuple[float, list[tuple[int, float]]]]) -> None:
        """Records the log probabilities of prompt tokens len(prompt_logprobs), ... in order."""
        if self._prompt_decoder is None:
            self._prompt_decoder = self.decoder_for_prompt()
        for target, (logprob, top) in zip(targets, entries):
            index = len(self.prompt_logprobs)
            self._prompt_chars += len(self._prompt_decoder.push(self.prompt[index - 1]))
            self.prompt_logprobs.append(TokenLogprob(target, logprob, top, self._prompt_chars))

    def decoder_for_prompt(self):
        """A detokeniser that reads the prompt from its start, special tokens spelt (offsets
        into the text tokenizer.decode(prompt, skip_special_tokens=False))."""
        return self._tokenizer.stream_decoder(skip_special_tokens=False) if self._tokenizer else _NoText()

    def tokens(self, lo: int, hi: int) -> list[int]:
        """(prompt + output)[lo:hi] without building the whole list."""
        p = len(self.prompt)
        if hi <= p:
            return self.prompt[lo:hi]
        if lo >= p:
            return self.output[lo - p : hi - p]
        return self.prompt[lo:] + self.output[: hi - p]

    def accept(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> str:
        """Records a sampled token (with its log probabilities when the params ask for them);
        returns the new text it makes visible."""
        if self.logprobs is not None:  # the end-of-sequence token's too, as the model drew it
            assert logprob is not None, "a request that asks for log probabilities got a token without"
            self.logprobs.append(TokenLogprob(token, logprob[0], logprob[1], self._decoded_chars))
        if token in self.eos:
            self.finish_reason = "stop"
            return self._release_text()
        self.output.append(token)
        matcher = self.sampler.json_matcher
        if matcher is not None:
            matcher.advance(token)
        text = self.decoder.push(token) if self.decoder else ""
        self._decoded_chars += len(text)
        delta = self.filter.push(text)
        if self.filter.stopped:
            self.finish_reason = "stop"
        elif matcher is not None and matcher.closed:  # nothing can follow the JSON value
            delta += self._release_text()
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new:
            delta += self._release_text()
            # The held-back text may still complete a stop string.
            self.finish_reason = "stop" if self.filter.stopped else "length"
        return delta

    def finish_length(self) -> str:
        """Ends the sequence because its context cannot grow; returns the held text."""
        delta = self._release_text()
        self.finish_reason = "stop" if self.filter.stopped else "length"
        return delta

    def _release_text(self) -> str:
        """Releases all held text: the decoder's unfinished bytes, then the filter's tail."""
        text = self.decoder.flush() if self.decoder else ""
        self._decoded_chars += len(text)
        return self.filter.push(text) + self.filter.flush()

    def unsent_logprobs(self) -> list[TokenLogprob] | None:
        """The log probabilities not yet streamed (None when the params did not ask)."""
        if self.logprobs is None:
            return None
        fresh, self._logprobs_sent = self.logprobs[self._logprobs_sent:], len(self.logprobs)
        return fresh

    def make_completion(self) -> Completion:
        end = time.perf_counter()
        admit = self.t_admit if self.t_admit is not None else end
        first = self.t_first if self.t_first is not None else end
        decode_tokens = max(len(self.output) - 1, 0)
        return Completion(
            # Cancelled: the text streamed so far (held-back text is never shown).
            text=self.filter.text[: self.filter.emitted], token_ids=list(self.output),
            finish_reason=self.finish_reason or "length", prompt_tokens=len(self.prompt),
            cached_tokens=self.cached_tokens or 0,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            timings={"queue_s": admit - self.t_submit, "prefill_s": first - admit,
                     "decode_s": end - first, "decode_steps": self.decode_steps,
                     "preemptions": self.preemptions, "draft_tokens": self.drafted,
                     "accepted_draft_tokens": self.accepted,
                     "prompt_tok_per_s": _rate(len(self.prompt), first - admit),
                     "decode_tok_per_s": _rate(decode_tokens, end - first)})


class _RunningPrefills:
    """The running sequences that will still offer whole blocks to the prefix cache (those
    prefilling), for one scheduling step: a waiting request whose next block past what the
    cache holds one of them is computing waits a step for it rather than computing a copy
    alongside. So the n choices of one prompt, or clients that send one system prompt at the
    same moment, prefill it once. A sequence offers blocks only behind its last token, and a
    request takes only blocks before its own. Answers are kept per (prefix node, block tokens):
    a thousand requests of one prompt are decided once."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self._offering: list[Request] | None = None   # found when first asked
        self._answers: dict[tuple[int, tuple[int, ...]], bool] = {}

    def computing_next_block_of(self, req: Request, match: PrefixMatch) -> bool:
        engine = self._engine
        if not engine.prefix_caching or req.scores_prompt:
            return False
        size = engine.cache.block_size
        block = len(match.blocks)  # the first block req lacks
        end = (block + 1) * size
        if end > req.length - 1:
            return False
        tokens = tuple(req.tokens(block * size, end))
        key = (match.node, tokens)
        if key not in self._answers:
            self._answers[key] = any(
                other.table.registered <= block and other.length - 1 >= end
                and tuple(other.tokens(block * size, end)) == tokens
                and req.tokens(0, block * size) == other.tokens(0, block * size)
                for other in self._sequences_offering())
        return self._answers[key]

    def admitted(self, req: Request) -> None:
        """req joined the running sequences this step: it may be the one others wait for."""
        if self._offering is not None and self._offers_more(req):
            self._offering.append(req)
            self._answers.clear()

    def _offers_more(self, other: Request) -> bool:
        table = other.table
        return (table is not None and table.shareable
                and table.registered < (other.length - 1) // self._engine.cache.block_size)

    def _sequences_offering(self) -> list[Request]:
        if self._offering is None:
            self._offering = [other for other in self._engine.running if self._offers_more(other)]
        return self._offering


class _NoText:
    """The detokeniser of a model without a tokenizer: no text, so every offset is 0."""

    def push(self, token_id: int) -> str:
        return ""


def _rate(count: int, seconds: float) -> float:
    """Tokens per second; 0 where nothing was timed (a request cancelled before its prefill)."""
    return count / seconds if seconds > 0 else 0.0


class InFlight:
    """A decode step whose tokens are still on the device, copied back asynchronously."""

    def __init__(self, requests: list[Request], sample: StepSample):
        self.requests = requests  # one per row
        self.sample = sample
        # Requests whose token here is dropped when read: the step was launched with a wrong
        # input token for them (see Engine.step).
        self.rewind: set[Request] = set()
        device = sample.tokens.device
        # The tokens, and the log probabilities of the rows that ask for them, come back together.
        packed = [sample.packed] + ([sample.scored.packed] if sample.scored is not None else [])
        if device.type == "cuda":
            self.host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in packed]
            for host, p in zip(self.host, packed):
                host.copy_(p, non_blocking=True)
            self.copied: torch.cuda.Event | None = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(device))  # the copy's stream, on its device
        else:
            self.host, self.copied = packed, None

    @property
    def tokens(self) -> torch.Tensor:
        """[rows] int64 on the device: the input of the step after this one."""
        return self.sample.tokens

    def read(self) -> tuple[list[int], list[int], list]:
        """The tokens on the host, the rows whose token differs from `tokens` (redrawn over
        more candidates), and each row's log probabilities (None where it does not ask); waits
        for the step to finish. Rows nobody takes (their sequence ended or steps back) are not
        redrawn, and their logits may be anything."""
        if self.copied is not None:
            self.copied.synchronize()
        packed = self.host[0].tolist()
        first = self.sample.drawn(packed)
        dropped = frozenset(row for row, req in enumerate(self.requests) if req.finished or req in self.rewind)
        tokens = self.sample.resolve(packed, dropped)
        logprobs = self.sample.logprobs(self.host[1].tolist() if len(self.host) > 1 else None, first, tokens)
        redrawn = [row for row, (a, b) in enumerate(zip(first, tokens)) if a != b and row not in dropped]
        return tokens, redrawn, logprobs


class Engine:
    """Continuous batching over one model and one KV cache (see the module docstring)."""

    def __init__(self, model: Model, cache: KVCache, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, cuda_graphs: bool = True,
                 overlap: bool | None = None, prefix_caching: bool = True, speculate: int = 0,
                 drafting_batch: int | None = None):
        if max_num_seqs < 1:
            raise UserError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_batch_tokens < 1:
            raise UserError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        check_speculate(speculate)
        if drafting_batch is not None and (isinstance(drafting_batch, bool) or not isinstance(drafting_batch, int)
                                           or drafting_batch < 1):
            raise UserError(f"drafting_batch must be an integer >= 1, got {drafting_batch!r}")
        self.model = model
        self.cache = cache
        # Pure-decode steps on CUDA replay a captured graph (see cuda_graph.py).
        self.graph_decoder = (CudaGraphDecoder(model, cache, max_num_seqs)
                              if cuda_graphs and model.device.type == "cuda" else None)
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.speculate = speculate
        # (None: the device's; see speculative.DRAFTING_BATCH)
        self.drafting_batch = DRAFTING_BATCH.get(model.device.type, 2) if drafting_batch is None else drafting_batch
        self.overlap = overlap_by_default(model.device) if overlap is None else overlap
        self.prefix_caching = prefix_caching
        self.admitted_tokens = 0  # tokens prefilled at admission, and of them found in the cache:
        self.cached_tokens = 0    # their ratio is the prefix cache's hit rate
        self.deferrals = 0        # admissions put off a step for a running prefill's blocks
        self._inflight: InFlight | None = None
        self.overlapped_steps = 0
        self.rewinds = 0  # rows of overlapped steps dropped because their input was redrawn
        self.draft_tokens = 0  # run in decode steps, and of them kept
        self.accepted_draft_tokens = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []   # admission order: the newest is last
        self.preemptions = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.steps = 0
        self.metrics = EngineMetrics()
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._closed = False

    # -- any thread --------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams) -> int:
        """Validates one request; returns how many tokens it may generate. Raises UserError."""
        model = self.model
        if not isinstance(params, SamplingParams):
            raise UserError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        return check_prompt(model, prompt, params, self.cache)

    def add(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._inbox.append(request)
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        """Idempotent; the request ends with "cancelled" at the next step boundary."""
        with self._cond:
            if request.finished or request.cancel_requested:
                return
            request.cancel_requested = True
            self._cancels.append(request)
            self._cond.notify_all()

    def has_work(self) -> bool:
        return bool(self._inbox or self._cancels or self.waiting or self.running or self._inflight)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Blocks until there is work (True) or the engine is closed (False)."""
        with self._cond:
            while not self._closed and not self.has_work():
                if not self._cond.wait(timeout):
                    break
            return not self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            waiting = len(self._inbox) + len(self.waiting)
        return {"running": len(self.running), "waiting": waiting,
                "free_blocks": self.cache.allocator.num_free, "total_blocks": self.cache.num_blocks,
                "cached_blocks": self.cache.allocator.num_cached, "admitted_tokens": self.admitted_tokens,
                "cached_tokens": self.cached_tokens, "deferrals": self.deferrals,
                "preemptions": self.preemptions, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed, "steps": self.steps,
                "overlapped_steps": self.overlapped_steps,
                "rewinds": self.rewinds, "draft_tokens": self.draft_tokens,
                "accepted_draft_tokens": self.accepted_draft_tokens}

    # -- the stepping thread -----------------------------------------------------------------

    def add_prefilled(self, request: Request) -> None:
        """Starts `request` decoding as if its prompt had been prefilled: its blocks are taken at
        once and all but the last prompt token count as computed, whatever those blocks hold.

        For measuring decode at long contexts without paying for their prefill (bench.py).
        Raises OutOfBlocks, changing nothing, when the cache has no room for the prompt.
        """
        table = BlockTable(self.cache, shareable=False)
        table.ensure(request.length)
        request.table = table
        request.computed = request.length - 1
        request.t_admit = time.perf_counter()
        self.running.append(request)

    def abort_all(self) -> None:
        """Cancels every request left (after close); a step in flight is dropped."""
        self._inflight = None
        self._drain()
        for req in list(self.running) + list(self.waiting):
            self._end(req, "cancelled")
        self.running.clear()
        self.waiting.clear()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler step: admit, one forward pass, sample, stream, retire.

        With a step in flight (overlap), this launches the next decode step first when nothing
        stands in the way, then reads the one in flight and streams its tokens.

        An exception here is a bug: the requests of this step (all requests, if it happened
        outside the forward pass) fail with it, and the engine stays usable.
        """
        try:
            self._drain()
        except Exception as exc:
            self.fail(list(self.running) + list(self.waiting), exc)
            return
        if self._inflight is not None:
            try:
                following = self._continue(self._inflight)
            except Exception as exc:
                self.fail([req for req in self._inflight.requests if not req.finished], exc)
                self._inflight = None
                return
            redrawn = self.settle()
            self._inflight = following
            if following is not None:
                # A redrawn token went in as the wrong input: that row of the following step is
                # dropped and the sequence steps back (its cache slot is written again).
                following.rewind.update(req for req in redrawn if req in following.requests)
                return
        batch: list[Request] = []
        try:
            chunks = self._schedule(batch)
            if not chunks:
                return
            scored = [req.scores_prompt for req in batch]
            logits = self._forward(chunks, logit_rows=[len(tokens) if s else 1 + len(req.drafts)
                                                       for (tokens, _, _), s, req in zip(chunks, scored, batch)])
            if any(scored):
                logits = self._score_prompts(batch, chunks, scored, logits)
            for req in batch:
                self._offer(req)
            if self.overlap and all(len(tokens) == 1 for tokens, _, _ in chunks) and not self._drafting() and \
                    all(req.computed == req.length and not req.sampler.reads_history for req in batch):
                self._inflight = InFlight(batch, StepSample([req.sampler for req in batch], logits, _no_history))
                return
            self._sample(batch, logits)
        except Exception as exc:
            self.fail([req for req in batch if not req.finished] if batch
                      else list(self.running) + list(self.waiting), exc)
            return
        finally:
            for req in batch:
                if req.drafts:
                    req.drafts = []
                    if not req.finished:  # its cache holds its tokens but the last one
                        req.computed = req.length - 1
                        req.table.shrink(req.length)

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> None:
        """Draws the next token of each sequence whose chunk reached the end of its tokens,
        from logits (a row per chunk, 1 + len(drafts) rows for a chunk that ran drafts), and
        accepts it; then, for each sequence whose token equals its first draft, the token after
        that draft from the draft's own row, and so on while the drafts match (speculative.py)."""
        first, row = [], 0
        for req in batch:
            first.append(row)
            row += 1 + len(req.drafts)
        live = [i for i, req in enumerate(batch) if req.computed >= req.length]
        kept_drafts = [0] * len(batch)
        depth = 0
        while live:
            requests = [batch[i] for i in live]
            rows = [first[i] + depth for i in live]
            if rows != list(range(len(logits))):  # (gathering rows costs an index upload on a GPU)
                logits_now = logits[upload(rows, torch.long, logits.device)]
            else:
                logits_now = logits
            sample = StepSample([req.sampler for req in requests], logits_now,
                                lambda k: (requests[k].prompt, requests[k].output))
            packed = sample.packed.tolist()
            drawn = sample.drawn(packed)
            tokens = sample.resolve(packed)
            asked = None if sample.scored is None else sample.scored.packed.tolist()
            logprobs = sample.logprobs(asked, drawn, tokens)
            for k, exc in sample.failed.items():  # (before _accept, which skips ended requests)
                self.fail([requests[k]], exc)
            # (Counted before _accept, whose completion of a request that ends reports them.)
            live = [i for i, req, token in zip(live, requests, tokens)
                    if not req.finished and not req.cancel_requested and depth < len(req.drafts)
                    and token == req.drafts[depth]]
            for i in live:
                kept_drafts[i] += 1
                batch[i].accepted += 1
            self.accepted_draft_tokens += len(live)
            self._accept(requests, tokens, logprobs, same_step=depth > 0)
            live = [i for i in live if not batch[i].finished]
            depth += 1
        for req, kept in zip(batch, kept_drafts):
            if req.drafts:
                req.drafter.observe(len(req.drafts), kept)

    def _score_prompts(self, batch: list[Request], chunks: list, scored: list[bool],
                       logits: torch.Tensor) -> torch.Tensor:
        """Records the prompt log probabilities of the scored chunks (whose every row has
        logits: row p predicts token p + 1) and returns the last row of every scored chunk and
        the rows of the others."""
        kept, rows, targets, tops, owners = [], [], [], [], []
        row = 0
        for req, (tokens, start, _), scoring in zip(batch, chunks, scored):
            if scoring:
                # Prompt tokens not yet scored (a re-prefill after preemption scores none again).
                for position in range(max(start, len(req.prompt_logprobs) - 1),
                                      min(start + len(tokens), len(req.prompt) - 1)):
                    rows.append(row + position - start)
                    targets.append(req.prompt[position + 1])
                    tops.append(req.params.prompt_logprobs)
                    owners.append(req)
                row += len(tokens)
                kept.append(row - 1)
            else:  # its one row, or 1 + len(drafts): all kept
                kept.extend(range(row, row + 1 + len(req.drafts)))
                row += 1 + len(req.drafts)
        entries = []
        for lo in range(0, len(rows), SCORED_SLICE):  # a slice's log softmax at a time
            picked = upload(rows[lo:lo + SCORED_SLICE], torch.long, logits.device)
            entries += token_logprobs(logits[picked], targets[lo:lo + SCORED_SLICE], tops[lo:lo + SCORED_SLICE])
        by_owner: dict[Request, list[int]] = {}
        for i, owner in enumerate(owners):
            by_owner.setdefault(owner, []).append(i)
        for req, mine in by_owner.items():
            req.score_prompt([targets[i] for i in mine], [entries[i] for i in mine])
        return logits[upload(kept, torch.long, logits.device)]

    def settle(self) -> list[Request]:
        """Reads back the step in flight, if any, and streams its tokens; launches nothing.
        Returns the requests whose token was redrawn on the host (see InFlight.read)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        try:
            tokens, redrawn, logprobs = inflight.read()
        except Exception as exc:
            self.fail([req for req in inflight.requests if not req.finished], exc)
            return []
        if inflight.rewind:
            for req, u in zip(inflight.requests, inflight.sample.uniforms()):
                if req in inflight.rewind and not req.finished:
                    self.rewinds += 1
                    req.computed -= 1
                    if u is not None:
                        req.sampler.give_back(u)
        kept = [row for row, req in enumerate(inflight.requests) if req not in inflight.rewind]
        self._accept([inflight.requests[row] for row in kept], [tokens[row] for row in kept],
                     [logprobs[row] for row in kept])
        return [inflight.requests[row] for row in redrawn]

    def _forward(self, chunks: list[tuple[list[int], int, BlockTable]],
                 input_ids: torch.Tensor | None = None, logit_rows: list[int] | None = None) -> torch.Tensor:
        """Logits of the chunks' last tokens (of their last logit_rows[i] tokens where given);
        input_ids (on the device) replace the chunks' ids."""
        self.steps += 1
        if self.graph_decoder is not None and all(len(tokens) == 1 for tokens, _, _ in chunks):
            return self.graph_decoder.run(chunks, input_ids)  # one token: its row either way
        batch = build_batch(chunks, self.model.device, logit_rows)
        if input_ids is not None:
            batch.input_ids = input_ids
        return self.model.forward(batch, self.cache)

    def _continue(self, inflight: InFlight) -> InFlight | None:
        """Launches the decode step after the one in flight, its input tokens read on the device,
        or returns None when the host must see those tokens first (see the module docstring)."""
        running = set(self.running)
        rows = [row for row, req in enumerate(inflight.requests) if req in running]
        if not rows or len(rows) != len(self.running) or inflight.rewind or self._can_admit() \
                or self._drafting():
            return None
        live = [inflight.requests[row] for row in rows]
        # Each live request's pending token goes in at position `computed`: room for one more.
        # (A table already longer than that needs none, and gives none to the others.)
        cache = self.cache
        need = sum(max(0, cache.blocks_for(req.computed + 1) - len(req.table.blocks)) for req in live)
        if need > cache.allocator.num_free:
            return None  # a preemption: decided once the tokens are known
        for req in live:
            req.table.ensure(req.computed + 1)
        input_ids = inflight.tokens
        if len(rows) < len(inflight.requests):  # some ended on the previous tokens
            input_ids = input_ids[upload(rows, torch.long, input_ids.device)]
        # The chunks' token ids are placeholders: the ids are input_ids.
        logits = self._forward([([0], req.computed, req.table) for req in live], input_ids)
        for req in live:
            req.computed += 1
        self.overlapped_steps += 1
        return InFlight(live, StepSample([req.sampler for req in live], logits, _no_history))

    def _can_admit(self) -> bool:
        """Whether the next scheduled step would admit the first waiting request (decode tokens
        leave it budget, a sequence slot and the blocks for its prompt are free)."""
        if not self.waiting or len(self.running) >= min(self.max_num_seqs, self.max_batch_tokens):
            return False
        req, free = self.waiting[0], self.cache.allocator.num_free
        # Room for the whole prompt settles it without hashing its blocks (each overlapped step
        # asks); a match can only lower what admission takes.
        return self.cache.blocks_for(req.length) <= free or self._blocks_to_admit(req, self._match(req)) <= free

    def _match(self, req: Request) -> PrefixMatch:
        if not self.prefix_caching or req.scores_prompt:
            return NO_MATCH
        return self.cache.match(req.tokens, req.length)

    def _blocks_to_admit(self, req: Request, match: PrefixMatch) -> int:
        """Free blocks req's admission takes: new ones for what the match lacks, and the
        matched blocks that sit cached (unused) now."""
        return self.cache.blocks_for(req.length) - len(match.blocks) + match.idle

    def _offer(self, req: Request) -> None:
        """Offers req's computed full blocks to the prefix cache: those before its last token,
        which a step in flight may have fed a draw that is redrawn (see the module docstring)."""
        if self.prefix_caching and req.table is not None:
            req.table.register(req.tokens, min(req.computed, req.length - 1))

    def _accept(self, requests: list[Request], tokens: list[int], logprobs: list | None = None,
                same_step: bool = False) -> None:
        """Records each request's sampled token (and its log probabilities, for the requests
        that ask), streams its text and retires it if it ended. same_step: the tokens follow
        kept drafts, from the step that gave these requests a token already."""
        now = time.perf_counter()
        for req, token, logprob in zip(requests, tokens, logprobs or [None] * len(requests)):
            if req.finished:  # cancelled or ended while its token was in flight: dropped
                continue
            try:
                if req.t_first is None:
                    req.t_first = now
                elif not same_step:
                    req.decode_steps += 1
                delta = req.accept(token, logprob)
                self._offer(req)  # before _end frees the blocks: they stay cached
                if req.finished:
                    self._end(req, req.finish_reason, delta)
                elif delta:
                    self._emit(req, StreamDelta(delta))
            except Exception as exc:
                self.fail([req], exc)

    def fail(self, requests: list[Request], exc: BaseException) -> None:
        """Ends requests with an error: their blocks are freed, on_error gets the exception."""
        for req in requests:
            self._detach(req)
            req.finish_reason = "error"
            self.failed += 1
            self._record(req)
            if req.on_error is not None:
                try:
                    req.on_error(exc)
                except Exception:
                    pass

    def _drain(self) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        self.waiting.extend(inbox)
        for req in cancels:
            if not req.finished:
                self._end(req, "cancelled")

    def _schedule(self, batch: list[Request]) -> list[tuple[list[int], int, BlockTable]]:
        """Picks this step's work into `batch`; returns the chunks for build_batch."""
        budget = self.max_batch_tokens
        scored_budget = SCORED_CHUNK  # rows of every logit, for the requests scoring their prompt
        cache = self.cache
        chunks: list[tuple[list[int], int, BlockTable]] = []
        # 1. Running sequences, oldest first: decode tokens and the rest of chunked prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            length = req.length
            if req.scores_prompt and not scored_budget:  # its turn comes in a later step
                i += 1
                continue
            # Decoding (room for one more token), past the blocks it holds.
            if req.computed == length - 1 and length > req.table.capacity:
                if not self._grow(req):
                    continue  # req itself left the running list; do not advance i
            n = min(length - req.computed, budget)
            if req.scores_prompt:
                n = min(n, scored_budget)
                scored_budget -= n
            chunks.append((req.tokens(req.computed, req.computed + n), req.computed, req.table))
            req.computed += n
            batch.append(req)
            budget -= n
            i += 1
        # 2. Admit waiting requests, first come first served, while blocks and budget allow. A
        # request deferred for a running prefill's blocks keeps its place: the blocks and the
        # sequence slot it will take are held back from those behind it.
        deferred: list[Request] = []
        held = 0  # free blocks the deferred will take at most
        prefills = _RunningPrefills(self)
        while self.waiting and budget > 0 and len(self.running) + len(deferred) < self.max_num_seqs:
            req = self.waiting[0]
            if req.scores_prompt and not scored_budget:
                break
            need = cache.blocks_for(req.length)
            if need > cache.num_blocks:  # can only happen to a preempted sequence; never wait forever
                self.waiting.popleft()
                self._end(req, "length", req.finish_length())
                continue
            match = self._match(req)
            if prefills.computing_next_block_of(req, match):
                deferred.append(self.waiting.popleft())
                held += self._blocks_to_admit(req, match)
                continue
            if self._blocks_to_admit(req, match) > cache.allocator.num_free - held:
                break
            self.waiting.popleft()
            req.table = BlockTable(cache)
            req.table.adopt(match)
            req.table.ensure(req.length)
            self.admitted_tokens += req.length
            self.cached_tokens += match.tokens
            if req.t_admit is None:
                req.t_admit = time.perf_counter()
                req.cached_tokens = match.tokens
            self.running.append(req)
            prefills.admitted(req)
            n = min(req.length - match.tokens, budget)
            if req.scores_prompt:
                n = min(n, scored_budget)
                scored_budget -= n
            chunks.append((req.tokens(match.tokens, match.tokens + n), match.tokens, req.table))
            req.computed = match.tokens + n
            batch.append(req)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        self.deferrals += len(deferred)
        # 3. Drafts, from what the step's real tokens left of the budget, after each chunk that
        # reaches its sequence's last token.
        if self._drafting():
            for req, (tokens, _, _) in zip(batch, chunks):
                if budget <= 0:
                    break
                drafts = self._drafts(req, budget)
                tokens += drafts
                req.computed += len(drafts)
                budget -= len(drafts)
        return chunks

    def _drafting(self) -> bool:
        """Whether this step runs drafts: the engine speculates and at most drafting_batch
        sequences run or wait."""
        return self.speculate > 0 and len(self.running) + len(self.waiting) <= self.drafting_batch

    def _drafts(self, req: Request, room: int) -> list[int]:
        """Draft tokens to run after req's chunk (speculative.py; set as req.drafts): none unless
        the chunk reaches req's last token (and req scores no prompt). At most `speculate`, the
        step's budget left (room), what max_tokens and the context leave after the token the
        step draws anyway, and what its blocks hold, or blocks that hold nothing too (not the
        cached prefixes) when no request waits for them: the step gives back those its rejected
        drafts took. Counted as drafted."""
        length = req.length
        if req.computed < length or req.scores_prompt:
            return []
        count = min(self.speculate, room, req.max_new - len(req.output) - 1, self.model.max_context - length)
        if count <= 0:
            return []
        if req.drafter is None:
            req.drafter = NgramDrafter(self.speculate)
        drafts = req.drafter.propose(req.tokens, length, count)
        spare = req.table.capacity - length
        if len(drafts) > spare:
            free = 0 if self.waiting else self.cache.allocator.num_unused
            drafts = drafts[:spare + free * self.cache.block_size]
            req.table.ensure(length + len(drafts))
        req.drafts = drafts
        req.drafted += len(drafts)
        self.draft_tokens += len(drafts)
        return drafts

    def _grow(self, req: Request) -> bool:
        """Makes room for req's next token, preempting the newest sequences if needed.

        Returns False when req itself had to leave the running list (preempted, or finished
        because it alone fills the cache).
        """
        need = req.length  # tokens in the cache after this step
        while self.cache.blocks_for(need) - len(req.table.blocks) > self.cache.allocator.num_free:
            if len(self.running) == 1:  # alone and out of room: its context cannot grow
                self._end(req, "length", req.finish_length())
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        req.table.ensure(need)
        return True

    def _preempt(self, req: Request) -> None:
        self._detach(req)
        req.computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _detach(self, req: Request) -> None:
        """Takes req out of the queues and returns its blocks to the allocator."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.table is not None:
            req.table.release()
            req.table = None

    def _end(self, req: Request, reason: str, delta: str = "") -> None:
        """Retires req: frees its blocks first, then sends the final delta."""
        self._detach(req)
        req.finish_reason = reason
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.completed += 1
        req.completion = req.make_completion()
        self._record(req)
        self._emit(req, StreamDelta(delta, reason, req.completion))

    def _record(self, req: Request) -> None:
        self.metrics.record(req.finish_reason, len(req.prompt), len(req.output), req.t_submit, req.t_admit,
                            req.t_first, time.perf_counter())

    def _emit(self, req: Request, delta: StreamDelta) -> None:
        delta.logprobs = req.unsent_logprobs()
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            delta.prompt_logprobs, req.prompt_logprobs_sent = list(req.prompt_logprobs), True
        if req.on_delta is not None:
            req.on_delta(delta)


def overlap_by_default(device: torch.device) -> bool:
    """Overlapped steps on CUDA, unless LISA_RT_OVERLAP=0; a CPU computes a step in the calling
    thread, so there is nothing to overlap with."""
    return device.type == "cuda" and os.environ.get("LISA_RT_OVERLAP") != "0"


def _no_history(row: int) -> tuple[list[int], list[int]]:
    raise AssertionError("an overlapped step has no row with a penalty")


def check_prompt(model: Model, prompt: list[int], params: SamplingParams,
                 cache: KVCache | None = None) -> int:
    """Validates one request; returns how many tokens it may generate (max_tokens, capped by
    the context). With a cache, a prompt that cannot fit in it even alone is refused."""
    if not prompt:
        raise UserError("the prompt is empty (no tokens)")
    if len(prompt) >= model.max_context:
        raise UserError(f"the prompt has {len(prompt)} tokens; the model's context is "
                        f"{model.max_context}, which leaves no room to generate")
    vocab = model.config.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise UserError(f"prompt token ids must be in [0, {vocab})")
    if params.json_schema is not None and model.tokenizer is None:
        raise UserError("json_schema needs the model's tokenizer, and this model has none")
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise UserError(f"logit_bias token ids must be in [0, {vocab}), got {max(params.logit_bias)}")
    if cache is not None and cache.blocks_for(len(prompt)) > cache.num_blocks:
        raise UserError(f"the prompt has {len(prompt)} tokens but the KV cache holds only "
                        f"{cache.num_blocks * cache.block_size}: the KV budget (kv_cache_gb) is too small")
    return min(params.max_tokens, model.max_context - len(prompt))


def token_ids(prompt) -> list[int]:
    """A prompt of token ids (a list or tuple of ints, or a numpy array or torch tensor of
    integers) as a list of ints; UserError for anything else."""
    if hasattr(prompt, "tolist") and hasattr(prompt, "ndim"):  # numpy or torch: one conversion
        prompt = prompt.tolist() if prompt.ndim == 1 else None
    if isinstance(prompt, (list, tuple)) and not any(isinstance(t, bool) for t in prompt):
        try:
            return [operator.index(t) for t in prompt]
        except TypeError:
            pass
    raise UserError("a prompt here is a list of token ids (model.tokenizer.encode gives them)")


def _per_prompt(params: SamplingParams | list[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * count
    if not isinstance(params, (list, tuple)) or len(params) != count \
            or not all(isinstance(sp, SamplingParams) for sp in params):
        raise UserError("one SamplingParams per prompt, or one for all")
    for sp in params:
        sp.validate()
    return list(params)


def run_to_completion(engine: Engine, prompts: list[list[int]],
                      params: SamplingParams | list[SamplingParams],
                      on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Runs the prompts (token ids) through an idle engine, stepping it in the calling thread.

    on_text(index, delta) receives each sequence's text as it is made (stop strings excluded).
    """
    prompts = [token_ids(p) for p in prompts]
    params = _per_prompt(params, len(prompts))
    budgets = [engine.check(p, sp) for p, sp in zip(prompts, params)]
    errors: list[BaseException] = []

    def request(index: int) -> Request:
        def on_delta(delta: StreamDelta) -> None:
            if delta.text and on_text is not None:
                on_text(index, delta.text)
        return Request(engine.model, prompts[index], params[index], budgets[index],
                       on_delta=on_delta, on_error=errors.append)

    requests = [request(i) for i in range(len(prompts))]
    for req in requests:
        engine.add(req)
    while engine.has_work():
        engine.step()
        if errors:
            raise errors[0]
    return [req.completion for req in requests]


def generate(model: Model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
             on_text: Callable[[int, str], None] | None = None, cuda_graphs: bool = True,
             overlap: bool | None = None, speculate: int = 0) -> list[Completion]:
    """Generates for every prompt (token ids) with an engine of its own, in the calling thread.

    The cache is sized for every request at full length, so nothing is ever preempted.
    speculate: draft tokens per step by prompt lookup (Engine, speculative.py); 0 runs none.
    """
    if not prompts:
        return []
    if all(isinstance(t, int) for t in prompts):
        raise UserError("generate takes a list of prompts, each a list of token ids: [ids], not ids")
    prompts = [token_ids(p) for p in prompts]
    params = _per_prompt(params, len(prompts))
    budgets = [check_prompt(model, p, sp) for p, sp in zip(prompts, params)]
    cache = model.new_cache([len(p) + n for p, n in zip(prompts, budgets)])
    engine = Engine(model, cache, max_num_seqs=len(prompts), cuda_graphs=cuda_graphs, overlap=overlap,
                    speculate=speculate)
    return run_to_completion(engine, prompts, params, on_text)
