"""Holding termination signals across a step that must not be cut in half.

A request that makes something outside this process (a container in the Podman store, a mount) cannot be
undone if a signal interrupts it before its answer arrives: the server completes it, but the caller never
learns what to remove, and a removal sent at once can reach the server before the creation does. Inside
`deferred()`, SIGTERM, SIGHUP and SIGINT are recorded instead of acted on; on leaving, the handlers are put
back and the first recorded signal is raised again, so the usual handler (SystemExit from the build,
KeyboardInterrupt) runs with the created thing already known to its cleanup.

Python runs signal handlers in the main thread only, whichever thread the kernel delivered to, so replacing
the handlers there covers every thread. Elsewhere (a worker thread) `deferred()` does nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: What a user or a service manager sends to stop a build.
HELD = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextmanager
def deferred(signums: tuple[signal.Signals, ...] = HELD) -> Iterator[None]:
    """Hold `signums` for the duration of the block; re-raise the first one that arrived, after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    saved = {s: signal.signal(s, hold) for s in signums}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])
