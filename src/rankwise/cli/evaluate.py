"""``rankwise eval``: perplexity of a model on a text corpus."""

from __future__ import annotations

import json

import typer

from rankwise import progress


def eval_command(
    model: str = typer.Option("smollm2", "--model", "-m", help="Model name (smollm2, tiny-llama, ...), local folder or .gguf file."),
    data: str = typer.Option("builtin", "--data", "-d", help="'builtin' (stdlib docs corpus), a text file, or a folder of .txt files."),
    split: str = typer.Option("validation", help="Corpus split: train, validation or calibration."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per evaluation window."),
    stride: int = typer.Option(None, "--stride", help="Sliding-window stride (default: seq-len, i.e. non-overlapping blocks)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="Evaluate at most this many tokens (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Measure perplexity, tokens/s and parameter count of a causal language model."""
    from rankwise.evaluation import evaluate

    report = evaluate(
        model,
        data,
        split=split,
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens or None,
        progress=not as_json and progress.enabled(),
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rankwise eval: {report['model']} on {report['data']}/{report['split']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{report['parameters']:,}")
    table.add_row("perplexity", f"{report['perplexity']:.3f}")
    table.add_row("scored tokens", f"{report['tokens']:,}")
    table.add_row("tokens / s", f"{report['tokens_per_second']:.0f}")
    table.add_row("eval time", f"{report['eval_seconds']:.1f} s")
    table.add_row("load time", f"{report['load_seconds']:.1f} s")
    r = report["recipe"]
    table.add_row("recipe", f"seq_len={r['seq_len']} stride={r['stride']} bos={r['add_bos']}")
    if report["corpus_fingerprint"]:
        table.add_row("corpus", report["corpus_fingerprint"])
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
