"""``rankwise eval``: perplexity of a model (optionally with an adapter) on a text corpus."""

from __future__ import annotations

import json

import typer

from rankwise import progress

SCORED_HELP = (
    "Which part of the data is scored: by default the validation split of 'builtin' and the "
    "WHOLE of a user file or folder. Given, it selects that split (train, validation or "
    "calibration: 90/5/5 by blank-line-separated document) of a user file too."
)


def eval_command(
    model: str = typer.Option("smollm2", "--model", "-m", help="Model name (smollm2, tiny-llama, ...), local folder, compressed folder or .gguf file."),
    adapter: str = typer.Option(None, "--adapter", help="Adapter folder (PEFT or rankwise format) to attach before scoring."),
    data: str = typer.Option("builtin", "--data", "-d", help="'builtin' (stdlib docs corpus; its validation split is scored), a UTF-8 text file or a folder of .txt files (scored whole)."),
    split: str = typer.Option(None, "--split", help=SCORED_HELP),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per evaluation window (at most the model's context)."),
    stride: int = typer.Option(None, "--stride", help="Sliding-window stride (default: seq-len, i.e. non-overlapping blocks)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="Score at most this many tokens of the data (0: all of it)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Measure perplexity, tokens/s and parameter count of a causal language model.

    Scored: the validation split of the built-in corpus, or the whole of a user's --data file or folder (unless --split is given), up to --max-tokens tokens.
    """
    from rankwise.errors import ConfigError
    from rankwise.evaluation import evaluate

    if max_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0 (0: all tokens); got {max_tokens}")
    report = evaluate(
        model,
        data,
        split=split,
        adapter=adapter,
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

    scored = "whole" if report["split"] == "all" else report["split"]
    with_adapter = f" + adapter {report['adapter']}" if report["adapter"] else ""
    table = Table(title=f"rankwise eval: {report['model']}{with_adapter} on {report['data']} ({scored})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters (as stored)", f"{report['parameters']:,}")
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
