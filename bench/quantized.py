"""Quantized layers on PyTorch's packed CPU kernels vs dequantizing vs dense float32.

Two parts, both timed interleaved (round-robin, median of repeats) on a shared machine:

1. Kernel microbench on SmolLM2's linear shapes: ``y = x Wᵀ`` for a ``(rows, in)`` input with
   the weight dense (float32 ``F.linear``), quantized and dequantized every call (what lq/eora
   did before), and quantized on the packed kernel (8-bit per-row int → ``_weight_int8pack_mm``,
   4-bit affine groups of 64 → ``_weight_int4pack_mm_for_cpu``), plus each path's output
   error against the dequantized reference.
2. SmolLM2 (``--quick``: tiny-llama) compressed with ``lq`` and ``eora`` (their defaults) at 80%
   and 60%: perplexity on the default path (prefill dequantizes) and with every input forced
   onto the kernel, and decode tokens/s interleaved with the dense model — once per
   ``CompensatedLinear.factor_kernel`` (how decoding computes the low-rank term ``B (A x)``:
   ``float32`` = the stored factors, as before; ``auto`` = the default), all
   variants of one model timed round-robin with the dense model.

Run: ``.venv/bin/python bench/quantized.py [--quick]``; writes ``bench/results/quantized*.json``
and its section of docs/benchmarks.md. Only the eora decode rows at SmolLM2 scale:
``nice -n 10 timeout 1800 .venv/bin/python bench/quantized.py --skip-micro --methods eora --ratios 0.8``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_results  # noqa: E402

from rankwise.compress.api import compress  # noqa: E402
from rankwise.data import load_corpus, perplexity  # noqa: E402
from rankwise.layers import CompensatedLinear, QuantizedLinear  # noqa: E402
from rankwise.layers.quantize import quantize  # noqa: E402
from rankwise.models import load_model, tiny_llama  # noqa: E402

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536)}
FORMATS = {"int8 (per-row)": {"bits": 8, "fmt": "int", "group_size": None}, "int4 (affine, g64)": {"bits": 4, "fmt": "affine", "group_size": 64}}


def microbench(rows_list: tuple[int, ...], repeats: int, calls: int) -> tuple[list[dict], list[list[object]]]:
    """Per shape × format × input rows: median time of dense, dequantize and kernel paths."""
    gen = torch.Generator().manual_seed(0)
    results, table = [], []
    for shape_name, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f, generator=gen) * 0.02
        for fmt_name, opts in FORMATS.items():
            q = quantize(weight, bits=opts["bits"], fmt=opts["fmt"], group_size=opts["group_size"] or in_f)
            layer = QuantizedLinear.from_quantized(q)
            ref_weight = layer.dequantize()
            for rows in rows_list:
                x = torch.randn(rows, in_f, generator=gen)

                def dense(x=x, weight=weight):
                    for _ in range(calls):
                        F.linear(x, weight)

                def dequant(x=x, layer=layer):
                    for _ in range(calls):
                        F.linear(x, layer.dequantize())

                def kernel(x=x, layer=layer):
                    for _ in range(calls):
                        layer._kernel_forward(x)

                with torch.no_grad():
                    times = interleaved({"dense": dense, "dequantize": dequant, "kernel": kernel}, repeats=repeats)
                    reference = F.linear(x, ref_weight)
                    err = float((layer._kernel_forward(x) - reference).norm() / reference.norm())
                    q_err = float((reference - F.linear(x, weight)).norm() / F.linear(x, weight).norm())
                per_call = {k: v / calls for k, v in times.items()}
                results.append({"shape": [out_f, in_f], "format": fmt_name, "rows": rows, "kernel": layer.kernel,
                                "seconds": per_call, "kernel_error_vs_dequantized": err, "quantization_error": q_err})  # fmt: skip
                table.append([f"{shape_name} {out_f}×{in_f}", fmt_name, rows, layer.kernel, f"{per_call['dense'] * 1e6:.0f}",
                              f"{per_call['dense'] / per_call['dequantize']:.2f}x", f"{per_call['dense'] / per_call['kernel']:.2f}x",
                              f"{err:.1e}", f"{q_err:.1e}"])  # fmt: skip
                print(table[-1], flush=True)
    return results, table


def decode_fn(model, tokenizer, new_tokens: int):
    ids = tokenizer("The Python standard library provides", return_tensors="pt")["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    return run


@contextlib.contextmanager
def factor_kernel(kind: str):
    """Every ``CompensatedLinear`` computes its decoding-sized low-rank term on ``kind``."""
    default, CompensatedLinear.factor_kernel = CompensatedLinear.factor_kernel, kind
    try:
        yield
    finally:
        CompensatedLinear.factor_kernel = default


@contextlib.contextmanager
def all_on_kernel():
    """Every input, prefill included, on the decoding path (what decoding computes)."""
    default, QuantizedLinear.KERNEL_MAX_ROWS = QuantizedLinear.KERNEL_MAX_ROWS, 1 << 30
    try:
        yield
    finally:
        QuantizedLinear.KERNEL_MAX_ROWS = default


def with_factor_kernel(kind: str, fn):
    def run():
        with factor_kernel(kind):
            fn()

    return run


def models_bench(quick: bool, ratios: tuple[float, ...], methods: tuple[str, ...], factor_kernels: tuple[str, ...],
                 repeats: int) -> tuple[dict, list[dict], list[list[object]]]:  # fmt: skip
    """lq / eora on SmolLM2 (tiny-llama when quick): perplexity both paths, decode vs dense."""
    if quick:
        model, tok = tiny_llama(seed=0, layers=2, hidden=64)
        setup = {"model": "tiny-llama (random, 2 layers, hidden 64)", "calib_tokens": 1024, "eval_tokens": 1024, "seq_len": 256, "new_tokens": 16}
    else:
        model, tok = load_model("smollm2")
        setup = {"model": "SmolLM2-135M", "calib_tokens": 16384, "eval_tokens": 8192, "seq_len": 512, "new_tokens": 64}
    texts = load_corpus("builtin").validation

    def ppl(net) -> float:
        return perplexity(net, tok, texts, seq_len=setup["seq_len"], max_tokens=setup["eval_tokens"], batch_size=1).perplexity

    dense_ppl = ppl(model)
    dense_decode = decode_fn(model, tok, setup["new_tokens"])
    results, table = [], []
    for ratio in ratios:
        for method in methods:
            net = copy.deepcopy(model)
            t0 = time.perf_counter()
            res = compress(net, tokenizer=tok, method=method, ratio=ratio, calib_tokens=setup["calib_tokens"],
                           seq_len=setup["seq_len"], calibration="open-loop", evaluate=False, measure_speed=False)  # fmt: skip
            seconds = time.perf_counter() - t0
            kernels = collections.Counter(m.kernel for m in res.model.modules() if isinstance(m, QuantizedLinear))
            default_ppl = ppl(res.model)
            kernel_ppl = {}
            for kind in factor_kernels:
                with factor_kernel(kind), all_on_kernel():
                    kernel_ppl[kind] = ppl(res.model)
            compressed = decode_fn(res.model, tok, setup["new_tokens"])
            variants = {f"compressed[{kind}]": with_factor_kernel(kind, compressed) for kind in factor_kernels}
            times = interleaved({"dense": dense_decode, **variants}, repeats=repeats)
            for kind in factor_kernels:
                seconds_kind = times[f"compressed[{kind}]"]
                speed = times["dense"] / seconds_kind
                row = {"method": method, "ratio": ratio, "factor_kernel": kind, "perplexity": default_ppl,
                       "perplexity_kernel_path": kernel_ppl[kind], "dense_perplexity": dense_ppl, "kernels": dict(kernels),
                       "compress_seconds": seconds, "decode_dense_tokens_per_s": setup["new_tokens"] / times["dense"],
                       "decode_tokens_per_s": setup["new_tokens"] / seconds_kind, "decode_vs_dense": speed,
                       "kept_fraction": res.report["parameters"]["kept_fraction"]}  # fmt: skip
                results.append(row)
                table.append([method, f"{ratio:.0%}", f"{row['kept_fraction']:.1%}", ", ".join(f"{k} ×{v}" for k, v in sorted(kernels.items())),
                              kind, f"{default_ppl:.2f}", f"{kernel_ppl[kind]:.2f}", f"{default_ppl / dense_ppl:.3f}",
                              f"{row['decode_dense_tokens_per_s']:.1f}", f"{row['decode_tokens_per_s']:.1f}", f"{speed:.2f}x"])  # fmt: skip
                print(table[-1], flush=True)
            del net, res
    return setup | {"dense_perplexity": dense_ppl}, results, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, few repeats (under a minute)")
    parser.add_argument("--ratios", nargs="*", type=float, default=None, help="default: 0.8 0.6 (quick: 0.8)")
    parser.add_argument("--methods", nargs="*", default=["lq", "eora"])
    parser.add_argument("--skip-models", action="store_true", help="kernel microbench only")
    parser.add_argument("--skip-micro", action="store_true", help="compressed models only")
    parser.add_argument("--factor-kernels", nargs="*", default=["float32", "auto"], choices=CompensatedLinear.FACTOR_KERNELS,
                        help="decoding paths of the low-rank term to time (float32 = before, auto = default)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved decode repeats (median)")
    args = parser.parse_args()
    rows = (1, 8, 32, 512) if not args.quick else (1, 512)
    micro, micro_table = ([], []) if args.skip_micro else microbench(rows, repeats=3 if args.quick else 7, calls=5 if args.quick else 20)
    setup, results, model_table = ({}, [], []) if args.skip_models else models_bench(
        args.quick, tuple(args.ratios or ((0.8,) if args.quick else (0.8, 0.6))), tuple(args.methods),
        tuple(args.factor_kernels), args.repeats,
    )
    md = "### Quantized layers: packed CPU kernels vs dequantizing (`bench/quantized.py`)\n\n"
    if micro:
        md += (
        "Kernel microbench: `y = x Wᵀ` on SmolLM2's linear shapes (random weights), `rows` input rows; time per call "
        "as a speed ratio vs dense float32 `F.linear` (higher is faster), median of interleaved repeats. "
        "`dequantize` = unpack the codes and matmul in float32 every call (lq/eora before); `kernel` = "
        "`torch.ops.aten._weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` with bfloat16 activations. Layers use the "
        f"kernel for inputs of at most {QuantizedLinear.KERNEL_MAX_ROWS} rows (decoding) and dequantize above that (prefill). "
        "Errors: relative Frobenius error of the kernel output vs the dequantized-weight reference (bfloat16 rounding), "
        "and of the quantized weight's output vs the dense one.\n\n"
        + markdown_table(["shape", "format", "rows", "kernel", "dense µs", "dequantize vs dense", "kernel vs dense",
                          "kernel error", "quantization error"], micro_table)  # fmt: skip
        )
    if results:
        md += (
            f"\n\n{setup['model']} compressed with each method's defaults (`fmt=\"auto\"`: 8-bit per-row int and "
            f"4-bit affine groups of 64), dense perplexity **{setup['dense_perplexity']:.2f}** (built-in validation split, "
            f"seq_len {setup['seq_len']}, first {setup['eval_tokens']:,} tokens). `ppl` = default path (prefill "
            "dequantizes, float32), `ppl kernel path` = every input forced onto the kernel (bfloat16 activations, "
            f"what decoding computes). `factor kernel`: how decoding computes the low-rank term `B (A x)` of lq/eora layers "
            "(`float32` = the stored factors, as before; `auto` = the default: `merged-int8` (deq(Q) + B A as one per-row int8 "
            "weight on `_weight_int8pack_mm`) where that reads fewer bytes than the codes plus float32 factors, else `float32`; "
            "`int8`/`bfloat16` = the factors' copies beside the base's kernel). Decode: greedy, batch 1, KV cache, {setup['new_tokens']} new tokens, median of "
            f"{args.repeats} runs, every factor kernel interleaved with the dense model's.\n\n"
            + markdown_table(["method", "target kept", "kept", "layer kernels", "factor kernel", "ppl", "ppl kernel path", "ppl vs dense",
                              "dense tok/s", "tok/s", "decode vs dense"], model_table)  # fmt: skip
        )
    name = "quantized_quick" if args.quick else "quantized"
    if args.methods != ["lq", "eora"] or args.skip_micro:  # a partial run gets its own section
        name += "_" + "_".join(args.methods) + ("_models" if args.skip_micro else "")
    write_results(name, {"quick": args.quick, "microbench": micro, "models": results, **setup}, md)
    print(md)


if __name__ == "__main__":
    main()
