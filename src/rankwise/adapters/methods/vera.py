"""VeRA: one pair of frozen random matrices for all layers, scaled by two trainable vectors.

``ΔW = c · diag(b) B diag(d) A`` with ``A`` (r, in) and ``B`` (out, r) frozen random with
unit-variance entries, shared by every layer (:mod:`rankwise.adapters.random_bases`, from
``seed``, never saved), ``c = 1/√(in·r)`` (the fan-in scales of a Kaiming start, kept out of
the shared matrices so layers of any size share them), and the trainable vectors ``b``
(out,) and ``d`` (r,): ``out + r`` parameters per layer. ``b`` starts at zero (the model
starts unchanged), ``d`` at ``d_initial``. No ``alpha/r`` scale, as in the paper and PEFT.
"VeRA: Vector-based Random Matrix Adaptation", Kopiczko et al. 2024, eq. (2).

PEFT format (``peft_type="VERA"``): ``vera_lambda_b``, ``vera_lambda_d`` per layer and the
largest layer's ``vera_A`` (r, in_max), ``vera_B`` (out_max, r), which PEFT slices per
layer; rankwise's bases are prefixes of one another, so the export is exact (``c`` goes
into PEFT's ``d``), and a PEFT file's own bases are read and used as they are.
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
class VeraConfig(AdapterConfig):
    """VeRA options: ``rank`` (of the shared random matrices; PEFT uses 256), ``d_initial``
    (start of ``d``), ``seed`` (PEFT's ``projection_prng_key``), dropout."""

    d_initial: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.d_initial):
            raise ConfigError(f"d_initial must be a finite number, got {self.d_initial!r}")


@register_method("vera")
class VeraAdapter(Adapter):
    """``ΔW = diag(b) B diag(d) A``, shared frozen ``A``, ``B``; trains ``b`` (out,), ``d`` (r,)."""

    summary = "VeRA: shared frozen random A, B scaled by trained vectors (Kopiczko et al. 2024); PEFT format"
    config_class = VeraConfig
    peft_type = "VERA"
    peft_suffixes = ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B")
    peft_shared = ("vera_A", "vera_B")

    @classmethod
    def check_layer(cls, layer: LayerView, config: Any) -> str | None:
        reason = not_linear_reason("vera", layer)
        if reason is not None:
            return reason
        return None  # the shared matrices' rank is not bounded by the layer

    def build(self) -> None:
        r, seed, dev, dt = self.config.rank, self.config.seed, self.layer.device, self.param_dtype
        self.scaling = 1.0  # VeRA has no alpha / r
        self._bases = BasisSet(
            a=SharedBasis((self.layer.in_features, r), seed=seed, kind="vera_a"),  # Aᵀ
            b=SharedBasis((self.layer.out_features, r), seed=seed, kind="vera_b"),
        )
        self.vera_lambda_b = nn.Parameter(torch.empty(self.layer.out_features, device=dev, dtype=dt))
        self.vera_lambda_d = nn.Parameter(torch.empty(r, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.vera_lambda_b.zero_()
            self.vera_lambda_d.fill_(self.config.d_initial)

    @property
    def fan_scale(self) -> float:
        """``c = 1/√(in·r)``."""
        return 1.0 / math.sqrt(self.layer.in_features * self.config.rank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(b) B (out, r), c·diag(d) A (r, in))``."""
        p = self.vera_lambda_b
        a = self._bases.get("a", p.device, p.dtype).t()
        b = self._bases.get("b", p.device, p.dtype)
        return p[:, None] * b, (self.vera_lambda_d * self.fan_scale)[:, None] * a

    def _unscaled_out(self, x: torch.Tensor) -> torch.Tensor:
        """``B (c·d ⊙ A x)`` (..., out): the vectors scale activations, not the shared
        matrices, so backward needs no weight-sized gradient (as in PEFT)."""
        p = self.vera_lambda_b
        h = x @ self._bases.get("a", p.device, p.dtype)  # Aᵀ stored: (..., r)
        h = h * (self.vera_lambda_d * self.fan_scale)
        return h @ self._bases.get("b", p.device, p.dtype).t()

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self._unscaled_out(x) * self.vera_lambda_b

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        z = self._unscaled_out(x)
        if z.dtype == y.dtype:
            return torch.addcmul(y, z, self.vera_lambda_b)  # one pass over the output
        return y + (z * self.vera_lambda_b).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        b, a = self.factors()
        return b.float() @ a.float()

    # -- PEFT format (PEFT has no c: it goes into PEFT's d on the way out, and back)
    def peft_config(self) -> dict[str, Any] | None:
        c = self.config
        return {
            "peft_type": "VERA",
            "r": c.rank,
            "vera_dropout": float(c.dropout),
            "d_initial": float(c.d_initial),
            "projection_prng_key": int(c.seed),
            "save_projection": True,
            "init_weights": True,
            "bias": "none",
        }

    @classmethod
    def options_from_peft(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        check_peft_bases_saved("VeRA", cfg)
        return {
            "rank": cfg.get("r", 256),
            "dropout": float(cfg.get("vera_dropout", 0.0) or 0.0),
            "d_initial": float(cfg.get("d_initial", 0.1)),
            "seed": int(cfg.get("projection_prng_key", 0)),
        }

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {
            "vera_lambda_b": self.vera_lambda_b.detach(),
            "vera_lambda_d": self.vera_lambda_d.detach() * self.fan_scale,
        }

    def peft_to_native(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "vera_lambda_b": tensors["vera_lambda_b"],
            "vera_lambda_d": tensors["vera_lambda_d"] / self.fan_scale,
        }

    @classmethod
    def peft_shared_state(cls, adapters: Mapping[str, Adapter]) -> dict[str, torch.Tensor]:
        """``vera_A`` (r, in_max), ``vera_B`` (out_max, r): every layer's ``A``, ``B`` are the
        slices ``vera_A[:, :in]``, ``vera_B[:out]``, as PEFT reads them."""
        read = file_bases(a._bases for a in adapters.values())
        if read is not None:  # bases read from a PEFT file: write them back as they were
            return read
        first = next(iter(adapters.values()))
        r, seed = first.config.rank, first.config.seed
        inp = max(a.layer.in_features for a in adapters.values())
        out = max(a.layer.out_features for a in adapters.values())
        a_full = generate((inp, r), seed=seed, kind="vera_a").t().contiguous()
        return {"vera_A": a_full, "vera_B": generate((out, r), seed=seed, kind="vera_b")}

    @classmethod
    def check_peft_shared(
        cls, shared: Mapping[str, torch.Tensor], adapters: Mapping[str, Adapter]
    ) -> str | None:
        if reason := super().check_peft_shared(shared, adapters):
            return reason
        a, b = shared["vera_A"], shared["vera_B"]
        r = next(iter(adapters.values())).config.rank
        inp = max(ad.layer.in_features for ad in adapters.values())
        out = max(ad.layer.out_features for ad in adapters.values())
        if a.dim() != 2 or a.shape[0] != r or a.shape[1] < inp:
            return f"vera_A has shape {tuple(a.shape)}; needs ({r}, >= {inp})"
        if b.dim() != 2 or b.shape[0] < out or b.shape[1] != r:
            return f"vera_B has shape {tuple(b.shape)}; needs (>= {out}, {r})"
        return None

    def load_peft_shared(self, shared: Mapping[str, torch.Tensor]) -> None:
        a = shared["vera_A"][:, : self.layer.in_features].t()  # the seeded layout, Aᵀ
        b = shared["vera_B"][: self.layer.out_features]
        self._bases.adopt({"a": a, "b": b}, dict(shared))

    def unsavable_reason(self, format: str) -> str | None:
        return self._bases.unsavable_reason(format)
