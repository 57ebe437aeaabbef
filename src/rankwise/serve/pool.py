"""The adapter pool: adapters loaded on demand from one folder, evicted least-recently-used.

Adapter weights and the KV cache share one memory budget (S-LoRA's unified memory idea,
"S-LoRA: Serving Thousands of Concurrent LoRA Adapters", 2023): loading an adapter or
admitting a request reserves bytes, and when they do not fit, resident adapters that no
queued or running request uses are evicted, oldest use first. The budget counts each
resident adapter's parameters and the copy of its factors in the layers' slot pools, the
KV cache of admitted requests, and the slot pools' free slots: a pool doubles when full
and does not shrink, so freed and spare slots hold memory too (a load that would make a pool
double counts the new spare slots; a pool left empty by an eviction is freed). Adapters are attached to the one base model under
internal names (``serve_<n>``), so any folder name works.

An adapter's files are read and checked (:func:`rankwise.adapters.io.read_adapter`) with
no lock held: the model keeps decoding, and requests for resident adapters are not held
up; only the attach itself takes the model lock.

Only folders inside the configured adapters folder load: absolute paths, ``..`` and
symlinks that lead outside it are refused, and weights must be safetensors.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from torch import nn

from rankwise.adapters import delete, read_adapter_config
from rankwise.adapters.inject import AdaptedLayer, adapted_layers
from rankwise.adapters.io import (
    CONFIG_FILE,
    NATIVE_WEIGHTS,
    PEFT_WEIGHTS,
    AdapterCheckpoint,
    attach_checkpoint,
    read_adapter,
)
from rankwise.errors import CheckpointError, ConfigError
from rankwise.serve.requests import QueueFullError, UnknownAdapterError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _info(config: dict) -> dict[str, Any]:
    """``{"method", "rank"}`` from an ``adapter_config.json`` (PEFT or rankwise format)."""
    if "method" in config:
        return {"method": config["method"], "rank": (config.get("config") or {}).get("rank")}
    return {"method": "dora" if config.get("use_dora") else "lora", "rank": config.get("r")}


class _Resident:
    def __init__(self, internal: str, nbytes: int, info: dict[str, Any], serial: int) -> None:
        self.internal = internal
        self.serial = serial  # load order
        self.nbytes = nbytes
        self.info = info
        self.pins = 0


class AdapterPool:
    """Adapters of ``adapters_dir`` attached to ``model`` on demand, within ``budget`` bytes.

    ``model_lock`` is held while the model is changed (attach/delete), so a forward pass in
    another thread never sees a half-attached adapter. ``budget`` None means unlimited.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters_dir: str | Path | None,
        *,
        model_lock: threading.RLock,
        budget: int | None = None,
        reserved_name: str | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.root = None if adapters_dir is None else Path(adapters_dir).expanduser()
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"adapters_dir {str(self.root)!r} is not a folder")
        if budget is not None and budget <= 0:
            raise ConfigError(f"memory_budget_bytes must be positive, got {budget}")
        self.budget = budget
        self.reserved_name = reserved_name
        self.model_lock = model_lock
        self.lock = threading.RLock()
        self.on_change = on_change
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first
        self.kv_bytes = 0
        self.evictions = 0
        self.loads = 0
        self.version = 0  # bumped on every attach/delete (routings must be rebuilt)
        self._counter = 0
        self._layers: tuple[int, list[AdaptedLayer]] = (-1, [])  # (version, adapted layers)

    # -- names and folders
    def known(self) -> list[str]:
        """Adapter folders in the adapters folder (those with an adapter_config.json)."""
        found = set(self.resident)
        if self.root is not None:
            found |= {
                p.name
                for p in self.root.iterdir()
                if p.is_dir() and (p / CONFIG_FILE).is_file() and p.name != self.reserved_name
                and p.resolve().is_relative_to(self.root.resolve())  # a symlink out is never offered
            }
        return sorted(found)

    def _unknown(self, name: str, why: str = "") -> UnknownAdapterError:
        known = self.known()
        where = "no adapters folder is configured" if self.root is None else f"adapters folder {str(self.root)!r}"
        return UnknownAdapterError(
            f"unknown adapter {name!r}{why} ({where}); known adapters: {known}", known=known
        )

    def folder(self, name: str) -> Path:
        """The checked folder of adapter ``name``: inside the adapters folder, safetensors only."""
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
        parts = PurePath(name.replace("\\", "/")).parts
        if PurePath(name).is_absolute() or name.startswith(("/", "\\")) or ":" in parts[0]:
            raise ConfigError(
                f"adapter name {name!r} is an absolute path; give a folder name inside the adapters folder"
            )
        if ".." in parts:
            raise ConfigError(f"adapter name {name!r} contains '..'; give a folder name inside the adapters folder")
        if self.root is None:
            raise self._unknown(name)
        path = self.root / name
        if not path.exists() and not path.is_symlink():
            raise self._unknown(name)
        root = self.root.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise ConfigError(
                f"adapter {name!r} is a symlink to {str(real)!r}, outside the adapters folder; refusing it"
            )
        if not real.is_dir() or not (path / CONFIG_FILE).is_file():
            raise self._unknown(name, f" (not an adapter folder: no {CONFIG_FILE})")
        for file in [path / CONFIG_FILE, *(path / w for w in (PEFT_WEIGHTS, NATIVE_WEIGHTS))]:
            if file.exists() and root not in file.resolve().parents:
                raise ConfigError(
                    f"adapter {name!r}: {file.name} is a symlink outside the adapters folder; refusing it"
                )
        if not (path / PEFT_WEIGHTS).is_file() and not (path / NATIVE_WEIGHTS).is_file():
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise ConfigError(
                    f"adapter {name!r} has weights only in {pickled} (pickle); only safetensors are "
                    f"loaded ({PEFT_WEIGHTS} or {NATIVE_WEIGHTS}): re-save it with save_pretrained/save_adapter"
                )
            raise ConfigError(f"adapter {name!r} has no {PEFT_WEIGHTS} or {NATIVE_WEIGHTS}")
        return path

    def info(self, name: str) -> dict[str, Any]:
        """``{"method", "rank"}`` of adapter ``name`` (from its config)."""
        if name in self.resident:
            return dict(self.resident[name].info)
        return _info(dict(read_adapter_config(self.folder(name))))

    # -- memory
    def used_bytes(self) -> int:
        """Bytes held against the budget: KV reservations, resident adapters (parameters and
        slot copies) and the slot pools' free slots."""
        return self.kv_bytes + sum(r.nbytes for r in self.resident.values()) + self.slot_slack_bytes()

    def _adapted_layers(self) -> list[AdaptedLayer]:
        """The model's adapted layers (walked again only after an attach or delete)."""
        if self._layers[0] != self.version:
            self._layers = (self.version, list(adapted_layers(self.model).values()))
        return self._layers[1]

    def slot_slack_bytes(self) -> int:
        """Bytes of the slot pools' free slots: allocated (pools double when full and never
        shrink) but holding no adapter's factors."""
        total = 0
        for layer in self._adapted_layers():
            for pool in _slot_pools(layer):
                free = pool.owners.count(None)
                if free:
                    total += free * _slot_bytes(pool)
        return total

    def _slot_growth(self, shapes: dict[str, tuple]) -> int:
        """Bytes of free slots that taking an adapter with these factor shapes
        (:meth:`AdapterCheckpoint.factor_shapes`) would add: each layer whose pool for that
        shape is full (or missing) doubles it (to at least 4 slots), and the new adapter
        fills one of the new slots."""
        total = 0
        for path, (a_shape, b_shape) in shapes.items():
            try:
                layer = self.model.get_submodule(path)
            except AttributeError:
                continue
            slot = (math.prod(a_shape) + math.prod(b_shape)) * 4  # float32 factors
            pool = next(
                (p for p in _slot_pools(layer)
                 if tuple(p.a.shape[1:]) == (a_shape[1], a_shape[0])
                 and tuple(p.b.shape[1:]) == (b_shape[1], b_shape[0])),
                None,
            )  # fmt: skip
            if pool is not None and None in pool.owners:
                continue
            capacity = 0 if pool is None else len(pool.owners)
            total += (max(4, 2 * capacity) - capacity - 1) * slot
        return total

    def _make_room(self, nbytes: int, shapes: dict[str, tuple] | None = None) -> bool:
        """Evict unpinned adapters (oldest use first) until ``nbytes`` more (and the slot
        pool growth an adapter with factor ``shapes`` would cause) fit."""
        if self.budget is None:
            return True

        def fits() -> bool:
            growth = self._slot_growth(shapes) if shapes else 0
            return self.used_bytes() + nbytes + growth <= self.budget

        for name in list(self.resident):
            if fits():
                break
            if self.resident[name].pins == 0:
                self._delete(name)
                self.evictions += 1
                self._drop_empty_slot_pools()
        return fits()

    def _drop_empty_slot_pools(self) -> None:
        """Free the slot pools that no adapter uses any more (their memory counts against the
        budget; without a budget they stay, ready for the next adapter of that shape)."""
        with self.model_lock:
            for layer in self._adapted_layers():
                slots = layer.slots
                if slots is None:
                    continue
                for key, pool in list(slots.pools.items()):
                    if all(owner is None for owner in pool.owners):
                        del slots.pools[key]

    def reserve_kv(self, nbytes: int) -> bool:
        """Reserve KV-cache bytes for a request (evicting idle adapters); False if they do not fit."""
        with self.lock:
            if not self._make_room(nbytes):
                return False
            self.kv_bytes += nbytes
            return True

    def release_kv(self, nbytes: int) -> None:
        with self.lock:
            self.kv_bytes = max(0, self.kv_bytes - nbytes)

    # -- loading
    def _read(self, name: str) -> tuple[AdapterCheckpoint, dict[str, Any]]:
        """``name``'s files read and checked against the model (no lock held; the model is
        not touched), and its ``{"method", "rank"}``."""
        path = self.folder(name)
        info = _info(dict(read_adapter_config(path)))
        try:
            checkpoint = read_adapter(self.model, path)
        except CheckpointError as e:
            raise CheckpointError(f"adapter {name!r}: {e}") from None
        return checkpoint, info

    def _attach(self, name: str, checkpoint: AdapterCheckpoint, info: dict[str, Any]) -> _Resident:
        """Attach a read adapter (``self.lock`` held), making room in the budget first."""
        shapes = checkpoint.factor_shapes()
        estimate = _estimated_bytes(checkpoint, shapes)
        alone = estimate + 3 * (estimate - _estimated_bytes(checkpoint, {}))  # new 4-slot pools
        if self.budget is not None and alone > self.budget:
            raise ConfigError(
                f"adapter {name!r} needs about {alone:,} bytes (with its slot pools) but "
                f"memory_budget_bytes is {self.budget:,}; raise the budget"
            )
        if not self._make_room(estimate, shapes):
            raise QueueFullError(
                f"no memory for adapter {name!r}: the budget is held by adapters and requests in use",
                retry_after=1.0,
            )
        self._counter += 1
        internal = f"serve_{self._counter}"
        with self.model_lock:
            try:
                attach_checkpoint(self.model, checkpoint, internal, activate=False)
            except ConfigError as e:  # the model changed since the read (another thread)
                raise ConfigError(f"adapter {name!r}: {e}") from None
            finally:
                self.version += 1
        nbytes = _resident_bytes(self.model, internal, list(checkpoint.tensors))
        self.loads += 1
        entry = _Resident(internal, nbytes, info, self._counter)
        self.resident[name] = entry
        return entry

    def _use(self, name: str, *, pin: bool) -> _Resident:
        """``name``'s entry, loaded first if it is not resident (read with no lock held, then
        attached under the locks unless another thread loaded it meanwhile)."""
        read = None
        while True:
            with self.lock:
                entry = self.resident.get(name)
                if entry is None and read is not None:
                    entry = self._attach(name, *read)
                if entry is not None:
                    self.resident.move_to_end(name)
                    entry.pins += int(pin)
                    return entry
            read = self._read(name)

    def _delete(self, name: str) -> None:
        entry = self.resident.pop(name)
        with self.model_lock:
            delete(self.model, entry.internal)
            self.version += 1
        if self.on_change is not None:
            self.on_change()

    def load(self, name: str) -> dict[str, Any]:
        """Make ``name`` resident (a no-op if it is); returns its ``models()`` entry."""
        entry = self._use(name, pin=False)
        return {"id": name, "kind": "adapter", "resident": True, **entry.info}

    def unload(self, name: str) -> None:
        """Detach ``name`` now; ConfigError if requests still use it."""
        with self.lock:
            if name not in self.resident:
                self.folder(name)  # unknown or unsafe names raise their own error
                return
            if self.resident[name].pins:
                raise ConfigError(
                    f"adapter {name!r} is in use by {self.resident[name].pins} request(s); "
                    "unload it when they finish"
                )
            self._delete(name)

    def pin(self, name: str) -> str:
        """Load ``name`` if needed and keep it resident until :meth:`unpin`; its attach name."""
        return self._use(name, pin=True).internal

    def unpin(self, name: str) -> None:
        with self.lock:
            entry = self.resident.get(name)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                self.resident.move_to_end(name)

    def internal(self, name: str) -> str:
        return self.resident[name].internal

    def order_key(self, name: str) -> tuple[int, int]:
        """``(rank, load order)`` of resident adapter ``name``: the engine sorts batch rows by it
        so rows of one rank sit together (rank 0 when the config names none)."""
        entry = self.resident[name]
        return (entry.info.get("rank") or 0, entry.serial)


def _slot_pools(layer: nn.Module) -> list:
    """The slot pools of an adapted layer (``inject._SlotPool``: ``a`` ``(slots, in, r)``,
    ``b`` ``(slots, r, out)``, ``owners`` with None for a free slot)."""
    slots = getattr(layer, "slots", None) if isinstance(layer, AdaptedLayer) else None
    return [] if slots is None else list(slots.pools.values())


def _slot_bytes(pool) -> int:
    return (math.prod(pool.a.shape[1:]) * pool.a.element_size()
            + math.prod(pool.b.shape[1:]) * pool.b.element_size())  # fmt: skip


def _estimated_bytes(checkpoint: AdapterCheckpoint, shapes: dict[str, tuple]) -> int:
    """What an adapter will hold once attached (float32 parameters, as attach makes them
    for a float32/bfloat16 base) plus the slot copies of its factors."""
    params = sum(t.numel() for ts in checkpoint.tensors.values() for t in ts.values())
    copies = sum(math.prod(a) + math.prod(b) for a, b in shapes.values())
    return 4 * (params + copies)


def _resident_bytes(model: nn.Module, internal: str, paths: list[str]) -> int:
    """Bytes adapter ``internal`` (attached at ``paths``) holds: its parameters, plus the copy
    of its factors that per-row routing keeps in each layer's slot pool (adapters with
    ``delta_factors``)."""
    total = 0
    for path in paths:
        layer = model.get_submodule(path)
        adapter = layer.adapters[internal] if internal in layer.adapters else None
        if adapter is None:
            continue
        total += sum(p.numel() * p.element_size() for p in adapter.parameters())
        factors = adapter.delta_factors()
        if factors is not None:
            total += sum(t.numel() * t.element_size() for t in factors[:2])
    return total


__all__ = ["AdapterPool"]
