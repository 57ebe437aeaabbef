"""Choosing each row's next token, and turning tokens into streamed text with stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def next_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` ``(rows, vocab)``: argmax where the temperature is 0,
    else a draw from the nucleus (``top_p``) of ``softmax(logits / temperature)`` using the
    row's own generator (so a seeded request draws the same tokens in any batch)."""
    # max(dim).indices is argmax (the first maximal index) at about half its time on CPU
    chosen = logits.float().max(dim=-1).indices.tolist()
    for i, t in enumerate(temperatures):
        if t > 0:
            chosen[i] = _sample(logits[i].float(), t, top_ps[i], generators[i])
    return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


class TextStream:
    """Incremental detokenization with stop strings.

    :meth:`add` takes one token and returns the text that is now safe to show: text that
    may still become the start of a stop string, or an incomplete UTF-8 character, is held
    back until it is decided. When a stop string appears, the text is cut before it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already returned
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self._text()
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text[: min(hits)])
        end = len(text) - (1 if text.endswith("\ufffd") else 0)
        hold = 0
        for s in self.stop:  # hold back a suffix that could still grow into a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k : end] == s[:k]:
                    hold = max(hold, k)
                    break
        return self._emit(text[: end - hold])

    def flush(self) -> str:
        """Everything not yet returned (at the end of generation)."""
        return self._emit(self._text())

    def _emit(self, text: str) -> str:
        if len(text) <= self.sent:
            return ""
        out = text[self.sent :]
        self.sent = len(text)
        return out


__all__ = ["next_tokens", "TextStream"]
