"""Ctrl-C during training: finish the update, write a checkpoint, then stop.

A ``KeyboardInterrupt`` raised wherever the signal happens to land can leave a trainer half way through an update:
its sampler's generator advanced, ``optimizer.step()`` part done, or the update applied but not yet logged. A
checkpoint written from that state would resume into a run that differs from the uninterrupted one (or into corrupt
parameters). :class:`DeferredInterrupt` therefore turns the first SIGINT into a request that the loop reads at the
next update boundary; a second SIGINT interrupts at once (nothing is saved then, and ``resume`` continues from the
last periodic checkpoint).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

STOP_MESSAGE = "stopping after this update (Ctrl-C again to stop at once, without a checkpoint)"


class DeferredInterrupt:
    """Context manager: while active (in the main thread, where Python delivers signals), the first SIGINT sets
    :attr:`requested` and prints one line; the second raises ``KeyboardInterrupt``. It leaves SIGINT alone where it
    is ignored (a background job) or where it cannot install a handler (not the main thread)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if current is not signal.SIG_IGN:
                self._previous = current
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(STOP_MESSAGE, file=sys.stderr, flush=True)
