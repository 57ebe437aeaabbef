"""How a ``--method`` becomes a model and an optimizer.

Two kinds of method: an optimizer from :data:`OPTIMIZERS` (``adamw`` and the low-rank
projected ones of :mod:`rankwise.optim`), or a layer type of :mod:`rankwise.layers` (whatever
:func:`rankwise.layers.names` lists when the run starts): the linear layers of the blocks are
converted with :func:`rankwise.layers.convert` and AdamW trains the result.

Projected optimizers get galore-torch's recipe: every 2-D weight of the transformer blocks is
projected at ``rank``; embeddings, the LM head and norms train with plain AdamW. With
``project_embeddings`` the input embedding and the LM head are projected at ``rank`` too (on
their small side: the moments are ``vocab × rank``); a layer type then trains with
:class:`rankwise.optim.GaLoreAdamW` whose only projected matrices are the embeddings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.pretrain.config import PretrainConfig
from rankwise.registry import Registry

OptimizerFactory = Callable[[nn.Module, PretrainConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("pretrain optimizer")


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights of the transformer blocks (what the projected optimizers project)."""
    return [p for p in model.model.layers.parameters() if p.ndim == 2 and p.requires_grad]


def embedding_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and the LM head (once if tied) that train."""
    from rankwise.optim import embedding_parameters

    return [p for p in embedding_parameters(model) if p.requires_grad]


def _groups(model: nn.Module, projected: list[nn.Parameter], config: PretrainConfig) -> list[dict]:
    """Two galore-torch-style groups of named parameters: ``projected`` with the projection
    options, every other trainable parameter without a rank (plain AdamW)."""
    names = {id(p): n for n, p in model.named_parameters()}
    ids = {id(p) for p in projected}
    plain = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    options = dict(rank=config.rank, update_proj_gap=config.update_proj_gap, scale=config.scale, proj_type="std")
    return [
        {"params": [(names[id(p)], p) for p in plain]},
        {"params": [(names[id(p)], p) for p in projected], **options},
    ]


def projected_groups(model: nn.Module, config: PretrainConfig) -> list[dict]:
    """galore-torch's parameter groups: block matrices projected (and the embeddings, with
    ``project_embeddings``), everything else plain."""
    projected = block_matrices(model)
    if config.project_embeddings:
        projected += embedding_matrices(model)
    return _groups(model, projected, config)


def _adamw(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, eps=1e-6, weight_decay=config.weight_decay)


def _projected(cls: type) -> OptimizerFactory:
    def build(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
        return cls(
            projected_groups(model, config), lr=config.lr, eps=1e-6, weight_decay=config.weight_decay,
            seed=config.seed, check_finite=False, **config.method_options,  # the loop checks
        )  # fmt: skip

    build.projected = True
    return build


def _register_optimizers() -> None:
    from rankwise.optim import DCTAdamW, FrugalAdamW, GaLoreAdamW, GradNormLoRPAdamW

    OPTIMIZERS.register("adamw", _adamw)
    for name, cls in (("galore", GaLoreAdamW), ("dct", DCTAdamW), ("frugal", FrugalAdamW), ("gradnorm", GradNormLoRPAdamW)):
        OPTIMIZERS.register(name, _projected(cls))


_register_optimizers()


def layer_names() -> list[str]:
    from rankwise.layers import names

    return names()


def method_names() -> list[str]:
    """Every valid ``--method``: the optimizers, then the layer types registered now."""
    return [*OPTIMIZERS.names(), *layer_names()]


def is_projected(method: str) -> bool:
    return method in OPTIMIZERS and getattr(OPTIMIZERS.get(method), "projected", False)


def check_method(config: PretrainConfig) -> None:
    """ConfigError for an unknown method, or one that cannot run as asked (before any work)."""
    if config.method not in OPTIMIZERS and config.method not in layer_names():
        raise ConfigError(f"unknown method {config.method!r}; valid: {', '.join(method_names())}")
    if config.project_embeddings and config.method in OPTIMIZERS and not is_projected(config.method):
        raise ConfigError(
            f"--project-embeddings needs a projected optimizer or a layer type; --method "
            f"{config.method} trains every parameter at full rank (it is the baseline). Use e.g. "
            "--method galore --project-embeddings, or drop --project-embeddings"
        )
    if config.fsdp and config.project_embeddings:
        raise ConfigError(
            "--project-embeddings cannot run under --fsdp: projecting the embeddings needs their "
            "whole gradient matrices, and FSDP shards them across processes. Run it with DDP "
            "(torchrun without --fsdp), or drop --project-embeddings"
        )
    if config.fsdp and is_projected(config.method):
        raise ConfigError(
            f"--method {config.method} cannot run under --fsdp: FSDP shards every weight matrix "
            "across processes (DTensor rows), and a projected optimizer needs whole gradient "
            "matrices to find their subspace. Run it with DDP (torchrun without --fsdp), or use "
            f"--fsdp with adamw or a layer type ({', '.join(fsdp_layer_types())})"
        )
    if config.fsdp and config.method in layer_names() and config.method not in fsdp_layer_types():
        raise ConfigError(
            f"--method {config.method} cannot run under --fsdp: its layers change their own weights "
            "after optimizer steps (re-SVD, pruning), which needs whole matrices; run it with DDP, "
            f"or use --fsdp with adamw or {', '.join(fsdp_layer_types())}"
        )


def fsdp_layer_types() -> list[str]:
    """Layer types that train with a plain optimizer step (no after-step rewrite of weights)."""
    from rankwise.layers import TRAINABLE, StructuredLinear

    base = StructuredLinear.after_optimizer_step
    return [n for n, cls in TRAINABLE.items() if cls.after_optimizer_step is base]


def _layer_rank(cls: type, rank: int) -> int | None:
    """``rank`` for layer types sized by it; None for those sized otherwise (e.g. monarch)."""
    param = inspect.signature(cls.from_linear).parameters.get("rank")
    return None if param is not None and param.default is None else rank


def prepare_model(model: nn.Module, config: PretrainConfig) -> nn.Module:
    """Convert the block linear layers for a layer-type method (in place); others unchanged."""
    if config.method in OPTIMIZERS:
        return model
    from rankwise.layers import TRAINABLE, convert

    cls = TRAINABLE.get(config.method)
    convert(model, config.method, rank=_layer_rank(cls, config.rank), **config.method_options)
    return model


def build_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config.method`` over ``model`` (AdamW for layer types; GaLore on the
    embeddings alone for a layer type with ``project_embeddings``)."""
    if config.method in OPTIMIZERS:
        return OPTIMIZERS.get(config.method)(model, config)
    if config.project_embeddings:
        from rankwise.optim import GaLoreAdamW

        groups = _groups(model, embedding_matrices(model), config)
        return GaLoreAdamW(groups, lr=config.lr, eps=1e-6, weight_decay=config.weight_decay, seed=config.seed, check_finite=False)
    return _adamw(model, config)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (local shard under FSDP)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (tied tensors once; local shard under FSDP)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.data_ptr() in seen and local.numel():
            continue
        seen.add(local.data_ptr())
        total += local.numel() * local.element_size()
    return total


__all__ = [
    "OPTIMIZERS", "block_matrices", "build_optimizer", "embedding_matrices", "check_method", "fsdp_layer_types", "is_projected",
    "method_names", "optimizer_state_bytes", "prepare_model", "projected_groups", "weight_bytes",
]  # fmt: skip
