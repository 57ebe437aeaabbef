"""RandLoRA: a full-rank update from fixed random low-rank bases with learned diagonal scalings.

With ``m = min(out, in)``, ``M = max(out, in)`` and ``n = ⌈m / r⌉`` bases of rank ``r``
(so ``n·r ≥ m``: full rank), the frozen random bases are one ``A`` (r, m) shared by all
``n`` terms and ``B_j`` (M, r), ``j < n``; the trainable parts are ``Λ`` (r, n) and
``Γ`` (n, m)::

    ΔW_{M×m} = s · Σ_j B_j diag(Λ[:, j]) A diag(Γ[j])      (transposed when out < in)

``n·(r + m)`` parameters per layer (``Λ``: ``r·n``, ``Γ``: ``n·m``). ``Λ`` starts at
zero (the model starts unchanged), ``Γ`` at ``1/m``; ``s = alpha / r``. The bases come
from ``seed`` through :mod:`rankwise.adapters.random_bases`: one tensor per shape shared
by every layer, never saved. "RandLoRA: Full-rank parameter-efficient fine-tuning of
large models", Albert et al. 2025, eq. (4).

Compute: per step the scaled basis ``Q = Λ ⊙ A ⊙ Γ`` ((n·r, m), elementwise) and then,
whichever is cheaper for the token count T, either the dense ``ΔW = B Q`` once (``M·m·n·r``
multiply-adds, then one ``T·out·in`` product) or the two thin products ``(x Qᵀ) Bᵀ``
(``T·n·r·(out + in)``); PEFT always takes the second, and materialises ``Q`` the same way.
Linear and transposed-linear (GPT-2 ``Conv1D``) layers, as in PEFT.

Cost against LoRA on a d×d layer with T tokens (units of ``T·d²`` multiply-adds): LoRA's
step is 2 units plus its own thin products (the frozen forward and the input gradient). The
dense path takes 3 units (the merged forward, the input gradient, the gradient of ``ΔW``,
``gᵀx``) and two ``d³`` products (building ``ΔW`` and ``BᵀG``, ``2·d/T`` units): 4 units at
d = 2048, T = 4096. bench/zoo.py measures 1.63× LoRA's step there, which is about those
4 units, so this path is at its floor: with full-rank dense bases every exact formulation we
tried pays the ``gᵀx`` term (``Γ`` has ``d²/r`` entries, each a sum over all tokens) and
a ``d³`` product for each of ``ΔW`` and ``BᵀG`` (no structure in ``B`` to exploit); the thin
path pays more. PEFT's ternary ``sparse`` bases would cut the ``d³`` terms,
but torch's CPU sparse kernels do not: a 4.4%-dense CSR (2048²) times a dense 2048×4096 took
0.39 s against 0.52 s dense, and 2.3 s at 1/3 density (torch 2.13, this 2-core machine).

PEFT format (``peft_type="RANDLORA"``): ``randlora_lambda`` (r, n), ``randlora_gamma``
(n, m) per layer, and the bases of the largest layer, ``randlora_A`` (r, 1, m_max) and
``randlora_B`` (M_max, n_max, r), which PEFT slices per layer. Ours are prefixes of one
another (see ``random_bases``), so the export is exact; a PEFT file's own bases are read
and used as they are (such an adapter saves in PEFT's format only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import (
    Adapter,
    AdapterConfig,
    LayerView,
    not_linear_reason,
    register_method,
)
from rankwise.adapters.random_bases import (
    BasisSet,
    SharedBasis,
    check_peft_bases_saved,
    file_bases,
    generate,
)
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class RandLoraConfig(AdapterConfig):
    """RandLoRA options: ``rank`` (of each random basis; smaller means more bases and more
    trainable parameters), ``alpha`` (scale ``alpha / rank``), ``seed`` (PEFT's
    ``projection_prng_key``), dropout."""

    seed: int = 0


def dims(layer: LayerView, rank: int) -> tuple[int, int, int]:
    """``(m, M, n)``: the smaller and larger side of the layer and the number of bases."""
    m, big = sorted((layer.in_features, layer.out_features))
    return m, big, math.ceil(m / rank)


@register_method("randlora")
class RandLoraAdapter(Adapter):
    """``ΔW = s · Σ_j B_j diag(Λ_j) A diag(Γ_j)`` (full rank); trains ``Λ`` and ``Γ``."""

    summary = "RandLoRA: full-rank update from shared random bases, trains diagonal scalings (Albert et al. 2025); PEFT format"
    config_class = RandLoraConfig
    peft_type = "RANDLORA"
    peft_suffixes = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
    peft_shared = ("randlora_A", "randlora_B")

    @classmethod
    def check_layer(cls, layer: LayerView, config: Any) -> str | None:
        reason = not_linear_reason("randlora", layer)
        if reason is not None:
            return reason
        return super().check_layer(layer, config)

    def build(self) -> None:
        r, dev, dt = self.config.rank, self.layer.device, self.param_dtype
        self.m, self.big, self.n = dims(self.layer, r)
        self.in_is_min = self.layer.in_features <= self.layer.out_features
        seed = self.config.seed
        self._bases = BasisSet(
            a=SharedBasis((self.m, r), seed=seed, kind="randlora_a"),  # Aᵀ
            b=SharedBasis((self.big, self.n, r), seed=seed, kind="randlora_b"),
        )
        self.randlora_lambda = nn.Parameter(torch.empty(r, self.n, device=dev, dtype=dt))
        self.randlora_gamma = nn.Parameter(torch.empty(self.n, self.m, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.randlora_lambda.zero_()
            self.randlora_gamma.fill_(1.0 / self.m)

    # -- the update
    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, m), B (M, n·r))``: the frozen bases (``B``'s columns basis-major)."""
        p = self.randlora_lambda
        a = self._bases.get("a", p.device, p.dtype).t()
        b = self._bases.get("b", p.device, p.dtype)
        return a, b.reshape(self.big, -1)

    def scaled_basis(self, a: torch.Tensor) -> torch.Tensor:
        """``Q`` (r·n, m): row ``i·n + j`` is ``Λ[i, j] · A[i] ⊙ Γ[j]`` (PEFT's ordering)."""
        r, n, m = self.config.rank, self.n, self.m
        q = self.randlora_lambda[:, :, None] * a[:, None, :] * self.randlora_gamma[None]
        return q.reshape(r * n, m)

    def _dense(self, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``ΔW`` (out, in) with the scale."""
        dw = b @ q  # (M, m)
        return (dw if self.in_is_min else dw.t()) * self.scaling

    def _cheaper_dense(self, tokens: int) -> bool:
        k = self.config.rank * self.n
        dense = self.big * self.m * k + tokens * self.big * self.m
        return dense < tokens * k * (self.big + self.m)

    def dense_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.layer.kind != "linear" or not self._cheaper_dense(x[..., 0].numel()):
            return None
        a, b = self.bases()
        return self._dense(b, self.scaled_basis(a))

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.compose(torch.zeros((), dtype=x.dtype, device=x.device), x, base)

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        a, b = self.bases()
        q = self.scaled_basis(a)
        x2 = x.reshape(-1, x.shape[-1])
        dense = self._cheaper_dense(x2.shape[0])
        if dense and y.dim() == x.dim() and y.dtype == x.dtype:  # one fused multiply-add into y
            out = torch.addmm(y.reshape(-1, y.shape[-1]), x2, self._dense(b, q).t())
            return out.view(y.shape)
        if dense:
            out = x2 @ self._dense(b, q).t()
        elif self.in_is_min:  # ΔW = s·B Q
            out = (x2 @ q.t()) @ b.t() * self.scaling
        else:  # ΔW = s·Qᵀ Bᵀ
            out = (x2 @ b) @ q * self.scaling
        return y + out.reshape(*x.shape[:-1], -1).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.bases()
        return self._dense(b.float(), self.scaled_basis(a.float()).float())

    # -- PEFT format
    def peft_config(self) -> dict[str, Any] | None:
        c = self.config
        if c.use_rslora:
            return None  # PEFT's RandLoRA scales by alpha / r only
        return {
            "peft_type": "RANDLORA",
            "r": c.rank,
            "randlora_alpha": float(c.rank if c.alpha is None else c.alpha),
            "randlora_dropout": float(c.dropout),
            "projection_prng_key": int(c.seed),
            "save_projection": True,
            "sparse": False,
            "very_sparse": False,
            "init_weights": True,
            "bias": "none",
        }

    @classmethod
    def options_from_peft(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        for key in ("sparse", "very_sparse"):
            if cfg.get(key):
                raise ConfigError(f"RandLoRA {key}=true (ternary bases) is not supported; valid: false")
        check_peft_bases_saved("RandLoRA", cfg)
        return {
            "rank": cfg.get("r", 32),
            "alpha": float(cfg.get("randlora_alpha", 640)),
            "dropout": float(cfg.get("randlora_dropout", 0.0) or 0.0),
            "seed": int(cfg.get("projection_prng_key", 0)),
        }

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {
            "randlora_lambda": self.randlora_lambda.detach(),
            "randlora_gamma": self.randlora_gamma.detach(),
        }

    def peft_to_native(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "randlora_lambda": tensors["randlora_lambda"],
            "randlora_gamma": tensors["randlora_gamma"],
        }

    @classmethod
    def peft_shared_state(cls, adapters: Mapping[str, Adapter]) -> dict[str, torch.Tensor]:
        """``randlora_A`` (r, 1, m*), ``randlora_B`` (M*, ⌈m*/r⌉, r) with ``m*``, ``M*`` the
        smaller and larger of (largest out, largest in), the shapes PEFT builds; every
        layer's bases are the slices ``A[:, :, :m]``, ``B[:M, :n]``, as PEFT reads them."""
        first = next(iter(adapters.values()))
        r, seed = first.config.rank, first.config.seed
        m, big = sorted((max(a.layer.out_features for a in adapters.values()),
                         max(a.layer.in_features for a in adapters.values())))  # fmt: skip
        n = math.ceil(m / r)
        read = file_bases(a._bases for a in adapters.values())
        if read is not None:  # bases read from a PEFT file: write them back as they were
            return read
        a_big = generate((m, r), seed=seed, kind="randlora_a").t().unsqueeze(1)
        b_big = generate((big, n, r), seed=seed, kind="randlora_b")
        return {"randlora_A": a_big.contiguous(), "randlora_B": b_big}

    @classmethod
    def check_peft_shared(
        cls, shared: Mapping[str, torch.Tensor], adapters: Mapping[str, Adapter]
    ) -> str | None:
        if reason := super().check_peft_shared(shared, adapters):
            return reason
        a, b = shared["randlora_A"], shared["randlora_B"]
        first = next(iter(adapters.values()))
        r = first.config.rank
        m = max(ad.m for ad in adapters.values())
        big = max(ad.big for ad in adapters.values())
        n = max(ad.n for ad in adapters.values())
        if a.dim() != 3 or a.shape[0] != r or a.shape[1] != 1 or a.shape[2] < m:
            return f"randlora_A has shape {tuple(a.shape)}; needs ({r}, 1, >= {m})"
        if b.dim() != 3 or b.shape[0] < big or b.shape[1] < n or b.shape[2] != r:
            return f"randlora_B has shape {tuple(b.shape)}; needs (>= {big}, >= {n}, {r})"
        return None

    def load_peft_shared(self, shared: Mapping[str, torch.Tensor]) -> None:
        a, b = shared["randlora_A"][:, 0, : self.m], shared["randlora_B"][: self.big, : self.n]
        self._bases.adopt({"a": a.t(), "b": b}, dict(shared))

    def unsavable_reason(self, format: str) -> str | None:
        return self._bases.unsavable_reason(format)
