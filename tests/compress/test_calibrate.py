import pytest
import torch
from torch import nn

from rankwise.compress.calibrate import calibrate, linear_layers
from rankwise.data import token_blocks
from rankwise.errors import DataError, ModelError, ShapeError


def test_gram_and_scales_equal_explicit_computation(tiny, texts):
    model, tok = tiny
    layer = model.model.layers[1].mlp.down_proj
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for block in token_blocks(tok, texts, seq_len=64, max_tokens=256).split(2):
            model(input_ids=block)
    handle.remove()
    x = torch.cat(captured).double()  # (tokens, in)
    cal = calibrate(model, tok, texts, tokens=256, seq_len=64, batch_size=2)
    stats = cal.stats["model.layers.1.mlp.down_proj"]
    assert stats.tokens == x.shape[0] == cal.tokens == 256
    torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)  # float32 products
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0))


def test_layers_with_the_same_input_share_one_gram(tiny, texts):
    model, tok = tiny
    cal = calibrate(model, tok, texts, tokens=128, seq_len=64)
    s = cal.stats
    assert s["model.layers.0.self_attn.q_proj"].gram is s["model.layers.0.self_attn.v_proj"].gram
    assert s["model.layers.0.mlp.gate_proj"].gram is s["model.layers.0.mlp.up_proj"].gram
    assert s["model.layers.0.self_attn.o_proj"].gram is not s["model.layers.0.self_attn.q_proj"].gram
    assert "lm_head" not in s or not model.config.tie_word_embeddings


def test_fisher_rows_are_squared_gradients(tiny, texts):
    model, tok = tiny
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cal = calibrate(model, tok, texts, tokens=128, seq_len=64, batch_size=2, statistics=("fisher",))
    blocks = token_blocks(tok, texts, seq_len=64, max_tokens=128)
    layer = model.model.layers[0].self_attn.k_proj
    model.zero_grad()
    model(input_ids=blocks, labels=blocks).loss.backward()
    expected = layer.weight.grad.double().pow(2).sum(1)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(cal.stats["model.layers.0.self_attn.k_proj"].fisher_rows, expected)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_out_grad_is_the_squared_output_gradient(tiny, texts):
    model, tok = tiny
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cal = calibrate(model, tok, texts, tokens=128, seq_len=64, batch_size=2, statistics=("out_grad",))
    blocks = token_blocks(tok, texts, seq_len=64, max_tokens=128)
    layer = model.model.layers[1].mlp.up_proj
    grads = []

    def keep_grad(module, args, out):
        out.register_hook(grads.append)

    handle = layer.register_forward_hook(keep_grad)
    for p in model.parameters():
        p.requires_grad_(True)
    total = 0.0
    for block in blocks.split(2):  # the same batches: the loss is a mean per batch
        model(input_ids=block, labels=block).loss.backward()
        total += float(grads[-1].double().pow(2).sum())
    handle.remove()
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    stats = cal.stats["model.layers.1.mlp.up_proj"]
    assert stats.out_grad_sq == pytest.approx(total, rel=1e-6)
    assert stats.sensitivity == pytest.approx(total / (128 * layer.out_features), rel=1e-6)
    assert stats.gram is None and cal.stats["model.layers.0.self_attn.q_proj"].sensitivity > 0


def test_short_text_nan_and_no_linear_layers_raise(tiny, texts):
    model, tok = tiny
    with pytest.raises(DataError, match="calib_tokens"):
        calibrate(model, tok, ["short text"], tokens=128, seq_len=64)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ShapeError, match="NaN"):
        calibrate(model, tok, texts, tokens=64, seq_len=64)
    with pytest.raises(ModelError, match="no linear layers"):
        linear_layers(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))
