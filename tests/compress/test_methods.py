"""Generic checks every registered method must pass (new methods are picked up automatically)."""

import pytest
import torch

from rankwise.compress.api import compress
from rankwise.compress.base import METHODS, CompressionMethod, method_names
from rankwise.compress.report import LayerReport
from rankwise.data import token_blocks
from rankwise.layers import LowRankLinear
from rankwise.models import count_parameters, tiny_llama


def per_layer_svd_methods() -> list[str]:
    """Methods on the per-layer SVD path (they do not override ``compress_model``)."""
    return [n for n, cls in METHODS.items() if cls.compress_model is CompressionMethod.compress_model]


def test_the_svd_path_is_found_from_the_registry():
    assert {"svd", "asvd", "svdllm", "fwsvd", "lord"} <= set(per_layer_svd_methods())
    assert not {"modegpt", "cospadi", "lq", "eora"} & set(per_layer_svd_methods())


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
    if method in per_layer_svd_methods():
        assert any(isinstance(m, LowRankLinear) for m in result.model.modules())
    with torch.no_grad():
        logits = result.model(input_ids=ids).logits
    rel = float(torch.linalg.norm(logits - dense_logits) / torch.linalg.norm(dense_logits))
    assert rel < 0.5, f"{method}: logits moved by {rel:.2f} of their norm"
    # every report row is a valid LayerReport: rank a positive int or None, typed detail
    rows = result.report["layers"]
    assert len(rows) == 14
    for row in rows:
        rebuilt = LayerReport(**{k: v for k, v in row.items() if k != "breakeven_rank"})
        assert rebuilt.to_dict() == row
        module = result.model.get_submodule(row["name"])
        assert row["layer_type"] == type(module).__name__


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
