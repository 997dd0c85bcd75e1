"""benchmarks/lisa_layer_costs.py on a tiny model: one row per adapter layer, a JSON file, and
a one-line error (exit 2) for a model without an adapter and for missing files."""
import json
from pathlib import Path

from tests.fixtures import run_script, tiny_model_adapter_and_text

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lisa_layer_costs.py"


def _run(*args):
    return run_script(SCRIPT, *args)


def test_layer_costs_table_and_json(tmp_path):
    model, adapter, text = tiny_model_adapter_and_text(tmp_path)
    out = tmp_path / "costs.json"
    result = _run("--model", model, "--lisa", adapter, "--held-out", text, "--ctx", 64, "--max-tokens", 400,
                  "--json", out)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert sorted(int(row.split("|")[1]) for row in rows) == [1, 2]
    report = json.loads(out.read_text())
    assert report["tokens"] == 400 and [row["layer"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:  # cost = whole adapter's ppl over the ppl without that layer
        assert abs(row["cost"] - report["lisa_ppl"] / row["ppl_without"]) < 1e-9


def test_layer_costs_bad_input_is_one_error_line(tmp_path):
    model, adapter, text = tiny_model_adapter_and_text(tmp_path)
    for args, fragment in ((("--held-out", text), "no adapter"),
                           (("--lisa", tmp_path / "none.safetensors", "--held-out", text), "none.safetensors"),
                           (("--lisa", adapter, "--held-out", tmp_path / "none.txt"), "none.txt")):
        result = _run("--model", model, *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and fragment in result.stderr
        assert result.stderr.count("\n") == 1
