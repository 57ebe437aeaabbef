import json
import os

import pytest
import torch

from rankwise.cli import main


def test_cli_compress_tiny_llama_writes_folder_and_report(tmp_path, capsys, texts):
    out, data = tmp_path / "tiny-80", tmp_path / "text.txt"
    data.write_text("\n\n".join(texts * 3))
    code = main(
        ["compress", "--model", "tiny-llama", "--method", "svdllm", "--ratio", "0.8", "--out", str(out),
         "--data", str(data), "--calib-tokens", "512", "--eval-tokens", "512", "--seq-len", "128",
         "--decode-tokens", "8", "--json", "-o", "damp=0.001", "--option", "update=false", "--threads", "2"]
    )
    assert code == 0
    assert torch.get_num_threads() == 2  # the CLI sets what it was asked (the library never does)
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    assert report["parameters"]["after"] == printed["parameters"]["after"]
    assert abs(report["parameters"]["kept_fraction"] - 0.8) <= 0.01
    assert report["perplexity"]["after"] > 0 and report["decode"]["after_tokens_per_s"] > 0
    assert report["calibration"]["tokens"] == 512 and report["layers"]
    assert report["method_options"] == {"damp": 0.001, "update": False}
    assert report["allocation"] == "fisher" and report["layers"][0]["layer_type"] in ("LowRankLinear", "Linear")
    assert main(["eval", "--model", str(out), "--data", str(data), "--max-tokens", "256", "--seq-len", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == report["parameters"]["after"]


def test_cli_compress_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["compress", "--model", "tiny-llama", "--ratio", "1.7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ratio must be in (0, 1]") and "\n" not in err
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    assert main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compress", "--model", "tiny-llama", "--method", "nope", "--out", str(tmp_path / "y")]) == 2
    assert main(["compress", "--model", "tiny-llama", "-o", "dampp=1", "--out", str(tmp_path / "z")]) == 2
    assert "no option(s) ['dampp']" in capsys.readouterr().err
    assert main(["compress", "--model", "tiny-llama", "-o", "damp", "--out", str(tmp_path / "z")]) == 2
    assert "key=value" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _no_loading(monkeypatch):
    """Make any model load fail loudly: the checks under test must come before it."""
    import rankwise.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(rankwise.models, "load_model", refuse)


def test_cli_compress_refuses_out_dot_before_any_work(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["compress", "--model", "tiny-llama", "--out", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "current folder" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_compress_overwrite_never_deletes_user_files(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    out = tmp_path / "u"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("chapter 1")
    (out / "sub" / "data.csv").write_text("x,y\n")
    assert main(["compress", "--model", "tiny-llama", "--out", str(out), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (out / "thesis.txt").read_text() == "chapter 1"
    assert (out / "sub" / "data.csv").read_text() == "x,y\n"


def test_cli_compress_unwritable_destination_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "a-file" / "out")]) == 2
    assert "not a writable folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_compress_read_only_parent_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["compress", "--model", "tiny-llama", "--out", str(locked / "out")]) == 2
        assert "not a writable folder" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_cli_compress_option_of_the_wrong_type_is_one_line(tmp_path, capsys):
    assert main(["compress", "--model", "tiny-llama", "-o", "damp=abc", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "option damp='abc' has the wrong type: expected float" in err and "\n" not in err


def test_cli_compress_refuses_an_encoder_model(tmp_path, capsys):
    assert main(["compress", "--model", "tiny-bert", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "compress needs a causal language model" in err and "is a BertModel" in err
    assert "\n" not in err and not (tmp_path / "b").exists()


def test_cli_compress_allocation_a_method_cannot_honour(tmp_path, capsys):
    args = ["compress", "--model", "tiny-llama", "--method", "modegpt", "--out", str(tmp_path / "m")]
    assert main([*args, "--allocate", "fisher"]) == 2
    assert "'modegpt' cannot allocate with 'fisher'; it supports --allocate auto (= uniform)" in capsys.readouterr().err


def test_cli_compress_mixes_sources_and_takes_the_calibration_mode(tmp_path, capsys, texts):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n\n".join(texts * 2))
    second.write_text("\n\n".join(t.upper() for t in texts * 2))
    out = tmp_path / "mixed"
    code = main(
        ["compress", "--model", "tiny-llama", "--method", "svdllm", "--ratio", "0.8", "--out", str(out),
         "-d", str(first), "-d", str(second), "--calibration", "open-loop", "--calib-tokens", "512",
         "--eval-tokens", "256", "--seq-len", "64", "--decode-tokens", "4", "--no-heldout"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["mode"] == "open-loop"
    assert report["calibration"]["corpus"] == f"{first}+{second}"
    assert "heldout" not in report["perplexity"]
    printed = capsys.readouterr().out
    assert "calibration: open-loop" in printed
    assert main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "y"), "--heal-steps", "-3"]) == 2
    assert "heal_steps must be >= 0" in capsys.readouterr().err
    assert main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "z"), "--calibration", "both"]) == 2
    assert "auto, open-loop or closed-loop" in capsys.readouterr().err


def test_cli_healing_rates_default_to_the_library_default():
    """`rankwise compress --heal-lr` and `rankwise heal --lr` default to heal.DEFAULT_LR (the rate
    chosen by measurement, docs/compress.md), so the three entry points cannot drift apart."""
    import inspect

    from rankwise.cli.compress import compress_command
    from rankwise.cli.heal import heal_command
    from rankwise.compress.heal import DEFAULT_LR, heal

    assert inspect.signature(compress_command).parameters["heal_lr"].default.default == DEFAULT_LR
    assert inspect.signature(heal_command).parameters["lr"].default.default == DEFAULT_LR
    assert inspect.signature(heal).parameters["lr"].default == DEFAULT_LR


def test_cli_healing_losses_default_to_the_library_default():
    """`rankwise compress --heal-loss/--heal-precision` and `rankwise heal --loss/--precision`
    default to the library's defaults."""
    import inspect

    from rankwise.cli.compress import compress_command
    from rankwise.cli.heal import heal_command
    from rankwise.compress.api import compress as compress_api
    from rankwise.compress.heal import DEFAULT_LOSS, heal_folder

    assert inspect.signature(compress_command).parameters["heal_loss"].default.default == DEFAULT_LOSS
    assert inspect.signature(heal_command).parameters["loss"].default.default == DEFAULT_LOSS
    assert inspect.signature(heal_folder).parameters["loss"].default == DEFAULT_LOSS
    assert inspect.signature(compress_api).parameters["heal_loss"].default == DEFAULT_LOSS
    assert inspect.signature(compress_command).parameters["heal_precision"].default.default == "auto"
    assert inspect.signature(heal_command).parameters["precision"].default.default == "auto"
    assert inspect.signature(heal_folder).parameters["precision"].default == "auto"
    assert inspect.signature(compress_api).parameters["heal_precision"].default == "auto"


def test_cli_gradient_tokens_default_to_the_library_default():
    """`rankwise compress --grad-tokens` defaults to compress()'s GRADIENT_TOKENS."""
    import inspect

    from rankwise.cli.compress import compress_command
    from rankwise.compress.api import GRADIENT_TOKENS, compress

    assert inspect.signature(compress_command).parameters["grad_tokens"].default.default == GRADIENT_TOKENS
    assert inspect.signature(compress).parameters["gradient_tokens"].default == GRADIENT_TOKENS
