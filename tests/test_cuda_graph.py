"""CUDA-graph decode gives the same tokens as eager decode, and overlapped decode steps the same
as steps taken in turn (needs a CUDA GPU)."""
import pytest
import torch

from lisa_rt.checkpoint import expected_shapes
from lisa_rt.config import LisaConfig, ModelConfig
from lisa_rt.lisa import Adapter, param_shapes, tensor_name
from lisa_rt.engine import Engine, generate, run_to_completion
from lisa_rt.model import Model
from lisa_rt import sampling
from lisa_rt.sampling import SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def random_adapter(config: ModelConfig, layers: list[int]) -> Adapter:
    lisa = LisaConfig(layers=layers, rank=8, align_hidden=8)
    gen = torch.Generator().manual_seed(2)
    return Adapter(lisa, {tensor_name(layer, name): torch.randn(shape, generator=gen) * 0.3
                          for layer in layers for name, shape in param_shapes(config, lisa).items()})


def random_model(dtype: torch.dtype, lisa_layers: list[int] | None = None) -> Model:
    config = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=8, num_kv_heads=2,
                         head_dim=16, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=gen) / (shape[-1] ** 0.5 if len(shape) > 1 else 1.0)
                      if not name.endswith("norm.weight") else torch.ones(shape))
               for name, shape in expected_shapes(config).items()}
    adapter = random_adapter(config, lisa_layers) if lisa_layers else None
    return Model(config, tensors, "cuda", dtype, adapter=adapter)


def prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    # Lengths cross block boundaries; the batch is padded up to a captured size.
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in [1, 15, 16, 17, 40, 3, 77][:count]]


@pytest.mark.parametrize("lisa_layers", [None, [1, 2]], ids=["base", "lisa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 3, 7])
def test_graph_decode_matches_eager(dtype, count, lisa_layers):
    model = random_model(dtype, lisa_layers)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    eager = generate(model, prompts(count), params, cuda_graphs=False)
    graphed = generate(model, prompts(count), params, cuda_graphs=True)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("lisa_layers", [None, [1, 2]], ids=["base", "lisa"])
def test_overlapped_decode_matches_steps_in_turn(lisa_layers, cuda_graphs, monkeypatch):
    # Two candidates: the top_p row is often redrawn on the host after the following step was
    # launched with its first draw, and steps back.
    monkeypatch.setattr(sampling, "CANDIDATES", 2)
    model = random_model(torch.float32, lisa_layers)
    # Different lengths: sequences leave the batch while the next step is already in flight;
    # greedy and seeded sampled rows side by side.
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (40, 7, 23, 1, 31)]
    params[2] = params[2].replace(temperature=0.9, top_k=0, top_p=0.9, min_p=0.0, seed=4)
    params[4] = params[4].replace(temperature=1.1, seed=5)
    # Log probabilities come back with the overlapped steps' tokens (the redrawn row's too).
    params[0], params[2] = params[0].replace(logprobs=3), params[2].replace(logprobs=0)
    batch = prompts(5)
    cache = model.new_cache([len(p) + sp.max_tokens for p, sp in zip(batch, params)])
    engine = Engine(model, cache, max_num_seqs=5, cuda_graphs=cuda_graphs)
    assert engine.overlap  # the default on CUDA
    overlapped = run_to_completion(engine, batch, params)
    assert engine.stats()["overlapped_steps"] > 20 and engine.stats()["rewinds"] > 0
    in_turn = generate(model, batch, params, cuda_graphs=cuda_graphs, overlap=False)
    assert [c.token_ids for c in overlapped] == [c.token_ids for c in in_turn]
    for got, want in zip(overlapped, in_turn):
        assert (got.logprobs is None) == (want.logprobs is None)
        if want.logprobs is not None:
            assert [e.token_id for e in got.logprobs] == [e.token_id for e in want.logprobs]
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
    assert cache.allocator.num_free == cache.num_blocks


def test_graphs_are_reused_and_seeded_sampling_matches():
    model = random_model(torch.float32)
    cache = model.new_cache([200] * 4)
    engine = Engine(model, cache, max_num_seqs=4)
    params = SamplingParams(max_tokens=30, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    first = run_to_completion(engine, prompts(4), params)
    captured = {size: entry[0] for size, entry in engine.graph_decoder.graphs.items()}
    second = run_to_completion(engine, prompts(4), params)
    assert {size: entry[0] for size, entry in engine.graph_decoder.graphs.items()} == captured  # no recapture
    eager = generate(model, prompts(4), params, cuda_graphs=False)
    assert [c.token_ids for c in first] == [c.token_ids for c in second] == [c.token_ids for c in eager]
    assert cache.allocator.num_free == cache.num_blocks


def test_graphs_survive_a_workspace_regrow():
    """A long prefill regrows the model's activation buffers; captured graphs must stay valid."""
    model = random_model(torch.float32)
    cache = model.new_cache([400] * 2)
    engine = Engine(model, cache, max_num_seqs=2)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    run_to_completion(engine, prompts(2), params)  # captures with the first workspace
    long_prompts = [prompts(7)[6] * 4, prompts(2)[1]]  # 308 tokens: the workspace grows
    graphed = run_to_completion(engine, long_prompts, params)
    eager = generate(model, long_prompts, params, cuda_graphs=False)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]


@pytest.mark.parametrize("lisa_layers", [None, [1, 2]], ids=["base", "lisa"])
def test_prefix_cached_blocks_decode_as_computed_ones(lisa_layers):
    """Follow-ups that resend a first round's prompts and answers find them in the prefix cache
    (graphs and overlapped steps on, as by default) and decode what a fresh prefill decodes."""
    model = random_model(torch.float32, lisa_layers)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine = Engine(model, model.new_cache([300] * 4), max_num_seqs=4)
    first = run_to_completion(engine, prompts(4), params)
    follow_ups = [p + c.token_ids + [7, 8, 9] for p, c in zip(prompts(4), first)]
    again = run_to_completion(engine, follow_ups, params)
    assert [c.cached_tokens for c in again] == [(len(p) - 1) // 16 * 16 for p in follow_ups]
    fresh = [generate(model, [p], params, cuda_graphs=False)[0].token_ids for p in follow_ups]
    assert [c.token_ids for c in again] == fresh
    assert engine.cache.allocator.num_free == engine.cache.num_blocks
