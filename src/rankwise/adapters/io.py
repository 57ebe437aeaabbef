"""Saving and loading adapters: rankwise's own format and PEFT's, both as safetensors.

A folder holds ``adapter_config.json`` and the tensors:

- PEFT format (``lora``/``dora``): ``adapter_model.safetensors`` with PEFT's key names
  (``base_model.model.<module path>.lora_A.weight``, ``...lora_B.weight``,
  ``...lora_magnitude_vector``, ``lora_embedding_A``/``_B``) and a PEFT ``LoraConfig``
  (``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``, ``target_modules``,
  ``fan_in_fan_out``...). ``peft.PeftModel.from_pretrained`` loads it, and PEFT's folders
  load here. Layers of different ranks (a SoRA adapter exported with its pruned components
  removed) are written with PEFT's per-layer ``rank_pattern``; PEFT scales each layer by
  ``lora_alpha / r_layer``, so ``B`` is rescaled to keep the adapter's own scaling. Read
  back, a ``rank_pattern``/``alpha_pattern`` file becomes one adapter of the largest rank:
  each layer's factors are zero-padded to it and its scaling is folded into ``B``, which
  computes the same function (one adapter name is one config here).
- rankwise format (every method): ``adapter.safetensors`` keyed ``<module path>.<param>``
  and a config naming the method, its options, the layers and their target patterns.

Both record the base model as the user named it (``base_model_name_or_path``). The folder
is written through :func:`rankwise.fileio.output_dir` (an existing non-empty folder is
refused unless ``overwrite``, and only an adapter folder is replaced; built in a temporary
sibling and renamed into place). Loading checks every key and shape against the model
before touching it: a bad file raises ``CheckpointError`` naming the key and leaves the
model unchanged.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.adapters.base import (
    METHODS,
    Adapter,
    AdapterConfig,
    LayerView,
    get_method,
    normalise_rank,
    view_for,
)
from rankwise.adapters.inject import (
    AdaptedLayer,
    AttachPlan,
    ShapeOnlyView,
    adapted_layers,
    attach,
    delete,
    matching_paths,
    resolve_targets,
)
from rankwise.errors import CheckpointError, ConfigError
from rankwise.fileio import output_dir, write_json

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
NATIVE_WEIGHTS = "adapter.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_MODEL_PREFIX = "base_model."  # model-wide tensors (RandLoRA's bases)
NATIVE_FORMAT = "rankwise-adapter"
PEFT_SUFFIXES = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)
# PEFT LoraConfig keys that are fine at these values; anything else unknown only warns.
_PEFT_HARMLESS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": None,
    "auto_mapping": None,
    "peft_version": None,
    "init_lora_weights": None,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "megatron_config": None,
    "megatron_core": None,
    "loftq_config": {},
    "layer_replication": None,
    "lora_bias": False,
    "use_qalora": False,
    "qalora_group_size": None,
    "eva_config": None,
    "corda_config": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "arrow_config": None,
    "ensure_weight_tying": False,
    "alora_invocation_tokens": None,
    "lora_ga_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
}
_PEFT_MUST_BE_DEFAULT = (
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
)


# ----------------------------------------------------------------------------- writing


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt"})


def _named_adapters(model: nn.Module, name: str) -> dict[str, Adapter]:
    found = {
        p: layer.adapters[name]
        for p, layer in adapted_layers(model).items()
        if name in layer.adapters
    }
    if not found:
        names = sorted({n for layer in adapted_layers(model).values() for n in layer.adapters})
        raise ConfigError(f"no adapter named {name!r} in this model; it has {names}")
    return found


def _check_savable(name: str, adapters: dict[str, Adapter]) -> AdapterConfig:
    first = next(iter(adapters.values()))
    if any(
        a.method != first.method or not a.config.same_adapter(first.config)
        for a in adapters.values()
    ):
        raise ConfigError(
            f"adapter {name!r} has different methods/configs on different layers; "
            "save each attach under its own name"
        )
    tensors = [t for a in adapters.values() for t in a.state_dict().values()]
    bad = [
        p
        for p, a in adapters.items()
        if any(not torch.isfinite(t).all() for t in a.state_dict().values())
    ]
    if bad:
        raise CheckpointError(f"adapter {name!r} has NaN/Inf values in {bad[:3]}; refusing to save")
    if not tensors or all(t.numel() == 0 or not bool(t.any()) for t in tensors):
        raise CheckpointError(
            f"adapter {name!r}: every tensor is zero or missing (untrained, or a sharded "
            "model whose parameters were not gathered before saving); refusing to save"
        )
    return first.config


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names if they select exactly ``paths``; otherwise the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    try:
        if set(resolve_targets(model, leaves)) == set(paths):
            return leaves
    except ConfigError:
        pass
    return sorted(paths)


def _base_model_name(model: nn.Module) -> str | None:
    """The base model's name from its config, unless it is a path into rankwise's cache
    (a machine-specific folder, not what the user named)."""
    from rankwise.models import cache_dir

    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    path, cache = Path(str(name)).expanduser().absolute(), cache_dir().expanduser().absolute()
    if path == cache or cache in path.parents:
        return None
    return str(name)


def _peft_files(model, adapters, base_model) -> tuple[dict, dict[str, torch.Tensor]]:
    first = next(iter(adapters.values()))
    cfg = dict(first.peft_config())
    cfg.update(
        fan_in_fan_out=any(a.layer.kind == "transposed_linear" for a in adapters.values()),
        target_modules=_target_modules(model, list(adapters)),
        base_model_name_or_path=base_model,
        inference_mode=True,
        task_type=None,
        modules_to_save=None,
    )
    states = {path: a.peft_state() for path, a in adapters.items()}
    if first.peft_type is None:  # a LoraConfig
        cfg.update(rank_pattern={}, alpha_pattern={})
        states = _with_rank_pattern(cfg, states, first.scaling)
        cfg["target_modules"] = _target_modules(model, list(states))
    tensors = {
        f"{PEFT_PREFIX}{path}.{suffix}": t for path, state in states.items() for suffix, t in state.items()
    }
    for name, t in type(first).peft_shared_state(adapters).items():
        tensors[f"{PEFT_MODEL_PREFIX}{name}"] = t
    return cfg, tensors


# ----------------------------------------------------------------------------- rank_pattern

_PEFT_A = ("lora_A.weight", "lora_embedding_A")  # (r, ...): the rank is dim 0
_PEFT_B = ("lora_B.weight", "lora_embedding_B")  # (out, r, ...): the rank is dim 1


def _peft_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """The scaling PEFT gives a layer of rank ``rank``: ``alpha / r`` or ``alpha / √r``."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _factors(state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """The names of the A and B tensors in a PEFT LoRA layer's tensors (None if absent)."""
    a = next((k for k in _PEFT_A if k in state), None)
    b = next((k for k in _PEFT_B if k in state), None)
    return (a, b) if a and b else None


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    r"""PEFT's lookup: the value of the first key ``k`` with ``re.match(rf"(.*\.)?({k})$", path)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _rank_pattern(ranks: Mapping[str, int], default: int) -> dict[str, int]:
    """``rank_pattern`` entries for the layers whose rank is not ``default``, keyed by their
    paths; anchored and escaped when a plain path would also match another layer in PEFT's
    suffix lookup."""
    for key in (lambda p: p, lambda p: "^" + re.escape(p)):
        pattern = {key(p): r for p, r in ranks.items() if r != default}
        if all(_pattern_value(pattern, p, default) == r for p, r in ranks.items()):
            return pattern
    raise AssertionError("anchored full paths always resolve to their own layer")


def _with_rank_pattern(
    cfg: dict, states: dict[str, dict[str, torch.Tensor]], scaling: float
) -> dict[str, dict[str, torch.Tensor]]:
    """Give a LoRA config per-layer ranks when the layers' factors have different ranks.

    ``states`` are each layer's PEFT tensors computing the update at the adapter's own
    ``scaling`` (a SoRA export: pruned components removed; an empty dict is a layer with no
    rank left, left out of the file). ``cfg["r"]`` becomes the commonest rank, the others go
    to ``rank_pattern``, and a layer's ``B`` is rescaled by ``scaling / (lora_alpha / r_layer)``
    so PEFT computes the same update. ConfigError when no layer has any rank left."""
    kept = {p: s for p, s in states.items() if s}
    if not kept:
        raise ConfigError(
            "every layer of the adapter has rank 0 (all its components pruned), so it adds "
            "nothing and PEFT has no rank-0 LoRA; there is nothing to export"
        )
    ranks = {p: int(s[_factors(s)[0]].shape[0]) for p, s in kept.items() if _factors(s)}
    if len(kept) == len(states) and set(ranks.values()) <= {cfg["r"]}:
        return states
    common = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else cfg["r"]
    out = {}
    for path, state in kept.items():
        names = _factors(state)
        if names is None or ranks[path] == cfg["r"]:
            out[path] = state
            continue
        peft = _peft_scaling(cfg["lora_alpha"], ranks[path], cfg["use_rslora"])
        out[path] = {**state, names[1]: state[names[1]] * (scaling / peft)}
    cfg.update(r=common, rank_pattern=_rank_pattern(ranks, common))
    return out


def _pad_rank(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to size ``rank``."""
    pad = list(t.shape)
    pad[dim] = rank - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad)], dim=dim)


def _checked_pattern(cfg: dict, key: str, folder: Path) -> dict[str, Any]:
    pattern = cfg.get(key) or {}
    ok = isinstance(pattern, dict) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        and (key != "rank_pattern" or float(v).is_integer())
        for k, v in pattern.items()
    )  # fmt: skip
    if not ok:
        raise CheckpointError(
            f"{folder}/{CONFIG_FILE}: {key} must map module patterns to positive "
            f"{'integer ranks' if key == 'rank_pattern' else 'numbers'}; got {pattern!r}"
        )
    for k in pattern:
        try:
            re.compile(k)
        except re.error as e:
            raise CheckpointError(f"{folder}/{CONFIG_FILE}: {key} key {k!r} is not a regex: {e}") from None
    return pattern


def _apply_rank_pattern(
    cfg: dict, options: dict[str, Any], grouped: dict[str, dict[str, torch.Tensor]], folder: Path
) -> None:
    """Read PEFT's per-layer ``rank_pattern``/``alpha_pattern`` into one adapter of the
    largest rank (see the module docstring): ``options["rank"]`` becomes that rank, every
    layer's A and B are zero-padded to it, and ``B`` takes the ratio of the layer's PEFT
    scaling to the adapter's. CheckpointError when a layer's factors do not have the rank
    the pattern gives it."""
    ranks_by, alphas_by = (_checked_pattern(cfg, k, folder) for k in ("rank_pattern", "alpha_pattern"))
    if not ranks_by and not alphas_by:
        return
    r, alpha, rslora = options["rank"], float(options["alpha"]), options["use_rslora"]
    ranks = {p: int(_pattern_value(ranks_by, p, r)) for p in grouped}
    for path, state in grouped.items():
        names = _factors(state)
        if names and state[names[0]].shape[0] != ranks[path]:
            raise CheckpointError(
                f"{folder}: tensor {PEFT_PREFIX}{path}.{names[0]} has rank "
                f"{state[names[0]].shape[0]} but the config gives this layer rank {ranks[path]} "
                "(r / rank_pattern)"
            )
    top = max(ranks.values())
    scaling = _peft_scaling(alpha, top, rslora)
    for path, state in grouped.items():
        names = _factors(state)
        if names is None:
            continue
        a, b = state[names[0]], state[names[1]]
        ratio = _peft_scaling(float(_pattern_value(alphas_by, path, alpha)), ranks[path], rslora) / scaling
        state[names[0]] = _pad_rank(a, 0, top)
        state[names[1]] = _pad_rank(b * ratio if ratio != 1 else b, 1, top)
    options["rank"] = top


def _native_files(model, adapters, config, base_model) -> tuple[dict, dict[str, torch.Tensor]]:
    options = config.to_dict()
    # init options may hold tensors or callables (EVA inputs, LoRA-SB's loss_fn); the
    # saved tensors already are the initial state, and loading resets init anyway
    options["init_options"] = {}
    cfg = {
        "format": NATIVE_FORMAT,
        "version": 1,
        "method": next(iter(adapters.values())).method,
        "config": options,
        "layers": sorted(adapters),
        "target_modules": _target_modules(model, list(adapters)),
        "base_model_name_or_path": base_model,
    }
    tensors = {
        f"{path}.{key}": t for path, a in adapters.items() for key, t in a.state_dict().items()
    }
    return cfg, tensors


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    *,
    format: str = "auto",
    overwrite: bool = False,
    base_model: str | None = None,
) -> Path:
    """Write adapter ``name`` to the folder ``directory``; returns the folder.

    ``format`` is ``"peft"`` (PEFT's files; lora/dora, and sora exported as a plain LoRA
    without its pruned components), ``"rankwise"`` (any method), or ``"auto"`` (PEFT when
    every layer's method has a PEFT form it is saved in by default, rankwise's otherwise).
    ``base_model`` is recorded as ``base_model_name_or_path`` (default: the model config's
    ``_name_or_path`` unless it points into rankwise's cache). An existing non-empty folder
    is refused unless ``overwrite`` (and even then only an adapter folder is replaced).
    Refuses an adapter whose tensors are all zero or contain NaN/Inf.
    """
    if format not in ("auto", "peft", "rankwise"):
        raise ConfigError(f"format must be 'auto', 'peft' or 'rankwise', got {format!r}")
    adapters = _named_adapters(model, name)
    config = _check_savable(name, adapters)
    peft_ok = all(a.peft_config() is not None for a in adapters.values())
    if format == "peft" and not peft_ok:
        method = next(iter(adapters.values())).method
        raise ConfigError(f"method {method!r} has no PEFT format; use format='rankwise' or 'auto'")
    # a method whose PEFT form is an export (SoRA: a plain LoRA without its gate) is written
    # that way only on request; "auto" keeps what it needs to go on training
    auto_peft = peft_ok and all(a.peft_by_default for a in adapters.values())
    chosen = "peft" if format == "peft" or (format == "auto" and auto_peft) else "rankwise"
    for path, a in adapters.items():
        if reason := a.unsavable_reason(chosen):
            raise ConfigError(f"cannot save adapter {name!r} ({path}) as {chosen}: {reason}")
    base = base_model if base_model is not None else _base_model_name(model)
    if chosen == "peft":
        cfg, tensors = _peft_files(model, adapters, base)
        weights = PEFT_WEIGHTS
    else:
        cfg, tensors = _native_files(model, adapters, config, base)
        weights = NATIVE_WEIGHTS
    json.dumps(cfg)  # fail before anything is written
    with output_dir(directory, overwrite=overwrite, kind="adapter", option="directory") as tmp:
        _write_tensors(tmp / weights, tensors)
        write_json(tmp / CONFIG_FILE, cfg)
    return Path(directory)


# ----------------------------------------------------------------------------- reading


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found; an adapter folder needs {CONFIG_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _from_peft_config(cfg: dict, folder: Path) -> tuple[str, dict[str, Any]]:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{folder}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA, incl. DoRA)"
        )
    for key in _PEFT_MUST_BE_DEFAULT:
        if key in cfg and cfg[key] not in (_PEFT_HARMLESS[key], None, {}, [], False, "none"):
            raise CheckpointError(
                f"{folder}/{CONFIG_FILE}: {key}={cfg[key]!r} is not supported by rankwise"
            )
    known = set(_PEFT_HARMLESS) | {
        "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "fan_in_fan_out",
        "target_modules",
    }  # fmt: skip
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        warnings.warn(
            f"{folder}/{CONFIG_FILE}: ignoring unknown PEFT config keys {unknown}", stacklevel=3
        )
    method = "dora" if cfg.get("use_dora") else "lora"
    options = {
        "rank": cfg.get("r", 8),
        "alpha": cfg.get("lora_alpha", 8),
        "dropout": cfg.get("lora_dropout", 0.0) or 0.0,
        "use_rslora": bool(cfg.get("use_rslora", False)),
    }
    return method, options


def _split_peft_key(key: str) -> tuple[str, str]:
    if not key.startswith(PEFT_PREFIX):
        raise CheckpointError(f"tensor {key!r} does not start with {PEFT_PREFIX!r} (PEFT format)")
    rest = key[len(PEFT_PREFIX) :]
    for suffix in PEFT_SUFFIXES:
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    # PEFT sometimes keeps the adapter name: <path>.lora_A.<name>.weight
    m = re.fullmatch(r"(.+)\.(lora_[AB])\.[^.]+\.weight", rest)
    if m:
        return m.group(1), f"{m.group(2)}.weight"
    raise CheckpointError(f"tensor {key!r} is not a LoRA/DoRA tensor rankwise knows")


def _check_base_copy(model: nn.Module, key: str, t: torch.Tensor, folder: Path) -> None:
    """Accept a saved copy of a base weight only if it equals the model's own."""
    path = key[len(PEFT_PREFIX) : -len(".base_layer.weight")]
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"{folder}: tensor {key!r} names a layer this model lacks") from None
    w = getattr(getattr(layer, "base_layer", layer), "weight", None)
    if w is None or w.shape != t.shape or not torch.allclose(w.detach().cpu().float(), t.float()):
        raise CheckpointError(
            f"{folder}: tensor {key!r} is a changed base weight (PEFT modules_to_save / "
            "trained embeddings); rankwise loads adapters only"
        )


def _split_native_key(key: str, paths: list[str]) -> tuple[str, str]:
    for path in sorted(paths, key=len, reverse=True):
        if key.startswith(path + "."):
            return path, key[len(path) + 1 :]
    raise CheckpointError(f"tensor {key!r} belongs to no layer listed in the config")


def _check_tensor(key: str, t: torch.Tensor, expected: torch.Size) -> None:
    if tuple(t.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {key!r} has shape {tuple(t.shape)} but the model needs {tuple(expected)} "
            "(an adapter made for a different base model, or factors stored transposed?)"
        )
    if not t.dtype.is_floating_point:
        raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}; expected a float type")
    if not torch.isfinite(t).all():
        raise CheckpointError(f"tensor {key!r} contains NaN or Inf")


@dataclass
class _SavedAdapter:
    """What an adapter folder holds, parsed but not yet checked against a model."""

    method: str
    options: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]  # layer path -> {tensor name: tensor}
    targets: Any  # the target patterns it was made with (list, regex string, or None)
    peft: bool
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT model-wide tensors


def _read_native(folder: Path, cfg: dict) -> _SavedAdapter:
    paths = list(cfg.get("layers") or [])
    grouped: dict[str, dict[str, torch.Tensor]] = {p: {} for p in paths}
    for key, t in _read_tensors(folder / NATIVE_WEIGHTS).items():
        path, param = _split_native_key(key, paths)
        grouped[path][param] = t
    targets = cfg.get("target_modules") or sorted({p.rsplit(".", 1)[-1] for p in paths})
    options = normalise_rank(cfg.get("config") or {})
    return _SavedAdapter(cfg.get("method"), options, grouped, targets, peft=False)


def _method_for_peft_type(peft_type: object, folder: Path) -> type[Adapter]:
    found = [cls for _, cls in METHODS.items() if cls.peft_type == peft_type]
    if not found:
        known = sorted({"LORA", *(c.peft_type for _, c in METHODS.items() if c.peft_type)})
        raise CheckpointError(
            f"{folder}: peft_type {peft_type!r} is not supported; rankwise reads {known}"
        )
    return found[0]


def _read_peft_typed(model: nn.Module, folder: Path, cfg: dict) -> _SavedAdapter:
    """A PEFT folder of a non-LoRA type, read through the method's PEFT hooks."""
    cls = _method_for_peft_type(cfg.get("peft_type"), folder)
    for key in ("modules_to_save", "layers_to_transform", "trainable_token_indices"):
        if cfg.get(key) not in (None, [], {}):
            raise CheckpointError(
                f"{folder}/{CONFIG_FILE}: {key}={cfg[key]!r} is not supported by rankwise"
            )
    try:
        options = cls.options_from_peft(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: {e}") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}

    def keep_shared(key: str, name: str, t: torch.Tensor) -> None:
        if name in shared and not torch.equal(shared[name], t):
            raise CheckpointError(f"{folder}: tensor {key!r} differs from another copy of {name}")
        shared[name] = t

    for key, t in _read_tensors(folder / PEFT_WEIGHTS).items():
        if key.startswith(PEFT_PREFIX):
            rest = key[len(PEFT_PREFIX) :]
            path, _, suffix = rest.rpartition(".")
            if suffix not in cls.peft_suffixes or not path:
                raise CheckpointError(f"tensor {key!r} is not a {cls.method} tensor rankwise knows")
            if suffix in cls.peft_shared:
                keep_shared(key, suffix, t)
            else:
                grouped.setdefault(path, {})[suffix] = t
        elif key.startswith(PEFT_MODEL_PREFIX) and key[len(PEFT_MODEL_PREFIX) :] in cls.peft_shared:
            keep_shared(key, key[len(PEFT_MODEL_PREFIX) :], t)
        else:
            raise CheckpointError(f"tensor {key!r} is not a {cls.method} tensor rankwise knows")
    return _SavedAdapter(cls.method, options, grouped, cfg.get("target_modules"), True, shared)


def _read_peft(model: nn.Module, folder: Path, cfg: dict) -> _SavedAdapter:
    if cfg.get("peft_type", "LORA") != "LORA":
        return _read_peft_typed(model, folder, cfg)
    method, options = _from_peft_config(cfg, folder)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _read_tensors(folder / PEFT_WEIGHTS).items():
        if key.endswith(".base_layer.weight"):  # PEFT copies targeted embeddings' weights
            _check_base_copy(model, key, t, folder)
            continue
        path, suffix = _split_peft_key(key)
        grouped.setdefault(path, {})[suffix] = t
    _apply_rank_pattern(cfg, options, grouped, folder)
    return _SavedAdapter(method, options, grouped, cfg.get("target_modules"), peft=True)


def _saved_config(folder: Path, cls: type[Adapter], saved: _SavedAdapter) -> AdapterConfig:
    options = {**saved.options, "init": "default"}  # the saved tensors are the initial state
    unknown = sorted(k for k in options if k not in cls.config_class.__dataclass_fields__)
    if unknown:
        warnings.warn(f"{folder}: ignoring unknown {saved.method} options {unknown}", stacklevel=3)
    try:
        return cls.config_class.from_saved(options)
    except ConfigError as e:
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: {e}") from None


def _layer_at(model: nn.Module, path: str, folder: Path) -> nn.Module:
    """The module an adapter for ``path`` wraps: the base layer when it is already adapted."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(
            f"{folder}: layer {path!r} does not exist in this model (made for another base model?)"
        ) from None
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _layout(module: nn.Module, view: LayerView) -> tuple:
    """What an adapter's shapes depend on: the layer's type, kind and weight/bias shapes."""
    bias = view.bias
    return (type(module), view.kind, tuple(view.weight.shape), view.weight.dtype,
            None if bias is None else tuple(bias.shape))  # fmt: skip


def _checked_tensors(
    model: nn.Module, folder: Path, cls: type[Adapter], config: AdapterConfig, saved: _SavedAdapter
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Adapter], dict[str, tuple]]:
    """Each layer's tensors under the adapter's own names, checked against throwaway
    (shape-only) adapters built on the model's real layers; also those probes and each
    layer's :func:`_layout`. Linear layers of one layout share one probe (a probe costs about
    a millisecond, and a model has hundreds of identical projections)."""
    prefix = PEFT_PREFIX if saved.peft else ""
    native: dict[str, dict[str, torch.Tensor]] = {}
    probes: dict[str, Adapter] = {}
    layouts: dict[str, tuple] = {}
    shared_probes: dict[tuple, Adapter] = {}
    for path, have in saved.tensors.items():
        module = _layer_at(model, path, folder)
        view = view_for(module)
        if view is None:
            raise CheckpointError(f"{folder}: {path!r} is a {type(module).__name__}, not adaptable")
        if reason := cls.check_layer(view, config):
            raise CheckpointError(f"{folder}: {path}: {reason}")
        layout = layouts[path] = _layout(module, view)
        probe = shared_probes.get(layout) if view.kind in ("linear", "transposed_linear") else None
        if probe is None:
            probe = shared_probes[layout] = cls(ShapeOnlyView(view), config, dtype=torch.float32)
        probes[path] = probe
        expected = probe.peft_state() if saved.peft else probe.state_dict()
        for key in expected:
            if key not in have:
                raise CheckpointError(f"{folder}: tensor {prefix}{path}.{key} is missing")
        for key, t in have.items():
            if key not in expected:
                raise CheckpointError(
                    f"{folder}: tensor {prefix}{path}.{key} is not a {saved.method} tensor for this layer"
                )
            _check_tensor(f"{prefix}{path}.{key}", t, expected[key].shape)
        native[path] = probe.peft_to_native(have) if saved.peft else dict(have)
    if saved.peft and cls.peft_shared and (reason := cls.check_peft_shared(saved.shared, probes)):
        raise CheckpointError(f"{folder}: {reason}")
    return native, probes, layouts


def _layers_without_weights(model: nn.Module, saved: _SavedAdapter) -> list[str]:
    """Layers of ``model`` that the adapter's own target patterns select but the file has no
    weights for (e.g. an adapter made on a 2-layer model, loaded into a 3-layer one)."""
    targets = saved.targets
    if not targets:
        return []
    if targets == "all-linear":
        matched = resolve_targets(model, "all-linear")
    elif isinstance(targets, str):  # PEFT: a regex the full module path must match
        try:
            matched = matching_paths(model, [re.compile(targets)])
        except re.error:
            return []
    else:
        matched = matching_paths(model, [t for t in targets if isinstance(t, str)])
    return [p for p in matched if p not in saved.tensors]


def _check_coverage(model: nn.Module, folder: Path, saved: _SavedAdapter, strict: bool) -> None:
    missing = _layers_without_weights(model, saved)
    if not missing:
        return
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    text = (
        f"{folder}: the adapter targets {saved.targets} but has no weights for "
        f"{len(missing)} layer(s) of this model: {missing[:5]}{more} (made for a model "
        "with fewer layers?)"
    )
    if strict:
        raise CheckpointError(
            f"{text}; pass strict=False to load it anyway, leaving those layers without the adapter"
        )
    warnings.warn(f"{text}; those layers stay without the adapter", stacklevel=3)


@dataclass
class AdapterCheckpoint:
    """An adapter folder read and checked against one model, not attached yet: what
    :func:`read_adapter` returns and :func:`attach_checkpoint` attaches.

    ``tensors`` are each layer's tensors under the adapter's own parameter names (``{layer
    path: {name: tensor}}``), ``config`` the method's validated config. Reading touches no
    model state, so a server can read while the model runs and take its lock only to attach.
    """

    folder: Path
    method: str
    config: AdapterConfig
    tensors: dict[str, dict[str, torch.Tensor]]
    shared: dict[str, torch.Tensor]
    probes: dict[str, Adapter]  # shape-only (meta) adapters, one per layer path (shared by alike layers)
    layouts: dict[str, tuple]  # the layer each path was checked against (see ``_layout``)
    model: weakref.ref

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors read."""
        tensors = [t for ts in self.tensors.values() for t in ts.values()] + list(self.shared.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def factor_shapes(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        """``{layer path: (A shape (r, in), B shape (out, r))}`` for the layers where the
        method's term is ``s·B(Ax)`` (:meth:`~rankwise.adapters.Adapter.delta_factors`), which
        per-row routing copies into the layer's slot pool; other layers are left out."""
        found = {}
        for path, probe in self.probes.items():
            if probe.layer.kind in ("linear", "transposed_linear"):
                factors = probe.delta_factors()
                if factors is not None:
                    found[path] = (factors[0].shape, factors[1].shape)
        return found


def read_adapter(
    model: nn.Module, directory: str | os.PathLike, *, strict: bool = True
) -> AdapterCheckpoint:
    """Read the adapter saved in ``directory`` (PEFT or rankwise format) and check it
    against ``model`` without changing the model: every key, shape, dtype and value
    (NaN/Inf), the config, and the layers its target patterns cover (see
    :func:`load_adapter` for ``strict``). Raises CheckpointError naming the problem.
    Attach the result with :func:`attach_checkpoint`."""
    folder = Path(directory)
    cfg = _read_config(folder)
    saved = (
        _read_native(folder, cfg)
        if cfg.get("format") == NATIVE_FORMAT
        else _read_peft(model, folder, cfg)
    )
    try:
        cls = get_method(saved.method)
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    if not saved.tensors:
        raise CheckpointError(f"{folder}: the adapter has no layers")
    config = _saved_config(folder, cls, saved)
    native, probes, layouts = _checked_tensors(model, folder, cls, config, saved)
    _check_coverage(model, folder, saved, strict)
    return AdapterCheckpoint(
        folder, saved.method, config, native, saved.shared, probes, layouts, weakref.ref(model)
    )


def _check_unchanged(model: nn.Module, checkpoint: AdapterCheckpoint) -> None:
    """Refuse to attach ``checkpoint`` to another model, or to layers that changed since."""
    if checkpoint.model() is not model:
        raise ConfigError(
            f"{checkpoint.folder}: this AdapterCheckpoint was read for another model; "
            "call read_adapter with this model"
        )
    for path, layout in checkpoint.layouts.items():
        try:
            module = _layer_at(model, path, checkpoint.folder)
        except CheckpointError:
            module = None
        view = None if module is None else view_for(module)
        if view is None or _layout(module, view) != layout:
            raise ConfigError(
                f"{checkpoint.folder}: layer {path!r} changed since the adapter was read; "
                "call read_adapter again"
            )


def attach_checkpoint(
    model: nn.Module,
    checkpoint: AdapterCheckpoint,
    name: str = "default",
    *,
    trainable: bool = False,
    activate: bool = True,
) -> AttachPlan:
    """Attach an adapter read by :func:`read_adapter` as ``name`` and copy its tensors in
    (frozen unless ``trainable``; joins the active set if ``activate``). Raises ConfigError
    (a name already used, another model, a layer changed since the read) with the model
    unchanged; a copy that fails anyway (the checkpoint altered after the read) removes the
    adapter again. Returns the :class:`AttachPlan`."""
    _check_unchanged(model, checkpoint)
    paths = list(checkpoint.tensors)
    target = re.compile("|".join(re.escape(p) for p in paths))  # one pattern: one pass over the modules
    plan = attach(
        model, checkpoint.method, target, name, activate=activate, trainable=trainable,
        **checkpoint.config.to_dict(),
    )  # fmt: skip
    try:
        with torch.no_grad():
            for path, values in checkpoint.tensors.items():
                adapter = model.get_submodule(path).adapters[name]
                state = adapter.state_dict()
                for key, t in values.items():
                    state[key].copy_(t)
                if checkpoint.shared:
                    adapter.load_peft_shared(checkpoint.shared)
    except BaseException:
        delete(model, name)
        raise
    return plan


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    *,
    trainable: bool = False,
    strict: bool = True,
    activate: bool = True,
) -> AttachPlan:
    """Attach the adapter saved in ``directory`` (PEFT or rankwise format) as ``name``.

    Loads for inference: the adapter's parameters stay frozen (``requires_grad=False``)
    unless ``trainable=True`` (to continue training it). Every key and shape is checked
    against the model before anything changes; a missing, extra, misshapen or corrupt
    tensor raises CheckpointError naming it. Layers that the adapter's own target patterns
    select in this model but that the file has no weights for raise CheckpointError naming
    them (``strict=False``: a warning, and those layers stay unadapted). Unknown config
    keys only warn. The model is unchanged on any error. Returns the :class:`AttachPlan`.

    The same as :func:`read_adapter` (files and checks, model untouched) followed by
    :func:`attach_checkpoint`.
    """
    checkpoint = read_adapter(model, directory, strict=strict)
    return attach_checkpoint(model, checkpoint, name, trainable=trainable, activate=activate)


def read_adapter_config(directory: str | os.PathLike) -> Mapping[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder (CheckpointError if bad)."""
    return _read_config(Path(directory))


__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "attach_checkpoint",
    "AdapterCheckpoint",
    "read_adapter_config",
]
