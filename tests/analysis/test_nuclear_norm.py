"""nuclear_norm_score(): the L1,2 approximation against the exact nuclear norm."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.analysis import nuclear_norm_score
from rankwise.analysis.nuclear_norm import l12_nuclear_norm
from rankwise.errors import ConfigError, DataError, ModelError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n", "a"]


def test_approximation_is_exact_for_one_hot_rows():
    # confident predictions: rows one-hot -> columns orthogonal -> ‖A‖_* = Σ column norms
    A = torch.zeros(6, 10, dtype=torch.float64)
    for row, col in enumerate([3, 3, 7, 1, 9, 7]):
        A[row, col] = 1.0
    assert float(l12_nuclear_norm(A)) == pytest.approx(float(torch.linalg.matrix_norm(A, "nuc")), rel=1e-12)


def test_approximation_is_close_for_confident_rows_and_within_the_norm_bounds():
    g = torch.Generator().manual_seed(0)
    for temperature in (0.05, 1.0, 10.0):
        A = torch.softmax(torch.randn(40, 300, generator=g) / temperature, -1)
        approx, exact = float(l12_nuclear_norm(A)), float(torch.linalg.matrix_norm(A.double(), "nuc"))
        fro, D = float(torch.linalg.matrix_norm(A.double())), min(A.shape)
        assert fro * (1 - 1e-9) <= exact <= math.sqrt(D) * fro * (1 + 1e-9)
        assert approx <= math.sqrt(D) * fro * (1 + 1e-9)  # always, by Cauchy-Schwarz
        if temperature == 0.05:  # near one-hot rows: the approximation is tight
            assert approx == pytest.approx(exact, rel=0.02)


def test_score_on_a_model_matches_the_exact_norm_relation(tiny_llama):
    model, tok = tiny_llama
    result = nuclear_norm_score(model, tok, TEXTS, exact=True)
    assert len(result.texts) == 3 and result.texts[2].tokens == 1
    for t in result.texts:
        D = min(t.tokens, len(tok))
        assert t.frobenius * (1 - 1e-6) <= t.exact <= math.sqrt(D) * t.frobenius * (1 + 1e-6)
        assert t.approx <= math.sqrt(D) * t.frobenius * (1 + 1e-6)
    assert result.score == pytest.approx(sum(t.approx for t in result.texts) / 3)
    assert result.exact_score == pytest.approx(sum(t.exact for t in result.texts) / 3)
    assert result.seconds_exact is not None and result.seconds_approx >= 0


def test_score_by_hand(tiny_llama):
    model, tok = tiny_llama
    text = TEXTS[0]
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        A = torch.softmax(model(input_ids=ids).logits[0].float(), -1)
    L = A.shape[0]
    expected = float(torch.linalg.vector_norm(A.double(), dim=0).topk(min(A.shape)).values.sum()) / L
    result = nuclear_norm_score(model, tok, [text])
    assert result.score == pytest.approx(expected, rel=1e-6)  # column norms in float32
    assert result.exact_score is None


def test_max_tokens_truncates(tiny_llama):
    model, tok = tiny_llama
    assert nuclear_norm_score(model, tok, [TEXTS[0]], max_tokens=5).texts[0].tokens == 5
    with pytest.raises(ConfigError, match="max_tokens"):
        nuclear_norm_score(model, tok, TEXTS, max_tokens=0)
    with pytest.raises(ConfigError, match="context"):
        nuclear_norm_score(model, tok, TEXTS, max_tokens=100_000)


def test_empty_inputs(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(DataError, match="at least one text"):
        nuclear_norm_score(model, tok, [])
    with pytest.raises(DataError, match="text 1 is empty"):
        nuclear_norm_score(model, tok, ["fine", ""])


def test_encoder_without_logits_is_refused():
    from rankwise.models import tiny_bert

    model, tok = tiny_bert()
    with pytest.raises(ModelError, match="logits"):
        nuclear_norm_score(model, tok, TEXTS)
