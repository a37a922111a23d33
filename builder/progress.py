"""Progress of long evaluations on stderr (tokens scored of the total, rate, ETA), fed by the
evaluator's `on_score(a, b)` hook so it counts exactly what was scored. Off with --json and when
stderr is not a terminal, so logs and piped output get no redraws."""

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class TokenRate(ProgressColumn):
    def render(self, task):
        return Text(f"{task.speed:,.0f} tok/s" if task.speed else "", style="progress.data.speed")


@contextlib.contextmanager
def scoring_progress(enabled=True, console=None):
    """Yields `track(label, total)`, which returns an on_score hook advancing a bar of `total`
    tokens. Lines printed meanwhile through the same stderr `console` appear above the bar."""
    console = console or Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TokenRate(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                   disable=not (enabled and console.is_terminal))

    def track(label, total):
        task = bar.add_task(label, total=total)
        return lambda a, b: bar.advance(task, b - a)

    with bar:
        yield track
