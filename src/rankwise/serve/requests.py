"""What a caller hands the engine and gets back: requests, streamed events, results, errors.

A :class:`RequestHandle` is filled by the engine's decode thread and read by the caller,
synchronously (:meth:`RequestHandle.events`, :meth:`RequestHandle.result`) or from an
asyncio event loop (:meth:`RequestHandle.aevents`, no polling: the engine thread wakes the
loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from rankwise.errors import ModelError, RankwiseError

FINISH_REASONS = ("stop", "length", "cancelled")


class UnknownAdapterError(ModelError):
    """A request or call named an adapter that is neither loaded nor in the adapters folder."""

    def __init__(self, message: str, known: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.known = list(known)


class QueueFullError(RankwiseError):
    """The engine's queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = float(retry_after)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: ``model`` is an adapter name or the engine's base name.

    ``prompt`` is text (tokenized by the engine's tokenizer) or token ids. ``temperature``
    0 is greedy; otherwise sampling with nucleus ``top_p`` from a generator seeded with
    ``seed`` (same seed, same request: same tokens). Generation ends at ``max_tokens``
    ("length"), at an end-of-sequence token or one of the ``stop`` strings ("stop"; the stop
    string is not part of the text), or on cancel ("cancelled").
    """

    model: str
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass(frozen=True)
class TokenEvent:
    """New text and the token ids generated since the last event; the last event has a
    ``finish_reason`` ("stop", "length" or "cancelled")."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True)
class Completion:
    """The whole result of a request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class RequestHandle:
    """A submitted request: stream its events, wait for its result, or cancel it."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int]) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self._events: list[TokenEvent] = []
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.cancelled = False
        self.completion_tokens = 0

    @property
    def done(self) -> bool:
        """True once the final event (or an error) has been delivered."""
        return self._error is not None or bool(self._events and self._events[-1].finish_reason)

    def cancel(self) -> None:
        """Ask the engine to stop this request; its last event gets finish_reason "cancelled"."""
        self.cancelled = True

    # -- filled by the engine thread
    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            if self.done:
                return
            self._events.append(event)
            self.completion_tokens += len(event.token_ids)
            self._cond.notify_all()
            listeners = list(self._listeners)
        for loop, queue in listeners:
            _call_soon(loop, queue, event)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self.done:
                return
            self._error = error
            self._cond.notify_all()
            listeners = list(self._listeners)
        for loop, queue in listeners:
            _call_soon(loop, queue, error)

    # -- read by the caller
    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The events in order, blocking until each arrives (TimeoutError after ``timeout``)."""
        i = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(
                    lambda i=i: len(self._events) > i or self._error is not None, timeout
                ):
                    raise TimeoutError(f"no event within {timeout} s")
                if len(self._events) <= i:
                    raise self._error
                event = self._events[i]
            i += 1
            yield event
            if event.finish_reason is not None:
                return

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """The events in order, for asyncio code (FastAPI streaming). Leaving the loop early
        (a client went away) cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            for event in self._events:
                queue.put_nowait(event)
            if self._error is not None:
                queue.put_nowait(self._error)
            self._listeners.append((loop, queue))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            with self._cond:
                self._listeners = [(lp, q) for lp, q in self._listeners if q is not queue]
            if not finished:
                self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to finish and return the whole :class:`Completion`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"the request did not finish within {timeout} s")
            if self._error is not None:
                raise self._error
            events = list(self._events)
        return Completion(
            text="".join(e.text for e in events),
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=sum(len(e.token_ids) for e in events),
            finish_reason=events[-1].finish_reason,
        )


def _call_soon(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


__all__ = [
    "GenerationRequest",
    "TokenEvent",
    "Completion",
    "RequestHandle",
    "UnknownAdapterError",
    "QueueFullError",
]
