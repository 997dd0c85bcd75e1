"""Load test of `lisa-rt serve`: many concurrent streaming chat clients for a bounded time.

    python benchmarks/load_server.py [-m smollm2] [--clients 64] [--seconds 30] [--max-tokens 64]
                                     [--device cuda] [--dtype bfloat16] [--no-lisa] [--json out/load.json]

Starts `lisa-rt serve` on 127.0.0.1 (a free port) as a subprocess, waits until it answers,
then runs --clients asyncio clients (httpx), each sending streaming /v1/chat/completions
requests in a loop until --seconds have passed (requests in flight then finish). Reports
requests/s, generated tokens/s (from the usage of each stream's last chunk), p50/p99 time to
first token and to the whole answer, and errors (a non-200 status, a broken stream, a missing
`[DONE]`: there should be none). Stops the server at the end; exit code 1 if any error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import machine_name, print_table, write_json  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "Write a haiku about the sea.", "Explain what a CPU cache is.",
             "Give me a recipe for pancakes.", "Why is the sky blue?",
             "Summarise the plot of Hamlet.", "What is 17 times 23?"]


class Server:
    """`lisa-rt serve` in a subprocess; its stderr is drained in a thread (kept for errors)."""

    def __init__(self, argv: list[str], start_timeout: float):
        self.proc = subprocess.Popen([sys.executable, "-m", "lisa_rt.cli", "serve", "--port", "0",
                                      "--host", "127.0.0.1", "--log-level", "warning", *argv],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                if self.url is None and "serving" in line and " at " in line:
                    self.url = line.split(" at ", 1)[1].split()[0]  # http://127.0.0.1:PORT/v1
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(start_timeout) or self.url is None:
            self.stop()
            sys.exit("the server did not start:\n" + "".join(self.log[-20:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


async def one_request(client, url: str, body: dict, record: dict) -> None:
    start = time.perf_counter()
    first = None
    usage = None
    done = False
    async with client.stream("POST", url + "/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    if not done or usage is None:
        raise RuntimeError("the stream ended without its usage chunk and [DONE]")
    record["ttft"].append((first or end) - start)
    record["latency"].append(end - start)
    record["completion_tokens"] += usage["completion_tokens"]
    record["prompt_tokens"] += usage["prompt_tokens"]
    record["requests"] += 1
    record["last_end"] = max(record["last_end"], end)


async def client_loop(index: int, client, url: str, args, deadline: float, record: dict) -> None:
    n = 0
    while time.perf_counter() < deadline:
        body = {"model": args.served_name, "max_tokens": args.max_tokens, "temperature": args.temperature,
                "seed": index * 100003 + n, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": QUESTIONS[(index + n) % len(QUESTIONS)]}]}
        n += 1
        try:
            await one_request(client, url, body, record)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            record["errors"] += 1
            if len(record["error_samples"]) < 5:
                record["error_samples"].append(f"{type(exc).__name__}: {exc}")


async def run_load(url: str, args) -> dict:
    import httpx

    record = {"ttft": [], "latency": [], "completion_tokens": 0, "prompt_tokens": 0, "requests": 0,
              "errors": 0, "error_samples": [], "last_end": 0.0}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        deadline = start + args.seconds
        await asyncio.gather(*(client_loop(i, client, url, args, deadline, record)
                               for i in range(args.clients)))
        end = max(time.perf_counter(), record["last_end"])
    record["elapsed_s"] = end - start
    return record


async def warm_up(url: str, args) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=args.request_timeout) as client:
        record = {"ttft": [], "latency": [], "completion_tokens": 0, "prompt_tokens": 0, "requests": 0,
                  "last_end": 0.0}
        body = {"model": args.served_name, "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "Hi"}]}
        await one_request(client, url, body, record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--kv-cache-gb", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--no-lisa", action="store_true", help="serve the base model, not its LiSA adapter")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="serve without the prefix cache (every prompt computed in full)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the server")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.served_name = "load-test"

    argv = ["-m", args.model, "--served-model-name", args.served_name]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype),
                        ("--kv-cache-gb", args.kv_cache_gb), ("--max-num-seqs", args.max_num_seqs)):
        if value is not None:
            argv += [flag, str(value)]
    flags = [flag for flag, on in (("--no-lisa", args.no_lisa), ("--no-prefix-caching", args.no_prefix_caching)) if on]
    argv += flags
    os.environ.pop("LISA_RT_API_KEY", None)
    server = Server(argv, args.start_timeout)
    try:
        asyncio.run(warm_up(server.url, args))
        record = asyncio.run(run_load(server.url, args))
    finally:
        server.stop()

    elapsed = record["elapsed_s"]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    row = {"clients": args.clients, "seconds": round(elapsed, 1), "requests": record["requests"],
           "req_per_s": round(record["requests"] / elapsed, 2),
           "tok_per_s": round(record["completion_tokens"] / elapsed, 1),
           "ttft_p50_ms": ms(percentile(record["ttft"], 50)), "ttft_p99_ms": ms(percentile(record["ttft"], 99)),
           "latency_p50_ms": ms(percentile(record["latency"], 50)),
           "latency_p99_ms": ms(percentile(record["latency"], 99)), "errors": record["errors"]}
    machine = machine_name()
    print(f"# {machine}; `lisa-rt serve -m {' '.join([args.model] + flags)}`; "
          f"{args.clients} streaming chat clients for "
          f"{args.seconds:g} s, max_tokens {args.max_tokens}, temperature {args.temperature}")
    print_table([row], list(row))
    for sample in record["error_samples"]:
        print(f"error: {sample}", file=sys.stderr)
    write_json(args.json, {"benchmark": "load_server", "machine": machine, "model": args.model,
                           "lisa": not args.no_lisa, "prefix_caching": not args.no_prefix_caching,
                           "device": args.device, "dtype": args.dtype, "max_tokens": args.max_tokens,
                           "temperature": args.temperature, "prompt_tokens": record["prompt_tokens"],
                           "completion_tokens": record["completion_tokens"], **row,
                           "error_samples": record["error_samples"]})
    sys.exit(1 if record["errors"] else 0)


if __name__ == "__main__":
    main()
