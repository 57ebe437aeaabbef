"""The OpenAI HTTP protocol, as far as ``rankwise serve`` speaks it: request bodies (pydantic
models, checked before anything runs), response bodies and the error body.

Shapes follow OpenAI's ``/v1/completions`` and ``/v1/chat/completions``; fields the server
cannot honour (``n > 1``, ``logprobs``, ``echo``, penalties, ``logit_bias``, tools) are
refused with a 400 that names them instead of being silently ignored. Unknown extra fields
(``user``, ...) are accepted and ignored, as OpenAI clients send them freely.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`


class ProtocolError(ValueError):
    """A request the server understands but cannot serve; a 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
        if "" in ([v] if isinstance(v, str) else v or []):
            raise ValueError("a stop string must not be empty")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse what the engine does not do, naming the field (never ignore it silently)."""
        if self.n != 1:
            raise ProtocolError("n > 1 is not supported; send one request per completion", "n")
        if self.logprobs not in (None, False, 0):
            raise ProtocolError("logprobs are not supported by rankwise serve", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ProtocolError(f"{name} is not supported; leave it at 0", name)
        if self.logit_bias:
            raise ProtocolError("logit_bias is not supported", "logit_bias")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, token ids, or a list of either."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts to complete, one choice each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ProtocolError("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ProtocolError("echo is not supported by rankwise serve", "echo")
        if self.suffix:
            raise ProtocolError("suffix (insertion) is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise ProtocolError("best_of > 1 is not supported", "best_of")
        if self.stream and len(self.prompts()) > 1:
            raise ProtocolError("stream with several prompts is not supported; send one request per prompt", "prompt")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def token_limit(self, default: int) -> int:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``, else ``default``."""
        return self.max_completion_tokens or self.max_tokens or default

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ProtocolError("tools (function calling) are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ProtocolError("only response_format {'type': 'text'} is supported", "response_format")


class AdapterLoadRequest(BaseModel):
    """``POST /v1/adapters``: the name of a folder inside the server's adapters folder."""

    name: str = Field(min_length=1, max_length=255)


# ----------------------------------------------------------------------------- chat prompt


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt text for ``messages``: the tokenizer's chat template when it has one (the
    instruct models), else plain ``role: content`` lines ending with ``assistant:``."""
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    lines = [f"{m['role']}: {m['content']}" for m in plain]
    return "\n".join([*lines, "assistant:"])


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def envelope(kind: str, id_: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
    """A response or stream chunk: ``kind`` is the OpenAI ``object`` field."""
    body = {"id": id_, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_card(entry: dict, base_name: str) -> dict:
    """One ``/v1/models`` entry: OpenAI's fields plus what the engine says about it."""
    card = {"id": entry["id"], "object": "model", "created": 0, "owned_by": "rankwise"}
    card["parent"] = None if entry.get("kind") == "base" else base_name
    card.update({k: v for k, v in entry.items() if k != "id"})
    return card


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
