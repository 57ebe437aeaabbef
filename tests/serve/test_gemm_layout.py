"""The engine stores float32 linear weights transposed in memory (faster float32 GEMMs on
CPU): same tensors, same values, same outputs; bfloat16 weights are left alone."""

from __future__ import annotations

import torch
from torch import nn

from rankwise.models import tiny_llama
from rankwise.serve import Engine
from rankwise.serve.engine import gemm_friendly_layout


def _model() -> nn.Module:
    return tiny_llama()[0]


def test_layout_keeps_values_parameters_and_outputs():
    model = _model()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the embedding works on the new layout too
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    tied = {id(m.weight) for m in linears}
    assert gemm_friendly_layout(model) == len(tied)
    for name, p in model.named_parameters():
        assert p is params[name][0], name
        assert torch.equal(p, params[name][1]), name
    for m in linears:
        assert not m.weight.is_contiguous() and m.weight.T.is_contiguous()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert gemm_friendly_layout(model) == 0  # idempotent: nothing contiguous is left


def test_layout_leaves_bfloat16_alone():
    model = _model().to(torch.bfloat16)
    assert gemm_friendly_layout(model) == 0
    assert all(m.weight.is_contiguous() for m in model.modules() if type(m) is nn.Linear)


def test_engine_uses_the_layout(tmp_path):
    engine = Engine(tiny_llama(), tmp_path)
    head = engine.model.get_output_embeddings()
    assert head.weight.T.is_contiguous() and not head.weight.is_contiguous()
