"""modegpt: Nystrom MLP, grouped VO SVD and rotary-pair QK selection, each checked exactly."""

from __future__ import annotations

import copy

import torch
from test_lord import end_to_end

from rankwise.compress.methods.modegpt import nystrom_mlp, qk_pairs, vo_svd
from rankwise.layers import GatherLinear, ResizedLinear, ScatterLinear


def test_nystrom_is_exact_when_the_intermediate_activations_have_rank_k():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 5, dtype=torch.float64, generator=g) @ torch.randn(
        5, 24, dtype=torch.float64, generator=g
    )
    down = torch.randn(16, 24, dtype=torch.float64, generator=g)
    gate = up = torch.randn(24, 16, dtype=torch.float64, generator=g)
    index, new_gate, _, new_down = nystrom_mlp(gate, up, down, z.T @ z, 5, damp=1e-12)
    assert new_gate.shape == (5, 16) and torch.equal(new_gate, gate[index])
    assert torch.allclose(z[:, index] @ new_down.T, z @ down.T, atol=1e-6)


def test_vo_svd_is_exact_at_full_size_and_beats_truncation_below():
    g = torch.Generator().manual_seed(1)
    d, hidden = 8, 24
    values = torch.randn(d, hidden, dtype=torch.float64, generator=g)
    outputs = [
        torch.randn(hidden, d, dtype=torch.float64, generator=g) for _ in range(2)
    ]  # 2 query heads
    x = torch.randn(200, hidden, dtype=torch.float64, generator=g) * torch.logspace(
        -1, 1, hidden, dtype=torch.float64
    )
    chol = torch.linalg.cholesky(x.T @ x)
    v_full, o_full, _ = vo_svd(values, outputs, chol, d)
    for o, oh in zip(outputs, o_full, strict=True):
        assert torch.allclose(oh @ v_full, o @ values, atol=1e-8)

    def error(v_new, o_new):
        return sum(
            float(((o @ values - oh @ v_new) @ x.T).norm() ** 2)
            for o, oh in zip(outputs, o_new, strict=True)
        )

    v4, o4, _ = vo_svd(values, outputs, chol, 4)
    assert error(v4, o4) < 0.8 * error(values[:4], [o[:, :4] for o in outputs])


def test_qk_selection_keeps_whole_rotary_pairs(tiny):
    """Dropped query pairs are zero after RoPE, so restoring the dense k_proj changes nothing."""
    model, tok = tiny
    attn = model.model.layers[0].self_attn
    d = attn.head_dim
    dims = qk_pairs(
        [attn.q_proj.weight[:d].double()],
        attn.k_proj.weight[:d].double(),
        torch.eye(64, dtype=torch.float64),
        3,
    )
    assert len(dims) == 6 and set((dims[dims < d // 2] + d // 2).tolist()) == set(
        dims[dims >= d // 2].tolist()
    )

    from rankwise.compress.api import compress

    texts = ["the quick brown fox jumps over the lazy dog " * 30] * 4
    compressed = copy.deepcopy(model)
    compress(
        compressed,
        tokenizer=tok,
        method="modegpt",
        method_options={"parts": ("qk",)},
        ratio=0.97,
        data=texts,
        calib_tokens=512,
        seq_len=64,
        evaluate=False,
        measure_speed=False,
    )
    q_proj = compressed.model.layers[0].self_attn.q_proj
    assert (
        isinstance(q_proj, ScatterLinear) and q_proj.kept < q_proj.out_features
    )  # some pairs dropped
    ids = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    restored = copy.deepcopy(compressed)
    for block_c, block_d in zip(restored.model.layers, model.model.layers, strict=True):
        block_c.self_attn.k_proj = block_d.self_attn.k_proj
    with torch.no_grad():
        assert torch.allclose(
            restored(input_ids=ids).logits, compressed(input_ids=ids).logits, atol=1e-5
        )


def test_modegpt_end_to_end_shrinks_dimensions(tmp_path, texts):
    rel, res = end_to_end("modegpt", {}, 0.8, texts, out=tmp_path / "m")
    block = res.model.model.layers[0]
    assert isinstance(block.mlp.down_proj, ResizedLinear) and block.mlp.down_proj.in_features < 128
    assert block.mlp.gate_proj.out_features == block.mlp.down_proj.in_features
    assert isinstance(block.self_attn.o_proj, GatherLinear) and isinstance(
        block.self_attn.v_proj, ScatterLinear
    )
    assert rel < 0.3
