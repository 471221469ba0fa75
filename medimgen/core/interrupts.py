"""SIGTERM handled like Ctrl-C, and neither of them lost.

While :func:`sigterm_interrupts` is active, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) where the main
thread is, so a run ends as KILLED with its local outputs flushed; a second SIGTERM kills as usual.

A signal's exception is raised at whatever Python code runs when the signal is handled. When that is a weakref
callback, a ``__del__`` or another finaliser the garbage collector runs in the middle of training, Python does
not propagate the exception: it prints "Exception ignored in ..." and carries on, so the process trains on after
SIGTERM or Ctrl-C. While active, :func:`sigterm_interrupts` catches such a lost interrupt (``sys.unraisablehook``)
and hands the signal to the main thread again, so it is raised at the next bytecode outside the finaliser.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


REDELIVERY_DELAY_S = 0.05  # a lost interrupt is raised again this much later (finalisers take microseconds)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (handled like Ctrl-C: the run ends as KILLED)."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills as usual
    raise Terminated("SIGTERM")


def _deliver_again(unraisable) -> bool:
    """A signal's interrupt that a finaliser swallowed: handed to the main thread again; whether it was one.

    The signal is sent by a timer thread a moment later: sent from here, its handler would run (and raise) at once,
    inside the finaliser still. Should it land in a finaliser again, it comes back here and goes round again."""
    import _thread

    exc = unraisable.exc_value
    if isinstance(exc, Terminated):
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False  # someone else's handler now: not ours to restore
        signal.signal(signal.SIGTERM, _raise_terminated)
        signum = signal.SIGTERM
    elif isinstance(exc, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signum = signal.SIGINT
    else:
        return False
    timer = threading.Timer(REDELIVERY_DELAY_S, _thread.interrupt_main, (signum,))
    timer.daemon = True
    timer.start()
    return True


@contextlib.contextmanager
def sigterm_interrupts():
    """While active (in the main thread, where SIGTERM has its default action), SIGTERM raises Terminated
    instead of killing the process at once, and an interrupt (SIGTERM or Ctrl-C) raised inside a finaliser is
    raised again outside it. A second SIGTERM kills as usual. Usable as a decorator."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if not _deliver_again(unraisable):
            previous_hook(unraisable)

    signal.signal(signal.SIGTERM, _raise_terminated)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous_hook
