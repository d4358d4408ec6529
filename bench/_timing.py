"""How long one call takes: median and spread over repeats, after warm-up, device-synchronised.

Method. The first call is timed on its own (it includes one-off work: torch.compile's compilation,
Triton's JIT, the optimizer's state) and reported as `first_call_s`. Then `warmup` untimed calls.
Then the number of calls per repeat ("inner") is chosen so that one repeat lasts at least
`min_time` (short calls are timed in a loop, so timer resolution and launch jitter don't dominate).
Each of `repeats` repeats yields one time per call = repeat time / inner. On CUDA a repeat is timed
with a pair of CUDA events recorded on the current stream around the loop (GPU time, no host
sync inside the loop); on the CPU with time.perf_counter. Reported: median, quartiles (q1, q3),
min and max of the per-repeat times.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time

import torch


@dataclasses.dataclass
class Timing:
    times: list[float]          # seconds per call, one entry per repeat
    inner: int                  # calls per repeat
    first_call_s: float         # the first call alone (compilation etc. included)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quartiles(self) -> tuple[float, float]:
        if len(self.times) < 2:
            return self.times[0], self.times[0]
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q1, q3

    def as_dict(self) -> dict:
        q1, q3 = self.quartiles()
        return dict(time_median_s=self.median, time_q1_s=q1, time_q3_s=q3, time_iqr_s=q3 - q1,
                    time_min_s=min(self.times), time_max_s=max(self.times), time_all_s=list(self.times),
                    repeats=len(self.times), calls_per_repeat=self.inner, first_call_s=self.first_call_s)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_once(fn, device: str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _repeat(fn, device: str, inner: int) -> float:
    """Seconds per call over one repeat of `inner` calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure(fn, *, device: str, warmup: int, repeats: int, min_time: float, max_inner: int = 1000) -> Timing:
    """Time fn() as described in the module docstring. Exceptions of the first call propagate
    (that is how an unsupported input shows itself)."""
    gc.collect()
    first = _timed_once(fn, device)
    for _ in range(warmup):
        fn()
    # calibration: one more timed call once warm (the first call is the estimate without warm-up)
    estimate = _timed_once(fn, device) if warmup > 0 else first
    inner = max(1, min(max_inner, math.ceil(min_time / max(estimate, 1e-9))))
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a repeat would be charged to whichever backend ran then
    try:
        times = [_repeat(fn, device, inner) for _ in range(repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(times, inner, first)


#: settle_cpu's window and its idle threshold: the process is quiet once it used less than a tenth
#: of one core over a window; SETTLE_MAX_S bounds the wait (a thread that never stops would be
#: another program's business, not a callable's leftover)
SETTLE_WINDOW_S = 0.005
SETTLE_IDLE_FRACTION = 0.1
SETTLE_MAX_S = 0.5


def settle_cpu(*, cpu_time=time.process_time, wall_time=time.perf_counter, sleep=time.sleep) -> bool:
    """Wait until this process's threads stop using the CPU (at most SETTLE_MAX_S); True if they did.

    Why: thread pools keep spinning after a call returns, waiting for the next one. Measured on
    the 2-core AMD EPYC (AVX2), 2 threads, rest_base batch 1, 2026-12-06: after a call the process
    kept burning CPU for ~40 ms with ONNX Runtime's default allow_spinning, ~10 ms with PyTorch's
    OpenMP pool and ~1 ms with OpenVINO; a PyTorch call started right after an ONNX Runtime call
    took 140-180 ms instead of 91-108 ms (its OpenMP threads share the two cores with the spinning
    worker). Interleaved timing would charge each engine's spin to whichever callable comes next in
    the rotation; a deployed engine runs alone, so every repeat starts on a quiet process."""
    deadline = wall_time() + SETTLE_MAX_S
    while True:
        c0, w0 = cpu_time(), wall_time()
        sleep(SETTLE_WINDOW_S)
        used, elapsed = cpu_time() - c0, wall_time() - w0
        if used <= SETTLE_IDLE_FRACTION * elapsed:
            return True
        if wall_time() >= deadline:
            return False


def _start_quiet(fn, device: str) -> None:
    """Before a CPU repeat of fn: the previous callable's threads quiet (settle_cpu), then one
    untimed lead-in call of fn. Why the lead-in: a quiet process is a cold one, and the first call
    after an idle gap runs slower (threads asleep, caches and clocks cooled). Measured 2026-12-06 on
    the 2-core AVX2 EPYC, 2 threads, oneDNN / MKL products of ResT's shapes timed in threes: 1.4-1.7
    ms back to back, 2.0-2.4 ms each right after a settle. With it the timed calls are the steady
    state of a process running that engine alone."""
    if device == "cpu":
        settle_cpu()
        fn()


def measure_interleaved(fns: dict, *, device: str, warmup: int, repeats: int, min_time: float,
                        max_inner: int = 1000) -> dict:
    """Time several callables doing the same work (one case on several backends) as `measure` does,
    but interleaved: repeat r times every callable once (each `inner` calls), the order rotated by
    one place per repeat, so that load changing on a shared machine reaches every backend alike and
    their ratios stay meaningful. On the CPU each repeat starts once the previous callable's threads
    have gone quiet (settle_cpu), after an untimed lead-in call. Returns {key: Timing}. Exceptions propagate."""
    gc.collect()
    first = {key: _timed_once(fn, device) for key, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    inner = {}
    for key, fn in fns.items():
        if warmup > 0:
            _start_quiet(fn, device)
        estimate = _timed_once(fn, device) if warmup > 0 else first[key]
        inner[key] = max(1, min(max_inner, math.ceil(min_time / max(estimate, 1e-9))))
    keys = list(fns)
    times = {key: [] for key in keys}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                _start_quiet(fns[key], device)
                times[key].append(_repeat(fns[key], device, inner[key]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {key: Timing(times[key], inner[key], first[key]) for key in keys}
