"""Serving many adapters on SmolLM2: rankwise.serve's engine against PEFT, same machine, one run.

Adapters: LoRA on q_proj/v_proj with ranks 8, 16, 32, 64 mixed (in turn), random non-zero
factors, written in PEFT's format (so PEFT loads the very same files). Each scenario offers
all its requests at once (greedy, a fixed number of new tokens, prompts from a small fixed
set) and measures generated tokens/s and per-request latency (submit to last token):

- rankwise: one ``Engine`` (continuous batching, max 64 rows, the batch's rows using their
  own adapters through ``route``);
- PEFT mixed: ``generate(adapter_names=...)`` on batches of 64 requests;
- PEFT per adapter: each adapter's requests batched alone (``set_adapter`` + ``generate``).

Scenarios: the base model alone; 1, 8, 64 distinct adapters; 256 distinct adapters (256
requests; PEFT not run: loading 256 adapters into it takes minutes) against 1 adapter at the
same 256 requests; cold start (the first request, one new token, to a rank-16 adapter not yet
resident) against the same request once it is resident. Scenarios run round-robin, repeated,
and every ratio is the median of the per-round ratios (the machine is shared). Accuracy:
the share of requests whose tokens are identical between rankwise and PEFT mixed.

    .venv/bin/python bench/serve.py [--quick] [--tokens 16] [--rounds 2] [--dtype bfloat16]
        [--scenarios base 1 64 cold]   # a subset: printed only, docs untouched
    .venv/bin/python bench/serve.py --cold-only [--rounds 5]   # cold start alone, no PEFT
    .venv/bin/python bench/serve.py --profile   # where the time goes (64 adapters): prefill/decode by part

``--cold-only`` (the same as ``--scenarios cold``) loads no PEFT model; with the same
resident adapters as the full run (256), it first sends each of them one request, so the
slot pools are as full as after the full run's scenarios, then measures the cold start
``--rounds`` times (3 adapters per round).

``--dtype`` puts the base model of both rankwise and PEFT in that dtype (adapters stay
float32 in both), so the comparison stays like for like.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402

RANKS = (8, 16, 32, 64)
TARGETS = {"q_proj": "self_attn", "v_proj": "self_attn"}
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is the capital of France and why is it famous?",
    "Describe a cat in one sentence.",
    "How do airplanes fly?",
]


# ----------------------------------------------------------------------------- setup


def write_adapter(folder: Path, model, rank: int, seed: int) -> None:
    """A PEFT-format LoRA folder for ``model`` (q_proj, v_proj on every layer)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        for proj, parent in TARGETS.items():
            linear = getattr(getattr(layer, parent), proj)
            key = f"base_model.model.model.layers.{i}.{parent}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) / linear.in_features**0.5
            tensors[f"{key}.lora_B.weight"] = 0.05 * torch.randn(linear.out_features, rank, generator=g)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(TARGETS)}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def requests_for(names: list[str], count: int) -> list[tuple[str, str]]:
    return [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(count)]


# ----------------------------------------------------------------------------- runs


def run_engine(engine, work, tokens: int):
    from rankwise.serve import GenerationRequest

    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(model=m, prompt=p, max_tokens=tokens)) for m, p in work]
    outs, lat = [], []
    for h in handles:
        ids = [t for e in h.events() for t in e.token_ids]
        lat.append(time.perf_counter() - t0)
        outs.append(ids)
    wall = time.perf_counter() - t0
    return sum(map(len, outs)) / wall, lat, outs


def _peft_generate(peft, tok, work, tokens: int, **kw) -> list[list[int]]:
    enc = tok([p for _, p in work], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = peft.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t == tok.eos_token_id:
                break
        rows.append(ids)
    return rows


def run_peft_mixed(peft, tok, work, tokens: int, batch: int = 64):
    t0 = time.perf_counter()
    outs, lat = [], []
    for s in range(0, len(work), batch):
        chunk = work[s : s + batch]
        names = [m if m != "base" else "__base__" for m, _ in chunk]
        outs += _peft_generate(peft, tok, chunk, tokens, adapter_names=names)
        lat += [time.perf_counter() - t0] * len(chunk)
    return sum(map(len, outs)) / (time.perf_counter() - t0), lat, outs


def run_peft_per_adapter(peft, tok, work, tokens: int):
    t0 = time.perf_counter()
    groups: dict[str, list[int]] = {}
    for i, (m, _) in enumerate(work):
        groups.setdefault(m, []).append(i)
    outs: list = [None] * len(work)
    lat = [0.0] * len(work)
    for name, idx in groups.items():
        peft.set_adapter(name)
        for i, ids in zip(idx, _peft_generate(peft, tok, [work[i] for i in idx], tokens), strict=True):
            outs[i] = ids
            lat[i] = time.perf_counter() - t0
    return sum(map(len, outs)) / (time.perf_counter() - t0), lat, outs


def warm_slots(engine, names: list[str]) -> None:
    """One single-token request to each adapter: their factors enter the slot pools."""
    from rankwise.serve import GenerationRequest

    handles = [engine.submit(GenerationRequest(model=n, prompt=PROMPTS[0], max_tokens=1)) for n in names]
    for h in handles:
        h.result()


def cold_start(engine, names: list[str], rounds: int = 1) -> tuple[float, float, float]:
    """Median seconds to the first token for a request to a non-resident rank-16 adapter,
    the same once resident, and the load alone (``rounds`` times over ``names``)."""
    from rankwise.serve import GenerationRequest

    cold, warm, load = [], [], []
    for name in names * rounds:
        if name in engine.pool.resident:
            engine.unload_adapter(name)
        request = GenerationRequest(model=name, prompt=PROMPTS[0], max_tokens=1)
        t0 = time.perf_counter()
        engine.submit(request).result()
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.submit(request).result()
        warm.append(time.perf_counter() - t0)
        engine.unload_adapter(name)
        t0 = time.perf_counter()
        engine.load_adapter(name)
        load.append(time.perf_counter() - t0)
    return statistics.median(cold), statistics.median(warm), statistics.median(load)


# where a step's time goes: (label, (file suffix, function) pairs whose cumulative time counts)
PROFILE_PARTS = {
    "base linear layers + LM head": (("~", "_nn.linear"),),
    "adapters (routed LoRA bmm)": (("inject.py", "_routed"),),
    "attention (SDPA)": (("sdpa_attention.py", "sdpa_attention_forward"),),
    "KV cache write": (("cache.py", "update"),),
    "KV cache select/merge/trim": (("cache.py", "select"), ("cache.py", "merge"), ("cache.py", "trim")),
    "rotary embedding": (("modeling_llama.py", "apply_rotary_pos_emb"),),
    "RMSNorm": (("modeling_llama.py", "LlamaRMSNorm.forward"),),
    "attention mask": (("masking_utils.py", "create_causal_mask"),),
    "sampling": (("sampling.py", "next_tokens"),),
    "detokenizing / stop strings": (("sampling.py", "add"),),
}


def profile_split(stats, total: float, rmsnorm_line: int) -> dict[str, float]:
    """Seconds per :data:`PROFILE_PARTS` entry from ``pstats`` data, plus the rest
    (``rmsnorm_line``: where ``LlamaRMSNorm.forward`` starts, pstats knowing no classes)."""
    out = {}
    for label, keys in PROFILE_PARTS.items():
        seconds = 0.0
        for (file, line, func), (_, _, own, cumulative, _) in stats.items():
            for suffix, name in keys:
                if suffix == "~" and file == "~" and name in func:
                    seconds += own
                elif name == "LlamaRMSNorm.forward" and file.endswith(suffix) and func == "forward" and line == rmsnorm_line:
                    seconds += cumulative
                elif file.endswith(suffix) and func == name:
                    seconds += cumulative
        out[label] = seconds
    out["other (MLP activations, residuals, Python)"] = total - sum(out.values())
    return out


def _rmsnorm_line() -> int:
    import inspect

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return inspect.getsourcelines(LlamaRMSNorm.forward)[1]


def profile_steps(engine, work, tokens: int) -> None:
    """Print where the time of one bench-like workload goes (``work`` offered at once, driven
    step by step in this thread; the engine's loop is not started): the prefill step and the
    decode steps, each split into :data:`PROFILE_PARTS` (cProfile, shares of the profiled
    time), and the process CPU seconds of each phase."""
    import cProfile
    import pstats

    from rankwise.serve import GenerationRequest

    rmsnorm_line = _rmsnorm_line()
    def submit():
        return [engine.submit(GenerationRequest(model=m, prompt=p, max_tokens=tokens)) for m, p in work]

    def drain():
        steps = 0
        while engine._waiting or engine._running:
            engine._step()
            steps += 1
        return steps

    submit()
    drain()  # warm: slots filled, kernels initialised
    handles = submit()
    phases = {}
    for label, run in (("prefill (admission + prefill forwards)", engine._step), ("decode (all later steps)", drain)):
        prof = cProfile.Profile()
        cpu = time.process_time()
        prof.enable()
        steps = run()
        prof.disable()
        cpu = time.process_time() - cpu
        stats = pstats.Stats(prof).stats
        total = sum(v[2] for v in stats.values())
        phases[label] = (cpu, steps, profile_split(stats, total, rmsnorm_line), total)
    generated = sum(h.result().completion_tokens for h in handles)
    print(f"{len(work)} requests, {generated} tokens generated, {torch.get_num_threads()} thread(s)")
    for label, (cpu, steps, split, total) in phases.items():
        extra = f", {steps} steps" if isinstance(steps, int) else ""
        print(f"\n## {label}: {cpu:.3f} s CPU{extra}")
        for part, seconds in split.items():
            print(f"  {part:44s} {100 * seconds / total:5.1f}%")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 requests x 8 tokens, up to 16 adapters, 1 round")
    parser.add_argument("--tokens", type=int, help="new tokens per request (default 16; --quick 8)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 2; --quick 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the base model, for rankwise and PEFT alike (default float32)")
    parser.add_argument("--scenarios", nargs="+", metavar="NAME",
                        help="run only these of: base, 1, 8, 64, 256, cold (then the docs are not written)")
    parser.add_argument("--cold-only", action="store_true",
                        help="only the cold start (as --scenarios cold): no PEFT, printed only")
    parser.add_argument("--profile", action="store_true",
                        help="where the time goes at 64 requests on 64 adapters (prefill / decode, by part), then stop")
    args = parser.parse_args()
    if args.cold_only:
        args.scenarios = ["cold"]
    dtype = getattr(torch, args.dtype)
    quick = args.quick
    n_requests, tokens, repeats = (16, 8, 1) if quick else (64, 16, 2)
    tokens = args.tokens or tokens
    repeats = args.rounds or repeats
    counts = (1, 8, 16) if quick else (1, 8, 64, 256)
    peft_adapters = max(c for c in counts if c <= 64)

    import peft as peft_lib

    import rankwise
    from rankwise.serve import Engine
    from rankwise.serve.engine import contiguous_input_hook

    torch.manual_seed(0)
    model, tok = rankwise.load_model("smollm2", dtype=dtype)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # 1.7 GB of adapters: never left behind
    names = [f"a{i:03d}" for i in range(max(counts))]
    cold_names = [f"cold{i}" for i in range(3)]
    for i, name in enumerate(names):
        write_adapter(tmp / name, model, RANKS[i % len(RANKS)], seed=i)
    for i, name in enumerate(cold_names):
        write_adapter(tmp / name, model, 16, seed=10_000 + i)
    single = names[1]  # rank 16

    engine = Engine((model, tok), tmp, max_batch_size=64, base_name="base", max_queue=1024)
    t0 = time.perf_counter()
    for name in names:
        engine.load_adapter(name)
    engine_load = (time.perf_counter() - t0) / len(names)
    if args.profile:
        profile_steps(engine, requests_for(names[:64], 64), tokens)
        return
    engine.start()

    scenarios = {"base": requests_for(["base"], n_requests)}
    for c in counts:
        scenarios[str(c)] = requests_for(names[:c] if c > 1 else [single], max(n_requests, c))
    big = max(counts)
    if big > n_requests:
        scenarios[f"1@{big}"] = requests_for([single], big)
    chosen = set(args.scenarios or [*scenarios, "cold"])
    unknown = chosen - {*scenarios, "cold"}
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {[*scenarios, 'cold']}")
    if str(big) in chosen and f"1@{big}" in scenarios:
        chosen.add(f"1@{big}")
    scenarios = {k: v for k, v in scenarios.items() if k in chosen}

    peft = peft_load = None
    if any(k.isdigit() and int(k) <= peft_adapters for k in scenarios):
        peft_base, _ = rankwise.load_model("smollm2", dtype=dtype)
        # the same workaround in both: torch's bf16 LM head on a non-contiguous input (see the hook)
        peft_base.get_output_embeddings().register_forward_pre_hook(contiguous_input_hook)
        t0 = time.perf_counter()
        peft = peft_lib.PeftModel.from_pretrained(peft_base, str(tmp / names[0]), adapter_name=names[0])
        for name in names[1:peft_adapters]:
            peft.load_adapter(str(tmp / name), adapter_name=name)
        peft.eval()
        peft_load = (time.perf_counter() - t0) / peft_adapters

    # one untimed pass of the first scenario on each side: otherwise whichever runs first
    # (the base model alone) pays one-off warm-up costs (allocator, kernels, caches)
    first = next(iter(scenarios))
    run_engine(engine, scenarios[first], tokens)
    if peft is not None:
        run_peft_mixed(peft, tok, next(w for k, w in scenarios.items() if k.isdigit()), tokens)
    results: dict[str, dict[str, list]] = {k: {} for k in scenarios}
    for _ in range(repeats):
        for key, work in scenarios.items():
            runs = {"rankwise": run_engine(engine, work, tokens)}
            with_peft = key == "base" or (key.isdigit() and int(key) <= peft_adapters)
            if with_peft and key != "base":
                runs["peft_mixed"] = run_peft_mixed(peft, tok, work, tokens)
                runs["peft_per_adapter"] = run_peft_per_adapter(peft, tok, work, tokens)
            for lib, (tps, lat, outs) in runs.items():
                entry = results[key].setdefault(lib, {"tps": [], "lat": [], "outs": None})
                entry["tps"].append(tps)
                entry["lat"] += lat
                entry["outs"] = outs
    cold = warm = load = None
    if "cold" in chosen:
        if not scenarios:  # the slot pools as the scenarios would have left them
            warm_slots(engine, names)
        cold, warm, load = cold_start(engine, cold_names, rounds=repeats if args.cold_only else 1)
    engine.stop()

    def tps(key, lib):
        return statistics.median(results[key][lib]["tps"])

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(results[a[0]][a[1]]["tps"], results[b[0]][b[1]]["tps"], strict=True))

    rows, payload_rows = [], []
    for key in scenarios:
        row = {"scenario": key, "requests": len(scenarios[key])}
        for lib in ("rankwise", "peft_mixed", "peft_per_adapter"):
            if lib in results[key]:
                lat = results[key][lib]["lat"]
                row[lib] = {"tokens_per_s": tps(key, lib), "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99)}
        if "peft_mixed" in results[key]:
            r, p = results[key]["rankwise"]["outs"], results[key]["peft_mixed"]["outs"]
            row["identical_to_peft"] = sum(a == b for a, b in zip(r, p, strict=True)) / len(r)
            row["speedup_vs_peft_mixed"] = ratio((key, "rankwise"), (key, "peft_mixed"))
            row["speedup_vs_peft_per_adapter"] = ratio((key, "rankwise"), (key, "peft_per_adapter"))
        payload_rows.append(row)

        def cells(lib, row=row):
            v = row.get(lib)
            return ["–"] * 3 if v is None else [v["tokens_per_s"], v["p50_s"], v["p99_s"]]

        label = {"base": "base model alone"}.get(key, f"{key.replace('@', ' (at ')}{')' if '@' in key else ''} adapter(s)")
        rows.append(
            [label, row["requests"], *cells("rankwise"), *cells("peft_mixed"), *cells("peft_per_adapter"),
             f"{row['speedup_vs_peft_mixed']:.2f}x" if "speedup_vs_peft_mixed" in row else "–",
             f"{100 * row['identical_to_peft']:.0f}%" if "identical_to_peft" in row else "–"]
        )  # fmt: skip

    many = str(peft_adapters)
    targets = {}
    if many in scenarios:
        targets[f"{many} adapters: rankwise / PEFT mixed (target >= 4)"] = ratio((many, "rankwise"), (many, "peft_mixed"))
    if "1" in scenarios and "base" in scenarios:
        targets["1 adapter / base model (target >= 0.85)"] = ratio(("1", "rankwise"), ("base", "rankwise"))
    if cold is not None:
        targets["cold start s, rank 16 (target < 0.5)"] = cold
    if f"1@{big}" in scenarios:
        targets[f"{big} adapters / 1 adapter at {big} requests (target >= 0.7)"] = ratio(
            (str(big), "rankwise"), (f"1@{big}", "rankwise")
        )
    payload = {
        "quick": quick,
        "requests": n_requests,
        "new_tokens": tokens,
        "dtype": args.dtype,
        "repeats": repeats,
        "ranks": list(RANKS),
        "targets": sorted(TARGETS),
        "scenarios": payload_rows,
        "ratios": targets,
        "cold_start_s": cold,
        "warm_first_token_s": warm,
        "adapter_load_s": load,
        "mean_load_s": {"rankwise": engine_load, "peft": peft_load},
    }
    header = [
        "scenario", "requests", "rankwise tok/s", "p50 s", "p99 s", "PEFT mixed tok/s", "p50 s", "p99 s",
        "PEFT per-adapter tok/s", "p50 s", "p99 s", "rankwise / PEFT mixed", "same tokens as PEFT",
    ]  # fmt: skip
    md = (
        "## Serving many adapters (`bench/serve.py`)\n\n"
        f"SmolLM2-135M ({args.dtype}), LoRA on q_proj/v_proj with ranks {', '.join(map(str, RANKS))} mixed; every "
        f"request is offered at once, greedy, {tokens} new tokens; rankwise's engine batches up to 64 "
        f"rows; PEFT mixed = `generate(adapter_names=...)` in batches of 64. Medians of {repeats} "
        "interleaved round(s); latency is submit to last token.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + markdown_table(["target", "measured"], [[k, v] for k, v in targets.items()])
        + "\n\n"
        + (
            f"Cold start: first token {cold:.3f} s for a non-resident rank-16 adapter (load alone "
            f"{load:.3f} s; the same request once resident {warm:.3f} s). "
            if cold is not None
            else ""
        )
        + f"Loading an adapter: rankwise {engine_load:.3f} s"
        + (f", PEFT {peft_load:.3f} s (mean).\n" if peft_load is not None else " (mean).\n")
    )
    if quick or args.scenarios:  # a smoke run or a subset: printed, never replacing the docs' numbers
        print(json.dumps(payload, indent=2))
    else:
        write_results("serve", payload, md)
    print(md)


if __name__ == "__main__":
    main()
