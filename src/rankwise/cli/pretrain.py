"""``rankwise pretrain``: train a small LLaMA from scratch with a memory-efficient method."""

from __future__ import annotations

import json
import os

import typer

from rankwise import progress
from rankwise.cli._options import parse_options


def pretrain_command(
    config: str = typer.Option("llama-20m", "--config", "-c", help="Model shape: llama-20m (4 layers x 256, SmolLM2 tokenizer, mostly embedding), llama-20m-bpe8k (10 x 384, 8k BPE trained on the built-in corpus: 20.8M parameters, 3.1M of them embedding), llama-60m (8 x 512), llama-small (4 x 256, byte tokenizer) or tiny (tests)."),
    method: str = typer.Option("adamw", "--method", help="adamw, galore, dct, frugal, gradnorm (optimizers), or a layer type of rankwise.layers (sltrain, lost, ...: the block linear layers are converted, AdamW trains them); see --list-methods."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps in total (a resumed run continues up to this)."),
    data: str = typer.Option("builtin", "--data", "-d", help="'builtin', a text file or a folder of .txt files: its train split is trained on, its validation split scored."),
    out: str = typer.Option(None, "--out", help="Run folder: checkpoints (checkpoint/) and the log (pretrain.json). Without --out nothing is written."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an existing --out that rankwise wrote (a folder holding other files is refused)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out; the run ends exactly as an uninterrupted one. Needs the same options."),
    rank: int = typer.Option(64, "--rank", help="Projection rank (galore, dct, frugal, gradnorm) or layer rank (sltrain, lost, ...)."),
    update_proj_gap: int = typer.Option(200, "--update-proj-gap", help="Steps between subspace refreshes of the projected optimizers."),
    scale: float = typer.Option(0.25, "--scale", help="Scale of the projected update (galore-torch's scale)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Method option key=value (repeatable): an optimizer option (e.g. free_scale=0.5 for frugal) or a layer option (e.g. density=0.03 for sltrain)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Global blocks per step (split over the processes under torchrun)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per block."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (linear warm-up, cosine decay to 10%)."),
    warmup: int = typer.Option(100, "--warmup", help="Warm-up steps."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Decoupled weight decay."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights and of the projections."),
    eval_every: int = typer.Option(200, "--eval-every", help="Steps between validation perplexities (and at the end)."),
    eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Validation tokens scored (0: no validation)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints (and at the end)."),
    project_embeddings: bool = typer.Option(False, "--project-embeddings", help="Project the input embedding and the LM head at --rank too (on their small side), instead of plain AdamW: with a projected optimizer they join its matrices; with a layer type they get GaLore's projection. Saves most of the optimizer state when the vocabulary is large (llama-20m); not with adamw or --fsdp."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun: shard the model with FSDP instead of replicating it (DDP). Works with adamw and layer types without after-step rewrites; not with the projected optimizers."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (the step log included)."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List the methods and exit."),
) -> None:
    """Pretrain a small LLaMA from scratch: loss, validation perplexity, tokens/s, optimizer-state and weight memory.

    Checkpoints go to OUT/checkpoint (atomic); --resume continues bit-identically. Data-parallel on 2 processes: torchrun --nproc-per-node 2 -m rankwise pretrain ... (add --fsdp to shard). Example: rankwise pretrain --config llama-20m --method galore --steps 1000 --out runs/galore
    """
    from rankwise.pretrain import PretrainConfig, method_names, pretrain

    if list_methods:
        typer.echo("\n".join(method_names()))
        return
    run = PretrainConfig(
        config=config, method=method, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
        warmup=warmup, weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
        scale=scale, data=data, seed=seed, eval_every=eval_every, eval_tokens=eval_tokens,
        checkpoint_every=checkpoint_every, fsdp=fsdp, project_embeddings=project_embeddings,
        method_options=parse_options(option),
    )  # fmt: skip
    result = pretrain(run, out, overwrite=overwrite, resume=resume, progress=not as_json and progress.enabled())
    if os.environ.get("RANK", "0") != "0":  # under torchrun, process 0 reports
        return
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    _print_table(result, config, method)


def _print_table(result, config: str, method: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rankwise pretrain: {method} on {config}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    first, last = result.history[0]["loss"], result.final_loss
    table.add_row("steps", f"{result.steps} ({result.skipped_steps} skipped: non-finite gradients)")
    table.add_row("loss first → last", f"{first:.4f} → {last:.4f}")
    ppl = "-" if result.val_perplexity is None else f"{result.val_perplexity:.2f}"
    table.add_row("validation perplexity", ppl)
    table.add_row("tokens / s", f"{result.tokens_per_second:.0f}")
    table.add_row("optimizer state", f"{result.optimizer_state_bytes / 2**20:.2f} MiB")
    table.add_row("weights", f"{result.weight_bytes / 2**20:.2f} MiB")
    table.add_row("subspace refreshes", f"{result.refresh_seconds:.2f} s")
    table.add_row("processes", str(result.processes))
    table.add_row("run folder", result.out or "(nothing written; pass --out)")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
