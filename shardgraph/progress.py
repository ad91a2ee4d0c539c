"""Stage progress for long command-line runs: one ``tqdm`` bar on stderr, only on a terminal.

    with Stages(["build model", "trace+compile", "report"]) as stages:
        stages.start("build model")
        ...
        stages.echo("a line of output")      # printed above the bar, not through it

The passes report no progress of their own, so the bar counts stages and shows the time spent;
a background thread redraws it while a long stage runs. It appears only once a run has taken
longer than ``delay`` seconds, so quick commands print nothing extra, and never when stderr is
not a terminal (pipes, files, CI logs, tests).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Sequence, TextIO

__all__ = ["Stages", "is_terminal"]


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False


class Stages:
    """A progress bar over named stages; a no-op when disabled."""

    def __init__(self, names: Sequence[str], title: str = "shardgraph", *, enabled: bool | None = None,
                 stream: TextIO | None = None, delay: float = 1.0, redraw_every: float = 0.25):
        self.names = list(names)
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.delay = delay
        self.redraw_every = redraw_every
        self.current: str | None = None
        self.done = 0
        self._bar = None
        self._stop = threading.Event()
        self._redraw_thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> "Stages":
        self._started = time.monotonic()
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.names), desc=self.title, file=self.stream, leave=False,
                             delay=self.delay, bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}]",
                             dynamic_ncols=True)
            self._redraw_thread = threading.Thread(target=self._redraw, name="shardgraph-progress", daemon=True)
            self._redraw_thread.start()
        return self

    def start(self, name: str) -> None:
        """Mark the previous stage done and ``name`` running."""
        finished = 1 if self.current is not None else 0
        self.done += finished
        self.current = name
        if self._bar is not None:
            self._bar.set_description_str(f"{self.title}: {name}", refresh=False)
            self._bar.update(finished)

    def echo(self, text: str = "") -> None:
        """Print a line of output on stdout without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._redraw_thread is not None:
            self._redraw_thread.join()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._started

    def _redraw(self) -> None:
        # update(0) redraws the elapsed time while a stage runs without advancing the count; tqdm
        # itself holds the first draw back until ``delay`` has passed.
        while not self._stop.wait(self.redraw_every):
            bar = self._bar
            if bar is not None:
                bar.update(0)
