"""The fitter's head-aligner kernels (causal_head_align and its backward, CPU only) against
reference.causal_head_align and its autograd: sizes across the 8-key tiles, batches, GQA-free
odd head counts, poisoned logits past the diagonal; the autograd Function LisaLayer uses; the
fallback path; bad arguments."""
import pytest
import torch

from lisa_rt import ops, reference
from lisa_rt.lisa import CausalHeadAlign, LisaLayer

pytestmark = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")

# (batch, heads, width, n): n = 1, below a tile, on and around tile and row-length boundaries.
SHAPES = [(1, 3, 7, 1), (2, 4, 5, 7), (1, 9, 9, 8), (2, 6, 6, 9), (1, 5, 3, 17), (2, 9, 9, 67)]


def case(batch, heads, width, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, n, n, generator=g) * 3
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    # Past the diagonal: poison the kernels must never read.
    count = int(above.sum())
    scores[:, :, above] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(count)[:count]
    params = [torch.randn(heads, heads, generator=g), torch.randn(width, heads, generator=g),
              torch.randn(width, generator=g), torch.randn(heads, width, generator=g), torch.randn(heads, generator=g)]
    return scores, params


def reference_grads(scores, params, grad_out):
    inputs = [t.clone().requires_grad_() for t in (scores, *params)]
    reference.causal_head_align(*inputs).backward(grad_out)
    return [t.grad for t in inputs]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape):
    scores, params = case(*shape)
    out = torch.full_like(scores, float("nan"))
    ops.causal_head_align(out, scores, *params)
    torch.testing.assert_close(out, reference.causal_head_align(scores, *params), atol=1e-4, rtol=1e-5)
    n = shape[-1]
    assert (out[:, :, torch.ones(n, n, dtype=torch.bool).triu(1)] == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_reference_autograd(shape):
    scores, params = case(*shape)
    grad_out = torch.randn_like(scores)
    grads = [torch.full_like(t, float("nan")) for t in (scores, *params)]
    ops.causal_head_align_backward(grads, grad_out, scores, *params[:4])
    for name, got, want in zip(("scores", "A", "W1", "b1", "W2", "b2"), grads, reference_grads(scores, params, grad_out)):
        # Parameter gradients sum over every (i, j): scale the tolerance with their size.
        atol = 1e-4 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=name)
    n = shape[-1]
    assert (grads[0][:, :, torch.ones(n, n, dtype=torch.bool).triu(1)] == 0).all()


def test_backward_independent_of_thread_count():
    scores, params = case(2, 9, 9, 41)
    grad_out = torch.randn_like(scores)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            grads = [torch.empty_like(t) for t in (scores, *params)]
            ops.causal_head_align_backward(grads, grad_out, scores, *params[:4])
            results.append(grads)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_fallback_path_matches_kernels(monkeypatch):
    scores, params = case(1, 4, 5, 13)
    grad_out = torch.randn_like(scores)
    out, grads = torch.empty_like(scores), [torch.empty_like(t) for t in (scores, *params)]
    ops.causal_head_align(out, scores, *params)
    ops.causal_head_align_backward(grads, grad_out, scores, *params[:4])
    monkeypatch.setattr(ops, "HAVE_KERNELS", False)
    out_ref, grads_ref = torch.empty_like(scores), [torch.empty_like(t) for t in (scores, *params)]
    ops.causal_head_align(out_ref, scores, *params)
    ops.causal_head_align_backward(grads_ref, grad_out, scores, *params[:4])
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_lisa_layer_kernel_path_equals_torch_path_on_visible_keys():
    """LisaLayer.scores takes the kernels on the CPU; its torch path (other devices) must agree
    where the logits mean anything (j <= i), in value and in every gradient."""
    heads, width, n, hidden, rank, kv = 6, 6, 21, 16, 4, 2
    _, params = case(2, heads, width, n, seed=1)
    g = torch.Generator().manual_seed(2)
    layer = LisaLayer({"align_a": params[0], "align_w1": params[1], "align_b1": params[2], "align_w2": params[3],
                       "align_b2": params[4], "q_proj": torch.randn(heads * rank, hidden, generator=g),
                       "k_proj": torch.randn(kv * rank, hidden, generator=g)})
    s_prev = torch.randn(2, heads, n, n, generator=g)
    x = torch.randn(2, n, hidden, generator=g)
    cos_sin = reference.rope_cos_sin_cache(rank, 64, 10000.0)
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    weight = torch.randn(2, heads, n, n, generator=g) * visible

    def run():
        layer.zero_grad()
        inputs = s_prev.clone().requires_grad_(), x.clone().requires_grad_()
        out = layer.scores(*inputs, cos_sin, kv, rank)
        (out * weight).sum().backward()
        return out.detach(), [t.grad for t in inputs] + [p.grad.clone() for p in layer.parameters()]

    kernel_out, kernel_grads = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "HAVE_KERNELS", False)
        torch_out, torch_grads = run()
    torch.testing.assert_close(kernel_out[:, :, visible], torch_out[:, :, visible], atol=1e-4, rtol=1e-5)
    for a, b in zip(kernel_grads, torch_grads):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_autograd_function_gradcheck():
    scores, params = case(1, 3, 2, 5)
    scores = torch.where(scores.isfinite(), scores, 0.0)
    inputs = [t.double().requires_grad_() for t in (scores, *params)]
    # The kernels are float32: check the float32 Function against double-precision finite
    # differences of itself with a tolerance for float32 rounding.
    def function(*args):
        return CausalHeadAlign.apply(*(a.float() for a in args)).double()
    torch.autograd.gradcheck(function, inputs, eps=1e-2, atol=5e-2, rtol=1e-2)


def test_bad_arguments_raise_clearly():
    scores, params = case(1, 4, 5, 6)
    out = torch.empty_like(scores)
    with pytest.raises(RuntimeError, match=r"\[B, heads, n, n\]"):
        ops.causal_head_align(torch.empty(1, 4, 6, 5), scores[..., :5], *params)
    with pytest.raises(RuntimeError, match="align_a"):
        ops.causal_head_align(out, scores, torch.randn(3, 3), *params[1:])
    with pytest.raises(RuntimeError, match="align_w2"):
        ops.causal_head_align(out, scores, *params[:3], torch.randn(4, 4), params[4])
    with pytest.raises(RuntimeError, match="float32"):
        ops.causal_head_align(out, scores.double(), *params)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.causal_head_align(out, scores.transpose(2, 3), *params)
    with pytest.raises(RuntimeError, match="out"):
        ops.causal_head_align(torch.empty(1, 4, 6, 7), scores, *params)
    with pytest.raises(RuntimeError, match="must not overlap"):
        ops.causal_head_align(scores, scores, *params)
    grads = [torch.empty_like(t) for t in (scores, *params)]
    with pytest.raises(RuntimeError, match="grad_b1"):
        ops.causal_head_align_backward(grads[:3] + [torch.empty(4)] + grads[4:], scores, scores, *params[:4])
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.causal_head_align_backward(grads, scores[:, :2], scores, *params[:4])


@pytest.mark.parametrize("name", ["causal_head_align", "causal_head_align_backward"])
def test_opcheck(name):
    scores, params = case(1, 4, 5, 9)
    scores = torch.where(scores.isfinite(), scores, 0.0)
    if name == "causal_head_align":
        args = (torch.empty_like(scores), scores, *params)
    else:
        args = (*[torch.empty_like(t) for t in (scores, *params)], torch.randn_like(scores), scores, *params[:4])
    torch.library.opcheck(getattr(torch.ops.lisa_rt, name).default, args)
