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


def measure_interleaved(fns: dict, *, device: str, warmup: int, repeats: int, min_time: float,
                        max_inner: int = 1000) -> dict:
    """Time several callables doing the same work (one case on several backends) as `measure` does,
    but interleaved: repeat r times every callable once (each `inner` calls), the order rotated by
    one place per repeat, so that load changing on a shared machine reaches every backend alike and
    their ratios stay meaningful. Returns {key: Timing}. Exceptions propagate."""
    gc.collect()
    first = {key: _timed_once(fn, device) for key, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    inner = {}
    for key, fn in fns.items():
        estimate = _timed_once(fn, device) if warmup > 0 else first[key]
        inner[key] = max(1, min(max_inner, math.ceil(min_time / max(estimate, 1e-9))))
    keys = list(fns)
    times = {key: [] for key in keys}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[key].append(_repeat(fns[key], device, inner[key]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {key: Timing(times[key], inner[key], first[key]) for key in keys}
