"""gradient_spectra(): per-layer gradient nuclear norm / effective rank, datasets side by side."""

from __future__ import annotations

import pytest
import torch

from rankwise.analysis import gradient_spectra
from rankwise.errors import ConfigError, DataError, ModelError
from rankwise.linalg import effective_rank

CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n"]
PROSE = ["The cat sat quietly on the warm mat all afternoon.", "Rivers carry water from the hills to the sea."]


def test_matches_gradients_computed_by_hand(tiny_llama):
    model, tok = tiny_llama
    layer = "model.layers.0.mlp.down_proj"
    result = gradient_spectra(model, tok, CODE, layers=layer)
    expected_nuc, expected_eff = 0.0, 0.0
    weight = model.get_submodule(layer).weight
    for text in CODE:
        ids = tok(text, return_tensors="pt")["input_ids"]
        weight.requires_grad_(True)
        weight.grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        G = weight.grad.double()
        expected_nuc += float(torch.linalg.matrix_norm(G, "nuc")) / len(CODE)
        expected_eff += float(effective_rank(G)) / len(CODE)
        weight.grad = None
    assert result.layers == [layer]
    assert result.nuclear_norm["data"][layer] == pytest.approx(expected_nuc, rel=1e-6)
    assert result.effective_rank["data"][layer] == pytest.approx(expected_eff, rel=1e-4)


def test_two_datasets_side_by_side_and_model_left_as_it_was(tiny_llama):
    model, tok = tiny_llama
    for p in model.parameters():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = gradient_spectra(model, tok, {"code": CODE, "prose": PROSE})
    rows = result.to_rows()
    assert len(rows) == 15
    assert {"code_nuclear_norm", "prose_nuclear_norm", "code_effective_rank", "prose_effective_rank"} <= set(rows[0])
    assert all(r["code_nuclear_norm"] > 0 and r["prose_nuclear_norm"] > 0 for r in rows)
    assert rows[0]["code_nuclear_norm"] != rows[0]["prose_nuclear_norm"]
    assert result.texts == {"code": 2, "prose": 2} and set(result.loss) == {"code", "prose"}
    for n, p in model.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, before[n])


def test_bad_input(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(DataError, match="'b' is empty"):
        gradient_spectra(model, tok, {"a": CODE, "b": []})
    with pytest.raises(DataError, match="text 1 has 1 token"):
        gradient_spectra(model, tok, ["long enough", "x"], max_tokens=8)
    with pytest.raises(ConfigError, match="max_tokens"):
        gradient_spectra(model, tok, CODE, max_tokens=1)
    with pytest.raises(ConfigError, match="one string"):
        gradient_spectra(model, tok, "just a string")


def test_encoder_without_loss_is_refused():
    from rankwise.models import tiny_bert

    model, tok = tiny_bert()
    with pytest.raises(ModelError, match="causal language model"):
        gradient_spectra(model, tok, PROSE)
