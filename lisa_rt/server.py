"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health.

    app = create_app(LLM("smollm2"))       # a FastAPI app, e.g. for tests or another ASGI server
    serve("smollm2", port=8000)            # loads the model and runs uvicorn on 127.0.0.1

Requests are validated here and handed to the engine through the LLM's async API (submit and
aevents), so the event loop never waits on the model. Streams are server-sent events
(`data: {...}` chunks, then `data: [DONE]`). A client that goes away, mid-stream or while it
waits for a whole answer, cancels its requests and so frees their KV-cache blocks. Every error
has OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a 4xx status.

FastAPI and uvicorn are an optional extra (`pip install 'lisa-rt[serve]'`).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hmac
import json
import math
import socket
import sys
import time
import uuid
from typing import Any, AsyncIterator, NamedTuple

from .errors import UserError
from .tokenizer import CHAT_ROLES, ChatMessageError, chat_messages, check_unicode

INSTALL_HINT = "pip install 'lisa-rt[serve]'"


class MissingServeDependencies(UserError, ImportError):
    """FastAPI or uvicorn is not installed: one line that says how to install them."""


try:
    import anyio
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.config import LOGGING_CONFIG
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingServeDependencies(
        f"the HTTP server needs FastAPI and uvicorn ({_exc.name or _exc} is missing): "
        f"{INSTALL_HINT}") from None

MAX_BODY_BYTES = 1 << 20          # larger request bodies get 413 before any parsing
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
# Every stop string is matched against every generated character on the engine thread, which
# all requests share: a request may name this many (OpenAI allows 4).
MAX_STOP_STRINGS = 16
# Choices a request may ask for per prompt (`n`), and in all (prompts x n): each is a sequence
# of its own in the engine, and a 1 MiB body could otherwise list hundreds of thousands.
MAX_CHOICES = 128
MAX_SEQUENCES = 1024
# What a request still running when the server is told to stop has to finish by default (a
# rolling restart loses nothing shorter); then it is cancelled. uvicorn cancels a request
# mid-response only SHUTDOWN_MARGIN_S after that, should an engine step take that long to end.
SHUTDOWN_GRACE_S = 5.0
SHUTDOWN_MARGIN_S = 10.0
UNSUPPORTED_IF_SET = {            # OpenAI parameters lisa-rt does not implement
    "echo": "/v1/completions echoes prompts, chat does not", "suffix": "no insertion",
    "tools": "no tool calls", "tool_choice": "no tool calls", "functions": "no function calls",
    "function_call": "no function calls",
}
# Values of those parameters that ask for nothing lisa-rt lacks, as clients send them by
# default: no tool call ("none", or "auto" with no tools to choose from), an empty suffix.
UNSET = (None, False, 0, [], {})
NOT_ASKING = {"suffix": ("",), "tool_choice": ("none",), "function_call": ("none",)}
NOT_ASKING_WITHOUT = {"tool_choice": "tools", "function_call": "functions"}  # "auto" needs these


# --- errors -----------------------------------------------------------------------------------

class APIError(Exception):
    """An error sent to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# What a request still running when the server has stopped waiting for it gets: a 503, or this
# as the stream's last event.
SHUTTING_DOWN = APIError(503, "the server is shutting down: the request was cancelled",
                         type="server_error", code="unavailable")


def _error_response(status: int, message: str, type: str = "invalid_request_error",
                    param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status, headers=headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _failed(exc: Exception) -> APIError:
    """What a client is told of its request failing inside the engine: a UserError is the
    request's own doing (a schema the model's tokens cannot follow), a 400; anything else 500."""
    from .json_constraint import JsonConstraintError

    if isinstance(exc, JsonConstraintError):
        return _bad(f"the output cannot follow 'response_format': {exc}", param="response_format",
                    code="invalid_value")
    if isinstance(exc, UserError):
        return _bad(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# --- request parsing --------------------------------------------------------------------------

async def _read_json(request: Request) -> dict:
    """The request body as a JSON object; 413 past MAX_BODY_BYTES (checked before parsing)."""
    too_large = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > MAX_BODY_BYTES:
                raise too_large
        except ValueError:
            raise _bad("invalid Content-Length header") from None
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
    except ClientDisconnect:  # gone before its body was whole: nobody reads the answer
        raise APIError(499, "the client closed the request") from None
    try:
        data = json.loads(body)
    except ValueError as exc:  # not UTF-8, not JSON, or an integer of more than 4,300 digits
        raise _bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # thousands of nested arrays or objects
        raise _bad("the request body nests too deeply to read", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object", code="invalid_json")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise _bad(f"'{name}' must be a number, got {value!r}", param=name)
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(f"'{name}' must be in {bounds}, got {value!r}", param=name,
                   code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(f"'{name}' must be an integer, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(f"'{name}' must be >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                   + f", got {value}", param=name, code="invalid_value")
    return value


def _valid_text(text: str, where: str, param: str | None = None) -> str:
    """text, or a 400 if it is not valid Unicode: JSON can spell a lone surrogate ("\\ud800"),
    which neither the tokenizer nor a UTF-8 response can take."""
    try:
        check_unicode(text)
    except UserError as exc:
        raise _bad(f"{where}: {exc}", param=param or where, code="invalid_value") from None
    return text


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' names {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    return [_valid_text(s, "stop") for s in stop]


def _choices(body: dict) -> int:
    """`n`, the choices per prompt. best_of may only repeat it: choosing the best of more
    choices is not implemented."""
    n = _integer(body, "n", 1, lo=1, hi=MAX_CHOICES)
    best_of = _integer(body, "best_of", n, lo=1)
    if best_of < n:
        raise _bad(f"'best_of' must be >= n ({n}), got {best_of}", param="best_of", code="invalid_value")
    if best_of != n:
        raise _bad("'best_of' above n is not supported (lisa-rt does not rank extra choices)",
                   param="best_of", code="unsupported_value")
    return n


def _per_choice(params, n: int) -> list:
    """n choices' SamplingParams. A seeded request's choices draw with seeds seed, seed + 1, ...
    (as vLLM's do), so that they differ and the request is still reproducible; unseeded choices
    each take a random seed."""
    if params.seed is None:
        return [params] * n
    seeds = [params.seed + j for j in range(n)]
    return [params.replace(seed=seed if seed < 2**64 else seed - 2**64) for seed in seeds]


def _chat_logprobs(body: dict) -> int | None:
    """/v1/chat/completions' logprobs (a boolean) and top_logprobs -> SamplingParams.logprobs."""
    from .sampling import MAX_LOGPROBS

    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _bad("'logprobs' must be a boolean", param="logprobs")
    top = _integer(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not wanted:
        raise _bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    return (top or 0) if wanted else None


def _completion_logprobs(body: dict) -> int | None:
    """/v1/completions' logprobs: how many alternatives to list beside each token, or None."""
    from .sampling import MAX_LOGPROBS

    if body.get("top_logprobs") is not None:
        raise _bad("'top_logprobs' is a chat completions parameter; /v1/completions takes 'logprobs': N",
                   param="top_logprobs", code="unsupported_parameter")
    return _integer(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias} (JSON keys are strings) -> {int: bias}, each id
    below vocab_size."""
    from .sampling import checked_logit_bias

    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
    out = {}
    for key, value in bias.items():
        # isascii: str.isdigit() also takes '²' and '٣'. The length first: int() refuses a
        # string of more than 4,300 digits, which is past any vocabulary anyway.
        if not (key.isascii() and key.isdigit()):
            raise _bad(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias",
                       code="invalid_value")
        digits = key.lstrip("0") or "0"
        if len(digits) > len(str(vocab_size)) or int(digits) >= vocab_size:
            raise _bad(f"'logit_bias' keys must be token ids in [0, {vocab_size}), got "
                       f"{key if len(key) <= 20 else key[:20] + '...'}", param="logit_bias",
                       code="invalid_value")
        out[int(digits)] = value
    return checked_logit_bias(out, lambda message: _bad(message, param="logit_bias", code="invalid_value"))


def _echo(body: dict) -> bool:
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _bad("'echo' must be a boolean", param="echo")
    return bool(echo)


def _refuse_unsupported(body: dict, handled: tuple[str, ...]) -> None:
    """A 400 for an OpenAI parameter lisa-rt does not implement, unless its value asks for
    nothing (UNSET, NOT_ASKING); handled: parameters the endpoint reads itself."""
    for name, what in UNSUPPORTED_IF_SET.items():
        value = body.get(name)
        if name in handled or value in UNSET or value in NOT_ASKING.get(name, ()):
            continue
        if value == "auto" and name in NOT_ASKING_WITHOUT and body.get(NOT_ASKING_WITHOUT[name]) in UNSET:
            continue
        raise _bad(f"'{name}' is not supported ({what})", param=name, code="unsupported_parameter")


def _sampling_params(body: dict, vocab_size: int, max_tokens_default: int, max_tokens_names: tuple[str, ...],
                     logprobs: int | None = None, prompt_logprobs: int | None = None,
                     handled: tuple[str, ...] = (), fewest_tokens: int = 1):
    """OpenAI parameters (and lisa-rt's top_k, min_p, repetition_penalty) -> SamplingParams.
    vocab_size: the model's, which logit_bias ids must be below; handled: parameters the
    endpoint reads itself (not refused here); fewest_tokens: the least max_tokens may be (0 for
    an echo that only scores its prompt, which generates one token that the endpoint drops)."""
    from .sampling import SamplingParams

    _refuse_unsupported(body, handled)
    json_schema = _json_schema(body.get("response_format"))
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        max_tokens = _integer(body, name, max_tokens, lo=fewest_tokens)
    max_tokens = max(max_tokens, 1)
    top_k = _integer(body, "top_k", 0)
    if top_k < -1:
        raise _bad(f"'top_k' must be >= 1, or 0 or -1 to disable it, got {top_k}", param="top_k",
                   code="invalid_value")
    seed = _integer(body, "seed", None, lo=-2**63, hi=2**64 - 1)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", param="ignore_eos")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            # OpenAI's API takes top_p in [0, 1]; 0 keeps the single most likely token.
            top_p=max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-9),
            top_k=max(top_k, 0),                # -1 (vLLM's "off") is lisa-rt's 0
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            seed=seed, stop=_stop_strings(body), ignore_eos=ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(body, vocab_size), json_schema=json_schema)
    except UserError as exc:
        raise _bad(str(exc), code="invalid_value") from None


def _json_schema(response_format) -> dict | bool | None:
    """OpenAI's response_format as the JSON schema the output must follow (None: free text):
    {"type": "json_object"} is any JSON object; {"type": "json_schema", "json_schema":
    {"schema": ...}} the schema's values ("name" and "strict" are read past)."""
    from .json_constraint import check_schema

    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise _bad("'response_format' must be an object with a 'type'", param="response_format")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise _bad(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format", code="invalid_value")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise _bad("response_format 'json_schema' must be an object with a 'schema'",
                   param="response_format", code="missing_required_parameter")
    try:
        return check_schema(spec["schema"])
    except UserError as exc:
        raise _bad(str(exc), param="response_format", code="invalid_value") from None


def _stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", param="stream_options")
    elif not stream:  # as OpenAI's API: options of a stream that is not asked for are a mistake
        raise _bad("'stream_options' is only allowed with 'stream': true", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("'stream_options.include_usage' must be a boolean", param="stream_options")
    return stream, include_usage


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", param="messages", code="missing_required_parameter")
    try:
        return chat_messages(messages, roles=CHAT_ROLES)
    except ChatMessageError as exc:
        raise _bad(str(exc), param=exc.where, code=exc.code) from None


def _prompts(body: dict) -> list[str | list[int]]:
    """/v1/completions prompt: a string, a list of strings, token ids, or a list of those."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_int(t) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list "
                   "of lists of token ids", param="prompt")
    if any(len(p) == 0 for p in prompts):
        raise _bad("the prompt is empty", param="prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            _valid_text(p, "prompt" if isinstance(prompt, str) else f"prompt[{i}]", param="prompt")
    return prompts


# --- responses --------------------------------------------------------------------------------

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(completions, n: int = 1) -> dict:
    """completions: n choices of each prompt in turn (None for a choice that did not finish).
    A prompt counts once, with its first choice's cached tokens, as in OpenAI's usage."""
    firsts = [c for c in completions[::n] if c is not None]
    prompt = sum(c.prompt_tokens for c in firsts)
    generated = sum(c.completion_tokens for c in completions if c is not None)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)}}


class _EventStream(StreamingResponse):
    """An SSE response that always notices a client going away and then runs on_close.

    Starlette cancels the body while it waits for the engine; this also closes the generator
    when it is parked at a `yield`, and calls on_close (which cancels the requests) in every
    case: finished, disconnected, or failed.
    """

    def __init__(self, content: AsyncIterator[str], on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the connection broke while sending
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(llm, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `llm` as `model_name` (default: llm.model_name).

    api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>`.
    """
    served = model_name or llm.model_name
    known_names = {served, llm.model_name}
    created = int(time.time())
    app = FastAPI(title="lisa-rt", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.llm = llm

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, str(exc.detail), param=None, code=code,
                               headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return _error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise _bad("'model' must be a string", param="model")
        if name not in known_names:
            _valid_text(name, "model")  # before the 404 that names it
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{served}'",
                           param="model", code="model_not_found")

    async def checked_body(request: Request) -> dict:
        """A POST's JSON object, once its API key and the model it names are checked."""
        check_key(request)
        body = await _read_json(request)
        check_model(body)
        return body

    def model_card() -> dict:
        return {"id": served, "object": "model", "created": created, "owned_by": "lisa-rt",
                "max_model_len": llm.model.max_context}

    def check_length(ids: list[int], param: str) -> None:
        context = llm.model.max_context
        if len(ids) >= context:
            raise _bad(f"this model's context is {context} tokens and the {param} has {len(ids)}, "
                       "which leaves no room to generate", param=param, code="context_length_exceeded")

    def check_room(ids: list[int], body: dict, max_tokens_names: tuple[str, ...], where: str) -> None:
        """A 400 when the max_tokens the request names does not fit in the context after the
        prompt, as OpenAI's and vLLM's answer (in their words, which clients look for); the
        engine would stop at the context's end. Without one, the default fits or is cut."""
        given = [name for name in max_tokens_names if body.get(name) is not None]
        if not given:
            return
        context, asked = llm.model.max_context, body[given[-1]]  # the last wins, as in _sampling_params
        if len(ids) + asked > context:
            raise _bad(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{len(ids) + asked} tokens ({len(ids)} in the {where}, {asked} in the completion). "
                       f"Please reduce the length of the {where} or completion.", param=given[-1],
                       code="context_length_exceeded")

    async def submit_all(requests: list) -> list:
        """Handles of (ids, params) requests, all or none: each is checked before any is queued."""
        try:
            return await asyncio.to_thread(llm.submit_many, requests)
        except UserError as exc:
            raise _bad(str(exc)) from None
        except RuntimeError as exc:  # the LLM is closed: the server is shutting down
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None

    async def run(request: Request, handles: list, stream: bool, include_usage: bool, render):
        """Non-streaming: wait for every handle (cancelling all if the client leaves).
        Streaming: an SSE response of render's chunks."""
        def cancel_all() -> None:
            for handle in handles:
                handle.cancel()

        if not stream:
            async def collect():
                # All at once, not one by one: a choice that fails ends the wait at once.
                completions: list = [None] * len(handles)
                async with contextlib.aclosing(_merge(handles)) as merged:
                    async for index, delta in merged:
                        if delta.completion is not None:
                            completions[index] = delta.completion
                return completions

            collector = asyncio.ensure_future(collect())
            watcher = asyncio.ensure_future(_until_disconnected(request))
            try:
                await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
                if watcher.done() and not watcher.cancelled():
                    watcher.exception()  # retrieved: a broken receive counts as a disconnect
                # The client went away, or a choice failed: its siblings would run on for nobody.
                if not collector.done() or collector.cancelled() or collector.exception() is not None:
                    cancel_all()
                    collector.cancel()
            if not collector.done() or collector.cancelled():  # the client went away
                return _error_response(499, "the client closed the request")
            try:
                completions = collector.result()
            except UserError as exc:  # the request's own doing: a 400, no traceback in the log
                raise _failed(exc) from None
            if any(c.finish_reason == "cancelled" for c in completions):  # only the server cancels
                return SHUTTING_DOWN.response()
            return JSONResponse(render.whole(completions))

        async def events():
            completions: list = [None] * len(handles)
            first = render.first(include_usage)
            if first:
                yield first
            try:
                async with contextlib.aclosing(_merge(handles)) as merged:  # its tasks end with it
                    async for index, delta in merged:
                        opening = render.opening(index, delta, include_usage)
                        if opening is not None:
                            yield _sse(opening)
                        if delta.text or delta.logprobs:
                            yield _sse(render.chunk(index, delta.text, None, include_usage, delta.logprobs))
                        if delta.finish_reason == "cancelled":  # the server is shutting down
                            yield _sse(SHUTTING_DOWN.body())
                            yield "data: [DONE]\n\n"
                            return
                        if delta.finish_reason is not None:
                            completions[index] = delta.completion
                            yield _sse(render.chunk(index, "", delta.finish_reason, include_usage))
            except Exception as exc:  # noqa: BLE001 - the status is sent: report it in the stream
                yield _sse(_failed(exc).body())
                yield "data: [DONE]\n\n"
                return
            if include_usage:
                yield _sse(render.usage_chunk(_usage(completions, render.n)))
            yield "data: [DONE]\n\n"

        return _EventStream(events(), on_close=cancel_all)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if llm.closed:  # shutting down: a load balancer should send nothing more here
            return JSONResponse({"status": "shutting down", "model": served}, status_code=503)
        return {"status": "ok", "model": served, **llm.stats()}

    # vLLM's tokenizer endpoints: what lm-evaluation-harness's remote tokenizer asks for, so
    # that it needs no copy of the model's tokenizer.
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_key(request)
        tok = llm.tokenizer
        return {"tokenizer_class": tok.kind, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.special_tokens.get("pad_token"), "unk_token": tok.special_tokens.get("unk_token"),
                "add_bos_token": tok.add_bos_token, "chat_template": tok.chat_template,
                "model_max_length": llm.model.max_context, "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await checked_body(request)
        add_special = body.get("add_special_tokens")
        if add_special is not None and not isinstance(add_special, bool):
            raise _bad("'add_special_tokens' must be a boolean", param="add_special_tokens")
        tokenizer = llm.tokenizer
        try:
            if ("prompt" in body) == ("messages" in body):
                raise _bad("give exactly one of 'prompt' (a string) and 'messages'", param="prompt")
            if "prompt" in body:
                prompt = body["prompt"]
                if not isinstance(prompt, str):
                    raise _bad("'prompt' must be a string", param="prompt")
                ids = await asyncio.to_thread(tokenizer.encode, prompt,
                                              True if add_special is None else add_special)
            else:
                if not tokenizer.has_chat_template:
                    raise _bad(f"the model '{served}' has no chat template", code="no_chat_template")
                generation = body.get("add_generation_prompt", True)
                if not isinstance(generation, bool):
                    raise _bad("'add_generation_prompt' must be a boolean", param="add_generation_prompt")
                ids = await asyncio.to_thread(tokenizer.encode_chat, _messages(body), generation)
        except UserError as exc:
            raise _bad(str(exc), param="prompt" if "prompt" in body else "messages") from None
        return {"count": len(ids), "max_model_len": llm.model.max_context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await checked_body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise _bad("'tokens' must be a list of token ids", param="tokens")
        vocab = llm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise _bad(f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
        return {"prompt": await asyncio.to_thread(llm.tokenizer.decode, tokens)}

    @app.get("/metrics")
    async def metrics():
        # Like /health, open without the API key: scrapers (Prometheus) carry none.
        return PlainTextResponse(llm.metrics_text(served), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        if name not in known_names:
            raise APIError(404, f"the model '{name}' does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await checked_body(request)
        prompts = _prompts(body)
        stream, include_usage = _stream_options(body)
        n = _choices(body)
        echo, logprobs = _echo(body), _completion_logprobs(body)
        # With echo, max_tokens 0 asks for the prompt alone (scored, with logprobs).
        prompt_only = echo and body.get("max_tokens") == 0
        choices = _per_choice(_sampling_params(body, llm.model.config.vocab_size, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                               ("max_tokens",), logprobs, logprobs if echo else None,
                                               handled=("echo",), fewest_tokens=0 if echo else 1), n)
        tokenizer = llm.tokenizer
        if len(prompts) * n > MAX_SEQUENCES:
            raise _bad(f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} sequences; at most "
                       f"{MAX_SEQUENCES} are allowed per request", param="n", code="invalid_value")
        ids_list, echoed = [], []
        for prompt in prompts:
            try:
                if not isinstance(prompt, str):  # echoed as its tokens read back, special tokens spelt
                    ids, text, starts = prompt, None, None
                elif echo:  # echoed as given, the offsets into it
                    ids, starts = await asyncio.to_thread(tokenizer.encode_with_offsets, prompt)
                    text = prompt
                else:
                    ids, text, starts = await asyncio.to_thread(tokenizer.encode, prompt), None, None
            except UserError as exc:
                raise _bad(str(exc), param="prompt") from None
            if not ids:
                raise _bad("the prompt is empty (no tokens)", param="prompt")
            check_length(ids, "prompt")
            check_room(ids, body, ("max_tokens",), "prompt")
            ids_list.append(ids)
            echoed.append(_Echo(text, starts, ids[0]))
        handles = await submit_all([(ids, params) for ids in ids_list for params in choices])
        if prompt_only:
            handles = [_PromptOnly(handle) for handle in handles]
        if echo:
            echoed = [e if e.text is not None else e._replace(text=tokenizer.decode(ids, skip_special_tokens=False))
                      for e, ids in zip(echoed, ids_list)]
        return await run(request, handles, stream, include_usage,
                         _CompletionRender(f"cmpl-{uuid.uuid4().hex}", served, n, tokenizer,
                                           echoed if echo else None))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await checked_body(request)
        messages = _messages(body)
        stream, include_usage = _stream_options(body)
        tokenizer = llm.tokenizer
        if not tokenizer.has_chat_template:
            raise _bad(f"the model '{served}' has no chat template; use /v1/completions",
                       code="no_chat_template")
        try:
            ids = await asyncio.to_thread(tokenizer.encode_chat, messages)
        except UserError as exc:
            raise _bad(str(exc), param="messages") from None
        check_length(ids, "messages")
        n = _choices(body)
        max_tokens_names = ("max_tokens", "max_completion_tokens")
        params = _sampling_params(body, llm.model.config.vocab_size, llm.model.max_context - len(ids),
                                  max_tokens_names, _chat_logprobs(body))
        check_room(ids, body, max_tokens_names, "messages")
        handles = await submit_all([(ids, choice) for choice in _per_choice(params, n)])
        return await run(request, handles, stream, include_usage,
                         _ChatRender(f"chatcmpl-{uuid.uuid4().hex}", served, n, tokenizer))

    return app


class _PromptOnly:
    """A handle whose generated token is dropped: a completion that only echoes and scores its
    prompt (max_tokens 0). The token comes free with the prefill, whose last row is computed
    anyway; what the client sees is the prompt, no text and no tokens, finish_reason "length"."""

    def __init__(self, handle):
        self._handle = handle

    def cancel(self) -> None:
        self._handle.cancel()

    async def aevents(self) -> AsyncIterator[Any]:
        async for delta in self._handle.aevents():
            completion = delta.completion
            if completion is not None and completion.finish_reason != "cancelled":
                completion = dataclasses.replace(completion, text="", token_ids=[], finish_reason="length",
                                                 logprobs=None if completion.logprobs is None else [])
            yield dataclasses.replace(delta, text="", logprobs=None if delta.logprobs is None else [],
                                      completion=completion,
                                      finish_reason="length" if completion is not None and
                                      delta.finish_reason != "cancelled" else delta.finish_reason)


async def _merge(handles) -> AsyncIterator[tuple[int, Any]]:
    """(index, delta) from every handle's aevents(), in the order they arrive."""
    if len(handles) == 1:
        async for delta in handles[0].aevents():
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle) -> None:
        try:
            async for delta in handle.aevents():
                await queue.put((index, delta))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            if item.finish_reason is not None:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()


# The log probability reported for a token the model rules out (-inf is not JSON), as OpenAI's.
LOGPROB_FLOOR = -9999.0


def _json_logprob(value: float) -> float | None:
    """A log probability JSON can carry: -inf as LOGPROB_FLOOR, NaN (a broken model's) as null."""
    if math.isnan(value):
        return None
    return max(value, LOGPROB_FLOOR)


class _Echo(NamedTuple):
    """A prompt as a choice that echoes it begins: its text, where each of its tokens begins
    in it (None: where the log probabilities say, for a text read back from its ids), and its
    first token (which has no log probability to carry its id)."""
    text: str | None
    starts: list[int] | None
    first_token: int


class _CompletionRender:
    """/v1/completions response objects (object "text_completion")."""

    def __init__(self, request_id: str, model: str, n: int, tokenizer, echoed: list[_Echo] | None = None):
        """n: choices per prompt (their usage counts each prompt once); tokenizer: to spell the
        tokens of log probabilities; echoed: when the choices begin with their prompt, each
        prompt's _Echo."""
        self.id, self.model, self.n, self.created = request_id, model, n, int(time.time())
        self.tokenizer = tokenizer
        self.echoed = echoed
        self.opened: set[int] = set()

    def _echoed(self, index: int) -> _Echo | None:
        return self.echoed[index // self.n] if self.echoed is not None else None

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token as text (bytes that are not UTF-8 alone as \\x escapes) and its bytes."""
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="backslashreplace"), raw

    def _logprobs(self, index: int, prompt_entries, entries) -> dict | None:
        """OpenAI's legacy logprobs object (tokens, token_logprobs, top_logprobs as token -> log
        probability, text_offset into the choice's text) of choice `index`, or of a part of it:
        the echoed prompt's tokens (the first, which nothing predicts, with nulls), then the
        generated ones. None when neither was asked for."""
        if prompt_entries is None and entries is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(token_id: int, logprob, top, offset: int) -> None:
            text = self._token(token_id)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(None if logprob is None else _json_logprob(logprob))
            # The chosen token first, then the alternatives, as OpenAI's and vLLM's (logprobs + 1
            # entries at most; fewer where they coincide or spell the same).
            if top is None:
                out["top_logprobs"].append(None)
            else:
                entry = {text: _json_logprob(logprob)}
                for t, v in top:
                    entry.setdefault(self._token(t)[0], _json_logprob(v))
                out["top_logprobs"].append(entry)
            out["text_offset"].append(offset)

        echoed = self._echoed(index)
        if prompt_entries is not None:
            starts = echoed.starts or [0] + [e.text_offset for e in prompt_entries[1:]]
            add(echoed.first_token, None, None, starts[0])
            for e, start in zip(prompt_entries[1:], starts[1:]):
                add(e.token_id, e.logprob, e.top, start)
        shift = len(echoed.text) if echoed is not None else 0
        for e in entries or []:
            add(e.token_id, e.logprob, e.top, shift + e.text_offset)
        return out

    def opening(self, index: int, delta, include_usage: bool) -> dict | None:
        """The chunk a streamed choice begins with, before its first delta's: the echoed prompt
        (with its log probabilities when asked); None when there is none."""
        echoed = self._echoed(index)
        if echoed is None or index in self.opened:
            return None
        self.opened.add(index)
        return self._chunk({"index": index, "text": echoed.text,
                            "logprobs": self._logprobs(index, delta.prompt_logprobs, None), "finish_reason": None},
                           include_usage)

    def _chunk(self, choice: dict, include_usage: bool) -> dict:
        """A stream chunk of one choice; with include_usage every chunk but the last (the
        usage) says "usage": null, as OpenAI's do."""
        return {**self._base(), "choices": [choice], **({"usage": None} if include_usage else {})}

    def _base(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, completions) -> dict:
        choices = []
        for i, c in enumerate(completions):
            echoed = self._echoed(i)
            choices.append({"index": i, "text": (echoed.text if echoed else "") + c.text,
                            "logprobs": self._logprobs(i, c.prompt_logprobs, c.logprobs),
                            "finish_reason": c.finish_reason})
        return {**self._base(), "choices": choices, "usage": _usage(completions, self.n)}

    def first(self, include_usage: bool) -> str:
        return ""

    def chunk(self, index: int, text: str, finish_reason, include_usage: bool, logprobs=None) -> dict:
        return self._chunk({"index": index, "text": text, "logprobs": self._logprobs(index, None, logprobs),
                            "finish_reason": finish_reason}, include_usage)

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base(), "choices": [], "usage": usage}


class _ChatRender(_CompletionRender):
    """/v1/chat/completions response objects (chat.completion and chat.completion.chunk)."""

    def _base(self, chunk: bool = True) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self, completions) -> dict:
        return {**self._base(chunk=False), "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
             "logprobs": self._content_logprobs(c.logprobs), "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)], "usage": _usage(completions, self.n)}

    def _content_logprobs(self, entries) -> dict | None:
        """OpenAI's chat logprobs object: per token its text, bytes, log probability and the
        top_logprobs alternatives."""
        if entries is None:
            return None

        def spelt(token_id: int, logprob: float) -> dict:
            text, raw = self._token(token_id)
            return {"token": text, "logprob": _json_logprob(logprob), "bytes": list(raw)}

        return {"content": [{**spelt(e.token_id, e.logprob), "top_logprobs": [spelt(t, v) for t, v in e.top]}
                            for e in entries], "refusal": None}

    def first(self, include_usage: bool) -> str:
        """Each choice's first chunk, which names the role, before any text."""
        return "".join(_sse(self._chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}, include_usage))
                       for index in range(self.n))

    def chunk(self, index: int, text: str, finish_reason, include_usage: bool, logprobs=None) -> dict:
        delta = {"content": text} if finish_reason is None else {}
        return self._chunk({"index": index, "delta": delta, "logprobs": self._content_logprobs(logprobs),
                            "finish_reason": finish_reason}, include_usage)


def _version() -> str:
    from . import __version__

    return __version__


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); UserError if that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server for an app serving `llm`: on_ready() is called once it accepts
    connections, and when it stops (Ctrl-C, SIGTERM) the requests still running get `grace_s`
    seconds to finish before `llm` is closed."""

    def __init__(self, config: uvicorn.Config, llm, on_ready=None, grace_s: float = SHUTDOWN_GRACE_S):
        super().__init__(config)
        self.llm, self.on_ready, self.grace_s = llm, on_ready, grace_s

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    async def shutdown(self, sockets=None) -> None:
        # uvicorn stops accepting connections and waits for the requests in flight; past its
        # timeout_graceful_shutdown it would cancel them mid-response. Closing the LLM after
        # grace_s ends the rest first, each client told so (a 503, or an error event ending its
        # stream).
        async def close_after_grace() -> None:
            await asyncio.sleep(self.grace_s)
            await asyncio.to_thread(self.llm.close)

        closer = asyncio.ensure_future(close_after_grace())
        try:
            await super().shutdown(sockets=sockets)
        finally:
            closer.cancel()
            await asyncio.to_thread(self.llm.close)


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, device: str | None = None, dtype: str | None = None,
          kv_cache_gb: float | None = None, max_num_seqs: int = 256, model_name: str | None = None,
          log_level: str = "info", sock: socket.socket | None = None, on_ready=None, lisa=None,
          shutdown_grace: float = SHUTDOWN_GRACE_S, prefix_caching: bool = True,
          quantize: str | None = None, speculate: int = 0) -> None:
    """Loads the model and serves it until interrupted (Ctrl-C). Binds 127.0.0.1 by default.

    model_name: the model's id in the API (default: the LLM's model_name).

    sock: an already bound listening socket (then host and port only name it in messages).
    on_ready(url): called once the server accepts connections.
    lisa: the LiSA adapter, as for load_model (None: the model's own).
    shutdown_grace: seconds the requests in flight get to finish once told to stop (Ctrl-C,
    SIGTERM); then they are cancelled, each client told so.
    prefix_caching: reuse the keys and values of prompts' shared beginnings (see LLM).
    quantize: None, "q8_0" or "q4_1" (see load_model).
    speculate: draft tokens per step by prompt lookup (see LLM).
    """
    from .llm import LLM

    sock = sock or bind_socket(host, port)
    kwargs = {"device": device, "dtype": dtype, "kv_cache_gb": kv_cache_gb, "max_num_seqs": max_num_seqs,
              "lisa": lisa, "prefix_caching": prefix_caching, "quantize": quantize, "speculate": speculate}
    try:
        llm = LLM(model, **kwargs) if model is not None else LLM(**kwargs)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(llm, model_name=model_name, api_key=api_key)
        # uvicorn's access log goes to stdout; here every log line goes to stderr (stdout stays
        # clean, as `lisa-rt serve --help` says), in colour only if stderr is a terminal.
        log_config = copy.deepcopy(LOGGING_CONFIG)  # uvicorn edits the dict it is given
        log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
        config = uvicorn.Config(app, log_level=log_level, log_config=log_config,
                                use_colors=sys.stderr.isatty(),
                                timeout_graceful_shutdown=shutdown_grace + SHUTDOWN_MARGIN_S,
                                timeout_keep_alive=30)
        bound_host, bound_port = sock.getsockname()[:2]
        url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
        ready = (lambda: on_ready(url)) if on_ready is not None else None
        Server(config, llm, on_ready=ready, grace_s=shutdown_grace).run(sockets=[sock])
    finally:
        llm.close()
        sock.close()
