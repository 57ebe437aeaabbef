"""``rankwise generate``: continue a prompt with a model (optionally with an adapter)."""

from __future__ import annotations

import json

import typer


def generate_command(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
    model: str = typer.Option("smollm2", "--model", "-m", help="Model name (smollm2, tiny-llama, ...), local folder, compressed folder or .gguf file."),
    adapter: str = typer.Option(None, "--adapter", help="Adapter folder (PEFT or rankwise format) to attach first."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Generate at most this many tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (deterministic); above 0: sample with this temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this probability mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON {prompt, completion, tokens_per_second, ...} instead of the text."),
) -> None:
    """Print the model's continuation of --prompt (the prompt itself is not repeated)."""
    from rankwise.evaluation import generate

    result = generate(
        model,
        prompt,
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    typer.echo(json.dumps(result, indent=2) if as_json else result["completion"])


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
