"""``rankwise heal``: a short fine-tune of a compressed folder's own factors (size unchanged)."""

from __future__ import annotations

import json

import typer

from rankwise import progress


def heal_command(
    model: str = typer.Option(..., "--model", "-m", help="A compressed folder (what `rankwise compress --out` wrote)."),
    steps: int = typer.Option(100, "--steps", help="AdamW steps on the compressed factors (each: --batch-size blocks of --seq-len tokens)."),
    out: str = typer.Option(..., "--out", help="Where to write the healed folder; the --model folder itself with --overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists (only a folder rankwise wrote)."),
    data: str = typer.Option("builtin", "--data", "-d", help="'builtin' or a text file / folder: its train split heals, its validation split is scored."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (5% warm-up, cosine decay to 10%)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training block."),
    batch_size: int = typer.Option(4, "--batch-size", help="Blocks per step."),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", help="Tokens scored before and after, per corpus."),
    loss: str = typer.Option("distill", "--loss", help="distill: train towards the dense model's next-token predictions on the text (recovers more on other text); ce: next-token cross-entropy on the text."),
    precision: str = typer.Option("auto", "--precision", help="Training matmuls: auto (bfloat16 where the CPU/GPU has native bfloat16; weights and optimizer stay float32), float32 or bfloat16."),
    teacher: str = typer.Option(None, "--teacher", help="The dense model to distil from (name or folder); default: the model the folder was compressed from (its report.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
) -> None:
    """Heal a compressed model: train its low-rank factors on text, keep its size.

    Perplexity is measured before and after on the data's validation split and on the held-out corpus (Debian's license texts, never trained on). The healed folder loads with `rankwise.load_model(OUT)` like any compressed folder.
    """
    from rankwise.compress.heal import heal_folder

    report = heal_folder(
        model, steps=steps, out=out, overwrite=overwrite, data=data, lr=lr, seq_len=seq_len,
        batch_size=batch_size, eval_tokens=eval_tokens, loss=loss, teacher=teacher, precision=precision, progress=not as_json and progress.enabled(),
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    ppl, h = report["perplexity"], report["heal"]
    table = Table(title=f"rankwise heal: {model} ({h['steps']} steps, {h['seconds']:.0f} s)")
    for column in ("perplexity", "before", "healed"):
        table.add_column(column, justify="left" if column == "perplexity" else "right")
    for name in ppl["before"]:
        table.add_row(name, f"{ppl['before'][name]:.3f}", f"{ppl['healed'][name]:.3f}")
    Console().print(table)
    Console().print(f"  written to {out} (heal.json)")


def register(app: typer.Typer) -> None:
    app.command("heal")(heal_command)
