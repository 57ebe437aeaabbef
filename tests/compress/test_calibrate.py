import importlib

import pytest
import torch
from torch import nn

from rankwise.compress.calibrate import FISHER_SEED, FISHER_WINDOW, calibrate, linear_layers
from rankwise.data import token_blocks
from rankwise.errors import ConfigError, DataError, ModelError, ShapeError


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


def _output_gradients(model, blocks, layer, batch_size: int) -> list[torch.Tensor]:
    """Each batch's output gradients (tokens, out) of ``layer``, as calibration sees them."""
    grads = []

    def keep_grad(module, args, out):
        out.register_hook(grads.append)

    handle = layer.register_forward_hook(keep_grad)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    for block in blocks.split(batch_size):
        model(input_ids=block, labels=block).loss.backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    return [g.detach().reshape(-1, g.shape[-1]).double() for g in grads]


def test_out_fisher_is_a_gaussian_sketch_of_the_output_gradients(tiny, texts):
    model, tok = tiny
    cal = calibrate(model, tok, texts, tokens=256, seq_len=64, batch_size=2, statistics=("out_fisher",))
    assert cal.collected == ("out_fisher",)
    layer = model.model.layers[1].mlp.down_proj
    grads = _output_gradients(model, token_blocks(tok, texts, seq_len=64, max_tokens=256), layer, 2)
    rng = torch.Generator().manual_seed(FISHER_SEED)  # one Ω per batch, drawn in batch order
    sketch = sum(torch.randn(FISHER_WINDOW, len(g), generator=rng).double() @ g for g in grads)
    stats = cal.stats["model.layers.1.mlp.down_proj"]
    assert stats.out_grad_sketch.shape == (FISHER_WINDOW, layer.out_features)
    torch.testing.assert_close(stats.out_grad_sketch, sketch, rtol=1e-4, atol=1e-4 * float(sketch.abs().max()))
    assert stats.out_grad_sq is None and stats.gram is None  # only what was asked for

    # the sketched Fisher estimates F = (1/T) Σ g gᵀ: its quadratic form along F's own
    # leading and trailing eigenvectors is close to the exact one (chi-square, 64 dof)
    G = torch.cat(grads)
    exact = G.T @ G / len(G)
    evals, evecs = torch.linalg.eigh(exact)
    lead, trail = evecs[:, -1:], evecs[:, :1]
    assert float(stats.direction_sensitivity(lead)) == pytest.approx(float(evals[-1]), rel=0.5)
    assert float(stats.direction_sensitivity(trail)) < 0.1 * float(evals[-1])
    mean_diag = float(stats.output_fisher().dense().diagonal().mean())
    assert mean_diag == pytest.approx(float(exact.diagonal().mean()), rel=0.3)


def test_direction_sensitivity_without_the_sketch_names_the_statistic(tiny, texts):
    model, tok = tiny
    cal = calibrate(model, tok, texts, tokens=128, seq_len=64, statistics=("gram",))
    with pytest.raises(ConfigError, match="calibrate with 'out_fisher'"):
        cal.stats["model.layers.0.mlp.up_proj"].direction_sensitivity(torch.eye(128)[:, :2])


def test_compress_with_mfac_allocation_reaches_the_ratio(tiny, texts):
    from rankwise.compress import compress

    model, tok = tiny
    result = compress(
        model, tokenizer=tok, method="svdllm", ratio=0.7, allocation="mfac", data=texts,
        calib_tokens=256, seq_len=64, evaluate=False, measure_speed=False,
    )  # fmt: skip
    report = result.report
    assert report["allocation"] == "mfac" and "out_fisher" in report["calibration"]["statistics"]
    p = report["parameters"]
    assert abs(p["after"] - 0.7 * p["before"]) <= 0.01 * p["before"]


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


@pytest.mark.parametrize("statistics", [("gram", "abs_mean", "out_grad"), ("gram", "fisher"), ("out_fisher",)])
def test_block_by_block_backward_equals_one_backward_pass_bit_for_bit(tiny, texts, monkeypatch, statistics):
    """Gradients taken one block's activations at a time, and input statistics in a pass of
    their own, give exactly the one-pass numbers (same batches, same operations)."""
    calibration = importlib.import_module("rankwise.compress.calibrate")  # the package exports a function of that name
    model, tok = tiny
    layers = linear_layers(model)
    assert calibration._checkpoint_blocks(model, layers) is not None  # tiny-llama takes the lean path
    lean = calibrate(model, tok, texts, tokens=256, seq_len=64, batch_size=2, statistics=statistics)
    monkeypatch.setattr(calibration, "_checkpoint_blocks", lambda model, layers: None)
    one_pass = calibrate(model, tok, texts, tokens=256, seq_len=64, batch_size=2, statistics=statistics)
    fields = ("gram", "abs_sum", "fisher_rows", "out_grad_sq", "out_grad_sketch", "tokens")
    for name in layers:
        for f in fields:
            a, b = getattr(lean.stats[name], f), getattr(one_pass.stats[name], f)
            assert (a is None and b is None) or (torch.equal(a, b) if torch.is_tensor(a) else a == b), (name, f)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("lean", [True, False])
def test_gradient_statistics_on_a_spread_subset_of_the_tokens(tiny, texts, monkeypatch, lean):
    """``gradient_tokens`` takes the gradient statistics on evenly spaced sequences only — the
    same numbers as calibrating on just those sequences — while input statistics see them all;
    the sensitivity divides by the tokens the gradients saw."""
    calibration = importlib.import_module("rankwise.compress.calibrate")
    model, tok = tiny
    if not lean:  # a model whose blocks do not hold every layer: one backward pass over the subset
        monkeypatch.setattr(calibration, "_checkpoint_blocks", lambda model, layers: None)
    ids = calibration.calibration_blocks(tok, texts, 512, 64)
    chosen = calibration.spread_blocks(ids, 2)
    assert [int(i) for i in torch.nonzero((ids[:, None] == chosen[None]).all(-1))[:, 0]] == [0, 7]
    both = calibrate(model, tok, texts, tokens=512, seq_len=64, batch_size=1, statistics=("gram", "out_grad"), gradient_tokens=128)
    full_inputs = calibrate(model, tok, texts, tokens=512, seq_len=64, batch_size=1, statistics=("gram",))
    monkeypatch.setattr(calibration, "calibration_blocks", lambda *a, **k: chosen)
    subset = calibrate(model, tok, texts, tokens=128, seq_len=64, batch_size=1, statistics=("out_grad",))
    name = "model.layers.1.mlp.up_proj"
    assert both.stats[name].out_grad_sq == pytest.approx(subset.stats[name].out_grad_sq, rel=1e-9)
    assert torch.equal(both.stats[name].gram, full_inputs.stats[name].gram)
    assert both.stats[name].tokens == 512 and both.stats[name].grad_tokens == 128
    assert both.stats[name].sensitivity == pytest.approx(subset.stats[name].sensitivity, rel=1e-9)
    assert both.gradient_tokens == 128 and both.recipe()["gradient_tokens"] == 128
