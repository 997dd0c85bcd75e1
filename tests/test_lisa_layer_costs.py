"""benchmarks/lisa_layer_costs.py on a tiny model: one row per adapter layer, a JSON file, and
a one-line error (exit 2) for a model without an adapter and for missing files."""
import json
import subprocess
import sys
from pathlib import Path

from lisa_rt.checkpoint import load_config
from lisa_rt.lisa import save_adapter
from tests.fixtures import CORPUS, tiny_model_dir
from tests.test_lisa_model import random_adapter

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lisa_layer_costs.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_layer_costs_table_and_json(tmp_path):
    model = tiny_model_dir(tmp_path / "model", seed=3)
    config = load_config(model)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(adapter, random_adapter(config, [1, 2]), config)
    text = tmp_path / "text.txt"
    text.write_text(CORPUS, encoding="utf-8")
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
    model = tiny_model_dir(tmp_path / "model", seed=3)
    text = tmp_path / "text.txt"
    text.write_text(CORPUS, encoding="utf-8")
    config = load_config(model)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(adapter, random_adapter(config, [1, 2]), config)
    for args, fragment in ((("--held-out", text), "no adapter"),
                           (("--lisa", tmp_path / "none.safetensors", "--held-out", text), "none.safetensors"),
                           (("--lisa", adapter, "--held-out", tmp_path / "none.txt"), "none.txt")):
        result = _run("--model", model, *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and fragment in result.stderr
        assert result.stderr.count("\n") == 1
