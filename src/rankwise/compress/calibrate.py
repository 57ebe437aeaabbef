"""Calibration: stream a few batches of text through a model and keep, per linear layer,
the statistics compression methods need — never the activations themselves.

For every compressible ``nn.Linear`` with input ``x`` (``in_features`` wide) it accumulates

- ``gram``: ``Σ x xᵀ`` over calibration tokens, shape ``(in, in)``, float64 (SVD-LLM 2024
  whitening, least-squares updates);
- ``abs_sum``: ``Σ |x|`` per input channel, shape ``(in,)``, float64 (ASVD 2023 scaling;
  ``abs_mean = abs_sum / tokens``);
- ``fisher_rows`` (statistic ``"fisher"``): ``Σ_batches Σ_j (∂L/∂W_ij)²`` per output row,
  shape ``(out,)``, float64, from a backward pass of the language-model loss of each
  calibration batch (Fisher-weighted SVD, Hsu et al. 2022);
- ``out_grad_sq`` (statistic ``"out_grad"``): ``Σ_t ‖∂L/∂y_t‖²`` over calibration tokens of
  the layer's output gradients, a float, from the same backward pass. Divided by tokens
  and output width it is the layer's *sensitivity* (the diagonal empirical Fisher of its
  outputs, averaged): a second-order estimate of the loss increase per unit of squared
  output error, which the ``fisher`` rank allocator uses to compare layers;
- ``out_grad_sketch`` (statistic ``"out_fisher"``): ``Z = Σ_b Ω_b G_b``, shape
  ``(FISHER_WINDOW, out)``, float64, where ``G_b`` (tokens × out) holds batch ``b``'s output
  gradients ``∂L/∂y_t`` and ``Ω_b`` (window × tokens) i.i.d. standard normals (seed
  :data:`FISHER_SEED`, one draw per batch shared by all layers). ``E[ZᵀZ] = window · Σ_t
  g_t g_tᵀ``, so the rows of ``Z / √tokens`` are a window of "gradients" whose empirical
  Fisher ``(1/window) ZᵀZ / tokens`` is an unbiased estimate of the layer's full (not
  diagonal) per-token output Fisher ``F = (1/T) Σ_t g_t g_tᵀ`` — kept at ``window × out``
  numbers instead of ``out²`` and handed to :class:`~rankwise.linalg.MFAC` by
  :meth:`LayerStats.output_fisher`. The ``mfac`` rank allocator reads it. (Per-sequence
  sums of gradients would not do: the truncation error of a direction changes sign from
  token to token, and the sums' cross-token terms bias the estimate.)

Gram products are computed in float32 per batch and accumulated in float64.

Layers fed the same tensor (``q/k/v_proj``, ``gate/up_proj``) share one Gram matrix: it is
computed once per batch and the :class:`LayerStats` objects point at the same tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.data import token_blocks, tokenize_stream
from rankwise.errors import ConfigError, DataError, ModelError, ShapeError
from rankwise.linalg import MFAC
from rankwise.progress import Bar

STATISTICS = ("gram", "abs_mean", "fisher", "out_grad", "out_fisher")
FISHER_WINDOW = 64  # sketched output gradients per layer (relative noise of xᵀFx: √(2/64) ≈ 18%)
FISHER_SEED = 0  # seed of the Gaussian token sketch Ω_b
FISHER_DAMP = 1e-3  # M-FAC dampening λ, relative to the mean diagonal of the sketched Fisher
CROSS_DAMP = 1e-2  # ridge of the closed-loop output correction, relative to the mean diagonal of Ĝ


@dataclass(kw_only=True)
class LayerStats:
    """Streaming statistics of one linear layer's inputs (and, optionally, its gradients).

    Fields are keyword-only (``LayerStats(out_features=..., in_features=..., gram=...)``), so
    the layer's shape cannot be given in the wrong order.
    """

    out_features: int
    in_features: int
    gram: torch.Tensor | None = None  # (in, in) float64, Σ x xᵀ
    abs_sum: torch.Tensor | None = None  # (in,) float64, Σ |x|
    fisher_rows: torch.Tensor | None = None  # (out,) float64, Σ row-wise squared gradients
    out_grad_sq: float | None = None  # Σ_t ‖∂L/∂y_t‖² over calibration tokens
    out_grad_sketch: torch.Tensor | None = None  # (FISHER_WINDOW, out) float64, Σ_b Ω_b G_b
    cross: torch.Tensor | None = None  # (in, in) float64, Σ x x̂ᵀ: dense-model input × actual input
    tokens: int = 0
    grad_tokens: int = 0  # tokens the gradient statistics summed over (0: the same as ``tokens``)

    @property
    def _gradient_tokens(self) -> int:
        return self.grad_tokens or self.tokens

    def target_weight(self, weight: torch.Tensor, *, damp: float = CROSS_DAMP) -> torch.Tensor:
        """The weight that best maps the inputs this layer actually gets (``x̂``, after the
        compressed blocks before it) to the outputs the dense model produced (``W x``):
        ``argmin_M Σ ‖W x − M x̂‖² = W C Ĝ⁻¹`` with ``C = Σ x x̂ᵀ`` (:attr:`cross`) and
        ``Ĝ = Σ x̂ x̂ᵀ`` (:attr:`gram`), written ``W + W (C − Ĝ)(Ĝ + λI)⁻¹`` so that directions
        the calibration inputs never excite keep ``W`` (``λ = damp ·`` mean diagonal of ``Ĝ``).
        Then ``‖W x − Ŵ x̂‖² = const + ‖(M − Ŵ) x̂‖²``: compressing ``M`` in the ``Ĝ``-whitened
        norm also corrects the error of the blocks before. ``weight`` itself without
        :attr:`cross` (open-loop, or block 0 where ``C = Ĝ``)."""
        if self.cross is None or self.gram is None:
            return weight
        w = weight.to(torch.float64)
        from rankwise.compress.base import damped_cholesky  # base imports this module

        chol = damped_cholesky(self.gram, damp=damp)
        shift = w @ (self.cross - self.gram)  # (out, in)
        return w + torch.cholesky_solve(shift.T, chol).T

    @property
    def sensitivity(self) -> float | None:
        """Mean squared loss gradient per output entry (``None`` without ``"out_grad"``)."""
        if self.out_grad_sq is None or self._gradient_tokens == 0:
            return None
        return self.out_grad_sq / (self._gradient_tokens * self.out_features)

    def output_fisher(self) -> MFAC:
        """The layer's output Fisher ``F ≈ λI + (1/m) Zᵀ Z / T`` as an :class:`MFAC` over the
        window ``Z / √T`` (``λ`` = :data:`FISHER_DAMP` × its mean diagonal). Raises
        ConfigError without the ``"out_fisher"`` statistic."""
        if self.out_grad_sketch is None or self._gradient_tokens == 0:
            raise ConfigError("these statistics hold no output-gradient sketch; calibrate with 'out_fisher'")
        window = self.out_grad_sketch / self._gradient_tokens**0.5
        mean_diag = float(window.square().sum()) / (window.shape[0] * self.out_features)
        return MFAC(window, damp=FISHER_DAMP * mean_diag if mean_diag > 0 else FISHER_DAMP)

    def direction_sensitivity(self, directions: torch.Tensor) -> torch.Tensor:
        """``uᵀ F u / ‖u‖²`` for every column ``u`` of ``directions`` (out, k): the loss
        curvature along each output direction (``(k,)`` float64; see :meth:`output_fisher`)."""
        U = directions.to(torch.float64)
        return self.output_fisher().quadratic_form(U.T) / U.square().sum(0).clamp(min=1e-300)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean absolute activation per input channel, shape ``(in,)``."""
        if self.abs_sum is None or self.tokens == 0:
            raise ConfigError("these statistics hold no activation scales; calibrate with 'abs_mean'")
        return self.abs_sum / self.tokens


@dataclass
class Calibration:
    """Per-layer statistics from one calibration run, and how that run was made."""

    stats: dict[str, LayerStats]
    tokens: int
    seq_len: int
    seconds: float
    text_fingerprint: str  # hash of the calibration token ids
    collected: tuple[str, ...] = field(default_factory=tuple)
    mode: str = "open-loop"  # or "closed-loop" (statistics from a ClosedLoopStats walk)
    gradient_tokens: int | None = None  # the gradient statistics' share of ``tokens``, if any

    def recipe(self) -> dict:
        gradients = {} if self.gradient_tokens is None else {"gradient_tokens": self.gradient_tokens}
        return gradients | {
            "mode": self.mode,
            "tokens": self.tokens,
            "seq_len": self.seq_len,
            "statistics": list(self.collected),
            "token_fingerprint": self.text_fingerprint,
            "seconds": round(self.seconds, 3),
        }


class _InputStatistics:
    """Forward pre-hooks accumulating ``gram`` / ``abs_sum`` of each layer's input into its
    :class:`LayerStats`. Layers fed the same tensor object on the first batch share one set of
    tensors (the statistics are computed once per batch)."""

    def __init__(self, layers: dict[str, nn.Linear], stats: dict[str, LayerStats], *, gram: bool, abs_mean: bool) -> None:
        self.layers, self.stats, self.gram, self.abs_mean = layers, stats, gram, abs_mean
        self.owner_of: dict[str, str] = {}  # layer -> the layer whose (shared) statistics it uses
        self.seen: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (ref, first layer), per batch
        self.first_batch = True

    def attach(self) -> list:
        return [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]

    def start_batch(self) -> None:
        self.seen.clear()

    def end_batch(self, tokens: int) -> None:
        self.first_batch = False
        for name in self.layers:
            self.stats[name].tokens += tokens

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in self.owner_of and self.owner_of[name] != name:
                return  # shares its input with an earlier layer, already counted
            x = args[0]  # the identity of this object tells which layers share an input
            hit = self.seen.get(id(x))
            s = self.stats[name]
            if self.first_batch and hit is not None and hit[0]() is x:
                owner = hit[1]
                self.owner_of[name] = owner
                s.gram, s.abs_sum = self.stats[owner].gram, self.stats[owner].abs_sum
                return
            self.owner_of[name] = name
            self.seen[id(x)] = (weakref.ref(x), name)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            abs_sum = x2.abs().sum(0, dtype=torch.float64)
            if not torch.isfinite(abs_sum).all():
                raise ShapeError(
                    f"calibration activations entering {name!r} contain NaN/Inf; the model's "
                    "weights or dtype are broken (load it in float32)"
                )
            if self.abs_mean:
                s.abs_sum = abs_sum if s.abs_sum is None else s.abs_sum.add_(abs_sum)
            if self.gram:
                g = (x2.T @ x2).to(torch.float64)  # (in, in)
                s.gram = g if s.gram is None else s.gram.add_(g)

        return hook


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's compressible linear layers, by qualified name.

    Every ``nn.Linear`` except the output head when it is tied to (or is) an embedding:
    factorising a tied head would untie it and add parameters. Raises
    :class:`~rankwise.errors.ModelError` when the model has none.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and id(m.weight) not in embedding_weights
    }
    if not layers:
        raise ModelError(
            f"model {type(model).__name__} has no linear layers to compress "
            "(only nn.Linear modules outside the embeddings can be factorised)"
        )
    return layers


def spread_blocks(ids: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of the rows of ``ids`` (at least one, at most all), evenly spaced from the
    first: a subsample drawn from the whole calibration stream rather than its first documents."""
    count = min(max(count, 1), len(ids))
    return ids[torch.linspace(0, len(ids) - 1, count).round().long()]


def calibration_blocks(tokenizer, texts: Sequence[str], tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``tokens`` calibration tokens as blocks ``(tokens // seq_len, seq_len)``;
    a clear error when the text is shorter than asked."""
    if tokens < seq_len:
        raise ConfigError(
            f"calib_tokens={tokens} is less than one sequence of seq_len={seq_len}; "
            "raise calib_tokens or lower seq_len"
        )
    available = len(tokenize_stream(tokenizer, texts, max_tokens=tokens))
    if available < tokens:
        raise DataError(
            f"calibration text is too short: {available} tokens, but calib_tokens={tokens}; "
            "lower calib_tokens or give more calibration text"
        )
    return token_blocks(tokenizer, texts, seq_len=seq_len, max_tokens=tokens)


class _GradientStatistics:
    """Hooks accumulating the gradient statistics (``fisher``, ``out_grad``, ``out_fisher``) of
    each layer into its :class:`LayerStats`: output-gradient hooks registered by a forward hook
    (only on outputs autograd tracks), and the weight gradients' row sums read per batch."""

    def __init__(self, layers: dict[str, nn.Linear], stats: dict[str, LayerStats], statistics: Sequence[str]) -> None:
        self.layers, self.stats = layers, stats
        self.fisher, self.out_grad, self.sketch = ("fisher" in statistics, "out_grad" in statistics, "out_fisher" in statistics)
        self.rng = torch.Generator().manual_seed(FISHER_SEED)
        self.omega: torch.Tensor | None = None  # this batch's Ω (window, tokens), drawn once

    def attach(self) -> list:
        if not (self.out_grad or self.sketch):
            return []
        return [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def start_batch(self) -> None:
        self.omega = None

    def end_batch(self, tokens: int) -> None:
        for s in self.stats.values():
            s.grad_tokens += tokens
        if not self.fisher:
            return
        for name, m in self.layers.items():
            rows = m.weight.grad.to(torch.float64).pow(2).sum(1)  # (out,)
            s = self.stats[name]
            s.fisher_rows = rows if s.fisher_rows is None else s.fisher_rows.add_(rows)
            m.weight.grad = None

    def _hook(self, name: str):
        def grad_hook(grad: torch.Tensor) -> None:
            s = self.stats[name]
            if self.out_grad:
                sq = float(grad.detach().to(torch.float64).pow(2).sum())
                s.out_grad_sq = sq if s.out_grad_sq is None else s.out_grad_sq + sq
            if self.sketch:
                g = grad.detach().reshape(-1, grad.shape[-1]).float()  # (tokens, out)
                if self.omega is None:
                    self.omega = torch.randn(FISHER_WINDOW, g.shape[0], generator=self.rng)
                z = (self.omega @ g).to(torch.float64)  # (window, out)
                s.out_grad_sketch = z if s.out_grad_sketch is None else s.out_grad_sketch.add_(z)

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(grad_hook)

        return hook


def _loss(model: nn.Module, out) -> torch.Tensor:
    if getattr(out, "loss", None) is None:
        raise ModelError(
            f"gradient statistics (fisher, out_grad, out_fisher) need a language-model loss; "
            f"{type(model).__name__} returned none (use a causal LM, or a method "
            "and allocation without gradients)"
        )
    return out.loss


def _checkpoint_blocks(model: nn.Module, layers: dict[str, nn.Linear]) -> list[DecoderBlock] | None:
    """The decoder blocks a block-by-block backward can run through: every layer is inside one
    of them or is the output head (computed after the last). ``None`` otherwise."""
    try:
        blocks = decoder_blocks(model, layers)
    except ModelError:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = {n for b in blocks for n in b.layers}
    return blocks if all(n in inside or m is head for n, m in layers.items()) else None


def blocks_hold_every_layer(model: nn.Module, layers: dict[str, nn.Linear]) -> bool:
    """Whether every one of ``layers`` sits inside the model's decoder blocks (a walk over the
    blocks then sees them all)."""
    try:
        blocks = decoder_blocks(model, layers)
    except ModelError:
        return False
    return sum(len(b.layers) for b in blocks) == len(layers)


def _as_positional(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's call with its hidden states first, positionally (some models pass them by name)."""
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs)
        args = (kwargs.pop("hidden_states"), *args)
    return args, kwargs


def _backward_by_block(model: nn.Module, batch: torch.Tensor, blocks: list[DecoderBlock]) -> None:
    """The language-model loss's backward pass on ``batch`` with one decoder block's activations
    held at a time (gradient checkpointing; the whole graph of SmolLM2 at 512 tokens is 0.6 GB).

    A forward runs the blocks without autograd, keeping each block's inputs (one batch's hidden
    states per block), and tracks only what follows the last block (norm, head, loss); its
    backward gives the gradient at the last block's output. Then, last block first, each block
    runs again from its kept inputs with autograd and the gradient flows back through it. The
    same operations on the same values in the same order: every gradient equals a single
    backward pass's bit for bit (tested). Hooks on layer outputs fire in the re-runs."""
    kept: list[tuple[tuple, dict]] = []
    tail: dict[str, torch.Tensor] = {}

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kept.append(_as_positional(args, kwargs))
        torch.set_grad_enabled(False)

    def leave(module: nn.Module, args: tuple, kwargs: dict, out):
        torch.set_grad_enabled(True)
        if module is not blocks[-1].module:
            return None
        tail["h"] = _block_output(out).detach().requires_grad_(True)  # autograd starts here
        return (tail["h"], *out[1:]) if isinstance(out, tuple | list) else tail["h"]

    handles = [b.module.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    handles += [b.module.register_forward_hook(leave, with_kwargs=True) for b in blocks]
    try:
        with torch.enable_grad():
            out = model(input_ids=batch, labels=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(True)
    _loss(model, out).backward()
    grad = tail.pop("h").grad
    del out
    for block, (args, kwargs) in zip(reversed(blocks), reversed(kept), strict=True):
        h = args[0].detach().requires_grad_(True)
        with torch.enable_grad():
            y = _block_output(block.module(h, *args[1:], **kwargs))
        torch.autograd.backward(y, grad)
        grad = h.grad
    kept.clear()


class _StopAfter(Exception):
    """Raised after the last block when nothing downstream is needed."""


def _stop_after(module: nn.Module, args: tuple, out) -> None:
    raise _StopAfter


def release_memory() -> None:
    """Hand freed memory back to the operating system: collect garbage, then (glibc) trim the
    heap. Freed tensors otherwise stay in the C allocator's free lists, where they count in the
    process's resident memory (a backward pass left 0.8 GB there on SmolLM2)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows): nothing to trim
        pass


def calibrate(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    tokens: int = 4096,
    seq_len: int = 512,
    batch_size: int = 4,
    statistics: Sequence[str] = ("gram", "abs_mean"),
    layers: dict[str, nn.Linear] | None = None,
    gradient_tokens: int | None = None,
    progress: bool = False,
) -> Calibration:
    """Run ``tokens`` calibration tokens (blocks of ``seq_len``) through ``model`` and return
    per-layer :class:`LayerStats` for ``layers`` (default: :func:`linear_layers`).

    ``statistics`` is any subset of ``("gram", "abs_mean", "fisher", "out_grad",
    "out_fisher")``; the last three add a backward pass of the causal-LM loss per batch. The
    model's weights, ``requires_grad`` flags and train/eval mode are left as they were.
    ``gradient_tokens``: take the gradient statistics on only that many of the tokens, as
    evenly spaced sequences (:func:`spread_blocks`; default all). A backward pass costs about
    three forwards, and the ``fisher`` allocation reads one number per layer from them.

    Memory: gradient statistics are taken in a pass of their own, block by block
    (:func:`_backward_by_block`) on a model whose layers all sit in decoder blocks, and the input
    statistics in a second pass without autograd, so the activations of the whole graph and
    every layer's Gram matrix are never held together (SmolLM2, 16,384 tokens: 0.8 GB of Grams
    in float64, 0.6 GB of graph per 512-token sequence). Every statistic equals the one-pass
    result bit for bit (same batches, same operations; tested).
    """
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise ConfigError(f"statistics {unknown} are unknown; valid: {', '.join(STATISTICS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    layers = linear_layers(model) if layers is None else layers
    ids = calibration_blocks(tokenizer, texts, tokens, seq_len)  # (n_blocks, seq_len)
    grad_ids = spread_blocks(ids, gradient_tokens // seq_len) if gradient_tokens is not None else ids
    want_inputs = "gram" in statistics or "abs_mean" in statistics
    want_backward = bool(set(statistics) & {"fisher", "out_grad", "out_fisher"})
    stats = {n: LayerStats(out_features=m.out_features, in_features=m.in_features) for n, m in layers.items()}
    inputs = _InputStatistics(layers, stats, gram="gram" in statistics, abs_mean="abs_mean" in statistics)
    gradients = _GradientStatistics(layers, stats, statistics)
    blocks = _checkpoint_blocks(model, layers) if want_backward else None
    # (backward?, input statistics and token counts?, blocks) per pass over the calibration set
    if blocks is not None or len(grad_ids) < len(ids):
        passes = [(True, not want_inputs, grad_ids), (False, True, ids)]
    else:
        passes = [(want_backward, True, ids)]
    passes = [(grad, inp, run) for grad, inp, run in passes if grad or want_inputs or not want_backward]

    grad_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    bar = Bar(sum(len(run) for *_, run in passes), "calibrate", show=progress)
    try:
        for backward, collect, run in passes:
            handles = inputs.attach() if collect else []
            if backward:
                handles += gradients.attach() + _prepare_backward(model, layers, "fisher" in statistics, by_block=blocks is not None)
            elif blocks is not None and not set(layers) - {n for b in blocks for n in b.layers}:
                handles.append(blocks[-1].module.register_forward_hook(_stop_after))  # no logits needed
            try:
                for i in range(0, len(run), batch_size):
                    batch = run[i : i + batch_size].to(device)
                    inputs.start_batch()
                    gradients.start_batch()
                    if backward and blocks is not None:
                        _backward_by_block(model, batch, blocks)
                    elif backward:
                        with torch.enable_grad():
                            _loss(model, model(input_ids=batch, labels=batch)).backward()
                    else:
                        try:
                            with torch.no_grad():
                                model(input_ids=batch)
                        except _StopAfter:
                            pass
                    if backward:
                        gradients.end_batch(batch.numel())
                    if collect:
                        inputs.end_batch(batch.numel())
                    bar.update(len(batch))
            finally:
                for h in handles:
                    h.remove()
                for p, flag in grad_flags.items():
                    p.requires_grad_(flag)
            if backward:
                release_memory()  # the backward passes' freed activations
    finally:
        bar.close()
        model.train(was_training)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return Calibration(
        stats=stats,
        tokens=ids.numel(),
        seq_len=seq_len,
        seconds=time.perf_counter() - t0,
        text_fingerprint=digest,
        collected=tuple(s for s in STATISTICS if s in statistics),
        gradient_tokens=grad_ids.numel() if want_backward else None,
    )


def _prepare_backward(model: nn.Module, layers: dict[str, nn.Linear], fisher: bool, *, by_block: bool) -> list:
    """Freeze every parameter but what the gradient statistics need: the layers' weights (for
    ``fisher``, or when no graph could otherwise reach every layer), else a graph from the
    embeddings' output (no weight gradients). Returns hook handles to remove afterwards."""
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if fisher or (embeddings is None and not by_block):
        for m in layers.values():  # the graph must reach every layer's output (and weight)
            m.weight.requires_grad_(True)
            m.weight.grad = None
        return []
    if by_block:  # each block's re-run starts from inputs that track gradients
        return []
    return [embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))]


# ----------------------------------------------------------------------------- closed loop

INPUT_STATISTICS = ("gram", "abs_mean")  # what a closed-loop walk recomputes per block
CALIBRATION_MODES = ("open-loop", "closed-loop")


class _StopForward(Exception):
    """Raised by the hook that captured the first block's inputs: the rest of the model
    need not run."""


@dataclass(frozen=True)
class DecoderBlock:
    """One repeated block of a model (``model.layers.3``) and the compressible layers inside it."""

    name: str
    module: nn.Module
    layers: tuple[str, ...]


def decoder_blocks(model: nn.Module, layers: dict[str, nn.Linear]) -> list[DecoderBlock]:
    """The model's decoder blocks: the ``nn.ModuleList`` whose children hold the most of
    ``layers``. ModelError when no such list exists (closed-loop calibration then cannot run)."""
    best: list[DecoderBlock] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        blocks = []
        for i, child in enumerate(module):
            prefix = f"{name}.{i}." if name else f"{i}."
            blocks.append(DecoderBlock(prefix[:-1], child, tuple(n for n in layers if n.startswith(prefix))))
        if sum(len(b.layers) for b in blocks) > sum(len(b.layers) for b in best):
            best = blocks
    if not best:
        raise ModelError(
            f"closed-loop calibration walks the model's decoder blocks, and {type(model).__name__} has "
            "no nn.ModuleList of blocks holding its linear layers; use calibration='open-loop'"
        )
    return best


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class ClosedLoopStats(Mapping):
    """Per-layer statistics measured on the inputs each layer gets *after* the blocks before it
    were compressed (closed-loop, or sequential, calibration: SVD-LLM 2024, Sec. 3.3).

    A read-only mapping ``layer name → LayerStats`` computed lazily, block by block: reading a
    layer of block ``b`` runs the calibration set's hidden states through blocks ``< b`` as they
    are *now* (compressed by the caller in the meantime) and collects ``gram`` / ``abs_mean``
    of block ``b``'s layers with block ``b`` itself still dense. So block 0's statistics equal
    the open-loop ones, and only one block's activations (``(tokens, hidden)``) and one block's
    statistics are held at a time. Blocks must be read in order: reading a block that was
    passed already raises ConfigError. Gradient statistics (``fisher``, ``out_grad``,
    ``out_fisher``) and layers outside the blocks come from ``base`` (an open-loop run).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: list[DecoderBlock],
        batches: list[tuple[tuple, dict]],
        layers: dict[str, nn.Linear],
        base: dict[str, LayerStats],
        statistics: Sequence[str],
        *,
        cross: bool = False,
        progress: bool = False,
        label: str = "closed-loop calibration",
    ) -> None:
        self.model, self.blocks, self.layers, self.base = model, blocks, layers, base
        self.cross = cross and "gram" in statistics
        self._dense = [h for (h, *_), _ in batches] if self.cross else None  # the dense model's stream
        self._dense_next: list[torch.Tensor] | None = None
        self.statistics = tuple(s for s in INPUT_STATISTICS if s in statistics)
        self._batches = batches  # [(args, kwargs)] of the current block, hidden states first
        self._block_of = {n: i for i, b in enumerate(blocks) for n in b.layers}
        self._current, self._stats = 0, None
        self._outputs: list[torch.Tensor] | None = None  # the current block's outputs, from _collect
        self._outputs_of: tuple | None = None  # the block's parameters (and versions) they came from
        self.compressed_blocks = 0  # blocks that were compressed when the walk passed them
        self.seconds = 0.0
        self._bar = Bar(len(blocks), label, show=progress)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerStats:
        if name not in self.layers:
            raise KeyError(name)
        index = self._block_of.get(name)
        if index is None:
            return self.base[name]
        if index < self._current:
            raise ConfigError(
                f"closed-loop statistics are read block by block in order; {name!r} is in block "
                f"{self.blocks[index].name}, which the walk has passed; read each block's statistics "
                "before compressing it, blocks in model order"
            )
        while self._current < index:
            self._advance()
        if self._stats is None:
            self._stats = self._collect(self.blocks[index])
        return self._stats[name]

    def finish(self) -> None:
        """Pass the remaining blocks (counting which were compressed) and free the activations."""
        while self._current < len(self.blocks):
            self._advance()
        self._batches, self._outputs = [], None
        self._bar.close()

    @torch.no_grad()
    def _run(self, block: DecoderBlock) -> list[torch.Tensor]:
        return [_block_output(block.module(*args, **kwargs)) for args, kwargs in self._batches]

    @torch.no_grad()
    def _run_dense(self, block: DecoderBlock) -> list[torch.Tensor]:
        """The dense block's outputs on the dense stream (original layers swapped in meanwhile)."""
        from rankwise.modules import replace_module

        now = {n: self.model.get_submodule(n) for n in block.layers}
        try:
            for n in block.layers:
                replace_module(self.model, n, self.layers[n])
            return [_block_output(block.module(h, *args[1:], **kwargs)) for h, (args, kwargs) in zip(self._dense, self._batches, strict=True)]
        finally:
            for n, m in now.items():
                replace_module(self.model, n, m)

    def _advance(self) -> None:
        t0 = time.perf_counter()
        block = self.blocks[self._current]
        changed = any(self.model.get_submodule(n) is not self.layers[n] for n in block.layers)
        self.compressed_blocks += changed
        if self._current + 1 < len(self.blocks):
            if self._dense is not None:
                self._dense = self._dense_next if self._dense_next is not None else self._run_dense(block)
            # a block left as it was when its statistics were read gave these outputs already
            same = self._outputs is not None and self._outputs_of == _parameter_versions(block.module)
            outputs = self._outputs if same else self._run(block)
            self._batches = [((h, *args[1:]), kwargs) for h, (args, kwargs) in zip(outputs, self._batches, strict=True)]
        self._current += 1
        self._stats, self._dense_next, self._outputs = None, None, None
        self.seconds += time.perf_counter() - t0
        self._bar.update(1)

    def _collect(self, block: DecoderBlock) -> dict[str, LayerStats]:
        t0 = time.perf_counter()
        names = [n for n in block.layers if self.model.get_submodule(n) is self.layers[n]]
        if len(names) < len(block.layers):
            raise ConfigError(
                f"closed-loop statistics of block {block.name} were read after some of its layers were "
                "replaced; read a block's statistics before compressing it"
            )
        layers = {n: self.layers[n] for n in names}
        stats = {n: _with_inputs_of(self.base.get(n), layers[n]) for n in names}
        inputs = _InputStatistics(layers, stats, gram="gram" in self.statistics, abs_mean="abs_mean" in self.statistics)
        dense_inputs: dict[str, torch.Tensor] = {}
        handles = []
        if self._dense is not None:  # record each layer's input on the dense stream first
            handles += [m.register_forward_pre_hook(_recorder(n, dense_inputs)) for n, m in layers.items()]
        dense_outputs, outputs = [], []
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self._batches):
                    if self._dense is not None:
                        dense_outputs.append(_block_output(block.module(self._dense[i], *args[1:], **kwargs)))
                        for h in handles:
                            h.remove()
                        handles = inputs.attach() + [
                            m.register_forward_hook(_cross_hook(n, stats, inputs, dense_inputs)) for n, m in layers.items()
                        ]
                    elif not handles:
                        handles = inputs.attach()
                    inputs.start_batch()
                    outputs.append(_block_output(block.module(*args, **kwargs)))
                    inputs.end_batch(args[0].shape[0] * args[0].shape[1])
                    if self._dense is not None:
                        for h in handles:
                            h.remove()
                        handles = [m.register_forward_pre_hook(_recorder(n, dense_inputs)) for n, m in layers.items()]
        finally:
            for h in handles:
                h.remove()
        for n in layers:  # layers sharing an input share its cross statistics too
            owner = inputs.owner_of.get(n, n)
            if owner != n:
                stats[n].cross = stats[owner].cross
        self._dense_next = dense_outputs if self._dense is not None else None
        self._outputs, self._outputs_of = outputs, _parameter_versions(block.module)
        self.seconds += time.perf_counter() - t0
        return stats


def _parameter_versions(module: nn.Module) -> tuple:
    """Which parameters ``module`` has and their in-place version counters: equal before and
    after means its forward computes the same function (nothing replaced or edited in place)."""
    return tuple((id(p), p._version) for p in module.parameters())


def _recorder(name: str, store: dict[str, torch.Tensor]):
    def hook(module: nn.Module, args: tuple) -> None:
        store[name] = args[0].detach()

    return hook


def _cross_hook(name: str, stats: dict[str, LayerStats], inputs: _InputStatistics, dense_inputs: dict[str, torch.Tensor]):
    """After the input-statistics hook: ``cross += x_denseᵀ x̂`` for a layer owning its input."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if inputs.owner_of.get(name) != name:
            return
        x = dense_inputs[name].reshape(-1, module.in_features).float()
        xh = args[0].detach().reshape(-1, module.in_features).float()
        c = (x.T @ xh).to(torch.float64)
        s = stats[name]
        s.cross = c if s.cross is None else s.cross.add_(c)

    return hook


def _with_inputs_of(base: LayerStats | None, layer: nn.Linear) -> LayerStats:
    """``base``'s gradient statistics (if any) with empty input statistics, to be refilled."""
    if base is None:
        return LayerStats(out_features=layer.out_features, in_features=layer.in_features)
    return dataclasses.replace(base, gram=None, abs_sum=None, cross=None, tokens=0)


def closed_loop_calibration(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    tokens: int = 4096,
    seq_len: int = 512,
    batch_size: int = 4,
    statistics: Sequence[str] = ("gram",),
    layers: dict[str, nn.Linear] | None = None,
    base: Calibration | None = None,
    cross: bool = False,
    progress: bool = False,
    label: str = "closed-loop calibration",
) -> Calibration:
    """A :class:`Calibration` whose ``stats`` is a :class:`ClosedLoopStats` walk (``mode``
    ``"closed-loop"``): compress block ``b`` after reading its statistics and before reading
    block ``b + 1``'s, then call ``stats.finish()``.

    The first block's inputs for all calibration batches are captured by one forward that
    stops there. ``base``: an open-loop calibration of the same text supplying gradient
    statistics and the layers outside the decoder blocks; without it, those layers get
    open-loop input statistics from a full forward (a model whose blocks hold every layer
    needs none). ``statistics`` beyond ``gram`` / ``abs_mean`` must be in ``base``. ``cross``:
    also run the dense model's stream alongside (one more block run per block, twice the
    activations) and collect :attr:`LayerStats.cross`, for :meth:`LayerStats.target_weight`.
    ``label``: the progress bar's name (the open-loop block walk of ``compress`` shows its own).
    """
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise ConfigError(f"statistics {unknown} are unknown; valid: {', '.join(STATISTICS)}")
    layers = linear_layers(model) if layers is None else layers
    gradient = sorted(set(statistics) - set(INPUT_STATISTICS))
    if gradient and (base is None or not set(gradient) <= set(base.collected)):
        raise ConfigError(
            f"closed-loop calibration recomputes only {', '.join(INPUT_STATISTICS)}; {gradient} must come "
            "from an open-loop calibration passed as base="
        )
    blocks = decoder_blocks(model, layers)
    t0 = time.perf_counter()
    ids = calibration_blocks(tokenizer, texts, tokens, seq_len)
    inside = {n for b in blocks for n in b.layers}
    outside = {n: m for n, m in layers.items() if n not in inside and (base is None or n not in base.stats)}
    base_stats = dict(base.stats) if base is not None else {}
    base_stats |= {n: LayerStats(out_features=m.out_features, in_features=m.in_features) for n, m in outside.items()}
    recorder = _InputStatistics(outside, base_stats, gram="gram" in statistics, abs_mean="abs_mean" in statistics)
    batches: list[tuple[tuple, dict]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict):
        if "hidden_states" in kwargs:  # keep the hidden states first, positionally
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"), *args)
        batches.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), kwargs))
        if not outside:
            raise _StopForward

    handles = [blocks[0].module.register_forward_pre_hook(capture, with_kwargs=True), *recorder.attach()]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                batch = ids[i : i + batch_size].to(device)
                recorder.start_batch()
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                recorder.end_batch(batch.numel())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    walk = ClosedLoopStats(
        model, blocks, batches, layers, base_stats, statistics, cross=cross, progress=progress, label=label
    )
    walk.seconds = time.perf_counter() - t0
    return Calibration(
        stats=walk,
        tokens=ids.numel(),
        seq_len=seq_len,
        seconds=walk.seconds,
        text_fingerprint=hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        collected=tuple(s for s in STATISTICS if s in statistics),
        mode="closed-loop",
        gradient_tokens=base.gradient_tokens if base is not None else None,
    )

__all__ = [
    "STATISTICS",
    "INPUT_STATISTICS",
    "CALIBRATION_MODES",
    "FISHER_WINDOW",
    "FISHER_SEED",
    "LayerStats",
    "Calibration",
    "ClosedLoopStats",
    "DecoderBlock",
    "calibrate",
    "calibration_blocks",
    "spread_blocks",
    "closed_loop_calibration",
    "decoder_blocks",
    "linear_layers",
    "blocks_hold_every_layer",
    "release_memory",
]
