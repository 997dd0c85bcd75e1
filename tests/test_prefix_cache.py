"""Prefix caching: the allocator's bookkeeping of shared and cached blocks, and the engine reusing
them (a repeated prompt, a shared beginning, generated tokens, preemption, overlapped steps with
redrawn rows, a LiSA model) with the same tokens as computing everything again.
"""
import random

import pytest

import lisa_rt
from lisa_rt import SamplingParams, generate
from lisa_rt.engine import Engine, Request, run_to_completion
from lisa_rt.kv_cache import NO_MATCH, ROOT, BlockAllocator, BlockTable, KVCache, OutOfBlocks
from lisa_rt import sampling
from tests.fixtures import CORPUS, tiny_float32_model, tiny_model_dir, tiny_model_with_adapter

pytest.importorskip("transformers")

SIZE = 4  # block size in the allocator's own tests


def tokens_of(seq):
    return lambda lo, hi: seq[lo:hi]


def registered(alloc, seq, blocks):
    """Registers seq's whole blocks, held in `blocks`, as a table does; returns the last node."""
    node = ROOT
    for k, block in enumerate(blocks):
        node = alloc.register(node, tuple(seq[k * SIZE : (k + 1) * SIZE]), block)
    return node


# --- the allocator ----------------------------------------------------------------------------

def test_a_released_prefix_is_found_again_and_counts_as_free():
    alloc = BlockAllocator(6)
    seq = list(range(10))
    blocks = alloc.allocate(3)
    registered(alloc, seq, blocks[:2])           # the third block is partly filled: never offered
    assert alloc.match(tokens_of(seq), 10, SIZE).blocks == blocks[:2]  # in use, already shared
    alloc.free(blocks)
    assert alloc.num_free == 6 and alloc.num_cached == 2
    match = alloc.match(tokens_of(seq), 10, SIZE)
    assert match.blocks == blocks[:2] and match.tokens == 8 and match.idle == 2
    alloc.share(match.blocks)
    assert alloc.num_free == 4 and alloc.num_cached == 0
    assert alloc.match(tokens_of(seq), 10, SIZE).idle == 0


def test_a_match_is_exact_and_stops_at_the_first_difference():
    alloc = BlockAllocator(4)
    seq = list(range(12))
    blocks = alloc.allocate(3)
    registered(alloc, seq, blocks)
    assert alloc.match(tokens_of(seq[:4] + [99] + seq[5:]), 12, SIZE).blocks == blocks[:1]
    assert alloc.match(tokens_of([99] + seq[1:]), 12, SIZE) == NO_MATCH
    # The same tokens after another prefix are another block.
    assert alloc.match(tokens_of(seq[4:8]), 4, SIZE) == NO_MATCH
    assert alloc.match(tokens_of(seq), 7, SIZE).blocks == blocks[:1]  # whole blocks only


def test_allocation_takes_uncached_blocks_first_then_the_longest_released_tail_first():
    alloc = BlockAllocator(5)
    first, second = list(range(100, 108)), list(range(200, 208))
    a = alloc.allocate(2)
    registered(alloc, first, a)
    b = alloc.allocate(2)
    registered(alloc, second, b)
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_cached == 4
    assert alloc.allocate(1) not in (a, b)             # the never-used block goes first
    # Then the block released longest ago, a sequence's last block before its first.
    assert alloc.allocate(1) == [a[1]]
    assert alloc.match(tokens_of(first), 8, SIZE).blocks == a[:1]
    assert alloc.allocate(1) == [a[0]]
    assert alloc.match(tokens_of(first), 8, SIZE) == NO_MATCH
    assert alloc.match(tokens_of(second), 8, SIZE).blocks == b
    with pytest.raises(OutOfBlocks):
        alloc.allocate(3)
    assert alloc.num_free == 2  # a failed allocation changes nothing


def test_a_block_whose_parent_was_evicted_is_never_matched():
    alloc = BlockAllocator(3)
    seq = list(range(8))
    blocks = alloc.allocate(3)
    registered(alloc, seq, blocks[:2])
    for block in blocks:                               # the first block is the oldest release
        alloc.free([block])
    fresh_block, evicted = alloc.allocate(2)           # the uncached block, then the oldest
    assert evicted == blocks[0] and alloc.num_cached == 1
    assert alloc.match(tokens_of(seq), 8, SIZE) == NO_MATCH
    # The first block computed again is a new prefix node: the cached orphan stays unfound.
    registered(alloc, seq, [fresh_block])
    assert alloc.match(tokens_of(seq), 8, SIZE).blocks == [fresh_block]


def test_a_prefix_registered_twice_keeps_the_first_copy():
    alloc = BlockAllocator(4)
    seq = list(range(8))
    a, b = alloc.allocate(2), alloc.allocate(2)
    node_a = registered(alloc, seq, a)
    assert registered(alloc, seq, b) == node_a         # b's chain names the same prefix
    alloc.free(b)
    assert alloc.num_cached == 0 and alloc.num_free == 2  # b was never the cached copy
    assert alloc.match(tokens_of(seq), 8, SIZE).blocks == a


def test_a_table_adopts_a_match_and_registers_only_whole_final_blocks(model):
    cache = KVCache(model.config, 8, "cpu", model.dtype, block_size=SIZE)
    seq = list(range(14))
    table = BlockTable(cache)
    table.ensure(14)
    table.register(tokens_of(seq), 11)                 # blocks 0 and 1 are whole and final
    assert table.registered == 2
    table.register(tokens_of(seq), 11)                 # idempotent
    assert cache.allocator.match(tokens_of(seq), 14, SIZE).blocks == table.blocks[:2]
    other = BlockTable(cache)
    other.adopt(cache.match(tokens_of(seq[:9] + [50, 51]), 11))
    assert other.blocks == table.blocks[:2] and other.registered == 2
    other.ensure(11)
    table.release()
    other.release()
    assert cache.allocator.num_free == 8 and cache.allocator.num_cached == 2
    unshared = BlockTable(cache, shareable=False)
    unshared.ensure(8)
    unshared.register(tokens_of(seq), 8)
    assert unshared.registered == 0


# --- the engine -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # float32, so that reused keys and values give the very tokens a fresh prefill gives.
    return tiny_float32_model(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def ids(model):
    return model.tokenizer.encode(CORPUS[:3000])


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def fresh(model, prompts, params=GREEDY):
    """Each prompt alone, nothing cached (params: one for all, or one per prompt)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    return [generate(model, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]


def engine_for(model, blocks, block_size=16, **kw):
    return Engine(model, KVCache(model.config, blocks, "cpu", model.dtype, block_size=block_size), **kw)


def test_a_repeated_prompt_reuses_its_whole_blocks_and_generates_the_same(model, ids):
    engine = engine_for(model, 64)
    first = run_to_completion(engine, [ids[:37]], GREEDY)[0]
    second = run_to_completion(engine, [ids[:37]], GREEDY)[0]
    assert first.cached_tokens == 0 and second.cached_tokens == 32
    assert second.token_ids == first.token_ids == fresh(model, [ids[:37]])[0]
    stats = engine.stats()
    assert stats["admitted_tokens"] == 74 and stats["cached_tokens"] == 32
    # A prompt of whole blocks keeps its last token to compute: one block less is reused.
    run_to_completion(engine, [ids[:32]], GREEDY)
    assert run_to_completion(engine, [ids[:32]], GREEDY)[0].cached_tokens == 16
    assert engine.cache.allocator.num_free == 64


def test_a_shared_beginning_is_reused_while_its_first_sequence_still_runs(model, ids):
    engine = engine_for(model, 64)
    a = Request(model, ids[:40], GREEDY.replace(max_tokens=20), 20)
    engine.add(a)
    engine.step()
    b = Request(model, ids[:35] + ids[500:510], GREEDY, 12)
    engine.add(b)
    engine.step()
    assert b.cached_tokens == 32 and b.table.blocks[:2] == a.table.blocks[:2]
    while engine.has_work():
        engine.step()
    assert [a.completion.token_ids, b.completion.token_ids] == \
        fresh(model, [ids[:40], ids[:35] + ids[500:510]], [GREEDY.replace(max_tokens=20), GREEDY])
    assert engine.cache.allocator.num_free == 64


def test_prompts_arriving_together_prefill_their_shared_blocks_once(model, ids):
    # Three copies of a prompt (n choices) and a fourth sharing its first two blocks, submitted
    # at once under a small step budget: the first computes the shared blocks, chunk by chunk;
    # the others wait for each and take it, and only compute what is theirs.
    engine = engine_for(model, 64, max_batch_tokens=20)
    prompt = ids[:70]
    prompts = [prompt, prompt, prompt, prompt[:35] + ids[500:520]]
    params = [GREEDY, GREEDY.replace(temperature=0.8, seed=1), GREEDY.replace(temperature=0.8, seed=2), GREEDY]
    done = run_to_completion(engine, prompts, params)
    assert [c.cached_tokens for c in done] == [0, 64, 64, 32]
    stats = engine.stats()
    assert stats["deferrals"] > 0 and stats["cached_tokens"] == 160
    assert [c.token_ids for c in done] == fresh(model, prompts, params)
    assert engine.cache.allocator.num_free == 64
    # Off, each computes its own copy.
    off = engine_for(model, 64, max_batch_tokens=20, prefix_caching=False)
    assert [c.cached_tokens for c in run_to_completion(off, prompts, params)] == [0, 0, 0, 0]
    assert off.stats()["deferrals"] == 0


@pytest.mark.parametrize("blocks, max_num_seqs", [(12, 256), (64, 2)], ids=["blocks", "sequence slots"])
def test_a_request_waiting_for_shared_blocks_keeps_its_place(model, ids, blocks, max_num_seqs):
    # A computes the prompt R shares; Z came after R. R waits one step and is admitted before Z,
    # whose longer run must not take R's blocks or slot in between.
    engine = engine_for(model, blocks, max_batch_tokens=256, max_num_seqs=max_num_seqs)
    greedy = GREEDY.replace(max_tokens=40 if blocks == 12 else 10)
    a, r = Request(model, ids[:70], greedy, greedy.max_tokens), Request(model, ids[:70], greedy, greedy.max_tokens)
    z = Request(model, ids[1000:1100], greedy.replace(max_tokens=200), 200)
    for req in (a, r, z):
        engine.add(req)
    admitted = {}
    for step in range(1, 1000):
        engine.step()
        admitted.update({name: step for name, req in (("a", a), ("r", r), ("z", z))
                         if req.t_admit is not None and name not in admitted})
        if not engine.has_work():
            break
    assert admitted["a"] == 1 and admitted["r"] == 2 and admitted["z"] >= 2
    assert r.cached_tokens == 64 and engine.stats()["deferrals"] == 1
    assert r.completion.token_ids == a.completion.token_ids
    assert engine.cache.allocator.num_free == blocks


def test_generated_tokens_are_cached_for_the_next_turn(model, ids):
    engine = engine_for(model, 64)
    turn = run_to_completion(engine, [ids[:20]], GREEDY.replace(max_tokens=30))[0]
    follow_up = ids[:20] + turn.token_ids + ids[900:905]
    again = run_to_completion(engine, [follow_up], GREEDY)[0]
    # The first turn's 50 tokens less its last, whose keys were never computed: 3 whole blocks.
    assert again.cached_tokens == 48
    assert again.token_ids == fresh(model, [follow_up])[0]


def test_prefix_caching_off_reuses_nothing(model, ids):
    engine = engine_for(model, 64, prefix_caching=False)
    run_to_completion(engine, [ids[:37]], GREEDY)
    assert run_to_completion(engine, [ids[:37]], GREEDY)[0].cached_tokens == 0
    assert engine.cache.allocator.num_cached == 0


def test_a_busy_small_cache_with_shared_prefixes_preempts_and_still_matches(model, ids):
    rng = random.Random(0)
    system = ids[:24]
    prompts = [system + ids[100 + 13 * i : 100 + 13 * i + rng.randint(1, 20)] for i in range(10)]
    prompts += [ids[:40], ids[:40]]
    params = [GREEDY.replace(max_tokens=rng.randint(5, 25)) for _ in prompts]
    engine = engine_for(model, 9, max_batch_tokens=24)   # 144 tokens for 12 sequences
    requests = [Request(model, p, sp, sp.max_tokens) for p, sp in zip(prompts, params)]
    for i, req in enumerate(requests):
        engine.add(req)
        if i % 3 == 2:
            engine.step()
    while engine.has_work():
        engine.step()
    assert engine.preemptions > 0 and engine.cached_tokens > 0
    assert [r.completion.token_ids for r in requests] == fresh(model, prompts, params)
    assert engine.cache.allocator.num_free == 9


def test_overlapped_steps_with_redrawn_rows_cache_only_final_blocks(model, ids, monkeypatch):
    # A redrawn row steps back and writes its last slot again (see test_engine): no block
    # offered for sharing may hold that slot, the one of the last token a sequence kept.
    monkeypatch.setattr(sampling, "CANDIDATES", 2)
    params = [SamplingParams(max_tokens=40, temperature=1.0, top_k=0, top_p=p, min_p=0.0, seed=seed,
                             ignore_eos=True) for p, seed in ((0.9, 1), (0.5, 2), (0.95, 3))]
    prompts = [ids[:5], ids[300:309], ids[600:617]]
    # Blocks of 2 tokens: every other token ends a block.
    engine = engine_for(model, 512, block_size=2, overlap=True)
    requests = [Request(model, p, sp, sp.max_tokens) for p, sp in zip(prompts, params)]
    for req in requests:
        engine.add(req)
    while engine.has_work():
        engine.step()
        for req in engine.running:
            assert req.table.registered * 2 <= req.length - 1
    assert engine.rewinds > 3
    follow_ups = [p + r.completion.token_ids + [ids[7]] for p, r in zip(prompts, requests)]
    again = run_to_completion(engine, follow_ups, GREEDY)
    assert [c.cached_tokens for c in again] == [len(p) - 2 for p in follow_ups]
    assert [c.token_ids for c in again] == fresh(model, follow_ups)


def test_bench_prefilled_sequences_offer_nothing(model, ids):
    engine = engine_for(model, 16)
    req = Request(model, ids[:40], GREEDY, 4)
    engine.add_prefilled(req)
    while engine.has_work():
        engine.step()
    assert engine.cache.allocator.num_cached == 0


def test_a_lisa_model_reuses_its_rank_r_keys(tmp_path):
    directory, adapter = tiny_model_with_adapter(tmp_path)
    lisa_model = lisa_rt.load_model(directory, device="cpu", dtype="float32", lisa=adapter)
    assert lisa_model.lisa is not None
    prompt = lisa_model.tokenizer.encode(CORPUS[:600])[:45]
    engine = Engine(lisa_model, lisa_model.new_cache([200]))
    run_to_completion(engine, [prompt], GREEDY)
    follow_up = prompt[:40] + prompt[5:12]
    again = run_to_completion(engine, [follow_up], GREEDY)[0]
    assert again.cached_tokens == 32
    assert again.token_ids == generate(lisa_model, [follow_up], GREEDY)[0].token_ids


def test_the_benchmark_script_compares_both_ways(tmp_path):
    import json
    from pathlib import Path

    from tests.fixtures import run_script

    directory = tiny_model_dir(tmp_path / "model", seed=5)
    out = tmp_path / "prefix.json"
    result = run_script(Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_cache.py", "-m", directory,
                        "--dtype", "float32", "--system-tokens", 80, "--questions", 3, "--turns", 3,
                        "--choices", 3, "--reply-tokens", 6, "--json", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    cached = {(r["workload"], r["prefix cache"]): r["cached tok (mean)"] for r in record["rows"]}
    assert cached[("shared system prompt", "on")] > 0 and cached[("multi-turn chat", "on")] > 0
    assert cached[("n choices at once", "on")] > 0  # the later choices waited for the first's blocks
    assert cached[("shared system prompt", "off")] == cached[("multi-turn chat", "off")] == 0
    assert cached[("n choices at once", "off")] == 0
    assert record["identical_answers"] == record["requests"] == 9
    assert "without / with the prefix cache" in result.stdout
