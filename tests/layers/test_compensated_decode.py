"""CompensatedLinear's decoding paths — ``deq(Q) + B A`` merged into one per-row int8 weight
(default), or ``Q x`` on the packed kernel plus ``B (A x)`` on int8/bfloat16 copies of the
float32 factors — equal the float32 reference within int8/bfloat16 rounding (relative output
error < 1e-2; measured 3e-3 to 7e-3 here), prefill and training keep the exact float32 path,
and nothing new is saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankwise.compress.checkpoint import load_compressed, save_compressed
from rankwise.errors import ConfigError
from rankwise.layers import CompensatedLinear, QuantizedLinear, QuantizedLowRankLinear, module_spec
from rankwise.layers.quantize import kernel_for, quantize
from rankwise.models import tiny_llama
from rankwise.modules import replace_module

TOL = 1e-2  # relative Frobenius error of the bfloat16/int8 decoding path vs float32


def _layer(out_f=96, in_f=64, rank=10, *, bits=4, bias=True, seed=0) -> CompensatedLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.05
    fmt, group = ("int", in_f) if bits == 8 else ("affine", 32)
    q = QuantizedLinear.from_quantized(
        quantize(weight, bits=bits, fmt=fmt, group_size=group),
        torch.randn(out_f, generator=gen) * 0.1 if bias else None,
    )
    up, down = torch.randn(out_f, rank, generator=gen) * 0.05, torch.randn(rank, in_f, generator=gen) * 0.05
    return QuantizedLowRankLinear.from_factors(q, up, down)


def _reference(layer: CompensatedLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dense_weight(), layer.bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("factor_kernel", ["merged-int8", "int8", "bfloat16"])
def test_decode_path_matches_float32_reference(bits, factor_kernel, monkeypatch):
    layer = _layer(bits=bits)
    monkeypatch.setattr(layer, "factor_kernel", factor_kernel)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        y = layer(x)
    assert layer._factors is not None and layer._factors[1] == factor_kernel  # the fast path ran
    assert y.dtype == torch.float32 and y.shape == (1, 3, 96)
    assert _rel(y, _reference(layer, x)) < TOL


def test_prefill_and_training_keep_the_float32_path():
    layer = _layer()
    x = torch.randn(QuantizedLinear.KERNEL_MAX_ROWS + 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)
    assert layer._factors is None
    y = layer(x[:2])  # grad enabled, factors trainable: autograd path, gradients reach A and B
    y.sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None and layer._factors is None


def test_float32_factor_kernel_is_the_plain_sum(monkeypatch):
    layer = _layer()
    monkeypatch.setattr(layer, "factor_kernel", "float32")
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.A.T @ layer.B.T)
    assert layer._factors is None


def test_widths_the_int8_kernel_cannot_take_fall_back_to_bfloat16():
    layer = _layer(out_f=40, in_f=40, rank=7, bits=8)  # in 40: no int8 kernel, no int8 factors
    assert layer.kernel == "dequantize"
    x = torch.randn(1, 40)
    with torch.no_grad():
        assert _rel(layer(x), _reference(layer, x)) < 1e-5  # no kernel: float32 throughout
    layer = _layer(out_f=96, in_f=64, rank=5)  # rank 5: padded to 16 for the second matmul
    layer.factor_kernel = "int8"
    with torch.no_grad():
        assert _rel(layer(x := torch.randn(1, 64)), _reference(layer, x)) < TOL
    assert layer._factors[2][0].shape == (16, 64)


def test_int8_kernel_refuses_widths_that_are_not_a_multiple_of_16():
    # _weight_int8pack_mm returns garbage (or segfaults) for such widths
    assert kernel_for((64, 200), bits=8, fmt="int", group_size=200) is None
    assert kernel_for((64, 208), bits=8, fmt="int", group_size=208) == "int8"


def test_changed_factors_or_codes_rebuild_the_operands():
    layer = _layer()
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        layer.B.mul_(2)
        assert _rel(layer(x), _reference(layer, x)) < TOL
        layer.base.scales.mul_(0.5)  # the merged weight depends on the base's codes too
        assert _rel(layer(x), _reference(layer, x)) < TOL


def test_auto_merges_only_where_it_reads_fewer_bytes():
    assert CompensatedLinear.factor_kernel == "auto"
    x = torch.randn(1, 64)
    small = _layer(out_f=96, in_f=64, rank=2)  # int4 base + 2·160 float32: fewer bytes than int8
    big = _layer(out_f=96, in_f=64, rank=10)  # 10·160·4 bytes of factors: the merged int8 is smaller
    with torch.no_grad():
        torch.testing.assert_close(small(x), small.base(x) + x @ small.A.T @ small.B.T)
        assert _rel(big(x), _reference(big, x)) < TOL
    assert small._factors is None and big._factors[1] == "merged-int8"


def test_no_base_kernel_keeps_the_float32_path():
    layer = _layer(out_f=40, in_f=64, rank=6, bits=4)  # out 40: no int4 kernel for the base
    assert layer.kernel == "dequantize"
    x = torch.randn(1, 64)
    with torch.no_grad():  # float32 throughout, as before (old folders keep their logits)
        torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.A.T @ layer.B.T)
    assert layer._factors is None


def test_unknown_factor_kernel_names_the_choices(monkeypatch):
    layer = _layer()
    monkeypatch.setattr(layer, "factor_kernel", "fp8")
    with pytest.raises(ConfigError, match="auto, merged-int8, int8, bfloat16, float32"), torch.no_grad():
        layer(torch.randn(1, 64))


def test_save_load_round_trip_keeps_spec_and_decodes_on_kernels(tmp_path):
    model, tok = tiny_llama(seed=0, layers=1, hidden=64)
    name = "model.layers.0.mlp.up_proj"
    linear = model.get_submodule(name)
    q = QuantizedLinear.from_quantized(quantize(linear.weight.detach(), bits=4, fmt="affine", group_size=32))
    gen = torch.Generator().manual_seed(1)
    up, down = torch.randn(128, 12, generator=gen) * 0.02, torch.randn(12, 64, generator=gen) * 0.02
    replace_module(model, name, CompensatedLinear.from_factors(q, up, down))
    spec = module_spec(model.get_submodule(name))
    assert spec == {"type": "CompensatedLinear", "rank": 12, "base": module_spec(q)}  # nothing new stored
    folder = save_compressed(model, tok, tmp_path / "out", method="handmade")
    loaded, _ = load_compressed(folder)
    ids = torch.tensor([[5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    layer = loaded.get_submodule(name)
    assert layer._factors is not None and layer._factors[1] == "merged-int8"  # decoding: default path
    torch.testing.assert_close(layer.A, down)


def test_a_folder_written_before_decodes_close_to_its_float32_logits():
    """tests/layers/data/compressed-v2: with gradients on (float32 path) the logits are
    identical (tests/layers/test_layers_spec.py); decoding without gradients now runs the
    merged int8 path for its compensated layers and stays within int8/bfloat16 rounding."""
    from pathlib import Path

    from safetensors.torch import load_file

    data = Path(__file__).parent / "data"
    model, _ = load_compressed(data / "compressed-v2")
    ref = load_file(str(data / "compressed-v2-logits.safetensors"))
    ids = ref["input_ids"][:, :8]  # decoding-sized
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert _rel(logits, ref["logits"][:, :8]) < 2e-2



def test_a_missing_int8_kernel_falls_back_to_float32_with_one_warning(monkeypatch):
    import rankwise.layers.quantize as quantize_module

    layer = _layer(rank=10)
    x = torch.randn(1, 64)
    monkeypatch.setattr(quantize_module, "_warned", set())

    def missing(*args):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", missing)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="int8 matmul is unavailable.*float32 instead"):
        y = layer(x)
    assert layer._factors[1] == "float32"
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(y, layer.base(x) + x @ layer.A.T @ layer.B.T)
