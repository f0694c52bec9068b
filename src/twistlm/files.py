"""File modes of written outputs: what a plain ``open(path, "w")`` would give (0o666 & ~umask).

Atomic writes go through ``tempfile.mkstemp`` (or libraries such as safetensors) that create files 0600; outputs are
meant to be shared like any other file, so writers call :func:`apply_umask` before the final ``os.replace``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """chmod ``path`` to 0o666 & ~umask."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file in the same folder, chmod to the umask mode,
    then ``os.replace``. A reader never sees a half-written file; on error no temporary file is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict) -> Path:
    """Write a dict of tensors to ``path`` in safetensors format, atomically and with the umask mode (as above)."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
