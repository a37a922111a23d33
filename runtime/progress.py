"""A one-line progress report on stderr for a long evaluation (stdlib only: the runtime ships
inside the artifact). It is the evaluator's `on_score(a, b)` hook, so it counts exactly the
positions scored; it stays silent when stderr is not a terminal."""

import sys
import time


class ProgressLine:
    EVERY = 0.5
    """Seconds between redraws."""

    def __init__(self, label, total, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label, self.total, self.done = label, total, 0
        self.start = self.last = time.perf_counter()

    def __call__(self, a, b):
        self.done += b - a
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.EVERY:
            self.last = now
            self._draw(now)

    def _draw(self, now):
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.stream.write(f"\r{self.label}: {self.done:,}/{self.total:,} tokens scored, {rate:,.0f} tok/s, "
                          f"ETA {eta:.0f} s   ")
        self.stream.flush()

    def close(self):
        """Erase the line, so the result that follows starts on a clean one."""
        if self.enabled and self.last > self.start:
            self.stream.write("\r\033[K")
            self.stream.flush()
