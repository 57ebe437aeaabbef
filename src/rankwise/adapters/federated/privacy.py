"""DP-SGD for federated clients: per-sample gradient clipping and Gaussian noise.

The private setting of FedSVD (2025), after "Deep Learning with Differential Privacy"
(Abadi et al., 2016). A client's step on a batch of ``n`` token blocks uses

    g̃ = (Σ_i clip_C(g_i) + N(0, σ² C² I)) / n,     clip_C(g) = g · min(1, C / ‖g‖),

where ``g_i`` is block ``i``'s gradient of every trainable parameter (one norm over all of
them, so each block moves the model by at most ``C / n``), ``C`` the clipping bound
(``dp_clip``) and ``σ`` the noise multiplier (``dp_noise_multiplier``). The per-sample
gradients are exact: ``torch.func`` (``vmap`` of ``grad`` over the batch, each block its
own forward). :func:`private_lm_loss` turns g̃ into a loss for
:func:`~rankwise.adapters.local_training.train_adapters`: its value is the batch's LM loss,
its gradient is g̃, so the client's AdamW step, clipping and training rules run unchanged.

What is not here: a privacy accountant (the ε, δ of a run), and Poisson sampling of the
batches (clients draw shuffled batches, :func:`~rankwise.adapters.local_training.batches_of`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from rankwise.adapters.local_training import LossFn
from rankwise.errors import ConfigError

# torch.func has no batching rule for CPU flash attention yet; it loops over the batch instead
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def check_dp_options(clip: float | None, noise_multiplier: float) -> None:
    """ConfigError naming ``dp_clip`` / ``dp_noise_multiplier`` for values DP-SGD cannot use."""
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0
    ):
        raise ConfigError(
            f"dp_clip (the per-sample gradient norm bound) must be a positive number, or None for "
            f"no differential privacy; got {clip!r}"
        )
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
        math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise ConfigError(f"dp_noise_multiplier must be a number >= 0 (0: clipping only), got {noise_multiplier!r}")
    if noise_multiplier > 0 and clip is None:
        raise ConfigError(
            f"dp_noise_multiplier={noise_multiplier} needs dp_clip: the noise std is "
            "dp_noise_multiplier x dp_clip; give dp_clip too"
        )


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters; attach an adapter first")
    return params


def per_sample_grads(model: nn.Module, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({name: (n, *shape)}, losses (n,))``: each block's LM-loss gradient of every trainable
    parameter of ``model``, and each block's loss, for token blocks ``batch`` ``(n, seq_len)``."""
    params = {n: p.detach() for n, p in _trainable(model).items()}

    def block_loss(trainable: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        ids = ids.unsqueeze(0)
        return functional_call(model, trainable, args=(), kwargs={"input_ids": ids, "labels": ids}).loss

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
        grads, losses = vmap(grad_and_value(block_loss), in_dims=(None, 0), randomness="different")(params, batch)
    return grads, losses


def clip_per_sample(grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Scale each sample's gradient (row ``i`` of every tensor) to norm at most ``clip``; the
    norm is over all parameters together."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)
    return {n: g * factor.view(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}


def private_gradient(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """DP-SGD's gradient of the LM loss on ``batch`` (see the module docstring) as
    ``{name: tensor}`` over the trainable parameters, and the batch's loss. The noise is drawn
    from ``generator`` (default: torch's global generator)."""
    check_dp_options(clip, noise_multiplier)
    grads, losses = per_sample_grads(model, batch)
    clipped = clip_per_sample(grads, clip)
    n = len(batch)
    out = {}
    for name, g in clipped.items():
        total = g.sum(0)
        if noise_multiplier > 0:
            noise = torch.randn(total.shape, generator=generator, dtype=total.dtype, device=total.device)
            total = total + noise * (noise_multiplier * clip)
        out[name] = total / n
    return out, losses.mean()


def private_lm_loss(clip: float, noise_multiplier: float = 0.0) -> LossFn:
    """A ``loss_fn(model, batch)`` for :func:`~rankwise.adapters.local_training.train_adapters`
    whose value is the LM loss and whose gradient is :func:`private_gradient`'s g̃."""
    check_dp_options(clip, noise_multiplier)

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        grads, loss = private_gradient(model, batch, clip=clip, noise_multiplier=noise_multiplier)
        params = _trainable(model)
        surrogate = sum((params[n] * g).sum() for n, g in grads.items())
        return loss.detach() + (surrogate - surrogate.detach())

    return loss_fn


__all__ = ["check_dp_options", "clip_per_sample", "per_sample_grads", "private_gradient", "private_lm_loss"]
