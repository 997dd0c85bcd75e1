"""lisa-rt: a small, fast inference runtime for LLaMA-family models with LiSA attention sharing.

    from lisa_rt import LLM, SamplingParams
    with LLM("smollm2") as llm:                     # one engine thread, shared by all callers
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0))
        print(out[0].text)

Lower level:
    import lisa_rt
    model = lisa_rt.load_model("smollm2")          # or a .gguf, an HF dir, a lisa-rt dir
    ids = model.tokenizer.encode("The capital of France is")
    logits = model.logits(ids)                      # float32 [len(ids), vocab]
    out = lisa_rt.generate(model, [ids], lisa_rt.SamplingParams(temperature=0, max_tokens=16))
"""
from __future__ import annotations

import importlib
import os

from .errors import UserError

__version__ = "0.1.0"

# Imported when first used (PEP 562): `lisa-rt` imports this package before its main() can
# catch Ctrl-C, and these pull in torch, which takes seconds to import.
_LAZY = {"Completion": "engine", "StreamDelta": "engine", "generate": "engine", "LLM": "llm",
         "RequestHandle": "llm", "SamplingParams": "sampling", "TokenLogprob": "engine"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load_model(name_or_path: str | os.PathLike | None = None, device: str | None = "cpu",
               dtype: str | None = None, progress: bool = True, lisa: bool | str | os.PathLike | None = None,
               quantize: str | None = None):
    """Loads a model by alias, lisa-rt directory, GGUF file or HF directory (converted once).

    device: "cpu", "cuda" or None (CUDA when available); dtype: "float32", "bfloat16",
    "float16" or None (bfloat16 on CUDA and on CPUs with AVX2, else float32). lisa: None
    runs the model's own LiSA adapter when it has one, False the base model, a path that adapter
    file. quantize: None, or "q8_0" / "q4_1" to hold the matrix weights quantized in blocks of
    32 (CPU only: decode streams a third to a quarter of bfloat16's bytes).
    """
    from .model import load_model_dir
    from .registry import resolve_model

    return load_model_dir(resolve_model(name_or_path, progress=progress), device=device, dtype=dtype, lisa=lisa,
                          quantize=quantize)


__all__ = ["LLM", "Completion", "RequestHandle", "SamplingParams", "StreamDelta", "TokenLogprob", "UserError",
           "generate", "load_model", "__version__"]
