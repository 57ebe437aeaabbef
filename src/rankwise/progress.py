"""Progress bars for long work, drawn with rich on stderr.

Bars are shown only on an interactive terminal unless forced (``RANKWISE_PROGRESS=1``),
and never with ``RANKWISE_PROGRESS=0``, so logs and CI output stay clean.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("RANKWISE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return sys.stderr.isatty()


class Bar:
    """A single progress bar: ``update(n)``, ``set(**fields)`` for live numbers, ``close()``."""

    def __init__(self, total: int | None, description: str, *, show: bool = True) -> None:
        self._progress = None
        if not (show and enabled()):
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, info="")

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def set(self, **fields: object) -> None:
        """Show live numbers next to the bar, e.g. ``set(loss=1.23, tok_s=850)``."""
        if self._progress is not None:
            info = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
            )
            self._progress.update(self._task, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(total: int | None, description: str, *, show: bool = True) -> Bar:
    return Bar(total, description, show=show)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Bar(total, description) as b:
        for item in items:
            yield item
            b.update(1)
