"""Open a page in headless Chromium with networking disabled and read back the rendered DOM and console output.

Used by the browser tests (``pytest -m browser``) and ``benchmarks/html_size.py``; nothing else in twistlm needs a
browser. The network is cut three ways: host names resolve nowhere (``--host-resolver-rules``), every request goes
to a closed local proxy port, and the pages themselves forbid network sources (their Content-Security-Policy).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from twistlm.errors import ConfigError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_ENV = "TWISTLM_CHROMIUM"
"""Environment variable naming the browser binary to use (overrides the search of :data:`CHROMIUM_NAMES`)."""
DEFAULT_TIMEOUT_S = 60
CLOSED_PROXY = "http://127.0.0.1:9"
"""The discard port: nothing listens there, so any request the page made would fail (and be reported)."""
CONSOLE_LINE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)?\]\s*(.*)")
"""Chromium's log line for a console message of the page (``--enable-logging=stderr``)."""
NO_NETWORK_FLAGS = (
    "--host-resolver-rules=MAP * ~NOTFOUND",
    f"--proxy-server={CLOSED_PROXY}",
    "--proxy-bypass-list=<-loopback>",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
)


@dataclass
class Rendered:
    """What the browser showed: the DOM after the scripts ran, the page's console messages, the wall time."""

    dom: str
    console: list[str]
    seconds: float
    stderr: str

    def element_text(self, element_id: str) -> str | None:
        """The text of the (leaf) element with this id in the DOM, or None if absent."""
        m = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', self.dom)
        return None if m is None else m.group(1)


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome binary (``$TWISTLM_CHROMIUM`` first), or None."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render(path: str | os.PathLike, fragment: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> Rendered:
    """Load ``path`` (``file://``, plus ``#fragment``) in headless Chromium without network; return the rendered DOM."""
    binary = find_chromium()
    if binary is None:
        raise ConfigError(f"no Chromium found (install the 'chromium' package or set ${CHROMIUM_ENV})")
    url = Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="twistlm-chromium-") as profile:
        cmd = [binary, "--headless", "--disable-gpu", f"--user-data-dir={profile}", *NO_NETWORK_FLAGS,
               "--enable-logging=stderr", "--v=0", "--dump-dom", url]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        seconds = time.perf_counter() - start
    if proc.returncode != 0 and not proc.stdout.strip():
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    console = [m.group(1) for line in proc.stderr.splitlines() if (m := CONSOLE_LINE.search(line))]
    return Rendered(dom=proc.stdout, console=console, seconds=seconds, stderr=proc.stderr)
