"""Generation over a static batch: chunked prefill of every prompt, then batched decode.

Sequences of different lengths share each forward pass through the paged cache; each one
stops on its own (EOS, a stop string, max tokens or the end of the context) and its text is
streamed as it is made, with stop strings held back until they can no longer match.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import UserError
from .kv_cache import BlockTable
from .model import Model, build_batch
from .sampling import Sampler, SamplingParams, sample_batch

PREFILL_CHUNK_TOKENS = 512


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class StopStringFilter:
    """Streams text while holding back any tail that could still become a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:  # text after a stop string is dropped
            return ""
        self.text += delta
        if self.stops:
            window = max(0, self.emitted - max(map(len, self.stops)))
            hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._held_back()
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class _Sequence:
    def __init__(self, index: int, prompt: list[int], params: SamplingParams, max_new: int,
                 table: BlockTable, model: Model):
        self.index = index
        self.prompt = prompt
        self.params = params
        self.max_new = max_new
        self.table = table
        self.sampler = Sampler(params)
        self.output: list[int] = []
        self.decoder = model.tokenizer.stream_decoder(prompt) if model.tokenizer else None
        self.filter = StopStringFilter(params.stop)
        self.finish_reason: str | None = None
        eos = model.tokenizer.eos_token_ids if model.tokenizer else model.config.eos_token_ids
        self.eos = set() if params.ignore_eos else set(eos)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def accept(self, token: int) -> str:
        """Records a sampled token; returns the new text it makes visible."""
        if token in self.eos:
            self.finish_reason = "stop"
            return self._finish()
        self.output.append(token)
        delta = self.filter.push(self.decoder.push(token)) if self.decoder else ""
        if self.filter.stopped:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new:
            delta += self._finish()
            # The held-back text may still complete a stop string.
            self.finish_reason = "stop" if self.filter.stopped else "length"
        return delta

    def _finish(self) -> str:
        """Releases all held text: the decoder's unfinished bytes, then the filter's tail."""
        delta = self.filter.push(self.decoder.flush()) if self.decoder else ""
        return delta + self.filter.flush()


def _check_prompt(model: Model, prompt: list[int], params: SamplingParams) -> int:
    """Validates one request; returns how many tokens it may generate."""
    if not prompt:
        raise UserError("the prompt is empty (no tokens)")
    if len(prompt) >= model.max_context:
        raise UserError(f"the prompt has {len(prompt)} tokens; the model's context is "
                        f"{model.max_context}, which leaves no room to generate")
    vocab = model.config.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise UserError(f"prompt token ids must be in [0, {vocab})")
    return min(params.max_tokens, model.max_context - len(prompt))


@torch.inference_mode()
def generate(model: Model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Generates for every prompt (token ids) as one static batch.

    on_text(index, delta) receives each sequence's text as it is made (stop strings excluded).
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise UserError("one SamplingParams per prompt, or one for all")
    budgets = [_check_prompt(model, p, sp) for p, sp in zip(prompts, params)]
    cache = model.new_cache([len(p) + n for p, n in zip(prompts, budgets)])
    seqs = [_Sequence(i, list(p), sp, n, BlockTable(cache), model)
            for i, (p, sp, n) in enumerate(zip(prompts, params, budgets))]
    for seq in seqs:
        seq.table.ensure(len(seq.prompt) + seq.max_new)

    def emit(seq: _Sequence, delta: str) -> None:
        if delta and on_text is not None:
            on_text(seq.index, delta)

    start = time.perf_counter()
    # Chunked prefill: each pass takes the next chunk of every unfinished prompt.
    done = [0] * len(seqs)
    while True:
        chunks, owners = [], []
        for seq in seqs:
            if done[seq.index] < len(seq.prompt):
                lo = done[seq.index]
                hi = min(lo + PREFILL_CHUNK_TOKENS, len(seq.prompt))
                chunks.append((seq.prompt[lo:hi], lo, seq.table))
                owners.append(seq)
                done[seq.index] = hi
        if not chunks:
            break
        logits = model.forward(build_batch(chunks, model.device), cache)
        ready = [row for row, seq in enumerate(owners) if done[seq.index] == len(seq.prompt)]
        tokens = sample_batch([owners[row].sampler for row in ready], logits[ready],
                              lambda i: owners[ready[i]].prompt)
        for row, token in zip(ready, tokens):
            emit(owners[row], owners[row].accept(token))
    first_token = time.perf_counter()

    active = [seq for seq in seqs if seq.finish_reason is None]
    steps = 0
    while active:
        batch = build_batch([(seq.output[-1:], seq.length - 1, seq.table) for seq in active], model.device)
        logits = model.forward(batch, cache)
        steps += 1
        tokens = sample_batch([seq.sampler for seq in active], logits,
                              lambda i: active[i].prompt + active[i].output)
        for seq, token in zip(active, tokens):
            emit(seq, seq.accept(token))
        active = [seq for seq in active if seq.finish_reason is None]
    end = time.perf_counter()

    results = []
    for seq in seqs:
        seq.table.release()
        text = seq.filter.text
        decode_tokens = max(len(seq.output) - 1, 0)
        results.append(Completion(
            text=text, token_ids=seq.output, finish_reason=seq.finish_reason or "length",
            prompt_tokens=len(seq.prompt),
            timings={"prefill_s": first_token - start, "decode_s": end - first_token,
                     "decode_steps": steps,
                     "prompt_tok_per_s": len(seq.prompt) / max(first_token - start, 1e-9),
                     "decode_tok_per_s": decode_tokens / max(end - first_token, 1e-9)}))
    return results
