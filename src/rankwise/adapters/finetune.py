"""Causal-LM fine-tuning with an adapter: what ``rankwise finetune`` does, as one call.

``finetune(FinetuneConfig(...))`` loads a model, attaches an adapter of any registered
method, trains it with AdamW (gradient accumulation, gradient clipping, linear warm-up then
cosine decay, optional gradient checkpointing), measures validation perplexity before and
after, and saves the adapter in PEFT's format.

Data parallel: run the same command under ``torchrun --nproc_per_node N``; each process
takes its slice of every global batch (gloo on CPU, NCCL on GPUs), DDP averages the
gradients, and only rank 0 evaluates and saves. The global batch per optimizer step is
``batch_size × world_size × grad_accum`` blocks, taken in the same seeded order whatever
the world size, so a 2-process run computes the same updates as one process with twice
the batch.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.data import check_window, load_corpus, perplexity, token_blocks
from rankwise.errors import ConfigError, DataError
from rankwise.models import count_parameters, load_model
from rankwise.progress import Bar


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of :func:`finetune`; ``method_options`` go to the adapter method (``attach``)."""

    model: str = "smollm2"
    method: str = "lora"
    rank: int = 16
    alpha: float | None = None
    targets: Any = "all-linear"
    method_options: dict[str, Any] = field(default_factory=dict)
    data: str = "builtin"
    steps: int = 100
    batch_size: int = 4  # blocks per process per micro-step
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # default: 5% of steps
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    eval_tokens: int = 8192
    seed: int = 0
    out: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        check_window(self.seq_len, None)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"
            )
        if self.eval_tokens < 0:
            raise ConfigError(
                f"eval_tokens must be >= 0 (0 skips evaluation), got {self.eval_tokens}"
            )


@dataclass
class FinetuneResult:
    """What a fine-tuning run did: losses, perplexities, speed, where the adapter went."""

    config: dict[str, Any]
    losses: list[float]
    perplexity_before: float | None
    perplexity_after: float | None
    tokens_per_second: float
    seconds: float
    trainable_parameters: int
    total_parameters: int
    world_size: int
    rank: int  # this process's rank; only rank 0 evaluates, saves and reports
    out: str | None


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr_lambda(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _check_out(out: str | None, overwrite: bool) -> None:
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise ConfigError(
            f"output folder {out!r} exists and is not empty; pass overwrite=True (--overwrite)"
        )


def finetune(config: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``config.model`` with a ``config.method`` adapter; see the module docstring."""
    from rankwise.adapters import attach, trainable_parameters

    _check_out(config.out, config.overwrite)
    rank, world = _distributed()
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model)
    if not hasattr(model, "lm_head"):
        raise ConfigError(
            f"finetune trains causal LMs; {config.model!r} ({type(model).__name__}) is not one"
        )
    attach(
        model,
        config.method,
        config.targets,
        r=config.rank,
        alpha=config.alpha,
        **config.method_options,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    report = trainable_parameters(model)

    corpus = load_corpus(config.data)
    global_batch = config.batch_size * world * config.grad_accum
    needed = config.steps * global_batch
    blocks = token_blocks(
        tokenizer, corpus.train, seq_len=config.seq_len, max_tokens=needed * config.seq_len
    )
    if len(blocks) < global_batch:
        raise DataError(
            f"training text gives {len(blocks)} blocks of {config.seq_len} tokens, fewer than one "
            f"global batch ({global_batch}); use more text or a smaller --batch-size/--seq-len"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(config.seed))

    def evaluate() -> float | None:
        if config.eval_tokens == 0 or rank != 0:
            return None
        res = perplexity(
            model,
            tokenizer,
            corpus.validation,
            seq_len=min(config.seq_len, 512),
            max_tokens=config.eval_tokens,
            progress=progress,
        )
        return res.perplexity

    ppl_before = evaluate()
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.steps, warmup))

    model.train()
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    bar = Bar(config.steps, f"finetune {config.method}", show=progress and rank == 0)
    cursor = 0
    try:
        for _ in range(config.steps):
            step_loss = 0.0
            for micro in range(config.grad_accum):
                idx = order[(cursor + torch.arange(config.batch_size * world)) % len(blocks)]
                cursor += config.batch_size * world
                mine = blocks[idx[rank * config.batch_size : (rank + 1) * config.batch_size]]
                last = micro == config.grad_accum - 1
                sync = net.no_sync() if world > 1 and not last else nullcontext()
                with sync:
                    loss = net(input_ids=mine, labels=mine).loss / config.grad_accum
                    loss.backward()
                step_loss += loss.item()
                tokens += mine.numel() * world
            if world > 1:  # report the loss of the whole global batch, not this rank's share
                reduced = torch.tensor(step_loss)
                torch.distributed.all_reduce(reduced)
                step_loss = reduced.item() / world
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set(loss=step_loss, tok_s=round(tokens / elapsed), lr=schedule.get_last_lr()[0])
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()
    ppl_after = evaluate()
    if config.out is not None and rank == 0:
        from rankwise.adapters.io import save_adapter

        save_adapter(model, config.out, format="peft", overwrite=config.overwrite)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return FinetuneResult(
        config=asdict(config),
        losses=losses,
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        tokens_per_second=tokens / seconds,
        seconds=seconds,
        trainable_parameters=report.trainable,
        total_parameters=count_parameters(model),
        world_size=world,
        rank=rank,
        out=config.out,
    )
