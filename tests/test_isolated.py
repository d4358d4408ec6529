"""tests/support/isolated.py reports how a call ended, including the ways the hostile-call corpus must
never end: killed by a signal (segfault, abort), exited without a result, or hung. These are the
negative controls of tests/test_hostile_calls.py: its checks can only fail if these can be seen."""
import ctypes
import os
import signal
import time

from support import isolated

_state = {}


def returns(x):
    return x * 2


def raises(message):
    raise ValueError(message)


def segfault(_=None):
    print("about to read address 0", flush=True)
    ctypes.string_at(0)


def aborts(_=None):
    os.abort()


def hangs(_=None):
    time.sleep(3600)


def exits(_=None):
    os._exit(3)


def item(name):
    """Batch target: behaves by name; 'poison' leaves state that makes a later 'victim' crash."""
    if name == "poison":
        _state["poisoned"] = True
        return "poisoned"
    if name == "victim" and _state.get("poisoned"):
        segfault()
    return {"segv": segfault, "hang": hangs, "raise": lambda: raises("bad item")}.get(name, lambda: name)()


def test_returned_and_raised():
    assert isolated.run(returns, 21).value == 42
    out = isolated.run(raises, "q must be 4-dimensional")
    assert out.status == "raised" and out.raised(ValueError) and "4-dimensional" in out.message
    assert not out.raised(TypeError)


def test_crashes_and_hangs_are_outcomes():
    seg = isolated.run(segfault)
    assert seg.status == "signal" and seg.signal == signal.SIGSEGV, seg.describe()
    assert "about to read address 0" in seg.output  # the child's last words are kept
    assert isolated.run(aborts).signal == signal.SIGABRT
    ex = isolated.run(exits)
    assert ex.status == "exited" and ex.exitcode == 3
    start = time.monotonic()
    hung = isolated.run(hangs, timeout=2)
    assert hung.status == "hung" and time.monotonic() - start < 30


def test_batch_attributes_a_crash_to_its_item_and_goes_on():
    out = isolated.run_batch(item, ["a", "segv", "b", "hang", "raise", "c"], timeout=3)
    assert out["a"].value == "a" and out["b"].value == "b" and out["c"].value == "c"
    assert out["segv"].status == "signal" and out["segv"].signal == signal.SIGSEGV
    assert out["hang"].status == "hung"
    assert out["raise"].raised(ValueError)


def test_batch_keeps_a_crash_caused_by_an_earlier_item():
    # alone, "victim" is fine; after "poison" in the same process it crashes: reported as a crash,
    # with a note naming what ran before it
    out = isolated.run_batch(item, ["poison", "victim", "after"], timeout=10)
    assert out["victim"].status == "signal" and "poison" in out["victim"].note
    assert out["after"].value == "after"
