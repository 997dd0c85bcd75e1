"""LiSA in the decoder: the runtime against the dense reference, direct sharing, prefill/decode
consistency, the smaller KV cache, the adapter file, and the fitter, on a tiny random model
(3 layers, GQA 6/2, head dim 16)."""
import json
import math

import pytest
import torch

from lisa_rt import SamplingParams, generate, reference
from lisa_rt.checkpoint import load_config, load_tensors
from lisa_rt.config import LisaConfig
from lisa_rt.errors import UserError
from lisa_rt.fit import DenseModel, FitOptions, Fitter, attention_kl, make_sequences
from lisa_rt.kv_cache import BlockTable
from lisa_rt.lisa import (ADAPTER_FILE, Adapter, AdapterError, LisaLayer, find_adapter, install_adapter,
                          load_adapter, param_shapes, save_adapter, tensor_name, widen_rank)
from lisa_rt.model import Model, build_batch, load_model_dir
from tests.fixtures import CORPUS, tiny_model_dir

pytest.importorskip("transformers")

IDS = list(range(3, 3 + 53))  # crosses three 16-token blocks, odd length


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tiny_model_dir(tmp_path_factory.mktemp("lisa-model"))
    config = load_config(directory)
    return directory, config, load_tensors(directory, config)


def random_adapter(config, layers, rank=4, align_hidden=5, seed=0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    lisa = LisaConfig(layers=layers, rank=rank, align_hidden=align_hidden)
    tensors = {tensor_name(layer, name): torch.randn(shape, generator=g) * 0.4
               for layer in layers for name, shape in param_shapes(config, lisa).items()}
    return Adapter(lisa, tensors)


def sharing_adapter(config, layers, permutations) -> Adapter:
    """A = a head permutation, W2 = b2 = 0, Wk' = 0 (W1, b1, Wq' random: they must not matter)."""
    adapter = random_adapter(config, layers)
    for layer, perm in zip(layers, permutations):
        h = config.num_heads
        a = torch.zeros(h, h)
        a[torch.arange(h), torch.tensor(perm)] = 1.0
        adapter.tensors[tensor_name(layer, "align_a")] = a
        for name in ("align_w2", "align_b2", "k_proj"):
            adapter.tensors[tensor_name(layer, name)].zero_()
    return adapter


def direct_sharing_logits(config, t, ids, shared: dict[int, list[int]]) -> torch.Tensor:
    """An independent dense model where layer l in `shared` uses softmax of layer l-1's logits
    with heads rearranged by shared[l] (no aligner, no delta): what LiSA must reduce to."""
    t = {k: v.float() for k, v in t.items()}
    n, h, g, d = len(ids), config.num_heads, config.num_kv_heads, config.head_dim
    cache = reference.rope_cos_sin_cache(d, n, config.rope_theta, config.rope_scaling)
    pos = torch.arange(n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x = t["embed.weight"][torch.tensor(ids)]
    logits = None
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        hn = reference.rms_norm(x, t[p + "attn_norm.weight"], config.rms_norm_eps)
        v = (hn @ t[p + "attn.v_proj.weight"].T).view(n, g, d).repeat_interleave(h // g, dim=1)
        if layer in shared:
            logits = logits[torch.tensor(shared[layer])]
        else:
            q = reference.rotary_embedding(pos, (hn @ t[p + "attn.q_proj.weight"].T).view(n, h, d), cache)
            k = reference.rotary_embedding(pos, (hn @ t[p + "attn.k_proj.weight"].T).view(n, g, d), cache)
            k = k.repeat_interleave(h // g, dim=1)
            logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1) @ t[p + "attn.o_proj.weight"].T
        hn = reference.rms_norm(x, t[p + "mlp_norm.weight"], config.rms_norm_eps)
        act = torch.nn.functional.silu(hn @ t[p + "mlp.gate_proj.weight"].T) * (hn @ t[p + "mlp.up_proj.weight"].T)
        x = x + act @ t[p + "mlp.down_proj.weight"].T
    x = reference.rms_norm(x, t["norm.weight"], config.rms_norm_eps)
    return x @ t["lm_head.weight"].T


@pytest.mark.parametrize("layers", [[1, 2], [2], [1]], ids=["chain", "last", "first"])
def test_runtime_matches_reference(tiny, layers):
    _, config, t = tiny
    adapter = random_adapter(config, layers)
    model = Model(config, t, "cpu", torch.float32, adapter=adapter)
    got = model.logits(IDS)
    want = reference.llama_forward(config, t, IDS, adapter=adapter)
    assert (got - want).abs().max() < 1e-3


@pytest.mark.parametrize("layers", [[], [1, 2], [2], [1]], ids=["base", "chain", "last", "first"])
def test_the_fitters_dense_model_matches_the_reference(tiny, layers):
    """What fitting trains is what the runtime runs: full layers whose logits no LiSA layer reads
    take the fused-attention path there, the others the explicit logits."""
    _, config, t = tiny
    adapter = random_adapter(config, layers) if layers else None
    dense = DenseModel(config, t, torch.device("cpu"))
    modules = {layer: LisaLayer(adapter.layer(layer)) for layer in layers}
    ids = torch.tensor([IDS, IDS[::-1]])
    got = dense.forward(ids, modules, rank=4)
    for row in range(2):
        want = reference.llama_forward(config, t, ids[row].tolist(), adapter=adapter)
        assert (got[row] - want).abs().max() < 1e-3


def test_attention_term_on_strided_rows_is_the_mean_over_those_rows():
    """The end-to-end phase estimates the attention term on every 8th query row: the estimate
    is exactly the mean KL over those rows, and over all rows without a stride."""
    g = torch.Generator().manual_seed(0)
    n = 19
    target, logits = torch.randn(2, 3, n, n, generator=g), torch.randn(2, 3, n, n, generator=g)
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    p = torch.softmax(target.masked_fill(~visible, -math.inf), -1)
    log_q = torch.log_softmax(logits.masked_fill(~visible, -math.inf), -1)
    per_row = torch.where(visible, p * (p.log() - log_q), 0.0).sum(-1)  # [2, 3, n]
    torch.testing.assert_close(attention_kl(target, logits), per_row.mean())
    for rows in (slice(3, None, 8), slice(0, None, 8), slice(7, None, 8)):
        torch.testing.assert_close(attention_kl(target[:, :, rows], logits[:, :, rows], rows), per_row[:, :, rows].mean())


def test_identity_adapter_is_exact_direct_sharing(tiny):
    _, config, t = tiny
    perms = {1: [2, 0, 1, 5, 4, 3], 2: [0, 1, 2, 3, 4, 5]}
    model = Model(config, t, "cpu", torch.float32, adapter=sharing_adapter(config, [1, 2], list(perms.values())))
    want = direct_sharing_logits(config, t, IDS, perms)
    assert (model.logits(IDS) - want).abs().max() < 1e-4
    # and it is not the base model: sharing changes the result
    base = Model(config, t, "cpu", torch.float32)
    assert (base.logits(IDS) - want).abs().max() > 1e-2


@pytest.mark.parametrize("layers", [[1, 2], [2]])
def test_prefill_then_decode_equals_one_prefill(tiny, layers):
    _, config, t = tiny
    model = Model(config, t, "cpu", torch.float32, adapter=random_adapter(config, layers, seed=3))
    whole = model.logits(IDS)
    cache = model.new_cache([len(IDS)])
    table = BlockTable(cache)
    table.ensure(len(IDS))
    split = 21
    got = [model.forward(build_batch([(IDS[:split], 0, table)], model.device, [split]), cache)]
    for pos in range(split, len(IDS)):  # then one token at a time, as decode
        got.append(model.forward(build_batch([([IDS[pos]], pos, table)], model.device), cache))
    assert (torch.cat(got) - whole).abs().max() < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("layers", [[1, 2], [2]])
def test_cuda_matches_cpu(tiny, layers):
    _, config, t = tiny
    adapter = random_adapter(config, layers, rank=8)
    cpu = Model(config, t, "cpu", torch.float32, adapter=adapter)
    gpu = Model(config, t, "cuda", torch.float32, adapter=adapter)
    assert (gpu.logits(IDS).cpu() - cpu.logits(IDS)).abs().max() < 1e-3
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert generate(gpu, [IDS[:9]], params)[0].token_ids == generate(cpu, [IDS[:9]], params)[0].token_ids


def test_batched_generation_equals_each_alone(tiny):
    _, config, t = tiny
    model = Model(config, t, "cpu", torch.float32, adapter=random_adapter(config, [1, 2], seed=5))
    prompts = [IDS[:5], IDS[:31], IDS[7:24]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = [c.token_ids for c in generate(model, prompts, params)]
    alone = [generate(model, [p], params)[0].token_ids for p in prompts]
    assert together == alone


def test_lisa_layers_cache_low_rank_keys(tiny):
    _, config, t = tiny
    adapter = random_adapter(config, [1, 2], rank=4)
    model = Model(config, t, "cpu", torch.float32, adapter=adapter)
    cache = model.new_cache([40])
    assert cache.key_pools[0].shape[-1] == config.head_dim
    assert [pool.shape[-1] for pool in cache.key_pools[1:]] == [4, 4]
    assert all(pool.shape[-1] == config.head_dim for pool in cache.value_pools)
    full = config.kv_bytes_per_token(4)
    assert full == 2 * 3 * config.num_kv_heads * config.head_dim * 4
    assert model.kv_bytes_per_token() == full - 2 * config.num_kv_heads * (config.head_dim - 4) * 4
    actual = sum(p.numel() * p.element_size() for p in cache.key_pools + cache.value_pools)
    assert actual == model.kv_bytes_per_token() * cache.num_blocks * cache.block_size


# --- the adapter file ---

def test_adapter_round_trip_and_default(tiny, tmp_path):
    directory, config, t = tiny
    adapter = random_adapter(config, [2])
    path = save_adapter(tmp_path / "a.safetensors", adapter, config)
    loaded = load_adapter(path, config)
    assert loaded.config.layers == [2] and loaded.config.formulation == "lisa-rt/1"
    assert all(torch.equal(loaded.tensors[k], v) for k, v in adapter.tensors.items())
    assert find_adapter(directory, config, None) is None  # the base model has none of its own
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in directory.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    install_adapter(model_dir, adapter, config)
    assert json.loads((model_dir / "config.json").read_text())["lisa"]["layers"] == [2]
    assert load_model_dir(model_dir).lisa.layers == [2]
    assert load_model_dir(model_dir, lisa=False).lisa is None
    assert load_model_dir(model_dir, lisa=path).lisa.layers == [2]


def test_bundled_adapter_is_upgraded_but_a_fitted_one_is_kept(tiny, tmp_path):
    from lisa_rt.registry import install_bundled_adapter

    directory, config, _ = tiny
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in directory.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    bundled = save_adapter(tmp_path / "shipped.safetensors", random_adapter(config, [2]), config)
    install_bundled_adapter(model_dir, bundled)
    first = json.loads((model_dir / "config.json").read_text())["lisa"]
    assert first["layers"] == [2] and first["fit"]["shipped"].startswith("shipped.safetensors@")
    stamp = (model_dir / ADAPTER_FILE).stat().st_mtime_ns
    install_bundled_adapter(model_dir, bundled)  # the same shipped file: nothing is rewritten
    assert (model_dir / ADAPTER_FILE).stat().st_mtime_ns == stamp
    save_adapter(bundled, random_adapter(config, [1, 2], seed=1), config)  # a newer lisa-rt ships another
    install_bundled_adapter(model_dir, bundled)
    assert load_model_dir(model_dir).lisa.layers == [1, 2]
    install_adapter(model_dir, random_adapter(config, [1], seed=2), config)  # the user's own fit
    save_adapter(bundled, random_adapter(config, [2], seed=3), config)
    install_bundled_adapter(model_dir, bundled)
    assert load_model_dir(model_dir).lisa.layers == [1]


def _write_adapter(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("break_it,message", [
    (lambda t, m: t.pop("layers.2.lisa.k_proj"), "'layers.2.lisa.k_proj' is missing"),
    (lambda t, m: t.__setitem__("layers.2.lisa.align_a", torch.zeros(5, 5)), "has shape (5, 5)"),
    (lambda t, m: t.__setitem__("layers.2.lisa.align_b1", torch.zeros(5, dtype=torch.float16)), "dtype"),
    (lambda t, m: t.__setitem__("layers.2.lisa.align_b2", torch.full((6,), float("nan"))), "NaN"),
    (lambda t, m: t.__setitem__("layers.1.lisa.extra", torch.zeros(1)), "unexpected tensor"),
    (lambda t, m: m.pop("lisa"), "not a LiSA adapter"),
    (lambda t, m: m.__setitem__("lisa", "{not json"), "invalid 'lisa' metadata"),
    (lambda t, m: m.__setitem__("lisa", json.dumps({"layers": [0], "rank": 4, "align_hidden": 5})), "layer 0"),
    (lambda t, m: m.__setitem__("lisa", json.dumps({"layers": [2], "rank": 3, "align_hidden": 5})), "even"),
    (lambda t, m: m.__setitem__("lisa", json.dumps({"layers": [2], "rank": 4, "align_hidden": 5,
                                                    "formulation": "other/2"})), "formulation"),
    (lambda t, m: m.__setitem__("lisa", json.dumps({"layers": [2], "rank": 4})), "align_hidden"),
    # wider than fit makes them, or than the LiSA kernels take (checked before the tensors' shapes)
    (lambda t, m: m.__setitem__("lisa", json.dumps({"layers": [2], "rank": 18, "align_hidden": 5})),
     "rank 18 is more than the model's head dim 16"),
    (lambda t, m: m.__setitem__("lisa", json.dumps({"layers": [2], "rank": 4, "align_hidden": 257})),
     "align_hidden 257 is more than 256"),
    (lambda t, m: m.__setitem__("lisa", json.dumps({"layers": [2], "rank": 4, "align_hidden": 5, "quality": [1.5]})),
     "quality must be a JSON object"),
])
def test_bad_adapter_files_are_refused(tiny, tmp_path, break_it, message):
    _, config, _ = tiny
    adapter = random_adapter(config, [2])
    tensors = dict(adapter.tensors)
    metadata = {"lisa": json.dumps(adapter.config.to_dict())}
    break_it(tensors, metadata)
    path = tmp_path / ADAPTER_FILE
    _write_adapter(path, tensors, metadata)
    with pytest.raises(AdapterError, match=None) as info:
        load_adapter(path, config)
    assert message in str(info.value) and str(path) in str(info.value)


def test_adapter_bounds_mirror_the_kernels(tiny):
    """LisaConfig takes what the LiSA kernels take (csrc/checks.h: kMaxLisaRank, kMaxLisaWidth)
    and a rank of at most the head dim, as fit does; at the bounds it is accepted."""
    import dataclasses

    from lisa_rt.config import ConfigError, MAX_ALIGN_HIDDEN, MAX_RANK

    _, config, _ = tiny
    LisaConfig(layers=[1], rank=config.head_dim, align_hidden=MAX_ALIGN_HIDDEN).validate(config)
    wide_heads = dataclasses.replace(config, head_dim=2 * MAX_RANK)  # a CPU model may have such heads
    LisaConfig(layers=[1], rank=MAX_RANK, align_hidden=4).validate(wide_heads)
    with pytest.raises(ConfigError, match=f"rank {MAX_RANK + 2} is more than {MAX_RANK}, the widest delta"):
        LisaConfig(layers=[1], rank=MAX_RANK + 2, align_hidden=4).validate(wide_heads)
    with pytest.raises(ConfigError, match="rank 32 is more than the model's head dim 16"):
        LisaConfig(layers=[1], rank=32, align_hidden=4).validate(config)
    # widening past the head dim (the library call; fit --init --rank refuses it first) is refused too
    with pytest.raises(UserError, match="head dim 16"):
        widen_rank(random_adapter(config, [1], rank=4), config, 32, torch.Generator())


def test_adapter_records_are_strict_json():
    """Non-finite numbers of an adapter's records are null beside a note, as often as it is done."""
    from lisa_rt.config import finite_or_note, strict_json

    lisa = LisaConfig(layers=[1], rank=4, align_hidden=4, fit={"init": {"x": math.inf}},
                      quality={"base_ppl": 3.0, "lisa_ppl": math.inf, "ppl_ratio": math.nan, "held_out_kl": -math.inf})
    record = lisa.to_dict()
    json.dumps(record, allow_nan=False)  # strict
    assert record["quality"] == {"base_ppl": 3.0, "lisa_ppl": None,
                                 "lisa_ppl_note": "inf: the mean negative log-likelihood is past float64's range",
                                 "ppl_ratio": None,
                                 "ppl_ratio_note": "nan: lisa_ppl or base_ppl is NaN, or both are inf",
                                 "held_out_kl": None, "held_out_kl_note": record["quality"]["held_out_kl_note"]}
    assert record["quality"]["held_out_kl_note"].startswith("-inf: ")
    assert record["fit"] == {"init": {"x": None, "x_note": "inf: past float64's range"}}
    assert strict_json(record) == record and strict_json([1.0, math.nan]) == [1.0, None]
    assert finite_or_note("ppl", 2.5) == {"ppl": 2.5} and finite_or_note("n", 3) == {"n": 3}


def test_unreadable_adapter_files(tiny, tmp_path):
    _, config, _ = tiny
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not safetensors")
    with pytest.raises(AdapterError, match="unreadable"):
        load_adapter(garbage, config)
    with pytest.raises(AdapterError, match="no such LiSA adapter"):
        load_adapter(tmp_path / "missing.safetensors", config)


# --- fitting ---

def _fit(config, t, tokenizer, device="cpu", **kw):
    sequences, _, _ = make_sequences(tokenizer, [CORPUS], 64, 12)
    options = FitOptions(seq_len=64, batch_size=2, progress=False, **kw)
    return Fitter(config, t, sequences, options, device).run()


def test_fit_lowers_the_loss_and_starts_as_matched_sharing(tiny):
    directory, config, t = tiny
    tokenizer = load_model_dir(directory).tokenizer
    start = _fit(config, t, tokenizer, layers=[1, 2], steps=0, layerwise_steps=0)
    # step 0: A one-hot at the matched heads, W2 = b2 = 0, Wk' = 0
    for layer in (1, 2):
        a = start.adapter.tensors[tensor_name(layer, "align_a")]
        assert torch.equal(a.sum(1), torch.ones(config.num_heads)) and set(a.unique().tolist()) == {0.0, 1.0}
        matching = next(row["matching"] for row in start.selection if row["layer"] == layer)
        assert a.argmax(1).tolist() == matching
        for name in ("align_w2", "align_b2", "k_proj"):
            assert not start.adapter.tensors[tensor_name(layer, name)].any()
    layerwise = _fit(config, t, tokenizer, layers=[1, 2], steps=0, layerwise_steps=30, lr=5e-3)
    assert layerwise.quality["train_kl"] < 0.7 * start.quality["train_kl"]
    fitted = _fit(config, t, tokenizer, layers=[1, 2], steps=30, layerwise_steps=30, lr=5e-3)
    assert len(fitted.losses["end_to_end"]) == 30
    assert fitted.quality["train_kl"] < 0.9 * layerwise.quality["train_kl"]  # end to end goes further
    # deterministic for a seed
    again = _fit(config, t, tokenizer, layers=[1, 2], steps=30, layerwise_steps=30, lr=5e-3)
    assert all(torch.equal(again.adapter.tensors[k], v) for k, v in fitted.adapter.tensors.items())


def test_fit_selects_by_ratio_and_min_layer(tiny):
    directory, config, t = tiny
    tokenizer = load_model_dir(directory).tokenizer
    by_jsd = _fit(config, t, tokenizer, ratio=0.34, select="jsd", steps=0, layerwise_steps=0)
    assert len(by_jsd.adapter.config.layers) == 1
    best = min(by_jsd.selection, key=lambda row: row["jsd_matched"])["layer"]
    assert by_jsd.adapter.config.layers == [best]
    assert [row["layer"] for row in by_jsd.selection] == [1, 2]
    assert all("fitted_kl" not in row for row in by_jsd.selection)
    # the default: every eligible layer fitted alone and scored by its cost to the output
    fitted = _fit(config, t, tokenizer, ratio=0.34, steps=0, layerwise_steps=10)
    scores = {row["layer"]: row["fitted_kl"] for row in fitted.selection}
    assert set(scores) == {1, 2} and all(score > 0 for score in scores.values())
    assert fitted.adapter.config.layers == [min(scores, key=scores.get)]
    assert len(fitted.losses["layerwise"]) == 1  # the chosen layer goes on fitting on whole sequences
    assert _fit(config, t, tokenizer, ratio=0.34, min_layer=2, steps=0, layerwise_steps=0).adapter.config.layers == [2]
    with pytest.raises(UserError, match="--select"):
        _fit(config, t, tokenizer, ratio=0.34, select="best")

def test_refit_goes_on_from_an_adapter(tiny):
    directory, config, t = tiny
    tokenizer = load_model_dir(directory).tokenizer
    first = _fit(config, t, tokenizer, layers=[1, 2], rank=4, steps=2, layerwise_steps=5, lr=5e-3)
    refit = _fit(config, t, tokenizer, init=first.adapter, steps=30, lr=5e-3)
    assert refit.adapter.config.layers == [1, 2] and refit.adapter.config.rank == 4
    assert refit.selection == [] and refit.losses["layerwise"] == []
    assert refit.quality["train_kl"] < first.quality["train_kl"]
    assert refit.adapter.config.fit["init"] == first.adapter.config.fit
    # a refit may go through the layer-wise phase first, with either loss
    for loss in ("output", "attention"):
        layerwise = _fit(config, t, tokenizer, init=first.adapter, steps=0, layerwise_steps=20, layerwise_loss=loss)
        assert len(layerwise.losses["layerwise"]) == 2 and layerwise.adapter.config.fit["layerwise_loss"] == loss
        assert layerwise.quality["train_kl"] < first.quality["train_kl"]
    # zero steps hand the adapter back as it was
    same = _fit(config, t, tokenizer, init=first.adapter, steps=0)
    assert all(torch.equal(same.adapter.tensors[k], v) for k, v in first.adapter.tensors.items())
    # a larger rank starts where the adapter was and goes on from there
    wide = _fit(config, t, tokenizer, init=first.adapter, rank=8, steps=0)
    assert wide.adapter.config.rank == 8 and wide.adapter.config.fit["init"]["rank"] == 4
    assert wide.quality["train_kl"] == pytest.approx(first.quality["train_kl"], rel=1e-4)
    wider = _fit(config, t, tokenizer, init=first.adapter, rank=8, steps=30, lr=5e-3)
    assert wider.quality["train_kl"] < refit.quality["train_kl"]
    with pytest.raises(UserError, match="multiple of the adapter's rank 4"):
        _fit(config, t, tokenizer, init=first.adapter, rank=6, steps=0)


def test_refit_moves_an_adapter_onto_other_layers(tiny):
    """A refit given layers keeps the parameters of the layers it keeps, drops the others and starts
    a new layer from head matching; by default only the new layer is fitted layer-wise."""
    directory, config, t = tiny
    tokenizer = load_model_dir(directory).tokenizer
    first = _fit(config, t, tokenizer, layers=[2], rank=4, steps=2, layerwise_steps=5, lr=5e-3)
    kept = first.adapter.layer(2)
    # layer 1 new at its step 0: what a fresh fit with the same seed starts layer 1 from
    fresh = _fit(config, t, tokenizer, layers=[1], rank=4, steps=0, layerwise_steps=0).adapter.layer(1)
    moved = _fit(config, t, tokenizer, init=first.adapter, layers=[1, 2], steps=0, layerwise_steps=0)
    assert moved.adapter.config.layers == [1, 2] and moved.adapter.config.rank == 4
    assert all(torch.equal(moved.adapter.layer(1)[p], fresh[p]) for p in fresh)
    assert all(torch.equal(moved.adapter.layer(2)[p], kept[p]) for p in kept)
    fit = moved.adapter.config.fit
    assert fit["added"] == [1] and fit["dropped"] == [] and fit["layerwise_layers"] == []
    # the new layer alone is fitted layer-wise (150 steps by default), which lowers what it costs
    fitted = _fit(config, t, tokenizer, init=first.adapter, layers=[1, 2], steps=0, lr=5e-3)
    assert len(fitted.losses["layerwise"]) == 1 and fitted.adapter.config.fit["layerwise_layers"] == [1]
    assert fitted.adapter.config.fit["layerwise_steps"] == 150
    shorter = _fit(config, t, tokenizer, init=first.adapter, layers=[1, 2], steps=0, layerwise_steps=7)
    assert len(shorter.losses["layerwise"]) == 1 and shorter.adapter.config.fit["layerwise_steps"] == 7
    assert all(torch.equal(fitted.adapter.layer(2)[p], kept[p]) for p in kept)
    assert not torch.equal(fitted.adapter.layer(1)["align_w2"], fresh["align_w2"])
    assert fitted.quality["train_kl"] < moved.quality["train_kl"]
    # a dropped layer is gone and the kept one is as it was
    swapped = _fit(config, t, tokenizer, init=moved.adapter, layers=[1], steps=0)
    assert swapped.adapter.config.layers == [1] and swapped.adapter.config.fit["dropped"] == [2]
    assert set(swapped.adapter.tensors) == {tensor_name(1, p) for p in fresh}
    assert all(torch.equal(swapped.adapter.layer(1)[p], fresh[p]) for p in fresh)


@pytest.mark.parametrize("factor", [2, 3])
def test_widening_the_rank_keeps_what_the_adapter_computes(tiny, factor):
    """Each RoPE pair moves to the new pair of its frequency and q' absorbs the new 1/sqrt(rank):
    the model's logits stay those of the narrower adapter, with or without chains."""
    _, config, t = tiny
    adapter = random_adapter(config, [1, 2], rank=4)
    wide = widen_rank(adapter, config, 4 * factor, torch.Generator().manual_seed(1))
    assert wide.config.rank == 4 * factor
    want = reference.llama_forward(config, t, IDS, adapter=adapter)
    got = reference.llama_forward(config, t, IDS, adapter=wide)
    assert (got - want).abs().max() < 1e-4
    assert (Model(config, t, "cpu", torch.float32, adapter=wide).logits(IDS) - want).abs().max() < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_fit_on_cuda_follows_the_cpu_fit(tiny):
    """The GPU fit (torch's aligner instead of the CPU kernel) takes the same path as the CPU fit,
    from layer selection through a refit, and hands back CPU tensors ready to save."""
    directory, config, t = tiny
    tokenizer = load_model_dir(directory).tokenizer
    kw = dict(ratio=0.67, rank=4, steps=10, layerwise_steps=10, lr=5e-3)
    cpu, gpu = _fit(config, t, tokenizer, **kw), _fit(config, t, tokenizer, device="cuda", **kw)
    assert gpu.adapter.config.layers == cpu.adapter.config.layers
    assert all(v.device.type == "cpu" for v in gpu.adapter.tensors.values())
    assert gpu.losses["end_to_end"] == pytest.approx(cpu.losses["end_to_end"], rel=2e-2)
    refit = _fit(config, t, tokenizer, device="cuda", init=gpu.adapter, steps=20, lr=5e-3)
    assert refit.quality["train_kl"] < gpu.quality["train_kl"]
