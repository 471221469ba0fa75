"""SIGTERM and Ctrl-C always stop training (medimgen.core.interrupts).

A signal's exception is raised at whatever Python code runs when the signal is handled; in a garbage-collection
callback (MLflow's SQLAlchemy sessions have weakref callbacks) Python only prints "Exception ignored" and the
process trains on. Here the signal is raised inside such a callback, the way it happened in
test_tracking_outage.py::test_sigterm_ends_the_run_as_killed when the run did not stop."""

from __future__ import annotations

import signal
import sys
import time
import weakref

import pytest

from medimgen.core.interrupts import Terminated, sigterm_interrupts

LOOP_S = 3.0  # the "training" a lost interrupt would let run to its end


@pytest.fixture
def unraisable(monkeypatch):
    """What reaches the process's unraisable hook (what Python would print as "Exception ignored in ...")."""
    class Seen(list):
        def hook(self, u):
            self.append(u.exc_value)

    seen = Seen()
    monkeypatch.setattr(sys, "unraisablehook", seen.hook)
    # the handlers of an interactive process (a background job, e.g. under nohup, starts with SIGINT ignored)
    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, signal.SIG_DFL),
                                                    (signal.SIGINT, signal.default_int_handler))}
    yield seen
    for s, h in previous.items():
        signal.signal(s, h)


class _Finalised:
    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        signal.raise_signal(self.signum)  # the handler runs here, inside the finaliser


def _train_until_interrupted(finaliser: str, signum: int) -> float:
    """Seconds from the signal (raised inside a finaliser) until its KeyboardInterrupt ends the loop."""
    class Target:
        pass

    t0 = time.monotonic()
    with sigterm_interrupts():
        if finaliser == "weakref callback":
            target = Target()
            ref = weakref.ref(target, lambda _: signal.raise_signal(signum))  # noqa: F841 (kept alive)
        else:
            target = _Finalised(signum)
        t0 = time.monotonic()
        del target  # the finaliser runs now
        while time.monotonic() - t0 < LOOP_S:
            time.sleep(0.001)
    pytest.fail(f"{signal.Signals(signum).name} in a {finaliser} was lost: the loop ran its {LOOP_S} s")


@pytest.mark.parametrize("finaliser", ["weakref callback", "__del__"])
@pytest.mark.parametrize("signum, raised", [pytest.param(signal.SIGTERM, Terminated, id="SIGTERM"),
                                            pytest.param(signal.SIGINT, KeyboardInterrupt, id="Ctrl-C")])
def test_an_interrupt_lost_in_a_finaliser_is_raised_again(finaliser, signum, raised, unraisable):
    t0 = time.monotonic()
    with pytest.raises(raised) as caught:
        _train_until_interrupted(finaliser, signum)
    assert time.monotonic() - t0 < 1.0
    assert type(caught.value) is raised
    assert unraisable == []  # handled, so nothing printed as "Exception ignored"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # outside a run, SIGTERM kills as usual
    assert sys.unraisablehook == unraisable.hook  # the previous hook is back


def test_sigterm_raises_terminated_once(unraisable):
    """A SIGTERM in ordinary code raises Terminated; a second one would kill as usual (default action again)."""
    with pytest.raises(Terminated):
        with sigterm_interrupts():
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("SIGTERM did not interrupt")
    assert unraisable == []
    with sigterm_interrupts():
        try:
            signal.raise_signal(signal.SIGTERM)
        except Terminated:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_other_unraisable_errors_reach_the_previous_hook(unraisable):
    class Broken:
        def __del__(self):
            raise ValueError("a finaliser's own error")

    with sigterm_interrupts():
        Broken()
    assert [str(e) for e in unraisable] == ["a finaliser's own error"]


def test_nested_use_keeps_the_outer_handler(unraisable):
    """train() inside tune(): the inner one changes nothing, the outer one restores everything."""
    with sigterm_interrupts():
        handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGTERM) is handler and sys.unraisablehook is hook
        assert signal.getsignal(signal.SIGTERM) is handler and sys.unraisablehook is hook
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
