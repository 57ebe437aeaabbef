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

import hashlib
import time
import weakref
from collections.abc import Sequence
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
    tokens: int = 0

    @property
    def sensitivity(self) -> float | None:
        """Mean squared loss gradient per output entry (``None`` without ``"out_grad"``)."""
        if self.out_grad_sq is None or self.tokens == 0:
            return None
        return self.out_grad_sq / (self.tokens * self.out_features)

    def output_fisher(self) -> MFAC:
        """The layer's output Fisher ``F ≈ λI + (1/m) Zᵀ Z / T`` as an :class:`MFAC` over the
        window ``Z / √T`` (``λ`` = :data:`FISHER_DAMP` × its mean diagonal). Raises
        ConfigError without the ``"out_fisher"`` statistic."""
        if self.out_grad_sketch is None or self.tokens == 0:
            raise ConfigError("these statistics hold no output-gradient sketch; calibrate with 'out_fisher'")
        window = self.out_grad_sketch / self.tokens**0.5
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

    def recipe(self) -> dict:
        return {
            "tokens": self.tokens,
            "seq_len": self.seq_len,
            "statistics": list(self.collected),
            "token_fingerprint": self.text_fingerprint,
            "seconds": round(self.seconds, 3),
        }


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
    progress: bool = False,
) -> Calibration:
    """Run ``tokens`` calibration tokens (blocks of ``seq_len``) through ``model`` and return
    per-layer :class:`LayerStats` for ``layers`` (default: :func:`linear_layers`).

    ``statistics`` is any subset of ``("gram", "abs_mean", "fisher", "out_grad",
    "out_fisher")``; the last three add a backward pass of the causal-LM loss per batch. The model's weights, ``requires_grad``
    flags and train/eval mode are left as they were.
    """
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise ConfigError(f"statistics {unknown} are unknown; valid: {', '.join(STATISTICS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    layers = linear_layers(model) if layers is None else layers
    blocks = calibration_blocks(tokenizer, texts, tokens, seq_len)  # (n_blocks, seq_len)
    want_gram, want_abs, want_fisher, want_out_grad, want_sketch = (s in statistics for s in STATISTICS)
    want_backward = want_fisher or want_out_grad or want_sketch
    sketch_rng = torch.Generator().manual_seed(FISHER_SEED)
    omega: list[torch.Tensor | None] = [None]  # this batch's Ω (window, tokens), drawn once

    stats = {n: LayerStats(out_features=m.out_features, in_features=m.in_features) for n, m in layers.items()}
    owner_of: dict[str, str] = {}  # layer -> the layer whose (shared) input statistics it uses
    seen: dict[int, tuple[weakref.ref, str]] = {}  # id(input tensor) -> (ref, first layer), per batch
    first_batch = [True]

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in owner_of and owner_of[name] != name:
                return  # shares its input with an earlier layer, already counted
            x = args[0]  # the identity of this object tells which layers share an input
            hit = seen.get(id(x))
            if first_batch[0] and hit is not None and hit[0]() is x:
                owner = hit[1]
                owner_of[name] = owner
                stats[name].gram, stats[name].abs_sum = stats[owner].gram, stats[owner].abs_sum
                return
            owner_of[name] = name
            seen[id(x)] = (weakref.ref(x), name)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            s = stats[name]
            abs_sum = x2.abs().sum(0, dtype=torch.float64)
            if not torch.isfinite(abs_sum).all():
                raise ShapeError(
                    f"calibration activations entering {name!r} contain NaN/Inf; the model's "
                    "weights or dtype are broken (load it in float32)"
                )
            if want_abs:
                s.abs_sum = abs_sum if s.abs_sum is None else s.abs_sum.add_(abs_sum)
            if want_gram:
                g = (x2.T @ x2).to(torch.float64)  # (in, in)
                s.gram = g if s.gram is None else s.gram.add_(g)

        return hook

    def out_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not out.requires_grad:
                return

            def grad_hook(grad: torch.Tensor) -> None:
                s = stats[name]
                if want_out_grad:
                    sq = float(grad.detach().to(torch.float64).pow(2).sum())
                    s.out_grad_sq = sq if s.out_grad_sq is None else s.out_grad_sq + sq
                if want_sketch:
                    g = grad.detach().reshape(-1, grad.shape[-1]).float()  # (tokens, out)
                    if omega[0] is None:
                        omega[0] = torch.randn(FISHER_WINDOW, g.shape[0], generator=sketch_rng)
                    z = (omega[0] @ g).to(torch.float64)  # (window, out)
                    s.out_grad_sketch = z if s.out_grad_sketch is None else s.out_grad_sketch.add_(z)

            out.register_hook(grad_hook)

        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in layers.items()]
    if want_out_grad or want_sketch:
        handles += [m.register_forward_hook(out_hook(n)) for n, m in layers.items()]
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    if want_backward:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in layers.values():  # the graph must reach every layer's output
            m.weight.requires_grad_(True)
            m.weight.grad = None
    t0 = time.perf_counter()
    bar = Bar(len(blocks), "calibrate", show=progress)
    try:
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            seen.clear()
            omega[0] = None
            with torch.set_grad_enabled(want_backward):
                out = model(input_ids=batch, labels=batch if want_backward else None)
            if want_backward:
                if getattr(out, "loss", None) is None:
                    raise ModelError(
                        f"gradient statistics (fisher, out_grad, out_fisher) need a language-model loss; "
                        f"{type(model).__name__} returned none (use a causal LM, or a method "
                        "and allocation without gradients)"
                    )
                out.loss.backward()
                for name, m in layers.items():
                    if want_fisher:
                        rows = m.weight.grad.to(torch.float64).pow(2).sum(1)  # (out,)
                        s = stats[name]
                        s.fisher_rows = rows if s.fisher_rows is None else s.fisher_rows.add_(rows)
                    m.weight.grad = None
            first_batch[0] = False
            for name in layers:
                stats[name].tokens += batch.numel()
            bar.update(len(batch))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    digest = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16]
    return Calibration(
        stats=stats,
        tokens=blocks.numel(),
        seq_len=seq_len,
        seconds=time.perf_counter() - t0,
        text_fingerprint=digest,
        collected=tuple(s for s in STATISTICS if s in statistics),
    )


__all__ = ["STATISTICS", "FISHER_WINDOW", "FISHER_SEED", "LayerStats", "Calibration", "calibrate", "calibration_blocks", "linear_layers"]
