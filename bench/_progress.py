"""A progress bar on stderr: tqdm when it is installed, else one self-overwriting line (a line per
step when stderr is not a terminal, so logs stay readable)."""
from __future__ import annotations

import sys
import time


class _Line:
    def __init__(self, total: int, stream):
        self.total, self.n, self.stream = total, 0, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.monotonic()
        self.desc = ""

    def set_description(self, desc: str):
        self.desc = desc
        self._draw()

    def update(self, n: int = 1):
        self.n += n
        if self.tty:  # without a terminal, one line per step (written when it starts) is enough
            self._draw()

    def _draw(self):
        elapsed = time.monotonic() - self.t0
        text = f"[{self.n:>{len(str(self.total))}}/{self.total}] {elapsed:6.0f}s  {self.desc}"
        if self.tty:
            self.stream.write("\r" + text[:150].ljust(150))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _Null:
    def set_description(self, desc):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def progress(total: int, enabled: bool = True, stream=None):
    """An object with set_description(text), update(n) and close()."""
    if not enabled:
        return _Null()
    stream = stream or sys.stderr
    try:
        from tqdm import tqdm
    except ImportError:
        return _Line(total, stream)
    return tqdm(total=total, file=stream, unit="row", dynamic_ncols=True, leave=True)
