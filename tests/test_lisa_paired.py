"""benchmarks/lisa_paired.py on a tiny model: the table and the JSON (batches as given and the
largest each cache holds, LiSA's more than the base model's; a batch past the budget skipped), and
one error line (exit 2) for bad options, a model without an adapter, a context past the model's
and a budget no point fits."""
import json
from pathlib import Path

from tests.fixtures import run_script, tiny_model_with_adapter

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lisa_paired.py"
# The tiny model caches 768 B/token in float32: 8 blocks of 16 tokens of base in this budget (and
# more of LiSA, whose 2 layers cache low-rank keys).
BUDGET_GB = 98_304 / 2**30


def test_lisa_paired_table_and_json(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    out = tmp_path / "paired.json"
    result = run_script(SCRIPT, "--model", model, "--lisa", adapter, "--contexts", "20", "--batches", "2,5,max",
                        "--steps", 2, "--warmup", 1, "--kv-budget-gb", BUDGET_GB, "--dtype", "float32",
                        "--json", out)
    assert result.returncode == 0, result.stderr
    assert "LiSA/base" in result.stdout and "command: python benchmarks/lisa_paired.py" in result.stdout
    report = json.loads(out.read_text())
    assert report["lisa_layers"] == [1, 2] and report["steps"] == 2
    fixed, too_many, largest = report["rows"]
    assert fixed["batch"] == 2 and fixed["base batch"] == fixed["LiSA batch"] == 2
    assert too_many == {"context": 20, "batch": 5,
                        "skipped": "the KV budget holds 4 sequence(s) of 24 tokens of the base model"}
    # 24 tokens a sequence (20 + 1 warm-up + 2 steps + 1): two blocks each.
    assert largest["batch"] == "max" and largest["base batch"] == 4 and largest["LiSA batch"] > 4
    for row in (fixed, largest):
        assert row["base step ms"] > 0 and row["LiSA step ms"] > 0
        assert abs(row["LiSA/base"] - row["LiSA tok/s"] / row["base tok/s"]) < 0.01


def test_lisa_paired_bad_input_is_one_error_line(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    for args, fragment in (((), "no adapter"),
                           (("--lisa", adapter, "--batches", "2,x"), "--batches"),
                           (("--lisa", adapter, "--contexts", "0"), "--contexts"),
                           (("--lisa", adapter, "--steps", 0), "--steps"),
                           (("--lisa", adapter, "--kv-budget-gb", 0), "--kv-budget-gb"),
                           (("--lisa", adapter, "--kv-budget-gb", "nan"), "--kv-budget-gb"),
                           (("--lisa", adapter, "--kv-budget-gb", 1e6), "do not fit this machine"),
                           (("--lisa", adapter, "--contexts", 100_000), "exceeds the model's context"),
                           (("--lisa", adapter, "--contexts", 500, "--kv-budget-gb", BUDGET_GB),
                            "holds 0 sequence(s) at context 500"),
                           (("--lisa", adapter, "--batches", 5, "--steps", 2, "--warmup", 1,
                             "--kv-budget-gb", BUDGET_GB), "holds 4 sequence(s) at context 20"),
                           (("--lisa", tmp_path / "none.safetensors"), "none.safetensors")):
        result = run_script(SCRIPT, "--model", model, "--dtype", "float32", "--contexts", 20, *args)
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        assert fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
