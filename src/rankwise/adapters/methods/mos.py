"""MoS: LoRA factors assembled from a pool of shards shared by all adapted layers.

"MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards"
(Wang et al. 2024). Every layer keeps LoRA's form ``Δ(x) = s · B (A x)`` at rank ``r``,
but its ``A (r, in)`` and ``B (out, r)`` are not its own: their rank vectors are
concatenations of small shards drawn from two global pools (one for ``A``, one for ``B``).
The paper's sharing and four differentiation tricks, as implemented here:

- **inter-/intra-layer sharing**: one ``A`` pool and one ``B`` pool for all layers of an
  attach (one pool per ``attach`` call); a shard may serve several layers and slots.
- **vector sharding**: a rank vector of length ``in`` is ``in / d`` shards of length ``d``
  (``shard_size``), each chosen independently, so layers mix finer pieces.
- **subset selection**: each layer routes its slots to a fixed random subset of the pool
  (index routing, the paper's MoE-like selection without a learned gate, so the adapter
  stays a plain linear update and merges).
- **pair dissociation**: ``A`` and ``B`` slots are routed independently.
- **shard privatization**: the first ``q = private_rank`` rank vectors of each layer are
  its own (never routed to other layers); the other ``r − q`` come from the public pool.

Each layer contributes ``e = pool_rank`` vectors' worth to the pools, ``q`` private and
``e − q`` public, so the trainable parameters are ``Σ_layers e·(in + out)`` — LoRA's count
at rank ``e`` — while every layer works at rank ``r`` (the paper's ~8× saving at ``r = 8e``).

The pools are not copied per layer: each layer stores only its own contribution
(``mos_A (e, in)``, ``mos_B (e, out)``; saved with it), and the public pool is their
concatenation, built once per forward pass and shared by all layers. ``mos_id`` (saved)
fixes each layer's place in the pool, so routes — drawn from ``seed``, the layer's id and
the pool size — are the same after loading. ``B`` starts at zero (model unchanged).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, LayerView, register_method
from rankwise.adapters.methods.bone import divisors
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class MosConfig(AdapterConfig):
    """MoS options: ``rank`` (per-layer rank r), ``pool_rank`` (e: what each layer adds to the
    pools, in rank vectors), ``private_rank`` (q ≤ e: vectors kept private), ``shard_size``
    (d: shard length; must divide every adapted in/out), ``seed`` (routing)."""

    pool_rank: int = 2
    private_rank: int = 1
    shard_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if not 1 <= self.pool_rank <= self.rank:
            raise ConfigError(
                f"pool_rank must be in 1..rank={self.rank} (each layer's share of the pool), "
                f"got {self.pool_rank!r}"
            )
        if not 0 <= self.private_rank <= self.pool_rank:
            raise ConfigError(
                f"private_rank must be in 0..pool_rank={self.pool_rank}, got {self.private_rank!r}"
            )
        if self.private_rank == self.pool_rank < self.rank:
            raise ConfigError(
                f"private_rank={self.private_rank} = pool_rank leaves no public shards for the "
                f"other {self.rank - self.private_rank} rank vectors; use private_rank < pool_rank "
                "or rank = pool_rank"
            )


class ShardPool:
    """The layers of one MoS attach and their shared public pools (built once per forward)."""

    def __init__(self) -> None:
        self.members: list[weakref.ReferenceType[MosAdapter]] = []
        self._layout: tuple[tuple, list[MosAdapter], int, int] | None = None
        self._pools: tuple[tuple, torch.Tensor, torch.Tensor, set[int]] | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles hold the members themselves (``copy.deepcopy(model)`` then
        gives the copy its own pool over the copied layers, never the original's)."""
        return {"members": [m for ref in self.members if (m := ref()) is not None]}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.members = [weakref.ref(m) for m in state["members"]]

    def join(self, adapter: MosAdapter) -> int:
        self.members.append(weakref.ref(adapter))
        return len(self.members) - 1

    def layout(self) -> tuple[list[MosAdapter], int, int]:
        """Members in ``mos_id`` order and the public pool sizes (shards of A, of B)."""
        alive = [m for ref in self.members if (m := ref()) is not None]
        key = tuple((id(m), m.mos_id._version) for m in alive)
        if self._layout is None or self._layout[0] != key:
            order = sorted(alive, key=lambda m: float(m.mos_id))
            n_a = sum(m.public_shards()[0] for m in order)
            n_b = sum(m.public_shards()[1] for m in order)
            self._layout = (key, order, n_a, n_b)
        return self._layout[1:]

    def pools(self, user: MosAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pool_A, pool_B)``: every member's public shards, ``(n_shards, d)`` each.

        Built once per forward pass and shared by the layers: the cache is rebuilt when a
        layer asks for it a second time (the next pass), when a contribution changed, or when
        grad mode changed. (Version counters alone are not enough: fused optimizers update
        parameters without bumping them.)
        """
        order, _, _ = self.layout()
        key = (
            tuple((id(m.mos_A), m.mos_A._version, id(m.mos_B), m.mos_B._version) for m in order),
            torch.is_grad_enabled(),
        )
        if self._pools is None or self._pools[0] != key or id(user) in self._pools[3]:
            d, q = order[0].config.shard_size, order[0].config.private_rank
            pool_a = torch.cat([m.mos_A[q:].reshape(-1, d) for m in order])
            pool_b = torch.cat([m.mos_B[q:].reshape(-1, d) for m in order])
            self._pools = (key, pool_a, pool_b, set())
        self._pools[3].add(id(user))
        return self._pools[1], self._pools[2]


_POOLS: weakref.WeakValueDictionary[tuple, ShardPool] = weakref.WeakValueDictionary()


def draw_routes(n_pool: int, slots: int, generator: torch.Generator) -> torch.Tensor:
    """``slots`` pool indices: a random subset without repeats while the pool lasts."""
    if n_pool == 0:
        return torch.empty(0, dtype=torch.long)
    perms = [torch.randperm(n_pool, generator=generator) for _ in range(math.ceil(slots / n_pool))]
    return torch.cat(perms)[:slots]


@register_method("mos")
class MosAdapter(Adapter):
    """``Δ(x) = s · B (A x)`` with ``A``, ``B`` gathered from pools shared across layers."""

    summary = "MoS: LoRA factors routed from a cross-layer pool of shards (Wang et al. 2024)"
    config_class = MosConfig

    @classmethod
    def check_layer(cls, layer: LayerView, config: MosConfig) -> str | None:
        if reason := super().check_layer(layer, config):
            return reason
        d, out, inp = config.shard_size, layer.out_features, layer.in_features
        if out % d or inp % d:
            return (
                f"shard_size={d} must divide out={out} and in={inp}; "
                f"valid shard sizes here: {divisors(math.gcd(out, inp))}"
            )
        return None

    def build(self) -> None:
        c, dev, dt = self.config, self.layer.device, self.param_dtype
        self.mos_A = nn.Parameter(torch.empty(c.pool_rank, self.layer.in_features, device=dev, dtype=dt))
        self.mos_B = nn.Parameter(torch.empty(c.pool_rank, self.layer.out_features, device=dev, dtype=dt))
        key = (id(c), str(dev), dt)
        pool = _POOLS.get(key)
        if pool is None:
            pool = ShardPool()
            _POOLS[key] = pool
        object.__setattr__(self, "pool", pool)  # shared, not a submodule
        self.register_buffer("mos_id", torch.full((1,), float(pool.join(self)), device=dev))
        self._routes: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.mos_A, a=math.sqrt(5))
        nn.init.zeros_(self.mos_B)

    def public_shards(self) -> tuple[int, int]:
        """How many shards this layer adds to the public A and B pools."""
        public, d = self.config.pool_rank - self.config.private_rank, self.config.shard_size
        return public * self.layer.in_features // d, public * self.layer.out_features // d

    def routes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool indices of this layer's routed A and B slots (``(r−q)·in/d``, ``(r−q)·out/d``)."""
        _, n_a, n_b = self.pool.layout()
        key = (n_a, n_b, float(self.mos_id), self.mos_A.device)
        if self._routes is None or self._routes[0] != key:
            c = self.config
            routed = c.rank - c.private_rank
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + int(key[2]))
            slots_a = routed * self.layer.in_features // c.shard_size
            slots_b = routed * self.layer.out_features // c.shard_size
            ra = draw_routes(n_a, slots_a, g).to(self.mos_A.device)
            rb = draw_routes(n_b, slots_b, g).to(self.mos_A.device)
            self._routes = (key, ra, rb)
        return self._routes[1], self._routes[2]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The assembled ``A (r, in)`` and ``B (out, r)``."""
        q, r = self.config.private_rank, self.config.rank
        inp, out = self.layer.in_features, self.layer.out_features
        pool_a, pool_b = self.pool.pools(self)
        route_a, route_b = self.routes()
        a = torch.cat([self.mos_A[:q], pool_a[route_a].reshape(r - q, inp)])
        b = torch.cat([self.mos_B[:q], pool_b[route_b].reshape(r - q, out)])
        return a, b.t()

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        a, b = self.factors()
        return self.layer.project_out(self.layer.project_in(x, a), b) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        a, b = self.factors()
        return self.layer.add_projected(y, self.layer.project_in(x, a), b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b.float() @ a.float()) * self.scaling

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{super().extra_repr()}, pool_rank={c.pool_rank}, private_rank={c.private_rank}, "
            f"shard_size={c.shard_size}"
        )
