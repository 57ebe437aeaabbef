"""Compression benchmark: methods at 80% and 60% of parameters kept, open-loop vs closed-loop
calibration, perplexity on two corpora, decode speed, and the peak memory of `rankwise compress`.

Perplexity is measured on the built-in corpus's validation split (the calibration corpus's
domain) and on the held-out license texts (``rankwise.data.heldout_texts``, never calibrated on),
each beside the dense model's. The open-loop calibration is shared by all methods and timed once
(added to every method that uses it); closed-loop runs walk the blocks themselves (their time
includes the walk). Decode speed (batch 1, KV cache, greedy) of the compressed model against the
dense one is timed interleaved, median of 3. The ratio counts ALL distinct parameters (embeddings
included, tied once). Peak memory: with ``--memory``, each method's default 80% run of the real
``rankwise compress`` command in a fresh process (its report.json's ru_maxrss, load included).
Healing: with ``--heal-steps N [M ...]`` every compressed model is also healed (``rankwise.compress.heal``:
N AdamW steps of 4 x 256 tokens of the built-in train split, at each ``--heal-lrs`` rate, one row
per step count and rate, each from a copy of the same compressed model) and measured again on both
corpora — the held-out one shows recovery, not adaptation. Healing time is reported as wall time and
as this process's CPU time (all threads): on a shared machine the CPU time per step is the steadier
measure of the work (a quiet machine's wall time is about CPU time / threads).
``--recipe short`` is the quick-iteration recipe (4,096 calibration and 2,048 evaluation tokens).

    .venv/bin/python bench/compress.py                      # SmolLM2-135M, every method, both modes
    .venv/bin/python bench/compress.py --methods svdllm modegpt --memory svdllm
    .venv/bin/python bench/compress.py --quick              # a small random Llama, < 60 s
    .venv/bin/python bench/compress.py --methods svdllm --modes open-loop --heal-steps 100 --heal-lrs 1e-4 2e-4 5e-4
    .venv/bin/python bench/compress.py --recipe short --methods svdllm --modes open-loop --ratios 0.8 \
        --no-decode --heal-steps 100 200 --heal-lrs 1e-4 2e-4 5e-4 1e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_results  # noqa: E402

from rankwise.compress.api import compress  # noqa: E402
from rankwise.compress.base import get_method, method_names  # noqa: E402
from rankwise.compress.calibrate import calibrate  # noqa: E402
from rankwise.compress.heal import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_SEQ_LEN,
    heal,
    heal_blocks,
    teacher_targets,
)
from rankwise.data import heldout_texts, load_corpus, perplexity  # noqa: E402
from rankwise.errors import ConfigError  # noqa: E402
from rankwise.models import count_parameters, load_model, tiny_llama  # noqa: E402

MODES = ("open-loop", "closed-loop")
RECIPES = {"full": (16384, 8192), "short": (4096, 2048)}  # (calibration, evaluation) tokens


def decode_time(model, tokenizer, new_tokens: int):
    ids = tokenizer("The Python standard library provides", return_tensors="pt")["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    return run


def start_memory_run(model: str, method: str, ratio: float, calib_tokens: int, folder: Path) -> subprocess.Popen:
    """Start ``rankwise compress`` in a fresh process (it runs while the benchmark goes on)."""
    cmd = [str(Path(sys.executable).parent / "rankwise"), "compress", "--model", model, "--method", method,
           "--ratio", str(ratio), "--calib-tokens", str(calib_tokens), "--out", str(folder / method), "--json"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"RANKWISE_PROGRESS": "0"})


def memory_result(process: subprocess.Popen, folder: Path) -> dict:
    """The finished run's peak RSS, total time and calibration mode (from its report.json)."""
    _, err = process.communicate()
    if process.returncode != 0:
        return {"error": err.decode(errors="replace").strip().splitlines()[-1:]}
    report = json.loads((folder / "report.json").read_text())
    return {"peak_rss_bytes": report["memory"]["peak_rss_bytes"], "total_s": report["timing"]["total_s"],
            "calibration": report["calibration"]["mode"] if report["calibration"] else None,
            "perplexity": report["perplexity"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="default: every registered method; NAME:key=value,... gives one its own options (a row each)")
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out (named in the table's title)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES, help="calibration modes to compare")
    parser.add_argument("--ratios", nargs="*", type=float, default=None, help="default: 0.8 0.6 (quick: 0.8)")
    parser.add_argument("--allocate", default="auto", help="allocation (auto: each method's own; fisher for SVD methods)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="full",
                        help="token counts: full = 16,384 calibration / 8,192 evaluation, short = 4,096 / 2,048")
    parser.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (full mode; default: the recipe's)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="evaluation tokens per corpus (full mode; default: the recipe's)")
    parser.add_argument("--no-decode", action="store_true", help="skip decode timing (a quality-only run)")
    parser.add_argument("--option", "-o", action="append", default=[], help="method option key=value for every method (a variant: own section)")
    parser.add_argument("--heal-steps", nargs="*", type=int, default=[], help="also heal every compressed model this many steps (one row per count; none: no healing columns)")
    parser.add_argument("--heal-lrs", nargs="*", type=float, default=[DEFAULT_LR], help="healing learning rates (one row each)")
    parser.add_argument("--heal-losses", nargs="*", choices=["distill", "ce"], default=["distill"],
                        help="healing losses (one row each): distill = towards the dense model's next-token distribution "
                             "(rankwise's default), ce = next-token cross-entropy on the text")
    parser.add_argument("--memory", nargs="*", default=None, help="methods (default: all benchmarked) whose `rankwise compress --ratio 0.8` runs in its own process for its peak memory")
    args = parser.parse_args()
    quick = args.quick
    args.heal_steps = [n for n in args.heal_steps if n > 0]
    recipe_calib, recipe_eval = RECIPES[args.recipe]
    args.calib_tokens = recipe_calib if args.calib_tokens is None else args.calib_tokens
    args.eval_tokens = recipe_eval if args.eval_tokens is None else args.eval_tokens
    if quick:
        model, tok = tiny_llama(seed=0, layers=2, hidden=64)
        model_name, calib_tokens, eval_tokens, seq_len, new_tokens = "tiny-llama (random, 2 layers, hidden 64)", 1024, 1024, 256, 16
    else:
        model, tok = load_model("smollm2")
        model_name, calib_tokens, eval_tokens, seq_len, new_tokens = "SmolLM2-135M", args.calib_tokens, args.eval_tokens, 512, 64
    from rankwise.cli._options import parse_options

    options = parse_options(args.option)
    registered = method_names()  # imports every method module
    methods = [m for m in (args.methods or registered) if m not in args.skip]
    corpus = load_corpus("builtin")
    corpora = {"builtin": corpus.validation, "heldout": list(heldout_texts())}
    ratios = tuple(args.ratios or ((0.8,) if quick else (0.8, 0.6)))

    heal_seq = min(seq_len, DEFAULT_SEQ_LEN)
    heal_data = (heal_blocks(tok, corpus.train, seq_len=heal_seq, batch_size=DEFAULT_BATCH_SIZE,
                             max_tokens=max(args.heal_steps) * DEFAULT_BATCH_SIZE * heal_seq) if args.heal_steps else None)  # fmt: skip

    teacher = None
    if heal_data is not None and "distill" in args.heal_losses:  # the dense model's targets, before any compression
        t0 = time.perf_counter()
        teacher = teacher_targets(model, heal_data, progress=False)
        print(f"teacher targets on {heal_data.numel():,} tokens: {time.perf_counter() - t0:.0f} s", flush=True)

    def ppl(net) -> dict[str, float]:
        return {k: perplexity(net, tok, texts, seq_len=seq_len, max_tokens=eval_tokens, batch_size=1).perplexity for k, texts in corpora.items()}

    scratch = tempfile.TemporaryDirectory()
    memory_runs = {
        name: start_memory_run("tiny-llama" if quick else "smollm2", name, 0.8, 512 if quick else 16384, Path(scratch.name))
        for name in (args.memory or methods if args.memory is not None else [])
    }  # they run alongside; their numbers are collected at the end
    dense = ppl(model)

    def variant(label: str) -> tuple[str, dict]:
        """``"name"`` or ``"name:key=value,key=value"`` (a method with its own options, beside
        the ``--option`` ones) as ``(name, options)``."""
        name, _, own = label.partition(":")
        return name, options | (parse_options(own.split(",")) if own else {})

    def statistics(label: str) -> frozenset[str]:
        """What the method (and its allocation) calibrate; none if it cannot honour --allocate
        (compress then reports that as the method's failure)."""
        try:
            name, method_options = variant(label)
            return get_method(name, **method_options).statistics(args.allocate)
        except ConfigError:
            return frozenset()

    needs = sorted({s for m in methods for s in statistics(m)})
    t0 = time.perf_counter()
    calibration = calibrate(model, tok, corpus.calibration, tokens=calib_tokens, seq_len=seq_len, statistics=needs, batch_size=1)
    calib_seconds = time.perf_counter() - t0
    print(f"dense perplexity {dense}; open-loop calibration ({', '.join(needs)}) {calib_seconds:.1f} s", flush=True)

    def publish(memory: dict | None) -> str:
        """Write the results so far to bench/results and docs/benchmarks.md; ``memory`` None: a
        partial write after one more row (a long run stopped early keeps what it measured)."""
        table = []
        for row in rows:  # the last column holds the method name where its 80% memory run belongs
            peak = (memory or {}).get(row[-1], {}).get("peak_rss_bytes") if row[-1] else None
            table.append([*row[:-1], f"{peak / 1e9:.2f}" if peak else "–"])
        recipe = {"seq_len": seq_len, "max_tokens": eval_tokens, "add_bos": False, "batch_size": 1, "split": "validation",
                  "corpus_fingerprint": corpus.fingerprint()}  # fmt: skip
        payload = {
            "model": model_name, "quick": quick, "dense_perplexity": dense["builtin"], "dense_perplexity_heldout": dense["heldout"],
            "dense_parameters": total, "ratio_counts": "all distinct model parameters, embeddings included, tied weights once",
            "allocation": args.allocate, "method_options": options, "calibration": calibration.recipe(), "perplexity_recipe": recipe,
            "results": results, "complete": memory is not None, "decode_new_tokens": new_tokens, "rankwise_compress_memory": memory or {},
            "heal": {"steps": args.heal_steps, "lrs": args.heal_lrs, "losses": args.heal_losses, "split": "train", "batch_size": DEFAULT_BATCH_SIZE, "seq_len": heal_seq,
                     "cpu_time": "time.process_time() of this process around heal() (all threads)"},
        }  # fmt: skip
        allocation_label = "each method's own (fisher for SVD methods)" if args.allocate == "auto" else args.allocate
        md = (
            f"### Compression: {model_name}, {'every registered method' if args.methods is None else 'methods ' + ', '.join(methods)}"
            f"{' except ' + ', '.join(args.skip) if args.skip else ''}, "
            f"{allocation_label} allocation, {' vs '.join(args.modes)} calibration"
            f"{', options ' + ' '.join(args.option) if args.option else ''}\n\n"
            f"Dense: {total:,} parameters; perplexity **{dense['builtin']:.2f}** on the built-in validation split and "
            f"**{dense['heldout']:.2f}** on the held-out license texts (never calibrated on), seq_len {seq_len}, first "
            f"{eval_tokens:,} tokens of each, no BOS. 'kept' counts ALL parameters (embeddings included, tied once). "
            f"Calibration: {calib_tokens:,} tokens of the built-in calibration split. Open-loop: one calibration shared by "
            f"all methods, its time ({calib_seconds:.0f} s) included in every calibrated method's time; closed-loop: each "
            "layer calibrated on the outputs of the blocks already compressed (ranks allocated on the open-loop spectra).\n\n"
            f"Decode: greedy, batch 1, KV cache, {new_tokens} new tokens, median of 3 runs interleaved with the "
            "dense model's; speed-up = dense time / compressed time. Peak RSS: `rankwise compress --method M --ratio 0.8` "
            "(default calibration; evaluation included) in its own process, run alongside "
            "this benchmark, ru_maxrss, GB (shown on that method's row for its default calibration).\n\n"
            + (f"Healing: {' / '.join(map(str, args.heal_steps))} AdamW steps of {DEFAULT_BATCH_SIZE} x {heal_seq} tokens of the built-in train "
               "split (warm-up, cosine decay), one row per step count, learning rate and loss (distill: towards the dense model's "
               "top-64 next-token probabilities on the same tokens; ce: next-token cross-entropy; matmuls in heal()'s default precision, "
               "bfloat16 where the CPU has it natively, recorded per row in bench/results), each from a copy of the same compressed model; "
               "healed perplexities on both corpora vs dense; heal s = wall time, CPU s/step = this process's CPU time (all "
               f"{torch.get_num_threads()} threads) per step.\n\n" if args.heal_steps else "")
            + markdown_table(["method", "target kept", "calibration", "kept", "perplexity", "vs dense", "held-out ppl",
                              "held-out vs dense", "compress s", "decode speed-up",
                              *(["heal steps", "heal lr", "heal loss", "healed vs dense", "held-out healed vs dense", "heal s", "CPU s/step"] if args.heal_steps else []), "peak RSS GB"], table)  # fmt: skip
            + ("" if memory is not None else "\n\n**Partial: the run was still going (or stopped) after these rows.**")
        )
        name = "compress_quick" if quick else "compress"
        if args.allocate != "auto" or (not quick and (args.calib_tokens != 16384 or args.eval_tokens != 8192)):  # variants
            name += f"_{args.allocate}_{calib_tokens}" + (f"_eval{eval_tokens}" if eval_tokens != 8192 and not quick else "")
        if args.methods is not None and not args.skip:  # a subset run gets its own section too
            name += "_" + "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", m) for m in methods)
        if args.option:
            name += "_" + "_".join(o.replace("=", "-") for o in args.option)
        if args.heal_steps:
            name += "_heal" + "_".join(map(str, args.heal_steps)) + "_" + "_".join(f"{lr:g}" for lr in args.heal_lrs)
            name += "" if args.heal_losses == ["ce"] else "_" + "_".join(args.heal_losses)  # ce: the older sections' names
        if args.ratios:  # runs split by ratio (to run in parallel) get a section each
            name += "_" + "_".join(f"{r:g}" for r in ratios)
        write_results(name, payload, md)
        return md

    rows, results = [], []
    dense_decode = decode_time(model, tok, new_tokens)
    total = count_parameters(model)
    for ratio in ratios:
        for label in methods:
            name, method_options = variant(label)
            supported = get_method(name, **method_options).supports_closed_loop()
            for mode in args.modes:
                if mode == "closed-loop" and not supported:
                    continue
                net = copy.deepcopy(model)
                stats = calibration if statistics(label) else None
                t0 = time.perf_counter()
                try:
                    res = compress(
                        net, tokenizer=tok, method=name, method_options=method_options, ratio=ratio, allocation=args.allocate, data=corpus.calibration,
                        calibration=mode, calib_tokens=calib_tokens, seq_len=seq_len, evaluate=False, measure_speed=False,
                        statistics=stats,
                    )  # fmt: skip
                except Exception as e:  # a method that cannot reach this ratio is reported, not fatal
                    print(f"{label} @ {ratio} {mode}: failed: {e}", flush=True)
                    results.append({"method": label, "ratio": ratio, "calibration": mode, "error": str(e)})
                    continue
                seconds = time.perf_counter() - t0 + (calib_seconds if stats is not None else 0.0)
                quality = ppl(res.model)
                kept = res.report["parameters"]["after"]
                if args.no_decode:
                    times = {"dense": math.nan, "compressed": math.nan}
                else:
                    times = interleaved({"dense": dense_decode, "compressed": decode_time(res.model, tok, new_tokens)}, repeats=3)
                speedup = times["dense"] / times["compressed"]
                vs = {k: quality[k] / dense[k] for k in quality}
                print(f"{label} @ {ratio} {mode}: ppl {quality} ({vs}), kept {kept / total:.3f}, {seconds:.1f} s, decode {speedup:.2f}x", flush=True)
                result = {"method": label, "ratio": ratio, "calibration": mode, "perplexity": quality["builtin"],
                          "perplexity_heldout": quality["heldout"], "vs_dense": vs["builtin"], "vs_dense_heldout": vs["heldout"],
                          "parameters_after": kept, "kept_fraction": kept / total, "compress_seconds": seconds,
                          "decode_dense_tokens_per_s": new_tokens / times["dense"], "decode_tokens_per_s": new_tokens / times["compressed"],
                          "decode_speedup": speedup, "layers": {r["name"]: r["rank"] for r in res.report["layers"]}}  # fmt: skip
                row = [label, f"{ratio:.0%}", mode, f"{kept / total:.1%}", _num(quality["builtin"]), round(vs["builtin"], 2),
                       _num(quality["heldout"]), round(vs["heldout"], 2), round(seconds, 1), "–" if args.no_decode else f"{speedup:.2f}x"]  # fmt: skip
                memory_cell = name if ratio == 0.8 and mode == ("closed-loop" if supported else "open-loop") else None
                if not args.heal_steps:
                    results.append(result)
                    rows.append([*row, memory_cell])
                    publish(None)
                runs = [(steps, lr, loss) for steps in args.heal_steps for lr in args.heal_lrs for loss in args.heal_losses]
                for steps, lr, loss in runs:
                    healed = _healed(res.model, heal_data, steps, lr, ppl, last=(steps, lr, loss) == runs[-1],
                                     teacher=teacher if loss == "distill" else None)  # fmt: skip
                    healed_vs = {k: healed["perplexity"][k] / dense[k] for k in healed["perplexity"]}
                    print(f"{label} @ {ratio} {mode} healed {steps} steps lr {lr:g} {loss}: ppl {healed['perplexity']} ({healed_vs}), "
                          f"{healed['seconds']:.0f} s wall, {healed['cpu_seconds']:.0f} s CPU", flush=True)  # fmt: skip
                    results.append(result | {"heal": {"steps": steps, "lr": lr, "loss": loss, "precision": healed["precision"], "batch_size": DEFAULT_BATCH_SIZE, "seq_len": heal_seq,
                                                      "seconds": healed["seconds"], "cpu_seconds": healed["cpu_seconds"],
                                                      "cpu_seconds_per_step": healed["cpu_seconds"] / steps,
                                                      "perplexity": healed["perplexity"]["builtin"],
                                                      "perplexity_heldout": healed["perplexity"]["heldout"], "vs_dense": healed_vs["builtin"],
                                                      "vs_dense_heldout": healed_vs["heldout"]}})  # fmt: skip
                    rows.append([*row, steps, f"{lr:g}", loss, round(healed_vs["builtin"], 2), round(healed_vs["heldout"], 2), round(healed["seconds"]),
                                 round(healed["cpu_seconds"] / steps, 2), memory_cell])  # fmt: skip
                    publish(None)
                del net, res

    memory = {name: memory_result(run, Path(scratch.name) / name) for name, run in memory_runs.items()}
    scratch.cleanup()
    print(publish(memory))


def _healed(model, blocks, steps: int, lr: float, ppl, *, last: bool, teacher=None) -> dict:
    """Heal ``model`` (a copy of it unless ``last``: the next run starts from the same compressed
    model) and measure it; ``{"seconds", "cpu_seconds", "perplexity"}`` (CPU: all threads)."""
    net = model if last else copy.deepcopy(model)
    t0, c0 = time.perf_counter(), time.process_time()
    result = heal(net, blocks, steps=steps, lr=lr, batch_size=DEFAULT_BATCH_SIZE, progress=False, teacher=teacher)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "perplexity": ppl(net), "precision": result.precision}


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


if __name__ == "__main__":
    main()
