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


def test_gradient_datasets_cut_equal_length_blocks_from_two_kinds_of_text(tiny_llama, tmp_path):
    from rankwise.analysis.gradients import LICENSES, gradient_datasets

    model, tok = tiny_llama
    other = tmp_path / "other.txt"
    other.write_text("Rivers carry water from the hills to the sea. " * 40)
    sources = ["builtin", str(other)] + (["licenses"] if LICENSES.is_dir() else [])
    blocks = gradient_datasets(sources, tok, count=3, tokens=16)
    assert list(blocks) == sources
    assert all(b.shape == (3, 16) and b.dtype == torch.long for b in blocks.values())
    assert not torch.equal(blocks["builtin"], blocks[str(other)])
    result = gradient_spectra(model, tok, blocks, layers="down_proj", max_tokens=16)
    assert result.tokens == dict.fromkeys(sources, 16.0)  # equal lengths: the datasets compare fairly
    assert result.texts == dict.fromkeys(sources, 3)


def test_gradient_datasets_bad_input(tiny_llama, tmp_path, monkeypatch):
    from rankwise.analysis import gradients

    _, tok = tiny_llama
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(DataError, match="only 0 block"):
        gradients.gradient_datasets([str(short)], tok, count=2, tokens=64)
    with pytest.raises(ConfigError, match="repeat"):
        gradients.gradient_datasets(["builtin", "builtin"], tok)
    with pytest.raises(ConfigError, match="count"):
        gradients.gradient_datasets(["builtin"], tok, count=0)
    with pytest.raises(ConfigError, match="list of data sources"):
        gradients.gradient_datasets("builtin", tok)
    with pytest.raises(ConfigError, match="2-D long tensor"):
        gradient_spectra(tiny_llama[0], tok, {"a": torch.zeros(4, dtype=torch.long)})
    monkeypatch.setattr(gradients, "LICENSES", tmp_path / "missing")
    with pytest.raises(DataError, match="base-files"):
        gradients.gradient_datasets(["licenses"], tok)
