"""Generic checks every registered method must pass (new methods are picked up automatically)."""

import pytest
import torch

from rankwise.compress.api import compress
from rankwise.compress.base import LowRankLinear, method_names
from rankwise.data import token_blocks
from rankwise.models import count_parameters, tiny_llama


@pytest.mark.parametrize("method", method_names())
def test_method_meets_the_target_and_stays_close(method, texts):
    model, tok = tiny_llama(seed=0, layers=2, hidden=64)
    ids = token_blocks(tok, texts, seq_len=64, max_tokens=128)
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    before = count_parameters(model)
    result = compress(
        model,
        tokenizer=tok,
        method=method,
        ratio=0.85,
        data=texts,
        calib_tokens=512,
        seq_len=64,
        evaluate=False,
        measure_speed=False,
    )
    kept = result.report["parameters"]["after"]
    assert abs(kept - 0.85 * before) <= 0.01 * before
    assert result.report["parameters"]["before"] == before
    assert any(isinstance(m, LowRankLinear) for m in result.model.modules()) or method not in (
        "svd",
        "asvd",
        "svdllm",
        "fwsvd",
    )
    with torch.no_grad():
        logits = result.model(input_ids=ids).logits
    rel = float(torch.linalg.norm(logits - dense_logits) / torch.linalg.norm(dense_logits))
    assert rel < 0.5, f"{method}: logits moved by {rel:.2f} of their norm"


def test_calibrated_methods_are_closer_than_plain_svd(texts):
    """On a real model's correlated activations, whitening keeps the outputs closer."""
    errors = {}
    for method in ("svd", "svdllm"):
        model, tok = tiny_llama(seed=0, layers=2, hidden=64)
        ids = token_blocks(tok, texts, seq_len=64, max_tokens=256)
        with torch.no_grad():
            dense = model(input_ids=ids).logits
        result = compress(
            model, tokenizer=tok, method=method, ratio=0.75, data=texts, calib_tokens=512, seq_len=64,
            evaluate=False, measure_speed=False,
        )
        with torch.no_grad():
            errors[method] = float(torch.linalg.norm(result.model(input_ids=ids).logits - dense))
    assert errors["svdllm"] < errors["svd"]
