"""cwbuild.interrupts.deferred: a signal inside the block is acted on only after it, by the usual handler."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import pytest

from cwbuild.interrupts import deferred


class Stopped(Exception):
    pass


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signum)


@pytest.fixture
def term_raises() -> object:
    saved = signal.signal(signal.SIGTERM, _raise)
    yield
    signal.signal(signal.SIGTERM, saved)


@pytest.mark.usefixtures("term_raises")
def test_signal_inside_is_raised_after_the_block() -> None:
    done = []

    def block() -> None:
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("after the kill, still inside")  # the handler did not run here

    with pytest.raises(Stopped):
        block()
    assert done == ["after the kill, still inside"]
    assert signal.getsignal(signal.SIGTERM) is _raise  # handlers are put back


@pytest.mark.usefixtures("term_raises")
def test_without_a_signal_nothing_happens() -> None:
    with deferred():
        pass
    assert signal.getsignal(signal.SIGTERM) is _raise
    with pytest.raises(Stopped):  # and the usual handler is live again
        signal.raise_signal(signal.SIGTERM)


@pytest.mark.usefixtures("term_raises")
def test_an_exception_inside_still_restores_the_handlers() -> None:
    def block() -> None:
        with deferred():
            raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        block()
    assert signal.getsignal(signal.SIGTERM) is _raise


@pytest.mark.usefixtures("term_raises")
def test_outside_the_main_thread_it_holds_nothing() -> None:
    seen: list[object] = []

    def worker() -> None:
        with deferred():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [_raise]
