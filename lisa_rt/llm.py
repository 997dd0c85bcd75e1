"""The Python API: `LLM`, one model and one engine thread shared by every caller.

    from lisa_rt import LLM, SamplingParams
    with LLM("smollm2") as llm:
        print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].text)
        for piece in llm.stream("Once upon a time"):
            print(piece, end="", flush=True)

Every call (from any thread, or from asyncio through agenerate/astream) submits requests to
the same engine, whose thread batches them together step by step (continuous batching).
A request is a `RequestHandle`: its deltas can be read blocking (`events`), from asyncio
(`aevents`) or all at once (`result`); `cancel` ends it and frees its KV blocks.
Prompts that begin with the same tokens as earlier ones (a chat's history, a shared system
prompt) reuse those tokens' cached keys and values (prefix_caching=False turns that off).
speculate=N runs up to N draft tokens a step, copied from earlier in each sequence (prompt
lookup; see engine.py): the same answers, faster where they repeat their prompts.

KV cache size (`kv_cache_gb`, GiB = 2**30 bytes, keys and values of every layer):
None picks, on the CPU, enough for max_num_seqs sequences of min(context, 4096) tokens but at
most 2 GiB and at most half the memory available; on CUDA, 40% of the GPU memory free once the
weights are loaded, but no more than max_num_seqs sequences at full context need.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
import weakref
from typing import AsyncIterator, Iterator

import torch

from . import huge_pages
from .engine import (DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_NUM_SEQS, Completion, Engine, Request,
                     StreamDelta, token_ids)
from .errors import UserError
from .kv_cache import KVCache
from .sampling import SamplingParams
from .speculative import check_speculate
from .tokenizer import chat_messages

__all__ = ["LLM", "RequestHandle", "StreamDelta", "Completion", "kv_cache_bytes"]

logger = logging.getLogger(__name__)

CPU_KV_TOKENS_PER_SEQ = 4096
CPU_KV_MAX_BYTES = 2 * 2**30
CUDA_KV_FREE_FRACTION = 0.4


class RequestHandle:
    """One submitted request. Deltas are kept, so events() may be read by several consumers
    and result() works whether or not they are read."""

    def __init__(self, engine: Engine, request_id: str, prompt_tokens: int):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._engine = engine
        self._request: Request | None = None
        self._cond = threading.Condition()
        self._deltas: list[StreamDelta] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._wakers: set = set()

    # -- called by the engine thread ---------------------------------------------------------

    def _push(self, delta: StreamDelta) -> None:
        with self._cond:
            self._deltas.append(delta)
            if delta.completion is not None:
                self._completion = delta.completion
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    # -- public ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    def cancel(self) -> None:
        """Idempotent. The request ends at the next step boundary with "cancelled" (its blocks
        are free before the final delta is sent); a finished request is left as it is."""
        if not self.done and self._request is not None:
            self._engine.cancel(self._request)

    def _read(self, index: int) -> tuple[list[StreamDelta], bool]:
        """Deltas from index on, and whether the stream is over. Call under self._cond."""
        return self._deltas[index:], self.done

    def events(self) -> Iterator[StreamDelta]:
        """Blocking iterator over the deltas; ends after the final one (finish_reason set).
        Raises the engine's exception if the request failed inside a step."""
        index = 0
        while True:
            with self._cond:
                while index == len(self._deltas) and not self.done:
                    self._cond.wait()
                new, over = self._read(index)
            index += len(new)
            yield from new
            if over and index == len(self._deltas):
                if self._error is not None:
                    raise self._error
                return

    async def aevents(self) -> AsyncIterator[StreamDelta]:
        """events() for asyncio: the engine thread wakes the loop with call_soon_threadsafe."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        with self._cond:
            self._wakers.add(wake)
        index = 0
        try:
            while True:
                with self._cond:
                    new, over = self._read(index)
                    if not new and not over:
                        ready.clear()  # before unlocking: a later push sets it again
                if not new and not over:
                    await ready.wait()
                    continue
                index += len(new)
                for delta in new:
                    yield delta
                if over and index == len(self._deltas):
                    if self._error is not None:
                        raise self._error
                    return
        finally:
            with self._cond:
                self._wakers.discard(wake)

    def result(self, timeout: float | None = None) -> Completion:
        """Waits for the completion; TimeoutError after timeout seconds (the request goes on)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            if self._error is not None:
                raise self._error
            return self._completion


class LLM:
    """A model and its engine thread; thread-safe, batches concurrent callers together."""

    def __init__(self, model: str | os.PathLike | None = "smollm2", device=None, dtype=None,
                 kv_cache_gb: float | None = None, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, cuda_graphs: bool = True, lisa=None,
                 overlap: bool | None = None, prefix_caching: bool = True, quantize: str | None = None,
                 speculate: int = 0):
        from . import load_model

        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise UserError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise UserError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs}")
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise UserError(f"max_batch_tokens must be an integer >= 1, got {max_batch_tokens}")
        check_speculate(speculate)  # before minutes of loading
        self.model_name = str(model) if model is not None else "smollm2"
        self.model = load_model(model, device=device, dtype=dtype, lisa=lisa, quantize=quantize)
        self.tokenizer = self.model.tokenizer
        budget = kv_cache_bytes(self.model, kv_cache_gb, max_num_seqs)
        cache = self.model.cache_for_budget(budget)
        self._engine = Engine(self.model, cache, max_num_seqs=max_num_seqs,
                              max_batch_tokens=max_batch_tokens, cuda_graphs=cuda_graphs, overlap=overlap,
                              prefix_caching=prefix_caching, speculate=speculate)
        # The thread holds the engine, not self: an LLM dropped without close() is collected
        # and its finalizer stops the thread.
        self._thread = threading.Thread(target=_run_engine, args=(self._engine,),
                                        name="lisa-rt-engine", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._engine, self._thread)

    # -- requests ----------------------------------------------------------------------------

    def _tokens(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("this model has no tokenizer: give token ids")
            return self.tokenizer.encode(prompt)
        try:
            return token_ids(prompt)
        except UserError:
            raise UserError("a prompt is a string or a list of token ids") from None

    def _prepare(self, prompt, params: SamplingParams | None) -> tuple[list[int], SamplingParams, int]:
        params = SamplingParams() if params is None else params
        ids = self._tokens(prompt)
        return ids, params, self._engine.check(ids, params)

    def _submit(self, ids: list[int], params: SamplingParams, max_new: int) -> RequestHandle:
        handle = RequestHandle(self._engine, f"req-{uuid.uuid4().hex[:16]}", len(ids))
        request = Request(self.model, ids, params, max_new, on_delta=handle._push,
                          on_error=handle._fail, request_id=handle.request_id)
        handle._request = request
        try:
            self._engine.add(request)
        except RuntimeError:
            raise RuntimeError("this LLM is closed") from None
        return handle

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queues one request; raises UserError at once for a bad one (empty prompt, prompt
        that leaves no room in the context or does not fit the KV cache, bad params)."""
        return self._submit(*self._prepare(prompt, params))

    def submit_many(self, requests: list[tuple[str | list[int], SamplingParams | None]]) -> list[RequestHandle]:
        """Queues (prompt, params) requests, all or none: every one is checked before any is
        queued, so a bad one raises UserError with nothing left running."""
        prepared = [self._prepare(prompt, params) for prompt, params in requests]
        handles: list[RequestHandle] = []
        try:
            for item in prepared:
                handles.append(self._submit(*item))
        except BaseException:  # closed meanwhile: take back what went in
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Completions of every prompt, in order (batched with whatever else is running)."""
        one = (isinstance(prompts, str) or getattr(prompts, "ndim", None) == 1  # numpy, torch: ids
               or (isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)))
        if one:
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise UserError("one SamplingParams per prompt, or one for all")
        handles = self.submit_many(list(zip(prompts, params)))
        try:
            return [h.result() for h in handles]
        finally:
            for h in handles:  # interrupted or failed: do not leave the others running
                h.cancel()

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one request. The request is checked at once and submitted when
        iteration starts; closing the generator early cancels it."""
        prepared = self._prepare(prompt, params)

        def deltas() -> Iterator[str]:
            handle = self._submit(*prepared)
            try:
                for delta in handle.events():
                    if delta.text:
                        yield delta.text
            finally:
                handle.cancel()

        return deltas()

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        """The assistant's reply to messages, through the model's chat template. Messages are
        as OpenAI's chat API takes them (a content may be a list of text parts, "developer" is
        the system role); other keys and roles reach the template as they are."""
        return self.generate([self._chat_tokens(messages)], params)[0]

    def _chat_tokens(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise UserError(f"{self.model_name}: this model has no chat template")
        return self.tokenizer.encode_chat(chat_messages(messages))

    async def agenerate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Completion:
        """generate() of one prompt for asyncio; cancelling the task cancels the request."""
        handle = self.submit(prompt, params)
        completion = None
        try:
            async for delta in handle.aevents():
                completion = delta.completion or completion
        finally:
            handle.cancel()
        return completion

    def astream(self, prompt: str | list[int], params: SamplingParams | None = None) -> AsyncIterator[str]:
        """stream() for asyncio: `async for piece in llm.astream(...)` (awaiting it first also
        works and gives the same iterator). Checked at once, submitted when iteration starts;
        closing the iterator or cancelling its task cancels the request."""
        prepared = self._prepare(prompt, params)

        async def deltas() -> AsyncIterator[str]:
            handle = self._submit(*prepared)
            try:
                async for delta in handle.aevents():
                    if delta.text:
                        yield delta.text
            finally:
                handle.cancel()

        return _AwaitableAsyncIterator(deltas())

    # -- state and lifetime ------------------------------------------------------------------

    def stats(self) -> dict:
        return self._engine.stats()

    def metrics_text(self, model_name: str | None = None) -> str:
        """The engine's metrics in Prometheus' text format, labelled with model_name (default:
        the model's name); what `lisa-rt serve` answers on /metrics."""
        return self._engine.metrics.exposition(model_name or self.model_name, self.stats())

    @property
    def cache(self) -> KVCache:
        return self._engine.cache

    def close(self) -> None:
        """Stops the engine thread and cancels whatever is left; idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_engine(engine: Engine) -> None:
    while engine.wait_for_work():
        try:
            engine.step()  # failures inside a step go to the requests concerned
        except Exception as exc:  # a bug in the error path itself: nobody may wait forever
            logger.exception("lisa-rt engine step failed")
            engine.fail(list(engine.running) + list(engine.waiting), exc)
    engine.abort_all()


def _shutdown(engine: Engine, thread: threading.Thread) -> None:
    engine.close()
    if thread is threading.current_thread():  # collected inside a step: the loop ends after it
        return
    thread.join()
    engine.abort_all()  # in case the thread died: nobody may wait forever


class _AwaitableAsyncIterator:
    """An async generator that `await` also returns as is, so both spellings of astream work."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._agen.__anext__()

    def aclose(self):
        return self._agen.aclose()

    def __await__(self):
        return self
        yield  # a generator: `await x` returns x at once


def kv_cache_bytes(model, kv_cache_gb: float | None, max_num_seqs: int) -> int:
    """The KV budget in bytes: kv_cache_gb GiB, or the default described in the module doc."""
    if kv_cache_gb is not None:
        return int(kv_cache_gb * 2**30)
    per_token = model.kv_bytes_per_token()
    if model.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(model.device)
        # Never more than every sequence at full context could use.
        return min(int(free * CUDA_KV_FREE_FRACTION), max_num_seqs * model.max_context * per_token)
    tokens = max_num_seqs * min(model.max_context, CPU_KV_TOKENS_PER_SEQ)
    available = huge_pages.available_memory()  # a small machine gets a smaller default, not an error
    return min(tokens * per_token, CPU_KV_MAX_BYTES, available // 2 if available else CPU_KV_MAX_BYTES)
