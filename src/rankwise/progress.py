"""Progress for long work, on stderr: a rich bar on a terminal, plain log lines elsewhere.

``enabled()`` answers "does the user want progress?": yes unless ``RANKWISE_PROGRESS`` is
``0``/``false``/``no``/``off`` (tests set it). Commands pass that on; :class:`Bar` picks how to
show it. On an interactive terminal it draws a live rich bar; in a log file, CI or under
``nohup`` (stderr not a TTY) it prints a plain line such as

    [rankwise] calibrate 30/120 (25%) 0:00:10 elapsed, ~0:00:30 left  loss=2.31

at the start, then whenever another 10% is done or 10 s have passed since the last line
(whichever comes first), and once more at the end, so a 15-minute job shows it is alive
without flooding the log.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TextIO, TypeVar

T = TypeVar("T")

PREFIX = "[rankwise]"
LOG_EVERY_SECONDS = 10.0
LOG_EVERY_FRACTION = 0.1
_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether progress is wanted at all: False only when ``RANKWISE_PROGRESS`` turns it off.

    It does not depend on the terminal: where stderr is not a TTY, :class:`Bar` prints plain
    log lines instead of a live bar.
    """
    return os.environ.get("RANKWISE_PROGRESS", "1").strip().lower() not in _OFF


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
    except ValueError:  # a closed stream
        return False


def _clock_text(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0.0, seconds))))


def _fields_text(fields: dict[str, object]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


class _LogLines:
    """Plain progress lines for a stream that is not a terminal (see the module docstring)."""

    def __init__(self, total: int | None, description: str, stream: TextIO, clock: Callable[[], float]) -> None:
        self.total, self.description, self.stream, self.clock = total, description, stream, clock
        self.done = 0
        self.fields: dict[str, object] = {}
        self.start = clock()
        self._last_time = self.start
        self._last_done = 0
        self._emit()

    def update(self, n: int) -> None:
        self.done += n
        finished = self.total is not None and self.done >= self.total
        if not finished and self._due():  # the line at the end is close()'s
            self._emit()

    def set(self, fields: dict[str, object]) -> None:
        self.fields = dict(fields)

    def close(self) -> None:
        self._emit(final=True)

    def _due(self) -> bool:
        if self.clock() - self._last_time >= LOG_EVERY_SECONDS:
            return True
        if self.total:
            return (self.done - self._last_done) / self.total >= LOG_EVERY_FRACTION - 1e-9
        return False

    def line(self, *, final: bool = False) -> str:
        """The text of one progress line at the current count."""
        elapsed = self.clock() - self.start
        parts = [PREFIX, self.description]
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.done // self.total}%)")
        else:
            parts.append(str(self.done))
        timing = f"{_clock_text(elapsed)} elapsed"
        if final:
            timing += ", done" if self.total is None or self.done >= self.total else ", stopped"
        elif self.total and 0 < self.done < self.total:
            timing += f", ~{_clock_text(elapsed / self.done * (self.total - self.done))} left"
        parts.append(timing)
        text = " ".join(parts)
        return f"{text}  {_fields_text(self.fields)}" if self.fields else text

    def _emit(self, *, final: bool = False) -> None:
        self.stream.write(self.line(final=final) + "\n")
        self.stream.flush()
        self._last_time, self._last_done = self.clock(), self.done


class _RichBar:
    """A live rich progress bar for an interactive terminal."""

    def __init__(self, total: int | None, description: str, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(file=stream),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def update(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def set(self, fields: dict[str, object]) -> None:
        self.progress.update(self.task, info=_fields_text(fields))

    def close(self) -> None:
        self.progress.stop()


class Bar:
    """One progress indicator: ``update(n)``, ``set(**fields)`` for live numbers, ``close()``.

    Shown only when ``show`` is true and :func:`enabled`; drawn as a rich bar when ``stream``
    (default: ``sys.stderr``) is a terminal, else as plain log lines. ``clock`` (seconds,
    default ``time.monotonic``) is there for tests.
    """

    def __init__(
        self,
        total: int | None,
        description: str,
        *,
        show: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._view: _LogLines | _RichBar | None = None
        if not (show and enabled()):
            return
        stream = sys.stderr if stream is None else stream
        if _is_terminal(stream):
            self._view = _RichBar(total, description, stream)
        else:
            self._view = _LogLines(total, description, stream, clock)

    def update(self, n: int = 1) -> None:
        if self._view is not None:
            self._view.update(n)

    def set(self, **fields: object) -> None:
        """Show live numbers next to the progress, e.g. ``set(loss=1.23, tok_s=850)``."""
        if self._view is not None:
            self._view.set(fields)

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def stage(
    description: str,
    *,
    show: bool = True,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """Progress for one step without a count (loading, saving): a spinner on a terminal, else
    ``[rankwise] <description> ...`` before and ``[rankwise] <description> done in 0:00:12``
    after (``failed after`` when the step raises)."""
    if not (show and enabled()):
        yield
        return
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        from rich.console import Console

        with Console(file=stream).status(description):
            yield
        return
    start = clock()
    stream.write(f"{PREFIX} {description} ...\n")
    stream.flush()
    outcome = "failed after"
    try:
        yield
        outcome = "done in"
    finally:
        stream.write(f"{PREFIX} {description} {outcome} {_clock_text(clock() - start)}\n")
        stream.flush()


def bar(total: int | None, description: str, *, show: bool = True) -> Bar:
    return Bar(total, description, show=show)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with progress."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Bar(total, description) as b:
        for item in items:
            yield item
            b.update(1)
