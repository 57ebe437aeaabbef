"""`rankwise pretrain`: help, a tiny run as JSON, one-line errors (exit 2) naming the fix."""

from __future__ import annotations

import json

import pytest

from rankwise.cli import main

TINY = ["pretrain", "--config", "tiny", "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--eval-tokens", "128"]


def test_help_explains_resume_and_torchrun(capsys):
    assert main(["pretrain", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for word in ("--method", "--resume", "--fsdp", "torchrun", "galore", "sltrain", "--list-methods"):
        assert word in out


def test_tiny_run_json_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main([*TINY, "--method", "dct", "--rank", "8", "--steps", "2", "--out", out, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 and result["val_perplexity"] > 1 and result["optimizer_state_bytes"] > 0
    assert main([*TINY, "--method", "dct", "--rank", "8", "--steps", "2", "--out", out, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2  # already done: nothing more to train


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "glaore"], "valid: adamw"),
        (["--method", "galore", "--fsdp"], "DDP"),
        (["--config", "llama-2b"], "llama-20m"),
        (["--out", "{tmp}/none", "--resume"], "no complete checkpoint"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main([*TINY, "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def _has_option(flag: str) -> bool:
    import inspect

    from rankwise.cli.pretrain import pretrain_command

    params = inspect.signature(pretrain_command).parameters.values()
    return any(flag in getattr(p.default, "param_decls", ()) for p in params)


@pytest.mark.skipif(
    not _has_option("--project-embeddings"),
    reason="the --project-embeddings flag is not in src/rankwise/cli/pretrain.py yet",
)
def test_project_embeddings_flag_is_saved_and_checked_on_resume(tmp_path, capsys):
    assert main(["pretrain", "--help"]) == 0
    assert "--project-embeddings" in capsys.readouterr().out
    out = str(tmp_path / "run")
    args = [*TINY, "--method", "galore", "--rank", "8", "--steps", "2", "--out", out]
    assert main([*args, "--project-embeddings", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["project_embeddings"] is True
    assert main([*args, "--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "project_embeddings: True in the checkpoint, False now" in err
