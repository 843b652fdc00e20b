"""Writing files so that no reader, kill or full disk ever leaves half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
