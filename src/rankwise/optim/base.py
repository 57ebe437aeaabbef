"""The one Adam-style update that every low-rank optimizer here shares, and its projectors.

A :class:`Projector` maps a gradient ``G`` (M, N) into a small subspace and an update back
out of it: ``project(G)`` is ``PᵀG`` (side "left", P (M, r)), ``G P`` (side "right",
P (N, r)) or both ("full"); ``project_back(U)`` is the transpose map times ``scale``, and
``refresh(G, step)`` decides when to renew ``P`` from the current gradient (every
``update_proj_gap`` steps, staggered across layers) and renews it. Projectors are
registered by name (``"svd"``, ``"dct"``, ``"identity"``) and keep every tensor they need in
the optimizer's per-parameter state, so ``state_dict()`` is plain tensors.

:class:`ProjectedAdamW` is the loop: Adam moments live in the projected space
("GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", 2024, Alg. 1),
parameters that are not matrices (norms, biases; embeddings unless asked) get plain
AdamW. GaLore, DCT, FRUGAL and GradNormLoRP differ only in the projector and in two
small hooks (:meth:`ProjectedAdamW._prepare`, :meth:`ProjectedAdamW._write`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.registry import Registry

log = logging.getLogger("rankwise.optim")

PROJECTORS: Registry[type[Projector]] = Registry(
    "projector",
    plugins=("rankwise.optim.identity", "rankwise.optim.galore", "rankwise.optim.dct"),
)

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
# Options every parameter group may carry (galore-torch's names for the projection ones).
GROUP_OPTIONS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "correct_bias",
    "rank",
    "update_proj_gap",
    "scale",
    "proj_type",
    "projector",
)


# --------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------


def projection_sides(proj_type: str, shape: tuple[int, int]) -> tuple[str, ...]:
    """Which side(s) of an (M, N) gradient are projected, as galore-torch decides it:
    "std" projects the smaller side (right when M >= N), "reverse_std" the larger."""
    m, n = shape
    if proj_type == "std":
        return ("right",) if m >= n else ("left",)
    if proj_type == "reverse_std":
        return ("left",) if m >= n else ("right",)
    if proj_type == "full":
        return ("left", "right")
    return (proj_type,)


class Projector(ABC):
    """Projection of one parameter's gradient into a rank-``rank`` subspace.

    Built for each step around the parameter's optimizer ``state`` (a dict of tensors it
    reads and writes), so it holds no tensors of its own and survives ``load_state_dict``.
    Subclasses implement :meth:`_renew` (compute the subspace from a gradient and store it
    in ``state``) and, if it stores something else than ``state["proj_<side>"]``,
    :meth:`has_basis` and :meth:`basis` (the (d, r) orthonormal matrix of one side).
    """

    name: ClassVar[str]

    def __init__(
        self,
        state: dict,
        shape: tuple[int, int],
        *,
        rank: int,
        proj_type: str = "std",
        update_proj_gap: int = 200,
        scale: float = 1.0,
        phase: int = 0,
        seed: int = 0,
    ) -> None:
        self.state, self.shape = state, shape
        self.rank, self.gap, self.scale, self.phase = rank, update_proj_gap, scale, phase
        self.sides = projection_sides(proj_type, shape)
        self.seed = seed

    def due(self, step: int) -> bool:
        """Whether the subspace must be renewed before step ``step`` (0-based)."""
        return not self.has_basis() or (step - self.phase) % self.gap == 0

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        """Renew the subspace from ``grad`` if it is due at ``step``; True if renewed."""
        if not self.due(step):
            return False
        self.renew(grad, step)
        return True

    def renew(self, grad: torch.Tensor, step: int) -> None:
        """Renew the subspace from ``grad`` now, whether or not it is due."""
        self._renew(grad, step)

    def has_basis(self) -> bool:
        return all(f"proj_{side}" in self.state for side in self.sides)

    @abstractmethod
    def _renew(self, grad: torch.Tensor, step: int) -> None:
        """Compute the subspace of ``grad`` (M, N) and store it in ``self.state``."""

    def basis(self, side: str, like: torch.Tensor) -> torch.Tensor:
        """The orthonormal (d, r) basis of ``side`` ("left": d = M, "right": d = N), in the
        dtype and device of ``like``."""
        return self.state[f"proj_{side}"]

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """``PᵀG`` (left), ``G P`` (right) or ``PₗᵀG Pᵣ`` (full)."""
        for side in self.sides:
            P = self.basis(side, grad)
            grad = P.mT @ grad if side == "left" else grad @ P
        return grad

    def lift(self, low: torch.Tensor) -> torch.Tensor:
        """The transpose map of :meth:`project` (no scale): back to (M, N)."""
        for side in self.sides:
            P = self.basis(side, low)
            low = P @ low if side == "left" else low @ P.mT
        return low

    def project_back(self, update: torch.Tensor) -> torch.Tensor:
        """:meth:`lift` times ``scale`` (galore-torch's ``scale`` option)."""
        out = self.lift(update)
        return out * self.scale if self.scale != 1.0 else out


def register_projector(name: str):
    """Class decorator: register a :class:`Projector` subclass under ``name``."""

    def wrap(cls: type[Projector]) -> type[Projector]:
        cls.name = name
        return PROJECTORS.register(name, cls)

    return wrap


# --------------------------------------------------------------------------------------
# The Adam step
# --------------------------------------------------------------------------------------


def adam_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    group: dict,
) -> tuple[torch.Tensor, float]:
    """Update the moments in place; return ``(m̂ / (√v̂ + eps) · bc1, lr / bc1)`` such that
    ``p -= step_size · direction`` is exactly torch.optim.AdamW's step (no decay)."""
    beta1, beta2 = group["betas"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if not group["correct_bias"]:
        return exp_avg / exp_avg_sq.sqrt().add_(group["eps"]), group["lr"]
    bc1 = 1 - beta1**step
    bc2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(group["eps"])
    return exp_avg / denom, group["lr"] / bc1


def _moments(
    state: dict, like: torch.Tensor, prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (exp_avg, exp_avg_sq) of ``state`` (created as zeros shaped like ``like``)."""
    a, b = f"{prefix}exp_avg", f"{prefix}exp_avg_sq"
    if a not in state or state[a].shape != like.shape:
        state[a] = torch.zeros_like(like)
        state[b] = torch.zeros_like(like)
    return state[a], state[b]


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose matrix parameters keep their moments in a low-rank projected subspace.

    ``params``: an ``nn.Module`` (parameters named, embeddings recognised), or parameters /
    parameter groups as for any torch optimizer. Group options (galore-torch's names):
    ``rank`` (None: plain AdamW for that group), ``update_proj_gap``, ``scale``,
    ``proj_type`` ("std", "reverse_std", "left", "right", "full") and ``projector`` (a
    registered name: ``PROJECTORS.names()``), plus ``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``correct_bias``. The keyword arguments are the defaults of every group.

    A parameter gets the projected rule if its group has a rank, it is 2-D, and it is not
    an embedding (input or output, tied or not) unless ``embeddings=True``; all others get
    plain AdamW (:meth:`summary` says which got which). Embeddings are recognised only when
    ``params`` is a module; with parameter groups (galore-torch's way) the groups decide: an
    embedding in a group with a ``rank`` is projected, like any matrix. A ``(vocab, d)``
    embedding or LM head is projected on its small side under ``proj_type="std"`` (``P`` is
    ``d × r``, the moments ``vocab × r``). Groups of named parameters (``model.named_parameters()``
    pairs, as torch optimizers take them) give their names to :attr:`rules`. Refreshes are staggered
    (``stagger=True``): the i-th of n projected matrices renews its subspace at steps
    ``≡ i·gap/n (mod gap)``. Non-finite gradients skip the whole step (counted in
    ``skipped_steps``) without touching any state (``check_finite=False``: a training loop
    that checks the gradients itself, as :mod:`rankwise.pretrain` does, saves the pass). Defaults follow galore-torch
    (``eps=1e-6``, ``weight_decay=0``), so switching is one import.
    """

    default_projector: ClassVar[str] = "svd"
    # Options a subclass adds to GROUP_OPTIONS, with their defaults.
    extra_options: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        projector: str | None = None,
        correct_bias: bool = True,
        stagger: bool = True,
        embeddings: bool = False,
        check_finite: bool = True,
        seed: int = 0,
        **extra: Any,
    ) -> None:
        cls = type(self).__name__
        _check_options(extra, tuple(self.extra_options), f"{cls}()", "argument")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projector=projector or self.default_projector,
            **{**self.extra_options, **extra},
        )
        names, embedding_ids = {}, set()
        if isinstance(params, nn.Module):
            names = {id(p): n for n, p in params.named_parameters()}
            embedding_ids = {id(p) for p in embedding_parameters(params)}
            params = list(params.parameters())
        self.stagger, self.embeddings, self.seed = stagger, embeddings, seed
        self.check_finite = check_finite
        self._names, self._embedding_ids = names, embedding_ids
        self.skipped_steps = 0
        self.refresh_seconds = 0.0
        self.refresh_count = 0
        super().__init__(list(params), defaults)
        self._classify()

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, after checking the group's options; rules are decided again."""
        cls, i = type(self).__name__, len(self.param_groups)
        extra = {k: v for k, v in param_group.items() if k != "params"}
        _check_options(
            extra, GROUP_OPTIONS + tuple(self.extra_options), cls, f"param group {i}: option"
        )
        _check_group({**self.defaults, **param_group}, i, cls)  # before the group is added
        super().add_param_group(param_group)
        if hasattr(self, "_rule"):  # a group added after construction
            self._classify()

    # ---------------------------------------------------------------- rules

    def _classify(self) -> None:
        """Decide each parameter's rule, its stagger phase and its effective rank."""
        names, embedding_ids = self._names, self._embedding_ids
        self._name, self._rule, self._rank, self._phase, self._index = {}, {}, {}, {}, {}
        projected, clamped = [], []
        for gi, group in enumerate(self.param_groups):
            given = group.get("param_names") or []  # torch's named-parameter groups
            for pi, p in enumerate(group["params"]):
                name = names.get(id(p)) or (given[pi] if pi < len(given) else f"group{gi}.param{pi}")
                self._name[p] = name
                if group["rank"] is None:
                    self._rule[p] = "adamw (no rank in its group)"
                elif p.ndim != 2:
                    self._rule[p] = f"adamw ({p.ndim}-D: norm, bias or not a matrix)"
                elif id(p) in embedding_ids and not self.embeddings:
                    self._rule[p] = "adamw (embedding; pass embeddings=True to project it)"
                else:
                    full = min(p.shape)
                    if group["rank"] > full:
                        clamped.append(f"{name} {tuple(p.shape)}")
                    self._rank[p] = min(group["rank"], full)
                    projected.append((p, group))
        for i, (p, group) in enumerate(projected):
            gap = group["update_proj_gap"]
            self._phase[p] = (i * gap) // len(projected) if self.stagger else 0
            self._index[p] = i
            sides = "+".join(projection_sides(group["proj_type"], tuple(p.shape)))
            self._rule[p] = f"{group['projector']} r={self._rank[p]} ({sides})"
        if clamped:
            warnings.warn(
                f"{type(self).__name__}: rank is larger than {len(clamped)} parameter(s) allow "
                f"({', '.join(clamped[:4])}{', ...' if len(clamped) > 4 else ''}); they use "
                "their full rank min(M, N)",
                UserWarning,
                stacklevel=3,
            )
        log.info(self._summary_line())

    @property
    def rules(self) -> dict[str, str]:
        """``{parameter name: the rule it gets}`` (e.g. ``"svd r=64 (right)"``, ``"adamw (...)"``)."""
        return {self._name[p]: self._rule[p] for g in self.param_groups for p in g["params"]}

    def _summary_line(self) -> str:
        counts: dict[str, int] = {}
        for rule in self.rules.values():
            key = rule.split(" r=")[0] if " r=" in rule else rule
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return f"{type(self).__name__}: {parts}"

    def summary(self) -> str:
        """A table: each parameter, its shape, its rule, its optimizer-state size."""
        lines = [self._summary_line(), f"{'parameter':<48} {'shape':<14} {'state':>9}  rule"]
        for g in self.param_groups:
            for p in g["params"]:
                numel = sum(
                    t.numel()
                    for t in self.state.get(p, {}).values()
                    if torch.is_tensor(t) and t.ndim
                )
                shape = "×".join(map(str, p.shape))
                lines.append(f"{self._name[p]:<48} {shape:<14} {numel:>9}  {self._rule[p]}")
        return "\n".join(lines)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (moments, subspaces, shared bases)."""
        total = sum(
            t.numel() * t.element_size()
            for s in self.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        return total + self._shared_bytes()

    def _shared_bytes(self) -> int:
        """Bytes of state shared by all parameters (e.g. DCT bases); counted once."""
        return 0

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but integer state (e.g. DCT column indices), which torch casts to the
        parameter's dtype on load, is turned back into int64."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in [k for k in state if k.endswith("_idx")]:
                state[key] = state[key].long()

    # ---------------------------------------------------------------- stepping

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient (skipped if any is NaN/Inf)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.check_finite and grads and not _all_finite(grads):
            self.skipped_steps += 1
            log.warning(
                "%s: non-finite gradient, step skipped (%d so far)",
                type(self).__name__,
                self.skipped_steps,
            )
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p in self._rank:
                    self._projected_update(p, group)
                else:
                    self._adamw_update(p, group)
        return loss

    def _next_step(self, state: dict) -> int:
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        return int(state["step"].item())

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        t = self._next_step(state)
        _decay(p, group)
        direction, step_size = adam_direction(*_moments(state, p), p.grad, t, group)
        p.add_(direction, alpha=-step_size)

    def _projector(self, p: torch.Tensor, group: dict) -> Projector:
        cls = PROJECTORS.get(group["projector"])
        return cls(
            self.state[p],
            tuple(p.shape),
            rank=self._rank[p],
            proj_type=group["proj_type"],
            update_proj_gap=group["update_proj_gap"],
            scale=group["scale"],
            phase=self._phase[p],
            seed=self.seed * 1_000_003 + self._index[p],
        )

    def _projected_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        grad = self._prepare(p, p.grad, state, group)
        proj = self._projector(p, group)
        done = int(state["step"].item()) if "step" in state else 0
        t0 = time.perf_counter()
        if proj.refresh(grad, done):
            seconds = time.perf_counter() - t0
            self.refresh_seconds += seconds
            self.refresh_count += 1
            log.debug(
                "%s: subspace of %s renewed in %.4fs", type(self).__name__, self._name[p], seconds
            )
        low = proj.project(grad)
        t = self._next_step(state)
        direction, step_size = adam_direction(*_moments(state, low), low, t, group)
        self._write(
            p, proj.project_back(direction), step_size, state, group, grad=grad, low=low, proj=proj
        )

    @torch.no_grad()
    def renew_subspaces(self) -> float:
        """Renew the subspace of every projected parameter that has a gradient, now, from its
        current ``.grad`` (whatever the refresh schedule says); return the seconds it took
        (also added to ``refresh_seconds``/``refresh_count``). The moments are kept, as at a
        scheduled refresh. Useful to time one full refresh (bench/optim.py) or to restart the
        subspaces after a change of data. (GradNormLoRP's scheduled refreshes use the
        direction's gradient, of the same shape and cost.)"""
        t0 = time.perf_counter()
        count = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self._rank and p.grad is not None:
                    self._projector(p, group).renew(p.grad, int(self.state[p].get("step", 0)))
                    count += 1
        seconds = time.perf_counter() - t0
        self.refresh_seconds += seconds
        self.refresh_count += count
        return seconds

    # ---------------------------------------------------------------- hooks

    def _prepare(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict
    ) -> torch.Tensor:
        """The gradient the projected Adam sees (GradNormLoRP: the direction's)."""
        return grad

    def _write(
        self,
        p: torch.Tensor,
        update: torch.Tensor,
        step_size: float,
        state: dict,
        group: dict,
        **context: Any,
    ) -> None:
        """Apply the full-size ``update``: decoupled weight decay, then ``p -= step_size·update``."""
        _decay(p, group)
        p.add_(update, alpha=-step_size)


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite: one fused max-abs per tensor (NaN/Inf propagate)."""
    norms = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.stack([n.float() for n in norms]).isfinite().all())


def _decay(p: torch.Tensor, group: dict) -> None:
    """Decoupled weight decay ``p *= 1 - lr·wd`` (nothing to do, and no pass over p, at wd 0)."""
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])


def _check_options(given: dict, valid: tuple[str, ...], where: str, what: str) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown {what} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
        )


def _check_group(group: dict, i: int, cls: str) -> None:
    """Validate one parameter group's option values (ConfigError naming the group)."""
    where = f"{cls}: param group {i}"
    rank = group["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"{where}: 'rank' must be an int >= 1 or None; got {rank!r}")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ConfigError(f"{where}: 'update_proj_gap' must be an int >= 1; got {gap!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ConfigError(
            f"{where}: 'proj_type' must be one of {', '.join(PROJ_TYPES)}; got {group['proj_type']!r}"
        )
    PROJECTORS.get(group["projector"])  # ConfigError listing the registered names
    for key, low in (("lr", 0.0), ("eps", 0.0), ("weight_decay", 0.0), ("scale", 0.0)):
        v = group[key]
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not v >= low
            or not math.isfinite(v)
        ):
            raise ConfigError(f"{where}: '{key}' must be a finite number >= {low:g}; got {v!r}")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{where}: 'betas' must be two numbers in [0, 1); got {betas!r}")


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The input and output embedding weights of ``model`` (``nn.Embedding`` modules and
    ``get_output_embeddings()``), each once (a tied LM head is the input embedding)."""
    found = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    out = getattr(model, "get_output_embeddings", None)
    head = out() if callable(out) else None
    if head is not None and getattr(head, "weight", None) is not None:
        found.append(head.weight)
    unique: dict[int, nn.Parameter] = {}
    for p in found:
        unique.setdefault(id(p), p)
    return list(unique.values())


__all__ = [
    "GROUP_OPTIONS",
    "PROJECTORS",
    "PROJ_TYPES",
    "ProjectedAdamW",
    "Projector",
    "adam_direction",
    "embedding_parameters",
    "projection_sides",
    "register_projector",
]
