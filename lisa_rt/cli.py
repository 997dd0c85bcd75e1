"""The `lisa-rt` command: convert, info, generate, chat, eval, serve.

stdout carries only results (generated text, JSON); progress bars and speeds go to stderr.
Errors a user can cause end in one `error: ...` line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import UserError

EXIT_USAGE = 2


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
_positive_float = _number(float, lambda v: v > 0, "> 0", "a number")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="a lisa-rt dir, a .gguf file, an HF LLaMA dir, or an alias (default: smollm2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 on CUDA")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=_positive_int, default=256, help="tokens to generate (256)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 disables (0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 disables (0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 disables (1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not printed)")


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

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="the prompt; '-' reads stdin")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a UTF-8 file")
    _add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--verbose", action="store_true", help="print speeds on stderr")

    p = sub.add_parser("chat", help="interactive chat (/exit or Ctrl-D to leave)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--verbose", action="store_true", help="print speeds on stderr")

    p = sub.add_parser("eval", help="perplexity of a model over a UTF-8 text file")
    p.add_argument("model", nargs="?", default=None, help="model (default: smollm2)")
    p.add_argument("--text", required=True, help="the UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=1024,
                   help="window length in tokens; windows do not overlap (1024)")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="score only the first N tokens of the file (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 on CUDA")

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (needs lisa-rt[serve])")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port; 0 picks a free one (8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $LISA_RT_API_KEY, else none)")
    p.add_argument("--kv-cache-gb", type=_positive_float, default=None,
                   help="KV-cache memory in GB (default: sized by the engine)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=256,
                   help="most requests decoded at once (256)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's id in the API (default: the model's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level on stderr (info)")
    return parser


def _sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          seed=args.seed, stop=list(args.stop))


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

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _speeds(completion) -> str:
    t = completion.timings
    return (f"prompt {completion.prompt_tokens} tok in {t['prefill_s']:.3f} s "
            f"({t['prompt_tok_per_s']:.1f} tok/s); generated {completion.completion_tokens} tok, "
            f"decode {t['decode_tok_per_s']:.1f} tok/s")


def cmd_generate(args) -> int:
    from .engine import generate

    params = _sampling_params(args)
    prompt = _read_prompt(args)
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat")
    model = _load(args)
    tok = model.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
    on_text = None if args.json else (lambda _index, delta: _write(delta))
    completion = generate(model, [ids], params, on_text=on_text)[0]
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


def cmd_chat(args) -> int:
    from .engine import generate

    params = _sampling_params(args)
    model = _load(args)
    tok = model.tokenizer
    if not tok.has_chat_template:
        raise UserError(f"{model.path}: this model has no chat template")
    history = [{"role": "system", "content": args.system}] if args.system is not None else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(history)
        if len(ids) >= model.max_context:
            history.pop()
            print("error: the conversation no longer fits the context; start a new chat",
                  file=sys.stderr)
            continue
        completion = generate(model, [ids], params, on_text=lambda _i, delta: _write(delta))[0]
        _write("\n")
        history.append({"role": "assistant", "content": completion.text})
        if args.verbose:
            print(_speeds(completion), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    start = time.perf_counter()
    out = convert(args.src, args.out, dtype=args.dtype, force=args.force)
    print(f"converted {args.src} -> {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def model_info(model_dir) -> dict:
    """What `lisa-rt info` reports, without loading the weights."""
    from pathlib import Path

    from .checkpoint import load_config, tokenizer_kind

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[config.torch_dtype]
    return {
        "path": str(model_dir),
        "config": config.to_dict(),
        "parameters": config.num_parameters(),
        "weight_bytes": weight_bytes,
        "tokenizer": tokenizer_kind(model_dir),
        "kv_cache_bytes_per_token": {"float32": config.kv_bytes_per_token(4),
                                     "bfloat16": config.kv_bytes_per_token(2),
                                     "stored_dtype": config.kv_bytes_per_token(element)},
        "lisa_layers": [],
    }


def cmd_info(args) -> int:
    from .registry import resolve_model

    info = model_info(resolve_model(args.model))
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
        f"KV cache       {kv['bfloat16']:,} B/token in bf16, {kv['float32']:,} B/token in fp32",
        "LiSA layers    none",
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


def cmd_eval(args) -> int:
    from .eval import perplexity

    if args.ctx < 2:
        raise UserError(f"--ctx must be >= 2, got {args.ctx}")
    text = _read_text(args.text)  # fail before the (slow) model load
    model = _load(args)
    if args.ctx > model.max_context:
        raise UserError(f"--ctx {args.ctx} exceeds the model's context of {model.max_context}")
    ids = model.tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise UserError(f"{args.text}: {len(ids)} token(s); perplexity needs at least 2")
    result = perplexity(model, ids, args.ctx, progress=not args.json)
    if args.json:
        _write(json.dumps({"ppl": result["ppl"], "tokens": result["tokens"], "lisa_layers": 0,
                           "num_layers": model.config.num_layers}) + "\n")
    else:
        seconds = result["seconds"]
        _write(f"ppl {result['ppl']:.4f} over {result['tokens']} tokens "
               f"({result['windows']} windows of up to {args.ctx}) in {seconds:.2f} s, "
               f"{result['tokens'] / max(seconds, 1e-9):.1f} tok/s\n")
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
              model_name=args.served_model_name, log_level=args.log_level, on_ready=ready)
    except KeyboardInterrupt:
        pass
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "info": cmd_info,
            "eval": cmd_eval, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
