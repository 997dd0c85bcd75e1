"""Speculative decoding by prompt lookup (speculative.py; Engine(speculate=N)).

The drafter on its own, against a brute-force search; then the engine running drafts against
the same requests without them, on a tiny random float32 model: the same tokens, text, finish
reasons and log probabilities (greedy and seeded sampling, penalties, stop strings, EOS, JSON
schemas, prompt scoring in the same batch, preemption, LiSA layers), in fewer steps, with every
block returned. A random model seldom repeats itself, so the engine tests draft with an oracle
that knows each request's answer and spoils some of its drafts at random: drafts that are kept,
drafts rejected at every depth, and drafts that run past the end of the answer.
"""
import io
import random
import sys

import pytest
import torch

from lisa_rt import LLM, SamplingParams, UserError, cli, generate
from lisa_rt import engine as engine_module
from lisa_rt.engine import Engine, Request, run_to_completion
from lisa_rt.kv_cache import KVCache
from lisa_rt.speculative import INDEX_PER_CALL, MAX_NGRAM, MAX_SPECULATE, MIN_NGRAM, NgramDrafter
from tests.fixtures import CORPUS, tiny_float32_model, tiny_model_dir, tiny_model_with_adapter

pytest.importorskip("transformers")


# --- the drafter -------------------------------------------------------------------------------

def brute_force_draft(tokens: list[int], count: int) -> list[int]:
    """What follows the latest earlier occurrence of the longest suffix of MIN_NGRAM..MAX_NGRAM
    tokens (an occurrence that a token follows), searched the slow way."""
    for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + count]
    return []


@pytest.mark.parametrize("alphabet", [2, 3, 5, 40])
def test_drafter_proposes_what_a_brute_force_search_finds(alphabet):
    rng = random.Random(alphabet)
    for _ in range(20):
        tokens = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 60))]
        drafter = NgramDrafter(MAX_SPECULATE)
        # Asked at some lengths only, as a sequence that is not always drafting (its index
        # catches up over every token since).
        for length in range(1, len(tokens) + 1):
            if rng.random() < 0.6:
                count = rng.randrange(0, 9)
                got = drafter.propose(lambda lo, hi: tokens[lo:hi], length, count)
                assert got == brute_force_draft(tokens[:length], count), (tokens[:length], count)


def test_drafter_prefers_the_longest_match_and_ignores_single_tokens():
    def propose(tokens, count=8):
        return NgramDrafter(MAX_SPECULATE).propose(lambda lo, hi: tokens[lo:hi], len(tokens), count)

    assert propose([1, 2, 3, 1]) == []                    # one token matches: no draft
    assert propose([1, 2, 3, 9, 1, 2]) == [3, 9, 1, 2]    # up to the sequence's end
    assert propose([1, 2, 3, 9, 1, 2], count=2) == [3, 9]
    # "5 1 2" matched at its only occurrence beats "1 2"'s latest one.
    assert propose([5, 1, 2, 7, 1, 2, 8, 5, 1, 2]) == [7, 1, 2, 8, 5, 1, 2]
    assert propose([4, 4]) == [] and propose([]) == []


def test_drafter_indexes_a_long_prompt_over_several_calls():
    rng = random.Random(1)
    tokens = [rng.randrange(10_000) for _ in range(3 * INDEX_PER_CALL)]
    tokens[-3:] = tokens[100:103]                 # its suffix occurred early,
    tokens[2 * INDEX_PER_CALL:2 * INDEX_PER_CALL + 3] = tokens[100:103]   # and again later
    drafter = NgramDrafter(8)
    calls = []

    def read(lo, hi):
        calls.append(hi - lo)
        return tokens[lo:hi]

    assert drafter.propose(read, len(tokens), 4) == tokens[103:107]   # from the first 4,096 only
    assert max(calls) <= INDEX_PER_CALL + MAX_NGRAM
    drafter.propose(read, len(tokens), 4)
    assert drafter.propose(read, len(tokens), 4) == tokens[2 * INDEX_PER_CALL + 3:][:4]  # caught up


def test_drafter_adapts_its_length_to_what_the_model_kept():
    tokens = list(range(10)) * 3
    drafter = NgramDrafter(8)

    def proposed() -> int:
        return len(drafter.propose(lambda lo, hi: tokens[lo:hi], len(tokens), 8))

    assert proposed() == 8
    drafter.observe(8, 2)            # a miss after two kept: one more than kept next time
    assert proposed() == 3
    drafter.observe(3, 3)            # all kept: twice as long
    assert proposed() == 6
    drafter.observe(6, 6)
    assert proposed() == 8           # ... up to its most
    drafter.observe(8, 0)
    assert proposed() == 1           # never less than one


# --- the engine with an oracle drafter -----------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_float32_model(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def ids(model):
    return model.tokenizer.encode(CORPUS[:2000])


def oracle(answers: dict[tuple[int, ...], list[int]], spoil: float, seed: int = 0):
    """A drafter class that proposes each request's known answer (by its prompt, the longest
    that begins its tokens), a token of it changed with probability `spoil`."""
    rng = random.Random(seed)
    prompts = sorted(answers, key=len, reverse=True)

    class Oracle:
        def __init__(self, most):
            self.most = most

        def propose(self, tokens, length, count):
            prompt = next(p for p in prompts if tuple(tokens(0, len(p))) == p)
            done = length - len(prompt)
            drafts = list(answers[prompt][done:done + min(count, self.most)])
            drafts += [rng.randrange(50, 300) for _ in range(min(count, self.most) - len(drafts))]
            if drafts and rng.random() < spoil:
                drafts[rng.randrange(len(drafts))] = rng.randrange(50, 300)
            return drafts

        def observe(self, proposed, kept):
            assert 0 <= kept <= proposed

    return Oracle


def run(model, prompts, params, speculate, blocks=128, drafting_batch=64, **kw):
    cache = KVCache(model.config, blocks, "cpu", model.dtype, lisa=model.lisa)
    engine = Engine(model, cache, speculate=speculate, drafting_batch=drafting_batch, **kw)
    pieces = {i: [] for i in range(len(prompts))}
    out = run_to_completion(engine, prompts, params, on_text=lambda i, d: pieces[i].append(d))
    assert ["".join(pieces[i]) for i in range(len(prompts))] == [c.text for c in out]
    assert engine.cache.allocator.num_free == blocks
    return out, engine.stats()


def outcome(completion):
    """What a completion says, log probabilities to 4 decimals apart (a chunk with draft rows
    sums its GEMMs in another order: its values may differ in the last float32 bits)."""
    def entries(logprobs):
        return None if logprobs is None else [
            None if t is None else (t.token_id, [i for i, _ in t.top], t.text_offset) for t in logprobs]
    return (completion.token_ids, completion.text, completion.finish_reason,
            entries(completion.logprobs), entries(completion.prompt_logprobs))


def logprob_values(completion) -> list[float]:
    return [v for t in (completion.logprobs or []) + (completion.prompt_logprobs or []) if t is not None
            for v in [t.logprob] + [v for _, v in t.top]]


def assert_same_with_drafts(model, prompts, params, monkeypatch, spoil=0.4, speculate=5, **kw):
    plain, plain_stats = run(model, prompts, params, 0, **kw)
    answers = {tuple(p): c.token_ids for p, c in zip(prompts, plain)}
    monkeypatch.setattr(engine_module, "NgramDrafter", oracle(answers, spoil))
    drafted, stats = run(model, prompts, params, speculate, **kw)
    assert [outcome(c) for c in drafted] == [outcome(c) for c in plain]
    for a, b in zip(drafted, plain):
        assert logprob_values(a) == pytest.approx(logprob_values(b), abs=1e-4)
    assert stats["draft_tokens"] > stats["accepted_draft_tokens"] > 0
    assert stats["steps"] < plain_stats["steps"]
    assert sum(c.timings["draft_tokens"] for c in drafted) == stats["draft_tokens"]
    assert sum(c.timings["accepted_draft_tokens"] for c in drafted) == stats["accepted_draft_tokens"]
    assert plain_stats["draft_tokens"] == 0
    return drafted, stats


def test_drafts_change_nothing_but_the_steps(model, ids, monkeypatch):
    stop_text = generate(model, [ids[:17]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].text
    eos = generate(model, [ids[:40]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids[5]
    monkeypatch.setattr(model.tokenizer, "eos_token_ids", list(model.tokenizer.eos_token_ids) + [eos])
    prompts = [ids[:3], ids[:16], ids[:17], ids[:40], ids[100:131], ids[200:260], ids[300:305]]
    params = [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=1,
                       repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop=[stop_text[12:15]], ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0),                      # ends on the EOS token
        SamplingParams(max_tokens=40, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7,
                       logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),      # no room for a draft
        SamplingParams(max_tokens=12, temperature=0.7, seed=3, logprobs=0, prompt_logprobs=2, ignore_eos=True),
    ]
    drafted, _ = assert_same_with_drafts(model, prompts, params, monkeypatch)
    assert [c.finish_reason for c in drafted] == ["length", "length", "stop", "stop", "length", "length", "length"]
    assert drafted[5].timings["draft_tokens"] == 0
    # A step counts once however many of its drafts were kept.
    assert drafted[0].timings["decode_steps"] < drafted[0].completion_tokens - 1


def test_drafts_under_a_json_schema(model, ids, monkeypatch):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    params = [SamplingParams(max_tokens=40, temperature=0, json_schema=schema),
              SamplingParams(max_tokens=40, temperature=0.8, seed=5, json_schema={"type": "array"})]
    drafted, _ = assert_same_with_drafts(model, [ids[:10], ids[50:70]], params, monkeypatch, spoil=0.3)
    assert drafted[0].text.lstrip().startswith("{")


def test_drafts_with_preemption_and_a_waiting_request(model, ids, monkeypatch):
    # 4 blocks of 16 tokens for three sequences that each grow to about 40: sequences are
    # preempted and resume, and drafts take no free block while a request waits.
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    _, stats = assert_same_with_drafts(model, [ids[:16], ids[16:32], ids[40:44]], [greedy] * 3, monkeypatch,
                                       blocks=4, speculate=8)
    assert stats["preemptions"] >= 1


def test_drafts_through_lisa_layers(tmp_path, monkeypatch):
    import lisa_rt

    model_dir, adapter = tiny_model_with_adapter(tmp_path)
    model = lisa_rt.load_model(model_dir, device="cpu", dtype="float32", lisa=adapter)
    assert model.lisa is not None and model.lisa.layers
    ids = model.tokenizer.encode(CORPUS[:600])
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, seed=2, ignore_eos=True)]
    assert_same_with_drafts(model, [ids[:20], ids[30:70]], params, monkeypatch, speculate=7)


def test_drafts_wait_for_a_batch_small_enough(model, ids, monkeypatch):
    # Three sequences, drafting only while at most two run: none until the shortest has ended.
    prompts = [ids[:10], ids[20:30], ids[40:50]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 30, 30)]
    plain, _ = run(model, prompts, params, 0)
    monkeypatch.setattr(engine_module, "NgramDrafter", oracle({tuple(p): c.token_ids for p, c in zip(prompts, plain)}, 0))
    drafted, stats = run(model, prompts, params, 4, drafting_batch=2)
    assert [c.token_ids for c in drafted] == [c.token_ids for c in plain]
    assert drafted[0].timings["draft_tokens"] == 0 < drafted[1].timings["draft_tokens"]
    assert stats["accepted_draft_tokens"] == stats["draft_tokens"] > 0
    assert Engine(model, model.new_cache([64]), speculate=4).drafting_batch == 2    # the CPU's


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_drafts_on_cuda(tmp_path, monkeypatch):
    # The eager forward of a drafting step, its rows' logits and draws on the device; CUDA graphs
    # for the steps without drafts; float32 so that the tokens match to the last one.
    import lisa_rt

    model_dir, adapter = tiny_model_with_adapter(tmp_path)
    model = lisa_rt.load_model(model_dir, device="cuda", dtype="float32", lisa=adapter)
    ids = model.tokenizer.encode(CORPUS[:600])
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, seed=2, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.7, seed=4, repetition_penalty=1.3, ignore_eos=True)]
    prompts = [ids[:20], ids[30:70], ids[80:95]]

    def run_cuda(speculate):
        engine = Engine(model, model.new_cache([200] * 3), speculate=speculate, drafting_batch=8)
        return run_to_completion(engine, prompts, params), engine.stats()

    plain, _ = run_cuda(0)
    monkeypatch.setattr(engine_module, "NgramDrafter", oracle({tuple(p): c.token_ids for p, c in zip(prompts, plain)}, 0.4))
    drafted, stats = run_cuda(6)
    assert [outcome(c) for c in drafted] == [outcome(c) for c in plain]
    assert stats["accepted_draft_tokens"] > 0


def test_rejected_drafts_give_their_blocks_back_and_take_no_cached_ones(model, ids, monkeypatch):
    # Every draft rejected, 16 a step, blocks of 16 tokens: a sequence holds only the blocks its
    # tokens need after each step, and drafts never evict the cached blocks of an earlier
    # sequence (9 blocks: 5 cached, 4 free, which the second sequence's own tokens come to fill).
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine = Engine(model, KVCache(model.config, 9, "cpu", model.dtype), speculate=16, drafting_batch=4)
    first = run_to_completion(engine, [ids[200:264]], params)[0]    # 64 + 30 tokens: 5 cached blocks
    earlier = ids[200:264] + first.token_ids
    assert engine.cache.allocator.num_cached == 5
    monkeypatch.setattr(engine_module, "NgramDrafter", oracle({tuple(ids[:20]): []}, 1.0))
    longer = params.replace(max_tokens=60)   # 20 + 60 tokens: the 4 free blocks, then a cached one
    req = Request(model, ids[:20], longer, 60)
    engine.add(req)
    allocator = engine.cache.allocator
    while engine.has_work():
        engine.step()
        if req.table is not None:
            assert len(req.table.blocks) <= engine.cache.blocks_for(req.length)
            # A cached block goes only when the sequence's own tokens need it.
            assert allocator.num_cached == min(5, 9 - len(req.table.blocks))
    assert req.completion.token_ids == generate(model, [ids[:20]], longer)[0].token_ids
    assert req.completion.timings["draft_tokens"] > 0 == req.completion.timings["accepted_draft_tokens"]
    assert engine.cache.match(lambda lo, hi: earlier[lo:hi], len(earlier)).tokens == 64


def test_drafts_leave_the_other_sequences_their_tokens_first(model, ids, monkeypatch):
    # A budget of 4 tokens a step, two sequences: drafts only take what their decode tokens leave.
    # (Fewer steps than without drafts, which assert_same_with_drafts checks: were the drafts of
    # the first to take the second's place, the second would wait every other step.)
    prompts = [ids[:10], ids[20:30]]
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)] * 2
    assert_same_with_drafts(model, prompts, params, monkeypatch, speculate=8, max_batch_tokens=4)


def test_a_request_cancelled_mid_step_takes_no_more_drafts(model, ids, monkeypatch):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    answer = generate(model, [ids[:12]], params)[0].token_ids
    monkeypatch.setattr(engine_module, "NgramDrafter", oracle({tuple(ids[:12]): answer}, 0))
    engine = Engine(model, model.new_cache([64]), speculate=8)

    def on_delta(delta):  # cancels from inside the step, between two accepted tokens
        if len(req.output) >= 5:
            engine.cancel(req)

    req = Request(model, ids[:12], params, 40, on_delta=on_delta)
    engine.add(req)
    while engine.has_work():
        engine.step()
    assert req.completion.finish_reason == "cancelled"
    assert 5 <= len(req.completion.token_ids) <= 5 + 1


def test_steps_overlap_while_the_batch_is_too_large_to_draft(model, ids, monkeypatch):
    # Overlap forced on (as on CUDA): four sequences overlap their steps, and once two are left
    # they draft instead; the answers stay the same.
    prompts = [ids[:10], ids[20:30], ids[40:50], ids[60:70]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (8, 10, 30, 30)]
    plain, _ = run(model, prompts, params, 0)
    monkeypatch.setattr(engine_module, "NgramDrafter", oracle({tuple(p): c.token_ids for p, c in zip(prompts, plain)}, 0.3))
    drafted, stats = run(model, prompts, params, 4, drafting_batch=2, overlap=True)
    assert [c.token_ids for c in drafted] == [c.token_ids for c in plain]
    assert stats["overlapped_steps"] > 0 and stats["accepted_draft_tokens"] > 0


def test_prompt_lookup_end_to_end(model, ids):
    # A prompt that repeats itself gives the real drafter matches to propose.
    prompt = ids[:30] * 3 + ids[:6]
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = generate(model, [prompt], greedy)[0]
    drafted = generate(model, [prompt], greedy, speculate=4)[0]
    assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
    assert drafted.timings["draft_tokens"] > 0


@pytest.mark.parametrize("value", [-1, MAX_SPECULATE + 1, 2.0, True, "3", None])
def test_engine_refuses_a_bad_speculate(model, value):
    with pytest.raises(UserError, match="speculate must be an integer in"):
        Engine(model, model.new_cache([64]), speculate=value)
    if value is not None:
        with pytest.raises(UserError, match="drafting_batch must be an integer >= 1"):
            Engine(model, model.new_cache([64]), speculate=2, drafting_batch=value if value != MAX_SPECULATE + 1 else 0)


def test_llm_speculates_with_the_same_answers(tmp_path):
    model_dir = tiny_model_dir(tmp_path, seed=5)
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat"
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(model_dir, device="cpu", dtype="float32") as plain, \
            LLM(model_dir, device="cpu", dtype="float32", speculate=3) as drafting:
        assert drafting.generate(prompt, params)[0].token_ids == plain.generate(prompt, params)[0].token_ids
        assert drafting.stats()["draft_tokens"] > 0
    with pytest.raises(UserError, match="speculate"):
        LLM(tmp_path / "not-loaded", speculate=MAX_SPECULATE + 1)   # refused before the model loads


def test_cli_speculate_flag(tmp_path, capsys, monkeypatch):
    model_dir = tiny_model_dir(tmp_path, seed=5)
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat"

    def run(command, *flags, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        rc = cli.main([command, "-m", str(model_dir), "--temp", "0", "-n", "16", "--dtype", "float32", *flags])
        return rc, *capsys.readouterr()

    rc, plain, _ = run("generate", "-p", prompt)
    assert rc == 0
    rc, drafted, err = run("generate", "-p", prompt, "--speculate", "4", "--verbose")
    assert rc == 0 and drafted == plain and "draft tokens kept" in err
    chat = f"{prompt}\nthe mat. the cat sat on the mat\n"
    rc, plain, _ = run("chat", stdin=chat)
    assert rc == 0 and plain.count("\n") == 2
    assert run("chat", "--speculate", "4", stdin=chat)[:2] == (0, plain)
    for bad in ("17", "-1", "x"):
        rc, out, err = run("generate", "-p", prompt, "--speculate", bad)
        assert rc == 2 and out == "" and err.startswith("error: ") and "--speculate" in err
        assert err.count("\n") == 1
