"""The `lisa-rt` command: convert, fit, info, generate, chat, eval, bench, serve.

stdout carries only results (generated text, JSON); progress bars and speeds go to stderr.
Errors a user can cause end in one `error: ...` line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from .errors import UserError
from .speculative import MAX_SPECULATE

EXIT_USAGE = 2
SELF_SAMPLES = 32  # texts `fit --data self` samples from the model, unless --self-samples says


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line, like every other user error."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        raise UserError(f"{self.prog}: {message}")


def _number(parse, ok, requirement: str, kind: str):
    """An argparse type: parse the text, then require ok(value), with one-line errors."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return convert


_positive_int = _number(int, lambda v: v >= 1, ">= 1", "an integer")
_port = _number(int, lambda v: 0 <= v <= 65535, "in [0, 65535]", "a port number")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "> 0 and finite", "a number")
_openai_penalty = _number(float, lambda v: -2 <= v <= 2, "in [-2, 2]", "a number")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA and on CPUs with AVX2, else float32")
    p.add_argument("--quantize", default=None, choices=["q8_0", "q4_1"],
                   help="hold the matrix weights in 8-bit (q8_0) or 4-bit (q4_1) blocks of 32 (CPU "
                        "only): decode streams a third or a quarter of bfloat16's bytes")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="a lisa-rt dir, a .gguf file, an HF LLaMA dir, or an alias (default: smollm2)")
    _add_device_args(p)


def _add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="print how it runs (device, dtype, kernels, LiSA) and the speeds on stderr")


def _unescaped(text: str) -> str:
    """text with the backslash escapes a shell does not make (\\n, \\t, \\r, \\\\) turned into
    their characters: `--stop "\\n"` stops at a newline, as in llama.cpp. Other backslashes stay."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m[1]], text)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=_positive_int, default=256, help="tokens to generate (256)")
    p.add_argument("--temp", type=_non_negative_float, default=0.8, help="temperature; 0 = greedy (0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 disables (0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 disables (0.05)")
    p.add_argument("--repeat-penalty", type=_positive_float, default=1.0,
                   help="divides the logits of tokens in the prompt or output; 1 disables (1.0)")
    p.add_argument("--presence-penalty", type=_openai_penalty, default=0.0,
                   help="subtracted from the logits of tokens already generated; 0 disables (0)")
    p.add_argument("--frequency-penalty", type=_openai_penalty, default=0.0,
                   help="subtracted once per time a token was generated; 0 disables (0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--stop", action="append", default=[], type=_unescaped,
                   help=r"stop string (repeatable; not printed; \n, \t, \r and \\ are understood)")
    p.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="write JSON that this JSON schema accepts: the schema itself, or a file "
                        "holding it; '{\"type\": \"object\"}' for any JSON object")


def _add_speculate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", type=_draft_count, default=0, metavar="N",
                   help="speculative decoding: run up to N draft tokens a step, copied from where the "
                        "sequence's last tokens occurred before in it (prompt lookup), and keep those "
                        "the model would have drawn; the same output, faster where it repeats its "
                        f"input (0 = off; at most {MAX_SPECULATE})")


def _add_lisa_args(p: argparse.ArgumentParser):
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lisa", default=None, metavar="PATH",
                       help="run with this LiSA adapter (a lisa.safetensors file or its directory)")
    group.add_argument("--no-lisa", action="store_true",
                       help="run the base model, without the model's own LiSA adapter")
    return group


def _lisa_choice(args):
    """load_model's lisa argument: None (the model's own adapter), False, or a path."""
    return False if args.no_lisa else args.lisa


def _size_list(text: str) -> list[int]:
    """Comma-separated positive integers, in the order given, without repeats."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no value given")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return list(dict.fromkeys(values))


def _layer_list(text: str) -> list[int]:
    """Comma-separated layer numbers, ascending; a repeat stays, for the fit to refuse by name."""
    try:
        layers = sorted(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("no layer given")
    return layers


_fraction = _number(float, lambda v: 0 < v < 1, "in (0, 1)", "a number")
_non_negative_int = _number(int, lambda v: v >= 0, ">= 0", "an integer")
_non_negative_float = _number(float, lambda v: 0 <= v < math.inf, ">= 0 and finite", "a number")
_even_int = _number(int, lambda v: v >= 2 and v % 2 == 0, "even and >= 2", "an integer")
_draft_count = _number(int, lambda v: 0 <= v <= MAX_SPECULATE, f"in [0, {MAX_SPECULATE}]", "an integer")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="lisa-rt", description="Fast LLaMA-family inference with LiSA attention sharing.")
    parser.add_argument("--version", action="version", version=f"lisa-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", help="convert a GGUF file or HF LLaMA dir into a lisa-rt dir")
    p.add_argument("src", help="a .gguf file or a Hugging Face LLaMA directory")
    p.add_argument("out", help="the lisa-rt model directory to write")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 for GGUF, the source's for HF)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")

    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model", nargs="?", default=None, help="model (default: smollm2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_lisa_args(p)

    p = sub.add_parser("fit", help="fit a LiSA adapter to a model (layer selection + distillation)")
    p.add_argument("model", nargs="?", default=None, help="model (default: smollm2)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="calibration text: .txt or .jsonl files; 'self' samples text from the model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ratio", type=_fraction, default=None,
                       help="make floor(RATIO x layers) layers LiSA, the most shareable first (0.6)")
    which.add_argument("--layers", type=_layer_list, default=None,
                       help="exactly these layers, e.g. 5,6,9 (with --init: move the adapter onto them; "
                            "layers new to it start from head matching)")
    p.add_argument("--init", default=None, metavar="ADAPTER",
                   help="go on fitting this adapter (its rank and width, and its layers unless --layers "
                        "is given; no selection; layer-wise only for layers new to it, or for all with "
                        "--layerwise-steps when none are; --rank, a multiple of its rank, widens its delta first)")
    p.add_argument("--select", choices=("fitted", "jsd"), default=None,
                   help="how --ratio ranks layers: 'fitted' fits each layer alone and ranks by its cost to "
                        "the output (default); 'jsd' ranks by matched attention divergence (faster, worse)")
    p.add_argument("--min-layer", type=_positive_int, default=None,
                   help="shallowest layer --ratio may choose (1; shallow layers are fragile)")
    p.add_argument("--rank", type=_even_int, default=None,
                   help="rank r of the low-rank delta (max(8, d/8); at most the head dim d)")
    p.add_argument("--align-hidden", type=_positive_int, default=None,
                   help="width of the head aligner's FFN (default: the number of heads)")
    p.add_argument("--steps", type=_non_negative_int, default=200, help="end-to-end steps (200)")
    p.add_argument("--layerwise-steps", type=_non_negative_int, default=None,
                   help="layer-wise steps per LiSA layer (150; with --init, for the layers new to the "
                        "adapter only, and 0 when there are none)")
    p.add_argument("--layerwise-loss", choices=("attention", "output"), default="attention",
                   help="what the layer-wise phase matches: the attention distribution (default) or "
                        "what the attention block adds to the residual stream")
    p.add_argument("--layerwise-lr", type=_positive_float, default=None,
                   help="learning rate of the layer-wise phase (5 x --lr)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="calibration sequence length (256)")
    p.add_argument("--batch-size", type=_positive_int, default=2, help="sequences per step (2)")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="learning rate (2e-3)")
    p.add_argument("--attn-weight", type=_non_negative_float, default=0.1,
                   help="weight of the end-to-end attention term, each LiSA layer's attention KL from "
                        "what its own Q/K would give (0.1; 0: next-token distillation only)")
    p.add_argument("--max-sequences", type=_positive_int, default=256,
                   help="calibration sequences used at most (256), taken from the --data texts in "
                        "order: fit says what is left out")
    p.add_argument("--self-samples", type=_positive_int, default=None,
                   help=f"texts sampled for --data self ({SELF_SAMPLES}); only with it")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--out", default=None,
                   help="write the adapter file here (default: make it the model's own adapter)")
    p.add_argument("--force", action="store_true", help="replace an existing adapter")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(p)
    _add_lisa_args(p)
    p.add_argument("-p", "--prompt", default=None, help="the prompt; '-' reads stdin")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a UTF-8 file")
    _add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _add_speculate_arg(p)
    _add_verbose_arg(p)

    p = sub.add_parser("chat", help="interactive chat (/help lists its commands; /exit or Ctrl-D leaves)")
    _add_model_args(p)
    _add_lisa_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    _add_speculate_arg(p)
    _add_verbose_arg(p)

    p = sub.add_parser("eval", help="perplexity of a model over a UTF-8 text file")
    p.add_argument("model", nargs="?", default=None, help="model (default: smollm2)")
    p.add_argument("--text", required=True, help="the UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=None,
                   help="window length in tokens; windows do not overlap (1024, or the model's context "
                        "where it is shorter)")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="score only the first N tokens of the file (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_lisa_args(p)
    _add_device_args(p)

    p = sub.add_parser("bench", help="decode speed through the engine, with and without LiSA")
    p.add_argument("model", nargs="?", default=None, help="model (default: smollm2, unless --shape)")
    p.add_argument("--shape", default=None, choices=["smollm2", "llama2-7b", "llama3-8b"],
                   help="instead of a model: random weights of this shape, made on the device")
    group = _add_lisa_args(p)
    group.add_argument("--lisa-ratio", type=_fraction, default=None,
                       help="compare against a random adapter on this fraction of the layers "
                            "(default with --shape: 0.6; with a model: its own adapter)")
    p.add_argument("--batch", type=_size_list, default=[1, 8, 32, 64, 128],
                   help="batch sizes of the grid (1,8,32,64,128)")
    p.add_argument("--ctx", type=_size_list, default=[512, 2048],
                   help="contexts of the grid: tokens in the cache when decoding starts (512,2048)")
    p.add_argument("--max-batch-ctx", type=_size_list, default=None,
                   help="contexts at which to run the largest batch the KV budget holds "
                        "(default: the largest --ctx)")
    p.add_argument("--kv-budget-gb", type=_positive_float, default=None,
                   help="KV-cache memory, the same with and without LiSA (default: 70%% of the "
                        "GPU memory free after loading the model; 1 GiB on the CPU)")
    p.add_argument("--steps", type=_positive_int, default=32, help="timed decode steps per point (32)")
    p.add_argument("--warmup", type=_positive_int, default=3, help="untimed steps before them (3)")
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly on CUDA, without CUDA graphs")
    p.add_argument("--no-overlap", action="store_true",
                   help="read each decode step's tokens back before launching the next (CUDA overlaps them)")
    p.add_argument("--seed", type=int, default=0, help="random seed of weights, adapter and cache (0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here as JSON")
    _add_device_args(p)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (needs lisa-rt[serve])")
    _add_model_args(p)
    _add_lisa_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port; 0 picks a free one (8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $LISA_RT_API_KEY, else none)")
    p.add_argument("--kv-cache-gb", type=_positive_float, default=None,
                   help="KV-cache memory in GB (default: sized by the engine)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=256,
                   help="most requests decoded at once (256)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt in full, never reusing the cached keys and values of an "
                        "earlier prompt's same beginning")
    _add_speculate_arg(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model's id in the API (default: the model's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level on stderr (info)")
    p.add_argument("--shutdown-grace", type=_non_negative_float, default=5.0, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, what requests in flight get to finish before they are "
                        "cancelled (5)")
    return parser


def _sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=list(args.stop), json_schema=_json_schema(args.json_schema))


def _json_schema(value: str | None):
    """--json-schema: inline JSON (it starts with '{', or is `true`), or else a file of it."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{") and value.strip() != "true":
        try:
            text = Path(value).read_bytes().decode()
        except OSError as exc:
            raise UserError(f"cannot read the JSON schema file {value}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"the JSON schema file {value} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"--json-schema is not valid JSON: {exc}") from None


def _read_prompt(args) -> str:
    sources = [s for s in (args.prompt, args.file) if s is not None]
    if len(sources) != 1:
        raise UserError("give exactly one of -p/--prompt and -f/--file")
    if args.file is not None:
        try:
            data = open(args.file, "rb").read()
        except OSError as exc:
            raise UserError(f"{args.file}: {exc.strerror}") from None
        origin = args.file
    elif args.prompt == "-":
        data, origin = sys.stdin.buffer.read(), "stdin"
    else:
        return args.prompt
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{origin}: not valid UTF-8 (byte {exc.start})") from None


def _load(args):
    from . import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, lisa=_lisa_choice(args),
                      quantize=args.quantize)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _how_it_runs(model) -> str:
    """One line for --verbose: device, dtype (and quantized weights), the CPU kernels' path and
    threads, LiSA or not."""
    from . import ops
    import torch

    where = model.device.type
    if where == "cpu":
        where += f" ({ops.kernel_isa()} kernels, {torch.get_num_threads()} threads)"
    lisa = (f"LiSA on {len(model.lisa.layers)} of {model.config.num_layers} layers" if model.lisa is not None
            else "no LiSA")
    weights = f", weights {model.quantize}" if model.quantize else ""
    return f"running on {where}, {str(model.dtype).removeprefix('torch.')}{weights}, {lisa}"


def _speeds(completion) -> str:
    t = completion.timings
    cached = f" ({completion.cached_tokens} cached)" if completion.cached_tokens else ""
    drafts = (f" ({t['accepted_draft_tokens']} of {t['draft_tokens']} draft tokens kept)"
              if t["draft_tokens"] else "")
    return (f"prompt {completion.prompt_tokens} tok{cached} in {t['prefill_s']:.3f} s "
            f"({t['prompt_tok_per_s']:.1f} tok/s); generated {completion.completion_tokens} tok, "
            f"decode {t['decode_tok_per_s']:.1f} tok/s{drafts}")


def cmd_generate(args) -> int:
    from .engine import generate

    params = _sampling_params(args)
    prompt = _read_prompt(args)
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat")
    model = _load(args)
    if args.verbose:
        print(_how_it_runs(model), file=sys.stderr)
    tok = model.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
    on_text = None if args.json else (lambda _index, delta: _write(delta))
    completion = generate(model, [ids], params, on_text=on_text, speculate=args.speculate)[0]
    if args.json:
        _write(json.dumps({"text": completion.text, "finish_reason": completion.finish_reason,
                           "prompt_tokens": completion.prompt_tokens,
                           "completion_tokens": completion.completion_tokens,
                           "timings": completion.timings}, ensure_ascii=False) + "\n")
    else:
        _write("\n")
    if args.verbose:
        print(_speeds(completion), file=sys.stderr)
    return 0


def _chat_engine(model, tokens: int, speculate: int):
    """The engine of one conversation, kept across turns so that a turn prefills only what its
    prefix cache lacks (mostly the new message and what follows the last reply)."""
    from .engine import Engine

    return Engine(model, model.new_cache([tokens]), max_num_seqs=1, speculate=speculate)


def _chat_cache_tokens(model, held: int, tokens: int) -> int:
    """The cache a conversation's turn of `tokens` tokens needs, where it holds `held` now: as
    it is if that is enough, else CHAT_CACHE_TOKENS at first, doubling, up to the context."""
    if tokens <= held:
        return held
    return min(max(tokens, 2 * held, CHAT_CACHE_TOKENS), model.max_context)


CHAT_CACHE_TOKENS = 1024


def cmd_chat(args) -> int:
    from .engine import run_to_completion
    from .tokenizer import check_unicode

    params = _sampling_params(args)
    model = _load(args)
    if args.verbose:
        print(_how_it_runs(model), file=sys.stderr)
    tok = model.tokenizer
    if not tok.has_chat_template:
        raise UserError(f"{model.path}: this model has no chat template")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = list(system)
    engine = None
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach check_unicode below
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:  # the prompt's line ends before the shell's
                print(file=sys.stderr)
            break
        command = line.rstrip()
        if command in ("/exit", "/quit"):
            break
        if command in ("/reset", "/clear"):
            history = list(system)
            print("(a new conversation)", file=sys.stderr)
            continue
        word = command.split()[0] if command.startswith("/") else ""
        if word[1:].isalpha():  # (a path such as /usr/bin is a message)
            print(CHAT_HELP if word == "/help" else f"unknown command {word}; {CHAT_HELP}", file=sys.stderr)
            continue
        if not command.strip():
            continue
        try:
            check_unicode(line)
        except UserError as exc:  # one bad line (bytes that are not UTF-8) ends no conversation
            print(f"error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(history)
        if len(ids) >= model.max_context:
            history.pop()
            print("error: the conversation no longer fits the context; /reset starts a new one",
                  file=sys.stderr)
            continue
        held = engine.cache.num_blocks * engine.cache.block_size if engine is not None else 0
        size = _chat_cache_tokens(model, held, len(ids) + min(params.max_tokens, model.max_context - len(ids)))
        try:
            if size > held:  # a larger cache, empty: the old one is let go before it is allocated
                engine = None
                engine = _chat_engine(model, size, args.speculate)
            completion = run_to_completion(engine, [ids], params, on_text=lambda _i, delta: _write(delta))[0]
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat; the exchange is dropped
            history.pop()
            engine = None  # the interrupted step may have left it half-done
            _write("\n")
            print("(interrupted; Ctrl-D or /exit leaves)", file=sys.stderr)
            continue
        _write("\n")
        history.append({"role": "assistant", "content": completion.text})
        if args.verbose:
            print(_speeds(completion), file=sys.stderr)
    return 0


CHAT_HELP = ("commands: /reset (or /clear) starts a new conversation, /exit (or /quit, Ctrl-D) leaves, "
             "/help shows this; Ctrl-C stops a reply; a message that starts with /word is sent as one "
             "after a space")


def cmd_convert(args) -> int:
    from .convert import convert

    start = time.perf_counter()
    out = convert(args.src, args.out, dtype=args.dtype, force=args.force)
    print(f"converted {args.src} -> {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def model_info(model_dir, lisa=None) -> dict:
    """What `lisa-rt info` reports, loading no model weights (only the adapter, which is small)."""
    from .checkpoint import load_config, tokenizer_kind
    from .lisa import find_adapter

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    adapter = find_adapter(model_dir, config, lisa)
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("model*.safetensors"))
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[config.torch_dtype]

    def kv(lisa_config) -> dict:
        return {"float32": config.kv_bytes_per_token(4, lisa_config),
                "bfloat16": config.kv_bytes_per_token(2, lisa_config),
                "stored_dtype": config.kv_bytes_per_token(element, lisa_config)}

    info = {
        "path": str(model_dir),
        "config": config.to_dict(),
        "parameters": config.num_parameters(),
        "weight_bytes": weight_bytes,
        "tokenizer": tokenizer_kind(model_dir),
        "kv_cache_bytes_per_token": kv(None),
        "lisa": None,
        "lisa_layers": [],
    }
    if adapter is not None:
        with_lisa = kv(adapter.config)
        info["lisa"] = {**adapter.config.to_dict(), "path": str(adapter.path),
                        "kv_cache_bytes_per_token": with_lisa,
                        "tokens_in_same_memory": round(info["kv_cache_bytes_per_token"]["float32"]
                                                       / with_lisa["float32"], 4)}
        info["lisa_layers"] = list(adapter.config.layers)
    return info


def cmd_info(args) -> int:
    from .registry import resolve_model

    info = model_info(resolve_model(args.model), lisa=_lisa_choice(args))
    if args.json:
        _write(json.dumps(info, indent=2) + "\n")
        return 0
    c = info["config"]
    kv = info["kv_cache_bytes_per_token"]
    lines = [
        f"model          {info['path']}",
        f"architecture   {c['arch']}: {c['num_layers']} layers, hidden {c['hidden_size']}, "
        f"FFN {c['intermediate_size']}, {c['num_heads']} heads / {c['num_kv_heads']} KV heads "
        f"of dim {c['head_dim']}",
        f"vocabulary     {c['vocab_size']} ({info['tokenizer']} tokenizer)",
        f"context        {c['max_position_embeddings']} (rope theta {c['rope_theta']:g}"
        + (f", {c['rope_scaling']['rope_type']} scaling" if c["rope_scaling"] else "") + ")",
        f"parameters     {info['parameters']:,} ({info['weight_bytes'] / 1e6:.1f} MB as {c['torch_dtype']})",
        f"tied embedding {c['tie_word_embeddings']}",
        f"KV cache       {kv['bfloat16']:,} B/token in bf16, {kv['float32']:,} B/token in fp32 (without LiSA)",
    ]
    lisa = info["lisa"]
    if lisa is None:
        lines.append("LiSA           none")
    else:
        quality = lisa["quality"]
        measured = (f"; fitted held-out ppl {_quality_number(quality, 'lisa_ppl', 'g')} vs "
                    f"{_quality_number(quality, 'base_ppl', 'g')} base "
                    f"({_quality_number(quality, 'ppl_ratio', 'g')}x)" if "ppl_ratio" in quality else "")
        lines += [
            f"LiSA           {len(lisa['layers'])} of {c['num_layers']} layers, rank {lisa['rank']}, "
            f"aligner width {lisa['align_hidden']} ({lisa['path']}){measured}",
            f"LiSA layers    {', '.join(map(str, lisa['layers']))}",
            f"KV with LiSA   {lisa['kv_cache_bytes_per_token']['bfloat16']:,} B/token in bf16, "
            f"{lisa['kv_cache_bytes_per_token']['float32']:,} in fp32: "
            f"{lisa['tokens_in_same_memory']:.2f}x the tokens in the same memory",
        ]
    _write("\n".join(lines) + "\n")
    return 0


def _read_text(path: str) -> str:
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    if not text:
        raise UserError(f"{path}: the file is empty")
    return text


def _json_ppl(ppl: float) -> dict:
    """{"ppl": ppl} in strict JSON, which has no inf or NaN: a perplexity past float64's range
    (eval.perplexity_of's inf) or NaN is null, with "ppl_note" saying which and why (as the
    perplexities an adapter's quality record holds)."""
    from .config import PPL_NOT_FINITE, finite_or_note

    return finite_or_note("ppl", ppl, PPL_NOT_FINITE)


def _quality_number(quality: dict, key: str, spec: str) -> str:
    """A number of an adapter's quality record for the text output: a null (strict JSON's inf or
    NaN) is shown as its note names it ("inf", "nan")."""
    value = quality.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    note = quality.get(f"{key}_note")
    return note.split(":", 1)[0] if isinstance(note, str) and ":" in note else "?"


def cmd_eval(args) -> int:
    from .eval import perplexity

    if args.ctx is not None and args.ctx < 2:
        raise UserError(f"--ctx must be >= 2, got {args.ctx}")
    text = _read_text(args.text)  # fail before the (slow) model load
    model = _load(args)
    if args.ctx is None:  # the default fits every model, not only those of 1024+ tokens
        args.ctx = min(1024, model.max_context)
    if args.ctx > model.max_context:
        raise UserError(f"--ctx {args.ctx} exceeds the model's context of {model.max_context}")
    ids = model.tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise UserError(f"{args.text}: {len(ids)} token(s); perplexity needs at least 2")
    result = perplexity(model, ids, args.ctx, progress=not args.json)
    if args.json:
        lisa_layers = len(model.lisa.layers) if model.lisa is not None else 0
        _write(json.dumps({**_json_ppl(result["ppl"]), "tokens": result["tokens"], "lisa_layers": lisa_layers,
                           "num_layers": model.config.num_layers}) + "\n")
    else:
        seconds = result["seconds"]
        tokens, windows = result["tokens"], result["windows"]
        _write(f"ppl {result['ppl']:.4f} over {tokens} token{'s' * (tokens != 1)} "
               f"({windows} window{'s' * (windows != 1)} of up to {args.ctx}) in {seconds:.2f} s, "
               f"{result['tokens'] / max(seconds, 1e-9):.1f} tok/s\n")
    return 0


def cmd_fit(args) -> int:
    from .checkpoint import check_writable, load_config, load_tensors
    from .fit import FitOptions, Fitter, fills_sequences, make_sequences, read_texts, sample_self_texts
    from .lisa import ADAPTER_FILE, install_adapter, load_adapter, save_adapter
    import torch

    from .model import Model, parse_device
    from .registry import resolve_model
    from .tokenizer import load_tokenizer

    if args.self_samples is not None and "self" not in args.data:  # it would be ignored, not obeyed
        raise UserError("--self-samples is for --data self: not allowed without it")
    self_samples = args.self_samples if args.self_samples is not None else SELF_SAMPLES
    # Each text with the --data entry it came from, to name what --max-sequences leaves out.
    # 'self' is sampled once, and its samples go where it first stands in --data.
    texts, sources, self_at = [], [], None
    for name in args.data:
        if name == "self":
            self_at = len(texts) if self_at is None else self_at
        else:
            read = read_texts([name])  # fails on bad data before the (slow) model load
            texts += read
            sources += [name] * len(read)
    device = parse_device(args.device)
    model_dir = resolve_model(args.model)
    out = Path(args.out) if args.out is not None else model_dir / ADAPTER_FILE
    check_writable(out, "--out")  # before the fit, not after it
    if out.exists() and not args.force:
        raise UserError(f"{out}: exists (use --force to replace it)")
    config = load_config(model_dir)
    init = None
    if args.init is not None:
        shaping = [flag for flag, value in (("--ratio", args.ratio),
                                            ("--align-hidden", args.align_hidden), ("--select", args.select),
                                            ("--min-layer", args.min_layer)) if value is not None]
        if shaping:
            raise UserError(f"--init goes on from the adapter's own width, and its layers unless --layers "
                            f"names them: "
                            f"{', '.join(shaping)} not allowed with it")
        init = load_adapter(args.init, config)
    options = FitOptions(layers=args.layers, ratio=args.ratio if args.ratio is not None else 0.6,
                         min_layer=args.min_layer, select=args.select, rank=args.rank,
                         align_hidden=args.align_hidden, steps=args.steps,
                         layerwise_steps=args.layerwise_steps,
                         layerwise_loss=args.layerwise_loss, layerwise_lr=args.layerwise_lr,
                         seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, attn_weight=args.attn_weight,
                         max_sequences=args.max_sequences, seed=args.seed, init=init)
    options.validate(config)  # --layers too: in range, no repeats, no --min-layer or --select beside it
    tensors = load_tensors(model_dir, config)
    tokenizer = load_tokenizer(model_dir, extra_eos_ids=config.eos_token_ids)
    # The texts are used in --data order up to --max-sequences: when the files before 'self'
    # already fill it, no sample would be read, and sampling (minutes) is skipped.
    self_skipped = self_at is not None and fills_sequences(tokenizer, texts[:self_at], args.seq_len,
                                                           args.max_sequences)
    if self_at is not None and not self_skipped:
        print(f"sampling {self_samples} calibration texts from the model ...", file=sys.stderr)
        model = Model(config, tensors, device, torch.float32, tokenizer=tokenizer)
        samples = sample_self_texts(model, self_samples, args.seq_len, args.seed)
        texts[self_at:self_at] = samples
        sources[self_at:self_at] = ["self"] * len(samples)
        del model
    sequences, used, whole = make_sequences(tokenizer, texts, args.seq_len, args.max_sequences)
    if whole < len(texts) or self_skipped:
        # whole <= self_at where self is skipped: it stands among what is left out, in its place.
        left = sources[whole:self_at] + ["self"] + sources[self_at:] if self_skipped else sources[whole:]
        left_out = [name if name not in sources[:used] else f"the rest of {name}" for name in dict.fromkeys(left)]
        print(f"fit: --max-sequences {args.max_sequences} is reached before the end of the data: "
              f"{', '.join(left_out)} not used" + (" (no text sampled from the model)" if self_skipped else ""),
              file=sys.stderr)
    result = Fitter(config, tensors, sequences, options, device).run()
    adapter = result.adapter
    # The data it read: not what --max-sequences left out whole.
    adapter.config.fit["data"] = [Path(name).name if name != "self" else "self" for name in args.data
                                  if name in sources[:used]]
    if init is not None:
        adapter.config.fit["init"]["file"] = Path(args.init).name
    chosen = set(adapter.config.layers)
    if result.selection:  # a refit chooses nothing
        _write("layer  JSD same head  JSD matched  fitted KL  LiSA\n")
    for row in result.selection:
        fitted = f"{row['fitted_kl']:.4f}" if "fitted_kl" in row else "-"
        _write(f"{row['layer']:>5}  {row['jsd_same_head']:>13.4f}  {row['jsd_matched']:>11.4f}  {fitted:>9}  "
               f"{'yes' if row['layer'] in chosen else ''}\n")
    if args.out is None:
        path = install_adapter(model_dir, adapter, config)
    else:
        path = save_adapter(out, adapter, config)
    q = result.quality
    _write(f"{len(chosen)} of {config.num_layers} layers LiSA, rank {adapter.config.rank}; held-out ppl "
           f"{_quality_number(q, 'lisa_ppl', '.4f')} vs {_quality_number(q, 'base_ppl', '.4f')} base "
           f"({_quality_number(q, 'ppl_ratio', '.4f')}x) over {q['held_out_tokens']} tokens; wrote {path}\n")
    return 0


def cmd_bench(args) -> int:
    import torch

    from . import bench
    from .checkpoint import check_writable, load_config, load_tensors, write_text_atomically
    from .config import ModelConfig
    from .lisa import find_adapter
    from .model import Model, parse_device, parse_dtype
    from .registry import resolve_model
    from .tokenizer import load_tokenizer

    if args.shape and args.model:
        raise UserError("give a model or --shape, not both")
    if args.shape and args.lisa:
        raise UserError("--lisa PATH needs a model (--shape benchmarks a random adapter; see --lisa-ratio)")
    if args.json:
        check_writable(args.json, "--json")  # before minutes of measuring
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    if args.shape:
        shape = bench.SHAPES[args.shape]
        config = ModelConfig(**shape)
    else:
        path = resolve_model(args.model)
        config = load_config(path)
    options = bench.BenchOptions(
        batches=args.batch, contexts=args.ctx, steps=args.steps, warmup=args.warmup,
        max_batch_contexts=args.max_batch_ctx, cuda_graphs=not args.no_graphs, overlap=not args.no_overlap,
        seed=args.seed,
        kv_budget_bytes=int(args.kv_budget_gb * 2**30) if args.kv_budget_gb else None)
    options.validate(config)  # before the weights load (Bench.run checks again, for library callers)
    if args.shape:
        adapter = (None if args.no_lisa else
                   bench.random_adapter(config, args.lisa_ratio or bench.DEFAULT_LISA_RATIO, seed=args.seed))

        def build(lisa: bool) -> Model:
            return bench.random_model(shape, device, dtype, args.seed, adapter if lisa else None,
                                      quantize=args.quantize)
        name = f"{args.shape}-shaped, random weights"
    else:
        if args.lisa_ratio is not None:
            adapter = bench.random_adapter(config, args.lisa_ratio, seed=args.seed)
        else:
            adapter = find_adapter(path, config, _lisa_choice(args))
        tensors = load_tensors(path, config)
        tokenizer = load_tokenizer(path, extra_eos_ids=config.eos_token_ids)

        def build(lisa: bool) -> Model:
            return Model(config, tensors, device, dtype, tokenizer=tokenizer, path=path,
                         adapter=adapter if lisa else None, quantize=args.quantize)
        name = str(path)
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    with torch.inference_mode():
        result = bench.Bench(build, options, device, log=log).run(lisa=adapter is not None)
    result.update(model=name, dtype=str(dtype).removeprefix("torch."), quantize=args.quantize)
    if args.json:
        write_text_atomically(args.json, json.dumps(result, indent=2) + "\n")
    weights = f", weights {args.quantize}" if args.quantize else ""
    _write(f"model: {name}, {result['dtype']}{weights}\n" + bench.report(result))
    return 0


def cmd_serve(args) -> int:
    import signal
    import threading

    from .server import bind_socket, serve  # a UserError naming `pip install 'lisa-rt[serve]'`

    api_key = args.api_key if args.api_key is not None else os.environ.get("LISA_RT_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty")
    sock = bind_socket(args.host, args.port)  # fail on a busy port before loading the model

    def ready(url: str) -> None:
        print(f"lisa-rt: serving {args.model or 'smollm2'} at {url}/v1 (Ctrl-C to stop)",
              file=sys.stderr, flush=True)

    # SIGTERM (uvicorn re-raises it once it has shut down) exits cleanly, like Ctrl-C.
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.model, sock=sock, api_key=api_key, device=args.device, dtype=args.dtype,
              kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
              model_name=args.served_model_name, log_level=args.log_level, on_ready=ready,
              lisa=_lisa_choice(args), shutdown_grace=args.shutdown_grace,
              prefix_caching=not args.no_prefix_caching, quantize=args.quantize,
              speculate=args.speculate)
    except KeyboardInterrupt:
        pass
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "info": cmd_info,
            "eval": cmd_eval, "serve": cmd_serve, "fit": cmd_fit, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # named by the subcommand they were given to
            given = sys.argv[1:] if argv is None else argv
            before = (args.command in given and unknown[0] in given
                      and given.index(unknown[0]) < given.index(args.command))
            raise UserError(f"lisa-rt {args.command}: unrecognized arguments: {' '.join(unknown)}"
                            + (f" (options go after the subcommand: lisa-rt {args.command} ...)" if before else ""))
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a full disk is reported here, not by the interpreter at exit
        return status
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _discard_stdout()
        return 0
    except OSError as exc:  # what the system refused (a full disk, a vanished file): one line too
        where = f"{exc.filename}: " if exc.filename else "writing the output: " if exc.errno == errno.ENOSPC else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        _discard_stdout()
        return EXIT_USAGE


def _discard_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's last flush of what could not be
    written does not fail again with a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (captured): nothing will be flushed to it
        pass


if __name__ == "__main__":
    sys.exit(main())
