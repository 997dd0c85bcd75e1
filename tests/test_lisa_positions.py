"""benchmarks/lisa_positions.py on a tiny model: the table, a JSON whose buckets add up to
`perplexity`, and one error line (exit 2) for bad options and files."""
import json
import math
from pathlib import Path

import torch

from lisa_rt.eval import perplexity
from lisa_rt.model import load_model_dir
from tests.fixtures import CORPUS, run_script, tiny_model_adapter_and_text

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lisa_positions.py"


def _run(*args):
    return run_script(SCRIPT, *args)


def test_positions_table_and_json(tmp_path):
    model, adapter, text = tiny_model_adapter_and_text(tmp_path)
    out = tmp_path / "positions.json"
    result = _run("--model", model, "--text", text, "--lisa", f"mine={adapter}", "--lisa", adapter, "--ctx", 40,
                  "--buckets", "0,8,20", "--max-tokens", 300, "--json", out)
    assert result.returncode == 0, result.stderr
    assert "| positions | 0-8 | 8-20 | 20-39 | all |" in result.stdout
    assert "| mine / base |" in result.stdout and "| adapter / base |" in result.stdout
    report = json.loads(out.read_text())
    assert report["buckets"] == ["0-8", "8-20", "20-39", "all"]
    # 300 tokens: 7 windows of 40 and one of 20 -> 39 x 7 + 19 predictions
    assert report["predictions"][-1] == 39 * 7 + 19 == sum(report["predictions"][:-1])
    assert report["predictions"][0] == 8 * 8
    base = load_model_dir(model, dtype="float32", lisa=False)
    ids = base.tokenizer.encode(CORPUS)[:300]
    assert math.isclose(report["base_ppl"][-1], perplexity(base, ids, 40)["ppl"], rel_tol=1e-9)
    with_adapter = load_model_dir(model, dtype="float32", lisa=str(adapter))
    ratio = perplexity(with_adapter, ids, 40)["ppl"] / report["base_ppl"][-1]
    for row in report["adapters"]:
        assert row["layers"] == 2 and math.isclose(row["ratios"][-1], ratio, rel_tol=1e-9)
    assert torch.tensor(report["adapters"][0]["ratios"]).equal(torch.tensor(report["adapters"][1]["ratios"]))
    # windows shorter than the last bucket: that bucket is empty, shown as "-" and null
    result = _run("--model", model, "--text", text, "--lisa", adapter, "--ctx", 40, "--buckets", "0,8,20",
                  "--max-tokens", 15, "--json", out)
    assert result.returncode == 0, result.stderr
    assert "| predictions | 8 | 6 | 0 | 14 |" in result.stdout
    report = json.loads(out.read_text())
    assert report["base_ppl"][2] is None and report["adapters"][0]["ratios"][2] is None
    assert "| base ppl |" in result.stdout and " | - | " in result.stdout.split("| base ppl |")[1].splitlines()[0]


def test_positions_bad_input_is_one_error_line(tmp_path):
    model, adapter, text = tiny_model_adapter_and_text(tmp_path)
    for args, fragment in ((("--text", text), "no adapter"),
                           (("--text", text, "--lisa", tmp_path / "none.safetensors"), "none.safetensors"),
                           (("--text", tmp_path / "none.txt", "--lisa", adapter), "none.txt"),
                           (("--text", text, "--lisa", f"={adapter}"), "NAME=PATH"),
                           (("--text", text, "--lisa", adapter, "--buckets", "0,x"), "--buckets"),
                           (("--text", text, "--lisa", adapter, "--buckets", "4,8"), "--buckets"),
                           (("--text", text, "--lisa", adapter, "--ctx", 16, "--buckets", "0,15"), "--buckets"),
                           (("--text", text, "--lisa", adapter, "--ctx", 1), "--ctx")):
        result = _run("--model", model, *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and fragment in result.stderr, \
            (args, result.stderr)
        assert result.stderr.count("\n") == 1
