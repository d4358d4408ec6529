"""Every case of the hostile-call corpus (tests/support/hostile_calls.py) ends as it must: in a Python
exception of the expected type whose message names the argument, or in a correct result. Never a
crash, an abort, a hang or a silent wrong answer.

How the cases run (tests/support/isolated.py): in processes forked from a preloaded forkserver, so a
segfault, an abort or a hang is an outcome, never the end of the test run. Most hostile calls take a
millisecond and the fork ~80 ms, so cases run in batches of BATCH per process (consecutive cases of
one entry point); when a batch's process dies or hangs during a case, that case is run again in a
process of its own and the crash is attributed to it (or, if it only crashes after the batch's
earlier cases, kept as a crash with a note naming them), and the rest of the batch goes on in a new
process. Cases that change process state (Case.alone) always run alone. The selected cases run once,
WORKERS batches at a time, in a module fixture; each test then checks its own case's outcome, so a
failure names its case and shows how it ended (exception and traceback, signal or time-out, and the
child's output). A case marked xfail(strict=True) is a known bug in the compiled code (csrc/).
"""
import concurrent.futures
import os

import pytest

from support import hostile_calls
from support import isolated

isolated.preload("support.hostile_calls", "triton", "rest_kernels.triton.emsa_fwd", "rest_kernels.triton.emsa_bwd",
                 "rest_kernels.triton.pa")

#: parallel processes; REST_KERNELS_HOSTILE_WORKERS overrides (default: the CPUs this process may use, at most 4)
WORKERS = int(os.environ.get("REST_KERNELS_HOSTILE_WORKERS", "0")) or min(4, len(os.sched_getaffinity(0)))
#: cases per process; REST_KERNELS_HOSTILE_BATCH=1 runs every case in a process of its own
BATCH = int(os.environ.get("REST_KERNELS_HOSTILE_BATCH", "24"))


def _params():
    for case in hostile_calls.corpus():
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case.id, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def outcomes(request):
    """Run the cases this session selected from this module (all of them, or a -k subset)."""
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    cases = hostile_calls.by_id()
    batches, current = [], []
    for cid in selected:
        case = cases[cid]
        if case.alone:
            batches.append([cid])
            continue
        if current and (len(current) >= BATCH or cid.split("/")[0] != current[0].split("/")[0]
                        or case.timeout != cases[current[0]].timeout):
            batches.append(current)
            current = []
        current.append(cid)
    if current:
        batches.append(current)

    def run(batch):
        timeout = cases[batch[0]].timeout
        if len(batch) == 1:
            return {batch[0]: isolated.run(hostile_calls.run_case, batch[0], timeout=timeout)}
        return isolated.run_batch(hostile_calls.run_case, batch, timeout=timeout)

    results = {}
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for done in pool.map(run, batches):
            results.update(done)
    return results


def test_corpus_is_large_and_covers_every_entry_point():
    ids = [c.id for c in hostile_calls.corpus()]
    assert len(ids) >= 300
    for prefix in ("emsa-bad/", "emsa-ok/", "pa-bad/", "pa-ok/", "custom-op-bad/", "custom-op-ok/", "module-bad/",
                   "module-ok/", "model-bad/", "model-ok/", "checkpoint-bad/", "checkpoint-ok/", "bench-bad/"):
        assert any(i.startswith(prefix) for i in ids), prefix
    for backend in hostile_calls.BACKENDS:
        assert any(i.endswith("/" + backend) for i in ids), backend


@pytest.mark.parametrize("case_id", _params())
def test_hostile_call(case_id, outcomes):
    case = hostile_calls.by_id()[case_id]
    outcome = outcomes[case_id]
    problem = case.expect.problem(outcome)
    assert problem is None, f"{case_id}: {problem}\n{outcome.describe()}\n{outcome.traceback[-3000:]}"
