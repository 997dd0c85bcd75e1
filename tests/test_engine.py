"""The engine's pieces on their own: StopStringFilter, Sampler, SamplingParams, generate()
on a tiny random model (per-request params and seeds in one batch, finish reasons, context cap),
and the Engine's scheduler stepped by hand (chunked prefill mixed with decode, preemption of the
newest sequence, max_num_seqs, cancellation, a request that fills the whole cache), and the
overlapped decode steps (forced on here; on by default on CUDA) against steps taken in turn.
"""
import fractions
import math
import random

import pytest
import torch

from lisa_rt import SamplingParams, UserError, generate
from lisa_rt.engine import Engine, Request, StopStringFilter, run_to_completion
from lisa_rt.kv_cache import KVCache
from lisa_rt import sampling
from lisa_rt.sampling import Sampler, sample_batch
from tests.fixtures import CORPUS, tiny_float32_model

pytest.importorskip("transformers")


# --- StopStringFilter -------------------------------------------------------------------------

def run_filter(stops, deltas):
    f = StopStringFilter(stops)
    pieces = [f.push(d) for d in deltas]
    if not f.stopped:
        pieces.append(f.flush())
    return "".join(pieces), pieces, f


def test_filter_without_stops_passes_text_through():
    text, pieces, f = run_filter([], ["Hel", "lo", " world"])
    assert pieces[:3] == ["Hel", "lo", " world"] and text == "Hello world" and not f.stopped


def test_filter_stop_spanning_several_deltas():
    text, pieces, f = run_filter(["<END>"], ["abc<", "E", "N", "D>tail", "more"])
    assert f.stopped and text == "abc" and f.text == "abc"
    # Nothing of the stop string was ever emitted, even while it was being built.
    assert pieces == ["abc", "", "", "", ""]  # and pushes after the stop are dropped


def test_filter_releases_held_prefix_when_it_stops_matching():
    f = StopStringFilter(["<END>"])
    assert f.push("x<EN") == "x"          # "<EN" could still become "<END>"
    assert f.push("Q") == "<ENQ"          # it cannot any more: released at once
    assert f.push("<") == ""
    assert f.push("!") == "<!"
    assert not f.stopped
    assert f.flush() == "" and f.text == "x<ENQ<!"


def brute_force_filter(stops, deltas):
    """What the filter must emit, by searching the whole text after every delta."""
    text, emitted, pieces = "", 0, []
    for delta in deltas:
        text += delta
        hits = [i for i in (text.find(stop) for stop in stops) if i >= 0]
        if hits:
            text = text[: min(hits)]
            pieces.append(text[emitted:])
            return pieces, text, True
        held = max([n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])], default=0)
        pieces.append(text[emitted : len(text) - held])
        emitted = max(emitted, len(text) - held)
    return pieces, text, False


def test_filter_matches_a_brute_force_search_on_random_text():
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        deltas = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 12))]
        f = StopStringFilter(stops)
        pieces = [f.push(d) for d in deltas][: len(brute_force_filter(stops, deltas)[0])]
        assert (pieces, f.text, f.stopped) == brute_force_filter(stops, deltas), (stops, deltas)


def test_filter_earliest_stop_in_a_delta_wins():
    # "bc" completes first, but "abcd", completed by the same delta, begins earlier.
    assert run_filter(["abcd", "bc"], ["x", "abcd"])[0] == "x"
    assert run_filter(["abcd", "bc"], ["xabc", "d"])[0] == "xa"  # "bc" was whole a delta earlier


def test_filter_long_stop_string():
    stop = "ab" * 50_000 + "!"
    text, _, f = run_filter([stop], ["ab"] * 50_000 + ["x"])  # all of it but the "!": held, then released
    assert text == "ab" * 50_000 + "x" and not f.stopped
    text, _, f = run_filter([stop], ["zz"] + ["ab"] * 50_000 + ["!tail"])
    assert text == "zz" and f.stopped


def test_filter_flush_releases_held_prefix_at_the_end():
    f = StopStringFilter(["###"])
    assert f.push("done ##") == "done "
    assert f.flush() == "##"
    assert not f.stopped


def test_filter_multiple_stops_earliest_wins():
    # Both stops are in the text: the one that starts first cuts it.
    text, _, f = run_filter(["STOP", "op"], ["a st", "op here STOP"])
    assert f.stopped and text == "a st"
    text, _, f = run_filter(["world", "lo w"], ["hello world"])
    assert f.stopped and text == "hel"
    # A longer stop held back while a shorter one completes later in the same text.
    text, _, f = run_filter(["abcd", "c"], ["ab", "c", "d"])
    assert f.stopped and text == "ab"


def test_filter_stop_at_the_very_start_and_repeated_prefix():
    text, pieces, f = run_filter(["\n\n"], ["\n", "\n", "x"])
    assert f.stopped and text == "" and pieces == ["", "", ""]
    text, _, f = run_filter(["aab"], ["a", "a", "a", "b", "c"])  # overlapping prefixes
    assert f.stopped and text == "a"


# --- Sampler ----------------------------------------------------------------------------------

def sampler(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    base.update(kw)
    return Sampler(SamplingParams(**base))


def random_logits(seed, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 3


def test_greedy_is_argmax():
    s = sampler(temperature=0)
    for seed in range(10):
        logits = random_logits(seed)
        assert s(logits, []) == int(logits.argmax())


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)],
                         ids=["top_k=1", "top_p=tiny", "min_p=1"])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_truncations_to_one_token_equal_greedy(kw, temperature):
    s = sampler(temperature=temperature, seed=123, **kw)
    for seed in range(20):
        logits = random_logits(seed)
        assert s(logits, []) == int(logits.argmax())


def test_repetition_penalty_as_in_transformers():
    # Positive logits of seen tokens are divided by the penalty, negative ones multiplied.
    s = sampler(temperature=0, repetition_penalty=2.0)
    assert s(torch.tensor([3.0, 2.5, -1.0]), [0]) == 1          # 3 / 2 = 1.5 < 2.5
    assert s(torch.tensor([3.0, 2.5, -1.0]), [2, 2]) == 0       # unseen top stays
    assert s(torch.tensor([-1.0, -1.5, -3.0]), [0]) == 1        # -1 * 2 = -2 < -1.5 (not -0.5)
    assert s(torch.tensor([-1.0, -1.5, -3.0]), []) == 0
    # Penalty < 1 favours seen tokens.
    assert sampler(temperature=0, repetition_penalty=0.5)(torch.tensor([2.0, 1.5]), [1]) == 1
    # Against transformers' own processor, on the same logits (if it is installed).
    transformers = pytest.importorskip("transformers")
    logits = random_logits(7, vocab=20)
    history = [3, 5, 5, 11, 0]
    want = transformers.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([history]), logits[None].clone())[0]
    assert sampler(temperature=0, repetition_penalty=1.7)(logits, history) == int(want.argmax())


def test_presence_and_frequency_penalties_as_in_openai():
    # A generated token loses presence_penalty once and frequency_penalty per time it was
    # generated; the prompt does not count.
    logits = torch.tensor([3.0, 2.5, -1.0])
    assert sampler(temperature=0, presence_penalty=1.0)(logits, [], [0]) == 1       # 3 - 1 < 2.5
    assert sampler(temperature=0, presence_penalty=1.0)(logits, [0, 0], []) == 0    # the prompt's
    assert sampler(temperature=0, frequency_penalty=0.3)(logits, [], [0]) == 0      # 3 - 0.3 > 2.5
    assert sampler(temperature=0, frequency_penalty=0.3)(logits, [], [0, 0]) == 1   # 3 - 0.6 < 2.5
    assert sampler(temperature=0, frequency_penalty=0.3)(logits, [], [0, 1, 0]) == 0  # 2.4 > 2.5 - 0.3
    assert sampler(temperature=0, frequency_penalty=-2.0)(logits, [], [2, 2, 2]) == 2  # negative favours
    # Against the definition on random logits, with all three penalties at once.
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(30, generator=gen) * 3
        prompt = torch.randint(30, (6,), generator=gen).tolist()
        output = torch.randint(30, (9,), generator=gen).tolist()
        want = logits.clone()
        seen = sorted(set(prompt + output))
        want[seen] = torch.where(want[seen] > 0, want[seen] / 1.3, want[seen] * 1.3)
        for token in set(output):
            want[token] -= 0.7 + 0.4 * output.count(token)
        params = dict(repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.4)
        assert sampler(temperature=0, **params)(logits, prompt, output) == int(want.argmax())
        # Sampled: the same distribution as the penalised logits sampled without penalties.
        u = (seed + 0.5) / 20
        penalised, plain = sampler(seed=seed, **params), sampler(seed=seed)
        penalised.uniform = plain.uniform = lambda: u
        assert penalised(logits, prompt, output) == plain(want, [])


def test_logit_bias_is_added_before_the_penalties_and_the_draw():
    logits = torch.tensor([3.0, 2.5, -1.0])
    assert sampler(temperature=0, logit_bias={2: 100})(logits, []) == 2
    assert sampler(temperature=0, logit_bias={0: -100})(logits, []) == 1
    # Added first, then scaled by the repetition penalty, as vLLM orders them: the seen token 2
    # gets (-1 + 5) / 2 = 2 < 2.5 (token 1); penalised first it would get -2 + 5 = 3 and win.
    assert sampler(temperature=0, logit_bias={2: 5.0, 0: -1.4}, repetition_penalty=2.0)(logits, [2]) == 1
    # Sampled: the distribution of the biased logits, drawn without a bias.
    gen = torch.Generator().manual_seed(3)
    for seed in range(20):
        x = torch.randn(40, generator=gen) * 2
        bias = {int(t): float(v) for t, v in zip(torch.randint(40, (5,), generator=gen), torch.randn(5, generator=gen) * 3)}
        want = x.clone()
        for t, v in bias.items():
            want[t] += v
        u = (seed + 0.5) / 20
        biased, plain = sampler(seed=seed, logit_bias=bias), sampler(seed=seed)
        biased.uniform = plain.uniform = lambda: u
        assert biased(x, []) == plain(want, [])


def test_sampler_does_not_modify_the_callers_logits():
    logits = torch.tensor([3.0, 2.5, -1.0])
    before = logits.clone()
    sampler(temperature=0, repetition_penalty=2.0)(logits, [0, 2])
    sampler(temperature=0.7, repetition_penalty=2.0, top_k=2, top_p=0.5, min_p=0.1)(logits, [0, 2])
    sampler(temperature=0.7, presence_penalty=1.0, frequency_penalty=0.5)(logits, [0], [1, 1, 2])
    sampler(temperature=0, logit_bias={1: 5.0})(logits, [])
    assert torch.equal(logits, before)


def test_same_seed_same_draws_different_seed_differs():
    logits = torch.zeros(1000)

    def draws(seed):
        s = sampler(seed=seed)
        return [s(logits, []) for _ in range(30)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_distribution_follows_softmax_over_temperature():
    logits = torch.tensor([1.0, 0.5, -0.5, 2.0])
    temperature = 0.7
    n = 4000
    s = sampler(temperature=temperature, seed=2024)
    counts = [0] * 4
    for _ in range(n):
        counts[s(logits, [])] += 1
    expected = (torch.softmax(logits / temperature, -1) * n).tolist()
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    # 3 degrees of freedom: P(chi2 > 40) ~ 1e-8. Sampling from softmax(logits) (T ignored) or
    # from a uniform distribution gives chi2 in the hundreds.
    assert chi2 < 40, (counts, expected)
    wrong = (torch.softmax(logits, -1) * n).tolist()
    assert sum((c - e) ** 2 / e for c, e in zip(counts, wrong)) > 100


def test_top_k_and_min_p_never_pick_excluded_tokens():
    logits = torch.tensor([0.0, 5.0, 4.9, 4.8, -10.0, 1.0])
    s = sampler(temperature=2.0, top_k=3, seed=1)
    assert {s(logits, []) for _ in range(300)} == {1, 2, 3}
    s = sampler(temperature=1.0, min_p=0.5, seed=1)  # keeps p >= 0.5 * p_max: tokens 1, 2, 3
    assert {s(logits, []) for _ in range(300)} == {1, 2, 3}
    s = sampler(temperature=1.0, top_p=0.5, seed=1)  # token 1 alone has ~0.36 < 0.5: 1 and 2
    assert {s(logits, []) for _ in range(300)} == {1, 2}


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([2.0, 1.0, 1.9])
    for t in (1e-6, 1e-30, 1e-45):
        assert sampler(temperature=t)(logits, []) == 0


def filtered_probs(logits, p):
    """The distribution the sampler promises, straight from its definition in float64: repetition
    penalty aside, temperature, the top_k most likely (and those tied with the k-th) renormalised,
    top_p (a token goes once the more likely ones hold top_p), min_p of the most likely,
    renormalised."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    order = probs.argsort(descending=True)
    kept = torch.zeros_like(probs)
    ranked = probs[order]
    if 0 < p.top_k < len(ranked):  # tokens tied with the k-th stay, as in transformers
        ranked[ranked < ranked[p.top_k - 1]] = 0
        ranked = ranked / ranked.sum()
    if p.top_p < 1:
        ranked[ranked.cumsum(0) - ranked >= p.top_p] = 0
    ranked[ranked < p.min_p * ranked[0]] = 0
    kept[order] = ranked
    return kept / kept.sum()


def stratified_tokens(logits, params, draws):
    """The tokens of `draws` samplers of one distribution whose uniform numbers are spread evenly
    over [0, 1): each token is then drawn as often as its probability says, to within one."""
    samplers = []
    for i in range(draws):
        s = Sampler(params)
        s.uniform = lambda u=(i + 0.5) / draws: u
        samplers.append(s)
    return sample_batch(samplers, logits.expand(draws, -1), lambda row: ([], []))


@pytest.mark.parametrize("vocab, spread, kw", [
    (1000, 3.0, dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8)),   # the CLI's defaults
    (1000, 3.0, dict(top_k=0, top_p=1.0, min_p=0.0)),                       # the whole vocabulary
    (1000, 3.0, dict(top_k=0, top_p=1.0, min_p=0.01, temperature=1.5)),
    (1000, 3.0, dict(top_k=700, top_p=1.0, min_p=0.0)),
    (300, 4.0, dict(top_k=0, top_p=0.9, min_p=0.0)),     # nucleus within the first candidates
    (300, 3.0, dict(top_k=0, top_p=0.9, min_p=0.0)),     # ... past them, within the next
    (300, 0.1, dict(top_k=0, top_p=0.95, min_p=0.0)),    # ... past those: the whole row
    (300, 1.0, dict(top_k=0, top_p=0.9, min_p=0.2)),     # min_p cuts inside the nucleus
])
def test_draws_follow_the_filtered_distribution(vocab, spread, kw, monkeypatch):
    # Fewer candidates than the runtime's, so that a small vocabulary reaches every tier.
    monkeypatch.setattr(sampling, "CANDIDATES", 16)
    monkeypatch.setattr(sampling, "MORE_CANDIDATES", 64)
    params = SamplingParams(**{"temperature": 1.0, **kw})
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab + int(spread * 10))) * spread
    want = filtered_probs(logits, params)
    draws = 8000
    counts = torch.bincount(torch.tensor(stratified_tokens(logits, params, draws)), minlength=vocab)
    assert ((counts - want * draws).abs() <= 1.01).all(), (counts - want * draws).abs().max()
    kept = int((want > 0).sum())
    if params.top_p < 1 and not params.min_p:  # the cases reach the tier they say they do
        assert (0 if kept < 16 else 1 if kept < 64 else 2) == {4.0: 0, 3.0: 1, 0.1: 2}[spread], kept


@pytest.mark.parametrize("tied, top_k", [(10, 3), (300, 2), (4, 4)], ids=["past-the-margin", "all", "exactly-k"])
def test_top_k_keeps_the_tokens_tied_with_the_kth(tied, top_k, monkeypatch):
    monkeypatch.setattr(sampling, "TIE_MARGIN", 2)  # 10 tied tokens reach past 3 + 2 candidates
    monkeypatch.setattr(sampling, "MORE_CANDIDATES", 64)
    logits = torch.zeros(300)
    logits[:tied] = 1.0
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.0)
    counts = torch.bincount(torch.tensor(stratified_tokens(logits, params, 3000)), minlength=300)
    assert set(counts.nonzero()[:, 0].tolist()) == set(range(tied))
    assert ((counts[:tied] - 3000 / tied).abs() <= 1.01).all()


def test_common_settings_take_one_transfer(monkeypatch):
    # The CLI's defaults and the server's on untied logits never need a second pass.
    def refuse(self, rows):
        raise AssertionError(f"rows {rows} needed a second pass")

    monkeypatch.setattr(sampling, "RowDraws", type("Draws", (sampling.RowDraws,), {"refine": refuse}))
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(1)) * 3
    for params in (SamplingParams(seed=1), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)):
        sample_batch([Sampler(params) for _ in range(4)], logits, lambda row: ([], []))


def test_rows_draw_the_same_alone_and_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 6000, generator=gen) * torch.tensor([[3.0], [0.1], [1.0], [3.0], [2.0], [0.1], [3.0]])
    params = [SamplingParams(temperature=0), SamplingParams(top_k=0, top_p=0.95, min_p=0.0, seed=1),
              SamplingParams(top_k=0, top_p=1.0, min_p=0.0, seed=2), SamplingParams(seed=3),
              SamplingParams(temperature=0, repetition_penalty=1.3), SamplingParams(top_k=0, top_p=0.9, seed=4),
              SamplingParams(repetition_penalty=0.8, top_k=5, seed=5)]
    params += [SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams(frequency_penalty=-1.5, seed=6)]
    logits = torch.cat([logits, logits[:2]])
    history = [([1, 2, 3], []), ([], []), ([9], []), ([], []), ([int(logits[4].argmax())], [7]), ([], []),
               ([0], [5, 5]), ([], [int(logits[7].argmax())]), ([4], [3, 3, 3])]
    batched = [sample_batch([Sampler(p) for p in params], logits, history.__getitem__) for _ in range(2)]
    alone = [sample_batch([Sampler(p)], logits[row:row + 1], lambda _: history[row])[0]
             for row, p in enumerate(params)]
    assert batched[0] == batched[1] == alone
    assert alone[0] == int(logits[0].argmax()) and alone[4] != int(logits[4].argmax())
    assert alone[7] != int(logits[7].argmax())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_sampling_on_the_gpu_follows_the_same_distributions():
    # The logits stay on the device; only the tokens come back.
    gen = torch.Generator().manual_seed(5)
    for kw in (dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8), dict(top_k=0, top_p=1.0, min_p=0.0),
               dict(top_k=0, top_p=0.9, min_p=0.0)):
        params = SamplingParams(**kw)
        logits = torch.randn(49152, generator=gen) * 2
        want = filtered_probs(logits, params)
        counts = torch.bincount(torch.tensor(stratified_tokens(logits.cuda(), params, 4000)), minlength=49152)
        assert ((counts - want * 4000).abs() <= 1.01).all(), kw


def test_non_finite_logits_are_an_error_not_a_token():
    logits = torch.zeros(2, 50)
    logits[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        sample_batch([Sampler(SamplingParams(seed=0)), Sampler(SamplingParams(top_k=0, seed=0))], logits,
                     lambda row: ([], []))


@pytest.mark.parametrize("kw, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=2.0), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(stop=[""]), "stop"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(logit_bias={1: 101}), "logit_bias values"), (dict(logit_bias={-1: 1}), "logit_bias keys"),
    (dict(logit_bias={True: 1}), "logit_bias keys"), (dict(logit_bias={"5": 1}), "logit_bias keys"),
    (dict(logit_bias={1: float("nan")}), "logit_bias values"), (dict(logit_bias=[1, 2]), "logit_bias must be"),
    (dict(logit_bias={i: 1 for i in range(2049)}), "logit_bias names 2049 tokens; at most 2048"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(presence_penalty="1"), "presence_penalty"),
    (dict(stop=["ok", 3]), "stop"), (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed"),
    (dict(temperature="0.5"), "temperature must be a number, got '0.5' \\(str\\)"),
    (dict(temperature=None), "temperature must be a number"), (dict(top_p=None), "top_p must be a number"),
    (dict(temperature=True), "temperature must be a number"), (dict(max_tokens=True), "max_tokens must be an integer"),
    (dict(max_tokens=5.0), "max_tokens must be an integer"), (dict(stop=3), "stop must be a string or a list"),
    (dict(ignore_eos="false"), "ignore_eos must be True or False"), (dict(temperature=10**400), "temperature"),
])
def test_sampling_params_validation(kw, message):
    with pytest.raises(UserError, match=f"invalid sampling parameter: {message}"):
        SamplingParams(**kw)


def test_sampling_params_take_other_numeric_types_as_plain_python():
    numpy = pytest.importorskip("numpy")
    p = SamplingParams(max_tokens=numpy.int64(5), top_k=numpy.int32(7), seed=numpy.uint64(2**63),
                       temperature=numpy.float32(0.5), top_p=fractions.Fraction(9, 10), stop=None)
    assert (p.max_tokens, p.top_k, p.seed, p.temperature, p.top_p, p.stop) == (5, 7, 2**63, 0.5, 0.9, [])
    assert all(type(v) in (int, float) for v in (p.max_tokens, p.top_k, p.seed, p.temperature, p.top_p))
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_sampling_params_defaults_and_stop_string():
    p = SamplingParams(stop="###")
    assert p.stop == ["###"] and p.max_tokens == 256 and not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert p.replace(seed=3).seed == 3
    with pytest.raises(UserError):
        p.replace(top_p=3)


# --- generate() on a tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_float32_model(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def prompts(model):
    ids = model.tokenizer.encode(CORPUS[:2000])
    return [ids[:3], ids[:16], ids[:17], ids[:40]]


def test_per_request_params_and_seeds_in_one_batch_equal_each_alone(model, prompts):
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=15, temperature=1.3, top_k=20, top_p=0.9, min_p=0.02,
                       repetition_penalty=1.2, seed=99, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=1, ignore_eos=True),
    ]
    batched = generate(model, prompts, params)
    alone = [generate(model, [p], sp)[0] for p, sp in zip(prompts, params)]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.completion_tokens for c in batched] == [12, 7, 15, 10]
    assert all(c.finish_reason == "length" for c in batched)
    # Sampling really sampled: another seed gives other tokens; the same seed the same ones.
    again = generate(model, [prompts[0]], params[0])[0]
    other = generate(model, [prompts[0]], params[0].replace(seed=2))[0]
    assert again.token_ids == batched[0].token_ids
    assert other.token_ids != batched[0].token_ids


def test_streamed_text_equals_completion_text(model, prompts):
    pieces = {0: [], 1: []}
    out = generate(model, prompts[:2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                   on_text=lambda i, delta: pieces[i].append(delta))
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in out]
    assert out[0].text == model.tokenizer.decode(out[0].token_ids)


def test_finish_reason_length_vs_eos(model, prompts, monkeypatch):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = generate(model, [prompts[1]], greedy)[0].token_ids
    assert len(tokens) == 8
    # Make the third greedy token an EOS id: generation stops there, EOS not in the output.
    eos = tokens[2]
    cut = tokens.index(eos)
    monkeypatch.setattr(model.tokenizer, "eos_token_ids", list(model.tokenizer.eos_token_ids) + [eos])
    out = generate(model, [prompts[1]], greedy.replace(ignore_eos=False))[0]
    assert out.finish_reason == "stop" and out.token_ids == tokens[:cut]
    assert out.text == model.tokenizer.decode(tokens[:cut])
    out = generate(model, [prompts[1]], greedy)[0]  # ignore_eos: runs to the length
    assert out.finish_reason == "length" and out.token_ids == tokens
    # Log probabilities end with the EOS token's: it is what the model drew.
    scored = generate(model, [prompts[1]], greedy.replace(ignore_eos=False, logprobs=1))[0]
    assert [e.token_id for e in scored.logprobs] == tokens[:cut + 1]
    assert scored.logprobs[-1].text_offset == len(scored.text)


def test_stop_string_finish_reason(model, prompts):
    full = generate(model, [prompts[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and "\ufffd" not in stop
    out = generate(model, [prompts[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                        stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    assert len(out.token_ids) < 30


def test_max_tokens_capped_by_the_context_end(model):
    ctx = model.max_context
    ids = (model.tokenizer.encode(CORPUS * 3))[: ctx - 5]
    assert len(ids) == ctx - 5
    out = generate(model, [ids], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5
    assert out.prompt_tokens == ctx - 5
    with pytest.raises(UserError, match="context"):
        generate(model, [ids + ids[:5]], SamplingParams(max_tokens=1))
    with pytest.raises(UserError, match="empty"):
        generate(model, [[]], SamplingParams(max_tokens=1))


def test_generate_takes_token_ids_of_any_integer_type_and_refuses_the_rest(model, prompts):
    numpy = pytest.importorskip("numpy")
    greedy = SamplingParams(max_tokens=3, temperature=0)
    want = generate(model, [prompts[0]], greedy)[0].token_ids
    for same in (tuple(prompts[0]), numpy.array(prompts[0]), torch.tensor(prompts[0]),
                 [numpy.int64(t) for t in prompts[0]]):
        assert generate(model, [same], greedy)[0].token_ids == want
    for bad_prompt in ("text", [1, "2"], [True, 3], [1.0, 2.0], torch.tensor([[1, 2]]), None):
        with pytest.raises(UserError, match="list of token ids"):
            generate(model, [bad_prompt], SamplingParams(max_tokens=1))
    with pytest.raises(UserError, match=r"\[ids\], not ids"):
        generate(model, prompts[0], greedy)


def test_generate_refuses_params_of_other_types(model, prompts):
    for bad_params in ({"max_tokens": 1}, [SamplingParams(), SamplingParams()], ["greedy"]):
        with pytest.raises(UserError, match="one SamplingParams per prompt"):
            generate(model, [prompts[0]], bad_params)
    seeded = SamplingParams(max_tokens=3, seed=5)
    assert generate(model, [prompts[0]], None)[0].completion_tokens >= 1  # the defaults, as LLM takes None
    assert generate(model, [prompts[0]], [seeded])[0].text == generate(model, [prompts[0]], seeded)[0].text


def test_timings_and_usage(model, prompts):
    out = generate(model, [prompts[3]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.usage == {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45}
    assert out.timings["decode_steps"] == 4
    assert all(math.isfinite(v) and v >= 0 for v in out.timings.values())


# --- Engine: the scheduler step by step -------------------------------------------------------

def new_engine(model, blocks, **kw):
    return Engine(model, KVCache(model.config, blocks, "cpu", model.dtype), **kw)


def new_request(model, prompt, params, deltas=None):
    return Request(model, prompt, params, min(params.max_tokens, model.max_context - len(prompt)),
                   on_delta=None if deltas is None else deltas.append)


def run_all(engine, max_steps=10_000):
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def test_engine_chunked_prefill_mixes_with_decode_under_the_token_budget(model, prompts):
    ids = model.tokenizer.encode(CORPUS[:2000])
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = new_engine(model, 64, max_batch_tokens=8)
    a = new_request(model, ids[:3], greedy)
    engine.add(a)
    engine.step()                      # a: its whole prompt, then its first token
    assert a.computed == 3 and len(a.output) == 1
    b = new_request(model, ids[:20], greedy)
    engine.add(b)
    engine.step()                      # a's decode token + 7 of b's prompt
    assert a.computed == 4 and b.computed == 7 and len(a.output) == 2 and not b.output
    engine.step()
    assert b.computed == 14 and not b.output
    engine.step()                      # b's last 6 prompt tokens: its first token
    assert b.computed == 20 and len(b.output) == 1
    run_all(engine)
    want = generate(model, [ids[:3], ids[:20]], greedy)
    assert [a.completion.token_ids, b.completion.token_ids] == [c.token_ids for c in want]
    assert engine.cache.allocator.num_free == 64


def test_engine_preempts_the_newest_and_resumes_it_first(model):
    ids = model.tokenizer.encode(CORPUS[:2000])
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine = new_engine(model, 3)      # 48 tokens: room for both prompts, not for both to grow
    deltas_b = []
    a = new_request(model, ids[:16], greedy)
    b = new_request(model, ids[16:32], greedy, deltas_b)
    c = new_request(model, ids[40:44], greedy)
    engine.add(a)
    engine.add(b)
    engine.step()                      # both prefilled: 2 blocks taken, 1 free
    assert engine.running == [a, b] and engine.cache.allocator.num_free == 1
    engine.add(c)                      # c waits: no free block
    engine.step()                      # a takes the last block; b (the newest) is preempted
    assert engine.running == [a] and list(engine.waiting) == [b, c]
    assert engine.preemptions == 1 and b.preemptions == 1 and b.computed == 0 and len(b.output) == 1
    run_all(engine)
    assert a.preemptions == 0 and engine.stats()["preemptions"] >= 1
    alone = [generate(model, [p], greedy)[0].token_ids for p in (ids[:16], ids[16:32], ids[40:44])]
    assert [r.completion.token_ids for r in (a, b, c)] == alone
    # b's text was streamed once: nothing was sent again after its preemption.
    assert "".join(d.text for d in deltas_b) == b.completion.text == model.tokenizer.decode(alone[1])
    assert engine.cache.allocator.num_free == 3
    assert engine.stats()["completed"] == 3


def test_engine_respects_max_num_seqs_and_admits_in_order(model, prompts):
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine = new_engine(model, 64, max_num_seqs=2)
    reqs = [new_request(model, p, greedy) for p in prompts]
    for r in reqs:
        engine.add(r)
    engine.step()
    assert engine.running == reqs[:2] and list(engine.waiting) == reqs[2:]
    seen = 0
    while engine.has_work():
        engine.step()
        seen = max(seen, len(engine.running))
    assert seen <= 2
    assert [r.completion.token_ids for r in reqs] == [c.token_ids for c in generate(model, prompts, greedy)]


def test_engine_cancel_frees_blocks_at_the_next_step(model, prompts):
    greedy = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    engine = new_engine(model, 16)
    deltas = []
    running = new_request(model, prompts[3], greedy, deltas)
    waiting = new_request(model, prompts[0], greedy)
    engine.add(running)
    engine.step()
    engine.step()
    engine.cancel(running)
    engine.cancel(running)             # idempotent
    engine.cancel(waiting)             # cancelled before it was ever scheduled
    engine.add(waiting)
    assert engine.cache.allocator.num_free < 16
    engine.step()
    assert engine.cache.allocator.num_free == 16 and not engine.has_work()
    assert running.completion.finish_reason == "cancelled" and len(running.completion.token_ids) == 2
    assert deltas[-1].finish_reason == "cancelled" and deltas[-1].completion is running.completion
    assert waiting.completion.finish_reason == "cancelled" and waiting.completion.token_ids == []
    assert waiting.completion.timings["prompt_tok_per_s"] == 0 == waiting.completion.timings["decode_tok_per_s"]
    assert engine.stats()["cancelled"] == 2


def test_engine_request_that_fills_the_whole_cache_ends_with_length(model, prompts):
    ids = model.tokenizer.encode(CORPUS[:2000])
    engine = new_engine(model, 2)      # 32 tokens
    with pytest.raises(UserError, match="KV budget"):
        engine.check(ids[:33], SamplingParams(max_tokens=1))
    assert engine.check(ids[:30], SamplingParams(max_tokens=100)) == 100
    big = new_request(model, ids[:30], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    engine.add(big)
    run_all(engine)
    assert big.completion.finish_reason == "length" and big.completion.completion_tokens == 3
    assert engine.cache.allocator.num_free == 2


def test_generate_reraises_an_error_from_inside_a_step(model, prompts, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        generate(model, prompts[:2], SamplingParams(max_tokens=3))


# -- Overlap: the next decode step launched before the last one's tokens are read back ---------

def test_overlapped_steps_stream_a_step_later_and_settle_reads_the_last(model, prompts):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = new_engine(model, 16, overlap=True)
    deltas = []
    req = new_request(model, prompts[1], greedy, deltas)
    engine.add(req)
    engine.step()                      # the prefill is read at once: its token is known
    assert len(req.output) == 1 and req.computed == 16
    engine.step()                      # a decode step: launched, its token still in flight
    assert len(req.output) == 1 and req.computed == 17 and engine.has_work()
    engine.step()                      # the next one launched from it, then the first read
    assert len(req.output) == 2 and req.computed == 18
    assert engine.stats()["overlapped_steps"] == 1
    engine.settle()                    # the last one read; nothing launched
    assert len(req.output) == 3 and req.computed == 18
    engine.settle()                    # nothing in flight: nothing happens
    run_all(engine)
    assert req.completion.token_ids == generate(model, [prompts[1]], greedy, overlap=False)[0].token_ids
    assert "".join(d.text for d in deltas) == req.completion.text
    assert engine.cache.allocator.num_free == 16


def test_overlap_gives_the_same_completions_as_steps_in_turn(model, prompts, monkeypatch):
    ids = model.tokenizer.encode(CORPUS[:2000])
    stop_text = generate(model, [prompts[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].text
    stop = stop_text[len(stop_text) // 2: len(stop_text) // 2 + 3]
    eos = generate(model, [prompts[3]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids[4]
    monkeypatch.setattr(model.tokenizer, "eos_token_ids", list(model.tokenizer.eos_token_ids) + [eos])
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 1, 30, 20, 14)]
    params[2] = params[2].replace(stop=[stop])        # ends on a stop string
    params[3] = params[3].replace(ignore_eos=False)   # ends on an EOS token
    batch = prompts + [ids[100:131]]

    def run(overlap):
        pieces = {i: [] for i in range(len(batch))}
        engine = new_engine(model, 64, overlap=overlap)
        out = run_to_completion(engine, batch, params, on_text=lambda i, d: pieces[i].append(d))
        assert engine.cache.allocator.num_free == 64
        assert ["".join(pieces[i]) for i in range(len(batch))] == [c.text for c in out]
        return out, engine.stats()

    overlapped, stats = run(True)
    in_turn, plain = run(False)
    assert [(c.token_ids, c.text, c.finish_reason) for c in overlapped] == \
        [(c.token_ids, c.text, c.finish_reason) for c in in_turn]
    assert [c.finish_reason for c in in_turn] == ["length", "length", "stop", "stop", "length"]
    assert stats["overlapped_steps"] > 10 and plain["overlapped_steps"] == 0
    # A sequence that ended on the tokens read back had one more step computed for it: a few
    # more steps than in turn, never a token more.
    assert plain["steps"] <= stats["steps"] <= plain["steps"] + len(batch)


def test_overlapped_sampling_draws_what_steps_in_turn_draw_redrawn_rows_included(model, prompts, monkeypatch):
    # Two candidates: top_p rows often keep tokens past them and are redrawn on the host, after
    # the following step was launched with their first draw.
    monkeypatch.setattr(sampling, "CANDIDATES", 2)
    # A greedy row first: only some rows are sampled, and they are not the first ones.
    params = [SamplingParams(max_tokens=n, temperature=t, top_k=0, top_p=p, min_p=0.0, seed=seed, ignore_eos=True)
              for n, t, p, seed in ((20, 0.0, 1.0, None), (25, 1.2, 0.9, 1), (18, 0.8, 0.95, 2), (30, 1.0, 1.0, 3),
                                    (22, 0.7, 0.5, 4))]
    params[2] = params[2].replace(top_k=5)
    # Log probabilities ride with the tokens, the redrawn rows' read again on the host; a logit
    # bias (stateless) keeps the steps overlapped.
    for row, k in ((0, 2), (1, 0), (3, 5)):
        params[row] = params[row].replace(logprobs=k)
    params[4] = params[4].replace(logit_bias={7: 3.0, 11: -5.0})
    ids = model.tokenizer.encode(CORPUS[:2000])
    batch = [ids[200:211]] + prompts

    def run(overlap):
        engine = new_engine(model, 64, overlap=overlap)
        out = run_to_completion(engine, batch, params)
        assert engine.cache.allocator.num_free == 64
        return out, engine.stats()

    overlapped, stats = run(True)
    in_turn, _ = run(False)
    assert [c.token_ids for c in overlapped] == [c.token_ids for c in in_turn]
    assert [c.text for c in overlapped] == [c.text for c in in_turn]
    assert stats["overlapped_steps"] > 10 and stats["rewinds"] > 0  # rows stepped back
    for got, want in zip(overlapped, in_turn):
        assert (got.logprobs is None) == (want.logprobs is None)
        if want.logprobs is not None:
            assert [(e.token_id, [t for t, _ in e.top], e.text_offset) for e in got.logprobs] == \
                [(e.token_id, [t for t, _ in e.top], e.text_offset) for e in want.logprobs]
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)


def test_overlap_is_on_by_default_on_cuda_only_and_lisa_rt_overlap_0_turns_it_off(monkeypatch):
    from lisa_rt.engine import overlap_by_default

    monkeypatch.delenv("LISA_RT_OVERLAP", raising=False)
    assert overlap_by_default(torch.device("cuda")) and not overlap_by_default(torch.device("cpu"))
    monkeypatch.setenv("LISA_RT_OVERLAP", "0")
    assert not overlap_by_default(torch.device("cuda"))


def test_overlap_yields_to_arrivals_cancels_preemption_and_sampling(model):
    ids = model.tokenizer.encode(CORPUS[:2000])
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=3, ignore_eos=True)
    engine = new_engine(model, 5, overlap=True)  # 80 tokens: the decoders must preempt one another
    a, b = new_request(model, ids[:16], greedy), new_request(model, ids[20:34], greedy)
    engine.add(a)
    engine.add(b)
    for _ in range(4):
        engine.step()
    assert engine.stats()["overlapped_steps"] > 0
    late = new_request(model, ids[40:50], greedy)   # arrives while steps are in flight
    engine.add(late)
    for _ in range(3):
        engine.step()
    assert late.output                              # admitted: its prefill ran and was read
    doomed = new_request(model, ids[60:64], greedy)
    engine.add(doomed)
    for _ in range(3):
        engine.step()
    engine.cancel(doomed)
    lucky = new_request(model, ids[70:75], sampled)    # a sampled row overlaps too
    picky = new_request(model, ids[80:90], greedy.replace(repetition_penalty=1.3))  # steps read in turn
    engine.add(lucky)
    engine.add(picky)
    run_all(engine)
    assert doomed.completion.finish_reason == "cancelled"
    assert engine.stats()["preemptions"] > 0
    for req, prompt, params in ((a, ids[:16], greedy), (b, ids[20:34], greedy), (late, ids[40:50], greedy),
                                (lucky, ids[70:75], sampled), (picky, ids[80:90], picky.params)):
        assert req.completion.token_ids == generate(model, [prompt], params)[0].token_ids
    alone = generate(model, [ids[60:64]], greedy)[0].token_ids
    assert doomed.completion.token_ids == alone[: len(doomed.completion.token_ids)]
    assert engine.cache.allocator.num_free == 5


def test_a_failure_in_an_overlapped_step_fails_its_requests_and_the_engine_goes_on(model, prompts, monkeypatch):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = new_engine(model, 16, overlap=True)
    errors = []
    req = Request(model, prompts[1], greedy, 12, on_error=errors.append)
    engine.add(req)
    engine.step()
    engine.step()                      # a decode step in flight
    real = model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(model, "forward", broken)
    engine.step()                      # launching the next one fails
    assert req.finish_reason == "error" and str(errors[0]) == "kernel exploded"
    assert not engine.has_work() and engine.cache.allocator.num_free == 16
    monkeypatch.setattr(model, "forward", real)
    again = new_request(model, prompts[1], greedy)
    engine.add(again)
    run_all(engine)
    assert again.completion.token_ids == generate(model, [prompts[1]], greedy)[0].token_ids


# -- BlockTableRows: the graph decoder's incremental block tables -----------------------------

def test_block_table_rows_follow_growth_reorder_and_readmission():
    from lisa_rt.config import ModelConfig
    from lisa_rt.kv_cache import BlockTable, BlockTableRows

    config = ModelConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=4, vocab_size=16, max_position_embeddings=512)
    cache = KVCache.for_tokens(config, [512] * 6, "cpu", torch.float32, block_size=4)
    buffer = torch.full((6, 128), -7, dtype=torch.int32)
    rows = BlockTableRows(buffer)
    gen = torch.Generator().manual_seed(0)
    tables = [BlockTable(cache) for _ in range(4)]

    def check(batch):
        rows.update(batch)
        for row, table in enumerate(batch):
            assert buffer[row, : len(table.blocks)].tolist() == table.blocks

    for step in range(60):
        for table in tables:  # sequences grow by 0-5 tokens a step, crossing blocks now and then
            table.ensure(table.capacity + int(torch.randint(0, 6, (1,), generator=gen)))
        check(tables)
        if step % 7 == 3:  # one finishes: later rows move up
            tables.pop(1).release()
            tables.append(BlockTable(cache))
        if step % 11 == 5:  # one is preempted and readmitted under the same table object
            tables[0].release()
            tables[0].ensure(5)
        if step % 13 == 8:
            tables.reverse()
    # A shorter batch leaves later rows alone; they come back right.
    check(tables[:2])
    check(tables)


@pytest.mark.parametrize("max_batch", [1, 3, 64, 100, 256, 300, 600, 1030])
def test_a_batch_pads_to_a_size_within_its_power_of_two(max_batch):
    """CUDA-graph decode pads a batch up to a captured size, and the CUDA decode attention divides
    its work by the batch's next power of two: the two must agree for every batch, or graph and
    eager decode round differently (their greedy tokens could part)."""
    from lisa_rt.cuda_graph import capture_sizes, padded_size

    def power_at_or_above(n: int) -> int:
        return 1 << (n - 1).bit_length()

    sizes = capture_sizes(max_batch)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
    for batch in range(1, max_batch + 1):
        size = padded_size(sizes, batch)
        assert batch <= size and power_at_or_above(size) == power_at_or_above(batch), (batch, size)
    assert padded_size(sizes, max_batch + 1) is None


def test_scored_prompts_share_one_budget_of_logit_rows(model, monkeypatch):
    # Prompts that score every token take at most SCORED_CHUNK rows of logits a step between
    # them, however many run at once; each still gets every entry.
    from lisa_rt import engine as engine_module

    monkeypatch.setattr(engine_module, "SCORED_CHUNK", 64)
    ids = model.tokenizer.encode(CORPUS[:3000])
    prompts = [ids[:150], ids[200:300], ids[400:430]]
    rows = []
    forward = model.forward

    def counting(batch, cache):
        rows.append(batch.logits_rows.shape[0] - len(batch.cu_query_lens) + 1)  # past one a chunk
        return forward(batch, cache)

    monkeypatch.setattr(model, "forward", counting)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1)
    done = run_to_completion(Engine(model, model.new_cache([512] * 3)), prompts, params)
    assert max(rows) <= 64 and len(rows) >= (150 + 100 + 30) // 64
    monkeypatch.setattr(model, "forward", forward)
    for prompt, completion in zip(prompts, done):
        want = model.logits(prompt).log_softmax(-1)
        assert [e.logprob for e in completion.prompt_logprobs[1:]] == pytest.approx(
            [float(want[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4)
