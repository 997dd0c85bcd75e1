"""Engine metrics and their Prometheus text: what the engine counts as requests end, and a text
that a Prometheus parser reads (checked here with a small parser of the format's rules)."""
import re

import pytest

from lisa_rt.metrics import EngineMetrics, Histogram

pytest.importorskip("transformers")

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict:
    """{(name, sorted label pairs): value} of a text exposition; every line must be a comment
    (# HELP / # TYPE) or a sample, every sample's family declared before it."""
    assert text.endswith("\n")
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        assert name in typed or re.sub(r"_(bucket|sum|count)$", "", name) in typed, line
        pairs = tuple(sorted(LABEL.findall(labels or "")))
        assert (name, pairs) not in samples, line
        samples[(name, pairs)] = float(value)
    return samples


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    got = parse("# TYPE x histogram\n" + "\n".join(h.lines("x", 'm="a"')) + "\n")
    assert [got[("x_bucket", (("le", le), ("m", "a")))] for le in ("0.1", "1", "+Inf")] == [2, 3, 4]
    assert got[("x_count", (("m", "a"),))] == 4 and got[("x_sum", (("m", "a"),))] == pytest.approx(3.65)


STATS = {"running": 1, "waiting": 2, "total_blocks": 10, "free_blocks": 4, "cached_blocks": 3,
         "admitted_tokens": 50, "cached_tokens": 16, "preemptions": 1, "steps": 9,
         "draft_tokens": 12, "accepted_draft_tokens": 5}


def test_requests_are_counted_and_timed_by_how_they_ended():
    m = EngineMetrics()
    m.record("stop", 10, 5, t_submit=0.0, t_admit=0.5, t_first=1.0, t_end=3.0)
    m.record("length", 20, 1, t_submit=0.0, t_admit=0.0, t_first=0.2, t_end=0.2)
    m.record("cancelled", 7, 0, t_submit=0.0, t_admit=None, t_first=None, t_end=9.0)
    m.record("error", 3, 2, t_submit=0.0, t_admit=0.1, t_first=0.3, t_end=0.4)
    got = parse(m.exposition('odd "name"\\', STATS))
    label = ("model_name", 'odd \\"name\\"\\\\')

    def value(name, *pairs):
        return got[(name, tuple(sorted((label, *pairs))))]

    assert [value("lisa_rt_requests_total", ("finish_reason", r)) for r in ("stop", "length", "cancelled", "error")] \
        == [1, 1, 1, 1]
    assert value("lisa_rt_prompt_tokens_total") == 40 and value("lisa_rt_generation_tokens_total") == 8
    # Latencies of the requests that were served: not of the cancelled or failed one.
    assert value("lisa_rt_time_to_first_token_seconds_count") == 2
    assert value("lisa_rt_time_to_first_token_seconds_sum") == pytest.approx(1.2)
    assert value("lisa_rt_time_per_output_token_seconds_count") == 1      # one token: no interval
    assert value("lisa_rt_time_per_output_token_seconds_sum") == pytest.approx(0.5)
    assert value("lisa_rt_request_seconds_sum") == pytest.approx(3.2)
    assert value("lisa_rt_kv_cache_usage_ratio") == pytest.approx(0.6)
    assert value("lisa_rt_requests_waiting") == 2 and value("lisa_rt_prefix_cache_hit_tokens_total") == 16
    assert value("lisa_rt_draft_tokens_total") == 12 and value("lisa_rt_draft_tokens_accepted_total") == 5


def test_the_llm_records_every_request(tmp_path):
    from lisa_rt import LLM, SamplingParams
    from tests.fixtures import tiny_model_dir

    with LLM(str(tiny_model_dir(tmp_path, seed=3)), device="cpu", kv_cache_gb=0.01) as llm:
        done = llm.generate(["one", "two two", "three"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        handle = llm.submit("cancelled", SamplingParams(max_tokens=1000, ignore_eos=True))
        handle.cancel()
        handle.result()
        got = parse(llm.metrics_text("m"))

    def value(name, *pairs):
        return got[(name, tuple(sorted((("model_name", "m"), *pairs))))]

    assert value("lisa_rt_requests_total", ("finish_reason", "length")) == 3
    assert value("lisa_rt_requests_total", ("finish_reason", "cancelled")) == 1
    assert value("lisa_rt_generation_tokens_total") >= sum(c.completion_tokens for c in done)
    assert value("lisa_rt_request_seconds_count") == 3
