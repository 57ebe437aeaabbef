"""The serving engine: one base model, many adapters, one continuously batched decode loop.

A background thread runs the loop. Each iteration (a "step") it

1. drops cancelled requests,
2. admits waiting requests while the batch has room and the memory budget allows their
   KV cache (evicting idle adapters, see :mod:`rankwise.serve.pool`),
3. runs one decode forward for the running rows (one new token each), and prefill
   forwards for the admitted ones (grouped by prompt length, :func:`length_buckets`), which
   then join the batch, sorted by rank so each rank's rows are one slice ("continuous batching",
   "Orca: A Distributed Serving System for Transformer-Based Generative Models", 2022),
4. streams each row's new text and removes the rows that finished.

Rows of one forward use different adapters: :func:`rankwise.adapters.inject.route` gives
every adapted layer one adapter per row (LoRA rows as batched matmuls per rank, other
methods exactly through their own forward). The base model is the adapter named
``engine.base_name``.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.inject import RowRouting, route
from rankwise.errors import ConfigError, RankwiseError
from rankwise.serve.cache import BatchCache, new_cache
from rankwise.serve.pool import AdapterPool
from rankwise.serve.requests import (
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)
from rankwise.serve.sampling import TextStream, next_tokens

RATE_WINDOW = 10.0  # seconds over which tokens_per_s is measured
FORWARD_COST = 32  # the fixed cost of one more prefill forward, in padded prompt tokens


@dataclass
class _Row:
    """A request while it runs (or waits) inside the engine."""

    handle: RequestHandle
    adapter: str | None  # the adapter's public name; None: the base model
    internal: str | None  # its attach name in the model
    stream: TextStream
    generator: torch.Generator | None
    kv_bytes: int
    order: tuple[int, int] = (-1, 0)  # sort key in the batch: (rank, load order); base rows first
    last: int = -1
    generated: int = 0
    reserved: bool = False  # holds a KV-cache reservation in the pool
    released: bool = False  # reservation and adapter pin given back


def _kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of K and V per token across all layers, from the model config."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", 1)
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * element


def contiguous_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    """A forward pre-hook giving ``module`` a contiguous first input.

    torch 2.13 on CPU runs a bfloat16 linear layer whose weight is frozen on a non-contiguous
    3-D input (the last position of each row, which transformers passes to the LM head) as a
    batched matmul over one copy of the weight per row: 44 s instead of 0.06 s for
    SmolLM2's head at 64 rows. Copying the (rows, 1, hidden) input avoids that path.
    """
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def gemm_friendly_layout(model: nn.Module) -> int:
    """Store every float32 CPU ``nn.Linear`` weight of ``model`` transposed in memory: the
    same ``(out, in)`` tensor with the same values, whose ``.T`` is contiguous. ``F.linear``
    then multiplies ``x @ Wᵀ`` without a transposed operand, which MKL's float32 GEMM runs
    10-55% faster on this CPU (SmolLM2's shapes at 1-640 rows; a whole 64-row decode step of
    the engine about 13% faster). bfloat16 (oneDNN) is slower that way, so only float32 is
    changed. Tied weights (an LM head sharing the embedding) are changed once; the
    parameters stay the same objects. Returns how many weights were changed.

    The model's weights are then not contiguous: ``state_dict()`` still works, but a file
    writer that needs contiguous tensors (safetensors) must call ``.contiguous()`` first.
    """
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if type(module) is not nn.Linear or not isinstance(weight, torch.Tensor):
                continue
            # a weight already changed (a tied one seen again) is no longer contiguous
            if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
                continue
            weight.data = weight.data.t().contiguous().t()
            changed += 1
    return changed


def length_buckets(lengths: list[int], forward_cost: int = FORWARD_COST) -> list[list[int]]:
    """Split prompts (by index) into prefill groups: each group is padded to its longest
    prompt, so one group wastes compute on padding and many groups pay ``forward_cost``
    padded tokens each. Returns the split minimising ``Σ (rows × longest + forward_cost)``
    (exact, over the prompts sorted by length)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0] + [None] * len(order)  # best[j]: cost of the first j sorted prompts
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + forward_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    found: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found


class Engine:
    """Serve ``model`` (a name or folder ``rankwise.load_model`` knows, or a ``(module,
    tokenizer)`` pair) with the adapters in ``adapters_dir``.

    ``memory_budget_bytes`` bounds resident adapter weights plus the KV cache (not the base
    model; None: unbounded). Limits: ``max_batch_size`` rows per forward, ``max_queue``
    waiting requests (then :class:`QueueFullError`), ``max_prompt_tokens`` and
    ``max_new_tokens`` per request (then ConfigError). ``dtype`` converts the base model
    (``torch.bfloat16`` runs several times faster on CPUs with AMX or AVX-512 BF16; adapters
    stay float32). Call :meth:`start` to run the decode thread and :meth:`stop` to end it.
    """

    def __init__(
        self,
        model: str | os.PathLike | tuple = "smollm2",
        adapters_dir: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int = 64,
        max_queue: int = 256,
        memory_budget_bytes: int | None = None,
        max_prompt_tokens: int = 2048,
        max_new_tokens: int = 1024,
        base_name: str | None = None,
    ) -> None:
        for option, value in (
            ("max_batch_size", max_batch_size),
            ("max_queue", max_queue),
            ("max_prompt_tokens", max_prompt_tokens),
            ("max_new_tokens", max_new_tokens),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{option} must be a positive integer, got {value!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
        if isinstance(model, tuple):
            if len(model) != 2 or not isinstance(model[0], nn.Module):
                raise ConfigError("model must be a name, a folder, or a (torch module, tokenizer) pair")
            module, tokenizer = model
            module = module.to(device=device, dtype=dtype)
            default_name = "base"
        else:
            import rankwise

            module, tokenizer = rankwise.load_model(model, device=device, dtype=dtype)
            default_name = str(model)
        self.model = module.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        gemm_friendly_layout(self.model)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.base_name = base_name or default_name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self._model_lock = threading.RLock()
        self.pool = AdapterPool(
            self.model,
            adapters_dir,
            model_lock=self._model_lock,
            budget=memory_budget_bytes,
            reserved_name=self.base_name,
        )
        self._kv_per_token = _kv_bytes_per_token(self.model)
        self._eos = _eos_ids(self.model, tokenizer)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._head = self.model.get_output_embeddings()
        self._vocab = self._head.weight.shape[0]
        from rankwise.models import context_length

        self._context = context_length(self.model)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        self._num_layers = self.model.config.get_text_config().num_hidden_layers
        # scheduler state
        self._cv = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._admitted: list[_Row] = []  # taken from the queue, not yet prefilled
        self._batch: BatchCache | None = None
        self._ordered = True  # the running rows are sorted by _Row.order
        self._routing: tuple[tuple, RowRouting] | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._halt = False
        # metrics
        self.generated_tokens_total = 0
        self._rate: deque[tuple[float, int]] = deque()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        """Start the decode thread (a no-op if it runs)."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._closing = self._halt = False
            self._thread = threading.Thread(target=self._loop, name="rankwise-serve", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting requests; with ``drain``, let queued and running ones finish (up to
        ``timeout`` seconds); cancel whatever is left; end the thread. Idempotent."""
        with self._cv:
            self._closing = True
            if not drain:
                self._halt = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and drain:
            deadline = time.monotonic() + timeout
            with self._cv:
                self._cv.wait_for(
                    lambda: not (self._waiting or self._admitted or self._running),
                    max(0.0, deadline - time.monotonic()),
                )
        with self._cv:
            self._halt = True
            self._cv.notify_all()
        if thread is not None:
            thread.join(timeout=max(timeout, 1.0))
        self._thread = None
        with self._cv:
            leftovers = list(self._waiting) + self._admitted + self._running
            self._waiting.clear()
            self._running, self._admitted = [], []
            self._batch = None
        for row in leftovers:
            self._finish(row, TokenEvent(row.stream.flush(), [], "cancelled"))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- adapters
    def models(self) -> list[dict]:
        """The base model and every known adapter: ``{"id", "kind", "resident", "method", "rank"}``."""
        out = [{"id": self.base_name, "kind": "base", "resident": True, "method": None, "rank": None}]
        resident = set(self.pool.resident)
        for name in self.pool.known():
            try:
                info = self.pool.info(name)
            except RankwiseError:
                info = {"method": None, "rank": None}
            out.append({"id": name, "kind": "adapter", "resident": name in resident, **info})
        return out

    def load_adapter(self, name: str) -> dict:
        """Load adapter ``name`` (a folder inside ``adapters_dir``) now; returns its models() entry."""
        if name == self.base_name:
            return self.models()[0]
        return self.pool.load(name)

    def unload_adapter(self, name: str) -> None:
        """Detach adapter ``name``; ConfigError while requests use it."""
        if name == self.base_name:
            raise ConfigError(f"{name!r} is the base model; it cannot be unloaded")
        self.pool.unload(name)

    # ----------------------------------------------------------------- requests
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self._vocab]
            if bad:
                raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self._vocab - 1})")
        else:
            raise ConfigError("prompt must be a string or a list of token ids")
        if not ids:
            raise ConfigError("prompt is empty; give at least one token")
        if len(ids) > self.max_prompt_tokens:
            raise ConfigError(
                f"prompt has {len(ids)} tokens; the limit is max_prompt_tokens={self.max_prompt_tokens}"
            )
        if self._context is not None and len(ids) + request.max_tokens > self._context:
            raise ConfigError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"model's context of {self._context} tokens; shorten the prompt or lower max_tokens"
            )
        return ids

    def _check(self, request: GenerationRequest) -> None:
        if not isinstance(request, GenerationRequest):
            raise ConfigError(f"submit takes a GenerationRequest, got {type(request).__name__}")
        r = request
        if not isinstance(r.max_tokens, int) or isinstance(r.max_tokens, bool) or r.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {r.max_tokens!r}")
        if r.max_tokens > self.max_new_tokens:
            raise ConfigError(f"max_tokens={r.max_tokens} exceeds the limit max_new_tokens={self.max_new_tokens}")
        if not isinstance(r.temperature, (int, float)) or not math.isfinite(r.temperature) or r.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {r.temperature!r}")
        if not isinstance(r.top_p, (int, float)) or not 0 < r.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {r.top_p!r}")
        if r.seed is not None and (not isinstance(r.seed, int) or isinstance(r.seed, bool)):
            raise ConfigError(f"seed must be an integer or None, got {r.seed!r}")
        if isinstance(r.stop, str) or not all(isinstance(s, str) for s in r.stop):
            raise ConfigError("stop must be a list of strings")
        if not isinstance(r.model, str):
            raise ConfigError(f"model must be an adapter name or {self.base_name!r}, got {r.model!r}")

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; returns its :class:`RequestHandle` at once.

        Raises ConfigError (a bad value, a prompt too long), UnknownAdapterError (an adapter
        neither loaded nor in the adapters folder; ``.known`` lists them), QueueFullError
        (``.retry_after`` seconds) when the queue is full or the engine is stopping, and
        CheckpointError when the adapter's files are damaged. A non-resident adapter is
        loaded here (the caller waits for it, not the running batch).
        """
        self._check(request)
        ids = self._prompt_ids(request)
        adapter = None if request.model == self.base_name else request.model
        if adapter is not None:
            self.pool.folder(adapter)  # unknown / unsafe names fail before anything else
        kv = (len(ids) + request.max_tokens) * self._kv_per_token
        if self.pool.budget is not None and kv > self.pool.budget:
            raise ConfigError(
                f"the request needs {kv:,} bytes of KV cache but memory_budget_bytes is "
                f"{self.pool.budget:,}; shorten the prompt or max_tokens"
            )
        self._check_room()
        internal = self.pool.pin(adapter) if adapter is not None else None
        handle = RequestHandle(request, ids)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device="cpu")
            seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator.manual_seed(seed)
        row = _Row(handle, adapter, internal, TextStream(self.tokenizer, request.stop), generator, kv)
        if adapter is not None:
            row.order = self.pool.order_key(adapter)
        try:
            with self._cv:
                self._check_room()
                self._waiting.append(row)
                self._cv.notify_all()
        except QueueFullError:
            if adapter is not None:
                self.pool.unpin(adapter)
            raise
        return handle

    def _check_room(self) -> None:
        if self._closing:
            raise QueueFullError("the engine is shutting down", retry_after=5.0)
        if len(self._waiting) >= self.max_queue:
            rate = self._tokens_per_s() or 1.0
            waiting = sum(r.handle.request.max_tokens for r in self._waiting)
            retry = max(1.0, min(60.0, waiting / rate))
            raise QueueFullError(
                f"the queue is full ({self.max_queue} waiting requests); retry in {retry:.0f} s",
                retry_after=retry,
            )

    # ----------------------------------------------------------------- metrics
    def _tokens_per_s(self) -> float:
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - RATE_WINDOW:
            self._rate.popleft()
        if not self._rate:
            return 0.0
        span = max(now - self._rate[0][0], 1.0)
        return sum(n for _, n in self._rate) / span

    def metrics(self) -> dict:
        """Queue length, running rows, tokens generated (total and per second over the last
        10 s), resident adapters, evictions and adapter loads."""
        return {
            "queue_length": len(self._waiting),
            "running": len(self._running),
            "generated_tokens_total": self.generated_tokens_total,
            "tokens_per_s": self._tokens_per_s(),
            "resident_adapters": len(self.pool.resident),
            "evictions": self.pool.evictions,
            "adapter_loads": self.pool.loads,
        }

    # ----------------------------------------------------------------- the decode loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._halt or self._waiting or self._running)
                if self._halt:
                    return
            try:
                self._step()
            except Exception as error:  # a failed forward fails its requests, not the engine
                self._fail_all(error)

    def _fail_all(self, error: Exception) -> None:
        with self._cv:
            rows = list({id(r): r for r in self._running + self._admitted}.values())
            self._running, self._admitted = [], []
            self._batch = self._routing = None
        for row in rows:
            self._release(row)
            row.handle._fail(error)

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()
        if self._admitted:
            rows = list(self._admitted)
            for group in length_buckets([len(r.handle.prompt_ids) for r in rows]):
                self._prefill([rows[i] for i in group])
        with self._cv:
            self._cv.notify_all()

    def _drop_cancelled(self) -> None:
        with self._cv:
            waiting = [r for r in self._waiting if r.handle.cancelled]
            for r in waiting:
                self._waiting.remove(r)
        for r in waiting:
            self._finish(r, TokenEvent("", [], "cancelled"))
        gone = [i for i, r in enumerate(self._running) if r.handle.cancelled]
        if gone:
            for i in gone:
                row = self._running[i]
                self._finish(row, TokenEvent(row.stream.flush(), [], "cancelled"))
            self._keep([i for i in range(len(self._running)) if i not in set(gone)])

    def _admit(self) -> None:
        """Move waiting requests to ``_admitted`` while the batch and the memory budget allow."""
        new = self._admitted
        while len(self._running) + len(new) < self.max_batch_size:
            with self._cv:
                if not self._waiting:
                    break
                row = self._waiting[0]
            if not self.pool.reserve_kv(row.kv_bytes):
                if self._running or new:
                    break  # wait for running requests to free memory
                with self._cv:
                    self._waiting.popleft()
                self._release(row)
                row.handle._fail(
                    QueueFullError("no memory for the KV cache: the budget is held by adapters in use")
                )
                continue
            row.reserved = True
            with self._cv:
                self._waiting.popleft()
                new.append(row)

    def _routing_for(self, rows: list[_Row]) -> RowRouting:
        key = (tuple(r.internal for r in rows), self.pool.version)
        if self._routing is None or self._routing[0] != key:
            self._routing = (key, RowRouting([r.internal for r in rows], frozen=True))
        return self._routing[1]

    def _forward(self, ids, mask, positions, batch: BatchCache, routing: RowRouting) -> torch.Tensor:
        kwargs = {self._cache_kw: batch.cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        with self._model_lock, torch.inference_mode(), route(self.model, routing):
            hook = self._head.register_forward_pre_hook(contiguous_input_hook)
            try:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
            finally:
                hook.remove()
        return out.logits[:, -1]

    def _sort_rows(self) -> None:
        """Order the running rows (and their cache rows) by rank, then adapter, so that each
        rank's rows are one slice of the batch: the adapter layers then read and write them
        in place instead of gathering and scattering rows (one cache copy per join)."""
        order = sorted(range(len(self._running)), key=lambda i: self._running[i].order)
        self._ordered = True
        if order == list(range(len(order))):
            return
        with self._cv:
            self._running = [self._running[i] for i in order]
        self._batch.select(torch.tensor(order, device=self.device))

    def _decode(self) -> None:
        if not self._ordered:
            self._sort_rows()
        batch = self._batch
        ids = torch.tensor([[r.last] for r in self._running], device=self.device)
        positions = batch.positions()
        mask = batch.step_mask(1)
        logits = self._forward(ids, mask, positions, batch, self._routing_for(self._running))
        self._emit(self._running, logits)

    def _prefill(self, rows: list[_Row]) -> None:
        """One forward over ``rows``' prompts (left-padded); they then join the running batch."""
        rows.sort(key=lambda r: r.order)
        length = max(len(r.handle.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.handle.prompt_ids
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        batch = BatchCache(new_cache(self._num_layers), mask)
        logits = self._forward(ids, mask, positions, batch, RowRouting([r.internal for r in rows], frozen=True))
        with self._cv:  # the admitted rows join the running batch
            if self._batch is None or not self._running:
                self._batch = batch
                self._running = list(rows)
            else:
                self._batch.merge(batch)
                self._running = self._running + list(rows)
            joined = {id(r) for r in rows}
            self._admitted = [r for r in self._admitted if id(r) not in joined]
            self._ordered = False
        self._emit(rows, logits, offset=len(self._running) - len(rows))

    def _emit(self, rows: list[_Row], logits: torch.Tensor, offset: int = 0) -> None:
        """Pick each row's next token, stream it, and drop the rows that finished."""
        tokens = next_tokens(
            logits,
            [r.handle.request.temperature for r in rows],
            [r.handle.request.top_p for r in rows],
            [r.generator for r in rows],
        )
        done = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.last = token
            row.generated += 1
            reason = None
            if token in self._eos:
                text, reason = row.stream.flush(), "stop"
            else:
                text = row.stream.add(token)
                if row.stream.stopped:
                    reason = "stop"
                elif row.generated >= row.handle.request.max_tokens:
                    text, reason = text + row.stream.flush(), "length"
            event = TokenEvent(text, [token], reason)
            if reason is None:
                row.handle._push(event)
            else:
                self._finish(row, event)
                done.append(offset + i)
        self._count(len(rows))
        if done:
            gone = set(done)
            self._keep([i for i in range(len(self._running)) if i not in gone])

    def _keep(self, keep: list[int]) -> None:
        """Keep only these running rows (and their cache rows)."""
        with self._cv:
            self._running = [self._running[i] for i in keep]
        if not keep:
            self._batch = None
            self._routing = None  # frees the gathered adapter factors
        else:
            self._batch.select(torch.tensor(keep, device=self.device))

    def _count(self, n: int) -> None:
        self.generated_tokens_total += n
        self._rate.append((time.monotonic(), n))

    def _release(self, row: _Row) -> None:
        """Give back the row's KV reservation and adapter pin (once)."""
        if row.released:
            return
        row.released = True
        if row.reserved:
            self.pool.release_kv(row.kv_bytes)
        if row.adapter is not None:
            self.pool.unpin(row.adapter)

    def _finish(self, row: _Row, event: TokenEvent) -> None:
        self._release(row)
        row.handle._push(event)


__all__ = ["Engine"]
