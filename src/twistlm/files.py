"""File modes of written outputs: what a plain ``open(path, "w")`` would give (0o666 & ~umask).

Atomic writes go through ``tempfile.mkstemp`` (or libraries such as safetensors) that create files 0600; outputs are
meant to be shared like any other file, so writers call :func:`apply_umask` before the final ``os.replace``.
"""

from __future__ import annotations

import os


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
