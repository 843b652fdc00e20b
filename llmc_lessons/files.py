"""Writing files so that no reader, kill or full disk ever leaves half of one; where the package keeps what it
works out once (prepared data, compiled emulator kernels, cuBLASLt's algorithm choices)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Where the package keeps what it works out once: $LLMC_CACHE, else $XDG_CACHE_HOME/llmc_lessons, else
    ~/.cache/llmc_lessons."""
    if os.environ.get("LLMC_CACHE"):
        return Path(os.environ["LLMC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llmc_lessons"


@contextmanager
def locked(path: str | Path):
    """Hold an exclusive lock on `<path>.lock` while the block runs, so that processes sharing `path` read, change
    and write it one at a time (POSIX advisory locks; where there are none, as on Windows, no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: str | Path, data) -> Path:
    """Write `data` (bytes, or a function that writes to the open binary file) to a temporary file in the same
    folder, `.<name>.<random>.tmp`, then rename it over `path`: readers never see half a file, and a kill or a
    full disk leaves the old file whole (and at worst that temporary file behind). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
