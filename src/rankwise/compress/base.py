"""The compression-method contract, the method registry, and the shared low-rank layer.

A compression method replaces a dense ``nn.Linear`` (``y = W x + b``, ``W`` of shape
``(out, in)``) by a :class:`LowRankLinear` (``y = U (V x) + b``, ``U (out, r)``, ``V (r, in)``).
Every method here does it the same way: it picks a weighted error to minimise, takes the
SVD of the weighted matrix once (:class:`Decomposition`), and truncates it at whatever rank
the allocator (``allocate.py``) gives the layer.

How to add a method (one file, one test, one docs row — nothing else changes)
-----------------------------------------------------------------------------
1. Create ``src/rankwise/compress/methods/<name>.py``; every module in that package is
   imported automatically, so registration happens on import.
2. Write a frozen dataclass subclassing :class:`CompressionMethod`, decorated with
   ``@register_method``. Its fields are the method's options (validate them in
   ``__post_init__`` and raise :class:`~rankwise.errors.ConfigError`). Set the class
   variables ``name`` (the registered name, used by ``--method``), ``summary`` (one line for
   tables) and ``needs``: the calibration statistics it reads, a subset of
   ``{"gram", "abs_mean", "fisher"}`` (see ``calibrate.py``; empty = data-free).
3. Implement ``decompose(self, weight, stats) -> Decomposition``: ``weight`` is the
   layer's ``(out, in)`` float64 weight, ``stats`` its :class:`~rankwise.compress.calibrate.LayerStats`
   (``None`` for data-free methods). Return ``U (out, k)``, ``S (k,)`` descending, ``Vh (k, in)``
   such that ``W ≈ U[:, :r] diag(S[:r]) Vh[:r]`` for every rank ``r`` and ``Σ S[r:]²`` is the
   method's own error at rank ``r`` (allocators read it). For a weighting
   ``min ‖A (W − Ŵ) B‖`` with diagonal ``A`` and diagonal or lower-triangular ``B`` just call
   :func:`weighted_svd` — it does the SVD and maps the factors back without inverses.
4. Optionally override ``refine(self, weight, stats, up, down) -> (up, down)`` to improve the
   truncated factors (``up (out, r)``, ``down (r, in)``), e.g. a closed-form least-squares
   update; the default returns them unchanged.
5. Add ``tests/compress/test_<name>.py`` (the generic tests in ``test_methods.py`` already run
   every registered method) and a row in the table of ``docs/compress.md``.

Options given by name (``get_method(name, **options)``, ``--option key=value``) are checked
against the field types before the dataclass is built (a ``float`` field refuses ``"abc"``).
A method that sizes its layers itself overrides ``compress_model(job)`` (one
:class:`CompressionJob`; budget fitting with the helpers of ``allocate.py``), returns one
:class:`~rankwise.compress.report.LayerReport` per layer, and sets ``allocations`` to the
``--allocate`` names it honours (the first is its default, used for ``"auto"``) and
``layer_tensors`` to the tensors its layers hold (for the ``--size`` header bound).

Shared helpers for methods: :func:`weighted_svd`, :func:`damped_cholesky`,
:func:`least_squares_up` (the optimal ``U`` for a fixed ``V`` under the input Gram).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from rankwise.compress.allocate import STRATEGIES, breakeven_rank, layer_parameters, statistics_for
from rankwise.compress.calibrate import INPUT_STATISTICS, STATISTICS, Calibration, LayerStats
from rankwise.errors import ConfigError, ShapeError
from rankwise.layers import LowRankLinear
from rankwise.options import coerce, field_types, type_name
from rankwise.registry import Registry

if TYPE_CHECKING:
    from rankwise.compress.report import LayerReport

# ----------------------------------------------------------------------------- decompositions


@dataclass(frozen=True)
class Decomposition:
    """A layer's weight in a method's weighted SVD basis: ``W ≈ U[:, :r] diag(S[:r]) Vh[:r]``.

    Shapes: ``U (out, k)``, ``S (k,)`` descending and non-negative, ``Vh (k, in)``,
    ``k = min(out, in)``. ``Σ S[r:]²`` is the method's error at rank ``r``.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors ``up = U_r S_r^½ (out, r)``, ``down = S_r^½ Vh_r (r, in)``."""
        root = self.S[:rank].sqrt()
        return self.U[:, :rank] * root, root[:, None] * self.Vh[:rank]

    def relative_error(self, rank: int) -> float:
        """``Σ S[r:]² / Σ S²``: the fraction of the weighted energy truncation discards."""
        energy = self.S.pow(2)
        total = float(energy.sum())
        return float(energy[rank:].sum()) / total if total > 0 else 0.0


def weighted_svd(
    weight: torch.Tensor,
    *,
    left: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
) -> Decomposition:
    """SVD of ``A W B`` mapped back to ``W``'s space: minimises ``‖A (W − Ŵ) B‖_F`` at every rank.

    ``left``: ``A`` as a positive vector ``(out,)`` (a diagonal). ``right``: ``B`` as a
    positive vector ``(in,)`` or a lower-triangular ``(in, in)`` matrix (e.g. a Cholesky
    factor of the input Gram, so ``‖(W − Ŵ) B‖ = ‖(W − Ŵ) X‖``). With
    ``A W B = P Σ Qᵀ`` the result is ``U = A⁻¹ P``, ``Vh = Qᵀ B⁻¹`` — computed by division or a
    triangular solve, never an explicit inverse (Eckart–Young in the weighted norm).
    """
    if weight.ndim != 2:
        raise ShapeError(f"weight must be (out, in); got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ShapeError("weight contains NaN/Inf; cannot compress it")
    m = weight
    if left is not None:
        m = left[:, None] * m
    if right is not None:
        m = m * right[None, :] if right.ndim == 1 else m @ right
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if left is not None:
        u = u / left[:, None]
    if right is not None:
        if right.ndim == 1:
            vh = vh / right[None, :]
        else:  # vh B⁻¹: solve X B = vh for X
            vh = torch.linalg.solve_triangular(right, vh, upper=False, left=False)
    return Decomposition(u, s, vh)


def damped_cholesky(gram: torch.Tensor, *, damp: float = 1e-4) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``G + λ I`` (float64), ``λ = damp · mean(diag G)``.

    A singular Gram (fewer calibration tokens than channels, dead channels) still factors:
    the damping is raised tenfold until it does (SVD-LLM 2024 whitening; the damping is
    the standard fix for its failing Cholesky).
    """
    g = gram.to(torch.float64)
    scale = float(g.diagonal().mean())
    if not math.isfinite(scale):
        raise ShapeError("input Gram matrix contains NaN/Inf")
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(g + damp * scale * eye)
        if int(info) == 0:
            return factor
        damp *= 10
    raise ShapeError("input Gram matrix is not positive semi-definite even after damping")


def least_squares_up(
    weight: torch.Tensor, down: torch.Tensor, gram: torch.Tensor, *, damp: float = 1e-8
) -> torch.Tensor:
    """The ``up (out, r)`` minimising ``‖W X − up · down · X‖_F`` for fixed ``down (r, in)``.

    With ``G = Σ x xᵀ``: ``up = W G downᵀ (down G downᵀ)⁻¹``, solved by Cholesky of the
    small ``(r, r)`` matrix (damped by ``damp ·`` its mean diagonal), not an inverse.
    """
    g = gram.to(torch.float64)
    d = down.to(torch.float64)
    gd = g @ d.T  # (in, r)
    small = d @ gd  # (r, r)
    chol = damped_cholesky(small, damp=damp)
    rhs = (weight.to(torch.float64) @ gd).T  # (r, out)
    return torch.cholesky_solve(rhs, chol).T  # (out, r)


# ----------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class CompressionJob:
    """What a whole-model method's ``compress_model`` gets: the ``model`` (modified in place),
    its compressible ``layers``, the ``calibration`` (``None`` for data-free methods), the
    ``budget`` of those layers in parameters of the model's dtype, the ``allocation``
    (already resolved: one the method supports) and whether to show ``progress``."""

    model: nn.Module
    layers: dict[str, nn.Linear]
    calibration: Calibration | None
    budget: int
    allocation: str
    progress: bool = False

    @property
    def element_bits(self) -> int:
        """Bits of one parameter of the model's dtype (storage is counted in these)."""
        return next(self.model.parameters()).element_size() * 8


@dataclass(frozen=True)
class CompressionMethod:
    """Base of every method: a frozen dataclass of options plus ``decompose`` / ``refine``.

    ``allocations``: the ``--allocate`` strategies the method honours; the first is what
    ``"auto"`` means. Per-layer SVD methods honour every rank allocator (default ``fisher``).
    ``layer_tensors``: the tensors (besides a bias) a layer this method compresses holds at
    most, as named in ``model.safetensors`` after the layer's path (``--size`` bounds the
    file's header with them). ``closed_loop``: a whole-model method (``compress_model``) sets it
    when it reads ``job.calibration.stats`` block by block, in order, compressing each block
    before reading the next (see :meth:`supports_closed_loop`).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    allocations: ClassVar[tuple[str, ...]] = STRATEGIES
    layer_tensors: ClassVar[tuple[str, ...]] = ("U", "V")
    closed_loop: ClassVar[bool] = False  # a whole-model method reading statistics block by block

    def decompose(self, weight: torch.Tensor, stats: LayerStats | None) -> Decomposition:
        """The per-layer decomposition (per-layer methods define it). A whole-model method,
        which defines :meth:`compress_model` instead, has none: :func:`register_method`
        refuses a class that defines neither."""
        raise TypeError(
            f"{type(self).__name__} is a whole-model method (compress_model): it has no per-layer decompose"
        )

    def refine(
        self, weight: torch.Tensor, stats: LayerStats | None, up: torch.Tensor, down: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return up, down

    def options(self) -> dict:
        return dataclasses.asdict(self)

    def supported_allocations(self) -> tuple[str, ...]:
        """The allocations this configuration honours (the first is the default)."""
        return self.allocations

    def resolve_allocation(self, requested: str) -> str:
        """``requested`` (``"auto"``: the method's default) if this method honours it, else a
        :class:`~rankwise.errors.ConfigError` naming the allocations it supports."""
        supported = self.supported_allocations()
        if requested == "auto":
            return supported[0]
        if requested not in supported:
            raise ConfigError(
                f"method {self.name!r} cannot allocate with {requested!r}; it supports "
                f"--allocate auto (= {supported[0]}), {', '.join(supported)}"
            )
        return requested

    def statistics(self, allocation: str = "auto") -> frozenset[str]:
        """Calibration statistics this method needs with ``allocation``: its own ``needs`` and
        what the resolved allocator reads (``fisher``: ``out_grad``, ``mfac``: ``out_fisher``)."""
        return frozenset(self.needs) | statistics_for(self.resolve_allocation(allocation))

    def supports_closed_loop(self) -> bool:
        """Whether closed-loop calibration can serve this method: it uses input statistics
        (``gram`` / ``abs_mean``, the ones a closed-loop walk refreshes), and it is a per-layer
        method (``compress`` factorises in block order) or a whole-model one declaring
        ``closed_loop``."""
        per_layer = type(self).compress_model is CompressionMethod.compress_model
        return bool(set(self.needs) & set(INPUT_STATISTICS)) and (per_layer or self.closed_loop)

    def compress_model(self, job: CompressionJob) -> list[LayerReport] | None:
        """Whole-model path for methods that are not one weighted SVD per layer (quantized,
        sparse-dictionary, module-pair methods; see ``rankwise/layers/``).

        Replace modules of ``job.model`` in place so that ``job.layers`` take at most
        ``job.budget`` parameters of the model's dtype (as
        :func:`rankwise.models.count_parameters` counts them: storage bits / bits-per-parameter)
        and return one :class:`~rankwise.compress.report.LayerReport` per layer. ``None`` (the
        default) selects the per-layer SVD path.
        """
        return None

    def require(self, calibration: Calibration | None) -> Calibration:
        """``calibration``, or a ConfigError naming the statistics this method needs."""
        if calibration is None:
            raise ConfigError(
                f"{self.name} needs calibration statistics ({', '.join(sorted(self.needs))}); none were given"
            )
        return calibration

    def factorize(
        self, layer: nn.Linear, stats: LayerStats | None, rank: int, decomposition: Decomposition | None = None
    ) -> LowRankLinear:
        """Replace ``layer`` by its rank-``rank`` :class:`LowRankLinear` (a new module)."""
        weight = layer.weight.detach().to(torch.float64)
        dec = decomposition if decomposition is not None else self.decompose(weight, stats)
        up, down = self.refine(weight, stats, *dec.factors(rank))
        dtype = layer.weight.dtype
        bias = None if layer.bias is None else layer.bias.detach()
        return LowRankLinear.from_factors(up.to(dtype), down.to(dtype), bias)


METHODS: Registry[type[CompressionMethod]] = Registry(
    "compression method", plugins=("rankwise.compress.methods",)
)


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: make ``cls`` available as ``cls.name`` (``--method``)."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} needs a non-empty class variable 'name'")
    unknown = set(cls.needs) - set(STATISTICS)
    if unknown:
        raise ConfigError(f"{cls.__name__}.needs has unknown statistics {sorted(unknown)}")
    per_layer = cls.decompose is not CompressionMethod.decompose
    whole_model = cls.compress_model is not CompressionMethod.compress_model
    if not (per_layer or whole_model):
        raise ConfigError(
            f"{cls.__name__} must define decompose(weight, stats) (a per-layer method) or "
            "compress_model(job) (a whole-model method)"
        )
    return METHODS.register(cls.name, cls)


def method_names() -> list[str]:
    """Every registered compression method (importing the built-in ones first)."""
    return METHODS.names()


def get_method(name: str | CompressionMethod, **options: object) -> CompressionMethod:
    """An instance of the registered method ``name`` with ``options`` (its dataclass fields).

    Unknown names and options, and option values of the wrong type, raise a
    :class:`~rankwise.errors.ConfigError` naming the option, the value and what is expected.
    """
    if isinstance(name, CompressionMethod):
        return name
    cls = METHODS.get(name)
    hints = field_types(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(options) - fields)
    if bad:
        raise ConfigError(
            f"method {name!r} has no option(s) {bad}; its options are: {', '.join(sorted(fields)) or 'none'}"
        )
    checked = {}
    for key, value in options.items():
        ok, checked[key] = coerce(value, hints[key])
        if not ok:
            raise ConfigError(
                f"method {name!r} option {key}={value!r} has the wrong type: expected "
                f"{type_name(hints[key])} (e.g. -o {key}={_example(cls, key)})"
            )
    return cls(**checked)


def _example(cls: type[CompressionMethod], key: str) -> str:
    default = next(f for f in dataclasses.fields(cls) if f.name == key)
    value = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


__all__ = [
    "LowRankLinear",
    "Decomposition",
    "CompressionMethod",
    "CompressionJob",
    "METHODS",
    "register_method",
    "method_names",
    "get_method",
    "weighted_svd",
    "damped_cholesky",
    "least_squares_up",
    "breakeven_rank",
    "layer_parameters",
]
