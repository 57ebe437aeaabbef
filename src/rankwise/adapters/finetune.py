"""Causal-LM fine-tuning with an adapter: what ``rankwise finetune`` does, as one call.

``finetune(FinetuneConfig(...))`` loads a model, attaches an adapter of any registered
method, trains it with AdamW (gradient accumulation, gradient clipping, linear warm-up then
cosine decay, optional gradient checkpointing), measures validation perplexity before and
after, and saves the adapter with :func:`~rankwise.adapters.save_adapter` (``format="auto"``:
PEFT's format for lora/dora, rankwise's for the other methods), recording the base model as
the user named it.

Before any slow work the output folder is checked (:func:`rankwise.fileio.check_output_dir`),
the method options are validated, and right after loading, ``seq_len`` is checked against
the model's context. Initialisers that need data (``lora_sb``'s default init, ``init=eva``)
get the first :data:`INIT_BLOCKS` training blocks as ``inputs``. Residual inits (``pissa``,
``nystrom``, nlora's default) rewrite the base weights; before saving, the adapter is
converted with :func:`~rankwise.adapters.init.residual_to_lora` into a plain LoRA that
loads on the original model.

Training rules (:mod:`rankwise.adapters.rules`): ``rules=("allora",)`` switches rules on
(options in ``rule_options``, ``key=value`` or ``rule.key=value``); rules a method needs
(IncreLoRA's rank growth) come on by themselves. Their hooks run around every step (before
the forward/backward, after backward before clipping, before and after the optimizer step);
a rule that cannot train the chosen method is a ConfigError before training starts.

Checkpoints: with ``checkpoint_every=N`` the adapter tensors (safetensors), optimizer and
scheduler state, the RNG state, the data cursor and the losses so far are written every N
steps to ``<out>.checkpoint/`` (:func:`checkpoint_dir`; atomically, replacing the previous
one). ``resume=True`` continues from it, so an interrupted and resumed run ends with the
same adapter weights and losses as an uninterrupted one. The folder is removed after the
adapter is saved.

Data parallel: run the same command under ``torchrun --nproc_per_node N``; each process
takes its slice of every global batch (gloo on CPU, NCCL on GPUs), DDP averages the
gradients, and only rank 0 evaluates and saves. The global batch per optimizer step is
``batch_size × world_size × grad_accum`` blocks, taken in the same seeded order whatever
the world size, so a 2-process run computes the same updates as one process with twice
the batch.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from rankwise.adapters.base import Adapter, AdapterConfig, get_initialiser, get_method
from rankwise.adapters.init import has_residual_init, residual_to_lora, residual_unconvertible
from rankwise.adapters.inject import adapted_layers, attach, trainable_parameters
from rankwise.adapters.io import save_adapter
from rankwise.adapters.rules import TrainingRules, build_rules
from rankwise.data import check_window, load_corpus, perplexity, token_blocks
from rankwise.errors import CheckpointError, ConfigError, DataError
from rankwise.fileio import MANIFEST, check_output_dir, output_dir, write_json
from rankwise.models import check_seq_len, count_parameters
from rankwise.progress import Bar, stage

INIT_BLOCKS = 8  # training blocks given to data-driven initialisers (lora_sb, eva) as inputs
_NOT_IN_FINGERPRINT = ("out", "overwrite", "resume", "checkpoint_every")


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of :func:`finetune`; ``method_options`` go to the adapter method (``attach``).

    ``checkpoint_every``: write a checkpoint every N optimizer steps (0: never; needs
    ``out``). ``resume``: continue from the checkpoint in :func:`checkpoint_dir` of ``out``.
    """

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
    checkpoint_every: int = 0
    resume: bool = False
    rules: tuple[str, ...] = ()  # training rules, run in this order (rankwise.adapters.rules)
    rule_options: dict[str, Any] = field(default_factory=dict)

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
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int):
            raise ConfigError(f"checkpoint_every must be an integer, got {self.checkpoint_every!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(
                f"checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}"
            )
        if (self.checkpoint_every or self.resume) and self.out is None:
            raise ConfigError(
                "checkpoint_every/resume need out (--out): the checkpoint lives beside the adapter"
            )
        if isinstance(self.rules, str):
            object.__setattr__(self, "rules", (self.rules,))
        object.__setattr__(self, "rules", tuple(self.rules))
        for key in ("rank", "r", "alpha"):
            if key in self.method_options:
                flag = "alpha" if key == "alpha" else "rank"
                raise ConfigError(
                    f"method option {key!r}: give it as {flag}=... (--{flag}), not as a method option"
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
    resumed_from: int = 0  # the step a resumed run continued from (0: started fresh)


@dataclass
class _Progress:
    """The training state a checkpoint carries besides tensors."""

    step: int = 0
    cursor: int = 0
    losses: list[float] = field(default_factory=list)
    perplexity_before: float | None = None
    rules: TrainingRules | None = None  # their state goes into checkpoints


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where :func:`finetune` keeps the checkpoints of a run saving to ``out``: ``<out>.checkpoint``."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def distributed_rank() -> tuple[int, int]:
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


# ----------------------------------------------------------------------------- checks before work


def _adapter_config(config: FinetuneConfig) -> tuple[dict[str, Any], AdapterConfig]:
    """The options for ``attach`` and the config they make (validated: method, types, init)."""
    options = {"rank": config.rank, "alpha": config.alpha, **config.method_options}
    adapter_config, _ = get_method(config.method).config_class.from_dict(options)
    get_initialiser(adapter_config.init)
    return options, adapter_config


def _training_rules(config: FinetuneConfig) -> TrainingRules:
    """The run's rules (``config.rules`` then those the method implies), options validated."""
    return TrainingRules(build_rules(config.rules, config.rule_options, methods=[config.method]))


def _check_destination(config: FinetuneConfig) -> None:
    """The output folder and the checkpoint folder, before anything slow happens."""
    if config.out is None:
        return
    check_output_dir(config.out, overwrite=config.overwrite)
    folder = checkpoint_dir(config.out)
    if config.resume:
        if not (folder / "checkpoint.json").is_file():
            raise CheckpointError(
                f"--resume: no checkpoint at {str(folder)!r} (written with --checkpoint-every); "
                "run without --resume to start over"
            )
        return
    if folder.exists() and not config.overwrite:
        raise CheckpointError(
            f"a checkpoint of an interrupted run is at {str(folder)!r}; pass --resume to continue "
            "it, or --overwrite to start over (it is then replaced)"
        )
    if config.checkpoint_every:
        check_output_dir(folder, overwrite=True, option="checkpoint folder")


# ----------------------------------------------------------------------------- checkpoints


def _fingerprint(config: FinetuneConfig) -> dict[str, Any]:
    """The options a resumed run must share with the run that wrote the checkpoint."""
    values = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_FINGERPRINT}
    return json.loads(json.dumps(values, default=repr))


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{key}": t
        for path, layer in adapted_layers(model).items()
        for key, t in layer.adapters["default"].state_dict().items()
    }


def _save_checkpoint(folder: Path, model, optimizer, schedule, progress: _Progress, config) -> None:
    tensors = {k: t.detach().cpu().contiguous() for k, t in _adapter_state(model).items()}
    trainer = {
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "step": progress.step,
        "cursor": progress.cursor,
        "losses": torch.tensor(progress.losses, dtype=torch.float64),
        "rules": progress.rules.state_dict() if progress.rules else {},
    }
    meta = {
        "step": progress.step,
        "config": _fingerprint(config),
        "perplexity_before": progress.perplexity_before,
    }
    with output_dir(folder, overwrite=True, kind="finetune-checkpoint", option="checkpoint") as tmp:
        save_file(tensors, str(tmp / "adapter.safetensors"))
        torch.save(trainer, tmp / "trainer.pt")
        write_json(tmp / "checkpoint.json", meta)


def _load_checkpoint(folder: Path, model, optimizer, schedule, config, rules) -> _Progress:
    """Restore adapter tensors, optimizer, scheduler and RNG; CheckpointError if it does not fit."""
    try:
        meta = json.loads((folder / "checkpoint.json").read_text())
        tensors = load_file(str(folder / "adapter.safetensors"))
        trainer = torch.load(folder / "trainer.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {str(folder)!r} cannot be read: {e}") from None
    saved, now = meta.get("config", {}), _fingerprint(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint in {str(folder)!r} was written with other options "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); resume with the same options"
        )
    state = _adapter_state(model)
    if set(tensors) != set(state) or any(tensors[k].shape != state[k].shape for k in state):
        raise CheckpointError(f"checkpoint {str(folder)!r} does not match this adapter's tensors")
    with torch.no_grad():
        for key, t in state.items():
            t.copy_(tensors[key])
    optimizer.load_state_dict(trainer["optimizer"])
    schedule.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    if rules:
        rules.load_state_dict(trainer.get("rules", {}))
    return _Progress(
        step=int(trainer["step"]),
        cursor=int(trainer["cursor"]),
        losses=trainer["losses"].tolist(),
        perplexity_before=meta.get("perplexity_before"),
    )


def trainable_adapters(model: nn.Module) -> list[Adapter]:
    """The trainable adapters of ``model`` (collected once per run, not per step)."""
    return list(trainable_adapter_map(model).values())


def trainable_adapter_map(model: nn.Module) -> dict[str, Adapter]:
    """``{module path: adapter}`` for the trainable adapters (a layer with several trainable
    adapters lists them as ``path[name]``)."""
    out: dict[str, Adapter] = {}
    for path, layer in adapted_layers(model).items():
        mine = [(n, a) for n, a in layer.adapters.items() if a.trainable]
        for name, adapter in mine:
            out[path if len(mine) == 1 else f"{path}[{name}]"] = adapter
    return out


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one at ``lr``, and one per learning-rate
    factor that adapters ask for (:meth:`~rankwise.adapters.Adapter.lr_multipliers`)."""
    factor_of: dict[int, float] = {}
    for layer in adapted_layers(model).values():
        for adapter in layer.adapters.values():
            params = dict(adapter.named_parameters())
            for name, factor in adapter.lr_multipliers().items():
                factor_of[id(params[name])] = float(factor)
    groups: dict[float, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(factor_of.get(id(p), 1.0), []).append(p)
    order = sorted(groups, key=lambda f: (f != 1.0, f))  # the plain rate first: get_last_lr()[0]
    return [{"params": groups[f], "lr": lr * f} for f in order]


def before_optimizer_step(adapters: Iterable[Adapter], lr: float) -> None:
    """Each adapter's :meth:`~rankwise.adapters.Adapter.before_optimizer_step`:
    called after backward and clipping, before ``optimizer.step()``."""
    for adapter in adapters:
        adapter.before_optimizer_step(lr)


def _checkpoint_due(config: FinetuneConfig, step: int) -> bool:
    """Every ``checkpoint_every`` steps, except after the last one (the adapter is saved then)."""
    every = config.checkpoint_every
    return bool(every) and step % every == 0 and step < config.steps


def _remove_checkpoint(folder: Path) -> None:
    if (folder / MANIFEST).is_file():
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------- the run


def _training_blocks(
    config: FinetuneConfig, tokenizer, texts: list[str], world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks ``(n, seq_len)`` for the whole run and their seeded order."""
    global_batch = config.batch_size * world * config.grad_accum
    max_tokens = config.steps * global_batch * config.seq_len
    blocks = token_blocks(tokenizer, texts, seq_len=config.seq_len, max_tokens=max_tokens)
    if len(blocks) < global_batch:
        raise DataError(
            f"training text gives {len(blocks)} blocks of {config.seq_len} tokens, fewer than one "
            f"global batch ({global_batch}); use more text or a smaller --batch-size/--seq-len"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(config.seed))
    return blocks, order


def _accumulate_gradients(
    net: nn.Module, config: FinetuneConfig, blocks, order, state: _Progress, rank: int, world: int
) -> float:
    """Backward over the ``grad_accum`` micro-batches of one optimizer step (this process's
    share of each); advances ``state.cursor``; returns the global batch's mean loss."""
    step_loss = 0.0
    share = config.batch_size * world
    for micro in range(config.grad_accum):
        idx = order[(state.cursor + torch.arange(share)) % len(blocks)]
        state.cursor += share
        mine = blocks[idx[rank * config.batch_size : (rank + 1) * config.batch_size]]
        last = micro == config.grad_accum - 1
        with net.no_sync() if world > 1 and not last else nullcontext():
            loss = net(input_ids=mine, labels=mine).loss / config.grad_accum
            loss.backward()
        step_loss += loss.item()
    if world > 1:  # report the loss of the whole global batch, not this rank's share
        reduced = torch.tensor(step_loss)
        torch.distributed.all_reduce(reduced)
        step_loss = reduced.item() / world
    return step_loss


def _with_init_inputs(
    options: dict[str, Any], adapter_config: AdapterConfig, inputs: torch.Tensor
) -> dict[str, Any]:
    """Give an initialiser that takes ``inputs`` (and was given none) these token blocks."""
    init = get_initialiser(adapter_config.init)
    init_options = dict(adapter_config.init_options)
    if init is None or "inputs" in init_options:
        return options
    if "inputs" not in inspect.signature(init.fn).parameters:
        return options
    return {**options, "init_options": {**init_options, "inputs": inputs}}


def _check_residual(model: nn.Module) -> None:
    """A residual init must be convertible to a LoRA on the original base, or saving fails."""
    for layer in adapted_layers(model).values():
        adapter = layer.adapters["default"]
        if has_residual_init(adapter) and (reason := residual_unconvertible(adapter)):
            raise ConfigError(
                f"init={adapter.config.init!r} rewrites the base weights, and the adapter must be "
                f"converted to load on the original model: {reason}; choose another init or method"
            )


def _save(model: nn.Module, config: FinetuneConfig, progress: bool) -> None:
    if any(
        has_residual_init(layer.adapters["default"]) for layer in adapted_layers(model).values()
    ):
        residual_to_lora(model)  # base weights back to W; the adapter becomes a rank-2r LoRA
    with stage(f"save adapter to {config.out}", show=progress):
        save_adapter(model, config.out, overwrite=config.overwrite, base_model=config.model)


def finetune(
    config: FinetuneConfig,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``config.model`` with a ``config.method`` adapter; see the module docstring.

    ``on_step(step, loss)`` is called after every optimizer step (and its checkpoint).
    """
    options, adapter_config = _adapter_config(config)
    rules = _training_rules(config)
    _check_destination(config)
    rank, world = distributed_rank()
    torch.manual_seed(config.seed)
    with stage(f"load {config.model}", show=progress and rank == 0):
        model, tokenizer = rankwise.load_model(config.model)  # compressed folders too
    if not hasattr(model, "lm_head"):
        raise ConfigError(
            f"finetune trains causal LMs; {config.model!r} ({type(model).__name__}) is not one"
        )
    check_seq_len(model, config.seq_len)

    corpus = load_corpus(config.data)
    blocks, order = _training_blocks(config, tokenizer, corpus.train, world)
    init_inputs = blocks[order[:INIT_BLOCKS]]
    attach(
        model,
        config.method,
        config.targets,
        **_with_init_inputs(options, adapter_config, init_inputs),
    )
    _check_residual(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_map = trainable_adapter_map(model)
    adapters = list(adapter_map.values())
    report = trainable_parameters(model)

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

    optimizer = torch.optim.AdamW(
        param_groups(model, config.lr), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.steps, warmup))
    rules.setup(model, adapter_map, optimizer, steps=config.steps)
    folder = checkpoint_dir(config.out) if config.out is not None else None
    if config.resume:
        state = _load_checkpoint(folder, model, optimizer, schedule, config, rules)
    else:
        state = _Progress(perplexity_before=evaluate())
    state.rules = rules
    resumed_from = state.step

    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)

    model.train()
    tokens = 0
    t0 = time.perf_counter()
    bar = Bar(config.steps, f"finetune {config.method}", show=progress and rank == 0)
    bar.update(state.step)
    try:
        while state.step < config.steps:
            rules.before_backward(state.step)
            step_loss = _accumulate_gradients(net, config, blocks, order, state, rank, world)
            tokens += config.grad_accum * config.batch_size * world * config.seq_len
            rules.after_backward(state.step)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = schedule.get_last_lr()[0]
            before_optimizer_step(adapters, lr)
            rules.before_optimizer_step(state.step, lr)
            optimizer.step()
            rules.after_optimizer_step(state.step)
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state.losses.append(step_loss)
            state.step += 1
            if _checkpoint_due(config, state.step):
                if rank == 0:
                    _save_checkpoint(folder, model, optimizer, schedule, state, config)
                if world > 1:
                    torch.distributed.barrier()
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set(loss=step_loss, tok_s=round(tokens / elapsed), lr=schedule.get_last_lr()[0])
            if on_step is not None:
                on_step(state.step, step_loss)
    finally:
        rules.teardown()
        bar.close()
    seconds = time.perf_counter() - t0
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()
    ppl_after = evaluate()
    if config.out is not None and rank == 0:
        _save(model, config, progress)
        _remove_checkpoint(folder)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return FinetuneResult(
        config=asdict(config),
        losses=state.losses,
        perplexity_before=state.perplexity_before,
        perplexity_after=ppl_after,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        trainable_parameters=report.trainable,
        total_parameters=count_parameters(model),
        world_size=world,
        rank=rank,
        out=config.out,
        resumed_from=resumed_from,
    )
