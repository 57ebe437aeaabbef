"""SVD- and data-driven initialisers: ``init="pissa" | "nystrom" | "eva" | "lora_sb"``.

Each is registered with :func:`~rankwise.adapters.base.register_initialiser` and receives
its typed options from ``attach(..., init=..., init_options={...})``. All four are
model-scope: they compute every layer's factors first and only then write them, so an
error (a bad option, a quantized or non-finite weight, a failing forward pass) leaves the
model exactly as it was; the engine then removes the half-attached adapter.

- ``pissa`` — principal singular values and vectors (PiSSA, Meng et al. 2024): with
  ``W ≈ U S Vᵀ`` (top r), ``B = U √S / √s``, ``A = √S Vᵀ / √s`` and the frozen base becomes
  the residual ``W - s·B A``. The model is unchanged; training starts on the principal part.
- ``nystrom`` — the same residual construction from a generalized Nyström sketch
  (NLoRA, 2025) instead of an SVD: ``W ≈ (WX)(YᵀWX)⁺(YᵀW)``. For ``lora``/``dora`` and
  ``nlora`` adapters (the latter's three factors ``B M A``).
- ``eva`` — Explained Variance Adaptation (Paischer et al. 2024): ``A`` = top right-singular
  vectors of each layer's input activations (incremental SVD over batches), ``B = 0``,
  ranks redistributed across layers by explained variance within a budget.
- ``lora_sb`` — LoRA-SB (Ponkshe et al. 2024): ``B, A`` from the SVD of the first full
  fine-tuning update, ``R`` so that ``s·B R A`` is its best rank-r approximation.

Residual inits (``pissa``, ``nystrom``) change the base weight. :func:`residual_to_lora`
undoes that: it restores the original weight and turns the adapter into a plain rank-2r
LoRA with the same function, which loads in PEFT on the original base model (PEFT's
``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, register_initialiser
from rankwise.errors import ConfigError, ModelError
from rankwise.linalg import SVDResult, nystrom_general, rsvd, truncated_svd

NIter = int | str

# ----------------------------------------------------------------------------- helpers


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _no_unknown(fn: Callable[..., None], unknown: Mapping[str, object]) -> None:
    """ConfigError for init_options the initialiser ``fn`` does not take, listing valid ones."""
    if unknown:
        valid = [
            p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
        ]
        raise ConfigError(
            f"init={fn.__name__!r}: unknown init_options {sorted(unknown)}; valid: {valid}"
        )


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _check_seed(seed: object, where: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where}: seed must be an integer, got {seed!r}")
    return seed


def _check_n_iter(n_iter: object, where: str) -> NIter:
    if n_iter == "auto" or (
        isinstance(n_iter, int) and not isinstance(n_iter, bool) and n_iter >= 0
    ):
        return n_iter
    raise ConfigError(f"{where}: n_iter must be 'auto' or an integer >= 0, got {n_iter!r}")


def float_weight(adapter: Adapter, where: str) -> torch.Tensor:
    """The layer's weight as a float ``(out, in)`` copy; ModelError if it cannot be used."""
    layer = adapter.layer
    if layer.is_quantized:
        raise ModelError(f"{where}: the base weight is quantized ({layer.weight.dtype})")
    w = layer.weight_matrix().detach()
    w = w.to(_work_dtype(w))
    if not bool(torch.isfinite(w).all()):
        raise ModelError(f"{where}: the base weight contains NaN or Inf")
    return w


@dataclass(frozen=True)
class SVDInitConfig(AdapterConfig):
    """Options of methods whose default init is an SVD of ``W`` (``svfit``, ``lora_xs``).

    ``n_iter``: power iterations (Krylov depth) of the randomized SVD, 4 by default
    (near-optimal rank-r error; ``"auto"``: until the leading singular values settle);
    ``exact``: dense SVD instead; ``seed``: the sketch's seed.
    """

    n_iter: int | str = 4
    exact: bool = False
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        _check_n_iter(self.n_iter, "n_iter")

    def svd_of(self, w: torch.Tensor) -> SVDResult:
        """Top-``r`` SVD of ``w`` with these options."""
        return weight_svd(w, self.rank, n_iter=self.n_iter, exact=self.exact, seed=self.seed)


def weight_svd(
    w: torch.Tensor,
    rank: int,
    *,
    n_iter: NIter = 4,
    exact: bool = False,
    seed: int = 0,
) -> SVDResult:
    """Top-``rank`` SVD of a weight ``(out, in)``: randomized (block Krylov) or exact.

    ``n_iter`` is passed to :func:`rankwise.linalg.rsvd` (default 4; "auto": until
    the leading singular values settle); ``exact=True`` uses a dense SVD (small matrices,
    references). Shared by ``svfit``, ``lora_xs`` and ``pissa``.
    """
    if exact:
        return truncated_svd(w, rank)
    U, S, Vh = rsvd(w, rank, n_iter=n_iter, generator=_generator(w.device, seed))[:3]
    return SVDResult(U, S, Vh)


def nystrom_split(
    w: torch.Tensor, rank: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q_B (out, r), K (r, r), Q_A (r, in))`` with ``Q_B K Q_A`` = the Nyström approximation.

    ``W ≈ C Z R`` with ``C = WX`` (out, r), ``Z = (YᵀWX)⁺`` (r, L), ``R = YᵀW`` (L, in)
    (:func:`rankwise.linalg.nystrom_general`, oversampled left sketch). Two thin QRs,
    ``C = Q_B T_B`` and ``(Z R)ᵀ = Q_Aᵀ T_A``, give orthonormal outer factors and a square
    core ``K = T_B T_Aᵀ``: NLoRA's three-matrix shape without any SVD.
    """
    C, Z, R = nystrom_general(w, rank, generator=_generator(w.device, seed))
    q_b, t_b = torch.linalg.qr(C)  # (out, r), (r, r)
    q_a, t_a = torch.linalg.qr((Z @ R).mT)  # (in, r), (r, r)
    return q_b, t_b @ t_a.mT, q_a.mT


def _not_for(adapter: Adapter, init: str, path: str, needs: str) -> ConfigError:
    return ConfigError(
        f"init={init!r} does not apply to {adapter.method!r} adapters ({path}); it needs {needs}"
    )


def _pair(adapter: Adapter, init: str, path: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The adapter's trainable ``(lora_B, lora_A)`` pair (:meth:`Adapter.factor_pair`)."""
    pair = adapter.factor_pair()
    if pair is None:
        raise _not_for(adapter, init, path, "trainable lora_B/lora_A factors")
    return pair


def _lowrank_start(
    adapter: Adapter, b: torch.Tensor, core: torch.Tensor, a: torch.Tensor, init: str, path: str
) -> Callable[[], None]:
    """The adapter's writer for ``ΔW = b core a`` (:meth:`Adapter.lowrank_start`)."""
    write = adapter.lowrank_start(b, core, a)
    if write is None:
        raise _not_for(adapter, init, path, "a method that can start from a rank-r product")
    return write


def _remember_initial(adapter: Adapter, b0: torch.Tensor, a0: torch.Tensor) -> None:
    """Keep ``ΔW₀ = s·b0 a0`` (not saved) so :func:`residual_to_lora` can undo the residual."""
    adapter.register_buffer("residual_B0", b0.detach().clone(), persistent=False)
    adapter.register_buffer("residual_A0", a0.detach().clone(), persistent=False)


# ----------------------------------------------------------------------------- pissa


@register_initialiser("pissa", scope="model")
def pissa(
    model: nn.Module,
    adapters: Mapping[str, Adapter],
    *,
    n_iter: NIter = 4,
    exact: bool = False,
    seed: int = 0,
    **unknown: object,
) -> None:
    """PiSSA: start from the top-r singular triplets of ``W``; the rest becomes the base.

    ``W ≈ U S Vh`` (randomized block-Krylov SVD with ``n_iter`` power iterations, default
    4: within 0.1% of the optimal rank-r error on SmolLM2, see ``bench/adapter_init.py``;
    ``"auto"`` iterates until the singular values settle; ``exact=True``: dense SVD);
    ``lora_B = U √S / √s``, ``lora_A = √S Vh / √s`` so ``s·B A = U S Vh``; the base weight
    is replaced by ``W - s·B A`` (computed in float32/float64, then cast to the weight's
    dtype, so a bf16 base loses precision here, as in PEFT). "PiSSA: Principal
    Singular Values and Singular Vectors Adaptation of Large Language Models", Meng et al.
    2024, eq. (2)–(4). Applies to methods whose
    :meth:`~rankwise.adapters.base.Adapter.lowrank_start` takes a rank-r product
    (``lora``, ``dora``, ``nlora``).
    """
    _no_unknown(pissa, unknown)
    where = "init='pissa'"
    n_iter = _check_n_iter(n_iter, where)
    seed = _check_seed(seed, where)
    plans = []
    for path, ad in adapters.items():
        w = float_weight(ad, f"{where} on {path}")
        U, S, Vh = weight_svd(w, ad.config.rank, n_iter=n_iter, exact=bool(exact), seed=seed)
        plans.append(_residual_plan(ad, w, U, torch.diag(S), Vh, "pissa", path))
    _write_residual(plans)


ResidualPlan = tuple[Adapter, Callable[[], None], torch.Tensor, torch.Tensor, torch.Tensor]


def _residual_plan(
    ad: Adapter, w: torch.Tensor, b: torch.Tensor, core: torch.Tensor, a: torch.Tensor,
    init: str, path: str,
) -> ResidualPlan:  # fmt: skip
    """Everything a residual start of ``ΔW₀ = b core a`` writes, computed (not yet written)."""
    write = _lowrank_start(ad, b, core, a, init, path)
    p0 = (b @ core) / ad.scaling  # s·p0 a = ΔW₀
    return ad, write, p0, a, w - p0 @ a * ad.scaling


def _write_residual(plans: list[ResidualPlan]) -> None:
    """Write each adapter's start and residual base (all computed beforehand)."""
    with torch.no_grad():
        for ad, write, p0, q0, w_res in plans:
            write()
            ad.layer.set_weight_matrix(w_res)
            _remember_initial(ad, p0.to(ad.dtype), q0.to(ad.dtype))


# ----------------------------------------------------------------------------- nystrom


@register_initialiser("nystrom", scope="model")
def nystrom(
    model: nn.Module, adapters: Mapping[str, Adapter], *, seed: int = 0, **unknown: object
) -> None:
    """Nyström residual init (NLoRA, 2025): like PiSSA, from two sketches instead of an SVD.

    With ``W ≈ Q_B K Q_A`` (:func:`nystrom_split`, one product with ``W`` and one with
    ``Wᵀ``, r columns each): an ``nlora`` adapter gets ``B = Q_B``, ``M = K / s``,
    ``A = Q_A`` ("NLoRA: Nyström-Initiated Low-Rank Adaptation", 2025); a ``lora``/``dora``
    adapter gets ``K``'s factors split evenly (an r×r SVD, ``K = P Σ Qᵀ``):
    ``B = Q_B P √Σ / √s``, ``A = √Σ Qᵀ Q_A / √s``. The base becomes ``W - s·ΔW₀``.
    """
    _no_unknown(nystrom, unknown)
    where = "init='nystrom'"
    seed = _check_seed(seed, where)
    plans = []
    for path, ad in adapters.items():
        w = float_weight(ad, f"{where} on {path}")
        q_b, k, q_a = nystrom_split(w, ad.config.rank, seed=seed)
        plans.append(_residual_plan(ad, w, q_b, k, q_a, "nystrom", path))
    _write_residual(plans)


# ----------------------------------------------------------------------------- undo residual


def has_residual_init(adapter: Adapter) -> bool:
    """Whether ``adapter`` was started by a residual init (its base weight is ``W - s·ΔW₀``)."""
    return hasattr(adapter, "residual_B0")


def residual_unconvertible(adapter: Adapter) -> str | None:
    """Why :func:`residual_to_lora` cannot convert this adapter's method, or None."""
    if adapter.lowrank_factors() is not None:
        return None
    return (
        f"residual_to_lora converts adapters whose update is s·P Q with P, Q what they "
        f"train (lora, nlora), not {adapter.method!r} (a DoRA magnitude has no plain-LoRA "
        "equivalent)"
    )


@torch.no_grad()
def residual_to_lora(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Undo a residual init: original base weights back, the adapter as a plain rank-2r LoRA.

    After ``init="pissa"``/``"nystrom"`` the base holds ``W_res = W - s·P₀Q₀`` and the
    adapter computes ``s·P Q`` (``P₀, Q₀`` its initial factors). The same function on the
    original ``W`` is ``W + s·(P Q - P₀ Q₀) = W + s·[P, P₀] [Q; -Q₀]``: a LoRA of rank 2r
    with ``alpha`` chosen to keep ``s``. This rewrites the model in place (adapter ``name``
    becomes a ``lora`` adapter), after which ``save_adapter(..., format="peft")`` writes an
    adapter PEFT loads on the *original* base (PEFT's ``convert_pissa_to_lora``). Returns
    ``{layer path: new rank}``. Raises ConfigError if ``name`` was not residual-initialised
    in this session (the initial factors are kept in memory only), ModelError if merged.
    """
    from rankwise.adapters.inject import adapted_layers, attach, delete

    layers = {p: ly for p, ly in adapted_layers(model).items() if name in ly.adapters}
    if not layers:
        raise ConfigError(f"no adapter named {name!r} in this model")
    plans = {}
    for path, layer in layers.items():
        ad = layer.adapters[name]
        if name in layer.merged:
            raise ModelError(f"adapter {name!r} is merged into {path}; unmerge first")
        if reason := residual_unconvertible(ad):
            raise ConfigError(f"{path}: {reason}")
        if not has_residual_init(ad):
            raise ConfigError(
                f"adapter {name!r} on {path} has no residual init to undo (init was not "
                "'pissa'/'nystrom', or it was loaded from disk)"
            )
        p, q = ad.lowrank_factors()
        b = torch.cat([p, ad.residual_B0], 1).float()  # (out, 2r)
        a = torch.cat([q, -ad.residual_A0], 0).float()  # (2r, in)
        w0 = float_weight(ad, path) + ad.scaling * (
            ad.residual_B0.double() @ ad.residual_A0.double()
        )
        plans[path] = (ad, b, a, w0, name in layer.active)
    first = next(iter(plans.values()))[0]
    cfg, r2 = first.config, 2 * first.config.rank
    alpha = first.scaling * (math.sqrt(r2) if cfg.use_rslora else r2)
    for ad, _, _, w0, _ in plans.values():
        ad.layer.set_weight_matrix(w0)
    active = all(v[4] for v in plans.values())
    delete(model, name)
    targets = [re.compile(re.escape(p)) for p in plans]
    attach(
        model, "lora", targets, name, rank=r2, alpha=alpha, dropout=cfg.dropout,
        use_rslora=cfg.use_rslora, activate=active,
    )  # fmt: skip
    new = adapted_layers(model)
    for path, (_, b, a, _, _) in plans.items():
        ad = new[path].adapters[name]
        ad.lora_B.copy_(b)
        ad.lora_A.copy_(a)
    return {p: r2 for p in plans}


# ----------------------------------------------------------------------------- batches


def _batches(inputs: object, batch_size: int, where: str) -> Iterator[object]:
    """Yield model inputs: a LongTensor ``(N, L)`` is split into ``batch_size`` rows;
    an iterable yields tensors or dicts of tensors as they are."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dtype not in (torch.long, torch.int32) or inputs.dim() != 2 or not len(inputs):
            raise ConfigError(
                f"{where}: inputs must be a non-empty LongTensor (N, L) of token ids or an "
                f"iterable of batches; got {inputs.dtype} of shape {tuple(inputs.shape)}"
            )
        yield from inputs.split(batch_size)
        return
    if (
        inputs is None
        or isinstance(inputs, (str, bytes, Mapping))
        or not isinstance(inputs, Iterable)
    ):
        raise ConfigError(
            f"{where}: init_options needs 'inputs' (a LongTensor (N, L) of token ids or an "
            f"iterable of batches), got {type(inputs).__name__}"
        )
    yield from inputs


def _call(model: nn.Module, batch: object) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def _check_batch_size(batch_size: object, where: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class _ModeGuard:
    """Put every module in eval/train mode and restore each one's own flag afterwards."""

    def __init__(self, model: nn.Module, training: bool) -> None:
        self.model, self.training = model, training

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.training)

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


# ----------------------------------------------------------------------------- eva


class _Stream:
    """Incremental top-k right singular vectors of a stream of row blocks.

    Keeps ``S Vh`` (k, d) only: the SVD of ``[diag(S) Vh; X]`` has the same singular
    values and right vectors as the SVD of ``[A; X]`` where ``A = U S Vh`` (``U`` has
    orthonormal columns), so left vectors, which grow with the row count, are never
    stored. ``energy`` is ``‖all rows‖²_F`` (exact), the denominator of explained variance.
    With ``center``, rows are centred by the running mean with the usual correction row
    (incremental PCA, Ross et al. 2008).
    """

    def __init__(self, k: int, *, center: bool, n_iter: NIter, seed: int) -> None:
        self.k, self.center, self.n_iter, self.seed = k, center, n_iter, seed
        self.sv: torch.Tensor | None = None  # (k', d) = diag(S) Vh
        self.energy = 0.0
        self.count = 0
        self.mean: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (n_b, d)."""
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        nb = x.shape[0]
        if not nb:
            return
        if not bool(torch.isfinite(x).all()):
            raise ModelError("init='eva': a layer input contains NaN or Inf")
        if self.center:
            mu = x.mean(0)
            if self.count:  # the mean shift between the old rows and the new ones
                n = self.count
                fix = math.sqrt(n * nb / (n + nb)) * (self.mean - mu)
                x = torch.cat([x - mu, fix[None]])
                self.mean = self.mean + (mu - self.mean) * (nb / (n + nb))
            else:
                x, self.mean = x - mu, mu
        self.count += nb
        self.energy += float(x.double().square().sum())
        stack = x if self.sv is None else torch.cat([self.sv, x])  # (k' + n_b, d)
        k = min(self.k, *stack.shape)
        gen = _generator(x.device, self.seed)
        _, S, Vh = rsvd(stack, k, n_iter=self.n_iter, generator=gen)[:3]
        self.sv = S[:, None] * Vh

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Vh (k', d) unit rows, explained variance ratio (k',))``."""
        S = self.sv.norm(dim=1)
        return self.sv / S.clamp_min(1e-30)[:, None], S.double().square() / max(self.energy, 1e-300)


def _redistribute(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """The ``budget`` components with the largest explained variance ratio, as per-layer counts."""
    pool = [
        (-float(v), order, i, path)
        for order, (path, vals) in enumerate(ratios.items())
        for i, v in enumerate(vals)
    ]
    pool.sort()
    counts = dict.fromkeys(ratios, 0)
    for _, _, _, path in pool[:budget]:
        counts[path] += 1
    return counts


@register_initialiser("eva", scope="model")
def eva(
    model: nn.Module,
    adapters: Mapping[str, Adapter],
    *,
    inputs: object = None,
    rho: float = 2.0,
    batch_size: int = 8,
    center: bool = False,
    n_iter: NIter = 4,
    seed: int = 0,
    **unknown: object,
) -> None:
    """EVA: ``A`` = top right-singular vectors of each layer's inputs, ranks by explained variance.

    Runs ``inputs`` through the model (no grad, eval mode) with a hook on every adapted
    layer; each layer keeps an incremental SVD of its input activations (:class:`_Stream`,
    ``rsvd`` on ``[diag(S) Vh; X_batch]``, never all activations). Layers fed the same
    tensor (q/k/v, gate/up) share one SVD. Then the explained variance ratios of all
    layers' components compete for a budget of ``round(L · r / rho)`` components
    (L layers); each layer keeps its winners: ``A[:k] = Vh[:k]``, ``B = 0``.

    Ranks: the engine gives every layer of one adapter the same shape, so ``rank`` is the
    per-layer *maximum* and the average is ``rank / rho`` (PEFT's EVA with ``r=8, rho=2`` ≈
    rankwise's ``rank=16, rho=2``; ``rho=1`` keeps the rank everywhere). A layer granted ``k < r``
    components has rows ``k:`` of ``A`` (and columns of ``B``) set to zero; with both
    factors zero those components get zero gradient and stay zero under gradient
    training (weight decay included), so the layer trains at rank k, and the adapter is an
    ordinary LoRA (saved and loaded as one). "One Initialization to Rule them All:
    Fine-tuning via Explained Variance Adaptation", Paischer et al. 2024, Sec. 3.

    Options: ``inputs`` (LongTensor (N, L) split into ``batch_size`` rows, or an iterable of
    batches / dicts with ``attention_mask`` honoured), ``rho >= 1``, ``center`` (subtract
    the running mean first, as PEFT's incremental PCA does), ``n_iter`` (power iterations
    of each batch's randomized SVD; 4 like PEFT's ``svd_lowrank``, since every batch
    refines the previous estimate), ``seed``.
    """
    _no_unknown(eva, unknown)
    where = "init='eva'"
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 1.0:
        raise ConfigError(f"{where}: rho must be a number >= 1, got {rho!r}")
    batch_size = _check_batch_size(batch_size, where)
    n_iter = _check_n_iter(n_iter, where)
    seed = _check_seed(seed, where)
    pairs = {path: _pair(ad, "eva", path) for path, ad in adapters.items()}
    for path, ad in adapters.items():
        if ad.layer.kind not in ("linear", "transposed_linear"):
            raise ConfigError(
                f"{where}: {path} is a {ad.layer.kind} layer; EVA needs linear layers "
                "(its input rows are the activations)"
            )
    streams = {
        p: _Stream(min(2 * ad.config.rank, ad.layer.in_features), center=bool(center),
                   n_iter=n_iter, seed=seed)
        for p, ad in adapters.items()
    }  # fmt: skip
    alias: dict[str, str] = {}  # path -> path whose input tensor it shares
    state: dict[str, Any] = {"mask": None, "last": None, "first": True}

    def hook(path: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = state["last"]
            if last is not None and last[1] is x:
                if state["first"]:
                    alias[path] = alias.get(last[0], last[0])
                state["last"] = (path, x)
                return
            state["last"] = (path, x)
            if path in alias:
                return
            rows = x.detach().reshape(-1, x.shape[-1])
            mask = state["mask"]
            if mask is not None and mask.numel() == rows.shape[0]:
                rows = rows[mask.reshape(-1).bool()]
            streams[path].update(rows)

        return fn

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in adapters]
    seen = 0
    try:
        with torch.no_grad(), _ModeGuard(model, False):
            for batch in _batches(inputs, batch_size, where):
                state["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                state["last"] = None
                _call(model, batch)
                state["first"] = False
                seen += 1
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
    if not seen:
        raise ConfigError(f"{where}: inputs yielded no batches")
    missing = [p for p in adapters if p not in alias and streams[p].sv is None]
    if missing:
        raise ModelError(f"{where}: layers {missing[:3]} were never called by the model's forward")
    found = {p: streams[alias.get(p, p)].result() for p in adapters}
    ratios = {p: ratio[: adapters[p].config.rank] for p, (_, ratio) in found.items()}
    budget = max(1, round(sum(ad.config.rank for ad in adapters.values()) / float(rho)))
    counts = _redistribute(ratios, budget)
    with torch.no_grad():
        for path in adapters:
            vh, k = found[path][0], counts[path]
            b, a = pairs[path]
            a.zero_()
            a[:k].copy_(vh[:k])
            b.zero_()


def eva_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Per-layer rank an ``eva``-initialised adapter trains at (non-zero rows of ``A``)."""
    from rankwise.adapters.inject import adapted_layers

    out = {}
    for path, layer in adapted_layers(model).items():
        if name in layer.adapters:
            a = layer.adapters[name].lora_A
            out[path] = int((a.detach().abs().sum(1) > 0).sum())
    return out


# ----------------------------------------------------------------------------- lora_sb


@register_initialiser("lora_sb", scope="model")
def lora_sb(
    model: nn.Module,
    adapters: Mapping[str, Adapter],
    *,
    inputs: object = None,
    lr: float = 1e-4,
    optimizer: str = "adam",
    batch_size: int = 8,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    n_iter: NIter = 4,
    exact: bool = False,
    seed: int = 0,
    **unknown: object,
) -> None:
    """LoRA-SB: ``B, A`` from the first full fine-tuning update, ``R`` its best rank-r fit.

    Averages the gradient ``G`` of the loss wrt every adapted weight over ``inputs``
    (``loss_fn(model, batch)``; default: the causal-LM loss ``model(ids, labels=ids)``),
    forms the first update of full fine-tuning, ``ΔW₁ = -lr·sign(G)`` (Adam's first step;
    ``optimizer="sgd"``: ``-lr·G``), and with its top-r SVD ``U S Vh`` sets
    ``B = U / √s``, ``A = Vh / √s``, ``R = diag(S)``. Then ``s·B R A`` is the best rank-r
    approximation of ``ΔW₁`` and the update ``s·B g_R A`` that training ``R`` induces is the
    orthogonal projection ``U Uᵀ G V Vᵀ`` of the full gradient, independent of ``alpha``
    ("Initialization using Update Approximation is a Silver Bullet...", Ponkshe et al.
    2024, Sec. 4). The model starts one (approximate) full step away from the base, as in
    the paper. Applies to methods that define
    :meth:`~rankwise.adapters.base.Adapter.update_start` (``lora_sb``). ``n_iter``/``exact``/
    ``seed`` choose the SVD as for ``pissa``. Gradients are averaged in float32 (float64
    for a float64 model); the model's ``requires_grad`` flags and ``.grad`` fields are
    left as they were.
    """
    _no_unknown(lora_sb, unknown)
    where = "init='lora_sb'"
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ConfigError(f"{where}: lr must be a positive number, got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ConfigError(f"{where}: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    batch_size = _check_batch_size(batch_size, where)
    n_iter = _check_n_iter(n_iter, where)
    seed = _check_seed(seed, where)
    for path, ad in adapters.items():
        if type(ad).update_start is Adapter.update_start:  # the method has no such start
            raise _not_for(ad, "lora_sb", path, "a method with an update start (lora_sb)")
        float_weight(ad, f"{where} on {path}")
    grads = _average_gradients(model, adapters, inputs, batch_size, loss_fn, where)
    plans = []
    for path, ad in adapters.items():
        g = grads[path]
        update = -lr * (torch.sign(g) if optimizer == "adam" else g)
        if not bool(update.any()):
            raise ModelError(f"{where}: the loss does not depend on {path} (zero gradient)")
        U, S, Vh = weight_svd(update, ad.config.rank, n_iter=n_iter, exact=bool(exact), seed=seed)
        plans.append(ad.update_start(U, S, Vh))
    for write in plans:
        write()


def _average_gradients(
    model: nn.Module,
    adapters: Mapping[str, Adapter],
    inputs: object,
    batch_size: int,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None,
    where: str,
) -> dict[str, torch.Tensor]:
    """Mean over batches of ``∂loss/∂W`` (out, in) for each adapted layer; the model's
    ``requires_grad`` flags and ``.grad`` fields are restored afterwards."""
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    weights = {path: ad.layer.weight for path, ad in adapters.items()}
    sums: dict[str, torch.Tensor] = {}
    n = 0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        for batch in _batches(inputs, batch_size, where):
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            elif isinstance(batch, Mapping):
                loss = model(**batch).loss
            else:
                loss = model(batch, labels=batch).loss
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ConfigError(f"{where}: the loss must be a scalar tensor, got {loss!r}")
            if not bool(torch.isfinite(loss)):
                raise ModelError(f"{where}: the loss is {float(loss)} on batch {n}")
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (path, w), g in zip(weights.items(), grads, strict=True):
                g = torch.zeros_like(w) if g is None else g
                gm = _as_matrix(adapters[path], g).to(_work_dtype(g))
                sums[path] = gm if path not in sums else sums[path] + gm
            n += 1
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
    if not n:
        raise ConfigError(f"{where}: inputs yielded no batches")
    return {p: g / n for p, g in sums.items()}


def _as_matrix(adapter: Adapter, g: torch.Tensor) -> torch.Tensor:
    """A gradient in the weight's storage layout as the ``(out, in)`` matrix."""
    layer = adapter.layer
    if layer.kind in ("transposed_linear", "embedding"):
        return g.t()
    return g.reshape(layer.out_features, layer.in_features)


__all__ = [
    "SVDInitConfig",
    "eva",
    "eva_ranks",
    "float_weight",
    "has_residual_init",
    "residual_unconvertible",
    "lora_sb",
    "nystrom",
    "nystrom_split",
    "pissa",
    "residual_to_lora",
    "weight_svd",
]
