"""Shared helpers of the benchmark scripts: timing, the machine's name, tables, JSON."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from lisa_rt import bench
from lisa_rt.errors import UserError
from lisa_rt.lisa import Adapter, find_adapter, load_adapter
from lisa_rt.sampling import SamplingParams


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def device_us(event) -> float:
    """A torch.profiler event's own time (microseconds): on the device where it has any."""
    for name in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def own_time_events(prof, device: torch.device) -> list:
    """A profile's events with time of their own, most first; on a GPU its kernels only (the
    CPU-side op events carry no device time of their own)."""
    events = [e for e in prof.key_averages() if device_us(e) > 0]
    if device.type == "cuda":
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return sorted(events, key=device_us, reverse=True)


def machine_name() -> str:
    return bench.machine_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def print_table(rows: list[dict], columns: list[str]) -> None:
    print(bench.format_table(rows, [(c, c) for c in columns]))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def adapter_to_compare(lisa: str | None, model_path: Path, config) -> Adapter:
    """The adapter a LiSA-against-base script compares: the file given with --lisa, else the
    model's own; a UserError when the model has none."""
    adapter = load_adapter(lisa, config) if lisa else find_adapter(model_path, config)
    if adapter is None:
        raise UserError("the model has no adapter of its own: give --lisa")
    return adapter


def run_main(main) -> None:
    """Exits with main()'s status; a bad path, file or option (UserError, OSError) is one
    `error:` line on stderr and exit status 2, no traceback."""
    try:
        sys.exit(main())
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
