"""The OpenAI-compatible server, over real HTTP: a uvicorn server on 127.0.0.1 (a free port, in
a background thread) serves a tiny random model; the official `openai` client and raw httpx
requests talk to it. A few cases run `lisa-rt serve` itself as a subprocess.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from lisa_rt import cli  # noqa: E402
from lisa_rt.errors import UserError  # noqa: E402
from lisa_rt.sampling import SamplingParams  # noqa: E402
from tests.fixtures import CORPUS, tiny_model_dir  # noqa: E402

PROMPT = "The model reads"
MODEL = "tiny"
API_KEY = "sekret-key"
# OpenAI's sampling without lisa-rt's extra filters, greedy: what the server does for temperature 0.
GREEDY = dict(temperature=0, top_k=0, top_p=1.0, min_p=0.0)


# --- a live server ----------------------------------------------------------------------------

class LiveServer:
    def __init__(self, llm, api_key=None, wrap=lambda app: app):
        from lisa_rt.server import bind_socket, create_app

        self.llm = llm
        sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(wrap(create_app(llm, model_name=MODEL, api_key=api_key)), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, **kwargs):
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture(scope="module")
def llm(tiny, tmp_path_factory):
    from lisa_rt.llm import LLM

    os.environ.setdefault("LISA_RT_HOME", str(tmp_path_factory.mktemp("home")))
    with LLM(str(tiny), device="cpu", kv_cache_gb=0.02, max_num_seqs=8) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(llm):
    live = LiveServer(llm)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(llm):
    live = LiveServer(llm, api_key=API_KEY)
    yield live
    live.stop()


def wait_idle(llm, timeout=30.0) -> dict:
    """Polls llm.stats() until nothing runs or waits and every block is free."""
    deadline = time.monotonic() + timeout
    while True:
        stats = llm.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["free_blocks"] == stats["total_blocks"]:
            return stats
        assert time.monotonic() < deadline, f"the engine did not go idle: {stats}"
        time.sleep(0.05)


def reference(llm, prompt_ids, max_tokens, **params):
    """What the Python API makes of the same request."""
    sp = SamplingParams(max_tokens=max_tokens, **{**GREEDY, **params})
    return llm.generate([prompt_ids], sp)[0]


def counts(usage):
    """A usage's token counts, less the cached ones: a request repeated finds its prompt cached."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


# --- completions and chat through the openai client -------------------------------------------

def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(server, llm):
    client = server.client()
    prompt = "A prompt sent twice, long enough to fill a few blocks of the cache. " * 4
    ids = llm.tokenizer.encode(prompt)
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Its whole blocks, the last token's left out: that one is computed for the next token.
    assert again.usage.prompt_tokens_details.cached_tokens == (len(ids) - 1) // 16 * 16 > 0


def test_completion_streamed_equals_whole_and_usage(server, llm):
    client = server.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    ids = llm.tokenizer.encode(PROMPT)
    expected = reference(llm, ids, 24)
    choice = whole.choices[0]
    assert choice.text == expected.text and choice.text
    assert choice.finish_reason == expected.finish_reason
    assert whole.object == "text_completion" and whole.model == MODEL
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.usage.completion_tokens == expected.completion_tokens
    assert whole.usage.total_tokens == len(ids) + expected.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [choice.finish_reason]
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage there is no usage chunk.
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert all(c.choices for c in plain) and "".join(c.choices[0].text for c in plain) == choice.text


def test_chat_streamed_equals_whole_and_usage(server, llm):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    ids = llm.tokenizer.encode_chat(messages)
    expected = reference(llm, ids, 20)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content == expected.text
    assert whole.object == "chat.completion"
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.usage.completion_tokens == expected.completion_tokens
    assert whole.choices[0].finish_reason == expected.finish_reason

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert counts(chunks[-1].usage) == counts(whole.usage) and chunks[-1].choices == []
    # max_completion_tokens is chat's newer name for max_tokens.
    short = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_content_parts_and_developer_role(server):
    client = server.client()
    plain = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}])
    parts = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert counts(parts.usage) == counts(plain.usage)


def test_sampling_params_reach_the_engine(server, llm):
    client = server.client()

    def sample(seed, **extra):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed, **extra).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) == 3
    # lisa-rt's own parameters: top_k 1 is greedy whatever the temperature.
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert sample(3, extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.0}) == greedy
    assert sample(3, top_p=0) == greedy  # OpenAI's top_p 0: the most likely token alone
    # top_k -1 (vLLM's spelling) and 0 both mean no top-k filter.
    assert sample(3, extra_body={"top_k": -1}) == sample(3, extra_body={"top_k": 0}) == sample(3)
    # A seeded sampled request gives what the Python API gives with the same parameters.
    ids = llm.tokenizer.encode(PROMPT)
    expected = reference(llm, ids, 12, temperature=1.0, seed=7)
    assert sample(7) == expected.text


def test_stop_strings(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    mid = len(full) // 2
    stop = full[mid: mid + 3]
    assert stop.strip() and "\ufffd" not in stop, full
    for stops in (stop, [stop, "@@never@@"]):
        result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stops)
        assert result.choices[0].text == full[: full.index(stop)]
        assert result.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                             stop=stops, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_several_prompts_and_token_id_prompts(server, llm):
    client = server.client()
    other = "She writes the weights"
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text
               for p in (PROMPT, other)]
    both = client.completions.create(model=MODEL, prompt=[PROMPT, other], max_tokens=10, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == singles
    streamed = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=[PROMPT, other], max_tokens=10, temperature=0,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == singles
    ids = llm.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == singles[0] and by_ids.usage.prompt_tokens == len(ids)


def test_n_choices(server, llm):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me something."}]

    def chat(**kw):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **kw)

    # Seeded: choice j draws as a request of its own with seed + j; the prompt counts once.
    three = chat(n=3, temperature=1.0, seed=5)
    singles = [chat(temperature=1.0, seed=5 + j) for j in range(3)]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in three.choices}) > 1
    assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert three.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    # Streamed: every choice opens with its role, then its text; usage at the end, as above.
    roles, streamed, usage = set(), ["", "", ""], None
    for chunk in chat(n=3, temperature=1.0, seed=5, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            streamed[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert roles == {0, 1, 2} and streamed == [c.message.content for c in three.choices]
    assert usage.prompt_tokens == three.usage.prompt_tokens
    assert usage.completion_tokens == three.usage.completion_tokens
    # The largest seed wraps round for the choices after it.
    assert len(chat(n=2, temperature=1.0, seed=2**64 - 1).choices) == 2
    # Completions: n choices of each prompt in turn.
    other = "She writes the weights"
    greedy = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in (PROMPT, other)]
    both = client.completions.create(model=MODEL, prompt=[PROMPT, other], max_tokens=6, temperature=0, n=2,
                                     best_of=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [g.choices[0].text for g in greedy for _ in range(2)]
    assert both.usage.prompt_tokens == sum(g.usage.prompt_tokens for g in greedy)
    assert both.usage.completion_tokens == 2 * sum(g.usage.completion_tokens for g in greedy)


def test_log_probabilities(server, llm):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me something."}]
    ids = llm.tokenizer.encode_chat(messages)
    want = reference(llm, ids, 10, logprobs=2)  # greedy: each token is its own most likely
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
    assert [bytes(c.bytes) for c in content] == [llm.tokenizer.token_bytes(e.token_id) for e in want.logprobs]
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].bytes == c.bytes
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    # Streamed, the chunks carry the same entries, each with (or before) its text.
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            streamed += choice.logprobs.content if choice.logprobs else []
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    # Without logprobs: none; with 0 alternatives: the tokens alone.
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    bare = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content)
    # Completions: OpenAI's legacy layout, offsets into the choice's text (a token's top dict
    # may hold fewer than asked where alternatives spell the same).
    prompt_ids = llm.tokenizer.encode(PROMPT)
    sampled = dict(temperature=1.5, seed=3)
    want = reference(llm, prompt_ids, 8, logprobs=3, **sampled)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3, **sampled).choices[0]
    assert got.text == want.text
    assert got.logprobs.token_logprobs == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
    assert got.logprobs.text_offset == [e.text_offset for e in want.logprobs]
    assert got.logprobs.text_offset[0] == 0 and got.logprobs.text_offset == sorted(got.logprobs.text_offset)
    # Each top dict holds the chosen token first, then the alternatives: 4 at most.
    for token, logprob, top in zip(got.logprobs.tokens, got.logprobs.token_logprobs, got.logprobs.top_logprobs):
        assert 1 <= len(top) <= 4 and next(iter(top.items())) == (token, logprob)


def test_echo_with_log_probabilities_scores_the_prompt(server, llm):
    # What lm-evaluation-harness asks of an OpenAI completions server to score a text: the
    # prompt echoed with every prompt token's log probability (the first has none).
    client = server.client()
    ids = llm.tokenizer.encode(PROMPT + " and writes")
    want = llm.model.logits(ids).log_softmax(-1)
    # A text prompt is echoed as given, token ids as read back (special tokens spelt); the
    # offsets point into that text either way.
    for prompt, echoed in ((PROMPT + " and writes", PROMPT + " and writes"),
                           (ids, llm.tokenizer.decode(ids, skip_special_tokens=False))):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                        logprobs=1).choices[0]
        lp = got.logprobs
        assert got.text.startswith(echoed) and len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(
            [float(want[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-3)
        # lm-evaluation-harness's greedy test: the chosen token is the most likely one.
        for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert 1 <= len(top) <= 2 and top[token] == logprob
            assert (logprob == max(top.values())) == (len(top) == 1)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] == len(echoed)
        for token, start in zip(lp.tokens[1:len(ids)], lp.text_offset[1:]):
            assert got.text[start:].lstrip().startswith(token.lstrip()) or "\\x" in token
    # Streamed: the prompt first, in a chunk of its own, then the completion.
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                            logprobs=0, stream=True))
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0).choices[0]
    assert chunks[0].choices[0].text == PROMPT
    assert len(chunks[0].choices[0].logprobs.tokens) == len(llm.tokenizer.encode(PROMPT))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT + plain.text
    streamed = [t for c in chunks[1:] if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == plain.logprobs.tokens
    # A prompt with a special token: the echo spells it, and the offsets count it.
    special = PROMPT + "<|im_end|> and so on"
    scored = client.completions.create(model=MODEL, prompt=special, max_tokens=3, temperature=0, echo=True,
                                       logprobs=0).choices[0]
    assert scored.text.startswith(special)
    offsets = scored.logprobs.text_offset
    assert offsets == sorted(offsets)
    pieces = [scored.text[a:b] for a, b in zip(offsets, offsets[1:] + [len(scored.text)])]
    assert pieces[len(llm.tokenizer.encode(PROMPT)):][:1] == ["<|im_end|>"]
    # max_tokens 0 with echo: the prompt alone, scored; streamed, the prompt chunk and the end.
    alone = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, temperature=0, echo=True,
                                      logprobs=1)
    choice = alone.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(llm.tokenizer.encode(PROMPT))
    assert alone.usage.completion_tokens == 0 and alone.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT))
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == PROMPT
    assert streamed[-1].choices[0].finish_reason == "length"
    assert streamed[0].choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs
    # Echo alone: the text, no log probabilities.
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True).choices[0]
    assert echoed.text.startswith(PROMPT) and echoed.logprobs is None


def test_logit_bias_reaches_the_engine(server, llm):
    client = server.client()
    last = llm.model.config.vocab_size - 1
    # The last id, and ids spelt with leading zeros (past int()'s 4,300 digits too).
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, logit_bias={
        str(last): 1, "007": 1, "0" * 5000 + "8": 1}).usage.completion_tokens == 1
    _check_error(_post(server.url + COMPLETIONS, _completion(logit_bias={str(last + 1): 1})), 400, "logit_bias",
                 "invalid_value")
    forced = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={"7": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [llm.tokenizer.token_bytes(7).decode("utf-8", "backslashreplace")] * 4
    # The greedy token banned: the next most likely one instead.
    first, second = [t for t, _ in reference(llm, llm.tokenizer.encode(PROMPT), 1, logprobs=2).logprobs[0].top]
    banned = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    assert banned.choices[0].logprobs.tokens == [llm.tokenizer.token_bytes(second).decode("utf-8", "backslashreplace")]


def test_presence_and_frequency_penalties_reach_the_engine(server, llm):
    client = server.client()
    ids = llm.tokenizer.encode(PROMPT)
    params = dict(temperature=0, presence_penalty=-1.0, frequency_penalty=-2.0)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, **params).choices[0].text
    assert got == reference(llm, ids, 10, **params).text
    assert got != client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text


def test_metrics_count_what_was_served(server, llm):
    from tests.test_metrics import parse

    before = parse(httpx.get(server.url + "/metrics").text)
    client = server.client()
    done = client.completions.create(model=MODEL, prompt=[PROMPT, "Another one"], max_tokens=5, temperature=0)
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = parse(response.text)

    def grew(name, **labels):
        key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
        return after[key] - before.get(key, 0)

    ended = sum(grew("lisa_rt_requests_total", finish_reason=r) for r in ("stop", "length"))
    assert ended == 2 and grew("lisa_rt_time_to_first_token_seconds_count") == 2
    assert grew("lisa_rt_generation_tokens_total") == done.usage.completion_tokens
    assert grew("lisa_rt_prompt_tokens_total") == done.usage.prompt_tokens
    assert after[("lisa_rt_requests_running", (("model_name", MODEL),))] == 0


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                              "n": 2}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1}),
], ids=["chat, role chunks", "completions, echo chunk"])
def test_with_include_usage_every_chunk_but_the_last_says_usage_null(server, path, body):
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), [c for c in chunks if "usage" not in c]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_a_request_is_queued_whole_or_not_at_all(server, llm):
    from tests.test_metrics import parse

    before = parse(httpx.get(server.url + "/metrics").text)
    # The second prompt is refused (a token id past the vocabulary): the first one's three
    # choices, checked before it, are not queued either.
    response = httpx.post(server.url + COMPLETIONS, json=_completion(prompt=[[1, 50, 60], [1, 10**9]], n=3))
    assert response.status_code == 400
    assert parse(httpx.get(server.url + "/metrics").text) == before


def test_tokenizer_endpoints_as_vllm_has_them(server, llm):
    # What lm-evaluation-harness's remote tokenizer reads: /tokenizer_info, /tokenize, /detokenize.
    tok = llm.tokenizer
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == llm.model.max_context
    text = PROMPT + " and writes"
    for add in (True, False):
        got = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": add}).json()
        assert got["tokens"] == tok.encode(text, add_special_tokens=add) and got["count"] == len(got["tokens"])
    chat = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": HI}).json()
    assert chat["tokens"] == tok.encode_chat(HI)
    ids = tok.encode(text, add_special_tokens=False)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": tok.decode(ids)}
    for path, body, param in (("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": text, "messages": HI}, "prompt"),
                              ("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": text, "add_special_tokens": "yes"}, "add_special_tokens"),
                              ("/tokenize", {"prompt": "a\ud800"}, "prompt"),
                              ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
                              ("/detokenize", {"tokens": "12"}, "tokens"), ("/detokenize", {"tokens": [1, -2]}, "tokens"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens")):
        _check_error(_post(server.url + path, body), 400, param)


def test_models_and_health(server):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.head(server.url + "/health").status_code == 200  # for probes that send HEAD


def test_the_client_sees_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert info.value.param == "tools"


def test_parameters_that_ask_for_no_tool_or_suffix_are_accepted(server):
    # What clients send by default: no tool call, no text after the insertion point.
    client = server.client()
    for extra in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {"tool_choice": "none", "tools": []},
                  {"function_call": "none"}, {"function_call": "auto"}):
        answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, extra_body=extra)
        assert answer.usage.completion_tokens >= 1, extra
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, suffix="")
    assert answer.usage.completion_tokens >= 1


def test_max_tokens_must_fit_in_the_context_after_the_prompt(server, llm):
    context = llm.model.max_context
    prompt = [5] * (context - 5)  # token ids: its length is what it says
    fits = _post(server.url + COMPLETIONS, _completion(prompt=prompt, max_tokens=5, ignore_eos=True))
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 5
    error = _check_error(_post(server.url + COMPLETIONS, _completion(prompt=prompt, max_tokens=6)), 400,
                         "max_tokens", "context_length_exceeded")
    # OpenAI's words, which clients look for
    assert error["message"].startswith(f"This model's maximum context length is {context} tokens. However, "
                                       f"you requested {context + 1} tokens ({context - 5} in the prompt, 6 in")
    # Not given, max_tokens is a default (16 for completions, the rest of the context for chat)
    # that stops at the context's end.
    default = _post(server.url + COMPLETIONS, {"model": MODEL, "prompt": prompt, "ignore_eos": True})
    assert default.status_code == 200 and default.json()["usage"]["completion_tokens"] == 5
    def chat_of(repeats):
        return [{"role": "user", "content": "many words " * repeats}]

    # A few dozen tokens short of the context (the tokens a repeat takes, as 100 of them do).
    empty, hundred = (len(llm.tokenizer.encode_chat(chat_of(r))) for r in (0, 100))
    messages = chat_of((context - 30 - empty) * 100 // (hundred - empty))
    length = len(llm.tokenizer.encode_chat(messages))
    assert context - 100 < length < context, length
    chat = _post(server.url + CHAT, {"model": MODEL, "messages": messages, "ignore_eos": True})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == context - length
    for name in ("max_tokens", "max_completion_tokens"):
        body = {"model": MODEL, "messages": messages, name: context - length + 1}
        error = _check_error(_post(server.url + CHAT, body), 400, name, "context_length_exceeded")
        assert f"({length} in the messages, {context - length + 1} in the completion)" in error["message"]
        body["stream"] = True
        _check_error(_post(server.url + CHAT, body), 400, name, "context_length_exceeded")
    wait_idle(llm)


# --- bad requests: raw HTTP -------------------------------------------------------------------

LONG_PROMPT = CORPUS * 3  # far longer than the tiny model's 1024-token context
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def _chat(**extra):
    return {"model": MODEL, "messages": HI, "max_tokens": 4, **extra}


def _completion(**extra):
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **extra}


BAD_REQUESTS = [
    # (id, path, JSON body or raw bytes, status, param, code)
    ("unknown model", CHAT, _chat(model="gpt-4"), 404, "model", "model_not_found"),
    ("unknown model (completions)", COMPLETIONS, _completion(model="gpt-4"), 404, "model", "model_not_found"),
    ("malformed JSON", CHAT, b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("not UTF-8", CHAT, b'\xff\xfe{}', 400, None, "invalid_json"),
    ("empty body", CHAT, b"", 400, None, "invalid_json"),
    ("JSON array", CHAT, b"[1, 2]", 400, None, "invalid_json"),
    ("prompt too long", COMPLETIONS, _completion(prompt=LONG_PROMPT), 400, "prompt", "context_length_exceeded"),
    ("messages too long", CHAT, _chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400, "messages",
     "context_length_exceeded"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ("empty messages", CHAT, _chat(messages=[]), 400, "messages", None),
    ("message without role", CHAT, _chat(messages=[{"content": "hi"}]), 400, "messages[0]", None),
    ("unknown role", CHAT, _chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", None),
    ("image content", CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content", None),
    ("missing prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ("empty prompt", COMPLETIONS, _completion(prompt=""), 400, "prompt", None),
    ("prompt of the wrong type", COMPLETIONS, _completion(prompt={"a": 1}), 400, "prompt", None),
    ("token id out of range", COMPLETIONS, _completion(prompt=[1, 10**9]), 400, None, None),
    ("temperature > 2", CHAT, _chat(temperature=2.5), 400, "temperature", "invalid_value"),
    ("temperature < 0", COMPLETIONS, _completion(temperature=-0.1), 400, "temperature", "invalid_value"),
    ("temperature a string", CHAT, _chat(temperature="hot"), 400, "temperature", None),
    ("temperature inf", CHAT, _chat(temperature=float("inf")), 400, "temperature", "invalid_value"),
    ("temperature NaN", COMPLETIONS, _completion(temperature=float("nan")), 400, "temperature", "invalid_value"),
    ("temperature 1e999", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
     400, "temperature", "invalid_value"),
    ("top_p > 1", CHAT, _chat(top_p=1.5), 400, "top_p", "invalid_value"),
    ("top_p < 0", CHAT, _chat(top_p=-0.5), 400, "top_p", "invalid_value"),
    ("max_tokens 0", COMPLETIONS, _completion(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max_tokens a float", CHAT, _chat(max_tokens=2.5), 400, "max_tokens", None),
    ("max_completion_tokens -1", CHAT, _chat(max_completion_tokens=-1), 400, "max_completion_tokens", "invalid_value"),
    # The tiny model's context is 1,024 tokens: no prompt leaves room for 2,000 more.
    ("max_tokens past the context", COMPLETIONS, _completion(max_tokens=2000), 400, "max_tokens",
     "context_length_exceeded"),
    ("max_tokens past the context (chat)", CHAT, _chat(max_tokens=2000), 400, "max_tokens",
     "context_length_exceeded"),
    ("max_completion_tokens past the context", CHAT, _chat(max_completion_tokens=2000), 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("n 0", COMPLETIONS, _completion(n=0), 400, "n", "invalid_value"),
    ("n 129", CHAT, _chat(n=129), 400, "n", "invalid_value"),
    ("n a string", CHAT, _chat(n="2"), 400, "n", None),
    ("best_of below n", COMPLETIONS, _completion(n=3, best_of=2), 400, "best_of", "invalid_value"),
    ("best_of above n", COMPLETIONS, _completion(n=2, best_of=3), 400, "best_of", "unsupported_value"),
    ("frequency_penalty > 2", CHAT, _chat(frequency_penalty=2.5), 400, "frequency_penalty", "invalid_value"),
    ("presence_penalty < -2", COMPLETIONS, _completion(presence_penalty=-3), 400, "presence_penalty", "invalid_value"),
    ("echo on chat", CHAT, _chat(echo=True), 400, "echo", "unsupported_parameter"),
    ("suffix", COMPLETIONS, _completion(suffix="!"), 400, "suffix", "unsupported_parameter"),
    ("tool_choice required", CHAT, _chat(tool_choice="required"), 400, "tool_choice", "unsupported_parameter"),
    ("tool_choice a function", CHAT, _chat(tool_choice={"type": "function", "function": {"name": "f"}}), 400,
     "tool_choice", "unsupported_parameter"),
    ("tool_choice auto with tools", CHAT, _chat(tool_choice="auto", tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), 400, "tools",
     "unsupported_parameter"),
    ("function_call auto with functions", CHAT, _chat(function_call="auto", functions=[{"name": "f"}]), 400,
     "functions", "unsupported_parameter"),
    ("echo not a boolean", COMPLETIONS, _completion(echo="yes"), 400, "echo", None),
    ("logprobs not a boolean", CHAT, _chat(logprobs=1), 400, "logprobs", None),
    ("top_logprobs without logprobs", CHAT, _chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    ("top_logprobs 21", CHAT, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    ("logprobs -1", COMPLETIONS, _completion(logprobs=-1), 400, "logprobs", "invalid_value"),
    ("logprobs true", COMPLETIONS, _completion(logprobs=True), 400, "logprobs", None),
    ("logit_bias a list", CHAT, _chat(logit_bias=[1]), 400, "logit_bias", None),
    ("logit_bias key not an id", CHAT, _chat(logit_bias={"the": 5}), 400, "logit_bias", "invalid_value"),
    ("logit_bias past 100", COMPLETIONS, _completion(logit_bias={"5": 101}), 400, "logit_bias", "invalid_value"),
    ("logit_bias past the vocabulary", COMPLETIONS, _completion(logit_bias={"1000000": 1}), 400, "logit_bias",
     "invalid_value"),
    # int() refuses more than 4,300 digits; isdigit() takes digits int() reads oddly or not at all.
    ("logit_bias key of 5,000 digits", COMPLETIONS, _completion(logit_bias={"9" * 5000: 1}), 400, "logit_bias",
     "invalid_value"),
    ("logit_bias key a superscript digit", CHAT, _chat(logit_bias={"\u00b2": 1}), 400, "logit_bias", "invalid_value"),
    ("logit_bias key an Arabic-Indic digit", COMPLETIONS, _completion(logit_bias={"\u0663": 1}), 400, "logit_bias",
     "invalid_value"),
    ("logit_bias key negative", CHAT, _chat(logit_bias={"-1": 1}), 400, "logit_bias", "invalid_value"),
    ("top_logprobs on completions", COMPLETIONS, _completion(logprobs=2, top_logprobs=2), 400, "top_logprobs",
     "unsupported_parameter"),
    ("prompts x n past the cap", COMPLETIONS, _completion(prompt=["a"] * 9, n=128), 400, "n", "invalid_value"),
    ("top_k < -1", CHAT, _chat(top_k=-5), 400, "top_k", "invalid_value"),
    ("min_p > 1", CHAT, _chat(min_p=2), 400, "min_p", "invalid_value"),
    ("repetition_penalty 0", CHAT, _chat(repetition_penalty=0), 400, "repetition_penalty", "invalid_value"),
    ("seed too big", CHAT, _chat(seed=2**70), 400, "seed", "invalid_value"),
    ("empty stop string", CHAT, _chat(stop=[""]), 400, "stop", None),
    ("stop a number", COMPLETIONS, _completion(stop=5), 400, "stop", None),
    ("17 stop strings", COMPLETIONS, _completion(stop=[f"s{i}" for i in range(17)]), 400, "stop", None),
    ("stream not a bool", CHAT, _chat(stream="yes"), 400, "stream", None),
    ("stream_options a list", CHAT, _chat(stream=True, stream_options=[]), 400, "stream_options", None),
    ("stream_options without stream", COMPLETIONS,
     _completion(stream=False, stream_options={"include_usage": True}), 400, "stream_options", None),
    ("JSON nested past reading", CHAT, b"[" * 50000 + b"]" * 50000, 400, None, "invalid_json"),
    ("an integer past Python's 4,300 digits", COMPLETIONS, b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", 400,
     None, "invalid_json"),
    ("a field nested past reading", COMPLETIONS,
     b'{"prompt": "hi", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, "invalid_json"),
    # JSON can spell a lone surrogate, which is not text the tokenizer (or a UTF-8 answer) can take.
    ("lone surrogate in the prompt", COMPLETIONS, _completion(prompt="a\ud800b"), 400, "prompt", "invalid_value"),
    ("lone surrogate in one of the prompts", COMPLETIONS, _completion(prompt=[PROMPT, "\udc80"]), 400, "prompt",
     "invalid_value"),
    ("lone surrogate in a message", CHAT, _chat(messages=[{"role": "user", "content": "hi \ud800"}]), 400,
     "messages[0].content", "invalid_value"),
    ("lone surrogate in a content part", CHAT,
     _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), 400,
     "messages[0].content", "invalid_value"),
    ("lone surrogate in stop", COMPLETIONS, _completion(stop=["ok", "\ud800"]), 400, "stop", "invalid_value"),
    ("lone surrogate in the model", CHAT, _chat(model="gpt\ud800"), 400, "model", "invalid_value"),
]


def _post(url, body, **kwargs):
    """POSTs body (bytes as they are, else JSON with non-ASCII escaped: httpx's own encoder
    refuses NaN and lone surrogates, which a client can still send)."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return httpx.post(url, content=body, headers={"content-type": "application/json"}, **kwargs)


def _check_error(response, status, param=None, code=None):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path, body, status, param, code, stream", [
    pytest.param(*case[1:], stream, id=f"{case[0]}{' (stream)' if stream else ''}")
    for case in BAD_REQUESTS for stream in (False, True)
    if not (stream and isinstance(case[2], bytes))])  # raw bytes: no "stream" field to set
def test_bad_request(server, path, body, status, param, code, stream):
    if not isinstance(body, bytes):
        body = {**body, "stream": body.get("stream", stream)}
    _check_error(_post(server.url + path, body), status, param, code)


def test_error_messages_name_the_limits(server):
    def message(path, body, param):
        return _check_error(_post(server.url + path, body), 400, param, "invalid_value")["message"]

    assert "[0, 1]" in message(CHAT, _chat(top_p=1.5), "top_p")
    assert "0 or -1 to disable" in message(CHAT, _chat(top_k=-2), "top_k")
    assert "not valid UTF-8" in message(COMPLETIONS, _completion(prompt="\ud800"), "prompt")
    assert message(COMPLETIONS, _completion(prompt=["ok", "\ud800"]), "prompt").startswith("prompt[1]: ")


def test_oversized_body_is_413_before_parsing(server, llm):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (2 << 20) + b'"}'
    _check_error(httpx.post(server.url + COMPLETIONS, content=big), 413, code="request_too_large")
    # Without a Content-Length (chunked), the server stops reading at the limit.
    chunks = (b"x" * 65536 for _ in range(64))
    _check_error(httpx.post(server.url + CHAT, content=chunks), 413, code="request_too_large")
    # A body of 1 MiB or less is parsed (and here fails for its prompt's length, not its size).
    fits = json.dumps(_completion(prompt="a" * ((1 << 20) - 200))).encode()
    assert len(fits) <= 1 << 20
    _check_error(httpx.post(server.url + COMPLETIONS, content=fits), 400, "prompt", "context_length_exceeded")


def test_client_gone_before_its_body_is_whole_is_not_an_error(llm):
    import logging
    import socket

    answered = threading.Event()

    def wrap(app):
        async def noting_the_end(scope, receive, send):
            try:
                await app(scope, receive, send)
            finally:
                if scope["type"] == "http":
                    answered.set()
        return noting_the_end

    live = LiveServer(llm, wrap=wrap)
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn configured its logging
    try:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n" + b'{"prompt": "Hi"')
        assert answered.wait(10)
        time.sleep(0.2)  # uvicorn logs an error the app raised just after it returns
        assert httpx.get(live.url + "/health").status_code == 200
    finally:
        live.stop()
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert errors == []


def test_unknown_route_and_method(server):
    error = _check_error(httpx.get(server.url + "/v1/nope"), 404)
    assert error["code"] == "not_found"
    _check_error(httpx.get(server.url + COMPLETIONS), 405)


def test_bad_requests_leave_the_engine_idle(server, llm):
    for _, path, body, *_ in BAD_REQUESTS:
        _post(server.url + path, body)
    stats = wait_idle(llm)
    assert stats["free_blocks"] == stats["total_blocks"]


# --- API key ----------------------------------------------------------------------------------

def test_api_key(keyed_server):
    url = keyed_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": "Bearer"}):
        _check_error(httpx.post(url + CHAT, json=_chat(), headers=headers), 401, code="invalid_api_key")
        _check_error(httpx.get(url + "/v1/models", headers=headers), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    answer = keyed_server.client(api_key=API_KEY).chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert answer.usage.completion_tokens >= 1
    assert httpx.get(url + "/health").status_code == 200  # health needs no key
    assert httpx.get(url + "/metrics").status_code == 200  # nor do metrics: scrapers carry none
    _check_error(httpx.post(url + "/tokenize", json={"prompt": "hi"}), 401, code="invalid_api_key")
    assert httpx.post(url + "/tokenize", json={"prompt": "hi"},
                      headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


# --- clients that go away ---------------------------------------------------------------------

def _long_chat(stream: bool) -> dict:
    # ignore_eos and the whole context: it runs far longer than the test waits for.
    return {"model": MODEL, "messages": HI, "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def test_client_disconnect_mid_stream_cancels(server, llm):
    before = wait_idle(llm)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + CHAT, json=_long_chat(stream=True)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[len("data: "):])
                    got += bool(chunk["choices"][0]["delta"].get("content"))
                    if got >= 3:
                        break
            assert got >= 3
            assert llm.stats()["running"] == 1
        # Leaving the block closes the connection mid-stream.
    after = wait_idle(llm)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    assert after["free_blocks"] == after["total_blocks"]


def test_client_timeout_on_whole_answer_cancels(server, llm):
    before = wait_idle(llm)
    # The tiny model writes its ~1,000 tokens in about half a second on an idle CI machine: the
    # client gives up well before that.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CHAT, json=_long_chat(stream=False), timeout=httpx.Timeout(30, read=0.1))
    after = wait_idle(llm)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + COMPLETIONS, json=body) as response:
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: {") and "\n" not in event
        json.loads(event[len("data: "):])



def test_shutdown_lets_short_requests_finish_and_ends_the_rest_telling_their_clients(tiny):
    from lisa_rt.llm import LLM
    from lisa_rt.server import Server, bind_socket, create_app

    llm = LLM(str(tiny), device="cpu", kv_cache_gb=0.02, max_num_seqs=8)
    forward = llm.model.forward

    def slow_forward(*args, **kwargs):  # ~1,000 tokens take 20 s: still running at shutdown
        time.sleep(0.02)
        return forward(*args, **kwargs)

    llm.model.forward = slow_forward
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = threading.Event()
    server = Server(uvicorn.Config(create_app(llm, model_name=MODEL), log_level="warning"), llm,
                    on_ready=started.set, grace_s=1.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    answers = {}

    def post(name: str, body: dict) -> threading.Thread:
        def run() -> None:
            answers[name] = httpx.post(url + CHAT, json=body, timeout=30)
        worker = threading.Thread(target=run)
        worker.start()
        return worker

    def wait_running(count: int) -> None:
        deadline = time.monotonic() + 20
        while llm.stats()["running"] < count:
            assert time.monotonic() < deadline, llm.stats()
            time.sleep(0.01)

    try:
        assert started.wait(30)
        long_whole = post("long", _long_chat(stream=False))
        with httpx.stream("POST", url + CHAT, json=_long_chat(stream=True), timeout=30) as response:
            events = response.iter_lines()
            first = next(line for line in events if '"content": "' in line and '"content": ""' not in line)
            wait_running(2)
            short = post("short", _chat(max_tokens=8, temperature=0, ignore_eos=True))
            wait_running(3)
            server.should_exit = True  # what uvicorn's handler of SIGINT and SIGTERM does
            rest = [line for line in events if line]
        long_whole.join(30)
        short.join(30)
        thread.join(30)
        assert not thread.is_alive() and llm.closed
    finally:
        server.should_exit = True
        thread.join(30)
        llm.close()
    assert json.loads(first[len("data: "):])["choices"][0]["delta"]["content"]
    # within the grace period: answered whole
    assert answers["short"].status_code == 200
    assert answers["short"].json()["choices"][0]["finish_reason"] == "length"
    # past it: cancelled, and told so
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["code"] == "unavailable" and "shutting down" in error["message"]
    assert answers["long"].status_code == 503
    assert answers["long"].json()["error"]["code"] == "unavailable"

# --- without FastAPI, and the `lisa-rt serve` command -----------------------------------------

def test_missing_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
    monkeypatch.delitem(sys.modules, "lisa_rt.server", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'lisa-rt\[serve\]'"):
        import lisa_rt.server  # noqa: F401
    monkeypatch.delitem(sys.modules, "lisa_rt.server", raising=False)
    assert cli.main(["serve", "-m", "whatever"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "pip install 'lisa-rt[serve]'" in err


def _serve(*argv, home):
    env = {**os.environ, "LISA_RT_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "lisa_rt.cli", "serve", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def test_serve_command(tiny, tmp_path):
    # At the default log level (info), so that requests are logged.
    proc = _serve("-m", tiny, "--port", 0, "--api-key", API_KEY, "--kv-cache-gb", 0.02,
                  "--served-model-name", MODEL, home=tmp_path)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stderr.readline()
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL]
        answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    # Every log line, the access log's included, goes to stderr, as `serve --help` says.
    assert out == "" and "Traceback" not in err
    assert '"POST /v1/completions HTTP/1.1" 200' in err


@pytest.mark.parametrize("argv, fragments", [
    (("--port", "70000"), ["--port", "65535"]),
    (("--port", "http"), ["--port"]),
    (("--kv-cache-gb", "0"), ["--kv-cache-gb", "> 0"]),
    (("--host", "no.such.host.invalid"), ["cannot listen", "no.such.host.invalid"]),
    (("--api-key", ""), ["--api-key"]),
    (("--shutdown-grace", "-1"), ["--shutdown-grace", ">= 0"]),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_serve_user_errors(tiny, capsys, argv, fragments):
    assert cli.main(["serve", "-m", str(tiny), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err


def test_serve_passes_its_options_on(tiny, monkeypatch):
    import lisa_rt.server

    seen = {}
    monkeypatch.setattr(lisa_rt.server, "serve", lambda model, **kwargs: seen.update(kwargs, model=model))
    assert cli.main(["serve", "-m", str(tiny), "--port", "0", "--shutdown-grace", "30", "--no-lisa"]) == 0
    assert seen["model"] == str(tiny) and seen["shutdown_grace"] == 30.0 and seen["lisa"] is False
    assert seen["prefix_caching"] is True
    seen["sock"].close()
    assert cli.main(["serve", "-m", str(tiny), "--port", "0", "--no-prefix-caching"]) == 0
    assert seen["prefix_caching"] is False
    seen["sock"].close()


def test_serve_on_a_busy_port(tiny, tmp_path):
    from lisa_rt.server import bind_socket

    busy = bind_socket("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        proc = _serve("-m", tiny, "--port", port, home=tmp_path)
        out, err = proc.communicate(timeout=120)
    finally:
        busy.close()
    assert proc.returncode == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: cannot listen on 127.0.0.1:") and str(port) in err


def test_busy_port_is_reported_before_the_model_loads(tiny, monkeypatch, capsys):
    from lisa_rt import llm as llm_module
    from lisa_rt.server import bind_socket

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(llm_module, "LLM", no_loading)
    busy = bind_socket("127.0.0.1", 0)
    try:
        assert cli.main(["serve", "-m", str(tiny), "--port", str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Address already in use" in err


# --- engine failures --------------------------------------------------------------------------

class _BrokenLLM:
    """Delegates to a real LLM but its requests fail inside the engine after one delta
    (or, closed=True, cannot be submitted at all)."""

    def __init__(self, llm, closed=False):
        self.model, self.tokenizer, self.model_name, self.closed = llm.model, llm.tokenizer, "broken", closed
        self.cancelled = 0

    def submit_many(self, requests):
        return [self.submit(*request) for request in requests]

    def submit(self, prompt, params=None):
        from lisa_rt.llm import StreamDelta

        if self.closed:
            raise RuntimeError("this LLM is closed")
        owner = self

        class Handle:
            done = False

            async def aevents(self):
                yield StreamDelta("Hello")
                raise RuntimeError("the kernel exploded")

            def cancel(self):
                owner.cancelled += 1

        return Handle()

    def stats(self):
        return {}


class _UnencodableLLM(_BrokenLLM):
    """A real model whose tokenizer refuses every text, as lisa-rt's refuses text that is not
    valid UTF-8."""

    def __init__(self, llm):
        super().__init__(llm)

        class Tokenizer:
            has_chat_template = True

            def encode(self, *args, **kwargs):
                raise UserError("the text is not valid UTF-8: a lone surrogate U+D800 at character 0")

            encode_chat = encode

        self.tokenizer = Tokenizer()


def test_tokenizer_user_error_is_400(llm):
    live = LiveServer(_UnencodableLLM(llm))
    try:
        for stream in (False, True):
            for path, body, param in ((COMPLETIONS, _completion(stream=stream), "prompt"),
                                      (CHAT, _chat(stream=stream), "messages")):
                error = _check_error(httpx.post(live.url + path, json=body), 400, param)
                assert "not valid UTF-8" in error["message"]
    finally:
        live.stop()


def test_engine_failure_is_reported(llm):
    live = LiveServer(_BrokenLLM(llm))
    try:
        response = httpx.post(live.url + COMPLETIONS, json=_completion())
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "kernel exploded" in response.json()["error"]["message"]
        with httpx.stream("POST", live.url + COMPLETIONS, json=_completion(stream=True)) as response:
            assert response.status_code == 200
            events = response.read().decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        assert json.loads(events[0][len("data: "):])["choices"][0]["text"] == "Hello"
        error = json.loads(events[-3][len("data: "):])["error"]
        assert error["type"] == "server_error" and "kernel exploded" in error["message"]
        with pytest.raises(openai.APIError, match="kernel exploded"):
            list(live.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))
    finally:
        live.stop()


# A schema whose grammar dead-ends for the tiny model's tokens: greedy, after "The model" (and
# after that as a chat message), no token can continue any of its arrays.
DEAD_END_SCHEMA = {"anyOf": [{"type": "array", "items": {"const": i}} for i in range(70)]}
DEAD_END_FORMAT = {"type": "json_schema", "json_schema": {"name": "dead_end", "schema": DEAD_END_SCHEMA}}


@pytest.fixture
def logged_errors():
    """What uvicorn logs as errors (a traceback for each exception the app let out)."""
    import logging

    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    yield errors
    logging.getLogger("uvicorn.error").removeHandler(handler)


def test_a_schema_the_model_cannot_follow_is_400(server, llm, logged_errors):
    # The client's own input, refused inside the engine: not an internal error, and nothing logged.
    greedy = {"max_tokens": 30, "temperature": 0, "response_format": DEAD_END_FORMAT}
    for path, body in ((COMPLETIONS, _completion(prompt="The model", **greedy)),
                       (CHAT, _chat(messages=[{"role": "user", "content": "The model"}], **greedy)),
                       (COMPLETIONS, _completion(prompt="The model", n=3, **greedy))):
        error = _check_error(httpx.post(server.url + path, json=body, timeout=60), 400, "response_format")
        assert "internal" not in error["message"] and "no token can continue" in error["message"]
        with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2]) == {"error": error}
    wait_idle(llm)
    time.sleep(0.2)  # uvicorn logs an error the app raised just after it returns
    assert logged_errors == []


@pytest.mark.parametrize("failing", [0, 1], ids=["the first choice fails", "the second choice fails"])
def test_a_failed_choice_cancels_the_others(server, llm, monkeypatch, failing):
    from lisa_rt import engine
    from lisa_rt.json_constraint import JsonConstraintError

    seed, prompts = 4321, [PROMPT, "Another one"]
    failing_prompt = llm.tokenizer.encode(prompts[failing])
    # Which request fails after two tokens: of n=2 choices, the one drawing with seed +
    # failing; of two prompts (one choice each, both drawing with seed), prompts[failing]'s.
    cases = [(COMPLETIONS, {"n": 2}, lambda request: request.params.seed == seed + failing),
             (CHAT, {"n": 2}, lambda request: request.params.seed == seed + failing),
             (COMPLETIONS, {"prompt": prompts}, lambda request: request.prompt == failing_prompt)]
    fails = cases[0][2]
    accept = engine.Request.accept

    def failing_accept(self, *args, **kwargs):
        if fails(self) and len(self.output) >= 2:
            raise JsonConstraintError("no token can continue the JSON value here")
        return accept(self, *args, **kwargs)

    monkeypatch.setattr(engine.Request, "accept", failing_accept)
    before = wait_idle(llm)
    for path, extra, fails in cases:
        # The other choice would run on to the context's end for a client already answered.
        body = {**(_chat() if path == CHAT else _completion()), "max_tokens": 1000, "ignore_eos": True,
                "temperature": 0, "seed": seed, **extra}
        _check_error(httpx.post(server.url + path, json=body, timeout=60), 400, "response_format")
        after = wait_idle(llm)
        assert after["failed"] == before["failed"] + 1, (path, extra, after)
        assert after["cancelled"] == before["cancelled"] + 1, (path, extra, after)
        assert after["completed"] == before["completed"], (path, extra, after)
        before = after


def test_closed_llm_is_503(llm):
    live = LiveServer(_BrokenLLM(llm, closed=True))
    try:
        assert httpx.get(live.url + "/health").status_code == 503  # a load balancer sends no more
        response = httpx.post(live.url + CHAT, json=_chat())
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
    finally:
        live.stop()
