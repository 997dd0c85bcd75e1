"""benchmarks/fit_speed.py on a tiny model: both tables and the JSON, and one error line (exit 2)
for a model without an adapter or bad sizes."""
import json
from pathlib import Path

import pytest

from lisa_rt import ops
from tests.fixtures import run_script, tiny_model_with_adapter

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fit_speed.py"

pytestmark = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")


def _run(*args):
    return run_script(SCRIPT, *args)


def test_fit_speed_tables_and_json(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    out = tmp_path / "speed.json"
    result = _run("--model", model, "--lisa", adapter, "--seq-lens", "5,17", "--step-seq-len", 16, "--repeats", 1,
                  "--json", out)
    assert result.returncode == 0, result.stderr
    assert "| n = 5 |" in result.stdout and "| n = 17 |" in result.stdout and "end-to-end step" in result.stdout
    report = json.loads(out.read_text())
    assert [row["seq_len"] for row in report["aligner"]] == [5, 17]
    step = report["end_to_end_step"]
    assert step["lisa_layers"] == 2 and step["kernel_s"] > 0 and step["torch_s"] > 0
    assert abs(step["speedup"] - step["torch_s"] / step["kernel_s"]) < 1e-9


def test_fit_speed_bad_input_is_one_error_line(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    for args, fragment in (((), "no adapter"), (("--lisa", adapter, "--seq-lens", "8,x"), "--seq-lens"),
                           (("--lisa", adapter, "--step-seq-len", 4), "--step-seq-len"),
                           (("--lisa", tmp_path / "none.safetensors"), "none.safetensors")):
        result = _run("--model", model, *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
