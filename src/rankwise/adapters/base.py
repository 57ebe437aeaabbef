"""The adapter contract: what a method defines, and the registries that find methods by name.

An adapter adds a small trainable change to a frozen layer, ``y = W x + Δ(x)``. The engine
(``inject.py``) owns everything shared: finding target modules, wrapping them, dropout,
dtype/device, several named adapters per layer, merge/unmerge, saving. A method only says
what its parameters are, what ``Δ(x)`` is, and what dense ``ΔW`` it equals (for merging).

How to add a method
-------------------
1. Create ``src/rankwise/adapters/methods/<name>.py``. It is discovered automatically
   (``methods/__init__.py`` imports every module in that folder); nothing else to edit.
2. Define a frozen config dataclass that subclasses :class:`AdapterConfig` (which already
   has ``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``, ``init_options``). Add your
   fields with defaults and type annotations: every value is checked against its field's
   annotation (``-o dropout=abc`` is a ConfigError naming the option and the type). Check
   ranges in ``validate()`` (call ``super().validate()``) and raise
   :class:`~rankwise.errors.ConfigError` naming the field, the value and what is valid.
3. Subclass :class:`Adapter`, set ``config_class`` and ``summary`` (one line, shown by
   ``rankwise finetune --list-methods``), decorate it with ``@register_method("<name>")``
   and define:

   - ``build()``: create the ``nn.Parameter``/buffer tensors, using ``self.layer`` (a
     :class:`LayerView`: ``out_features``, ``in_features``, ``weight_matrix()``...) and
     ``self.config``; create them on ``self.layer.device`` in ``self.param_dtype``.
   - ``reset_parameters()``: the method's default initialisation (``init="default"``).
   - ``delta(x, base)``: the output change ``Δ(x)`` for an input ``x`` already cast to
     ``self.dtype`` and passed through dropout. Use ``self.layer.project_in(x, A)`` to apply
     an ``(r, in_features)`` matrix the way the layer applies its weight (linear, conv,
     embedding lookup) and ``self.layer.project_out(h, B)`` for an ``(out_features, r)``
     matrix, so one formula serves every layer type. ``base()`` returns ``W x`` (no bias)
     if the method needs it (computed once, shared between adapters).
   - ``delta_weight()``: the dense ``ΔW`` as an ``(out_features, in_features)`` float32
     matrix such that ``W + ΔW`` computes ``W x + Δ(x)`` (dropout off). Merging uses it.

   Optional: ``compose(y, x, base)`` if adding ``delta`` to ``y`` is wasteful (DoRA fuses
   it); ``check_layer(layer, config)`` for per-layer limits (default: ``rank <= min(out,
   in)``; return a reason naming the valid values, the engine prefixes the layer path and
   raises ConfigError before attaching anything); ``peft_config()``, ``peft_state()`` and
   ``peft_to_native()`` if the method has a PEFT on-disk equivalent (see
   ``methods/lora.py``; for a PEFT type other than LoRA also set ``peft_type``,
   ``peft_suffixes``, ``options_from_peft()`` and, for tensors PEFT keeps once per model,
   ``peft_shared`` with ``peft_shared_state()``/``check_peft_shared()``/
   ``load_peft_shared()``, as ``methods/randlora.py`` does). Tensors in ``state_dict()``
   are what ``save_adapter`` writes; no other code is needed to save. Fixed random
   matrices come from :mod:`rankwise.adapters.random_bases` (shared, regenerated from a
   seed, never saved).

   Initialisers ask the method, never its name: ``lowrank_start(b, core, a)`` (start at
   ``ΔW = b core a``: ``pissa``, ``nystrom``), ``lowrank_factors()`` (``ΔW = s·P Q``:
   ``residual_to_lora``), ``update_start(U, S, Vh)`` (``init="lora_sb"``) and
   ``factor_pair()`` (``eva``). The defaults follow the LoRA convention (trainable
   ``lora_B``/``lora_A``); override them when the factors are named or shaped otherwise
   (``methods/nlora.py``, ``methods/lora_sb.py``).
4. Add ``tests/adapters/test_<name>.py``: loss drops on a tiny task, merged == unmerged,
   the save/load round trip. ``tests/adapters/conftest.py`` has tiny models and helpers.

Initialisers
------------
``init="<name>"`` (with typed options in ``init_options``) chooses how an adapter starts.
``"default"`` calls ``reset_parameters()``. Any other name is looked up in
:data:`INITIALISERS`, filled by ``rankwise.adapters.init`` (imported on the first lookup)::

    @register_initialiser("pissa")                      # scope="layer": once per adapted layer
    def pissa(adapter: Adapter, *, n_iter: int = 4) -> None: ...

    @register_initialiser("eva", scope="model")         # once, for all layers at once
    def eva(model: nn.Module, adapters: dict[str, Adapter], *, inputs, ...) -> None: ...

A layer-scope initialiser gets the freshly built adapter (``reset_parameters()`` has run)
and ``**init_options``; it may set the adapter's parameters and, for residual inits like
PiSSA, the base weight via ``adapter.layer.set_weight_matrix(W)``. The engine then calls
``adapter.after_init()`` (DoRA uses it to reset its magnitude to the new row norms). A model-scope one gets
the model and ``{module path: adapter}`` for every layer just attached. Both run after the
whole attach is validated; an initialiser that raises leaves the adapter removed.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError, ModelError
from rankwise.options import coerce, field_types, type_name
from rankwise.registry import Registry

# ----------------------------------------------------------------------------- config


def normalise_rank(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with PEFT's spelling ``r`` renamed to ``rank`` (ConfigError if both are given)."""
    out = dict(options)
    if "r" in out:
        if "rank" in out:
            raise ConfigError(
                f"got both rank={out['rank']!r} and r={out['r']!r}; give the adapter rank once "
                "as rank=... (r is PEFT's name for it, accepted as an alias)"
            )
        out["rank"] = out.pop("r")
    return out


@dataclass(frozen=True)
class AdapterConfig:
    """Options every method shares. Subclass it (frozen) to add a method's own fields.

    ``rank`` is the adapter rank (PEFT calls it ``r``; ``attach`` accepts ``r=`` as an
    alias), ``alpha`` the scale numerator (``None`` means ``alpha = rank``): the update is
    scaled by ``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora`` (rsLoRA,
    Kalajdzievski 2023). ``dropout`` is applied to the adapter's input only. Every field's
    value is checked against its annotation before ``validate()`` checks ranges.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    init_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check_types()
        self.validate()

    def check_types(self) -> None:
        """ConfigError naming the first field whose value does not fit its annotation."""
        for f in dataclasses.fields(self):
            hint = field_types(type(self))[f.name]
            value = getattr(self, f.name)
            if not coerce(value, hint)[0]:
                raise ConfigError(
                    f"option {f.name!r} must be {type_name(hint)}, got {value!r} "
                    f"({type(value).__name__})"
                )

    def validate(self) -> None:
        """Raise ConfigError on a bad value. Subclasses extend it (call super first)."""
        if self.rank <= 0:
            raise ConfigError(
                f"rank (the adapter rank) must be a positive integer, got {self.rank!r}"
            )
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be a positive finite number or None, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.init:
            raise ConfigError(f"init must be an initialiser name, got {self.init!r}")

    @property
    def scaling(self) -> float:
        alpha = float(self.rank) if self.alpha is None else float(self.alpha)
        return alpha / math.sqrt(self.rank) if self.use_rslora else alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["init_options"] = dict(self.init_options)
        return out

    def same_adapter(self, other: AdapterConfig) -> bool:
        """Same config class and fields, ignoring ``init_options`` (how it started, which may
        hold tensors or callables and is not saved)."""
        if type(self) is not type(other):
            return False
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(self)
            if f.name != "init_options"
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, strict: bool = True) -> tuple[Any, list[str]]:
        """Build a config; returns ``(config, unknown_keys)``. Unknown keys raise if strict.

        ``r`` is read as ``rank`` (:func:`normalise_rank`).
        """
        values = normalise_rank(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in names)
        if unknown and strict:
            raise ConfigError(
                f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(names)}"
            )
        return cls(**{k: v for k, v in values.items() if k in names}), unknown

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> Any:
        """The config of a saved adapter (what ``load_adapter`` reads from its folder): unknown
        keys are ignored (the caller warns). A method whose saved format changed over versions
        overrides this to read older files."""
        return cls.from_dict(values, strict=False)[0]


# ----------------------------------------------------------------------------- layer views


class LayerView:
    """What an adapter sees of the module it adapts: the weight as an ``(out, in)`` matrix.

    Subclasses map each supported module type onto that picture: ``nn.Linear`` (weight
    ``(out, in)``), transformers ``Conv1D`` (weight stored ``(in, out)``), ``nn.Embedding``
    (input = one-hot over ``num_embeddings``, so the matrix is ``weight.T``), ``nn.Conv1d``
    / ``nn.Conv2d`` (matrix ``(out, in·k…)``; the ``r`` side of a factor is a conv with
    the layer's kernel, the output side a 1×1 conv).
    """

    kind: ClassVar[str] = "linear"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # -- shape and weight
    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def is_quantized(self) -> bool:
        return not self.weight.dtype.is_floating_point

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight[0].numel()

    def weight_matrix(self) -> torch.Tensor:
        """The weight as an ``(out, in)`` matrix (a view where possible, never a float copy)."""
        return self.weight.reshape(self.out_features, self.in_features)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix`: ``(out, in)`` to the module's weight layout."""
        return matrix.reshape(self.weight.shape)

    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        """Overwrite the base weight (in place, keeping its dtype) from an ``(out, in)`` matrix."""
        if self.is_quantized:
            raise ModelError(f"cannot write into a quantized {type(self.module).__name__} weight")
        with torch.no_grad():
            self.module.weight.copy_(self.from_matrix(matrix.to(self.module.weight.dtype)))

    # -- applying factors
    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Apply an ``(r, in)`` matrix to the input the way the layer applies its weight."""
        return F.linear(x, a)

    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Apply an ``(out, r)`` matrix to the ``r`` channels produced by :meth:`project_in`."""
        return F.linear(h, b)

    def add_projected(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float):
        """``y + scale · project_out(h, b)`` with as few full-size temporaries as possible."""
        if y.dim() >= 2 and h.dim() == y.dim() and y.dtype == h.dtype:
            out = torch.addmm(
                y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale
            )
            return out.view(y.shape)
        return y + self.project_out(h, b).to(y.dtype) * scale

    def scale_out(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multiply each output channel of ``y`` by ``v`` (shape ``(out,)``)."""
        return y * v

    def channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        """The shape a per-channel ``(out,)`` vector takes to broadcast against ``y``."""
        return (self.out_features,)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` without the bias, in ``x``'s dtype (used when dropout changes ``x``)."""
        return F.linear(x, self.weight.to(x.dtype))


class LinearView(LayerView):
    kind = "linear"


class _StoredTransposed(LayerView):
    """Layers whose weight is stored ``(in, out)``: the matrix ``W`` of ``y = W x`` is its transpose."""

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    def weight_matrix(self) -> torch.Tensor:
        return self.weight.t()

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t()


class TransposedLinearView(_StoredTransposed):
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored ``(in, out)``."""

    kind = "transposed_linear"

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


class EmbeddingView(_StoredTransposed):
    """``nn.Embedding``: a lookup is ``W.T`` applied to a one-hot vector over the vocabulary."""

    kind = "embedding"

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.embedding(
            x, a.t(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse
        )

    def add_projected(self, y, h, b, scale):
        return y + F.linear(h, b).to(y.dtype) * scale

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class ConvView(LayerView):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups == 1``: channels are dimension 1."""

    kind = "conv"

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, *, full: bool) -> torch.Tensor:
        m = self.module
        conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
        if not full:  # 1×1 channel mix
            return conv(x, weight)
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            return conv(x, weight, None, m.stride, 0, m.dilation)
        return conv(x, weight, None, m.stride, m.padding, m.dilation)

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # a: (r, in·k…) -> a conv kernel (r, in, *k)
        return self._conv(x, a.reshape(a.shape[0], *self.weight.shape[1:]), full=True)

    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # b: (out, r) -> a 1×1 kernel (out, r, 1, …)
        ones = (1,) * (self.weight.dim() - 2)
        return self._conv(h, b.reshape(*b.shape, *ones), full=False)

    def add_projected(self, y, h, b, scale):
        return y + self.project_out(h, b).to(y.dtype) * scale

    def scale_out(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return y * v.view(self.channel_shape(y))

    def channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (y.dim() - 2)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight.to(x.dtype), full=True)


def _is_transformers_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def view_for(module: nn.Module) -> LayerView | None:
    """The :class:`LayerView` for a supported module, or ``None`` if it cannot be adapted."""
    if isinstance(module, nn.Linear):
        return LinearView(module)
    if _is_transformers_conv1d(module):
        return TransposedLinearView(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingView(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return ConvView(module)
    return None


LINEAR_KINDS = ("linear", "transposed_linear")


def not_linear_reason(method: str, layer: LayerView) -> str | None:
    """Why ``method`` (one that adapts only linear layers) cannot take ``layer``, or None."""
    if layer.kind in LINEAR_KINDS:
        return None
    return (
        f"{method} adapts linear layers (nn.Linear, transformers Conv1D), not a "
        f"{layer.kind} layer; valid targets are linear layers"
    )


# ----------------------------------------------------------------------------- the adapter


class Adapter(nn.Module, abc.ABC):
    """One adapter on one layer. Subclass per method; see the module docstring.

    Attributes available to subclasses: ``self.layer`` (:class:`LayerView`),
    ``self.config`` (the method's frozen config), ``self.scaling`` (``alpha/rank`` or
    ``alpha/√rank``), ``self.param_dtype`` (create parameters in it), ``self.dtype`` (their dtype now).
    """

    method: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``rankwise finetune --list-methods``
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    # save_adapter's format="auto" writes PEFT's format when the method has one; False: only
    # when asked (an export that drops state the method needs to go on training, e.g. SoRA's gate)
    peft_by_default: ClassVar[bool] = True

    def __init__(self, layer: LayerView, config: AdapterConfig, *, dtype: torch.dtype) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: the base stays where it is
        self.config = config
        self.scaling = config.scaling
        self.param_dtype = dtype  # what build() creates parameters in
        self.merged = False  # set by the engine while this adapter is folded into the weight
        self.trainable = True  # False: stays frozen even when active (loaded for inference)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.build()
        self.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the adapter's parameters (inputs are cast to it)."""
        p = next(self.parameters(), None)
        return self.param_dtype if p is None else p.dtype

    # -- what a method defines (abstract: a class missing one cannot be instantiated)
    @abc.abstractmethod
    def build(self) -> None:
        """Create the method's parameters (shapes from ``self.layer`` and ``self.config``)."""

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """The method's default initialisation (``init="default"``)."""

    @abc.abstractmethod
    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The adapter's contribution to the layer output for input ``x``."""

    @abc.abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The dense ``ΔW`` (out_features, in_features) in float32, for merging."""

    # -- optional hooks with shared defaults
    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The layer output with this adapter added: ``y + Δ(x)``."""
        return y + self.delta(x, base).to(y.dtype)

    def after_init(self) -> None:
        """Called after an initialiser changed the parameters (DoRA re-reads its row norms)."""

    def dense_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scaled, differentiable ``ΔW`` (out, in) when the method would build it densely
        for input ``x`` anyway (Bone's ``bat``, RandLoRA at many tokens): on a plain
        ``nn.Linear`` whose every active adapter returns one, the layer then runs once with
        ``W + ΣΔW`` instead of ``W x`` plus each adapter's own dense product. None (default):
        the adapter adds its term through :meth:`compose`."""
        return None

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (r, in), B (out, r), s)`` when this adapter's term in an eval-mode forward on
        a linear layer is exactly ``s · B (A x)``, else None (default).

        Per-row routing (:func:`rankwise.adapters.inject.route`, which ``rankwise.serve``
        uses) then computes many such adapters at once with batched matmuls over copies of
        these factors, re-copied when the rank, the scale or a parameter of the adapter changes
        (so they must follow from those); without them the adapter runs its own :meth:`compose`."""
        return None

    def before_optimizer_step(self, lr: float) -> None:
        """Called by the training loop after backward and clipping, before the optimizer step,
        with the optimizer's current learning rate: for a part the method trains by its own
        rule that needs only the learning rate (a rule needing the run's length is a training rule
        instead, as SoRA's gate step is: ``rankwise.adapters.rules``). Clear that part's ``.grad`` so the optimizer skips it."""

    def lr_multipliers(self) -> dict[str, float]:
        """``{parameter name: factor}`` for parameters that train at the optimizer's learning
        rate times a factor (Bayesian-LoRA's gate logits); the others train at the rate itself.
        The training loop puts them in their own optimizer groups (same schedule)."""
        return {}

    def merge_terms(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(c, E)`` with ``ΔW = c ⊙ W + E`` (``c`` per output row, or None): how to merge.

        The default is ``(None, delta_weight())``. A method whose ``ΔW`` depends on the base
        weight (DoRA) returns a row scale ``c``, and must keep returning the same terms
        while ``self.merged`` is True (the base weight then holds the merged value), so
        unmerge can invert ``W' = (1 + Σc) ⊙ W + ΣE``.
        """
        return None, self.delta_weight()

    @classmethod
    def check_layer(cls, layer: LayerView, config: AdapterConfig) -> str | None:
        """A reason this layer cannot take this adapter, or None. Default: rank limit."""
        limit = min(layer.out_features, layer.in_features)
        if config.rank > limit:
            return (
                f"rank={config.rank} exceeds min(out, in) = min({layer.out_features}, "
                f"{layer.in_features}) = {limit}"
            )
        return None

    # -- hooks for initialisers (``rankwise.adapters.init``): how a method takes a given start
    def factor_pair(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """``(B (out, k), A (k, in))`` when the update is ``s·B A`` with ``B``, ``A`` trainable
        parameters named ``lora_B``/``lora_A`` (the LoRA factor convention), else None.

        EVA writes into them; the defaults of :meth:`lowrank_start` and :meth:`lowrank_factors`
        use them. A method with another structure overrides those two instead.
        """
        b, a = self._parameters.get("lora_B"), self._parameters.get("lora_A")
        if b is None or a is None or b.dim() != 2 or a.dim() != 2:
            return None
        return b, a

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(P (out, k), Q (k, in))`` with the current ``ΔW = s·P Q`` exactly, or None.

        :func:`~rankwise.adapters.init.residual_to_lora` turns an adapter that has them into
        a plain LoRA. Default: the factor pair, when it is all the adapter has (a DoRA
        magnitude, a frozen basis or a core make the update something else).
        """
        pair = self.factor_pair()
        if pair is None or set(self.state_dict()) != {"lora_A", "lora_B"}:
            return None
        return pair

    def lowrank_start(
        self, b: torch.Tensor, core: torch.Tensor, a: torch.Tensor
    ) -> Callable[[], None] | None:
        """A function that sets the adapter so ``ΔW = b @ core @ a`` (scale included), or
        None if the method cannot start from an arbitrary rank-k product.

        ``b`` (out, k), ``core`` (k, k), ``a`` (k, in) in float32/float64. Residual inits
        (``pissa``, ``nystrom``) compute every layer's start first and call the returned
        functions only when all layers succeeded. Default (factor pair): ``core = P Σ Qᵀ``
        split evenly, ``B = b P √Σ / √s``, ``A = √Σ Qᵀ a / √s``.
        """
        pair = self.factor_pair()
        if pair is None:
            return None
        p, sig, qh = torch.linalg.svd(core)  # k×k: negligible
        root = (sig / self.scaling).sqrt()
        new_b, new_a = (b @ p) * root, root[:, None] * (qh @ a)

        def write() -> None:
            with torch.no_grad():
                pair[0].copy_(new_b)
                pair[1].copy_(new_a)

        return write

    def update_start(
        self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
    ) -> Callable[[], None] | None:
        """A function that starts the adapter from the top-r SVD ``U diag(S) Vh`` of a full
        fine-tuning update (``init="lora_sb"``), or None if the method has no such start."""
        return None

    # -- PEFT formats other than LoraConfig (see ``io.py``)
    peft_type: ClassVar[str | None] = None  # PEFT's peft_type, e.g. "RANDLORA" (LoRA/DoRA: None)
    peft_suffixes: ClassVar[tuple[str, ...]] = ()  # per-layer tensor names in such files
    peft_shared: ClassVar[tuple[str, ...]] = ()  # tensors PEFT keeps once per model

    @classmethod
    def options_from_peft(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """This method's options from a PEFT ``adapter_config.json`` of type ``peft_type``
        (ConfigError naming an option rankwise cannot honour)."""
        raise ConfigError(f"method {cls.method!r} has no PEFT equivalent")

    @classmethod
    def peft_shared_state(cls, adapters: Mapping[str, Adapter]) -> dict[str, torch.Tensor]:
        """The model-wide tensors (names in ``peft_shared``) for saving ``adapters``
        (``{module path: adapter}``) in PEFT's format. Default: none."""
        return {}

    @classmethod
    def check_peft_shared(
        cls, shared: Mapping[str, torch.Tensor], adapters: Mapping[str, Adapter]
    ) -> str | None:
        """Why the model-wide tensors read from a PEFT file do not fit these (shape-only)
        adapters, or None. Called before anything is attached."""
        missing = [k for k in cls.peft_shared if k not in shared]
        return f"missing model-wide tensors {missing}" if missing else None

    def load_peft_shared(self, shared: Mapping[str, torch.Tensor]) -> None:
        """Take the model-wide tensors read from a PEFT file (after :meth:`check_peft_shared`)."""

    def unsavable_reason(self, format: str) -> str | None:
        """Why this adapter cannot be saved in ``format`` ("peft" or "rankwise"), or None
        (e.g. bases read from a PEFT file that the rankwise format would not hold)."""
        return None

    def peft_config(self) -> dict[str, Any] | None:
        """PEFT ``adapter_config.json`` fields for this adapter, or None if PEFT has none."""
        return None

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's names (suffix after the module path, adapter name removed)."""
        raise ConfigError(f"method {self.method!r} has no PEFT equivalent")

    def peft_to_native(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map PEFT-named tensors to this adapter's ``state_dict`` names and shapes."""
        raise ConfigError(f"method {self.method!r} has no PEFT equivalent")

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.config.rank}, scaling={self.scaling:g}"


# ----------------------------------------------------------------------------- registries

METHODS: Registry[type[Adapter]] = Registry(
    "adapter method", plugins=("rankwise.adapters.methods",)
)


class Initialiser(NamedTuple):
    """A registered ``init=``: ``scope`` is "layer" (once per adapter) or "model" (once)."""

    scope: str
    fn: Callable[..., None]


INITIALISERS: Registry[Initialiser] = Registry("initialiser", plugins=("rankwise.adapters.init",))


def register_method(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: make an :class:`Adapter` subclass available as ``method=name``."""

    def deco(cls: type[Adapter]) -> type[Adapter]:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise ConfigError(f"{cls!r} must subclass rankwise.adapters.base.Adapter")
        METHODS.register(name, cls)
        cls.method = name
        if not cls.__dict__.get("summary"):
            cls.summary = (inspect.getdoc(cls) or name).splitlines()[0]
        return cls

    return deco


def method_names() -> list[str]:
    """The registered adapter methods, sorted."""
    return METHODS.names()


def get_method(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``; ConfigError listing the known ones."""
    return METHODS.get(name)


def register_initialiser(
    name: str, *, scope: str = "layer"
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: make ``init=name`` call this function (``scope`` "layer" or "model")."""
    if scope not in ("layer", "model"):
        raise ConfigError(f"initialiser scope must be 'layer' or 'model', got {scope!r}")
    if name == "default":
        raise ConfigError("'default' is reserved for the method's own reset_parameters()")

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        INITIALISERS.register(name, Initialiser(scope, fn))
        return fn

    return deco


def initialiser_names() -> list[str]:
    """``"default"`` and the registered initialisers."""
    return ["default", *INITIALISERS.names()]


def get_initialiser(name: str) -> Initialiser | None:
    """The :class:`Initialiser` for ``init=name``; None for "default"; ConfigError if unknown."""
    if name == "default":
        return None
    if name not in INITIALISERS:
        raise ConfigError(f"unknown init {name!r}; available initialisers: {initialiser_names()}")
    return INITIALISERS.get(name)


__all__ = [
    "Adapter",
    "AdapterConfig",
    "METHODS",
    "INITIALISERS",
    "Initialiser",
    "normalise_rank",
    "LayerView",
    "view_for",
    "register_method",
    "get_method",
    "method_names",
    "register_initialiser",
    "get_initialiser",
    "initialiser_names",
]
