"""Putting adapters into a model and managing them: attach, activate, disable, merge, delete.

``attach`` replaces each target module with an :class:`AdaptedLayer` that holds the
original module (``.base_layer``) and a ``ModuleDict`` of adapters keyed by name, so one
layer can carry several adapters and any subset can be active::

    y = base_layer(x) + Σ_{a active} Δ_a(dropout_a(x))

Every adapter's ``Δ`` is relative to the base layer alone (adapters never see each
other's output), so merging is the sum of the dense deltas and the order of adapters does
not matter. Everything is validated before the model is touched: a failed call leaves the
model exactly as it was.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapters.base import (
    Adapter,
    AdapterConfig,
    LayerView,
    get_initialiser,
    get_method,
    view_for,
)
from rankwise.errors import ConfigError, ModelError
from rankwise.modules import replace_module

Targets = str | re.Pattern | Sequence[str | re.Pattern]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class AdaptedLayer(nn.Module):
    """A frozen module plus named adapters. ``forward`` = base output + active adapters."""

    def __init__(self, base_layer: nn.Module, view: LayerView) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "view", view)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.routing: RowRouting | None = None  # set by ``route``: one adapter per batch row
        self.slots: _LayerSlots | None = None  # the adapters' factors, laid out for ``route``

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing is None and not (self.merged or self.disabled) and self.active and not (args or kwargs):
            fused = self._fused_forward(x)
            if fused is not None:
                return fused
        y = self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return _routed(self, y, x)
        if self.merged or self.disabled or not self.active:
            return y
        shared: dict[torch.dtype, torch.Tensor] = {}

        def base_from_output(dtype: torch.dtype) -> torch.Tensor:
            # W x without bias, recovered from the base output (computed at most once per dtype)
            if dtype not in shared:
                bias = self.view.bias
                out = y if bias is None else y - bias.view(self.view.channel_shape(y))
                shared[dtype] = out.to(dtype)
            return shared[dtype]

        out = y
        for name in self.active:
            adapter = self.adapters[name]
            xa = x.to(adapter.dtype) if x.is_floating_point() else x
            if (
                adapter.training
                and isinstance(adapter.dropout, nn.Dropout)
                and x.is_floating_point()
            ):
                xa = adapter.dropout(xa)
                out = adapter.compose(out, xa, lambda xa=xa: self.view.base_without_bias(xa))
            else:
                out = adapter.compose(out, xa, lambda a=adapter: base_from_output(a.dtype))
        return out

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``F.linear(x, W + ΣΔW, b)`` when every active adapter offers a dense ``ΔW``
        (:meth:`~rankwise.adapters.Adapter.dense_delta`) on a plain ``nn.Linear``; else None."""
        base = self.base_layer
        if type(base) is not nn.Linear or not x.is_floating_point():
            return None
        total: torch.Tensor | None = None
        for name in self.active:
            adapter = self.adapters[name]
            if adapter.training and isinstance(adapter.dropout, nn.Dropout):
                return None  # dropout acts on the adapter's input only: no shared product
            dw = adapter.dense_delta(x)
            if dw is None:
                return None
            total = dw if total is None else total + dw
        return F.linear(x, base.weight + total.to(base.weight.dtype), base.bias)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


# ----------------------------------------------------------------------------- per-row routing


class RowRouting:
    """Which adapter each row of a batch uses: ``rows[i]`` is an adapter name or None (base).

    Used by :func:`route`: every :class:`AdaptedLayer` then adds, to each row of its output,
    that row's adapter only (the layer's ``active`` list is ignored). Build one per batch
    composition and reuse it across decode steps: it keeps each layer's plan (the rows of
    each adapter, the slots of their factors) from first use, so an unchanged batch plans
    nothing again. Rebuild it after adapters are attached or deleted or their weights change.

    A new routing re-reads each adapter's factors to check they did not change (a few µs per
    adapter and layer); ``frozen=True`` skips that for adapters already in a slot, for a
    server whose adapters never change while loaded (a reload is another adapter object and
    is always re-read).
    """

    def __init__(self, rows: Sequence[str | None], *, frozen: bool = False) -> None:
        self.rows = list(rows)
        self.frozen = frozen
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.rows):
            if name is not None:
                groups.setdefault(name, []).append(i)
        self.groups = groups
        self._index: dict[str, torch.Tensor] = {}
        self._lines: dict[tuple, _Lines] = {}  # row grids, shared by layers that group alike
        self.plans: dict[AdaptedLayer, _LayerPlan] = {}
        self.checked: nn.Module | None = None  # the model whose adapter names were checked
        self.layers: list[AdaptedLayer] = []  # that model's adapted layers

    def __len__(self) -> int:
        return len(self.rows)

    def index(self, name: str, device: torch.device) -> torch.Tensor:
        """The rows that use adapter ``name``, as a long tensor on ``device``."""
        t = self._index.get(name)
        if t is None or t.device != device:
            t = torch.tensor(self.groups[name], dtype=torch.long, device=device)
            self._index[name] = t
        return t


class _SlotPool:
    """One layer's low-rank factors of one shape and dtype, one adapter per slot, in two
    preallocated tensors laid out as the batched matmuls read them: ``a[slot] = Aᵀ``
    ``(in, r)`` and ``b[slot] = (s·B)ᵀ`` ``(r, out)`` (S-LoRA's unified adapter pool, "S-LoRA:
    Serving Thousands of Concurrent LoRA Adapters", 2023). A batch whose adapters sit in nearby
    slots reads a view of the pool, so a new batch composition copies no factors. Capacity
    doubles when full; freed slots are reused, lowest first."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a = a.new_empty((0, a.shape[1], a.shape[0]))
        self.b = b.new_empty((0, b.shape[1], b.shape[0]))
        self.owners: list[str | None] = []

    def take(self, name: str) -> int:
        """A free slot for ``name`` (growing the pool when none is free)."""
        if None not in self.owners:
            used = len(self.owners)
            cap = max(4, 2 * used)
            a = self.a.new_empty((cap, *self.a.shape[1:]))
            b = self.b.new_empty((cap, *self.b.shape[1:]))
            a[:used], b[:used] = self.a, self.b
            self.a, self.b = a, b  # views of the old tensors (in older plans) stay valid
            self.owners += [None] * (cap - used)
        slot = self.owners.index(None)
        self.owners[slot] = name
        return slot

    @torch.no_grad()
    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.a[slot].copy_(a.detach().T)
        self.b[slot].copy_(b.detach().T).mul_(scale)


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters and buffers, its submodules' included (without the
    bookkeeping of ``parameters()``, which is ten times slower: this runs per adapter and
    layer whenever a batch changes)."""
    found = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None:
            found += _own_tensors(child)
    return found


def _state(adapter: Adapter, a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple:
    """What a slot's copy depends on: the factors' shapes and scale, the adapter's tensors
    (an in-place change bumps ``_version``, a replaced tensor has another address)."""
    return (a.shape, b.shape, float(scale), tuple((t.data_ptr(), t._version) for t in _own_tensors(adapter)))


class _LayerSlots:
    """Where each adapter of one layer sits in that layer's slot pools."""

    def __init__(self) -> None:
        self.pools: dict[tuple, _SlotPool] = {}
        self.where: dict[str, tuple[_SlotPool, int, Adapter, tuple]] = {}
        self.generation = 0  # bumped when a slot is freed: plans that read it are rebuilt

    def place(
        self, name: str, adapter: Adapter, factors: tuple[torch.Tensor, torch.Tensor, float]
    ) -> tuple[_SlotPool, int]:
        """The pool and slot holding ``adapter``'s current factors (copied in if needed)."""
        a, b, scale = factors
        state = _state(adapter, a, b, scale)
        entry = self.where.get(name)
        if entry is not None:
            if entry[2] is adapter and entry[3] == state:
                return entry[0], entry[1]
            self.free(name)
        key = (tuple(a.shape), tuple(b.shape), a.dtype, a.device)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _SlotPool(a, b)
        slot = pool.take(name)
        pool.write(slot, a, b, scale)
        self.where[name] = (pool, slot, adapter, state)
        return pool, slot

    def free(self, name: str) -> None:
        entry = self.where.pop(name, None)
        if entry is not None:
            entry[0].owners[entry[1]] = None
            self.generation += 1

    def sweep(self, layer: AdaptedLayer) -> None:
        """Free the slots of adapters no longer attached to ``layer``."""
        for name, entry in list(self.where.items()):
            if layer.adapters._modules.get(name) is not entry[2]:
                self.free(name)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.pools.values() for t in (p.a, p.b))


@dataclass
class _Lines:
    """The batch rows of a group's ``k`` adapters, one line each, padded to ``m`` rows with a
    repeat of a real row (rows, never ranks, are padded): ``grid`` ``(k, m)``; ``keep`` the
    real entries of the flattened grid (None: no padding) and ``rows`` their batch rows;
    ``start`` when the grid is exactly the rows ``start, start+1, ...`` (a slice of the batch:
    no gather, no scatter)."""

    grid: torch.Tensor
    keep: torch.Tensor | None
    rows: torch.Tensor
    start: int | None


def _lines(routing: RowRouting, lists: tuple[tuple[int, ...] | None, ...], device) -> _Lines:
    """The :class:`_Lines` for these per-adapter row lists (None: an unused slot in a
    window of the pool), cached on ``routing`` for every layer that groups alike."""
    key = (lists, device)
    found = routing._lines.get(key)
    if found is not None:
        return found
    m = max(len(r) for r in lists if r)
    filler = next(r[0] for r in lists if r)
    grid = [list(r) + [r[0]] * (m - len(r)) if r else [filler] * m for r in lists]
    real = [j < len(r or ()) for r in lists for j in range(m)]
    flat = [i for line in grid for i in line]
    whole = all(real) and flat == list(range(flat[0], flat[0] + len(flat)))
    found = routing._lines[key] = _Lines(
        grid=torch.tensor(grid, dtype=torch.long, device=device),
        keep=None if all(real) else torch.tensor([i for i, ok in enumerate(real) if ok], device=device),
        rows=torch.tensor([i for i, ok in zip(flat, real, strict=True) if ok], device=device),
        start=flat[0] if whole else None,
    )
    return found


@dataclass
class _RankGroup:
    """Adapters of one factor shape in one layer: ``Δ = bmm(bmm(x_g, a), b)`` over ``k``
    adapters; ``a`` ``(k, in, r)`` and ``b`` ``(k, r, out)`` are a view of the slot pool (or,
    for scattered slots, a copy of the needed ones)."""

    a: torch.Tensor
    b: torch.Tensor
    lines: _Lines


@dataclass
class _LayerPlan:
    groups: list[_RankGroup]
    generic: list[tuple[Adapter, torch.Tensor]]  # (adapter, its rows): methods without factors
    generation: int  # of the layer's slots when planned


def _fast_factors(layer: AdaptedLayer, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The adapter's :meth:`~rankwise.adapters.Adapter.delta_factors` when this forward is
    exactly ``s · B (A x)`` on a linear input (no training-mode dropout), else None."""
    if layer.view.kind not in ("linear", "transposed_linear"):
        return None
    if adapter.training and isinstance(adapter.dropout, nn.Dropout):
        return None
    return adapter.delta_factors()


def _group(pool: _SlotPool, members: list[tuple[int, str]], routing: RowRouting, device) -> _RankGroup:
    """One group's factors and row grid; ``members`` are ``(slot, name)`` sorted by slot."""
    lo, hi = members[0][0], members[-1][0] + 1
    if hi - lo <= 2 * len(members):  # nearby slots: a view of the pool, nothing copied
        names = dict(members)
        lists = tuple(tuple(routing.groups[names[s]]) if s in names else None for s in range(lo, hi))
        return _RankGroup(pool.a[lo:hi], pool.b[lo:hi], _lines(routing, lists, device))
    idx = torch.tensor([s for s, _ in members], device=pool.a.device)
    lists = tuple(tuple(routing.groups[n]) for _, n in members)
    return _RankGroup(pool.a.index_select(0, idx), pool.b.index_select(0, idx), _lines(routing, lists, device))


def _plan(layer: AdaptedLayer, routing: RowRouting, device: torch.device) -> _LayerPlan:
    """Put the batch's adapters present in ``layer`` into slots and group them by shape."""
    if layer.slots is None:
        layer.slots = _LayerSlots()
    slots = layer.slots
    slots.sweep(layer)
    members: dict[int, tuple[_SlotPool, list[tuple[int, str]]]] = {}
    generic = []
    for name in routing.groups:
        adapter = layer.adapters._modules.get(name)
        if adapter is None:
            continue
        entry = slots.where.get(name) if routing.frozen else None
        if entry is not None and entry[2] is adapter:
            members.setdefault(id(entry[0]), (entry[0], []))[1].append((entry[1], name))
            continue
        factors = _fast_factors(layer, adapter)
        if factors is None:
            generic.append((adapter, routing.index(name, device)))
            continue
        pool, slot = slots.place(name, adapter, factors)
        members.setdefault(id(pool), (pool, []))[1].append((slot, name))
    groups = [_group(pool, sorted(found), routing, device) for pool, found in members.values()]
    return _LayerPlan(groups, generic, slots.generation)


def _add_rank_group(y: torch.Tensor, x: torch.Tensor, g: _RankGroup) -> None:
    """``y[rows] += s·B (A x[rows])`` for every row of the group, as two batched matmuls
    (``x`` already in the factors' dtype)."""
    lines = g.lines
    k, m = lines.grid.shape
    tail = x.shape[1:-1]  # tokens per row (empty for 2-D input)
    if lines.start is not None:
        xg = x[lines.start : lines.start + k * m]
    else:
        xg = x.index_select(0, lines.grid.view(-1))
    xg = xg.reshape(k, m * math.prod(tail), x.shape[-1])
    d = torch.bmm(torch.bmm(xg, g.a), g.b).reshape(k * m, *tail, g.b.shape[-1])
    if d.dtype != y.dtype:
        d = d.to(y.dtype)
    if lines.start is not None:
        y[lines.start : lines.start + k * m] += d
        return
    if lines.keep is not None:
        d = d.index_select(0, lines.keep)
    y.index_put_((lines.rows,), d, accumulate=True)  # several times faster than index_add_ on CPU


def _routed(layer: AdaptedLayer, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer output when each batch row uses its own adapter (see :class:`RowRouting`)."""
    routing = layer.routing
    if layer.merged:
        raise ModelError(f"adapters {layer.merged} are merged into this layer; unmerge before routing")
    if x.shape[0] != len(routing) or y.shape[0] != len(routing):
        raise ConfigError(
            f"the routing has {len(routing)} rows but the batch has {x.shape[0]}; "
            "build a RowRouting with one entry per batch row"
        )
    plan = routing.plans.get(layer)
    if plan is None or plan.generation != layer.slots.generation:
        plan = routing.plans[layer] = _plan(layer, routing, y.device)
    if not plan.groups and not plan.generic:
        return y
    bias = layer.view.bias
    for adapter, idx in plan.generic:  # exact, one adapter at a time (DoRA and the rest)
        xr = x.index_select(0, idx)
        xr = xr.to(adapter.dtype) if xr.is_floating_point() else xr
        yr = y.index_select(0, idx)

        def base(a=adapter, yr=yr):
            out = yr if bias is None else yr - bias.view(layer.view.channel_shape(yr))
            return out.to(a.dtype)

        if adapter.training and isinstance(adapter.dropout, nn.Dropout) and xr.is_floating_point():
            xr = adapter.dropout(xr)
            out = adapter.compose(yr, xr, lambda xr=xr: layer.view.base_without_bias(xr))
        else:
            out = adapter.compose(yr, xr, base)
        y.index_copy_(0, idx, out.to(y.dtype))
    inputs: dict[torch.dtype, torch.Tensor] = {}  # x in each factor dtype, converted once per layer
    for group in plan.groups:
        xd = inputs.get(group.a.dtype)
        if xd is None:
            xd = inputs[group.a.dtype] = x if x.dtype == group.a.dtype else x.to(group.a.dtype)
        _add_rank_group(y, xd, group)
    return y


@contextlib.contextmanager
def route(model: nn.Module, routing: RowRouting | Sequence[str | None]) -> Iterator[RowRouting]:
    """Context manager: run ``model`` with one adapter per batch row (None: the base alone).

    Rows of one batch may use different adapters, methods and ranks. Adapters with
    :meth:`~rankwise.adapters.Adapter.delta_factors` (LoRA) are computed with two batched
    matmuls per rank present, over the layer's slot pool of their factors (no Python loop
    over adapters, no merging, no padding to the largest rank); other methods (DoRA...)
    run exactly through their own ``compose`` on their rows. Unknown names raise ConfigError.
    """
    if not isinstance(routing, RowRouting):
        routing = RowRouting(routing)
    if routing.checked is not model:
        _check_names(model, list(routing.groups))
        routing.checked = model
        routing.layers = list(adapted_layers(model).values())  # walked once per routing
    layers = routing.layers
    for layer in layers:
        layer.routing = routing
    try:
        yield routing
    finally:
        for layer in layers:
            layer.routing = None


# ----------------------------------------------------------------------------- finding targets


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without descending into adapted layers (their base layer
    and adapters), so the cost does not grow with the number of adapters attached."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if isinstance(module, AdaptedLayer):
            continue
        children = [(f"{path}.{n}" if path else n, c) for n, c in module._modules.items() if c is not None]
        stack.extend(reversed(children))


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """``{module path: AdaptedLayer}`` for every adapted layer in ``model``."""
    return {p: m for p, m in _walk(model) if isinstance(m, AdaptedLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters attached anywhere in ``model`` (first-seen order)."""
    seen: dict[str, None] = {}
    for layer in adapted_layers(model).values():
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def _candidates(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """Adaptable modules by user-facing path (wrapped ones by their wrapper's path), and
    all module paths (for suggestions)."""
    found: dict[str, nn.Module] = {}
    everything: list[str] = []
    for path, module in _walk(model):
        if path:
            everything.append(path)
        if isinstance(module, AdaptedLayer):
            found[path] = module.base_layer
        elif view_for(module) is not None:
            found[path] = module
    return found, everything


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _matches(pattern: str | re.Pattern, path: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(path) is not None
    parts = path.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    if _is_glob(pattern):
        return any(fnmatch.fnmatchcase(s, pattern) for s in suffixes)
    return pattern in suffixes


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def matching_paths(model: nn.Module, patterns: Sequence[str | re.Pattern]) -> list[str]:
    """Adaptable module paths matched by any of ``patterns`` (see :func:`resolve_targets`);
    unlike it, a pattern that matches nothing is not an error."""
    found, _ = _candidates(model)
    return [p for p in found if any(_matches(t, p) for t in patterns)]


def resolve_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Module paths matched by ``targets``; every pattern must match an adaptable module.

    ``targets`` is ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except the output
    head), a module name matched against the end of each path (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``), a glob (``"layers.*.mlp.*_proj"``), a compiled
    ``re.Pattern`` (full match on the path), or a list of these.
    """
    found, everything = _candidates(model)
    if isinstance(targets, str) and targets == "all-linear":
        head = _output_head(model)
        paths = [
            p
            for p, m in found.items()
            if view_for(m).kind in ("linear", "transposed_linear") and m is not head
        ]
        if not paths:
            raise ConfigError("targets='all-linear' matched no nn.Linear or Conv1D module")
        return paths
    patterns = [targets] if isinstance(targets, (str, re.Pattern)) else list(targets)
    if not patterns:
        raise ConfigError("targets is empty; give module names, globs, regexes or 'all-linear'")
    chosen: dict[str, None] = {}
    problems = []
    for pattern in patterns:
        if not isinstance(pattern, (str, re.Pattern)):
            raise ConfigError(f"target {pattern!r} must be a str or re.Pattern")
        hits = [p for p in found if _matches(pattern, p)]
        if hits:
            chosen.update(dict.fromkeys(hits))
            continue
        shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        other = [p for p in everything if _matches(pattern, p)]
        if other:
            kinds = sorted({type(model.get_submodule(p)).__name__ for p in other})
            problems.append(
                f"target {shown!r} matched only modules that cannot be adapted ({', '.join(kinds)}); "
                "supported: nn.Linear, nn.Embedding, nn.Conv1d/2d, transformers Conv1D"
            )
            continue
        names = sorted({p.rsplit(".", 1)[-1] for p in found} | set(found))
        close = difflib.get_close_matches(shown, names, n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        leaf = sorted({p.rsplit(".", 1)[-1] for p in found})
        problems.append(
            f"target {shown!r} matched no module{hint} (adaptable module names: {leaf[:20]})"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    return list(chosen)


# ----------------------------------------------------------------------------- attach


@dataclass
class AttachPlan:
    """What ``attach`` will do (returned by ``attach(..., dry_run=True)``)."""

    name: str
    method: str
    config: AdapterConfig
    layers: dict[str, str] = field(default_factory=dict)  # path -> "Linear(64->64)"
    parameters: int = 0

    def __str__(self) -> str:
        lines = [
            f"{self.method} adapter {self.name!r}: {len(self.layers)} layers, "
            f"{self.parameters:,} parameters"
        ]
        lines += [f"  {p}: {d}" for p, d in self.layers.items()]
        return "\n".join(lines)


def _default_dtype(view: LayerView) -> torch.dtype:
    w = view.weight.dtype
    return w if w in (torch.float32, torch.float64) else torch.float32


def _name_conflict(model: nn.Module, name: str, method: str, cfg: AdapterConfig) -> str | None:
    """Why ``name`` cannot take a ``method`` adapter with ``cfg``: it already holds another one.

    One name is one adapter (one method and config), as saving and loading expect; the same
    method and config may be added to more layers under that name.
    """
    for path, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        other = layer.adapters[name]
        if other.method != method or not other.config.same_adapter(cfg):
            return (
                f"name {name!r} already holds a {other.method} adapter with another config "
                f"(on {path}); choose another name"
            )
    return None


def attach(
    model: nn.Module,
    method: str = "lora",
    targets: Targets = "all-linear",
    name: str = "default",
    *,
    dry_run: bool = False,
    dtype: torch.dtype | None = None,
    activate: bool = True,
    trainable: bool = True,
    **config: Any,
) -> AttachPlan:
    """Add adapter ``name`` of ``method`` to every module matched by ``targets``.

    ``config`` are the method's options (``rank=8, alpha=16, dropout=0.05,
    use_rslora=True``, ``init="pissa"``...; PEFT's ``r=`` is accepted for ``rank=``).
    Adapter parameters are float32 unless the base weight is float32/float64 (then they
    follow it) or ``dtype`` says otherwise. The base model's parameters are frozen; the new
    adapter, with ``activate``, joins the active set, and trains while active unless
    ``trainable=False``. Returns the :class:`AttachPlan`; with ``dry_run=True`` nothing
    changes. Raises ConfigError (unknown method/option, bad rank, unmatched target, a name
    that already holds another adapter) or ModelError (a target is merged or cannot take
    this method), model unchanged.
    """
    cls = get_method(method)
    cfg, _ = cls.config_class.from_dict(config)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"adapter name {name!r} must start with a letter or '_' and contain only "
            "letters, digits, '_' and '-'"
        )
    init = get_initialiser(cfg.init)
    if not isinstance(model, nn.Module):
        raise ModelError(f"attach needs a torch.nn.Module, got {type(model).__name__}")
    if conflict := _name_conflict(model, name, method, cfg):
        raise ConfigError(f"cannot attach {method} adapter {name!r}: {conflict}")
    paths = resolve_targets(model, targets)
    plan = AttachPlan(name=name, method=method, config=cfg)
    problems: list[tuple[type[Exception], str]] = []
    existing = adapted_layers(model)
    for path in paths:
        layer = existing.get(path)
        module = layer.base_layer if layer is not None else model.get_submodule(path)
        view = view_for(module)
        if layer is not None and name in layer.adapters:
            problems.append((ConfigError, f"{path} already has an adapter named {name!r}"))
        elif layer is not None and layer.merged:
            problems.append(
                (ModelError, f"{path} has merged adapters {layer.merged}; unmerge first")
            )
        elif reason := cls.check_layer(view, cfg):
            problems.append((ConfigError, f"{path}: {reason}"))
        else:
            kind = type(module).__name__
            plan.layers[path] = f"{kind}({view.in_features}->{view.out_features})"
    if problems:
        more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        text = "; ".join(msg for _, msg in problems[:4]) + more
        raise problems[0][0](f"cannot attach {method} adapter {name!r}: {text}")
    if dry_run:
        for path in plan.layers:
            module = existing[path].base_layer if path in existing else model.get_submodule(path)
            probe = cls(ShapeOnlyView(view_for(module)), cfg, dtype=torch.float32)
            plan.parameters += sum(p.numel() for p in probe.parameters())
        return plan

    created: dict[str, Adapter] = {}
    wrapped: list[str] = []
    try:
        for path in plan.layers:
            layer = existing.get(path)
            if layer is None:
                module = model.get_submodule(path)
                layer = AdaptedLayer(module, view_for(module))
            adapter = cls(layer.view, cfg, dtype=dtype or _default_dtype(layer.view))
            adapter.trainable = trainable
            if init is not None and init.scope == "layer":
                init.fn(adapter, **cfg.init_options)
                adapter.after_init()
            created[path] = adapter
            if path not in existing:
                replace_module(model, path, layer)
                wrapped.append(path)
            layer.adapters[name] = adapter
        if init is not None and init.scope == "model":
            init.fn(model, created, **cfg.init_options)
            for adapter in created.values():
                adapter.after_init()
    except BaseException:
        for path in created:
            layer = model.get_submodule(path)
            if isinstance(layer, AdaptedLayer) and name in layer.adapters:
                del layer.adapters[name]
        for path in wrapped:
            replace_module(model, path, model.get_submodule(path).base_layer)
        raise
    _freeze_base(model)
    plan.parameters = sum(p.numel() for a in created.values() for p in a.parameters())
    layers = adapted_layers(model)
    for path in plan.layers:
        if activate:
            layers[path].active.append(name)
    for adapter in created.values():  # the other adapters' flags are in sync already
        for p in adapter.parameters():
            p.requires_grad_(activate and adapter.trainable)
    return plan


def _freeze_base(model: nn.Module) -> None:
    """Freeze the base model's parameters, never walking the adapters (a server holding
    hundreds of them attaches one more without touching theirs)."""
    for _, module in _walk(model):
        own = module.base_layer.parameters() if isinstance(module, AdaptedLayer) else module._parameters.values()
        for p in own:
            if p is not None:
                p.requires_grad_(False)


class ShapeOnlyView(LayerView):
    """The real layer's shapes on the meta device: builds shape-only adapters for checks."""

    def __init__(self, inner: LayerView) -> None:
        super().__init__(inner.module)
        self._inner = inner
        self.kind = inner.kind

    @property
    def weight(self) -> torch.Tensor:
        w = self._inner.weight
        return torch.empty(w.shape, dtype=w.dtype, device="meta")

    @property
    def bias(self) -> torch.Tensor | None:
        b = self._inner.bias
        return None if b is None else torch.empty(b.shape, dtype=b.dtype, device="meta")

    def weight_matrix(self) -> torch.Tensor:
        return type(self._inner).weight_matrix(self)  # type: ignore[arg-type]

    out_features = property(lambda self: type(self._inner).out_features.fget(self))
    in_features = property(lambda self: type(self._inner).in_features.fget(self))


# ----------------------------------------------------------------------------- activation


def _sync_trainable(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        for n, adapter in layer.adapters.items():
            for p in adapter.parameters():
                p.requires_grad_(n in layer.active and adapter.trainable)


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown adapter name(s) {unknown}; this model has {known}")


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` active on every layer that has them (and trainable, except
    adapters attached or loaded with ``trainable=False``)."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    layers = adapted_layers(model)
    merged = [p for p, layer in layers.items() if layer.merged]
    if merged:
        raise ModelError(f"layers {merged[:3]} have merged adapters; unmerge before set_active")
    for layer in layers.values():
        layer.active = [n for n in names if n in layer.adapters]
    _sync_trainable(model)


def active_adapters(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for layer in adapted_layers(model).values():
        seen.update(dict.fromkeys(layer.active))
    return list(seen)


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run the base model alone (adapters skipped), then restore."""
    layers = adapted_layers(model)
    merged = [p for p, layer in layers.items() if layer.merged]
    if merged:
        raise ModelError(f"layers {merged[:3]} have merged adapters; unmerge before disable")
    before = {p: layer.disabled for p, layer in layers.items()}
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for p, layer in layers.items():
            layer.disabled = before[p]


# ----------------------------------------------------------------------------- merge


def _merge_problem(path: str, layer: AdaptedLayer) -> str | None:
    w = layer.view.weight
    if layer.view.is_quantized:
        return f"{path}: weight dtype {w.dtype} is quantized; dequantize the model to merge"
    if not isinstance(w, torch.Tensor) or type(w) not in (torch.Tensor, nn.Parameter):
        return f"{path}: weight is a {type(w).__name__}, not a plain tensor; cannot merge"
    return None


@torch.no_grad()
def merge(model: nn.Module) -> list[str]:
    """Fold each layer's active adapters into its weight (float32 math, cast back).

    Afterwards the model computes the same function with plain weights; ``unmerge``
    restores the original weights up to float rounding. Returns the merged layer paths.
    """
    layers = {p: layer for p, layer in adapted_layers(model).items() if layer.active}
    problems = [
        _merge_problem(p, layer) or (f"{p}: already merged" if layer.merged else None)
        for p, layer in layers.items()
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ModelError("cannot merge: " + "; ".join(problems))
    for path, layer in layers.items():
        w0 = layer.view.weight_matrix().float()
        scale, offset = _merge_terms(layer, layer.active)
        if scale is not None and bool((scale.abs() < 1e-12).any()):
            raise ModelError(f"{path}: an adapter scales an output row to zero; cannot merge")
        merged = w0 if scale is None else w0 * scale[:, None]
        layer.view.set_weight_matrix(merged + offset)
        layer.merged = list(layer.active)
        for n in layer.merged:
            layer.adapters[n].merged = True
    return list(layers)


def _merge_terms(layer: AdaptedLayer, names: list[str]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(c, E)`` with merged weight ``c ⊙ W + E`` (``c`` per output row, None if all ones)."""
    scale = None
    offset = torch.zeros(layer.view.out_features, layer.view.in_features)
    offset = offset.to(layer.view.device)
    for n in names:
        c, e = layer.adapters[n].merge_terms()
        offset += e.to(offset.device, torch.float32)
        if c is not None:
            scale = (
                torch.ones_like(c, dtype=torch.float32) if scale is None else scale
            ) + c.float()
    return scale, offset


@torch.no_grad()
def unmerge(model: nn.Module) -> list[str]:
    """Undo :func:`merge`: restore each merged layer's original weight (float32 math)."""
    done = []
    for path, layer in adapted_layers(model).items():
        if not layer.merged:
            continue
        w = layer.view.weight_matrix().float()
        scale, offset = _merge_terms(layer, layer.merged)
        w = w - offset
        if scale is not None:
            w = w / scale[:, None]
        layer.view.set_weight_matrix(w)
        for n in layer.merged:
            layer.adapters[n].merged = False
        layer.merged = []
        done.append(path)
    return done


# ----------------------------------------------------------------------------- delete, report


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left without adapters are unwrapped."""
    _check_names(model, [name])
    layers = adapted_layers(model)
    merged = [p for p, layer in layers.items() if name in layer.merged]
    if merged:
        raise ModelError(f"adapter {name!r} is merged into {merged[:3]}; unmerge first")
    for path, layer in layers.items():
        if name not in layer.adapters:
            continue
        del layer.adapters[name]
        layer.active = [n for n in layer.active if n != name]
        if layer.slots is not None:
            layer.slots.free(name)
        if not layer.adapters:
            replace_module(model, path, layer.base_layer, expect=AdaptedLayer)


@dataclass(frozen=True)
class TrainableReport:
    """How many parameters train, overall and per adapter."""

    trainable: int
    total: int
    by_adapter: dict[str, int]

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        per = ", ".join(f"{k}: {v:,}" for k, v in self.by_adapter.items())
        return (
            f"trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.fraction:.4f}%); per adapter: {per or 'none'}"
        )


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """Count trainable vs all parameters, and each adapter's size."""
    by_adapter: dict[str, int] = {}
    for layer in adapted_layers(model).values():
        for n, adapter in layer.adapters.items():
            by_adapter[n] = by_adapter.get(n, 0) + sum(p.numel() for p in adapter.parameters())
    params = list(model.parameters())
    return TrainableReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        by_adapter=by_adapter,
    )


__all__ = [
    "AdaptedLayer",
    "RowRouting",
    "route",
    "AttachPlan",
    "TrainableReport",
    "attach",
    "resolve_targets",
    "matching_paths",
    "adapted_layers",
    "adapter_names",
    "active_adapters",
    "set_active",
    "disable",
    "merge",
    "unmerge",
    "delete",
    "trainable_parameters",
]
