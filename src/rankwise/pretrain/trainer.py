"""The pretraining loop: one :class:`Trainer` step at a time, and :func:`pretrain`, the whole run.

A run trains a randomly initialised LLaMA on consecutive token blocks of the data's train
split: step ``s`` reads blocks ``s·B … s·B + B - 1`` (modulo the number of blocks), so the
data position is the step and a resumed run reads exactly what an uninterrupted one would.
Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its slice of the global batch and
gradients are averaged with DDP (gloo on CPU), or the model is sharded with FSDP
(``torch.distributed.fsdp.fully_shard``) when ``fsdp=True``. A step whose gradients hold a
NaN/Inf (on any process) is skipped and counted; nothing in the model or the optimizer changes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankwise.data import load_corpus, perplexity, token_blocks
from rankwise.errors import ConfigError, DataError
from rankwise.pretrain.config import (
    TRAINED_TOKENIZERS,
    PretrainConfig,
    build_model,
    load_tokenizer,
    lr_factor,
    tokenizer_from_json,
)
from rankwise.pretrain.methods import (
    OPTIMIZERS,
    build_optimizer,
    check_method,
    optimizer_state_bytes,
    prepare_model,
    weight_bytes,
)

# Counters of rankwise's projected optimizers that are not in their state_dict.
_COUNTERS = ("skipped_steps", "refresh_seconds", "refresh_count")


@dataclass
class Data:
    """The token blocks a run trains on and the texts it validates on."""

    tokenizer: object
    train: torch.Tensor  # (n_blocks, seq_len)
    validation: list[str]


def load_data(config: PretrainConfig, tokenizer=None) -> Data:
    """Tokenize as much of the train split as ``steps × batch_size`` blocks need (the run
    wraps around when the split is shorter)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model.tokenizer)
    corpus = load_corpus(config.data)
    need = config.steps * config.batch_size * config.seq_len
    train = token_blocks(tokenizer, corpus.train, seq_len=config.seq_len, max_tokens=need)
    if len(train) < config.batch_size:
        raise DataError(
            f"data {config.data!r} gives {len(train)} blocks of {config.seq_len} tokens, fewer than "
            f"one batch of {config.batch_size}; give more text or a smaller --batch-size / --seq-len"
        )
    return Data(tokenizer, train, corpus.validation)


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1


def join_world() -> tuple[World, bool]:
    """The current process group, started with gloo when ``torchrun`` set ``WORLD_SIZE`` > 1;
    returns it and whether this call started it (then :func:`pretrain` ends it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size()), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return World(dist.get_rank(), dist.get_world_size()), True
    return World(), False


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class StepRecord:
    step: int  # steps done after this one
    loss: float
    lr: float
    seconds: float
    tokens_per_second: float
    skipped: bool
    val_perplexity: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Trainer:
    """One run's model, optimizer and position; :meth:`train_step` does one step.

    ``data``/``tokenizer`` may be shared by several trainers (the benchmark interleaves
    methods on the same batches). Build it on every process of a distributed run.
    """

    config: PretrainConfig
    data: Data | None = None
    world: World = field(default_factory=World)
    step: int = 0
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        config = self.config
        check_method(config)
        if config.batch_size % self.world.size:
            raise ConfigError(
                f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
                f"{self.world.size} processes; use a multiple of {self.world.size}"
            )
        if self.data is None:
            self.data = load_data(config)
        model = build_model(config.model, self.data.tokenizer, seed=config.seed)
        self.model = prepare_model(model, config)
        self.wrapped = self._wrap(self.model)
        self.optimizer = build_optimizer(self.model, config)
        self.layer_hooks = config.method not in OPTIMIZERS
        torch.manual_seed(config.seed)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.world.distributed:
            if self.config.fsdp:
                raise ConfigError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N (N >= 2)")
            return model
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    # ------------------------------------------------------------------ stepping

    def batch(self, step: int) -> torch.Tensor:
        """This process's rows of the global batch of ``step``."""
        train, b = self.data.train, self.config.batch_size
        rows = torch.arange(step * b, (step + 1) * b) % len(train)
        per = b // self.world.size
        return train[rows[self.world.rank * per : (self.world.rank + 1) * per]]

    def _grads_finite(self) -> bool:
        grads = [_local(p.grad) for p in self.model.parameters() if p.grad is not None]
        ok = torch.tensor(float(all(bool(g.isfinite().all()) for g in grads)))
        if self.world.distributed:
            import torch.distributed as dist

            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() == 1.0)

    def _mean(self, value: torch.Tensor) -> float:
        if self.world.distributed:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
            value /= self.world.size
        return float(value)

    def train_step(self) -> StepRecord:
        """One optimizer step (or a skipped one, if any gradient is NaN/Inf)."""
        config, opt = self.config, self.optimizer
        lr = config.lr * lr_factor(config, self.step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = self.batch(self.step)
        t0 = time.perf_counter()
        self.wrapped.train()
        opt.zero_grad(set_to_none=True)
        loss = self.wrapped(input_ids=batch, labels=batch).loss
        objective = loss
        if self.layer_hooks:  # a layer type's own regulariser (Maestro, TRP), when weighted
            from rankwise.layers import penalty

            extra = penalty(self.model)
            objective = loss if extra is None else loss + extra
        objective.backward()
        finite = self._grads_finite()
        if finite:
            opt.step()
            if self.layer_hooks:
                from rankwise.layers import after_optimizer_step

                after_optimizer_step(self.model, self.step, opt)
        else:
            self.skipped_steps += 1
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        self.step += 1
        tokens = config.batch_size * config.seq_len
        record = StepRecord(self.step, self._mean(loss.detach()), lr, seconds, tokens / seconds, not finite)
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation perplexity on ``eval_tokens`` tokens of the validation split."""
        result = perplexity(
            self.model, self.data.tokenizer, self.data.validation, seq_len=self.config.seq_len,
            max_tokens=self.config.eval_tokens, batch_size=4,
        )  # fmt: skip
        return result.perplexity

    def optimizer_state_bytes(self) -> int:
        return optimizer_state_bytes(self.optimizer)

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    def refresh_seconds(self) -> float:
        return float(getattr(self.optimizer, "refresh_seconds", 0.0))

    def tokenizer_text(self) -> str | None:
        """The ``tokenizer.json`` text a checkpoint keeps (trained tokenizers only)."""
        if self.config.model.tokenizer not in TRAINED_TOKENIZERS:
            return None
        return self.data.tokenizer.backend_tokenizer.to_str()

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict, dict, dict]:
        """``(model_state, optimizer_state, trainer_info)``: full tensors (gathered under FSDP)."""
        if self.config.fsdp and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        info = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "history": self.history,
            "identity": {**self.config.identity(), "processes": self.world.size},
            "counters": {k: getattr(self.optimizer, k) for k in _COUNTERS if hasattr(self.optimizer, k)},
        }
        return model_state, optimizer_state, info

    def load_state(self, model_state: dict, optimizer_state: dict, info: dict, rng: torch.Tensor) -> None:
        if self.config.fsdp and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                options=StateDictOptions(full_state_dict=True),
            )  # fmt: skip
        else:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
        self.step, self.skipped_steps = int(info["step"]), int(info["skipped_steps"])
        self.history = list(info["history"])
        for k, v in info.get("counters", {}).items():
            setattr(self.optimizer, k, v)
        torch.set_rng_state(rng)


# ---------------------------------------------------------------------- the whole run


@dataclass
class PretrainResult:
    """What a run reports (also written to ``OUT/pretrain.json``)."""

    config: dict
    steps: int
    final_loss: float
    val_perplexity: float | None
    tokens_per_second: float
    optimizer_state_bytes: int
    weight_bytes: int
    skipped_steps: int
    refresh_seconds: float
    processes: int
    history: list[dict]
    out: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` a fresh run folder: rankwise's own entries of an old run removed (the
    folder was checked by :func:`check_output_dir`), a manifest written."""
    import json
    import shutil

    from rankwise import __version__
    from rankwise.fileio import MANIFEST, write_json

    if out.is_dir() and (out / MANIFEST).is_file():
        owned = json.loads((out / MANIFEST).read_text()).get("files", [])
        for name in owned:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, {"written_by": f"rankwise {__version__}", "kind": "pretrain", "files": ["checkpoint", "pretrain.json"]})


def _leave_world(world: World, *, synchronise: bool) -> None:
    """End the process group this process started. After a finished run every process first
    waits for the others, so none tears its connections down while another still uses them
    (a gloo process torn down mid-exchange aborts); after an error there is no waiting, as
    the others may never arrive."""
    import torch.distributed as dist

    if synchronise:
        _barrier(world)
    dist.destroy_process_group()


def _barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def pretrain(
    config: PretrainConfig,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[Trainer, StepRecord], None] | None = None,
) -> PretrainResult:
    """Train ``config``'s model from scratch (or from the checkpoint in ``out`` with ``resume``).

    ``out``: the run folder (checkpoints in ``out/checkpoint``, the log in ``out/pretrain.json``);
    None writes nothing. A new run refuses an existing non-empty ``out`` unless ``overwrite``.
    ``resume``: continue from the last checkpoint; a checkpoint of another run (config, method,
    options, process count) raises CheckpointError before anything is written. ``on_step`` is
    called after every step (used by tests to interrupt a run).
    """
    from rankwise.fileio import check_output_dir, write_json
    from rankwise.pretrain import checkpoint as ckpt
    from rankwise.progress import Bar

    check_method(config)
    world, started = join_world()
    finished = False
    try:
        out_path = None if out is None else Path(out).expanduser().absolute()
        saved = None
        if out_path is not None and resume:
            saved = ckpt.read_trainer(out_path)
            ckpt.check_identity(saved["identity"], {**config.identity(), "processes": world.size}, out_path)
        elif out_path is not None:
            check_output_dir(out_path, overwrite=overwrite)
        elif resume:
            raise ConfigError("resume needs the run folder (--out) holding the checkpoint")
        data = None
        if saved is not None:  # a trained tokenizer kept in the checkpoint is the one to use
            text = ckpt.read_tokenizer(out_path)
            data = None if text is None else load_data(config, tokenizer_from_json(text))
        trainer = Trainer(config, data=data, world=world)
        if saved is not None:
            model_state, optimizer_state, rng = ckpt.load_tensors(out_path)
            trainer.load_state(model_state, optimizer_state, saved, rng)
        elif out_path is not None and world.rank == 0:
            _prepare_out(out_path, overwrite)
        _barrier(world)

        def save() -> None:
            model_state, optimizer_state, info = trainer.state()
            if world.rank == 0:
                ckpt.save_checkpoint(out_path, model_state, optimizer_state, info, trainer.tokenizer_text())
                write_json(out_path / "pretrain.json", _result(trainer, out_path).as_dict())
            _barrier(world)

        bar = Bar(config.steps, f"pretrain {config.config} {config.method}", show=progress and world.rank == 0)
        bar.update(trainer.step)
        try:
            while trainer.step < config.steps:
                record = trainer.train_step()
                last = trainer.step == config.steps
                if config.eval_tokens and (trainer.step % config.eval_every == 0 or last):
                    record.val_perplexity = trainer.evaluate()
                trainer.history.append(record.as_dict())
                bar.update(1)
                bar.set(loss=f"{record.loss:.3f}", tok_s=f"{record.tokens_per_second:.0f}")
                if out_path is not None and (trainer.step % config.checkpoint_every == 0 or last):
                    save()
                if on_step is not None:
                    on_step(trainer, record)
        finally:
            bar.close()
        result = _result(trainer, out_path)
        finished = True
        return result
    finally:
        if started:
            _leave_world(world, synchronise=finished)


def _result(trainer: Trainer, out: Path | None) -> PretrainResult:
    history = trainer.history
    ppl = next((h["val_perplexity"] for h in reversed(history) if "val_perplexity" in h), None)
    recent = [h for h in history[-10:] if not h["skipped"]]
    speed = sorted(h["tokens_per_second"] for h in recent)
    return PretrainResult(
        config=trainer.config.to_dict(),
        steps=trainer.step,
        final_loss=history[-1]["loss"] if history else math.nan,
        val_perplexity=ppl,
        tokens_per_second=speed[len(speed) // 2] if speed else math.nan,
        optimizer_state_bytes=trainer.optimizer_state_bytes(),
        weight_bytes=trainer.weight_bytes(),
        skipped_steps=trainer.skipped_steps,
        refresh_seconds=trainer.refresh_seconds(),
        processes=trainer.world.size,
        history=history,
        out=None if out is None else str(out),
    )


__all__ = ["Data", "PretrainResult", "StepRecord", "Trainer", "World", "join_world", "load_data", "pretrain"]
