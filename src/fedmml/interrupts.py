"""Ctrl-C and SIGTERM, remembered until acted on.

Python raises a signal handler's KeyboardInterrupt wherever the main thread happens to be, and where that is a
finalizer (a ``__del__``, such as ``subprocess.Popen``'s, or a weakref callback run by the garbage collector)
it prints "Exception ignored" and goes on: a run interrupted during its set-up then finished and exited 0,
and a Flower run went on polling a paused SuperLink. So the command line records the signal, and the places
that start new work or wait (a method, stage, round or client starting; each poll of a Flower run) raise it
again if it was lost.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_pending = False


def _interrupt(signum: int, frame: Any) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def raise_if_lost() -> None:
    """Raise the KeyboardInterrupt of a signal that a finalizer swallowed (once)."""
    global _pending
    # Only the main thread may raise it: a helper thread that raised would end alone, unnoticed.
    if _pending and threading.current_thread() is threading.main_thread():
        _pending = False
        raise KeyboardInterrupt


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, and are remembered, while the block runs."""
    global _pending
    _pending = False
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending = False
