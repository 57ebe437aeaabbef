"""``rankwise analyze``: spectra, ranks, intruder dimensions, Matrix Nuclear-Norm, gradient spectra as a report."""

from __future__ import annotations

import json

import typer

from rankwise import progress


def analyze_command(
    model: str = typer.Option("smollm2", "--model", "-m", help="Model name (smollm2, tiny-llama, ...), local folder or .gguf file."),
    against: str = typer.Option(None, "--against", help="A tuned model of the same architecture to compare with --model."),
    adapter: str = typer.Option(None, "--adapter", help="An adapter folder (PEFT or rankwise) to attach to --model and compare."),
    out: str = typer.Option(None, "--out", help="Output folder for report.json and report.html (refused if it exists, unless --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder that rankwise wrote."),
    top_k: int = typer.Option(64, "--top-k", help="Singular values kept per layer."),
    threshold: float = typer.Option(0.5, "--threshold", help="Intruder dimension: max |cos| with every base singular vector below this."),
    intruder_top_k: int = typer.Option(10, "--intruder-top-k", help="Leading singular vectors of each tuned weight examined for intruders."),
    data: str = typer.Option("builtin", "--data", "-d", help="Texts for the Matrix Nuclear-Norm: 'builtin', a text file or a folder of .txt files."),
    texts: int = typer.Option(8, "--texts", help="Documents scored for the Matrix Nuclear-Norm (0: skip it)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per scored document."),
    gradients: int = typer.Option(0, "--gradients", help="Texts per dataset for layer-wise gradient spectra (0: skip; 4 is a cheap start)."),
    gradient_data: str = typer.Option("builtin,licenses", "--gradient-data", help="Comma-separated datasets for the gradient spectra: 'builtin', 'licenses' (/usr/share/common-licenses), text files or folders."),
    gradient_tokens: int = typer.Option(128, "--gradient-tokens", help="Tokens per gradient text (every dataset is cut to this length)."),
    intrinsic: str = typer.Option("", "--intrinsic", help="Comma-separated subspace dimensions for the intrinsic dimension of fitting --data (e.g. 4,16,64; empty: skip)."),
    intrinsic_parameters: str = typer.Option(None, "--intrinsic-parameters", help="Glob on parameter names that move in the subspace (default: every trainable parameter)."),
    intrinsic_steps: int = typer.Option(20, "--intrinsic-steps", help="Adam steps per subspace dimension (and for the normal-training baseline)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report summary as JSON instead of a table."),
) -> None:
    """Measure how low-rank a model's weights are (and what tuning changed); write a report."""
    from rankwise.analysis.report import analyze
    from rankwise.errors import ConfigError

    if out is None:
        raise ConfigError("--out is required: the folder to write report.json and report.html to")
    report = analyze(
        model,
        out,
        against=against,
        adapter=adapter,
        overwrite=overwrite,
        top_k=top_k,
        threshold=threshold,
        intruder_top_k=intruder_top_k,
        data=data,
        texts=texts,
        max_tokens=max_tokens,
        gradients=gradients,
        gradient_data=[d.strip() for d in gradient_data.split(",") if d.strip()],
        gradient_tokens=gradient_tokens,
        intrinsic=_dims(intrinsic),
        intrinsic_parameters=intrinsic_parameters,
        intrinsic_steps=intrinsic_steps,
        progress=not as_json and progress.enabled(),
    )
    if as_json:
        typer.echo(json.dumps({"summary": report["summary"], "out": out}, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    title = f"rankwise analyze: {report['model']}" + (f" vs {report['tuned']}" if report["tuned"] else "")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in report["summary"]:
        v = row["value"]
        table.add_row(row["metric"], f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    console = Console()
    console.print(table)
    console.print(f"report: {out}/report.html")


def _dims(text: str) -> list[int]:
    from rankwise.errors import ConfigError

    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--intrinsic takes comma-separated integers like 4,16,64, got {text!r}") from None


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_command)
