"""``rankwise finetune``: train an adapter on a causal LM and save it (PEFT format where one exists)."""

from __future__ import annotations

import json

import typer

from rankwise import progress
from rankwise.cli._options import parse_options
from rankwise.errors import ConfigError


def finetune_command(
    model: str = typer.Option("smollm2", "--model", "-m", help="Model name (smollm2, tiny-llama, ...), local Hugging Face folder or .gguf file; recorded in the saved adapter as given."),
    method: str = typer.Option("lora", "--method", help="Adapter method (see `rankwise finetune --list-methods`)."),
    rank: int = typer.Option(16, "--rank", help="Adapter rank (PEFT's r)."),
    alpha: float = typer.Option(None, "--alpha", help="Scale numerator: the update is scaled by alpha/rank (default: alpha = rank)."),
    targets: str = typer.Option("all-linear", "--targets", help="Comma-separated module names / glob patterns, or all-linear (every linear layer but the output head)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Method option key=value (repeatable), e.g. -o init=pissa -o dropout=0.05; values are checked against the option's type; see docs/adapters.md."),
    rule: list[str] = typer.Option([], "--rule", help="Training rule (repeatable, run in the order given), e.g. --rule allora; see `rankwise finetune --list-rules` and docs/adapters.md."),
    rule_option: list[str] = typer.Option([], "--rule-option", "-r", help="Rule option key=value (repeatable), or rule.key=value when several rules have that option, e.g. -r eta=2."),
    data: str = typer.Option("builtin", "--data", "-d", help="'builtin', a text file or a folder of .txt files."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Blocks per process per micro-step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-steps per optimizer step."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training block (at most the model's context)."),
    lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay on the adapter parameters."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for activation memory."),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", help="Validation tokens for perplexity before/after (0: skip)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the adapter's initial weights, the data order and dropout."),
    out: str = typer.Option(None, "--out", help="Folder to save the adapter to: PEFT format for lora/dora, rankwise's format for the other methods (load either with rankwise.adapters.load_adapter). Refused if it exists and is not empty, unless --overwrite. Without --out nothing is saved."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder that rankwise wrote (a folder holding other files is refused)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Write a checkpoint to <out>.checkpoint every N steps (0: none); continue an interrupted run with --resume. Removed once the adapter is saved.", min=0),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in <out>.checkpoint (same options as the interrupted run); ends with the same adapter as an uninterrupted run."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's own choice).", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List the adapter methods and exit."),
    list_rules: bool = typer.Option(False, "--list-rules", help="List the training rules and exit."),
) -> None:
    """Fine-tune a causal LM with an adapter (AdamW, cosine schedule) and save the adapter.

    Data-parallel: torchrun --nproc_per_node 2 -m rankwise finetune ...
    """
    from rankwise.adapters.base import METHODS

    if list_methods:
        for name, cls in METHODS.items():
            typer.echo(f"{name:10s} {cls.summary}")
        return
    if list_rules:
        from rankwise.adapters.rules import RULES

        for name, cls in RULES.items():
            typer.echo(f"{name:10s} {cls.summary}")
        return
    from rankwise.adapters.finetune import FinetuneConfig, finetune

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    target_list = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = FinetuneConfig(
        model=model, method=method, rank=rank, alpha=alpha, targets=target_list,
        method_options=parse_options(option), data=data, steps=steps, batch_size=batch_size,
        grad_accum=grad_accum, seq_len=seq_len, lr=lr, weight_decay=weight_decay,
        gradient_checkpointing=gradient_checkpointing, eval_tokens=eval_tokens, seed=seed,
        out=out, overwrite=overwrite, checkpoint_every=checkpoint_every, resume=resume,
        rules=tuple(rule), rule_options=_rule_options(rule_option),
    )
    result = finetune(config, progress=not as_json and progress.enabled())
    if result.rank != 0:
        return
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps(asdict(result), indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table = Table(title=f"rankwise finetune: {method} rank {rank} on {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("trainable parameters", f"{result.trainable_parameters:,} of {result.total_parameters:,}")
    steps_text = str(len(result.losses))
    if result.resumed_from:
        steps_text += f" (resumed at {result.resumed_from})"
    table.add_row("steps", steps_text)
    if rule:
        table.add_row("training rules", ", ".join(rule))
    table.add_row("loss first → last", f"{result.losses[0]:.4f} → {result.losses[-1]:.4f}")
    table.add_row("val perplexity before", fmt(result.perplexity_before))
    table.add_row("val perplexity after", fmt(result.perplexity_after))
    table.add_row("tokens / s", f"{result.tokens_per_second:.0f}")
    table.add_row("processes", str(result.world_size))
    table.add_row("adapter saved to", result.out or "(not saved; pass --out)")
    Console().print(table)


def _rule_options(pairs: list[str]) -> dict:
    """``-r key=value`` pairs, parsed like ``-o``; a bare number points to ``--rank`` (``-r``
    was its short form before training rules)."""
    for pair in pairs:
        if "=" not in pair and pair.strip().isdigit():
            raise ConfigError(
                f"-r/--rule-option expects key=value, got {pair!r}; the adapter rank is --rank {pair}"
            )
    return parse_options(pairs)


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
