"""``SSTLinear``: Sparse Spectral Training ("Sparse Spectral Training and Inference on Euclidean
and Hyperbolic Neural Networks", Zhao et al., 2024).

The weight is kept in its spectral form ``W = U diag(s) Vh`` (``U (out, K)``, ``s (K,)``,
``Vh (K, in)``, ``K = min(in, out)``), initialised from the exact SVD of the layer it replaces,
so the forward equals the original at initialisation (the paper's "zero distortion"). Training
updates

- every singular value ``s`` (a parameter), and
- ``r = rank`` singular directions ``(u_i, v_i)`` per step, sampled without replacement with
  probability proportional to ``|s_i|`` (the paper's multinomial sampling). They live in the
  small parameters ``U_active (out, r)`` and ``V_active (r, in)``; the other directions are
  frozen buffers. Gradients and optimizer state therefore scale with ``r``, not with ``K``.

With ``enhanced_gradient`` (on by default; the paper's "enhanced gradient", Sec. 4.2) the
gradient of ``u_i`` and ``v_i`` is that of ``W`` projected on the direction, without the
factor ``s_i`` (``∂L/∂u_i = G v_i``, not ``s_i G v_i``), so directions with small singular
values still move.

The training loop calls :meth:`SSTLinear.after_optimizer_step` after each optimizer step: it
resamples the active directions every ``resample_every`` steps and re-orthogonalises every
``every`` steps by an exact SVD of the current ``U diag(s) Vh``
(:func:`rankwise.linalg.truncated_svd`; the function is unchanged, only ``U``/``Vh`` become
orthonormal again and ``s`` non-negative). :meth:`resample` and :meth:`resvd` can also be called directly.

Stored values: ``K (in + out + 1) + r (in + out)`` (+ ``out`` bias); trainable:
``K + r (in + out)`` (+ bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError
from rankwise.layers.base import StructuredLinear, register_trainable
from rankwise.layers.spec import tensor_bits
from rankwise.linalg import truncated_svd


def _positive_int(value: object, layer: str, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{layer}: {option} must be an integer >= 1 (a step count); got {value!r}")
    return value


def scale_gradient(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t`` unchanged in the forward; its gradient multiplied by ``scale`` in the backward."""
    frozen = t.detach()
    return frozen + (t - frozen) * scale


@register_trainable("sst")
class SSTLinear(StructuredLinear):
    """``y = U diag(s) Vh x + b`` with all of ``s`` and ``rank`` sampled directions trainable.

    Args:
        in_features, out_features: the shape of the replaced ``nn.Linear``.
        rank: ``r``, directions trained per step (``1 <= r <= min(in, out)``).
        every: steps between re-SVDs in :meth:`after_optimizer_step`.
        resample_every: steps between resamplings of the active directions in :meth:`after_optimizer_step`.
        enhanced_gradient: drop the ``s_i`` factor from the directions' gradients (SST Sec. 4.2).
        seed: seed of the layer's own sampling generator (reproducible runs).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        every: int = 200,
        resample_every: int = 1,
        enhanced_gradient: bool = True,
        seed: int = 0,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.check_rank(rank, in_features, out_features)
        self.every = _positive_int(every, name, "every")
        self.resample_every = _positive_int(resample_every, name, "resample_every")
        if not isinstance(enhanced_gradient, bool):
            raise ConfigError(f"{name}: enhanced_gradient must be True or False; got {enhanced_gradient!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{name}: seed must be an integer; got {seed!r}")
        self.enhanced_gradient = enhanced_gradient
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        spectral = min(in_features, out_features)
        kw = {"dtype": dtype, "device": device}
        self.register_buffer("U", torch.zeros(out_features, spectral, **kw))
        self.register_buffer("Vh", torch.zeros(spectral, in_features, **kw))
        self.register_buffer("index", torch.arange(rank, device=device))
        self.s = nn.Parameter(torch.zeros(spectral, **kw))
        self.U_active = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.V_active = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        every: int = 200,
        resample_every: int = 1,
        enhanced_gradient: bool = True,
        seed: int = 0,
    ) -> SSTLinear:
        """The SST layer equal to ``linear`` (its exact SVD), with ``rank`` directions sampled."""
        layer = cls.shaped_like(
            linear, rank, every=every, resample_every=resample_every,
            enhanced_gradient=enhanced_gradient, seed=seed,
        )  # fmt: skip
        layer._set_spectrum(*truncated_svd(linear.weight.detach()))
        layer.resample()
        return layer

    # ------------------------------------------------------------------ the weight

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U (out, K), Vh (K, in))`` with the active directions in place (differentiable)."""
        up, down = self.U_active, self.V_active
        if self.enhanced_gradient:
            s = self.s.detach()[self.index].abs()
            scale = 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny)  # its gradient had s_i: exact
            up, down = scale_gradient(up, scale), scale_gradient(down, scale[:, None])
        return self.U.index_copy(1, self.index, up), self.Vh.index_copy(0, self.index, down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, Vh = self._factors()
        return F.linear(F.linear(x, Vh) * self.s, U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """``U diag(s) Vh`` with the active directions in place, shape ``(out, in)``."""
        U, Vh = self._factors()
        return (U * self.s) @ Vh

    def storage_bits(self) -> int:
        """Bits of every stored value (frozen spectrum, ``s`` and the active copies; no bias)."""
        tensors = (self.U, self.Vh, self.s, self.U_active, self.V_active)
        return sum(tensor_bits(t) for t in tensors)

    # ------------------------------------------------------------------ training-loop hooks

    @torch.no_grad()
    def _set_spectrum(self, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> None:
        """Install a spectrum; the active parameters take its directions at ``index``."""
        self.U.copy_(U)
        self.s.copy_(s)
        self.Vh.copy_(Vh)
        self.U_active.copy_(self.U[:, self.index])
        self.V_active.copy_(self.Vh[self.index])

    @torch.no_grad()
    def sync(self) -> None:
        """Write the trained active directions back into the frozen ``U`` and ``Vh``."""
        self.U[:, self.index] = self.U_active
        self.Vh[self.index] = self.V_active

    @torch.no_grad()
    def resample(self) -> torch.Tensor:
        """Pick ``rank`` new active directions, ``P(i) ∝ |s_i|`` without replacement; returns them."""
        self.sync()
        weights = self.s.detach().abs().float().cpu()
        if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)  # no information: uniform
        chosen = torch.multinomial(weights, self.rank, replacement=False, generator=self.generator)
        self.index.copy_(chosen.sort().values.to(self.index.device))
        self.U_active.copy_(self.U[:, self.index])
        self.V_active.copy_(self.Vh[self.index])
        return self.index.clone()

    @torch.no_grad()
    def resvd(self) -> None:
        """Re-orthogonalise: replace ``(U, s, Vh)`` by the exact SVD of ``U diag(s) Vh``.

        The layer's function is unchanged (up to rounding); the active directions keep their
        positions and take the new singular vectors there.
        """
        self.sync()
        work = torch.float64 if self.s.dtype == torch.float64 else torch.float32
        weight = (self.U.to(work) * self.s.to(work)) @ self.Vh.to(work)
        self._set_spectrum(*truncated_svd(weight))

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after optimizer step ``step`` (counted from 0, as the training rules count):
        re-SVD after every ``every``-th step and resample after every ``resample_every``-th. The
        active parameters then hold other directions, so their state in ``optimizer`` (if
        given) is cleared."""
        changed = False
        if (step + 1) % self.every == 0:
            self.resvd()
            changed = True
        if (step + 1) % self.resample_every == 0:
            self.resample()
            changed = True
        if changed and optimizer is not None:
            for p in (self.U_active, self.V_active):
                optimizer.state.pop(p, None)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, spectrum={self.s.shape[0]}, every={self.every}, "
            f"resample_every={self.resample_every}, bias={self.bias is not None}"
        )


__all__ = ["SSTLinear", "scale_gradient"]
