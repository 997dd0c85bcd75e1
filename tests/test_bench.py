"""`lisa-rt bench` and its pieces: decode from a cache taken as prefilled (Engine.add_prefilled),
random adapters of real shapes, the grid with and without LiSA under one KV budget, the JSON it
writes, and the bad inputs. Speeds themselves are never asserted (benchmarks/ reports them)."""
import json

import pytest
import torch

from lisa_rt import SamplingParams, UserError, bench, generate
from lisa_rt.config import ModelConfig
from lisa_rt.engine import Engine, Request
from lisa_rt.kv_cache import KVCache, OutOfBlocks
from lisa_rt.model import load_model_dir
from tests.fixtures import tiny_model_dir
from tests.test_cli import assert_user_error, run  # noqa: F401 (fixture)

pytest.importorskip("transformers")

FAST = ("--steps", 2, "--warmup", 1)
# The tiny model (3 layers, 2 KV heads of dim 16, fp32, blocks of 16) caches 768 B/token, or
# 640 with LiSA on 2 layers at rank 8: 8 blocks of base or 9 of LiSA fit this budget.
BUDGET_GB = 98_304 / 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("bench"), seed=3)


def test_spread_layers_never_takes_layer_0():
    layers = bench.spread_layers(32, 0.6)
    assert len(layers) == 19 and layers[0] == 1 and layers[-1] <= 31
    gaps = {b - a for a, b in zip(layers, layers[1:])}
    assert gaps == {1, 2}  # spread evenly: never two layers apart by more than one
    assert bench.spread_layers(3, 0.67) == [1, 2]
    assert bench.spread_layers(4, 0.99) == [1, 2, 3]
    with pytest.raises(UserError, match="no LiSA layer"):
        bench.spread_layers(3, 0.2)


@pytest.mark.parametrize("shape", sorted(bench.SHAPES))
def test_random_adapters_fit_the_named_shapes(shape):
    config = ModelConfig(**bench.SHAPES[shape])
    adapter = bench.random_adapter(config)
    adapter.validate(config)
    assert len(adapter.config.layers) == int(0.6 * config.num_layers)
    a = adapter.layer(adapter.config.layers[0])["align_a"]
    assert torch.equal(a.sum(0), torch.ones(config.num_heads)) and torch.equal(a.sum(1), a.sum(0))


def test_streamed_weight_bytes_counts_every_layer_and_the_head_once(tiny):
    model = load_model_dir(tiny, device="cpu", lisa=False)
    c = model.config
    per_layer = (2 * c.hidden_size + (c.q_size + 2 * c.kv_size) * c.hidden_size + c.q_size * c.hidden_size
                 + 3 * c.intermediate_size * c.hidden_size)
    assert bench.streamed_weight_bytes(model) == model.embed.element_size() * (
        c.num_layers * per_layer + c.hidden_size + c.vocab_size * c.hidden_size)


def test_a_prefilled_request_decodes_like_a_prefill(tiny):
    """add_prefilled takes the blocks and skips the prefill; once those blocks hold the prompt's
    keys and values, decoding gives exactly the tokens a normal request gives."""
    model = load_model_dir(tiny, device="cpu")
    prompt = model.tokenizer.encode("the attention logits of a block table")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = generate(model, [prompt], params)[0].token_ids
    cache = model.new_cache([len(prompt) + 6])
    engine = Engine(model, cache, max_num_seqs=1)
    req = Request(model, prompt, params, 6)
    engine.add_prefilled(req)
    assert req.computed == len(prompt) - 1 and len(req.table.blocks) == cache.blocks_for(len(prompt))
    model.prefill_logits(prompt[:-1], cache, req.table)  # what the benchmark leaves random
    while engine.has_work():
        engine.step()
    assert req.completion.token_ids == expected


def test_add_prefilled_without_room_changes_nothing(tiny):
    model = load_model_dir(tiny, device="cpu", lisa=False)
    cache = KVCache.for_tokens(model.config, [32], "cpu", torch.float32)
    engine = Engine(model, cache, max_num_seqs=4)
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.add_prefilled(Request(model, [1] * 20, params, 2))
    free = cache.allocator.num_free
    with pytest.raises(OutOfBlocks):
        engine.add_prefilled(Request(model, [1] * 20, params, 2))
    assert cache.allocator.num_free == free and len(engine.running) == 1


def test_bench_grid_budget_and_json(run, tiny, tmp_path):
    out = tmp_path / "bench.json"
    rc, stdout, err = run("bench", tiny, "--lisa-ratio", 0.67, "--batch", "1,3", "--ctx", "8,40",
                          "--kv-budget-gb", BUDGET_GB, "--dtype", "float32", "--json", out, *FAST)
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert result["lisa"]["layers"] == [1, 2] and result["lisa"]["kv_bytes_per_token"] == 640
    assert result["kv_bytes_per_token"] == 768 and result["kv_budget_bytes"] == 98_304
    grid = {(r["variant"], r["batch"], r["context"]): r for r in result["grid"]}
    assert len(grid) == 8
    # 3 sequences of 40 + 4 tokens need 9 blocks: LiSA's budget holds them, the base's does not.
    assert grid["base", 3, 40]["skipped"] == "exceeds the KV budget"
    for key in [("base", 1, 8), ("base", 3, 8), ("base", 1, 40), ("lisa", 3, 40)]:
        row = grid[key]
        assert row["tok_per_s"] > 0 and row["step_ms_mean"] > 0 and row["call_ms_p50"] > 0 and 0 < row["bandwidth_utilisation"]
        assert row["kv_bytes_read"] == key[1] * key[2] * (768 if key[0] == "base" else 640)
    assert {(r["batch"], r["context"]) for r in result["lisa_vs_base"]} == {(1, 8), (3, 8), (1, 40)}
    at_max = {r["variant"]: r["batch"] for r in result["max_batch"]}
    assert at_max == {"base": 2, "lisa": 3}
    assert result["max_batch_lisa_vs_base"][0]["context"] == 40
    assert "LiSA vs base, same batch" in stdout and "exceeds the KV budget" in stdout
    assert "bench: base batch 1 context 8" in err  # progress on stderr, results on stdout


def test_bench_without_an_adapter_measures_the_base_only(run, tiny):
    rc, stdout, err = run("bench", tiny, "--batch", "2", "--ctx", "5", *FAST)
    assert rc == 0, err
    assert "LiSA vs base" not in stdout and "lisa" not in stdout.split("variant", 1)[1]


def test_bench_writes_no_json_when_it_fails(run, tiny, tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("previous results")
    assert_user_error(*run("bench", tiny, "--ctx", 1021, "--json", out, *FAST), "exceeds the model's context")
    assert out.read_text() == "previous results"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.parametrize("argv, fragments", [
    (["--shape", "smollm2", "MODEL"], ["a model or --shape"]),
    (["--shape", "smollm2", "--lisa", "x.safetensors"], ["--lisa PATH needs a model"]),
    (["--shape", "mistral"], ["invalid choice"]),
    (["MODEL", "--ctx", "0"], ["--ctx", ">= 1"]),
    (["MODEL", "--ctx", "a,b"], ["--ctx", "integers"]),
    (["MODEL", "--batch", ","], ["--batch", "no value"]),
    (["MODEL", "--lisa-ratio", "1.5"], ["--lisa-ratio", "(0, 1)"]),
    (["MODEL", "--lisa-ratio", "0.5", "--no-lisa"], ["not allowed with"]),
    (["MODEL", "--lisa-ratio", "0.1", "--ctx", "8"], ["no LiSA layer"]),
    (["MODEL", "--steps", "0"], ["--steps", ">= 1"]),
    (["MODEL", "--kv-budget-gb", "-1"], ["--kv-budget-gb", "> 0"]),
    (["MODEL", "--json", "TMP/a-file/b.json"], ["--json", "a-file is a file, not a directory"]),
    (["MODEL", "--json", "TMP"], ["is a directory"]),
    (["MODEL", "--dtype", "int8"], ["invalid choice"]),
    (["MODEL", "--lisa", "/no/such/adapter", "--ctx", "8"], ["no such LiSA adapter"]),
    (["/no/such/model"], ["no such model"]),
])
def test_bench_bad_input_is_one_error_line(run, tiny, tmp_path, argv, fragments):
    (tmp_path / "a-file").write_text("")
    argv = [str(tiny) if a == "MODEL" else a.replace("TMP", str(tmp_path)) for a in argv]
    assert_user_error(*run("bench", *argv, *FAST), *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_bench_on_cuda_without_a_gpu(run, tiny):
    assert_user_error(*run("bench", tiny, "--device", "cuda", *FAST), "no CUDA GPU")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("graphs,overlap", [(True, True), (True, False), (False, True)],
                         ids=["graphs", "graphs-in-turn", "eager"])
def test_bench_on_cuda(run, tiny, tmp_path, graphs, overlap):
    out = tmp_path / "bench.json"
    rc, _, err = run("bench", tiny, "--device", "cuda", "--lisa-ratio", 0.67, "--batch", "1,3", "--ctx", "8,40",
                     "--kv-budget-gb", BUDGET_GB / 2, "--json", out, *FAST, *([] if graphs else ["--no-graphs"]),
                     *([] if overlap else ["--no-overlap"]))
    assert rc == 0, err
    result = json.loads(out.read_text())  # bf16: half the bytes, the same blocks as above
    assert result["cuda_graphs"] is graphs and result["overlap"] is overlap and {r["variant"]: r["batch"] for r in result["max_batch"]} == {
        "base": 2, "lisa": 3}
