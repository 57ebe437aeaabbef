"""``rankwise compress``: factorise a model's linear layers to a parameter or size target."""

from __future__ import annotations

import json

import typer

from rankwise import progress
from rankwise.cli._options import parse_options


def compress_command(
    model: str = typer.Option("smollm2", "--model", "-m", help="Model name (smollm2, tiny-llama, ...) or local folder."),
    method: str = typer.Option("svdllm", "--method", help="Compression method (see `rankwise compress --list-methods`)."),
    ratio: float = typer.Option(None, "--ratio", help="Fraction of ALL model parameters to keep, in (0, 1] (default 0.8)."),
    size: str = typer.Option(None, "--size", help="Cap on the weights file (model.safetensors, header included) instead of --ratio, e.g. 400MB."),
    allocation: str = typer.Option("auto", "--allocate", help="Rank allocation: auto (the method's default: fisher for SVD methods), fisher, uniform, energy, welore, global or mfac (fisher with the full output Fisher per direction, via M-FAC); methods that size layers themselves support only their own (see docs/compress.md)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Method option key=value (repeatable), e.g. -o damp=0.001; values are checked against the option's type; see docs/compress.md."),
    out: str = typer.Option(None, "--out", help="Output folder [required, except with --list-methods]; an existing one is refused unless --overwrite, which replaces only a folder rankwise wrote."),
    data: list[str] = typer.Option(["builtin"], "--data", "-d", help="'builtin', a text file or a folder of .txt files; repeat to calibrate on a mix (e.g. -d builtin -d notes/)."),
    calibration: str = typer.Option("auto", "--calibration", help="closed-loop: calibrate block by block on the outputs of the blocks already compressed; open-loop: every layer on the dense model's activations; auto: open-loop, measured better on SmolLM2 (docs/compress.md)."),
    heldout: bool = typer.Option(True, "--heldout/--no-heldout", help="Also measure perplexity on the held-out corpus (license texts in /usr/share/common-licenses, never calibrated on)."),
    calib_tokens: int = typer.Option(16384, "--calib-tokens", help="Calibration tokens (from the corpus's calibration split); fewer is faster, more is closer to dense."),
    grad_tokens: int = typer.Option(4096, "--grad-tokens", help="Of the calibration tokens, how many (evenly spaced sequences) the allocation's gradient statistics use; 0 = all. The backward pass costs about three forwards.", min=0),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", help="Validation tokens for perplexity before/after."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="New tokens generated (greedy) to time decoding before/after."),
    heal_steps: int = typer.Option(0, "--heal-steps", help="After compressing, train the compressed factors this many steps on the data's train split (size unchanged; 0 = no healing)."),
    heal_lr: float = typer.Option(1e-4, "--heal-lr", help="Learning rate of healing (AdamW, warm-up then cosine)."),
    heal_precision: str = typer.Option("auto", "--heal-precision", help="Healing matmuls: auto (bfloat16 where the CPU/GPU has native bfloat16, about 1.9x faster on SmolLM2; weights and optimizer stay float32), float32 or bfloat16."),
    heal_loss: str = typer.Option("distill", "--heal-loss", help="distill: train towards the dense model's next-token predictions on the healing text (taken before compressing; recovers more on other text); ce: next-token cross-entropy on the text."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration / evaluation sequence."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder that rankwise wrote (a folder holding other files is refused)."),
    device: str = typer.Option(None, "--device", help="Where to run: cpu, cuda or cuda:N (default: cpu)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's own choice).", min=1),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html (report.json is always written)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure perplexity and decode speed before/after."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List registered methods and exit."),
) -> None:
    """Compress a model with low-rank factorisation; save it, a report, and print before/after."""
    from rankwise.compress.base import METHODS

    if list_methods:
        for name, cls in METHODS.items():
            typer.echo(f"{name:10s} {cls.summary}")
        return
    from rankwise.compress.api import compress
    from rankwise.errors import ConfigError

    if out is None:
        raise ConfigError("--out is required: the folder to write the compressed model to")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from rankwise.data import load_corpus

    result = compress(
        model,
        method=method,
        method_options=parse_options(option),
        ratio=ratio,
        size=size,
        allocation=allocation,
        calibration=calibration,
        data=load_corpus(data),
        heldout=heldout,
        calib_tokens=calib_tokens,
        gradient_tokens=grad_tokens or None,
        seq_len=seq_len,
        out=out,
        overwrite=overwrite,
        evaluate=evaluate,
        eval_tokens=eval_tokens,
        measure_speed=evaluate,
        decode_tokens=decode_tokens,
        heal_steps=heal_steps,
        heal_lr=heal_lr,
        heal_loss=heal_loss,
        heal_precision=heal_precision,
        device=device,
        report_html=report,
        progress=not as_json and progress.enabled(),
    )
    rep = result.report
    if as_json:
        typer.echo(json.dumps({k: v for k, v in rep.items() if k != "layers"} | {"path": str(result.path)}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from rankwise.compress.report import summary_rows

    table = Table(title=f"rankwise compress: {rep['model']} with {rep['method']} ({rep['allocation']} allocation)")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in summary_rows(rep):
        table.add_row(*row)
    caption = "parameters: all distinct model parameters (embeddings included, tied once)"
    if "perplexity" in rep:
        r = rep["perplexity"]["recipe"]
        caption += f"; perplexity: seq_len={r['seq_len']}, {r['scored_tokens']:,} tokens"
    if rep.get("calibration"):
        c = rep["calibration"]
        caption += f"\ncalibration: {c['mode']}, {c['tokens']:,} tokens of {c['corpus']}"
    table.caption = caption + f"\nwritten to {result.path} (report.json{', report.html' if report else ''})"
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress_command)
