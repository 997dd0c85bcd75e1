"""Read and write a lisa-rt model directory (config.json, safetensors, tokenizer files).

Only safetensors are read here. Loading memory-maps the files and checks every tensor's
name, shape and dtype against config.json; writing goes to a temporary directory that is
renamed into place, so a failed or interrupted write never leaves a half-written model.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError, ModelConfig
from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locks; age alone tells an abandoned temp directory
    fcntl = None

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SHARD_BYTES = 2 * 1024**3
# A writer's temp directory untouched this long (seconds), and not locked by a live writer, was
# left by one killed before it could remove it (SIGKILL, a power cut).
STALE_TEMP_SECONDS = 3600.0
# In every temp directory atomic_directory makes, until it is moved in place: a cleaner removes
# only directories that hold it, never a user's own that happens to have a similar name.
PARTIAL_MARKER = ".lisa-rt-partial"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(UserError):
    """A model directory that cannot be loaded; the message names the file and tensor."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model directory must hold, with its shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, h), "norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        shapes[p + "attn_norm.weight"] = (h,)
        shapes[p + "attn.q_proj.weight"] = (config.q_size, h)
        shapes[p + "attn.k_proj.weight"] = (config.kv_size, h)
        shapes[p + "attn.v_proj.weight"] = (config.kv_size, h)
        shapes[p + "attn.o_proj.weight"] = (h, config.q_size)
        shapes[p + "mlp_norm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    return shapes


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / WEIGHTS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: invalid index ({exc})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / WEIGHTS_FILE
    if not single.exists():
        raise CheckpointError(f"{model_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}")
    return [single]


def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    if not (model_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{model_dir}: no {CONFIG_FILE} (not a lisa-rt model directory)")
    try:
        return ModelConfig.load(model_dir / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def load_tensors(model_dir: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Memory-map every tensor and validate it against the config."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    want = expected_shapes(config)
    dtype = DTYPES[config.torch_dtype]
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(model_dir):
        if not path.exists():
            raise CheckpointError(f"{path}: missing weight shard")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    if name not in want:
                        raise CheckpointError(f"{path}: unexpected tensor {name!r}")
                    tensor = handle.get_tensor(name)
                    if tuple(tensor.shape) != want[name]:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {want[name]}")
                    if tensor.dtype != dtype:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {tensor.dtype}, "
                            f"config.json says {config.torch_dtype}")
                    tensors[name] = tensor
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    missing = [name for name in want if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {missing[0]!r} is missing{more}")
    return tensors


def tokenizer_kind(model_dir: str | Path) -> str | None:
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        return "tokenizers"
    if (model_dir / "tokenizer.model").exists():
        return "sentencepiece"
    return None


def check_writable(path: str | os.PathLike, what: str, *, directory: bool = False) -> None:
    """Raise UserError unless a file (or, with `directory`, a directory) can be written at `path`.

    Checks what can be known before writing, so a command can fail before minutes of work:
    `path` itself, where it exists, must be of the right kind (a regular file, or a directory);
    missing directories on the way are fine (the atomic writers here create them), but the
    nearest existing ancestor must be a directory this process may write to and enter.
    `what` names the path for the user, e.g. "--out" or "output directory"; the message reads
    "{what} {path}: {why}", e.g. "--json a/b.json: a is a file, not a directory".
    """
    path = Path(path)

    def refuse(why: str) -> UserError:
        return UserError(f"{what} {path}: {why}")

    # os.path's tests, unlike Path's, answer False rather than raise where access is denied
    if os.path.lexists(path):
        if not os.path.exists(path):
            raise refuse("is a broken symbolic link")
        if directory and not os.path.isdir(path):
            raise refuse("is a file, not a directory")
        if not directory and os.path.isdir(path):
            raise refuse("is a directory, not a file")
        if not directory and not os.path.isfile(path):
            raise refuse("is not a regular file")
    parent = path.parent  # a rename into it puts the new file or directory in place
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.exists(parent):
        raise refuse(f"{parent} is a broken symbolic link")
    if not os.path.isdir(parent):
        raise refuse(f"{parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"directory {parent} is not writable")


def _umask() -> int:
    """The process's umask: from /proc where Linux shows it; elsewhere by setting it and putting
    it straight back (for that instant other threads would create files with a stricter mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _as_user_error(what: str, path: Path) -> Iterator[None]:
    """An OSError or a safetensors write error inside (a full disk, a quota, a race with
    check_writable) becomes one UserError line naming `path`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        detail = str(exc)
        if isinstance(exc, OSError) and exc.strerror:
            detail = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        raise UserError(f"{what} {path}: cannot write it ({detail})") from None


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on failure it is removed.

    An existing non-empty `out_dir` is refused unless `force`. The files written get the mode a
    plain open() gives; an OSError or a safetensors write error while writing becomes a UserError.
    The temp dirs of writers of `out_dir` killed long ago are removed first (remove_stale_temp_dirs).
    """
    what = "output directory"
    out_dir = Path(out_dir)
    check_writable(out_dir, what, directory=True)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CheckpointError(f"{out_dir}: exists and is not empty (use --force to replace it)")
    with _as_user_error(what, out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out_dir.parent, out_dir.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            lock = _lock_directory(tmp)  # held while writing: no cleaner removes the directory
        except BlockingIOError:  # cannot be: a cleaner locks only a directory an hour old
            lock = None
        try:
            (tmp / PARTIAL_MARKER).touch()
            yield tmp
            (tmp / PARTIAL_MARKER).unlink()
            # mkdtemp makes a private (0700) directory, and writers such as safetensors' save_file
            # go through private temp files: give everything the permissions open() would.
            umask = _umask()
            for file in tmp.rglob("*"):
                os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
            _replace_directory(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                os.close(lock)


def _lock_directory(path: Path) -> int | None:
    """A descriptor of directory `path` holding an exclusive flock on it (released when closed, or
    when the process dies); None where there is no flock (not POSIX, a file system without it).
    BlockingIOError where another process holds the lock."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


def _newest_change(path: Path) -> float:
    """The newest mtime of directory `path` and of everything in it: a writer adding to a file
    changes that file's mtime, not the directory's."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_stale_temp_dirs(directory: str | Path, name: str | None = None,
                           max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Removes the temp directories atomic_directory made in `directory` for the target `name`
    (for every target, with None) that a killed writer left: those that hold PARTIAL_MARKER,
    that nothing in has changed for `max_age` seconds, and that this process can lock (no live
    writer holds them; where no lock can be taken, as on some network file systems, none is
    removed). Never a fresh one, which another process may be writing. Returns what it removed."""
    directory = Path(directory)
    target = re.escape(name) if name is not None else ".+"
    pattern = re.compile(rf"\.{target}\.tmp-[a-z0-9_]{{8}}")  # mkdtemp's 8 random characters
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    removed, now = [], time.time()
    for tmp in entries:
        if not pattern.fullmatch(tmp.name) or tmp.is_symlink() or not tmp.is_dir() \
                or not (tmp / PARTIAL_MARKER).is_file():
            continue
        try:
            if now - _newest_change(tmp) < max_age:
                continue
            lock = _lock_directory(tmp)
        except OSError:  # gone meanwhile, or locked by its writer
            continue
        if lock is None:  # no way to tell a live writer's: leave it
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.lexists(tmp):
                removed.append(tmp)
        finally:
            os.close(lock)
    return removed


def _replace_directory(new: Path, out_dir: Path) -> None:
    """Renames `new` to `out_dir`; an existing `out_dir` is moved aside first and, should the
    rename fail, put back (or, failing that too, left in the .old- directory: never deleted)."""
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        os.replace(out_dir, old / "model")
        try:
            os.replace(new, out_dir)
        except BaseException:
            os.replace(old / "model", out_dir)
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            old.rmdir()  # only once empty: it may still hold the old model
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside `path`; on success it replaces `path` (keeping the mode of
    the file it replaces, else with the mode a plain open() gives), on failure it is removed. An
    OSError or a safetensors write error while writing becomes a UserError."""
    what = "output file"
    path = Path(path)
    check_writable(path, what)
    with _as_user_error(what, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                mode = 0o666 & ~_umask()  # mkstemp makes the file private (0600)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
            raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """Writes a text file through a temp file beside it and a rename: whole or untouched."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as model.safetensors, or as shards plus an index when large."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= SHARD_BYTES:
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for index, shard in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    (directory / WEIGHTS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_model_dir(out_dir: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                   tokenizer_files: dict[str, bytes], force: bool = False) -> Path:
    """Validate and write a complete model directory atomically."""
    config.validate()
    want = expected_shapes(config)
    dtype = DTYPES[config.torch_dtype]
    for name, shape in want.items():
        if name not in tensors:
            raise CheckpointError(f"tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {shape}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r}")
    with atomic_directory(out_dir, force=force) as tmp:
        config.save(tmp / CONFIG_FILE)
        save_tensors(tmp, {name: tensors[name].to(dtype) for name in want})
        for file_name, data in tokenizer_files.items():
            (tmp / file_name).write_bytes(data)
    return Path(out_dir)
