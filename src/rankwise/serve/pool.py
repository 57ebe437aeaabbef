"""The adapter pool: adapters loaded on demand from one folder, evicted least-recently-used.

Adapter weights and the KV cache share one memory budget (S-LoRA's unified memory idea,
"S-LoRA: Serving Thousands of Concurrent LoRA Adapters", 2023): loading an adapter or
admitting a request reserves bytes, and when they do not fit, resident adapters that no
queued or running request uses are evicted, oldest use first. Adapters are attached to the
one base model under internal names (``serve_<n>``), so any folder name works.

Only folders inside the configured adapters folder load: absolute paths, ``..`` and
symlinks that lead outside it are refused, and weights must be safetensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from torch import nn

from rankwise.adapters import delete, load_adapter, read_adapter_config
from rankwise.adapters.inject import adapted_layers
from rankwise.adapters.io import CONFIG_FILE, NATIVE_WEIGHTS, PEFT_WEIGHTS
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
        return self.kv_bytes + sum(r.nbytes for r in self.resident.values())

    def _make_room(self, nbytes: int) -> bool:
        """Evict unpinned adapters (oldest use first) until ``nbytes`` more fit."""
        if self.budget is None:
            return True
        for name in list(self.resident):
            if self.used_bytes() + nbytes <= self.budget:
                break
            if self.resident[name].pins == 0:
                self._delete(name)
                self.evictions += 1
        return self.used_bytes() + nbytes <= self.budget

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
    def _attach(self, name: str) -> _Resident:
        path = self.folder(name)
        info = _info(dict(read_adapter_config(path)))
        weights = path / (PEFT_WEIGHTS if (path / PEFT_WEIGHTS).is_file() else NATIVE_WEIGHTS)
        estimate = weights.stat().st_size
        if self.budget is not None and estimate > self.budget:
            raise ConfigError(
                f"adapter {name!r} needs about {estimate:,} bytes but memory_budget_bytes is "
                f"{self.budget:,}; raise the budget"
            )
        if not self._make_room(estimate):
            raise QueueFullError(
                f"no memory for adapter {name!r}: the budget is held by adapters and requests in use",
                retry_after=1.0,
            )
        self._counter += 1
        internal = f"serve_{self._counter}"
        with self.model_lock:
            try:
                load_adapter(self.model, path, internal, activate=False)
            except CheckpointError as e:
                raise CheckpointError(f"adapter {name!r}: {e}") from None
            self.version += 1
        nbytes = _resident_bytes(self.model, internal)
        self.loads += 1
        entry = _Resident(internal, nbytes, info, self._counter)
        self.resident[name] = entry
        return entry

    def _delete(self, name: str) -> None:
        entry = self.resident.pop(name)
        with self.model_lock:
            delete(self.model, entry.internal)
            self.version += 1
        if self.on_change is not None:
            self.on_change()

    def load(self, name: str) -> dict[str, Any]:
        """Make ``name`` resident (a no-op if it is); returns its ``models()`` entry."""
        with self.lock:
            entry = self.resident.get(name) or self._attach(name)
            self.resident.move_to_end(name)
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
        with self.lock:
            entry = self.resident.get(name) or self._attach(name)
            self.resident.move_to_end(name)
            entry.pins += 1
            return entry.internal

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


def _resident_bytes(model: nn.Module, internal: str) -> int:
    """Bytes adapter ``internal`` holds: its parameters, plus the copy of its factors that
    per-row routing keeps in each layer's slot pool (adapters with ``delta_factors``)."""
    total = 0
    for layer in adapted_layers(model).values():
        adapter = layer.adapters[internal] if internal in layer.adapters else None
        if adapter is None:
            continue
        total += sum(p.numel() * p.element_size() for p in adapter.parameters())
        factors = adapter.delta_factors()
        if factors is not None:
            total += sum(t.numel() * t.element_size() for t in factors[:2])
    return total


__all__ = ["AdapterPool"]
