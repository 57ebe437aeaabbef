"""The ``rankwise`` command: thin subcommands over the library.

Each subcommand lives in its own module with a ``register(app)`` function; add the
module's name to ``COMMANDS``. Errors a user can cause (:class:`RankwiseError`, bad
options, missing files) print one line and exit with code 2; ``--debug`` (or
``RANKWISE_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from rankwise.errors import RankwiseError

COMMANDS = ["info", "evaluate", "finetune", "compress"]

app = typer.Typer(
    name="rankwise",
    help=(
        "rankwise: low-rank structure in neural networks. Evaluate, fine-tune with adapters, "
        "and compress models; every command works offline on the embedded SmolLM2 model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": os.environ.get("RANKWISE_DEBUG", "") not in ("", "0")}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        _state["debug"] = True


for _name in COMMANDS:
    importlib.import_module(f"rankwise.cli.{_name}").register(app)


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (code 2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rankwise`` console script; returns the exit code."""
    try:
        # Standalone mode: the parser reports bad options itself (exit code 2) and exits.
        app(args=argv, prog_name="rankwise", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (RankwiseError, FileNotFoundError, FileExistsError) as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())
