"""Run calls in processes of their own, with a time limit, and report how each ended.

    outcome = isolated.run(module_level_function, *args, timeout=60)
    outcome.status   # "returned", "raised", "signal" (killed by a signal: segfault, abort), "exited"
                     # (the process ended without a result, e.g. os._exit) or "hung" (past the limit, killed)
    outcomes = isolated.run_batch(module_level_function, items, timeout=60)   # {item: Outcome}

Why a process: a hostile call that crashes the interpreter (SIGSEGV, SIGABRT from a C++ assertion)
or never returns must fail only its own case, and be reported as that case's outcome.

How it stays cheap: processes come from multiprocessing's forkserver, which imports the heavy
modules (torch, rest_kernels and its extension, triton, rest, the caller's corpus) once; a process is
then a fork of that server (~80 ms here) instead of a fresh interpreter (~8 s). The server is started
with this process's environment, so TRITON_INTERPRET and thread settings carry over. run_batch runs
several items one after another in one such process where even the fork dominates (most hostile
calls take a millisecond); when that process dies or hangs during an item, the item is run again in
a process of its own so that the crash is attributed to it (see run_batch), and the items after it
go on in a new process. The child's stdout and stderr go to a file: the part written during an item
is part of its outcome (a crash's last words).

As with any multiprocessing start method but fork, a script that calls these must guard its main
code with `if __name__ == "__main__":` (pytest's own entry point needs nothing).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback

#: modules the forkserver imports once; callers may add theirs with preload()
_PRELOAD = ["torch", "rest_kernels", "rest_kernels.backends.registry", "rest_kernels._extension", "rest"]
_OUTPUT_TAIL = 4000


def preload(*modules: str) -> None:
    """Ask the forkserver to import `modules` too (effective if it has not started yet)."""
    for m in modules:
        if m not in _PRELOAD:
            _PRELOAD.append(m)


def _context():
    if "forkserver" not in multiprocessing.get_all_start_methods():  # pragma: no cover (not Linux)
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


@dataclasses.dataclass
class Outcome:
    status: str                       # returned | raised | signal | exited | hung
    value: object = None              # what the call returned (status "returned")
    exc_types: tuple = ()             # "module.QualName" of the exception's class and its bases (status "raised")
    message: str = ""                 # str(exception)
    traceback: str = ""
    signal: int | None = None         # status "signal"
    exitcode: int | None = None
    output: str = ""                  # tail of the child's stdout + stderr
    seconds: float = 0.0
    note: str = ""                    # how a batch worker's crash was attributed (run_batch)

    def raised(self, exc_type: type) -> bool:
        """Whether the call raised an instance of exc_type (compared by qualified class name)."""
        return self.status == "raised" and _qualname(exc_type) in self.exc_types

    def describe(self) -> str:
        if self.status == "returned":
            head = f"returned {self.value!r:.300}"
        elif self.status == "raised":
            head = f"raised {self.exc_types[0] if self.exc_types else '?'}: {self.message[:1500]}"
        elif self.status == "signal":
            head = f"killed by signal {self.signal} ({signal.Signals(self.signal).name})"
        elif self.status == "hung":
            head = f"still running after the time limit ({self.seconds:.0f} s): killed"
        else:
            head = f"exited with status {self.exitcode} without a result"
        tail = f"\n--- output tail ---\n{self.output}" if self.output.strip() else ""
        note = f"\n{self.note}" if self.note else ""
        return f"{head} [{self.seconds:.2f} s]{note}{tail}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _redirect_output(output_path):
    """Everything the child prints, Python or C++, goes to the file (fd level, so C++ stderr too)."""
    fd = os.open(output_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _child(conn, output_path, target, args):
    _redirect_output(output_path)
    try:
        value = target(*args)
        try:
            conn.send(("returned", value))
        except Exception as e:  # noqa: BLE001  (an unpicklable value: report its repr)
            conn.send(("returned", f"<unpicklable {type(value).__name__}: {e}>"))
    except BaseException as e:  # noqa: BLE001  (SystemExit and KeyboardInterrupt are outcomes too)
        names = tuple(_qualname(c) for c in type(e).__mro__)
        conn.send(("raised", names, str(e), traceback.format_exc(limit=20)))
    finally:
        conn.close()


def _tail(path: str, start: int = 0, end: int | None = None) -> str:
    """The last _OUTPUT_TAIL bytes of path[start:end] (the part written during one item)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell() if end is None else end
            f.seek(max(start, end - _OUTPUT_TAIL))
            return f.read(max(0, end - max(start, end - _OUTPUT_TAIL))).decode("utf-8", "replace")
    except OSError:
        return ""




def run(target, *args, timeout: float = 60.0) -> Outcome:
    """Call target(*args) in a fresh process; `target` must be a module-level function (it is pickled
    by reference) and its arguments and result picklable."""
    ctx = _context()
    fd, output_path = tempfile.mkstemp(prefix="isolated-", suffix=".log")
    os.close(fd)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, output_path, target, args), daemon=True)
    start = time.monotonic()
    try:
        proc.start()
        send.close()  # the child holds the only writer: EOF here means the child is gone
        message = None
        if receive.poll(timeout):
            try:
                message = receive.recv()
            except (EOFError, OSError):
                message = None  # died before reporting
        # a child that reported exits promptly; one that did not is dead or hung
        proc.join(timeout=10 if message is not None else max(0.0, timeout - (time.monotonic() - start)) + 1)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            if message is None:
                return Outcome("hung", seconds=time.monotonic() - start, output=_tail(output_path))
        seconds = time.monotonic() - start
        output = _tail(output_path)
        if message is not None and message[0] == "returned":
            return Outcome("returned", value=message[1], exitcode=proc.exitcode, output=output, seconds=seconds)
        if message is not None:
            _, names, text, tb = message
            return Outcome("raised", exc_types=names, message=text, traceback=tb, exitcode=proc.exitcode,
                           output=output, seconds=seconds)
        code = proc.exitcode
        if code is not None and code < 0:
            return Outcome("signal", signal=-code, exitcode=code, output=output, seconds=seconds)
        return Outcome("exited", exitcode=code, output=output, seconds=seconds)
    finally:
        receive.close()
        try:
            os.unlink(output_path)
        except OSError:
            pass


# --------------------------------------------------------------------------- batches
def _batch_child(conn, output_path, target, items):
    _redirect_output(output_path)
    def offset():  # where this item's output starts / ends in the file (Python's buffers flushed)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        return os.fstat(2).st_size

    try:
        for i, item in enumerate(items):
            conn.send(("start", i, offset()))
            try:
                value = target(item)
                try:
                    conn.send(("returned", i, offset(), value))
                except Exception as e:  # noqa: BLE001
                    conn.send(("returned", i, offset(), f"<unpicklable {type(value).__name__}: {e}>"))
            except BaseException as e:  # noqa: BLE001
                names = tuple(_qualname(c) for c in type(e).__mro__)
                conn.send(("raised", i, offset(), names, str(e), traceback.format_exc(limit=20)))
        conn.send(("done",))
    finally:
        conn.close()


def _run_batch_once(target, items, timeout):
    """Run items in one process until it finishes, dies or hangs. Returns ({index: Outcome} of the
    items that ended normally, (index, Outcome) of the item during which the process ended, or None)."""
    ctx = _context()
    fd, output_path = tempfile.mkstemp(prefix="isolated-batch-", suffix=".log")
    os.close(fd)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_batch_child, args=(send, output_path, target, list(items)), daemon=True)
    done, current, started, offset = {}, None, time.monotonic(), 0
    try:
        proc.start()
        send.close()
        while True:
            # the time limit is per item; before the first "start", the fork itself gets one too
            if not receive.poll(max(0.0, timeout - (time.monotonic() - started))):
                proc.kill()
                proc.join(10)
                return done, (current, Outcome("hung", seconds=time.monotonic() - started,
                                               output=_tail(output_path, offset)))
            try:
                message = receive.recv()
            except (EOFError, OSError):
                break  # the process is gone: the exit status says how
            if message[0] == "done":
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                return done, None
            if message[0] == "start":
                current, offset, started = message[1], message[2], time.monotonic()
                continue
            seconds, output = time.monotonic() - started, _tail(output_path, offset, message[2])
            if message[0] == "returned":
                done[message[1]] = Outcome("returned", value=message[3], output=output, seconds=seconds)
            else:
                _, i, _end, names, text, tb = message
                done[i] = Outcome("raised", exc_types=names, message=text, traceback=tb, output=output,
                                  seconds=seconds)
            current = None
        proc.join(10)
        code = proc.exitcode
        seconds, output = time.monotonic() - started, _tail(output_path, offset)
        if code is not None and code < 0:
            ended = Outcome("signal", signal=-code, exitcode=code, output=output, seconds=seconds)
        else:
            ended = Outcome("exited", exitcode=code, output=output, seconds=seconds)
        return done, (current, ended)
    finally:
        receive.close()
        if proc.is_alive():
            proc.kill()
        try:
            os.unlink(output_path)
        except OSError:
            pass


def run_batch(target, items, timeout: float = 60.0) -> dict:
    """Call target(item) for each item, several to a process; returns {item: Outcome}.

    When the process dies or hangs during an item, that item is run again alone: its outcome is the
    one of that solo run, except that a crash which happens only after the batch's earlier items
    (state they left behind) is kept as a crash, with a note naming them. The remaining items go on
    in a fresh process. `items` must be hashable and picklable."""
    items = list(items)
    results, pending = {}, items
    while pending:
        done, ended = _run_batch_once(target, pending, timeout)
        for i, outcome in done.items():
            results[pending[i]] = outcome
        if ended is None:
            break
        index, batch_outcome = ended
        if index is None:  # died before starting an item (or between two): go on with the rest
            index = min(set(range(len(pending))) - set(done), default=len(pending))
            if index >= len(pending):
                break
        item = pending[index]
        solo = run(target, item, timeout=timeout)
        if solo.status in ("returned", "raised") and batch_outcome.status != "hung":
            before = ", ".join(map(str, pending[:index])) or "nothing"
            batch_outcome.note = (f"the process died during this item after running {before}; alone it "
                                  f"{solo.describe().splitlines()[0]}")
            solo = batch_outcome
        results[item] = solo
        pending = pending[index + 1:]
    return results
