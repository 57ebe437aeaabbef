"""rankwise.pretrain: train a small LLaMA from scratch with a memory-efficient method.

``pretrain(PretrainConfig(config="llama-20m", method="galore", steps=1000), out="run")``
trains with one of :mod:`rankwise.optim`'s optimizers or a :mod:`rankwise.layers` layer
type, logs loss, validation perplexity, tokens/s, optimizer-state and weight bytes, writes
checkpoints it resumes from bit-identically, and runs data-parallel (DDP) or sharded (FSDP)
under ``torchrun``. :class:`Trainer` is the same loop one step at a time (bench/optim.py
interleaves methods with it). See docs/pretrain.md.
"""

from rankwise.pretrain.config import (
    MODEL_CONFIGS,
    ModelConfig,
    PretrainConfig,
    build_model,
    load_tokenizer,
    lr_factor,
)
from rankwise.pretrain.methods import OPTIMIZERS, method_names
from rankwise.pretrain.trainer import (
    Data,
    PretrainResult,
    StepRecord,
    Trainer,
    load_data,
    pretrain,
)

__all__ = [
    "MODEL_CONFIGS",
    "OPTIMIZERS",
    "Data",
    "ModelConfig",
    "PretrainConfig",
    "PretrainResult",
    "StepRecord",
    "Trainer",
    "build_model",
    "load_data",
    "load_tokenizer",
    "lr_factor",
    "method_names",
    "pretrain",
]
