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
import typer.core
import typer.main

from rankwise.errors import RankwiseError

COMMANDS = ["info", "evaluate", "generate", "finetune", "compress", "heal", "analyze", "serve", "pretrain"]

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


def _debug_from_env() -> bool:
    return os.environ.get("RANKWISE_DEBUG", "") not in ("", "0")


def _show_version(value: bool) -> None:
    if not value:
        return
    import platform

    import torch

    from rankwise import __version__

    typer.echo(f"rankwise {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
    raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks on errors (also accepted after the subcommand)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the rankwise and torch versions and exit."
    ),
) -> None:
    """Options that apply to every subcommand (``--debug`` is taken out of argv by :func:`main`)."""


for _name in COMMANDS:
    importlib.import_module(f"rankwise.cli.{_name}").register(app)


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (code 2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove every ``--debug`` before a ``--`` (so it works before or after the subcommand);
    returns the remaining arguments and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    return head + argv[end:], len(head) < end


def _without_flag_metavars(command: typer.core.TyperCommand | typer.core.TyperGroup, ctx: typer.Context) -> None:
    """Boolean flags take no value: show them in --help without a ``<bool>`` type."""
    help_option = command.get_help_option(ctx)
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for name, sub in getattr(command, "commands", {}).items():
        _without_flag_metavars(sub, typer.Context(sub, info_name=name, parent=ctx))


def build_command() -> typer.core.TyperGroup:
    """The click command behind ``rankwise`` (all subcommands registered, help tidied)."""
    command = typer.main.get_command(app)
    _without_flag_metavars(command, typer.Context(command, info_name="rankwise", **command.context_settings))
    return command


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rankwise`` console script; returns the exit code."""
    args, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or _debug_from_env()
    try:
        # Standalone mode: the parser reports bad options itself (exit code 2) and exits.
        build_command().main(args=args, prog_name="rankwise", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (RankwiseError, FileNotFoundError, FileExistsError) as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())
