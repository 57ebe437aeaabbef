"""Trans-LoRA: move a LoRA to a new base model with synthetic data, nearly data-free.

"Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning" (Wang et al.,
2024). The task data of an adapter may not be kept, but a handful of task examples is. So:

1. :func:`synthesize`: the **source base model itself** (its adapters switched off) writes
   synthetic task-like text, prompted with the beginnings of the few seed examples and
   sampled (``temperature``, ``top_k``);
2. :func:`distill`: a fresh LoRA on the **target** model learns to reproduce the source
   base + adapter's next-token distributions on that text (KL divergence at temperature
   ``distill_temperature``, every position).

:func:`transfer` does both. The target may differ in width, depth and weights; it must
share the tokenizer (the logits are compared token by token). The paper also trains a
discriminator to filter the synthetic samples; that is not in this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapters.inject import adapted_layers, attach, disable
from rankwise.adapters.local_training import batches_of, check_positive, train_adapters
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class TransLoraConfig:
    """Options of :func:`transfer`.

    Synthesis: ``samples`` sequences of ``length`` tokens, each prompted with the first
    ``prompt_tokens`` tokens of a seed example (cycled), sampled at ``temperature``
    (``top_k`` 0: no cut). Distillation: a LoRA (``rank``, ``alpha``, ``targets``) trained
    ``steps`` AdamW steps at ``lr`` on ``batch_size`` sequences, KL at ``distill_temperature``.
    """

    samples: int = 64
    length: int = 64
    prompt_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    rank: int = 8
    alpha: float | None = None
    targets: str | tuple[str, ...] = "all-linear"
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    distill_temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "length", "prompt_tokens", "rank", "steps", "batch_size"):
            check_positive(name, getattr(self, name))
        if self.prompt_tokens >= self.length:
            raise ConfigError(
                f"prompt_tokens={self.prompt_tokens} must be below length={self.length} (the "
                "synthetic text is what the model writes after the prompt)"
            )
        for name in ("temperature", "distill_temperature", "lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: no cut), got {self.top_k}")


def _prompts(tokenizer, seeds: Sequence[str], config: TransLoraConfig) -> torch.Tensor:
    if isinstance(seeds, str) or len(seeds) == 0:
        raise ConfigError("give a few task examples as seeds (a list of strings) to prompt the synthesis")
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"][: config.prompt_tokens] for s in seeds]
    short = [i for i, x in enumerate(ids) if len(x) < config.prompt_tokens]
    if short:
        raise ConfigError(
            f"seed examples {short[:3]} have fewer than prompt_tokens={config.prompt_tokens} "
            "tokens; give longer examples or a smaller prompt_tokens"
        )
    rows = [ids[i % len(ids)] for i in range(config.samples)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def synthesize(model: nn.Module, tokenizer, seeds: Sequence[str], config: TransLoraConfig | None = None) -> torch.Tensor:
    """Synthetic task text ``(samples, length)`` token ids written by ``model``'s base (its
    adapters disabled), prompted with the starts of the ``seeds`` examples."""
    config = config or TransLoraConfig()
    prompts = _prompts(tokenizer, seeds, config)
    new = config.length - config.prompt_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with torch.random.fork_rng(devices=[]), disable(model):
        torch.manual_seed(config.seed)
        was_training = model.training
        model.eval()
        for i in range(0, len(prompts), config.batch_size):
            batch = prompts[i : i + config.batch_size]
            out.append(
                model.generate(
                    batch,
                    attention_mask=torch.ones_like(batch),
                    do_sample=True,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=pad,
                )
            )
        model.train(was_training)
    return torch.cat(out)[:, : config.length]


def check_compatible(source: nn.Module, target: nn.Module) -> None:
    """ConfigError unless both models predict over the same vocabulary."""
    vs = getattr(getattr(source, "config", None), "vocab_size", None)
    vt = getattr(getattr(target, "config", None), "vocab_size", None)
    if vs is None or vs != vt:
        raise ConfigError(
            f"Trans-LoRA distils next-token distributions, so source and target must share the "
            f"tokenizer; vocab sizes differ ({vs} vs {vt}); pick a target of the same tokenizer"
        )


def distillation_loss(teacher: nn.Module, temperature: float):
    """``loss_fn(student, batch)``: KL(teacher ‖ student) of the next-token distributions at
    ``temperature``, mean over positions, times ``T²`` (Hinton et al. 2015)."""

    def loss_fn(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=batch).logits.float() / temperature, -1)
        pred = F.log_softmax(student(input_ids=batch).logits.float() / temperature, -1)
        kl = F.kl_div(pred.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        return kl * temperature**2

    return loss_fn


@dataclass
class TransferResult:
    """The target model with the transferred adapter, the synthetic data, the distillation losses."""

    model: nn.Module
    synthetic: torch.Tensor
    losses: list[float]


def distill(source: nn.Module, target: nn.Module, synthetic: torch.Tensor, config: TransLoraConfig | None = None, *, name: str = "default") -> list[float]:
    """Attach LoRA ``name`` to ``target`` and train it to match ``source`` (with its active
    adapters) on ``synthetic`` token blocks; returns the per-step losses."""
    config = config or TransLoraConfig()
    check_compatible(source, target)
    if not adapted_layers(source):
        raise ConfigError("the source model carries no adapter to transfer; attach or load one first")
    batches = batches_of(synthetic, min(config.batch_size, len(synthetic)), seed=config.seed)
    torch.manual_seed(config.seed)
    attach(target, "lora", list(config.targets) if isinstance(config.targets, tuple) else config.targets, name=name, rank=config.rank, alpha=config.alpha)
    source.eval()
    loss_fn = distillation_loss(source, config.distill_temperature)
    return train_adapters(target, batches, steps=config.steps, lr=config.lr, loss_fn=loss_fn).losses


def transfer(source: nn.Module, target: nn.Module, tokenizer, seeds: Sequence[str], config: TransLoraConfig | None = None) -> TransferResult:
    """Trans-LoRA: synthesize with ``source``'s base, distil ``source`` + adapter into a new
    LoRA on ``target`` (see the module docstring). ``target`` is changed in place."""
    config = config or TransLoraConfig()
    check_compatible(source, target)
    if not adapted_layers(source):
        raise ConfigError("the source model carries no adapter to transfer; attach or load one first")
    synthetic = synthesize(source, tokenizer, seeds, config)
    losses = distill(source, target, synthetic, config)
    return TransferResult(target, synthetic, losses)


__all__ = [
    "TransLoraConfig",
    "TransferResult",
    "check_compatible",
    "distill",
    "distillation_loss",
    "synthesize",
    "transfer",
]
