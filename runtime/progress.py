"""What a long evaluation tells the user on stderr while it runs (stdlib only: the runtime ships
inside the artifact): an estimate of its whole time once it has one, and a one-line progress
report on a terminal. Both are fed by the evaluator's `on_score(a, b)` hook, so they count
exactly the positions scored.

The estimate separates the first batch, which carries every one-off cost (CUDA start-up,
kernel selection, torch.compile), from the steady rate after it: scaling the first batch up
with the rest would predict a compiled evaluation to take hours.
"""

import sys
import time

STEADY_SECONDS = 1.0
"""Steady scoring observed before estimating, unless the first batch itself was quicker."""
NEW_FORWARD = 1e-3
"""A pause in the scores longer than this many seconds means a new forward began: the calls of
one forward's rows come microseconds apart, and no forward of a real batch takes under a
millisecond. (Not a share of the first batch: that one carries compilation and start-up, which
can make it a thousand times a steady forward.)"""


class Pace:
    """Times an evaluation through its hooks: `pace(a, b)` is its on_score, `pace.trained` its
    on_train. Scores arrive in bursts, one per forward (a call per row), so a pause in the calls
    marks a new forward (NEW_FORWARD). `sync` (e.g. torch.cuda.synchronize) makes the clock read
    the device's time, not the launch queue's; it runs until the estimate, which `tell(pace)`
    hears of once (seconds in `pace.estimate`)."""

    def __init__(self, total, trains=False, sync=None, tell=None, clock=time.perf_counter):
        self.total, self.trains = total, trains
        self.sync, self.tell, self.clock = sync or (lambda: None), tell or (lambda pace: None), clock
        self.start = self.clock()
        self.first = None
        """Seconds until the first batch's scores: the one-off costs and one forward."""
        self.mark = None
        """(time, positions) where the first batch's scores end and steady scoring starts."""
        self.first_update = None
        """Time of the first training forward after the first batch (modes that train)."""
        self.last, self.done, self.estimate = None, 0, None

    def __call__(self, a, b):
        if self.estimate is None:
            self.sync()
        now = self.clock()
        if self.first is None:
            self.first = now - self.start
        elif now - self.last > NEW_FORWARD:  # the previous forward's scores have all come
            if self.mark is None:
                self.mark = (self.last, self.done)
            elif self.estimate is None and self._representative(self.last):
                self.estimate = self.projected(self.last, self.done)
                self.tell(self)
        self.done += b - a
        self.last = now

    def trained(self, a, b):
        if self.first_update is None and self.first is not None:
            self.first_update = self.clock()

    def _representative(self, end):
        """Is steady scoring up to `end` enough to extrapolate: long enough, and for a mode that
        trains, spanning an update (which costs as much as a good share of the scoring)?"""
        span = end - self.mark[0]
        updated = self.first_update is not None and self.mark[0] < self.first_update < end
        return (span > 0 and self.done > self.mark[1] and span >= min(self.first, STEADY_SECONDS)
                and (updated or not self.trains))

    @property
    def first_batch(self):
        """(seconds, positions) to the end of the first batch, once steady scoring followed it;
        else (0.0, 0): the first batch is then all there was."""
        return (self.mark[0] - self.start, self.mark[1]) if self.mark else (0.0, 0)

    def projected(self, end, done):
        """Seconds for all `total` positions: the time to the end of the first batch once, the
        rest at the steady rate measured from there to (`end`, `done`)."""
        mark_time, mark_done = self.mark
        rate = (done - mark_done) / (end - mark_time)
        return mark_time - self.start + (self.total - mark_done) / rate


def estimate_line(label, pace, tokens):
    """e.g. `ttt: about 412 s for 62,021,632 tokens (first batch 0.8 s)`."""
    return f"{label}: about {pace.estimate:,.0f} s for {tokens:,} tokens (first batch {pace.first:.1f} s)"


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

    def note(self, text):
        """A line of its own above the progress line (which the next redraw puts back)."""
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        """Erase the line, so the result that follows starts on a clean one."""
        if self.enabled and self.last > self.start:
            self.stream.write("\r\033[K")
            self.stream.flush()
