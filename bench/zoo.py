"""The adapter zoo: every registered method, fine-tuned at matched parameter budgets, and timed
on one 2048² layer against rankwise LoRA and against PEFT where PEFT has the method.

(a) Fine-tuning at a matched trainable-parameter budget (each method's size knob — ``rank``,
    or the one in ``KNOBS`` — is set to the value whose count comes closest to LoRA rank 8 on
    the same targets; the count reached is reported):
    - MiniLM (embedded ``minilm``, frozen) + a linear head on mean-pooled states, adapters on
      ``query``/``value``: which of six standard-library packages (email, asyncio, tkinter,
      xml, logging, importlib) a docstring comes from (local data; fixed train/test split).
      Test accuracy, median step time, extra peak RSS of one step.
    - SmolLM2-135M (embedded), adapters on ``q_proj``/``v_proj``, trained on the built-in
      corpus; validation perplexity, median step time, extra peak RSS of one step.
(b) One 2048×2048 linear, 4096 tokens (input requires grad, as inside a network),
    forward+backward: every method (matched to LoRA r16's budget; the PEFT pairs at the
    issue's ranks) and PEFT's LoRA r16, DoRA r16, VeRA r256, RandLoRA r32, MiSS r64 (and MiSS
    ``bat``), all interleaved, median of repeats; ratios to rankwise LoRA and to PEFT.

(a)'s step times run one method after another (medians over its steps); only (b)'s are
interleaved. ``--quick`` shortens everything (minutes); the full run stays under 25 minutes on
2 idle cores. ``--methods`` reruns only those rows (a method's name also selects its variants)
of the parts in ``--parts``; their numbers replace those rows of the last run's results, the
other rows are kept, and the doc says which rows come from which run.

    .venv/bin/python bench/zoo.py [--quick] [--parts minilm lm layer] [--methods lora bone ...]
"""

from __future__ import annotations

import argparse
import ast
import copy
import ctypes
import gc
import inspect
import json
import math
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_results  # noqa: E402

from rankwise.adapters import attach, method_names  # noqa: E402
from rankwise.adapters.base import get_initialiser, get_method  # noqa: E402

warnings.filterwarnings("ignore")

PACKAGES = ("email", "asyncio", "tkinter", "xml", "logging", "importlib")
PER_CLASS = 130
CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
KNOBS = {  # method -> (knob, value -> options); default: ("rank", {"rank": v})
    "nola": ("num_basis", lambda v: {"num_basis_a": v, "num_basis_b": v}),
    "mos": ("pool_rank", lambda v: {"pool_rank": v, "rank": 4 * v, "private_rank": v // 2}),
}
VARIANTS = {"bone[miss]": ("bone", {"variant": "miss"})}  # extra rows: (method, fixed options)
LR = {"default": 1e-3, "vector": 5e-3}
VECTOR_METHODS = {"svfit", "lora_xs", "lora_sb", "loldu", "tera", "nola", "randlora"}
LAYER_RANKS = {  # (b): the settings for methods PEFT has
    "lora": {"rank": 16, "alpha": 32.0},
    "dora": {"rank": 16, "alpha": 32.0},
    "vera": {"rank": 256},
    "randlora": {"rank": 32},
    "bone": {"rank": 64},
    "bone[miss]": {"rank": 64},
}


# ----------------------------------------------------------------------------- helpers


def rows_of_methods(selected: list[str] | None) -> dict[str, tuple[str, dict]]:
    """``{row name: (method, fixed options)}`` for every registered method plus variants."""
    rows = {m: (m, {}) for m in method_names()}
    rows.update(VARIANTS)
    if selected:
        rows = {k: v for k, v in rows.items() if k in selected or v[0] in selected}
    return rows


def parameters_for(model, method, targets, options) -> int | None:
    try:
        return attach(model, method, targets, name="probe", dry_run=True, **options).parameters
    except Exception:
        return None


def matched_options(model, method, targets, fixed: dict, budget: int) -> tuple[dict, int]:
    """The knob value whose trainable count is closest to ``budget`` (log ratio)."""
    knob, to_options = KNOBS.get(method, ("rank", lambda v: {"rank": v}))
    best = None
    for v in CANDIDATES:
        options = {**fixed, **to_options(v)}
        n = parameters_for(model, method, targets, options)
        if n is None or n == 0:
            continue
        score = abs(math.log(n / budget))
        if best is None or score < best[0]:
            best = (score, options, n)
    if best is None or best[0] > math.log(2):  # the knob cannot reach the budget (TeRA: 4r)
        n = parameters_for(model, method, targets, fixed)
        if n is None:
            raise RuntimeError(f"{method}: no setting of {knob} attaches to {targets}")
        return {**fixed, "budget": "unreachable; defaults"}, n
    return best[1], best[2]


def with_init_data(method: str, options: dict, inputs, loss_fn=None) -> dict:
    """Give a data-driven default init (lora_sb) some training batches, as finetune does."""
    options = {k: v for k, v in options.items() if k != "budget"}
    init = get_initialiser(options.get("init", get_method(method).config_class().init))
    if init is None or "inputs" not in inspect.signature(init.fn).parameters:
        return options
    extra = {"inputs": inputs, "batch_size": 4}
    if loss_fn is not None:
        extra["loss_fn"] = loss_fn
    return {**options, "init_options": extra}


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def extra_peak_mb(step) -> float:
    """Extra peak resident memory (MB) of one call of ``step`` (peak mark reset first)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kb("VmRSS")
    step()
    return (rss_kb("VmHWM") - before) / 1024


def train_steps(params, step_loss, steps: int, lr: float) -> tuple[list[float], float, float]:
    """AdamW for ``steps`` steps; (losses, median step seconds, extra peak MB of step 2)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, times, peak = [], [], float("nan")

    def one():
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    for i in range(steps):
        t0 = time.perf_counter()
        if i == 1:
            peak = extra_peak_mb(one)
        else:
            one()
        times.append(time.perf_counter() - t0)
    return losses, statistics.median(times[1:] or times), peak


# ----------------------------------------------------------------------------- (a) MiniLM


def package_docstrings() -> tuple[list[str], list[int]]:
    """Docstrings (>= 80 characters) of six standard-library packages, labelled by package."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, labels = [], []
    for label, pkg in enumerate(PACKAGES):
        found = []
        for f in sorted((root / pkg).rglob("*.py")):
            if "test" in f.parts or "tests" in f.parts:
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 80:
                        found.append(" ".join(doc.split()))
        g = torch.Generator().manual_seed(label)
        for i in torch.randperm(len(found), generator=g)[:PER_CLASS].tolist():
            texts.append(found[i])
            labels.append(label)
    return texts, labels


def minilm_task(seq_len: int):
    from rankwise.models import load_model

    encoder, tokenizer = load_model("minilm")
    texts, labels = package_docstrings()
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    y = torch.tensor(labels)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    n_train = int(0.7 * len(texts))
    split = {"train": order[:n_train], "test": order[n_train:]}
    data = {k: (enc["input_ids"][i], enc["attention_mask"][i], y[i]) for k, i in split.items()}
    return encoder, data


class Classifier(nn.Module):
    """Mean-pooled encoder states -> a linear head (the head trains for every method)."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(0)
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def run_minilm(rows, quick: bool) -> dict[str, dict]:
    steps, batch = (20, 16) if quick else (60, 16)
    base, data = minilm_task(seq_len=48 if quick else 64)
    ids, mask, y = data["train"]
    targets = ["query", "value"]
    budget = attach(base, "lora", targets, name="probe", dry_run=True, rank=8).parameters
    results = {}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(y), (batch,), generator=g) for _ in range(steps)]

    def loss_fn_for(model):
        def init_loss(_enc, b):
            i = b
            return nn.functional.cross_entropy(model(ids[i], mask[i]), y[i])

        return init_loss

    for row, (method, fixed) in [("head only", (None, {})), *rows.items()]:
        encoder = copy.deepcopy(base)
        for p in encoder.parameters():
            p.requires_grad_(False)
        model = Classifier(encoder, len(PACKAGES))
        count, shown = 0, ""
        try:
            if method is not None:
                options, count = matched_options(encoder, method, targets, fixed, budget)
                shown = _shown(options)
                options = with_init_data(method, options, batches[:2], loss_fn_for(model))
                attach(encoder, method, targets, **options)
            it = iter(range(steps))

            def step_loss(model=model, it=it):
                i = batches[next(it)]
                return nn.functional.cross_entropy(model(ids[i], mask[i]), y[i])

            params = [p for p in model.parameters() if p.requires_grad]
            lr = LR["vector"] if method in VECTOR_METHODS else LR["default"]
            losses, step_s, peak = train_steps(params, step_loss, steps, lr)
            model.eval()
            with torch.no_grad():
                tids, tmask, ty = data["test"]
                acc = (model(tids, tmask).argmax(-1) == ty).float().mean().item()
            results[row] = {"params": count, "options": shown, "accuracy": acc,
                            "step_s": step_s, "peak_mb": peak, "loss_first": losses[0],
                            "loss_last": losses[-1]}  # fmt: skip
        except Exception as e:  # one method failing must not hide the others
            results[row] = {"error": f"{type(e).__name__}: {e}"[:160]}
        print("minilm", row, results[row], flush=True)
        del model, encoder
        gc.collect()
    return results


# ----------------------------------------------------------------------------- (a) SmolLM2


def run_lm(rows, quick: bool) -> dict[str, dict]:
    from rankwise.data import load_corpus, token_blocks
    from rankwise.models import load_model

    steps, batch, seq, n_eval = (3, 1, 64, 4) if quick else (12, 2, 128, 8)
    base, tokenizer = load_model("smollm2")
    corpus = load_corpus("builtin")
    train = token_blocks(tokenizer, corpus.train, seq_len=seq, max_tokens=seq * batch * (steps + 2))
    valid = token_blocks(tokenizer, corpus.validation, seq_len=seq, max_tokens=seq * n_eval)
    targets = ["q_proj", "v_proj"]
    budget = attach(base, "lora", targets, name="probe", dry_run=True, rank=8).parameters

    def ppl(model) -> float:
        model.eval()
        with torch.no_grad():
            losses = [model(valid[i : i + 1], labels=valid[i : i + 1]).loss.item() for i in range(len(valid))]
        return math.exp(statistics.fmean(losses))

    results = {"base model": {"params": 0, "options": "", "perplexity": ppl(base)}}
    print("lm base", results["base model"], flush=True)
    for row, (method, fixed) in rows.items():
        model = copy.deepcopy(base)
        try:
            options, count = matched_options(model, method, targets, fixed, budget)
            shown = _shown(options)
            options = with_init_data(method, options, train[:4])
            attach(model, method, targets, **options)
            model.train()
            it = iter(range(steps))

            def step_loss(model=model, it=it):
                i = next(it) * batch % max(1, len(train) - batch)
                x = train[i : i + batch]
                return model(x, labels=x).loss

            params = [p for p in model.parameters() if p.requires_grad]
            lr = LR["vector"] if method in VECTOR_METHODS else LR["default"]
            losses, step_s, peak = train_steps(params, step_loss, steps, lr)
            results[row] = {"params": count, "options": shown, "perplexity": ppl(model),
                            "step_s": step_s, "peak_mb": peak}  # fmt: skip
        except Exception as e:
            results[row] = {"error": f"{type(e).__name__}: {e}"[:160]}
        print("lm", row, results[row], flush=True)
        del model
        gc.collect()
    return results


def _shown(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("init_options", "alpha"))


# ----------------------------------------------------------------------------- (b) one layer


def _layer(n: int = 2048) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n, n, bias=False))


def peft_layer(kind: str):
    """PEFT's implementation on the same layer, or None if this PEFT lacks it."""
    import peft

    configs = {
        "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"]),
        "dora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"], use_dora=True),
        "vera": lambda: peft.VeraConfig(r=256, target_modules=["0"]),
        "randlora": lambda: peft.RandLoraConfig(r=32, target_modules=["0"]),
        "bone[miss]": lambda: peft.MissConfig(r=64, target_modules=["0"]),
        "bone": lambda: peft.MissConfig(r=64, init_weights="bat", target_modules=["0"]),
    }
    if kind not in configs:
        return None
    return peft.get_peft_model(_layer(), configs[kind]())


def same_weights_difference(row: str, ours: nn.Module, theirs: nn.Module, x) -> float | None:
    """max |ours - PEFT| / max |PEFT| with random adapter weights copied ours -> PEFT
    (LoRA, DoRA, Bone/MiSS), or None for a pair whose weights are not copied here."""
    from rankwise.adapters import adapted_layers

    ad = adapted_layers(ours)["0"].adapters["default"]
    peft_layer_ = theirs.base_model.model[0]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        if row in ("lora", "dora"):
            peft_layer_.lora_A["default"].weight.copy_(ad.lora_A)
            peft_layer_.lora_B["default"].weight.copy_(ad.lora_B)
            if row == "dora":
                peft_layer_.lora_magnitude_vector["default"].weight.copy_(ad.lora_magnitude)
        elif row in ("bone", "bone[miss]"):
            peft_layer_.miss_block["default"].copy_(ad.bone_block * ad.scaling)
        else:
            return None
        y_ours, y_peft = ours(x), theirs(x)
    return ((y_ours - y_peft).abs().max() / y_peft.abs().max()).item()


def step_fn(model: nn.Module, x: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        model(x).sum().backward()
        with torch.no_grad():  # what an optimizer step does to version counters
            for p in params:
                p.mul_(1.0)

    return step


def run_layer(rows, quick: bool) -> dict[str, dict]:
    tokens = 4096
    x = torch.randn(tokens, 2048, requires_grad=True)
    probe = _layer()
    budget = attach(probe, "lora", ["0"], name="probe", dry_run=True, rank=16).parameters
    fns, info = {}, {}
    for row, (method, fixed) in {"lora": ("lora", {}), **rows}.items():
        model = _layer()
        try:
            if row in LAYER_RANKS:
                options = {**fixed, **LAYER_RANKS[row]}
                count = parameters_for(model, method, ["0"], options)
                shown = _shown(options)
            else:
                options, count = matched_options(model, method, ["0"], fixed, budget)
            shown = _shown(options)
            options = with_init_data(method, options, None)
            if "init_options" in options:  # a data-driven init: no data in this case
                options = {**options, "init": "default", "init_options": {}}
            attach(model, method, ["0"], **options)
            fns[f"rankwise:{row}"] = step_fn(model, x)
            with torch.no_grad():
                model(x[:8].detach())  # fail here, per method, not inside the timing loop
            info[row] = {"params": count, "options": shown}
        except Exception as e:
            info[row] = {"error": f"{type(e).__name__}: {e}"[:160]}
            continue
        theirs = peft_layer(row)
        if theirs is not None:
            fns[f"peft:{row}"] = step_fn(theirs, x)
            diff = same_weights_difference(row, model, theirs, x[:64].detach())
            if diff is not None:
                info[row]["rel_output_diff"] = diff
    times = interleaved(fns, repeats=2 if quick else 5)
    lora = times["rankwise:lora"]
    for row, entry in info.items():
        if "error" in entry:
            continue
        entry["step_s"] = times[f"rankwise:{row}"]
        entry["x_lora"] = entry["step_s"] / lora
        if f"peft:{row}" in times:
            entry["peft_s"] = times[f"peft:{row}"]
            entry["speedup_vs_peft"] = entry["peft_s"] / entry["step_s"]
        print("layer", row, entry, flush=True)
    return info


# ----------------------------------------------------------------------------- main


def _get(d: dict, row: str, key: str):
    v = d.get(row, {}).get(key)
    return "" if v is None else v


def previous_results() -> dict:
    """The last run's payload (bench/results/zoo.json), or {}."""
    from _common import RESULTS

    try:
        return json.loads((RESULTS / "zoo.json").read_text())
    except (OSError, ValueError):
        return {}


def earlier_label(before: dict, part: str) -> str:
    """Where the last run's numbers of ``part`` came from, as seen from a later run."""
    earlier = "an earlier run" + (" --quick" if before.get("quick") else "")
    label = before.get("runs", {}).get(part, earlier)
    return label.replace("this run", "an earlier run")  # its own run, not the current one


def table(rows, minilm, lm, layer) -> str:
    names = ["head only", "base model", *[r for r in rows]]
    out = []
    for r in names:
        errs = [p[r]["error"] for p in (minilm, lm, layer) if "error" in p.get(r, {})]
        x_lora = _get(layer, r, "x_lora")
        vs_peft = _get(layer, r, "speedup_vs_peft")
        out.append([
            r,
            _get(minilm, r, "params"), _get(minilm, r, "accuracy"), _get(minilm, r, "step_s"),
            _get(minilm, r, "peak_mb"),
            _get(lm, r, "params"), _get(lm, r, "perplexity"), _get(lm, r, "step_s"), _get(lm, r, "peak_mb"),
            _get(layer, r, "options"), _get(layer, r, "step_s"),
            f"{x_lora:.2f}x" if x_lora != "" else "",
            _get(layer, r, "peft_s"), f"{vs_peft:.2f}x" if vs_peft != "" else "",
            f"{d:.1e}" if (d := _get(layer, r, "rel_output_diff")) != "" else "",
            "; ".join(errs),
        ])  # fmt: skip
    return markdown_table(
        ["method", "MiniLM params", "MiniLM acc", "MiniLM step s", "MiniLM +MB",
         "SmolLM2 params", "SmolLM2 ppl", "SmolLM2 step s", "SmolLM2 +MB",
         "2048² setting", "2048² step s", "÷ rankwise LoRA", "PEFT s", "PEFT ÷ ours",
         "vs PEFT output", "error"],
        out,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", nargs="*", default=["minilm", "lm", "layer"])
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.methods or ()) - set(rows_of_methods(None)))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {sorted(rows_of_methods(None))}")
    rows = rows_of_methods(args.methods)
    t0 = time.time()
    mode = " --quick" if args.quick else ""
    before = previous_results()
    runs = {part: ("this run" + mode) for part in args.parts}
    parts = {}
    for part, fn in (("minilm", run_minilm), ("lm", run_lm), ("layer", run_layer)):
        if part not in args.parts:  # keeps its numbers from the last run, said so in the doc
            parts[part], runs[part] = before.get(part, {}), earlier_label(before, part)
        elif args.methods:  # some rows rerun: they replace theirs, the other rows stay
            new = fn(rows, args.quick)
            parts[part] = {**before.get(part, {}), **new}
            runs[part] = f"{earlier_label(before, part)}; rows {', '.join(new)}: this run{mode}"
        else:
            parts[part] = fn(rows, args.quick)
    rows = rows_of_methods(None)  # the table shows every method, rerun or not
    minilm, lm, layer = parts["minilm"], parts["lm"], parts["layer"]
    layer_rows = {r: e for r, e in layer.items() if "error" not in e}
    targets = {
        "within_1.5x_of_lora": {r: e["x_lora"] <= 1.5 for r, e in layer_rows.items()},
        "faster_than_peft": {
            r: e["speedup_vs_peft"] >= 1.0 for r, e in layer_rows.items() if "speedup_vs_peft" in e
        },
    }
    missed = [f"{k}: {r}" for k, v in targets.items() for r, ok in v.items() if not ok]
    markdown = (
        "## Adapter zoo: every method at a matched budget, and one 2048² layer vs PEFT\n\n"
        f"`bench/zoo.py{mode}` ({time.time() - t0:.0f} s). MiniLM: frozen encoder + linear head, "
        "adapters on query/value, 6-way package-of-a-docstring classification (standard "
        f"library, {PER_CLASS} per class, 70/30 split), test accuracy. SmolLM2-135M: adapters "
        "on q_proj/v_proj, built-in corpus, validation perplexity. Budgets matched to LoRA r8 "
        "on the same targets (each method's size knob set to the closest count; counts shown). "
        "Step times of these two: one method after another (median of its steps); +MB: extra "
        "peak RSS of one step. 2048² layer: 4096 tokens, input requiring grad, forward+backward, "
        "all rankwise methods and PEFT interleaved (median); methods matched to LoRA r16's "
        "budget, PEFT pairs at the issue's ranks (LoRA/DoRA r16, VeRA r256, RandLoRA r32, "
        "MiSS r64; `bone` = MiSS `bat`). `head only` / `base model`: no adapter. Columns from: "
        + ", ".join(f"{k}: {v}" for k, v in runs.items())
        + ".\n\n"
        f"{table(rows, minilm, lm, layer)}\n\n"
        "Targets (2048² layer): every method within 1.5x of rankwise LoRA, faster than PEFT "
        "where PEFT has it: " + ("all met" if not missed else "missed — " + ", ".join(missed))
    )
    payload = {"quick": args.quick, "runs": runs, "minilm": minilm, "lm": lm, "layer": layer,
               "targets": targets}  # fmt: skip
    write_results("zoo", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
