"""Adaptive-rank methods and training rules, each next to plain LoRA at the same budget.

Every row fine-tunes SmolLM2-135M (q_proj and v_proj of every layer) through
``rankwise.adapters.finetune`` on the built-in corpus, with the same steps, batch, learning
rate and seed, saves the adapter, loads it back onto a fresh model and measures validation
perplexity plus the method's own claim, at small scale:

- dylora: any rank k ≤ r works without retraining (perplexity at r, r/2, r/4 next to plain
  LoRA truncated to the same k, which was never trained to work truncated);
- sora: the gate prunes rank during training (total rank left of the starting total);
- increlora / triadapt: rank starts at 1 per layer and grows, unevenly, to the budget of
  plain LoRA's rank (total rank and the per-layer range at the end; "trainable" counts the
  parameters in use at the end, the budget LoRA is compared at: the unused capacity of a
  layer, up to rank 2 × RANK, never gets a gradient);
- bayes_lora: gates choose each layer's rank and each factor's bits (mean rank, mean bits);
- sara: the same number of trainable weights as LoRA, chosen among the smallest |w| of the
  base model; the nuclear-norm penalty keeps the update low-rank (its effective rank); its
  claim is about keeping the base model's generalization: the held-out perplexity;
- allora / ggpo (training rules on LoRA): validation perplexity next to LoRA's. ALLoRA is
  dropout-free and scaling-free, and so is this LoRA (dropout 0, alpha = rank); the paper
  argues against LoRA with dropout and a scale, so the ``lora α16 dropout`` row is LoRA in the
  common recipe (alpha = 2 × rank, dropout 0.05) at the same budget. ALLoRA's ``eta`` is the
  rate multiplier of a zero row, so ``lora + allora η4`` sits next to ``lora lr×4``: LoRA at
  the learning rate η 4 gives ``B`` at the start.

Every row also reports perplexity on the held-out license texts (``heldout_texts``, another
kind of English that no row trains on): how much of the base model's behaviour elsewhere the
fine-tuning kept.

Perplexities are on the built-in validation split (``--eval-tokens`` tokens, blocks of
``--seq-len``). ``--quick`` runs fewer, shorter steps (a smoke run: the claims need the full
run). Writes ``bench/results/adaptive.json`` and its section of docs/benchmarks.md.
``--steps N`` trains every row for N steps instead of the default 40 and writes its own
results (``adaptive_steps<N>.json``) and section, so the 40-step table stays beside it.
``--rows a b`` reruns only those rows (a label, or a label's first word: ``increlora``
selects both IncreLoRA rows) and the LoRA rows they are compared with, and merges them into
the saved results of a run with the same settings; the other rows stay as they were (with
no saved results of those settings, the table holds these rows alone).
The ``r2`` rows repeat the comparison at a budget of rank 2 per layer (IncreLoRA's
"low-resource settings").

    nice -n 10 timeout 3000 .venv/bin/python bench/adaptive.py [--quick] [--steps 200] [--rows sora bayes_lora]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "smollm2"
TARGETS = ["q_proj", "v_proj"]
RANK = 8
LOW = 2  # the low-budget rows' rank (IncreLoRA's "low-resource settings")
STEPS = 40  # the default run's steps; another --steps gets its own results and section
COMMON = "lora α16 dropout"  # LoRA in the common recipe: what ALLoRA's paper argues against
FASTER = "lora lr×4"  # LoRA at the learning rate ALLoRA η4 gives a zero row


@dataclass
class Run:
    """One row: a method (and rules) with its options, and what to measure afterwards."""

    label: str
    method: str
    rank: int = RANK
    alpha: float | None = None  # None: alpha = rank (scale 1)
    lr_scale: float = 1.0  # times the run's learning rate
    options: dict[str, Any] = field(default_factory=dict)
    rules: tuple[str, ...] = ()
    rule_options: dict[str, Any] = field(default_factory=dict)
    reference: str = "lora"  # the plain-LoRA row at the same budget

    @property
    def family(self) -> str:
        """What ``--rows`` selects by: the label's first word ("increlora r2" → "increlora")."""
        return self.label.split()[0]


def runs(sara_fraction: float, steps: int) -> list[Run]:
    grow = {"init_rank": 1, "target_rank": RANK}  # the papers' schedule: the methods' defaults
    low = {"init_rank": 1, "target_rank": LOW}
    return [
        Run("lora", "lora"),
        Run("dylora", "dylora"),
        Run("sora", "sora"),  # the defaults: sparsity relative to the gate's step, gate_lr from steps
        Run("increlora", "increlora", rank=2 * RANK, options=grow),
        Run("triadapt", "triadapt", rank=2 * RANK, options=grow),
        Run("bayes_lora", "bayes_lora"),  # the defaults: prior 1e-4, gate logits at 300 × lr
        Run("sara", "sara", options={"fraction": sara_fraction}),  # the rule's default nuclear_weight
        Run("lora + allora", "lora", rules=("allora",)),
        # η is the rate multiplier of a zero row: η 4 starts B at 4x the learning rate, so LoRA
        # at 4x the learning rate is the row that tells the rule from a larger step
        Run("lora + allora η4", "lora", rules=("allora",), rule_options={"eta": 4.0}),
        Run(FASTER, "lora", lr_scale=4.0),
        Run("lora + ggpo", "lora", rules=("ggpo",)),
        Run(COMMON, "lora", alpha=2 * RANK, options={"dropout": 0.05}),
        # the papers' low-resource setting: a budget of LOW per layer
        Run(f"lora r{LOW}", "lora", rank=LOW, reference=f"lora r{LOW}"),
        Run(f"increlora r{LOW}", "increlora", rank=RANK, options=low, reference=f"lora r{LOW}"),
        Run(f"triadapt r{LOW}", "triadapt", rank=RANK, options=low, reference=f"lora r{LOW}"),
    ]


def lora_budget_fraction(model) -> float:
    """The share of the targeted weights that equals LoRA's rank-RANK parameter count."""
    from rankwise.adapters import resolve_targets

    plan = resolve_targets(model, TARGETS)
    modules = dict(model.named_modules())
    lora = weights = 0
    for path in plan:
        out, inp = modules[path].weight.shape
        lora += RANK * (out + inp)
        weights += out * inp
    return lora / weights


def evaluate(model, tokenizer, texts, args) -> float:
    from rankwise.data import perplexity

    model.eval()
    with torch.no_grad():
        return perplexity(model, tokenizer, texts, seq_len=args.seq_len, max_tokens=args.eval_tokens).perplexity


def heldout(model, tokenizer, args) -> float:
    """Perplexity on the held-out license texts (no row trains on them)."""
    from rankwise.data import heldout_texts

    return evaluate(model, tokenizer, list(heldout_texts()), args)


def claims(run: Run, model, tokenizer, texts, args) -> dict[str, Any]:
    """The method's own measurement on the trained, reloaded model."""
    from rankwise.adapters import adapted_layers

    adapters = [layer.adapters["default"] for layer in adapted_layers(model).values()]
    if run.label in ("dylora", "lora"):
        return {f"ppl_at_rank_{k}": truncated_ppl(run.method, model, k, tokenizer, texts, args) for k in (RANK // 2, RANK // 4)}
    if run.method == "sora":
        ranks = [a.active_rank for a in adapters]
        return {"rank_left": sum(ranks), "rank_start": run.rank * len(ranks), "min": min(ranks), "max": max(ranks)}
    if run.method in ("increlora", "triadapt"):
        ranks = [a.active_rank for a in adapters]
        budget = run.options.get("target_rank", RANK) * len(ranks)
        return {"total_rank": sum(ranks), "budget": budget, "start": len(ranks), "min": min(ranks), "max": max(ranks)}
    if run.method == "bayes_lora":
        chosen = [a.choices() for a in adapters]
        n = len(chosen)
        bits = [b for c in chosen for b in c[1:]]
        return {
            "mean_rank": sum(c[0] for c in chosen) / n, "mean_bits": sum(bits) / len(bits),
            "min_rank": min(c[0] for c in chosen), "max_rank": max(c[0] for c in chosen),
            "min_bits": min(bits), "max_bits": max(bits),
        }
    if run.method == "sara":
        ranks = [effective_rank(a.delta_weight()) for a in adapters]
        return {"trainable": sum(a.values.numel() for a in adapters), "update_effective_rank": sum(ranks) / len(ranks)}
    return {}


def in_use(model) -> int:
    """Parameters of the growing adapters' active components at the end."""
    from rankwise.adapters import adapted_layers

    return sum(layer.adapters["default"].parameters_in_use() for layer in adapted_layers(model).values())


def effective_rank(matrix: torch.Tensor, energy: float = 0.9) -> int:
    """Singular values needed for ``energy`` of the squared Frobenius norm."""
    s = torch.linalg.svdvals(matrix.float()).square()
    return int((s.cumsum(0) / s.sum() < energy).sum()) + 1


def truncated_ppl(method: str, model, k: int, tokenizer, texts, args) -> float:
    """Perplexity with every adapter cut to its first ``k`` components (DyLoRA: set_rank)."""
    from rankwise.adapters import adapted_layers
    from rankwise.adapters.methods.dylora import set_rank

    if method == "dylora":
        set_rank(model, k)
        return evaluate(model, tokenizer, texts, args)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            ad = layer.adapters["default"]
            ad.lora_B[:, k:] = 0  # plain LoRA keeps its first k components, scale unchanged
    return evaluate(model, tokenizer, texts, args)


def train_and_measure(run: Run, args, folder: Path, texts) -> dict[str, Any]:
    from rankwise.adapters import load_adapter
    from rankwise.adapters.finetune import FinetuneConfig, finetune
    from rankwise.models import load_model

    config = FinetuneConfig(
        model=MODEL, method=run.method, rank=run.rank, alpha=run.alpha, targets=TARGETS, method_options=run.options,
        rules=run.rules, rule_options=run.rule_options, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr * run.lr_scale, eval_tokens=0, seed=0, out=str(folder), overwrite=True,
    )
    t0 = time.perf_counter()
    result = finetune(config, progress=False)
    seconds = time.perf_counter() - t0
    model, tokenizer = load_model(MODEL)
    load_adapter(model, folder)
    row = {
        "label": run.label,
        "reference": run.reference,
        "trainable": in_use(model) if run.method in ("increlora", "triadapt") else result.trainable_parameters,
        "loss_first": sum(result.losses[:3]) / 3,
        "loss_last": sum(result.losses[-3:]) / 3,
        "ppl": evaluate(model, tokenizer, texts, args),
        "ppl_heldout": heldout(model, tokenizer, args),
        "seconds": seconds,
    }
    row.update(claims(run, model, tokenizer, texts, args))
    print(row, flush=True)
    return row


def claim_text(
    row: dict[str, Any], base: dict[str, Any], common: dict[str, Any] | None = None, faster: dict[str, Any] | None = None
) -> str:
    label, family = row["label"], row["label"].split()[0]
    if label != "lora" and row.get("reference") == label:
        return "plain LoRA at this budget: the reference of the rows below"
    if label in ("lora", "dylora"):
        k2, k4 = RANK // 2, RANK // 4
        return f"rank {k2}: ppl {row[f'ppl_at_rank_{k2}']:.2f}, rank {k4}: {row[f'ppl_at_rank_{k4}']:.2f}"
    if label == "sora":
        pruned = 1 - row["rank_left"] / row["rank_start"]
        spread = f", per layer {row['min']}–{row['max']}" if "min" in row else ""
        return f"rank left {row['rank_left']} of {row['rank_start']} ({pruned:.0%} pruned{spread}); ppl vs LoRA {row['ppl']:.2f} / {base['ppl']:.2f}"
    if family in ("increlora", "triadapt"):
        return (
            f"total rank {row['start']} → {row['total_rank']} (budget {row['budget']}), per layer "
            f"{row['min']}–{row['max']}; ppl vs LoRA {row['ppl']:.2f} / {base['ppl']:.2f}"
        )
    if label == "bayes_lora":
        spread = (
            f" (per layer {row['min_rank']}–{row['max_rank']}), bits per factor {row['min_bits']}–{row['max_bits']}"
            if "min_rank" in row else ""
        )
        return f"mean rank {row['mean_rank']:.1f} of {RANK}, mean bits {row['mean_bits']:.1f} of 32{spread}; ppl vs LoRA {row['ppl']:.2f} / {base['ppl']:.2f}"
    if label == "sara":
        return (
            f"{row['trainable']:,} smallest-magnitude weights (LoRA {base['trainable']:,}); update effective rank "
            f"{row['update_effective_rank']:.1f}; held-out ppl vs LoRA {_ppl(row.get('ppl_heldout'))} / {_ppl(base.get('ppl_heldout'))}"
        )
    if label == COMMON:
        return f"LoRA in the common recipe (scale 2, dropout 0.05), ALLoRA's baseline; ppl vs LoRA {row['ppl']:.2f} / {base['ppl']:.2f}"
    if label == FASTER:
        return f"LoRA at 4x the learning rate, what ALLoRA η4 gives a zero row; ppl vs LoRA {row['ppl']:.2f} / {base['ppl']:.2f}"
    if family == "lora" and "allora" in label and common is not None:
        return f"ppl {row['ppl']:.2f} vs LoRA {base['ppl']:.2f}, vs LoRA α16 dropout {common['ppl']:.2f}" + (
            f", vs LoRA lr×4 {faster['ppl']:.2f}" if "η4" in label and faster is not None else ""
        )
    return f"ppl {row['ppl']:.2f} vs LoRA {base['ppl']:.2f}"


def _ppl(value: float | None) -> str:
    """A perplexity for the table; "—" where results predate the measurement."""
    return "—" if value is None else f"{value:.2f}"


def results_name(steps: int, quick: bool) -> str:
    """The results file and docs section of a run: ``adaptive`` for the default steps."""
    return "adaptive" if quick or steps == STEPS else f"adaptive_steps{steps}"


def render(payload: dict[str, Any]) -> str:
    """The docs section for a results payload (``main`` and ``--render`` share it)."""
    rows, cfg = payload["rows"], payload["settings"]
    quick = payload["mode"] != "full"
    longer = "" if quick or cfg["steps"] == STEPS else f", {cfg['steps']} steps"
    flags = " --quick" if quick else f" --steps {cfg['steps']}" if longer else ""
    by_label = {r["label"]: r for r in rows}
    table = markdown_table(
        ["method", "trainable", "train loss first → last", "val ppl", "held-out ppl", "the method's claim, measured"],
        [
            [
                r["label"], f"{r['trainable']:,}", f"{r['loss_first']:.3f} → {r['loss_last']:.3f}", f"{r['ppl']:.2f}", _ppl(r.get("ppl_heldout")),
                claim_text(
                    r, by_label.get(r.get("reference", "lora"), rows[0]), by_label.get(COMMON), by_label.get(FASTER)
                ),
            ]
            for r in rows
        ],
    )
    return (
        f"### Adaptive-rank methods and training rules{longer}{' (--quick: a smoke run)' if quick else ''}\n\n"
        f"SmolLM2-135M, adapters on q_proj/v_proj, rank {RANK} (increlora/triadapt: rank 1 per "
        f"layer at the start, grown to LoRA's total rank, {RANK} per layer on average, at most "
        f"{2 * RANK} in one layer; their trainable count is the parameters in use at the end; the "
        f"`r{LOW}` rows: the same at a budget of rank {LOW} per layer, at most {RANK} in one layer), "
        f"{cfg['steps']} steps × {cfg['batch_size']} × {cfg['seq_len']} tokens, lr {cfg['lr']:g}, "
        f"seed 0; validation perplexity on {cfg['eval_tokens']} built-in validation tokens (base "
        f"model: {payload['base_ppl']:.2f}); held-out perplexity on {cfg['eval_tokens']} tokens of the license "
        f"texts, which no row trains on (base model: {_ppl(payload.get('base_ppl_heldout'))}). Rerun: `nice -n 10 timeout 3000 .venv/bin/python "
        f"bench/adaptive.py{flags}` (`--rows sora bayes_lora` reruns some rows "
        f"and lora, keeping the others).\n\n{table}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few short steps: a smoke run")
    parser.add_argument(
        "--rows", "--only", nargs="+", metavar="LABEL",
        help="run only these rows (lora, the reference, always runs) and merge them into the saved "
        "results of a run with the same settings",
    )
    parser.add_argument(
        "--steps", type=int, default=STEPS,
        help=f"training steps of every row (default {STEPS}); another number writes its own results and section",
    )
    parser.add_argument("--render", action="store_true", help="rewrite the docs section from its saved results")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.quick and args.steps != STEPS:
        parser.error("--quick runs its own 8 short steps; give --quick or --steps, not both")
    name = results_name(args.steps, args.quick)
    if args.render:
        payload = json.loads((Path(__file__).resolve().parent / "results" / f"{name}.json").read_text())
        payload = {k: v for k, v in payload.items() if k not in ("benchmark", "machine")}
        write_results(name, payload, render(payload))
        return
    args.batch_size, args.seq_len, args.eval_tokens = (2, 64, 2048) if args.quick else (2, 128, 4096)
    if args.quick:
        args.steps = 8
    args.lr = 1e-3
    from rankwise.data import load_corpus
    from rankwise.models import load_model

    texts = load_corpus("builtin").validation
    model, tokenizer = load_model(MODEL)
    base_ppl = evaluate(model, tokenizer, texts, args)
    base_ppl_heldout = heldout(model, tokenizer, args)
    every = runs(lora_budget_fraction(model), args.steps)
    selected = every
    if args.rows:
        unknown = sorted(set(args.rows) - {r.label for r in every} - {r.family for r in every})
        if unknown:
            parser.error(f"unknown row(s) {unknown}; rows: {[r.label for r in every]}")
        chosen = [r for r in every if r.label in args.rows or r.family in args.rows]
        references = {"lora"} | {r.reference for r in chosen}
        if any("allora" in r.rules for r in chosen):
            references |= {COMMON, FASTER}  # what ALLoRA's claim is measured against too
        selected = [r for r in every if r.label in references or r in chosen]
    del model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(selected):
            rows.append(train_and_measure(run, args, Path(tmp) / f"run{i}", texts))
    payload = {
        "mode": "quick" if args.quick else "full",
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "eval_tokens", "lr")},
        "base_ppl": base_ppl,
        "base_ppl_heldout": base_ppl_heldout,
        "rows": rows,
    }
    if args.rows:
        payload = merged(payload, [r.label for r in every], name)
    write_results(name, payload, render(payload))


def merged(payload: dict[str, Any], order: list[str], name: str) -> dict[str, Any]:
    """The saved results with ``payload``'s rows replacing theirs (rows in ``order``); only
    ``payload``'s rows when there are no saved results of the same mode and settings."""
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("mode") != payload["mode"] or saved.get("settings") != payload["settings"]:
        saved = {"rows": []}
        print(f"--rows: no saved {name} results with these settings; the table holds these rows alone")
    rows = {r["label"]: r for r in saved["rows"]}
    rows.update({r["label"]: r for r in payload["rows"]})
    return {**payload, "rows": [rows[label] for label in order if label in rows]}


if __name__ == "__main__":
    main()
