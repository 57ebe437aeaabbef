"""Quantized layers on PyTorch's packed int8/int4 CPU kernels: equal to their dequantized
reference within bfloat16 rounding, a warned (once) and correct fallback, save/load round trips."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from rankwise.compress.api import compress
from rankwise.layers import QuantizedLinear, QuantizedLowRankLinear
from rankwise.layers import quantize as qmod
from rankwise.layers.quantize import dequantize, kernel_for, quantize, storage_bits
from rankwise.models import load_model, tiny_llama

# bfloat16 activations: a relative output error of a few 2^-9 is the kernel's rounding
KERNEL_TOLERANCE = 1e-2


def _layer(out_f=64, in_f=128, *, bits, fmt, group_size, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    return w, QuantizedLinear.from_quantized(quantize(w, bits=bits, fmt=fmt, group_size=group_size), b)


def _relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize(
    ("bits", "fmt", "group_size", "kernel"),
    [(8, "int", 128, "int8"), (4, "affine", 32, "int4"), (4, "affine", 64, "int4")],
)
def test_packed_layer_equals_its_dequantized_reference(bits, fmt, group_size, kernel):
    w, layer = _layer(bits=bits, fmt=fmt, group_size=group_size)
    assert layer.kernel == kernel
    x = torch.randn(3, 5, 128)  # 15 rows: decoding-sized, so the kernel runs
    with torch.no_grad():
        y = layer(x)
    reference = F.linear(x, layer.dequantize(), layer.bias)
    assert _relative(y, reference) < KERNEL_TOLERANCE
    assert _relative(y, reference) > 0  # really the bfloat16 kernel, not the float32 reference
    # and the quantized weight itself is close to the dense one (4-bit: ~9% of the norm)
    assert _relative(reference, F.linear(x, w, layer.bias)) < (0.02 if bits == 8 else 0.15)


def test_large_inputs_and_gradients_take_the_exact_dequantized_path():
    _, layer = _layer(bits=8, fmt="int", group_size=128)
    x = torch.randn(QuantizedLinear.KERNEL_MAX_ROWS + 1, 128)
    reference = F.linear(x, layer.dequantize(), layer.bias)
    with torch.no_grad():
        assert torch.equal(layer(x), reference)
    small = torch.randn(2, 128, requires_grad=True)
    layer(small).sum().backward()  # the kernel has no backward: autograd inputs dequantize
    assert small.grad is not None


def test_affine_format_round_trips_and_counts_its_minima():
    w = torch.randn(32, 64) * 0.1 + 0.03  # an offset the affine minimum absorbs
    q = quantize(w, bits=4, fmt="affine", group_size=32)
    step = q.scales.float().repeat_interleave(32).view(32, 64)
    assert ((dequantize(q) - w).abs() <= step / 2 + 1e-4).all()
    assert storage_bits(32, 64, bits=4, group_size=32, fmt="affine") == 32 * 64 * 4 + 64 * 32
    layer = QuantizedLinear.from_quantized(q)
    stored = sum(t.numel() * t.element_size() * 8 for t in (layer.codes, layer.scales, layer.zeros))
    assert layer.storage_bits() == stored


def test_kernel_choice_follows_the_format():
    assert kernel_for((64, 128), bits=8, fmt="int", group_size=128) == "int8"
    assert kernel_for((64, 128), bits=8, fmt="int", group_size=64) is None  # not one scale per row
    assert kernel_for((64, 128), bits=4, fmt="nf", group_size=64) is None  # codebook, no kernel
    assert kernel_for((60, 128), bits=4, fmt="affine", group_size=64) is None  # out % 16 != 0
    assert kernel_for((64, 128), bits=4, fmt="affine", group_size=48) is None
    assert kernel_for((64, 128), bits=8, fmt="int", group_size=128, device="meta") is None
    _, layer = _layer(bits=3, fmt="nf", group_size=64)
    assert layer.kernel == "dequantize"


def test_missing_kernel_warns_once_and_stays_correct(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(qmod, "kernel_matmul", unavailable)
    monkeypatch.setattr(qmod, "_warned", set())
    layers = [_layer(bits=8, fmt="int", group_size=128, seed=s)[1] for s in range(3)]
    x = torch.randn(2, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            outs = [layer(x) for layer in layers]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "int8" in messages[0] and "dequantize" in messages[0]
    assert all(layer.kernel == "dequantize" for layer in layers)
    for layer, y in zip(layers, outs, strict=True):
        assert torch.equal(y, F.linear(x, layer.dequantize(), layer.bias))


def test_kernel_copy_follows_codes_loaded_later():
    _, a = _layer(bits=4, fmt="affine", group_size=64, seed=1)
    _, b = _layer(bits=4, fmt="affine", group_size=64, seed=2)
    x = torch.randn(1, 128)
    with torch.no_grad():
        a(x)  # packs a's codes
        a.load_state_dict(b.state_dict())
        assert _relative(a(x), F.linear(x, b.dequantize(), b.bias)) < KERNEL_TOLERANCE


@pytest.mark.parametrize("method", ["lq", "eora"])
def test_save_load_round_trip_keeps_the_kernel_and_the_outputs(tmp_path, method):
    model, tok = tiny_llama(seed=0, layers=2, hidden=64)
    texts = ["the quick brown fox jumps over the lazy dog " * 40] * 4
    res = compress(
        model, tokenizer=tok, method=method, ratio=0.7, data=texts, calib_tokens=512, seq_len=128,
        out=tmp_path / "m", evaluate=False, measure_speed=False, report_html=False,
    )  # fmt: skip
    loaded, _ = load_model(res.path)
    quantized = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized and all(m.kernel in ("int8", "int4") for m in quantized.values())
    if method == "lq":
        assert any(isinstance(m, QuantizedLowRankLinear) for m in res.model.modules())
    for name, module in quantized.items():
        twin = loaded.get_submodule(name)
        assert type(twin) is type(module) and twin.kernel == module.kernel
        assert twin.storage_bits() == module.storage_bits()
        assert torch.equal(twin.codes, module.codes)
    ids = tok("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, res.model(ids).logits, atol=1e-5)


def test_report_rows_say_which_path_each_layer_runs():
    model, tok = tiny_llama(seed=0, layers=2, hidden=64)
    texts = ["the quick brown fox jumps over the lazy dog " * 40] * 4
    res = compress(
        model, tokenizer=tok, method="eora", ratio=0.7, data=texts, calib_tokens=512, seq_len=128,
        evaluate=False, measure_speed=False,
    )  # fmt: skip
    kernels = {row["name"]: row.get("kernel", row.get("detail", {}).get("kernel")) for row in res.report["layers"]}
    assert kernels and set(kernels.values()) == {"int4"}
    assert kernels == {n: res.model.get_submodule(n).kernel for n in kernels}
