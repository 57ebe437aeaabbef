"""Compression benchmark: every registered method at 80% and 60% of parameters kept.

Reports validation perplexity beside the dense model's, compression wall time (the
calibration is shared by all methods and timed once), parameters kept/removed and greedy
decode speed (batch 1, KV cache) of the compressed model against the dense one, timed
interleaved. The ratio counts ALL distinct parameters (embeddings included, tied once).

    .venv/bin/python bench/compress.py            # SmolLM2-135M, full
    .venv/bin/python bench/compress.py --quick    # a small random Llama, < 60 s
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_results  # noqa: E402

from rankwise.compress.api import compress  # noqa: E402
from rankwise.compress.base import get_method, method_names  # noqa: E402
from rankwise.compress.calibrate import calibrate  # noqa: E402
from rankwise.data import load_corpus, perplexity  # noqa: E402
from rankwise.errors import ConfigError  # noqa: E402
from rankwise.models import count_parameters, load_model, tiny_llama  # noqa: E402


def decode_time(model, tokenizer, new_tokens: int):
    ids = tokenizer("The Python standard library provides", return_tensors="pt")["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out (named in the table's title)")
    parser.add_argument("--allocate", default="auto", help="allocation (auto: each method's own; fisher for SVD methods)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (full mode)")
    args = parser.parse_args()
    quick = args.quick
    if quick:
        model, tok = tiny_llama(seed=0, layers=2, hidden=64)
        model_name, calib_tokens, eval_tokens, seq_len, new_tokens = "tiny-llama (random, 2 layers, hidden 64)", 1024, 1024, 256, 16
    else:
        model, tok = load_model("smollm2")
        model_name, calib_tokens, eval_tokens, seq_len, new_tokens = "SmolLM2-135M", args.calib_tokens, 8192, 512, 64
    registered = method_names()  # imports every method module
    methods = [m for m in (args.methods or registered) if m not in args.skip]
    corpus = load_corpus("builtin")
    ratios = (0.8,) if quick else (0.8, 0.6)

    dense = perplexity(model, tok, corpus.validation, seq_len=seq_len, max_tokens=eval_tokens)
    t0 = time.perf_counter()

    def statistics(name: str) -> frozenset[str]:
        """What the method (and its allocation) calibrate; none if it cannot honour --allocate
        (compress then reports that as the method's failure)."""
        try:
            return get_method(name).statistics(args.allocate)
        except ConfigError:
            return frozenset()

    def calibrated(name: str) -> bool:
        return bool(statistics(name))

    needs = sorted({s for m in methods for s in statistics(m)})

    calibration = calibrate(model, tok, corpus.calibration, tokens=calib_tokens, seq_len=seq_len, statistics=needs)
    calib_seconds = time.perf_counter() - t0
    print(f"dense perplexity {dense.perplexity:.2f}; calibration ({', '.join(needs)}) {calib_seconds:.1f} s", flush=True)

    rows, results = [], []
    dense_decode = decode_time(model, tok, new_tokens)
    total = count_parameters(model)
    for ratio in ratios:
        for name in methods:
            net = copy.deepcopy(model)
            stats = calibration if calibrated(name) else None
            t0 = time.perf_counter()
            try:
                res = compress(
                    net, tokenizer=tok, method=name, ratio=ratio, allocation=args.allocate, data=corpus.calibration,
                    calib_tokens=calib_tokens, seq_len=seq_len, evaluate=False, measure_speed=False,
                    calibration=stats,
                )
            except Exception as e:  # a method that cannot reach this ratio is reported, not fatal
                print(f"{name} @ {ratio}: failed: {e}", flush=True)
                results.append({"method": name, "ratio": ratio, "error": str(e)})
                continue
            seconds = time.perf_counter() - t0 + (calib_seconds if calibrated(name) else 0.0)
            ppl = perplexity(res.model, tok, corpus.validation, seq_len=seq_len, max_tokens=eval_tokens).perplexity
            kept = res.report["parameters"]["after"]
            times = interleaved({"dense": dense_decode, "compressed": decode_time(res.model, tok, new_tokens)}, repeats=3)
            speedup = times["dense"] / times["compressed"]
            print(f"{name} @ {ratio}: ppl {ppl:.2f} ({ppl / dense.perplexity:.2f}x dense), kept {kept / total:.3f}, {seconds:.1f} s, decode {speedup:.2f}x", flush=True)
            results.append(
                {"method": name, "ratio": ratio, "perplexity": ppl, "parameters_after": kept, "kept_fraction": kept / total,
                 "compress_seconds": seconds, "decode_dense_tokens_per_s": new_tokens / times["dense"],
                 "decode_tokens_per_s": new_tokens / times["compressed"], "decode_speedup": speedup,
                 "layers": {r["name"]: r["rank"] for r in res.report["layers"]}}
            )
            rows.append([name, f"{ratio:.0%}", f"{kept / total:.1%}", ppl if math.isfinite(ppl) else "inf",
                         ppl / dense.perplexity, round(seconds, 1), round(new_tokens / times["compressed"], 1),
                         f"{speedup:.2f}x"])
            del net, res

    recipe = dense.recipe() | {"max_tokens": eval_tokens, "split": "validation", "corpus_fingerprint": corpus.fingerprint()}
    payload = {
        "model": model_name, "quick": quick, "dense_perplexity": dense.perplexity, "dense_parameters": total,
        "ratio_counts": "all distinct model parameters, embeddings included, tied weights once",
        "allocation": args.allocate, "calibration": calibration.recipe(), "perplexity_recipe": recipe,
        "results": results, "decode_new_tokens": new_tokens,
    }
    allocation_label = "each method's own (fisher for SVD methods)" if args.allocate == "auto" else args.allocate
    md = (
        f"### Compression: {model_name}, {'every registered method' if args.methods is None else 'methods ' + ', '.join(methods)}"
        f"{' except ' + ', '.join(args.skip) if args.skip else ''}, "
        f"{allocation_label} allocation\n\n"
        f"Dense: {total:,} parameters, validation perplexity **{dense.perplexity:.2f}** "
        f"(seq_len {seq_len}, first {eval_tokens:,} validation tokens of the builtin corpus, no BOS). "
        f"'kept' counts ALL parameters (embeddings included, tied once). Calibration: {calib_tokens:,} tokens "
        f"of the calibration split, shared by all methods; its time ({calib_seconds:.0f} s) is included in every "
        "calibrated method's time.\n\n"
        + f"Decode: greedy, batch 1, KV cache, {new_tokens} new tokens, median of 3 runs interleaved with the "
        "dense model's; speed-up = dense time / compressed time. `lq` and `eora` (default base) store "
        "k-bit codes and dequantize in every forward, so they are small but slow on CPU.\n\n"
        + markdown_table(["method", "target kept", "kept", "perplexity", "vs dense", "compress s", "decode tok/s", "decode speed-up"], rows)
    )
    name = "compress_quick" if quick else "compress"
    if args.allocate != "auto" or (not quick and args.calib_tokens != 16384):  # variants get their own section
        name += f"_{args.allocate}_{calib_tokens}"
    if args.methods is not None and not args.skip:  # a subset run gets its own section too
        name += "_" + "_".join(methods)
    write_results(name, payload, md)
    print(md)


if __name__ == "__main__":
    main()
