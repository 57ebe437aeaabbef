"""Fixed random bases generated from a seed, shared by every layer that asks for the same one.

Methods that train only coefficients or scalings of frozen random matrices (NOLA, RandLoRA,
TeRA, VeRA-style adapters) get those matrices here. A basis is named by
``(shape, seed, kind)``: every adapter asking for the same name gets the *same* tensor
(one per device and dtype), never one copy per layer, and nothing of it is saved in the
adapter file — the seed is saved and the basis is regenerated on load.

Determinism: values come from ``torch.Generator`` on the CPU in float32 (then cast and
moved), so the same name gives the same numbers on every machine and device. A basis is
drawn in tiles of up to :data:`TILE` rows along dimension 0, one tile per index of the
middle dimensions, each tile from its own generator seeded by a stable hash of
``(seed, kind, last dimension, tile position)``. So a basis is a *prefix* of any larger
basis of the same seed, kind and last dimension: ``random_basis((64, 3, 8), ...)`` equals
``random_basis((128, 5, 8), ...)[:64, :3]``. RandLoRA's PEFT export relies on it (PEFT
slices every layer's basis out of one model-wide basis).

Entries have mean 0 and variance 1 (``kind`` ending in ``"uniform"``: uniform on
``[-√3, √3]``; otherwise standard normal); callers scale them.

    basis = SharedBasis((k, r, n), seed=0, kind="nola_a")
    t = basis.get(device, dtype)        # the shared tensor; the SharedBasis keeps it alive
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from rankwise.errors import ConfigError

TILE = 256  # rows per generator call along dimension 0

# (shape, seed, kind, device, dtype) -> tensor, alive while some adapter holds it
_CACHE: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def _tile_seed(seed: int, kind: str, last: int, position: tuple[int, ...]) -> int:
    text = repr((int(seed), kind, int(last), position)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _check(shape: Sequence[int], seed: object, kind: object) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"a random basis needs a non-empty shape of positive sizes, got {shape}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"random basis seed must be an integer, got {seed!r}")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"random basis kind must be a non-empty string, got {kind!r}")
    return shape


def generate(shape: Sequence[int], *, seed: int, kind: str) -> torch.Tensor:
    """The basis ``(shape, seed, kind)`` as a new float32 CPU tensor (no caching)."""
    shape = _check(shape, seed, kind)
    rows, middle, last = shape[0], shape[1:-1], shape[-1]
    if len(shape) == 1:
        rows, middle, last = 1, (), shape[0]
    uniform = kind.endswith("uniform")
    out = torch.empty(rows, math.prod(middle), last)
    for m in range(out.shape[1]):
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(m), middle)) if middle else ()
        for start in range(0, rows, TILE):
            n = min(TILE, rows - start)
            g = torch.Generator(device="cpu").manual_seed(
                _tile_seed(seed, kind, last, (start // TILE, *index))
            )
            if uniform:
                tile = (torch.rand(TILE, last, generator=g) * 2 - 1) * math.sqrt(3.0)
            else:
                tile = torch.randn(TILE, last, generator=g)
            out[start : start + n, m] = tile[:n]
    return out.reshape(shape)


def random_basis(
    shape: Sequence[int],
    *,
    seed: int,
    kind: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The shared basis ``(shape, seed, kind)`` on ``device`` in ``dtype`` (see module doc).

    The returned tensor is shared: do not modify it. It stays cached while anything holds
    a reference to it (hold one, e.g. through :class:`SharedBasis`). On the ``meta``
    device an empty tensor of the shape is returned (shape-only checks).
    """
    shape = _check(shape, seed, kind)
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    key = (shape, int(seed), kind, device, dtype)
    found = _CACHE.get(key)
    if found is None:
        master_key = (shape, int(seed), kind, torch.device("cpu"), torch.float32)
        master = _CACHE.get(master_key)
        if master is None:
            master = generate(shape, seed=seed, kind=kind)
            _CACHE[master_key] = master
        found = master if key == master_key else master.to(device=device, dtype=dtype)
        _CACHE[key] = found
    return found


def shared_copy(tensor: torch.Tensor, *, kind: str) -> torch.Tensor:
    """One shared tensor per distinct content: bases read from a file (PEFT writes the same
    basis once per layer) become one tensor, like generated ones. Keyed by a digest of the
    values, so equal tensors from different layers map to the same object."""
    t = tensor.detach().contiguous()
    digest = hashlib.blake2b(t.cpu().float().numpy().tobytes(), digest_size=16).hexdigest()
    key = (tuple(t.shape), digest, kind, t.device, t.dtype)
    found = _CACHE.get(key)
    if found is None:
        found = t.clone()
        _CACHE[key] = found
    return found


class SharedBasis:
    """A handle on one shared basis: ``get(device, dtype)`` returns the shared tensor and
    keeps it alive for as long as this handle lives (an adapter holds one per basis)."""

    def __init__(self, shape: Sequence[int], *, seed: int, kind: str) -> None:
        self.shape = _check(shape, seed, kind)
        self.seed, self.kind = int(seed), kind
        self._held: torch.Tensor | None = None

    def get(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        held = self._held
        if held is None or held.device != torch.device(device) or held.dtype != dtype:
            held = random_basis(self.shape, seed=self.seed, kind=self.kind, device=device, dtype=dtype)
            self._held = held
        return held

    def __repr__(self) -> str:
        return f"SharedBasis(shape={self.shape}, seed={self.seed}, kind={self.kind!r})"


class BasisSet:
    """An adapter's frozen bases by name: seeded :class:`SharedBasis` handles, or the tensors
    read from a file (PEFT keeps its own random bases in its files), which are then used as
    they are. ``get`` returns either in the seeded layout."""

    def __init__(self, **seeded: SharedBasis) -> None:
        self.seeded = seeded
        self.from_file: dict[str, torch.Tensor] | None = None  # per-layer slices
        self.file_full: dict[str, torch.Tensor] | None = None  # the model-wide tensors as read

    def get(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        if self.from_file is not None:
            return self.from_file[name].to(device, dtype)
        return self.seeded[name].get(device, dtype)

    def adopt(self, slices: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        """Use ``slices`` (seeded layout) read from a file, unless they are the seeded bases
        themselves (a file rankwise wrote), in which case nothing changes. ``full`` are the
        file's model-wide tensors, kept to write the same file back."""
        if all(
            torch.equal(t.float().cpu(), self.seeded[n].get("cpu", torch.float32))
            for n, t in slices.items()
        ):
            return
        self.from_file = {n: shared_copy(t, kind=f"file_{n}") for n, t in slices.items()}
        self.file_full = {n: shared_copy(t, kind=f"file_full_{n}") for n, t in full.items()}

    def unsavable_reason(self, format: str) -> str | None:
        """Bases read from a file cannot be regenerated from the seed: PEFT format only."""
        if format == "rankwise" and self.from_file is not None:
            return (
                "its random bases were read from a PEFT file and cannot be regenerated from "
                "the seed; save it with format='peft' (or 'auto')"
            )
        return None


def file_bases(sets: Iterable[BasisSet]) -> dict[str, torch.Tensor] | None:
    """The model-wide tensors of the PEFT file any of ``sets`` was read from, or None
    (seeded bases: the caller generates the file's tensors from the seed)."""
    read = [s.file_full for s in sets if s.file_full]
    return dict(read[0]) if read else None


def check_peft_bases_saved(method: str, cfg: Mapping[str, Any]) -> None:
    """ConfigError for PEFT configs whose bases rankwise cannot use: bases left out of the
    file (``save_projection=false``: PEFT's own generator would be needed) or a bias."""
    if cfg.get("save_projection") is False:
        raise ConfigError(
            f"{method} save_projection=false: the bases are not in the file and rankwise "
            "cannot regenerate PEFT's; save the adapter in PEFT with save_projection=true"
        )
    if cfg.get("bias", "none") not in ("none", None):
        raise ConfigError(f"{method} bias={cfg['bias']!r} is not supported; valid: 'none'")


def cached_count() -> int:
    """How many basis tensors are alive in the cache (for tests and memory reports)."""
    return len(_CACHE)


__all__ = ["BasisSet", "SharedBasis", "TILE", "cached_count", "check_peft_bases_saved", "file_bases", "generate", "random_basis", "shared_copy"]
