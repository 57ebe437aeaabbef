"""Trans-LoRA: move a LoRA to a new base model with synthetic data, nearly data-free.

"Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning" (Wang et al.,
2024). The task data of an adapter may not be kept, but a handful of task examples is. So:

1. :func:`synthesize`: a base model (its adapters switched off) writes synthetic task-like
   text, prompted with the beginnings of the few seed examples and sampled (``temperature``,
   ``top_k``). ``synthesizer`` picks which: the **source** base (default) or, as in the
   paper, the new **target** base;
2. optionally (``discriminator=True``), the paper's filter: on the source side, a
   :class:`Discriminator` — a copy of the source base model with its own LoRA
   (``discriminator_rank``; 0: the frozen base) and a logistic head on the mean last hidden
   state — learns to tell the real seed examples from synthetic text written by the source
   base (:func:`fit_discriminator`). Then ``samples / keep`` candidates are synthesized and
   the ``samples`` it judges most real-like are kept (:func:`filter_synthetic`): raw samples
   are less diverse and less task-like than the real data, and the filter moves the
   distillation set towards it. The discriminator compares the first ``window`` tokens of
   every sequence, ``window = min(length, shortest seed)``, so length is no cue;
3. :func:`distill`: a fresh LoRA on the **target** model learns to reproduce the source
   base + adapter's next-token distributions on that text (KL divergence at temperature
   ``distill_temperature``, every position).

:func:`transfer` does all three. The target may differ in width, depth and weights; it must
share the tokenizer (the logits are compared token by token).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapters.inject import adapted_layers, adapter_names, attach, delete, disable
from rankwise.adapters.local_training import batches_of, check_positive, train_adapters
from rankwise.errors import ConfigError

SYNTHESIZERS = ("source", "target")


@dataclass(frozen=True)
class TransLoraConfig:
    """Options of :func:`transfer`.

    Synthesis: ``samples`` sequences of ``length`` tokens, each prompted with the first
    ``prompt_tokens`` tokens of a seed example (cycled), sampled at ``temperature``
    (``top_k`` 0: no cut). Distillation: a LoRA (``rank``, ``alpha``, ``targets``) trained
    ``steps`` AdamW steps at ``lr`` on ``batch_size`` sequences, KL at ``distill_temperature``.
    ``synthesizer``: the base model that writes the distillation text, "source" or "target".
    Filter (``discriminator=True``): a discriminator with a rank-``discriminator_rank`` LoRA
    trained ``discriminator_steps`` steps at ``discriminator_lr`` on the seeds against
    ``discriminator_samples`` synthetic sequences of the source base; it keeps the ``samples``
    most real-like of ``ceil(samples / keep)`` candidates.
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
    synthesizer: str = "source"
    discriminator: bool = False
    keep: float = 0.5
    discriminator_rank: int = 4
    discriminator_samples: int = 32
    discriminator_steps: int = 40
    discriminator_lr: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("samples", "length", "prompt_tokens", "rank", "steps", "batch_size"):
            check_positive(name, getattr(self, name))
        if self.prompt_tokens >= self.length:
            raise ConfigError(
                f"prompt_tokens={self.prompt_tokens} must be below length={self.length} (the "
                "synthetic text is what the model writes after the prompt)"
            )
        for name in ("discriminator_samples", "discriminator_steps"):
            check_positive(name, getattr(self, name))
        for name in ("temperature", "distill_temperature", "lr", "discriminator_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: no cut), got {self.top_k}")
        if self.synthesizer not in SYNTHESIZERS:
            raise ConfigError(f"synthesizer must be one of {SYNTHESIZERS} (the base model that writes the text), got {self.synthesizer!r}")
        if not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise ConfigError(f"keep (the fraction of synthetic candidates the discriminator keeps) must be in (0, 1], got {self.keep!r}")
        if isinstance(self.discriminator_rank, bool) or not isinstance(self.discriminator_rank, int) or self.discriminator_rank < 0:
            raise ConfigError(f"discriminator_rank must be an integer >= 0 (0: head only, on the frozen base), got {self.discriminator_rank!r}")


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


class Discriminator(nn.Module):
    """Trans-LoRA's discriminator: ``P(real)`` of token sequences ``(n, window)``.

    A copy of ``base`` without its adapters (frozen), with its own LoRA "discriminator" of
    rank ``rank`` on ``targets`` (rank 0: none, the frozen features alone), and a linear head
    on the mean of the last hidden state. Only the LoRA and the head train."""

    def __init__(self, base: nn.Module, *, rank: int = 4, targets="all-linear") -> None:
        super().__init__()
        self.body = copy.deepcopy(base)
        for name in adapter_names(self.body):
            delete(self.body, name)
        self.body.requires_grad_(False)
        if rank:
            attach(self.body, "lora", targets, name="discriminator", rank=rank)
        self.head = nn.Linear(self.body.config.hidden_size, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The logit of "real" per sequence, ``(n,)``."""
        hidden = self.body(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        return self.head(hidden.float().mean(1)).squeeze(-1)

    @torch.no_grad()
    def prob_real(self, ids: torch.Tensor, *, batch_size: int = 16) -> torch.Tensor:
        """``P(real)`` of every row of ``ids``, ``(n,)``, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([torch.sigmoid(self(ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)])
        finally:
            self.train(was_training)


def fit_discriminator(
    base: nn.Module,
    real: torch.Tensor,
    synthetic: torch.Tensor,
    *,
    rank: int = 4,
    steps: int = 40,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
) -> Discriminator:
    """A :class:`Discriminator` on a copy of ``base`` trained to tell ``real`` token sequences
    from ``synthetic`` ones (both ``(n, window)``): logistic loss, the classes weighted to
    count equally, ``steps`` AdamW steps at ``lr``."""
    if real.dim() != 2 or synthetic.dim() != 2 or real.shape[1] != synthetic.shape[1] or not len(real) or not len(synthetic):
        raise ConfigError(
            f"the discriminator needs real and synthetic token sequences of one width, got shapes "
            f"{tuple(real.shape)} and {tuple(synthetic.shape)}"
        )
    torch.manual_seed(seed)
    model = Discriminator(base, rank=rank)
    ids = torch.cat([real, synthetic])
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(synthetic))])
    weight = torch.tensor(len(synthetic) / len(real))

    def loss_fn(disc: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        rows = rows[:, 0]
        return F.binary_cross_entropy_with_logits(disc(ids[rows]), labels[rows], pos_weight=weight)

    rows = batches_of(torch.arange(len(ids)).unsqueeze(1), min(batch_size, len(ids)), seed=seed)
    train_adapters(model, rows, steps=steps, lr=lr, loss_fn=loss_fn)
    return model.eval()


def _window(tokenizer, seeds: Sequence[str], config: TransLoraConfig) -> int:
    shortest = min(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in seeds)
    window = min(config.length, shortest)
    if window <= config.prompt_tokens:
        raise ConfigError(
            f"the discriminator compares the first min(length, shortest seed) = {window} tokens of "
            f"seeds and samples, which must be more than prompt_tokens={config.prompt_tokens} (the "
            "part every sample copies from a seed); give longer seeds or a smaller prompt_tokens"
        )
    return window


def train_discriminator(source: nn.Module, tokenizer, seeds: Sequence[str], config: TransLoraConfig | None = None) -> tuple[Discriminator, int]:
    """The source side of the filter: ``config.discriminator_samples`` sequences written by
    ``source``'s base (seeded apart from the transfer data), and a :class:`Discriminator`
    trained on the seed examples (real) against them. Returns it and its ``window``."""
    config = config or TransLoraConfig()
    _prompts(tokenizer, seeds, config)  # the seeds' checks, before any work
    window = _window(tokenizer, seeds, config)
    real = torch.tensor([tokenizer(s, add_special_tokens=False)["input_ids"][:window] for s in seeds], dtype=torch.long)
    fake = synthesize(source, tokenizer, seeds, replace(config, samples=config.discriminator_samples, seed=config.seed + 1))
    disc = fit_discriminator(
        source, real, fake[:, :window], rank=config.discriminator_rank, steps=config.discriminator_steps,
        lr=config.discriminator_lr, batch_size=config.batch_size, seed=config.seed,
    )
    return disc, window


def filter_synthetic(discriminator: Discriminator, candidates: torch.Tensor, count: int, *, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kept rows, P(real) of every candidate, kept indices)``: the ``count`` candidates the
    discriminator judges most real-like (scored on their first ``window`` tokens), in their
    original order."""
    if not 1 <= count <= len(candidates):
        raise ConfigError(f"cannot keep {count} of {len(candidates)} synthetic candidates")
    scores = discriminator.prob_real(candidates[:, :window])
    kept = torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values
    return candidates[kept], scores, kept


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
    """The target model with the transferred adapter, the synthetic data it was distilled on,
    the distillation losses; with the filter, every candidate's ``P(real)`` (``scores``) and
    the indices of the candidates kept (``kept``)."""

    model: nn.Module
    synthetic: torch.Tensor
    losses: list[float]
    scores: torch.Tensor | None = None
    kept: torch.Tensor | None = None


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
    """Trans-LoRA: synthesize with the ``config.synthesizer`` base, filter with a discriminator
    if ``config.discriminator``, distil ``source`` + adapter into a new LoRA on ``target``
    (see the module docstring). ``target`` is changed in place."""
    config = config or TransLoraConfig()
    check_compatible(source, target)
    if not adapted_layers(source):
        raise ConfigError("the source model carries no adapter to transfer; attach or load one first")
    writer = source if config.synthesizer == "source" else target
    if not config.discriminator:
        synthetic = synthesize(writer, tokenizer, seeds, config)
        return TransferResult(target, synthetic, distill(source, target, synthetic, config))
    discriminator, window = train_discriminator(source, tokenizer, seeds, config)
    candidates = synthesize(writer, tokenizer, seeds, replace(config, samples=math.ceil(config.samples / config.keep)))
    synthetic, scores, kept = filter_synthetic(discriminator, candidates, config.samples, window=window)
    del discriminator
    return TransferResult(target, synthetic, distill(source, target, synthetic, config), scores, kept)


__all__ = [
    "Discriminator",
    "TransLoraConfig",
    "TransferResult",
    "check_compatible",
    "distill",
    "distillation_loss",
    "filter_synthetic",
    "fit_discriminator",
    "synthesize",
    "train_discriminator",
    "transfer",
]
