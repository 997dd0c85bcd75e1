"""Quantized weights (quant.py) and their kernel, linear_quantized, against the reference:
the formats' arithmetic, every path of the kernel (streamed rows, three at a time, and the
dequantise-then-GEMM path past 64 rows; test_extension.py runs this file again on the
portable path), and a model that holds its weights quantized."""
import pytest
import torch

from lisa_rt import cli, ops, reference
from lisa_rt.errors import UserError
from lisa_rt.quant import BLOCK, QuantizedWeight, dequantize, quantize

FORMATS = ("q8_0", "q4_1")


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[0, :BLOCK] = 0.0                      # an all-zero block: d = 0
    if n > 1:
        w[1, :BLOCK] = 0.25                 # a constant block: q4_1's d = 0, its m the value
        w[1, BLOCK:] = -w[1, BLOCK:].abs()  # blocks of negatives only
    return w


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_round_trip_is_within_half_a_step_and_exact_on_its_own_values(fmt):
    w = random_weight(37, 6 * BLOCK)
    q = quantize(w, fmt)
    back = dequantize(q)
    assert back.shape == w.shape and q.shape == (37, 6 * BLOCK)
    step = q.scales.float().repeat_interleave(BLOCK, dim=1)
    # Half a step of rounding, plus float16's rounding of d (and m) spread over the block.
    slack = 1e-3 * w.abs().amax(dim=1, keepdim=True)
    assert ((back - w).abs() <= step / 2 + slack).all()
    assert torch.equal(back[0, :BLOCK], torch.zeros(BLOCK))
    assert torch.allclose(back[1, :BLOCK], torch.full((BLOCK,), 0.25), atol=1e-3)
    again = quantize(back, fmt)           # what the format holds, it holds exactly
    assert torch.equal(dequantize(again), back)
    levels = 255 if fmt == "q8_0" else 16
    assert len(torch.unique(back[5, :BLOCK])) <= levels


def test_q4_1_packs_a_blocks_first_half_into_low_nibbles():
    w = torch.arange(2 * BLOCK, dtype=torch.float32).reshape(1, -1) % BLOCK / 2  # q = 0..15, 0..15
    q = quantize(w[:, :BLOCK].repeat(1, 2), "q4_1")
    assert q.data.dtype == torch.uint8 and q.data.shape == (1, BLOCK)
    first = q.data[0, :16]
    assert torch.equal(first & 0x0F, torch.arange(16, dtype=torch.uint8) // 2)
    assert torch.equal(first >> 4, torch.arange(16, 32, dtype=torch.uint8) // 2)


def test_quantize_refuses_what_the_format_cannot_hold():
    with pytest.raises(UserError, match="multiple of 32"):
        quantize(torch.randn(4, 48), "q8_0")
    with pytest.raises(UserError, match="float16"):
        quantize(torch.full((2, BLOCK), 1e9), "q4_1")
    with pytest.raises(UserError, match="float16"):
        quantize(torch.tensor([[float("nan")] * BLOCK]), "q8_0")
    with pytest.raises(UserError, match="unknown weight format"):
        quantize(torch.randn(2, BLOCK), "q5_k")


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 64, 65, 130])
def test_linear_quantized_matches_the_reference(fmt, dtype, m):
    n, k = 261, 5 * BLOCK
    w = quantize(random_weight(n, k, seed=m), fmt)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    ops.linear(out, x, w)
    expected = reference.linear_quantized(x, w)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    else:  # one rounding of the float32 sums either way
        torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=2e-2)


@pytest.mark.skipif(not ops.HAVE_KERNELS or ops.kernel_isa() == "portable",
                    reason="the portable path dequantises for at::mm, whose sums depend on the row count")
def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    w = quantize(random_weight(100, 18 * BLOCK), "q4_1")
    x = torch.randn(7, 18 * BLOCK)
    together = torch.empty(7, 100)
    ops.linear(together, x, w)
    for i in range(7):
        alone = torch.empty(1, 100)
        ops.linear(alone, x[i : i + 1], w)
        assert torch.equal(alone[0], together[i])


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")
@pytest.mark.parametrize("m", [1, 70])  # the streamed path and the dequantize-for-GEMM one
def test_non_finite_and_tiny_input_blocks(m):
    w = quantize(random_weight(40, 3 * BLOCK), "q4_1")
    x = torch.randn(m, 3 * BLOCK)
    x[0, 5] = float("nan")            # block 0 of row 0: the products are NaN
    x[m - 1, BLOCK + 1] = float("inf")
    x[m - 1, 2 * BLOCK:] = 1e-38      # too small to scale to 8 bits: zeros
    out = torch.empty(m, 40)
    ops.linear(out, x, w)
    assert out[0].isnan().all() and out[m - 1].isnan().all()
    expected = reference.linear_quantized(x, w)
    assert expected[0].isnan().all() and expected[m - 1].isnan().all()
    if m > 2:
        torch.testing.assert_close(out[1:-1], expected[1:-1], rtol=1e-5, atol=1e-4)
    tiny = torch.zeros(1, 3 * BLOCK)
    tiny[0, 2 * BLOCK:] = 1e-38
    ops.linear(out[:1], tiny, w)
    assert torch.equal(out[0], torch.zeros(40)) and torch.equal(reference.linear_quantized(tiny, w)[0], torch.zeros(40))


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")
def test_linear_quantized_refuses_bad_arguments():
    w = quantize(random_weight(8, 2 * BLOCK), "q4_1")
    x, out = torch.randn(2, 2 * BLOCK), torch.empty(2, 8)
    with pytest.raises(RuntimeError, match="takes mins"):
        torch.ops.lisa_rt.linear_quantized(out, x, w.data, w.scales, None)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.lisa_rt.linear_quantized(torch.empty(2, 8), torch.randn(2, 40), w.data, w.scales, w.mins)
    empty = torch.empty(8, 0, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="positive multiple of 32"):  # K = 0
        torch.ops.lisa_rt.linear_quantized(torch.empty(2, 8), torch.randn(2, 0), empty, torch.empty(8, 0).half(),
                                           torch.empty(8, 0).half())
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.lisa_rt.linear_quantized(out, x, w.data, w.scales.float(), w.mins)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.lisa_rt.linear_quantized(torch.empty(2, 9), x, w.data, w.scales, w.mins)


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    w = quantize(random_weight(24, 2 * BLOCK), fmt)
    args = (torch.empty(3, 24), torch.randn(3, 2 * BLOCK), w.data, w.scales, w.mins)
    torch.library.opcheck(torch.ops.lisa_rt.linear_quantized.default, args)


# --- a model that holds its weights quantized --------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.fixtures import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_model_computes_what_its_dequantized_weights_do(tiny, fmt, monkeypatch):
    import lisa_rt
    from lisa_rt.model import MATRIX_FIELDS
    from lisa_rt.quant import quantized_input

    model = lisa_rt.load_model(tiny, device="cpu", dtype="float32", quantize=fmt)
    float_model = lisa_rt.load_model(tiny, device="cpu", dtype="float32")
    assert all(isinstance(getattr(layer, name), QuantizedWeight) for layer in model.layers for name in MATRIX_FIELDS)
    assert isinstance(model.lm_head, QuantizedWeight) and not isinstance(model.embed, QuantizedWeight)
    assert model.lm_head.format == "q8_0" and model.layers[0].down_proj.format == fmt  # (q4_1: a q8_0 head)
    ids = list(range(5, 60))
    logits = model.logits(ids)
    # The float model with each matrix replaced by what the quantized one stands for, and its
    # products taking their inputs as 8-bit blocks, as the kernel does.
    for qlayer, flayer in zip(model.layers, float_model.layers):
        for name in MATRIX_FIELDS:
            getattr(flayer, name).copy_(dequantize(getattr(qlayer, name)))
    float_model.lm_head = dequantize(model.lm_head)
    monkeypatch.setattr(ops, "linear", lambda out, x, w: out.copy_(quantized_input(x) @ w.float().T))
    # (Summation order can move an input across a rounding boundary of its 8-bit block a few
    # layers in: up to a tenth or so, where a wrong block layout or scale is off by units.)
    expected = float_model.logits(ids)
    torch.testing.assert_close(logits, expected, rtol=2e-2, atol=0.25)
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_quantized_weights_stream_fewer_bytes(tiny):
    import lisa_rt
    from lisa_rt.bench import streamed_weight_bytes

    sizes = {fmt: streamed_weight_bytes(lisa_rt.load_model(tiny, device="cpu", dtype="bfloat16", quantize=fmt))
             for fmt in (None, *FORMATS)}
    assert sizes["q4_1"] < sizes["q8_0"] < sizes[None]


def test_quantize_is_refused_on_cuda_and_for_unknown_formats(tiny):
    import lisa_rt

    with pytest.raises(UserError, match="CPU only"):
        from lisa_rt.model import Model
        from lisa_rt.checkpoint import load_config

        Model(load_config(tiny), {}, "cuda", torch.bfloat16, quantize="q8_0")
    with pytest.raises(UserError, match="unknown weight format"):
        lisa_rt.load_model(tiny, device="cpu", quantize="int3")


def test_the_cli_takes_quantize(tiny, capsys):
    capsys.readouterr()
    rc = cli.main(["generate", "-m", str(tiny), "-p", "The model reads", "-n", "4", "--temp", "0",
                   "--quantize", "q4_1", "--verbose"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip()
    assert "weights q4_1" in err
    assert cli.main(["generate", "-m", str(tiny), "-p", "x", "--quantize", "q3"]) == 2


def test_q4_1_keeps_lisa_projections_at_8_bits(tmp_path):
    pytest.importorskip("transformers")
    import lisa_rt
    from tests.fixtures import tiny_model_with_adapter

    model_dir, adapter = tiny_model_with_adapter(tmp_path)
    model = lisa_rt.load_model(model_dir, device="cpu", dtype="float32", lisa=adapter, quantize="q4_1")
    assert [layer.qkv_proj.format for layer in model.layers] == ["q4_1", "q8_0", "q8_0"]  # LiSA: 1 and 2
    assert {layer.gate_up_proj.format for layer in model.layers} == {"q4_1"}
    assert torch.isfinite(model.logits(list(range(3, 40)))).all()
