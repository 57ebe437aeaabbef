"""rankwise vs PEFT: LoRA and DoRA training-step time and extra peak memory, same inputs.

Cases (rank 16): the embedded SmolLM2-135M with adapters on all linear layers (batch 4 x 256
tokens; --quick: 1 x 128), one 2048x2048 layer with 4096 tokens, one 8192x8192 layer with
256 tokens. Both libraries get identical adapter weights (B non-zero, DoRA magnitudes
perturbed), outputs are compared (max |diff| / max |y|), and each step ends with an
in-place touch of every trainable parameter, as an optimizer step would, so no library
can reuse a cached norm between steps.

Time: median of interleaved forward+backward steps (rankwise and PEFT alternate).
Memory (not measured for SmolLM2 in --quick): one fresh subprocess per (library, method, case). It builds the model, returns
freed memory to the OS (malloc_trim), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs`` = 5), runs one forward+backward step and reports
``VmHWM - VmRSS_before``: the extra peak resident memory of that step.

    .venv/bin/python bench/adapters.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_results  # noqa: E402

warnings.filterwarnings("ignore")
RANK = 16
CASES = ["smollm2", "linear2048", "linear8192"]


# ----------------------------------------------------------------------------- building


def _base(case: str, quick: bool):
    """(model, inputs, targets, loss_fn) for a case; same seed -> same model and inputs."""
    torch.manual_seed(0)
    if case == "smollm2":
        from rankwise.models import load_model

        model, _ = load_model("smollm2")
        batch, seq = (1, 128) if quick else (4, 256)
        x = torch.randint(0, model.config.vocab_size, (batch, seq))
        return model.train(), x, "all-linear", lambda m, x: m(x, labels=x).loss
    n, tokens = (2048, 4096) if case == "linear2048" else (8192, 256)
    layer = nn.Linear(n, n, bias=False)
    x = torch.randn(tokens, n, requires_grad=True)
    return nn.Sequential(layer), x, ["0"], lambda m, x: m(x).sum()


def _peft_targets(targets):
    return "all-linear" if targets == "all-linear" else targets


def build(lib: str, method: str, case: str, quick: bool, donor=None):
    """A model with a rank-16 adapter from ``lib``; weights copied from ``donor`` if given."""
    from rankwise.adapters import adapted_layers, attach

    model, x, targets, loss_fn = _base(case, quick)
    g = torch.Generator().manual_seed(1)
    if lib == "rankwise":
        attach(model, method, targets=targets, rank=RANK, alpha=2 * RANK)
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                ad = layer.adapters["default"]
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.01)
                if method == "dora":
                    ad.lora_magnitude.mul_(
                        1 + 0.1 * torch.randn(ad.lora_magnitude.shape, generator=g)
                    )
        return model, x, loss_fn
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=_peft_targets(targets),
        use_dora=method == "dora",
    )
    model = get_peft_model(model, cfg)
    if donor is not None:
        ours = adapted_layers(donor)
        with torch.no_grad():
            for name, module in model.named_modules():
                if hasattr(module, "lora_A") and "default" in module.lora_A:
                    ad = ours[name.removeprefix("base_model.model.")].adapters["default"]
                    module.lora_A["default"].weight.copy_(ad.lora_A)
                    module.lora_B["default"].weight.copy_(ad.lora_B)
                    if method == "dora":
                        module.lora_magnitude_vector["default"].weight.copy_(ad.lora_magnitude)
    return model, x, loss_fn


def step_fn(model, x, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        if x.requires_grad:
            x.grad = None
        loss_fn(model, x).backward()
        with torch.no_grad():  # what an optimizer step does to version counters
            for p in params:
                p.mul_(1.0)

    return step


def output_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def relative_difference(ours, theirs, *, dtype=torch.float32) -> float:
    """max |ours - theirs| / max |theirs| of the outputs, with both models cast to ``dtype``
    (float64 separates a difference in the math from float32 rounding order)."""
    (m1, x1), (m2, x2) = ours, theirs
    if dtype != torch.float32:
        m1, m2 = copy.deepcopy(m1).to(dtype), copy.deepcopy(m2).to(dtype)
        x1, x2 = (x.detach().to(dtype) if x.is_floating_point() else x for x in (x1, x2))
    y1, y2 = output_of(m1, x1), output_of(m2, x2)
    return ((y1 - y2).abs().max() / y2.abs().max()).item()


# ----------------------------------------------------------------------------- memory


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory(lib: str, method: str, case: str, quick: bool) -> float:
    """Run in a fresh process: extra peak RSS (MB) of one forward+backward step."""
    donor = None
    if lib == "peft":  # same weights as rankwise (cheap for the linear cases)
        donor, _, _ = build("rankwise", method, case, quick)
    model, x, loss_fn = build(lib, method, case, quick, donor)
    del donor
    step = step_fn(model, x, loss_fn)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    step()
    return (_rss_kb("VmHWM") - before) / 1024


def memory_in_subprocess(lib: str, method: str, case: str, quick: bool) -> float:
    cmd = [sys.executable, __file__, "--measure", lib, method, case] + (
        ["--quick"] if quick else []
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


# ----------------------------------------------------------------------------- main


def run_case(case: str, quick: bool) -> list[dict]:
    repeats = (1 if case == "smollm2" else 2) if quick else (1 if case == "smollm2" else 4)
    models = {}
    for method in ("lora", "dora"):
        ours = build("rankwise", method, case, quick)
        theirs = build("peft", method, case, quick, donor=ours[0])
        models[method] = (ours, theirs)
    rows = []
    fns = {}
    agreement, agreement64 = {}, {}
    for method, (ours, theirs) in models.items():
        agreement[method] = relative_difference(ours[:2], theirs[:2])
        agreement64[method] = relative_difference(ours[:2], theirs[:2], dtype=torch.float64)
        fns[f"rankwise-{method}"] = step_fn(*ours)
        fns[f"peft-{method}"] = step_fn(*theirs)
    times = interleaved(fns, repeats=repeats)
    del models, fns, ours, theirs
    gc.collect()
    for method in ("lora", "dora"):
        skip = quick and case == "smollm2"  # the model load per subprocess is too slow for --quick
        mem = {
            lib: float("nan") if skip else memory_in_subprocess(lib, method, case, quick)
            for lib in ("rankwise", "peft")
        }
        rows.append(
            {
                "case": case,
                "method": method,
                "rankwise_s": times[f"rankwise-{method}"],
                "peft_s": times[f"peft-{method}"],
                "speedup": times[f"peft-{method}"] / times[f"rankwise-{method}"],
                "rankwise_mb": mem["rankwise"],
                "peft_mb": mem["peft"],
                "rel_output_diff": agreement[method],
                "rel_output_diff_float64": agreement64[method],
                "dora_over_lora": times["rankwise-dora"] / times["rankwise-lora"]
                if method == "dora"
                else None,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--measure", nargs=3, metavar=("LIB", "METHOD", "CASE"))
    parser.add_argument("--cases", nargs="*", default=CASES)
    args = parser.parse_args()
    if args.measure:
        extra = measure_memory(*args.measure, quick=args.quick)
        print(json.dumps({"extra_mb": extra}))
        return
    rows = [row for case in args.cases for row in run_case(case, args.quick)]
    label = {
        "smollm2": "SmolLM2-135M all-linear, " + ("1x128" if args.quick else "4x256") + " tokens",
        "linear2048": "2048x2048 layer, 4096 tokens",
        "linear8192": "8192x8192 layer, 256 tokens",
    }
    table = markdown_table(
        ["case", "method", "rankwise s", "PEFT s", "speed-up", "rankwise +MB", "PEFT +MB",
         "DoRA/LoRA (rankwise)", "max rel. output diff", "same in float64"],
        [
            [label[r["case"]], r["method"], r["rankwise_s"], r["peft_s"], f"{r['speedup']:.2f}x",
             r["rankwise_mb"], r["peft_mb"],
             "" if r["dora_over_lora"] is None else f"{r['dora_over_lora']:.2f}x",
             f"{r['rel_output_diff']:.1e}", f"{r['rel_output_diff_float64']:.1e}"]
            for r in rows
        ],
    )  # fmt: skip
    d8 = next((r for r in rows if r["case"] == "linear8192" and r["method"] == "dora"), None)
    targets = {
        "lora_not_slower_anywhere": all(r["speedup"] >= 1.0 for r in rows if r["method"] == "lora"),
        "lora_not_larger_anywhere": all(
            not r["rankwise_mb"] > r["peft_mb"] for r in rows if r["method"] == "lora"
        ),
        "dora_8192_2x_faster": d8 is not None and d8["speedup"] >= 2.0,
        "dora_8192_40pct_less_memory": d8 is not None and d8["rankwise_mb"] <= 0.6 * d8["peft_mb"],
        "dora_within_1.5x_of_lora": all(
            r["dora_over_lora"] <= 1.5 for r in rows if r["method"] == "dora"
        ),
        "outputs_equal_1e-5": all(r["rel_output_diff"] <= 1e-5 for r in rows),
        "outputs_equal_1e-10_in_float64": all(r["rel_output_diff_float64"] <= 1e-10 for r in rows),
    }
    markdown = (
        "## Adapters: rankwise vs PEFT (LoRA and DoRA, rank 16)\n\n"
        f"`bench/adapters.py{' --quick' if args.quick else ''}`: forward+backward of one training "
        "step (median of interleaved repeats) and the extra peak resident memory of one step "
        "(fresh subprocess per cell; peak-RSS mark reset via `/proc/self/clear_refs`, "
        "`VmHWM` minus RSS before the step). Same adapter weights in both libraries; the last "
        "columns are max |rankwise - PEFT| / max |PEFT| of the outputs, in float32 and with both "
        "models cast to float64 (a difference there would be in the math, not in rounding).\n\n"
        f"{table}\n\n"
        + "Targets: "
        + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items())
    )
    write_results(
        "adapters", {"quick": args.quick, "rank": RANK, "rows": rows, "targets": targets}, markdown
    )
    print(markdown)


if __name__ == "__main__":
    main()
