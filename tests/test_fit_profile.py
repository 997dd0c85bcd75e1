"""benchmarks/fit_profile.py on a tiny model on the CPU: the step's times, the top ops (the
aligner's CPU kernels among them) and the JSON; one error line (exit 2) for bad options."""
import json
from pathlib import Path

from tests.fixtures import run_script, tiny_model_with_adapter

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fit_profile.py"


def test_fit_profile_table_and_json(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    out = tmp_path / "profile.json"
    result = run_script(SCRIPT, "--model", model, "--lisa", adapter, "--device", "cpu", "--batch", 2,
                        "--seq-len", 24, "--steps", 1, "--warmup", 1, "--top", 1000, "--json", out)
    assert result.returncode == 0, result.stderr
    assert "2 LiSA layers, batch 2 x 24 tokens" in result.stdout and "aten::mm" in result.stdout
    report = json.loads(out.read_text())
    assert report["lisa_layers"] == [1, 2] and report["step_ms"] > 0 and report["teacher_ms"] > 0
    ops = {row["op"]: row for row in report["top"]}
    # Two LiSA layers, each aligned once forward and once backward a step.
    assert ops["lisa_rt::causal_head_align"]["calls/step"] == 2
    assert ops["lisa_rt::causal_head_align_backward"]["calls/step"] == 2
    listed = sum(row["ms/step"] for row in report["top"])  # each rounded to 0.01 ms
    assert 0 < listed <= report["profiled_ms_per_step"] + 0.005 * len(report["top"])


def test_fit_profile_bad_input_is_one_error_line(tmp_path):
    model, adapter = tiny_model_with_adapter(tmp_path)
    for args, fragment in ((("--batch", 0), "--batch"),
                           (("--seq-len", 100_000), "--seq-len"),
                           (("--device", "tpu"), "tpu"),
                           (("--lisa", tmp_path / "none.safetensors"), "none.safetensors"),
                           (("--model", tmp_path / "nothing"), "nothing")):
        result = run_script(SCRIPT, "--model", model, "--device", "cpu", "--steps", 1, *args)
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        assert fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
