from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rankwise.cli import main


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
    debug = subprocess.run([*cmd, "--debug", "eval", "--model", "nope"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
