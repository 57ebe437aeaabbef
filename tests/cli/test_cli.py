from __future__ import annotations

import json
import subprocess
import sys

import pytest

import rankwise
from rankwise.cli import build_command, main, split_debug


def all_commands():
    """(name, click command) of the root and of every registered subcommand."""
    root = build_command()
    return [("rankwise", root), *((f"rankwise {n}", c) for n, c in root.commands.items())]


def options_of(command):
    return [p for p in command.params if p.param_type_name == "option"]


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "eval" in out and "info" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch"].startswith("2.") and "tiny-llama" in facts["models"]


def test_eval_tiny_model_json(capsys):
    code = main(["eval", "--model", "tiny-llama", "--max-tokens", "600", "--seq-len", "64", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"] > 1 and report["parameters"] > 0 and report["tokens"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "no-such-model"], "valid names are"),
        (["eval", "--model", "tiny-llama", "--data", "/no/such/file.txt"], "does not exist"),
        (["eval", "--model", "tiny-llama", "--seq-len", "1"], "seq_len"),
        (["eval", "--model", "tiny-bert", "--max-tokens", "100"], "not a causal language model"),
        (["eval", "--bogus-option"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_empty_corpus_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", "--model", "tiny-llama", "--data", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_console_script_debug_shows_traceback():
    cmd = [sys.executable, "-c", "from rankwise.cli import run; run()"]
    plain = subprocess.run([*cmd, "eval", "--model", "nope"], capture_output=True, text=True)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("error:")
    for args in (["--debug", "eval", "--model", "nope"], ["eval", "--debug", "--model", "nope"]):
        debug = subprocess.run([*cmd, *args], capture_output=True, text=True)
        assert debug.returncode != 0 and "Traceback" in debug.stderr, args
        assert "ModelError" in debug.stderr and "No such option" not in debug.stderr


def test_debug_env_shows_traceback(monkeypatch):
    monkeypatch.setenv("RANKWISE_DEBUG", "1")
    with pytest.raises(rankwise.ModelError):
        main(["eval", "--model", "nope"])


@pytest.mark.parametrize(
    "argv, rest, debug",
    [
        (["eval", "--debug", "--model", "x"], ["eval", "--model", "x"], True),
        (["--debug", "info"], ["info"], True),
        (["info"], ["info"], False),
        (["eval", "--", "--debug"], ["eval", "--", "--debug"], False),  # after --: an argument
    ],
)
def test_split_debug(argv, rest, debug):
    assert split_debug(argv) == (rest, debug)


def test_version(capsys):
    import torch

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rankwise {rankwise.__version__} ") and torch.__version__ in out


@pytest.mark.parametrize("name", [n for n, _ in all_commands()])
def test_every_option_has_help(name):
    command = dict(all_commands())[name]
    missing = [p.opts[0] for p in options_of(command) if not (p.help or "").strip()]
    assert not missing, f"{name}: options without help text: {', '.join(missing)}"


@pytest.mark.parametrize("name", [n for n, _ in all_commands()])
def test_help_shows_flags_without_type_and_marks_required(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option: long names are not folded
    command = dict(all_commands())[name]
    assert main([*name.split()[1:], "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "BOOLEAN" not in out
    for option in options_of(command):
        assert option.opts[0] in out
    required = [o for o in options_of(command) if o.required]
    assert out.count("[required]") >= len(required), f"{name}: --help does not mark every required option"


def test_required_option_and_flag_shown_as_such(monkeypatch, capsys):
    import typer

    monkeypatch.setenv("COLUMNS", "300")
    from rankwise.cli import app

    def probe(
        prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
        greedy: bool = typer.Option(False, "--greedy", help="Pick the likeliest token."),
    ) -> None:
        """A command that exists only in this test."""

    extra = typer.models.CommandInfo(name="probe", callback=probe)
    monkeypatch.setattr(app, "registered_commands", [*app.registered_commands, extra])
    assert main(["probe", "--help"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "--greedy" in ln)
    assert "<bool>" not in line and "[required]" in out
    assert main(["probe"]) == 2
    assert "Missing option '--prompt'" in capsys.readouterr().err
