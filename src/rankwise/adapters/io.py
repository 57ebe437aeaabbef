"""Saving and loading adapters: rankwise's own format and PEFT's, both as safetensors.

A folder holds ``adapter_config.json`` and the tensors:

- PEFT format (``lora``/``dora``): ``adapter_model.safetensors`` with PEFT's key names
  (``base_model.model.<module path>.lora_A.weight``, ``...lora_B.weight``,
  ``...lora_magnitude_vector``, ``lora_embedding_A``/``_B``) and a PEFT ``LoraConfig``
  (``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``, ``target_modules``,
  ``fan_in_fan_out``...). ``peft.PeftModel.from_pretrained`` loads it, and PEFT's folders
  load here.
- rankwise format (every method): ``adapter.safetensors`` keyed ``<module path>.<param>``
  and a config naming the method and its options.

Writes are atomic (temporary file, then ``os.replace``). Loading checks every key and
shape against the model before touching it: a bad file raises ``CheckpointError`` naming
the key and leaves the model unchanged.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, get_method, view_for
from rankwise.adapters.inject import (
    AttachPlan,
    ShapeOnlyView,
    adapted_layers,
    attach,
    resolve_targets,
)
from rankwise.errors import CheckpointError, ConfigError

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
NATIVE_WEIGHTS = "adapter.safetensors"
PEFT_PREFIX = "base_model.model."
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
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
)


# ----------------------------------------------------------------------------- writing


def _atomic_write_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, payload: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write_bytes(path, write)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write_bytes(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


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
    if any(a.config != first.config or a.method != first.method for a in adapters.values()):
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


def _peft_target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names if they select exactly ``paths``; otherwise the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    try:
        if set(resolve_targets(model, leaves)) == set(paths):
            return leaves
    except ConfigError:
        pass
    return sorted(paths)


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, name: str = "default", *, format: str = "auto"
) -> Path:
    """Write adapter ``name`` to ``directory``; returns the folder.

    ``format`` is ``"peft"`` (PEFT's files; lora/dora only), ``"rankwise"`` (any method),
    or ``"auto"`` (PEFT when the method has a PEFT form). Refuses an adapter whose tensors
    are all zero or contain NaN/Inf.
    """
    if format not in ("auto", "peft", "rankwise"):
        raise ConfigError(f"format must be 'auto', 'peft' or 'rankwise', got {format!r}")
    adapters = _named_adapters(model, name)
    config = _check_savable(name, adapters)
    first = next(iter(adapters.values()))
    peft_ok = all(a.peft_config() is not None for a in adapters.values())
    if format == "peft" and not peft_ok:
        raise ConfigError(f"method {first.method!r} has no PEFT format; use format='rankwise'")
    use_peft = format == "peft" or (format == "auto" and peft_ok)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if use_peft:
        tensors = {
            f"{PEFT_PREFIX}{path}.{suffix}": t
            for path, a in adapters.items()
            for suffix, t in a.peft_state().items()
        }
        cfg = dict(first.peft_config())
        cfg["fan_in_fan_out"] = any(a.layer.kind == "transposed_linear" for a in adapters.values())
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        cfg.update(
            target_modules=_peft_target_modules(model, list(adapters)),
            base_model_name_or_path=name_or_path or None,
            inference_mode=True,
            task_type=None,
            modules_to_save=None,
            rank_pattern={},
            alpha_pattern={},
        )
        _write_tensors(out / PEFT_WEIGHTS, tensors, {"format": "pt"})
        _write_json(out / CONFIG_FILE, cfg)
    else:
        tensors = {
            f"{path}.{key}": t for path, a in adapters.items() for key, t in a.state_dict().items()
        }
        options = config.to_dict()
        # init options may hold tensors or callables (EVA inputs, LoRA-SB's loss_fn); the
        # saved tensors already are the initial state, and loading resets init anyway
        options["init_options"] = {}
        cfg = {
            "format": NATIVE_FORMAT,
            "version": 1,
            "method": first.method,
            "config": options,
            "layers": sorted(adapters),
        }
        json.dumps(cfg)  # fail before anything is written
        _write_tensors(out / NATIVE_WEIGHTS, tensors, {"format": "pt"})
        _write_json(out / CONFIG_FILE, cfg)
    return out


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
        "r": cfg.get("r", 8),
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


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, name: str = "default", *, activate: bool = True
) -> AttachPlan:
    """Attach the adapter saved in ``directory`` (PEFT or rankwise format) as ``name``.

    Every key and shape is checked against the model before anything changes; a missing,
    extra, misshapen or corrupt tensor raises CheckpointError naming it. Unknown config
    keys only warn. Returns the :class:`AttachPlan` of the attached adapter.
    """
    folder = Path(directory)
    cfg = _read_config(folder)
    if cfg.get("format") == NATIVE_FORMAT:
        method = cfg.get("method")
        try:
            cls = get_method(method)
        except ConfigError as e:
            raise CheckpointError(f"{folder}: {e}") from None
        options = dict(cfg.get("config") or {})
        paths = list(cfg.get("layers") or [])
        tensors = _read_tensors(folder / NATIVE_WEIGHTS)
        grouped: dict[str, dict[str, torch.Tensor]] = {p: {} for p in paths}
        for key, t in tensors.items():
            path, param = _split_native_key(key, paths)
            grouped[path][param] = t
        peft = False
    else:
        method, options = _from_peft_config(cfg, folder)
        cls = get_method(method)
        tensors = _read_tensors(folder / PEFT_WEIGHTS)
        grouped = {}
        for key, t in tensors.items():
            if key.endswith(".base_layer.weight"):  # PEFT copies targeted embeddings' weights
                _check_base_copy(model, key, t, folder)
                continue
            path, suffix = _split_peft_key(key)
            grouped.setdefault(path, {})[suffix] = t
        paths = list(grouped)
        peft = True
    if not paths:
        raise CheckpointError(f"{folder}: the adapter has no layers")
    options["init"] = "default"  # the saved tensors are the initial state
    field_names = set(cls.config_class.__dataclass_fields__)
    unknown = sorted(k for k in options if k not in field_names)
    if unknown:
        warnings.warn(f"{folder}: ignoring unknown {method} options {unknown}", stacklevel=2)
    try:
        config, _ = cls.config_class.from_dict(options, strict=False)
    except ConfigError as e:
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: {e}") from None

    # validate against throwaway adapters built on the model's real layers
    found = {p: layer.base_layer for p, layer in adapted_layers(model).items()}
    native: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        try:
            module = found.get(path) or model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(
                f"{folder}: layer {path!r} does not exist in this model (made for another base model?)"
            ) from None
        view = view_for(module)
        if view is None:
            raise CheckpointError(f"{folder}: {path!r} is a {type(module).__name__}, not adaptable")
        reason = cls.check_layer(view, config)
        if reason:
            raise CheckpointError(f"{folder}: {path}: {reason}")
        probe = cls(ShapeOnlyView(view), config, dtype=torch.float32)
        expected = probe.peft_state() if peft else probe.state_dict()
        have = grouped.get(path, {})
        prefix = PEFT_PREFIX if peft else ""
        for key in expected:
            if key not in have:
                raise CheckpointError(f"{folder}: tensor {prefix}{path}.{key} is missing")
        for key, t in have.items():
            if key not in expected:
                raise CheckpointError(
                    f"{folder}: tensor {prefix}{path}.{key} is not a {method} tensor for this layer"
                )
            _check_tensor(f"{prefix}{path}.{key}", t, expected[key].shape)
        native[path] = probe.peft_to_native(have) if peft else dict(have)

    targets = [re.compile(re.escape(p)) for p in paths]
    plan = attach(model, method, targets, name, activate=activate, **config.to_dict())
    layers = adapted_layers(model)
    with torch.no_grad():
        for path, values in native.items():
            adapter = layers[path].adapters[name]
            state = adapter.state_dict()
            for key, t in values.items():
                state[key].copy_(t)
    return plan


def read_adapter_config(directory: str | os.PathLike) -> Mapping[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder (CheckpointError if bad)."""
    return _read_config(Path(directory))


__all__ = ["save_adapter", "load_adapter", "read_adapter_config"]
