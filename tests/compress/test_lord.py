"""lord: output-PCA projection — exact against a dense eigendecomposition, robust to singular Grams."""

from __future__ import annotations

import torch

from rankwise.compress.base import get_method
from rankwise.compress.calibrate import LayerStats
from rankwise.models import count_parameters, load_model, tiny_llama


def _stats(x: torch.Tensor, out: int) -> LayerStats:
    return LayerStats(out_features=out, in_features=x.shape[1], gram=x.T @ x, tokens=x.shape[0])


def test_lord_is_the_projection_on_top_output_eigenvectors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, dtype=torch.float64, generator=g)
    x = torch.randn(200, 30, dtype=torch.float64, generator=g) * torch.logspace(
        -1, 1, 30, dtype=torch.float64
    )
    method = get_method("lord")
    dec = method.decompose(w, _stats(x, 20))
    evals, evecs = torch.linalg.eigh(w @ x.T @ x @ w.T)
    top = evecs[:, -6:]  # the 6 largest output principal directions
    up, down = method.refine(w, None, *dec.factors(6))
    assert torch.allclose(up @ down, top @ top.T @ w, atol=1e-9)
    # the decomposition contract: the tail of S² is the output error at every rank
    err = ((w - up @ down) @ x.T).pow(2).sum()
    assert torch.isclose(err, dec.S[6:].pow(2).sum(), rtol=1e-8)
    assert torch.isclose(err, evals[:-6].clamp(min=0).sum(), rtol=1e-6)


def test_lord_is_exact_where_the_gram_is_singular_and_damped_svdllm_is_not():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, dtype=torch.float64, generator=g)
    x = torch.randn(10, 40, dtype=torch.float64, generator=g)  # 10 tokens < 40 channels
    stats = _stats(x, 24)
    lord = get_method("lord")
    up, down = lord.refine(w, stats, *lord.decompose(w, stats).factors(10))
    assert ((w - up @ down) @ x.T).norm() < 1e-8 * (
        w @ x.T
    ).norm()  # rank 10 covers 10 tokens exactly
    svdllm = get_method("svdllm", update=False, damp=1e-2)
    up2, down2 = svdllm.decompose(w, stats).factors(10)
    assert ((w - up2 @ down2) @ x.T).norm() > 1e3 * ((w - up @ down) @ x.T).norm()


def end_to_end(method, options, ratio, texts, out=None):
    """Compress a 1-block tiny Llama; check the target (within 1%) and, with ``out``, the exact
    reload. Returns the relative logits change on calibration-like text, and the result."""
    from rankwise.compress.api import compress
    from rankwise.data import token_blocks

    model, tok = tiny_llama(seed=0, layers=1, hidden=64)
    ids = token_blocks(tok, texts, seq_len=64, max_tokens=256)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    before = count_parameters(model)
    res = compress(
        model,
        tokenizer=tok,
        method=method,
        method_options=options,
        ratio=ratio,
        data=texts,
        calib_tokens=512,
        seq_len=64,
        evaluate=False,
        measure_speed=False,
        out=out,
        report_html=False,
    )
    after = res.report["parameters"]["after"]
    assert after == count_parameters(res.model)
    assert abs(after - ratio * before) <= 0.01 * before, (after, ratio * before)
    with torch.no_grad():
        logits = res.model(input_ids=ids).logits
    if out is not None:
        loaded, _ = load_model(res.path)
        assert count_parameters(loaded) == after
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, logits)
    return float((logits - dense).norm() / dense.norm()), res


def test_lord_end_to_end_meets_ratio_round_trips_and_beats_plain_svd(tmp_path, texts):
    rel, _ = end_to_end("lord", {}, 0.8, texts, out=tmp_path / "m")
    rel_svd, _ = end_to_end("svd", {}, 0.8, texts)
    assert rel < rel_svd and rel < 0.3
