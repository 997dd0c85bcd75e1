"""benchmarks/cpu_prefill.py on a tiny model: both tables and the JSON (the LiSA model's time in
its two attentions, none in them for the base model), and one error line (exit 2) for a model
without an adapter, lengths out of range and a missing adapter file."""
import json
from pathlib import Path

from tests.fixtures import run_script, tiny_model_with_adapter

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_prefill.py"


def test_cpu_prefill_tables_and_json(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    out = tmp_path / "prefill.json"
    result = run_script(SCRIPT, "--model", model, "--lisa", adapter, "--lengths", 20, 70, "--dtype", "float32",
                        "--ops", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "seconds in each op" in result.stdout and "2 of" in result.stdout
    report = json.loads(out.read_text())
    assert report["lisa_layers"] == [1, 2]
    assert [(r["model"], r["tokens"]) for r in report["rows"]] == [("base", 20), ("base", 70), ("LiSA", 20),
                                                                   ("LiSA", 70)]
    assert all(r["seconds"] > 0 and r["dtype"] == "float32" for r in report["rows"])
    ops = {(r["model"], r["tokens"]): r for r in report["ops"]}
    for length in (20, 70):
        base, lisa = ops["base", length], ops["LiSA", length]
        assert base["lisa_attention"] == base["paged_attention_scores"] == 0.0 and base["linear"] > 0
        assert lisa["lisa_attention"] > 0 and lisa["paged_attention_scores"] > 0
        assert lisa["total"] >= lisa["linear"]


def test_cpu_prefill_bad_input_is_one_error_line(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    for args, fragment in (((), "no adapter"),
                           (("--lisa", adapter, "--lengths", 0), "--lengths"),
                           (("--lisa", adapter, "--lengths", 10, 100_000), "--lengths"),
                           (("--lisa", tmp_path / "none.safetensors"), "none.safetensors")):
        result = run_script(SCRIPT, "--model", model, "--dtype", "float32", "--lengths", 10, *args)
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        assert fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
