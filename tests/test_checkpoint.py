"""Writing model directories and files: check_writable's answers, the atomic writers' file modes
(those of a plain open() under the umask) and their failures (one UserError, nothing left)."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lisa_rt.checkpoint import (PARTIAL_MARKER, STALE_TEMP_SECONDS, atomic_directory, atomic_file,
                                check_writable, remove_stale_temp_dirs, save_tensors, write_text_atomically)
from lisa_rt.errors import UserError


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it after."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def refused(path, what="--out", directory=False) -> str:
    with pytest.raises(UserError) as info:
        check_writable(path, what, directory=directory)
    message = str(info.value)
    assert message.startswith(f"{what} {path}: ") and "\n" not in message
    return message


def deny_writes_to(monkeypatch, denied: Path) -> None:
    """os.access says `denied` is not writable (a chmod cannot show it when tests run as root)."""
    real = os.access

    def access(path, how, *args, **kwargs):
        if Path(path) == denied and how & os.W_OK:
            return False
        return real(path, how, *args, **kwargs)
    monkeypatch.setattr(os, "access", access)


# --- check_writable -----------------------------------------------------------------------------

def test_check_writable_accepts_what_can_be_created(tmp_path, monkeypatch):
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "model").mkdir()
    check_writable(tmp_path / "new.json", "--json")
    check_writable(str(tmp_path / "old.json"), "--json")  # replaced by a rename
    check_writable(tmp_path / "a" / "b" / "c.json", "--json")  # the writers make a and b
    check_writable(tmp_path / "model", "output directory", directory=True)
    check_writable(tmp_path / "new-model" / "sub", "output directory", directory=True)
    monkeypatch.chdir(tmp_path)
    check_writable("rel.json", "--json")
    check_writable("x/y", "output directory", directory=True)


def test_check_writable_refusals_say_why(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("data")
    (tmp_path / "adir").mkdir()
    assert refused(afile / "sub", "output directory", directory=True).endswith(
        f"{afile} is a file, not a directory")
    assert refused(afile / "deeper" / "r.json", "--json").endswith(f"{afile} is a file, not a directory")
    assert refused(tmp_path / "adir", "--json").endswith("is a directory, not a file")
    assert refused(afile, "output directory", directory=True).endswith("is a file, not a directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert refused(tmp_path / "dangling").endswith("is a broken symbolic link")
    assert refused(tmp_path / "dangling" / "x.json").endswith(
        f"{tmp_path / 'dangling'} is a broken symbolic link")
    if os.path.exists("/dev/null"):
        assert refused("/dev/null").endswith("is not a regular file")
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes_to(monkeypatch, locked)
    assert refused(locked / "new" / "x.json", "--json").endswith(f"directory {locked} is not writable")
    assert refused(locked / "model", "output directory", directory=True).endswith("is not writable")
    assert afile.read_text() == "data" and sorted(p.name for p in tmp_path.iterdir()) == [
        "adir", "afile", "dangling", "locked"]  # nothing was created


def test_check_writable_on_a_real_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        assert refused(locked / "x.json").endswith(f"directory {locked} is not writable")
    finally:
        locked.chmod(0o755)


# --- write_text_atomically ----------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_file_gets_the_mode_open_would_give(tmp_path, umask, mask):
    """A new file gets the mode open() gives it; a replaced file keeps its own, as open() keeps it."""
    umask(mask)
    write_text_atomically(tmp_path / "new.json", "{}\n")
    (tmp_path / "old.json").write_text("old")
    os.chmod(tmp_path / "old.json", 0o600)
    write_text_atomically(tmp_path / "old.json", "new")
    with open(tmp_path / "plain", "w"):
        pass
    assert mode(tmp_path / "new.json") == mode(tmp_path / "plain") == 0o666 & ~mask
    assert mode(tmp_path / "old.json") == 0o600 and (tmp_path / "old.json").read_text() == "new"


def test_a_safetensors_write_error_is_one_error_line_and_leaves_nothing(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(UserError, match=r"output file .*a.safetensors: cannot write it \(File too large"):
        with atomic_file(tmp_path / "a.safetensors") as tmp:
            tmp.write_bytes(b"part")
            raise SafetensorError("File too large (os error 27)")
    assert os.listdir(tmp_path) == []


def test_write_text_creates_missing_directories(tmp_path):
    write_text_atomically(tmp_path / "a" / "b" / "r.json", "{}")
    assert (tmp_path / "a" / "b" / "r.json").read_text() == "{}"
    assert os.listdir(tmp_path / "a" / "b") == ["r.json"]


def test_write_text_refusals_leave_nothing(tmp_path):
    (tmp_path / "afile").write_text("data")
    with pytest.raises(UserError, match=r"afile is a file, not a directory"):
        write_text_atomically(tmp_path / "afile" / "r.json", "{}")
    assert (tmp_path / "afile").read_text() == "data" and os.listdir(tmp_path) == ["afile"]


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="no /sys")
def test_write_text_into_sysfs_is_one_user_error():
    # Refused up front (not writable), or, as root, by the kernel (EPERM): a UserError either way.
    with pytest.raises(UserError, match=r"^output file /sys/kernel/x\.json: "):
        write_text_atomically("/sys/kernel/x.json", "{}")


def test_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    monkeypatch.setattr(os, "replace", full_disk)  # a race the up-front check cannot see
    with pytest.raises(UserError, match=r"output file .*r\.json: cannot write it \(No space left"):
        write_text_atomically(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]  # no temp file left


# --- atomic_directory ---------------------------------------------------------------------------

def test_directory_and_safetensors_get_the_mode_open_would_give(tmp_path, umask):
    umask(0o002)
    with atomic_directory(tmp_path / "model") as tmp:
        save_tensors(tmp, {"w": torch.zeros(2, 3)})  # safetensors writes through a 0600 temp file
        (tmp / "config.json").write_text("{}")
    out = tmp_path / "model"
    assert mode(out) == 0o775
    assert {p.name: mode(p) for p in out.iterdir()} == {"model.safetensors": 0o664,
                                                          "config.json": 0o664}


def test_directory_under_a_file_is_refused_before_writing(tmp_path):
    (tmp_path / "afile").write_text("data")
    with pytest.raises(UserError, match=r"output directory .*afile/sub: .*afile is a file, not a directory"):
        with atomic_directory(tmp_path / "afile" / "sub"):
            pytest.fail("the body must not run")
    assert os.listdir(tmp_path) == ["afile"]


def test_directory_write_failure_is_one_user_error_and_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match=r"output directory .*model: cannot write it \(No space left"):
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_failed_replace_puts_the_old_model_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".model.tmp-"):  # the new model cannot be moved in
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match=r"output directory .*model: cannot write it"):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "old" and os.listdir(tmp_path) == ["model"]



# --- what killed writers leave ------------------------------------------------------------------

def _age(path: Path, seconds: float) -> None:
    """Dates `path` and everything in it `seconds` back."""
    then = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then), follow_symlinks=False)


def test_a_killed_writers_temp_directory_is_removed_once_old(tmp_path):
    script = ("import os, sys\nfrom lisa_rt.checkpoint import atomic_directory\n"
              "with atomic_directory(sys.argv[1]) as tmp:\n"
              "    (tmp / 'config.json').write_text('{}')\n"
              "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")],
                          cwd=Path(__file__).parents[1], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".model.tmp-") and (left / "config.json").exists()
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert left.exists()  # fresh: its writer may still be at work
    _age(left, STALE_TEMP_SECONDS + 60)
    with atomic_directory(tmp_path / "model", force=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temp_cleanup_spares_what_a_writer_may_hold(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    names = ["old", "fresh", "locked", "other", "unlike"]
    dirs = dict(zip(names, [tmp_path / ".model.tmp-abcd1234", tmp_path / ".model.tmp-fresh_12",
                            tmp_path / ".model.tmp-locked12", tmp_path / ".other.tmp-abcd1234",
                            tmp_path / ".model.tmp-not-mkdtemp"]))
    dirs["unmarked"] = tmp_path / ".model.tmp-20240101"  # a user's, not atomic_directory's
    for name, d in dirs.items():
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "part").write_text("x")
        if name != "unmarked":
            (d / PARTIAL_MARKER).touch()
        _age(d, STALE_TEMP_SECONDS + 60)
    (dirs["fresh"] / "sub" / "part").write_text("still being written")  # the directory's own mtime is old
    held = os.open(dirs["locked"], os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer's lock
        assert remove_stale_temp_dirs(tmp_path, "model") == [dirs["old"]]
    finally:
        os.close(held)
    assert remove_stale_temp_dirs(tmp_path, "model") == [dirs["locked"]]
    assert remove_stale_temp_dirs(tmp_path) == [dirs["other"]]  # any target's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(dirs[n].name for n in ("fresh", "unlike", "unmarked"))


def test_a_finished_directory_keeps_no_marker(tmp_path):
    with atomic_directory(tmp_path / "model") as tmp:
        assert (tmp / PARTIAL_MARKER).is_file()
        (tmp / "config.json").write_text("{}")
    assert os.listdir(tmp_path / "model") == ["config.json"]
