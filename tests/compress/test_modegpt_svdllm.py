"""modegpt-svdllm: MoDeGPT head dims on attention + SVD-LLM low rank on the MLP, one budget."""

from __future__ import annotations

import pytest
from test_lord import end_to_end

from rankwise.compress.base import get_method
from rankwise.errors import ConfigError
from rankwise.layers import GatherLinear, LowRankLinear, ScatterLinear


def test_attention_gets_head_dims_and_the_mlp_low_rank_at_the_ratio_and_it_reloads(tmp_path, texts):
    rel, res = end_to_end("modegpt-svdllm", {}, 0.8, texts, out=tmp_path / "m")  # ratio ±1%, exact reload
    attn, mlp = res.model.model.layers[0].self_attn, res.model.model.layers[0].mlp
    assert isinstance(attn.v_proj, ScatterLinear) and isinstance(attn.o_proj, GatherLinear)
    assert isinstance(attn.q_proj, ScatterLinear) and attn.q_proj.kept < attn.q_proj.out_features
    assert any(isinstance(m, LowRankLinear) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert not any(isinstance(m, LowRankLinear) for m in attn.modules())
    assert rel < 0.3
    rows = {r["name"]: r for r in res.report["layers"]}
    assert rows["model.layers.0.self_attn.v_proj"]["layer_type"] == "ScatterLinear"
    assert list(rows) == [n for n, _ in res.model.named_modules() if n in rows]  # model order


def test_attention_keep_one_leaves_attention_dense_and_spends_the_budget_on_the_mlp(texts):
    _, res = end_to_end("modegpt-svdllm", {"attention_keep": 1.0}, 0.85, texts)
    attn, mlp = res.model.model.layers[0].self_attn, res.model.model.layers[0].mlp
    assert type(attn.q_proj).__name__ == type(attn.v_proj).__name__ == "Linear"
    assert any(isinstance(m, LowRankLinear) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def test_more_attention_kept_leaves_less_for_the_mlp(texts):
    ranks = {}
    for keep in (0.5, 0.9):
        _, res = end_to_end("modegpt-svdllm", {"attention_keep": keep}, 0.8, texts)
        ranks[keep] = sum(r["rank"] or 0 for r in res.report["layers"] if ".mlp." in r["name"])
    assert ranks[0.5] > ranks[0.9]


@pytest.mark.parametrize("options", [{"attention_keep": 1.5}, {"attention_keep": -0.1}, {"damp": 0.0}])
def test_bad_options_name_the_option(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        get_method("modegpt-svdllm", **options)


def test_an_allocation_it_cannot_honour_names_the_ones_it_can():
    method = get_method("modegpt-svdllm")
    assert method.resolve_allocation("auto") == "fisher"
    with pytest.raises(ConfigError, match="supports --allocate auto"):
        method.resolve_allocation("mfac")
    assert not method.supports_closed_loop()
