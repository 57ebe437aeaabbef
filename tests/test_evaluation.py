"""rankwise.evaluation: evaluate() (what is scored, adapters, options) and generate()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rankwise import evaluation
from rankwise.data import perplexity, tokenize_stream
from rankwise.errors import CheckpointError, ConfigError, ModelError
from rankwise.evaluation import evaluate, generate
from rankwise.models import count_parameters, tiny_llama

DOCS = [f"Document number {i} talks about topic {i % 5} at some length." for i in range(12)]


def save_trained_adapter(folder: Path) -> torch.nn.Module:
    """A LoRA on tiny-llama with random (non-zero) weights, saved to ``folder``; returns the model."""
    from rankwise.adapters import attach, save_adapter

    model, _ = tiny_llama()
    attach(model, "lora", targets=["q_proj", "v_proj"], rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    save_adapter(model, folder)
    return model


@pytest.fixture
def text_file(tmp_path) -> Path:
    f = tmp_path / "my_file.txt"
    f.write_text("\n\n".join(DOCS))
    return f


def test_user_file_is_scored_whole_by_default(text_file):
    model, tok = tiny_llama()
    report = evaluate("tiny-llama", text_file, seq_len=1024, max_tokens=None)  # one window
    whole = perplexity(model, tok, [text_file.read_text()], seq_len=1024)
    assert report["split"] == "all"
    assert report["tokens"] == whole.tokens == len(tokenize_stream(tok, [text_file.read_text()])) - 1
    assert report["perplexity"] == pytest.approx(whole.perplexity, rel=1e-6)


def test_split_given_on_a_user_file_scores_that_split(text_file):
    whole = evaluate("tiny-llama", text_file, seq_len=16, max_tokens=None)
    part = evaluate("tiny-llama", text_file, split="validation", seq_len=16, max_tokens=None)
    assert part["split"] == "validation"
    assert 0 < part["tokens"] < whole["tokens"] / 5
    assert part["corpus_fingerprint"] != whole["corpus_fingerprint"]


def test_list_of_texts_is_scored_as_given_and_split_is_refused():
    report = evaluate("tiny-llama", DOCS, seq_len=16)
    assert report["split"] is None and report["data"] == f"{len(DOCS)} texts"
    with pytest.raises(ConfigError, match="split"):
        evaluate("tiny-llama", DOCS, split="train")


def test_reports_the_storage_aware_parameter_count():
    model, _ = tiny_llama()
    assert evaluate("tiny-llama", DOCS, seq_len=16)["parameters"] == count_parameters(model)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: option checks come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(evaluation, "_load", refuse)


@pytest.mark.parametrize("max_tokens", [-1, 0])
def test_bad_max_tokens_is_refused_before_loading(no_loading, max_tokens):
    with pytest.raises(ConfigError, match="max_tokens"):
        evaluate("tiny-llama", DOCS, max_tokens=max_tokens)


def test_missing_adapter_folder_is_refused_before_loading(no_loading, tmp_path):
    with pytest.raises(CheckpointError, match="adapter folder .*does not exist"):
        evaluate("tiny-llama", DOCS, adapter=tmp_path / "nope")
    with pytest.raises(CheckpointError, match="adapter folder"):
        generate("tiny-llama", "hi", adapter=tmp_path / "nope")


def test_seq_len_beyond_the_context_is_refused():
    with pytest.raises(ConfigError, match="--seq-len 5000 .*1024"):
        evaluate("tiny-llama", DOCS, seq_len=5000)


def test_adapter_is_loaded_and_scored(tmp_path):
    folder = tmp_path / "adapter"
    adapted = save_trained_adapter(folder)
    _, tok = tiny_llama()
    report = evaluate("tiny-llama", DOCS, adapter=folder, seq_len=32)
    plain = evaluate("tiny-llama", DOCS, seq_len=32)
    expected = perplexity(adapted, tok, DOCS, seq_len=32)
    assert report["adapter"] == str(folder)
    assert report["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert report["perplexity"] != pytest.approx(plain["perplexity"], rel=1e-3)
    assert report["parameters"] == count_parameters(adapted) > plain["parameters"]


def _greedy(model, tok, prompt: str, steps: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            new.append(nxt.item())
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_generation_matches_a_hand_written_argmax_loop():
    model, tok = tiny_llama()
    result = generate("tiny-llama", "The cat sat", max_new_tokens=12)
    assert result["completion"] == _greedy(model, tok, "The cat sat", 12)
    assert result["prompt"] == "The cat sat" and result["tokens_per_second"] > 0
    assert 0 < result["new_tokens"] <= 12


def test_generation_with_an_adapter_uses_it(tmp_path):
    folder = tmp_path / "adapter"
    adapted = save_trained_adapter(folder)
    _, tok = tiny_llama()
    result = generate("tiny-llama", "The cat sat", adapter=folder, max_new_tokens=12)
    assert result["adapter"] == str(folder)
    assert result["completion"] == _greedy(adapted, tok, "The cat sat", 12)
    assert result["completion"] != generate("tiny-llama", "The cat sat", max_new_tokens=12)["completion"]


def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds():
    runs = [generate("tiny-llama", "Once", max_new_tokens=16, temperature=1.5, seed=s)["completion"] for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_generation_options_are_refused_before_loading(no_loading, options, message):
    with pytest.raises(ConfigError, match=message):
        generate("tiny-llama", **({"prompt": "hi"} | options))


def test_generation_beyond_the_context_is_refused():
    with pytest.raises(ConfigError, match="context \\(1024 positions\\)"):
        generate("tiny-llama", "hi", max_new_tokens=1024)


def test_encoder_cannot_generate():
    with pytest.raises(ModelError, match="not a causal language model"):
        generate("tiny-bert", "hi")
