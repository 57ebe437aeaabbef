"""rankwise.analysis on SmolLM2-135M: spectrum of every linear layer (top-64 singular values).

Three ways to the same table, on the same loaded model, interleaved, median of ``--repeats``:

- rankwise ``spectrum(model, top_k=64)`` (default ``auto``: every SmolLM2 layer has
  min(M, N) <= 1024, so each gets its whole spectrum from the float64 Gram eigenvalues,
  batched over layers of one shape; all ranks exact);
- rankwise ``spectrum(model, top_k=64, method="randomized")`` (``rsvd`` top-64 per layer,
  tail completed from the remaining energy: the path used for layers above 1024);
- the dense peer: ``torch.linalg.svdvals`` on every layer (the whole spectrum, float32).

Accuracy against the dense peer: worst error of the top-64 singular values (relative to σ₁),
and of the effective rank and 90% energy rank.

Second table: ``intruder_dimensions`` of SmolLM2 against two synthetic "tuned" copies (not
trained: a stand-in for the two kinds of update the paper contrasts): every linear weight
plus small dense noise (1% of its entry scale: full fine-tuning's many small changes), and
every linear weight plus a random rank-4 update whose largest singular value is half the
weight's σ₁ (a LoRA-like low-rank update). Time and intruder counts (top 10, |cos| < 0.5).

Third table: ``nuclear_norm_score`` on ``--texts`` validation documents of the built-in
corpus (256 tokens each): the paper's L1,2 approximation against the exact SVD nuclear norm
of the same probability matrices (time of the norms alone; the forward passes are shared).

Writes bench/results/analysis.json and its section of docs/benchmarks.md (and prints the table).

``--lora-vs-full``: instead, the paper's comparison on real training: SmolLM2 tuned on the
built-in corpus's train split (``--batch`` blocks of ``--seq-len`` tokens a step — small, so a run fits a
shared 2-core machine: Adam's step size, not the batch, sets how fast ΔW grows — the same blocks in the same order) with each of
``--runs`` (``lora:RANK:LR`` — LoRA on every linear layer, alpha = 2·rank — or ``full:0:LR``;
AdamW, no weight decay), intruder dimensions of the tuned model against the base counted at each
of ``--checkpoints`` during the one training run (so one run gives the curve), with the update's
strength ‖ΔW‖₂/σ₁₀(W). Runs accumulate in bench/results/analysis_lora_vs_full.json across
invocations (``--fresh`` forgets them); the section of docs/benchmarks.md and the plot
docs/images/analysis-intruders-vs-steps.png are redrawn from all of them after every run.

``--intrinsic``: instead, the intrinsic-dimension curve (accuracy vs subspace dimension d, d_int90)
of a 64-64-10 MLP on scikit-learn's bundled digits, over ``--seeds``; plot
docs/images/analysis-intrinsic-digits.png. ``--gradients TEXTS``: instead, layer-wise gradient
spectra of the model on the built-in corpus vs the license texts of /usr/share/common-licenses;
plot docs/images/analysis-gradients.png.

Run: .venv/bin/python bench/analysis.py [--quick]
     .venv/bin/python bench/analysis.py --lora-vs-full --runs lora:1:1e-2 --checkpoints 25,50,100,200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its pools

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_results  # noqa: E402

from rankwise.analysis import intruder_dimensions, nuclear_norm_score, spectrum  # noqa: E402
from rankwise.analysis.nuclear_norm import l12_nuclear_norm  # noqa: E402
from rankwise.data import load_corpus  # noqa: E402
from rankwise.linalg import effective_rank, energy_rank, nuclear_norm  # noqa: E402
from rankwise.models import load_model  # noqa: E402


def dense_svdvals(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The peer: torch.linalg.svdvals on each layer's weight (float32, whole spectrum)."""
    return {n: torch.linalg.svdvals(model.get_submodule(n).weight.detach().float()) for n in names}


def accuracy(result, dense: dict[str, torch.Tensor]) -> dict:
    """Worst-case differences of a spectrum() result against the dense singular values."""
    sv_err, eff_err, energy_over, energy_under = 0.0, 0.0, 0, 0
    for layer in result.layers:
        S = dense[layer.name].double()
        k = len(layer.singular_values)
        sv_err = max(sv_err, float(((torch.tensor(layer.singular_values, dtype=torch.float64) - S[:k]).abs() / S[0]).max()))
        eff = float(effective_rank(torch.diag(S)))
        eff_err = max(eff_err, abs(layer.effective_rank - eff) / eff)
        er = int(energy_rank(S, energy=0.9))
        energy_over = max(energy_over, layer.energy_rank - er)
        energy_under = max(energy_under, er - layer.energy_rank)
    return {
        "top_k_max_error_rel_sigma1": sv_err,
        "effective_rank_max_rel_diff": eff_err,
        "energy_rank_max_over": energy_over,
        "energy_rank_max_under": energy_under,
    }


@torch.no_grad()
def tuned_copies(model, names: list[str], seed: int = 0) -> dict:
    """Two synthetic tuned copies: dense small noise, and a rank-4 update of 0.5 σ₁ per layer."""
    import copy

    g = torch.Generator().manual_seed(seed)
    dense, lowrank = copy.deepcopy(model), copy.deepcopy(model)
    for name in names:
        w = model.get_submodule(name).weight
        m, n = w.shape
        dense.get_submodule(name).weight += 0.01 * w.std() * torch.randn(m, n, generator=g)
        update = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
        scale = 0.5 * torch.linalg.matrix_norm(w, 2) / torch.linalg.matrix_norm(update, 2)
        lowrank.get_submodule(name).weight += scale * update
    return {"dense noise (full-FT-like)": dense, "rank-4 update (LoRA-like)": lowrank}


def intruder_table(model, names: list[str]) -> tuple[str, dict]:
    rows, data = [], {}
    for label, tuned in tuned_copies(model, names).items():
        t0 = time.perf_counter()
        result = intruder_dimensions(model, tuned)
        seconds = time.perf_counter() - t0
        layers_hit = sum(layer.count > 0 for layer in result.layers)
        rows.append([label, f"{seconds:.1f} s", result.total, f"{layers_hit} of {len(result.layers)}"])
        data[label] = {"seconds": seconds, "total": result.total, "layers_with_intruders": layers_hit}
        del tuned
    table = markdown_table(["SmolLM2 vs", "intruder_dimensions time", "intruder dimensions", "layers with intruders"], rows)
    return table, data


@torch.no_grad()
def probability_matrices(model, tokenizer, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    """The (L, V) next-token probability matrices nuclear_norm_score scores, for timing the norms."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
        out.append(torch.softmax(model(input_ids=ids).logits[0].float(), -1))
    return out


RUN_DEFAULT = "lora:1:1e-2,lora:8:1e-3,full:0:1e-5"
THRESHOLDS = (0.5, 0.7, 0.9)  # the headline (the detector's default) and two of the paper's sweep


def parse_runs(spec: str) -> list[tuple[str, int, float]]:
    """``"lora:RANK:LR,full:0:LR"`` -> ``[(method, rank, lr), ...]``."""
    runs = []
    for item in spec.split(","):
        method, rank, lr = item.strip().split(":")
        if method not in ("lora", "full"):
            raise SystemExit(f"--runs: method must be lora or full, got {method!r}")
        runs.append((method, int(rank), float(lr)))
    return runs


def run_label(method: str, rank: int, lr: float) -> str:
    return f"LoRA r{rank} lr {lr:g}" if method == "lora" else f"full FT lr {lr:g}"


def train(model, params, blocks: torch.Tensor, lr: float, *, batch: int = 4, steps: int, on_step=None) -> list[float]:
    """Plain AdamW steps on ``blocks`` (one pass, ``batch`` blocks a step); returns the losses.
    ``on_step(step, losses)`` is called after every step (for checkpoints)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    for step in range(1, steps + 1):
        i = (step - 1) * batch
        ids = blocks[i : i + batch]
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            model.eval()
            on_step(step, losses)
    model.eval()
    return losses


@torch.no_grad()
def update_strength(model, tuned, sigma10: dict[str, float]) -> list[float]:
    """Per layer: ‖ΔW‖₂ / σ₁₀(W) — how strong the update is against the base's 10th singular
    value (an update this weak cannot put a new vector into the top 10)."""
    from rankwise.analysis._layers import matched_weights

    before, after = matched_weights(model, tuned, None)
    out = []
    g = torch.Generator().manual_seed(0)
    for name, w in before.items():
        delta = (after[name] - w).double()
        v = torch.randn(delta.shape[1], 1, generator=g, dtype=torch.float64)
        for _ in range(60):  # power iteration: ‖ΔW‖₂ to well under 1% (a diagnostic, not a result)
            v = delta.T @ (delta @ v)
            v /= v.norm().clamp_min(1e-300)
        out.append(float((delta @ v).norm()) / sigma10[name])
    return out


def checkpoint_row(model, tuned, sigma10: dict[str, float], step: int, losses: list[float]) -> dict:
    """Intruder dimensions of ``tuned`` against ``model`` at this step, at several thresholds."""
    t0 = time.perf_counter()
    result = intruder_dimensions(model, tuned)  # the detector's defaults: top 10, |cos| < 0.5
    seconds = time.perf_counter() - t0
    counts = {}
    for eps in THRESHOLDS:
        counts[f"{eps:g}"] = sum(
            sum(c < eps and s > 0 for c, s in zip(layer.max_cosine, layer.singular_values, strict=True))
            for layer in result.layers
        )
    assert counts["0.5"] == result.total  # the sweep re-reads the same cosines
    strength = sorted(update_strength(model, tuned, sigma10))
    return {
        "step": step,
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "intruders": result.total,
        "intruders_by_threshold": counts,
        "layers_with_intruders": sum(layer.count > 0 for layer in result.layers),
        "layers": len(result.layers),
        "min_max_cosine": min(min(layer.max_cosine) for layer in result.layers),
        "update_over_sigma10_median": strength[len(strength) // 2],
        "update_over_sigma10_max": strength[-1],
        "detection_s": seconds,
        "counts": {k: v for k, v in result.counts().items() if v},
    }


def one_run(model, blocks, method: str, rank: int, lr: float, checkpoints: list[int], sigma10, save, batch: int) -> dict:
    """Train one copy of ``model`` and detect intruders at every checkpoint step; ``save(run)``
    records the run so far after each checkpoint (a run cut short keeps its first checkpoints)."""
    import copy

    from rankwise.adapters import attach

    torch.manual_seed(0)
    tuned = copy.deepcopy(model)
    if method == "lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        attach(tuned, "lora", targets=targets, rank=rank, alpha=2 * rank)  # alpha = 2r: scale 2
        params = [p for n, p in tuned.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(tuned.parameters())
    rows: list[dict] = []
    t_train = [0.0, time.perf_counter()]
    run = {"method": method, "rank": rank, "lr": lr, "batch": batch, "loss_first5": None, "train_s": 0.0, "checkpoints": rows}

    def on_step(step: int, losses: list[float]) -> None:
        if step in checkpoints:
            t_train[0] += time.perf_counter() - t_train[1]
            rows.append(checkpoint_row(model, tuned, sigma10, step, losses))
            r = rows[-1]
            print(f"  step {step}: loss {r['loss_last5']:.3f}, intruders {r['intruders_by_threshold']}, "
                  f"‖ΔW‖₂/σ₁₀ median {r['update_over_sigma10_median']:.3f} max {r['update_over_sigma10_max']:.3f}",
                  flush=True)
            run["loss_first5"], run["train_s"] = sum(losses[:5]) / len(losses[:5]), t_train[0]
            save(run)
            t_train[1] = time.perf_counter()

    train(tuned, params, blocks, lr, batch=batch, steps=max(checkpoints), on_step=on_step)
    return run

LVF_NAME = "analysis_lora_vs_full"
PLOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "analysis-intruders-vs-steps.png"


def previous_runs(fresh: bool) -> dict:
    """Runs recorded by earlier invocations (each run is its own invocation: <= 20 min each)."""
    path = Path(__file__).resolve().parent / "results" / f"{LVF_NAME}.json"
    if fresh or not path.exists():
        return {}
    old = json.loads(path.read_text()).get("runs", {})
    return {k: v for k, v in old.items() if "checkpoints" in v}


def lora_vs_full_markdown(runs: dict, recipe: str, model: str) -> str:
    rows = []
    for label, r in runs.items():
        for c in r["checkpoints"]:
            t = c["intruders_by_threshold"]
            rows.append([
                label, c["step"], f"{c['loss_last5']:.3f}", c["intruders"], f"{c['layers_with_intruders']} of {c['layers']}",
                t["0.7"], t["0.9"], f"{c['min_max_cosine']:.2f}",
                f"{c['update_over_sigma10_median']:.3f} / {c['update_over_sigma10_max']:.3f}",
            ])
    table = markdown_table(
        [f"{model} tuned with", "step", "train loss (last 5)", "intruders (ε 0.5)", "layers with intruders",
         "intruders ε 0.7", "intruders ε 0.9", "lowest max \\|cos\\|", "‖ΔW‖₂/σ₁₀(W) median / max"],
        rows,
    )
    return table + "\n\n" + recipe


def lora_vs_full_plot(runs: dict) -> None:
    """Intruders (ε 0.5 and 0.9) and update strength against training steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.7))
    for label, r in runs.items():
        steps = [c["step"] for c in r["checkpoints"]]
        style = "-o" if r["method"] == "lora" else "--s"
        axes[0].plot(steps, [c["intruders"] for c in r["checkpoints"]], style, label=label)
        axes[1].plot(steps, [c["intruders_by_threshold"]["0.9"] for c in r["checkpoints"]], style, label=label)
        strength = [c["update_over_sigma10_median"] for c in r["checkpoints"]]
        axes[2].semilogy(steps, strength, style, label=label)
        axes[3].plot(strength, [c["intruders"] for c in r["checkpoints"]], style, label=label)
    axes[0].set_title("intruder dimensions (ε = 0.5, the default)", fontsize=9)
    axes[1].set_title("intruder dimensions (ε = 0.9)", fontsize=9)
    axes[2].set_title("median over layers of ‖ΔW‖₂ / σ₁₀(W)", fontsize=9)
    axes[3].set_title("intruders (ε = 0.5) against the update's size", fontsize=9)
    for ax in axes[:3]:
        ax.set_xlabel("training steps")
    axes[3].set_xlabel("median ‖ΔW‖₂ / σ₁₀(W)")
    axes[0].set_ylabel("count over all linear layers (top 10 each)")
    axes[3].legend(fontsize=7)
    fig.suptitle("LoRA vs full fine-tuning on the built-in corpus (bench/analysis.py --lora-vs-full)", fontsize=10)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=90)
    plt.close(fig)


def lora_vs_full(model, tokenizer, runs: list[tuple[str, int, float]], checkpoints: list[int], fresh: bool, model_name: str, batch: int, seq_len: int) -> None:
    """The paper's comparison on real training runs, intruders counted at each checkpoint."""
    from rankwise.data import token_blocks

    steps = max(checkpoints)
    blocks = token_blocks(tokenizer, load_corpus("builtin").train, seq_len=seq_len, max_tokens=seq_len * (batch * steps + 1))
    if len(blocks) < batch * steps:
        raise SystemExit(f"the built-in corpus has {len(blocks)} blocks of {seq_len} tokens: at most {len(blocks) // batch} steps")
    sigma10 = {layer.name: layer.singular_values[9] for layer in spectrum(model, top_k=10).layers}
    done = previous_runs(fresh)
    recipe = (
        "Intruders: of the top 10 left singular vectors of each tuned weight, those whose max |cos| with every "
        "base singular vector is below ε (`intruder_dimensions` defaults: ε 0.5, top 10; ε 0.7/0.9 from the same "
        f"cosines, as in the paper's ε sweep). Built-in corpus train split, seq {seq_len}, batch {batch}, the same blocks in "
        "the same order for every run, AdamW (no weight decay), LoRA on all 7 linear kinds with alpha = 2·rank. "
        "‖ΔW‖₂/σ₁₀(W): the update's largest singular value against the base weight's 10th — an update far "
        "below 1 cannot create a new top-10 direction. Each run is one training with detection at its "
        "checkpoints (`bench/analysis.py --lora-vs-full --runs lora:1:1e-2 --checkpoints 10,25,50,100`)."
    )
    table = ""

    def save(label: str, run: dict) -> None:
        nonlocal table
        done.update(previous_runs(fresh=False))  # runs another invocation recorded meanwhile
        done[label] = run
        print("RUN " + json.dumps({label: run}), flush=True)  # the raw numbers in the log as well
        table = lora_vs_full_markdown(done, recipe, model_name)
        write_results(LVF_NAME, {"runs": done, "markdown": table}, table)
        lora_vs_full_plot(done)

    for method, rank, lr in runs:
        label = run_label(method, rank, lr)
        print(f"{label}: {steps} steps, checkpoints {checkpoints}", flush=True)
        one_run(model, blocks, method, rank, lr, checkpoints, sigma10, lambda run, label=label: save(label, run), batch)
    print(table)


IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def save_png(b64: str, name: str) -> Path:
    """Write a base64 PNG (from rankwise.analysis.report's plot helpers) into docs/images."""
    import base64

    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / name
    path.write_bytes(base64.b64decode(b64))
    return path


def digits_task(seed: int):
    """scikit-learn's bundled 8x8 digits (1797 images, no download): a 64-64-10 MLP, trained
    full-batch on 1437 images, scored by accuracy on the other 360 (a small MNIST)."""
    from sklearn.datasets import load_digits
    from torch import nn

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def loss(m):
        return torch.nn.functional.cross_entropy(m(X[train]), y[train])

    def accuracy(m):
        return float((m(X[test]).argmax(-1) == y[test]).float().mean())

    return model, loss, accuracy


def intrinsic_bench(seeds: int, steps: int) -> None:
    """d_int90 of the digits MLP (the paper's MNIST experiment, small): curve + table + plot."""
    from rankwise.analysis import intrinsic_dimension
    from rankwise.analysis.report import intrinsic_plot

    dims = [5, 10, 20, 40, 80, 160, 320, 640]
    results = []
    t0 = time.perf_counter()
    for seed in range(seeds):
        model, loss, accuracy = digits_task(seed)
        results.append(intrinsic_dimension(model, loss, accuracy, dims, steps=steps, lr=1e-2, seed=seed))
        r = results[-1]
        print(f"seed {seed}: baseline {r.baseline:.3f}, d_int90 {r.intrinsic_dimension}, "
              + " ".join(f"{d}:{m:.3f}" for d, m in zip(r.dims, r.metrics, strict=True)), flush=True)
    seconds = time.perf_counter() - t0
    rows = []
    for i, d in enumerate(dims):
        accs = [r.metrics[i] for r in results]
        fr = [r.metrics[i] / r.baseline for r in results]
        rows.append([d, f"{sum(accs) / len(accs):.3f}", f"{min(accs):.3f}-{max(accs):.3f}", f"{sum(fr) / len(fr):.1%}"])
    base = [r.baseline for r in results]
    rows.append([f"all {results[0].parameters:,} (normal training)", f"{sum(base) / len(base):.3f}", f"{min(base):.3f}-{max(base):.3f}", "100%"])
    found = [r.intrinsic_dimension for r in results]
    table = markdown_table(["subspace dimension d", "test accuracy (mean)", "range over seeds", "of normal training"], rows)
    table += (
        f"\n\nIntrinsic dimension (Li et al. 2018) of scikit-learn's 8x8 digits with a 64-64-10 MLP "
        f"(D = {results[0].parameters:,}): d_int90 = {found} over {seeds} seeds (dense Gaussian P, unit columns; "
        f"full-batch Adam lr 1e-2, {steps} steps for every d and for normal training; 1437 train / 360 test "
        f"images). {seconds:.0f} s in all."
    )
    png = intrinsic_plot(results[0], f"Digits MLP (D = {results[0].parameters:,}): accuracy in a random d-dim subspace, seed 0")
    save_png(png, "analysis-intrinsic-digits.png")
    write_results("analysis_intrinsic", {"dims": dims, "results": [r.to_dict() for r in results], "seconds": seconds, "markdown": table}, table)
    print(table)


def gradients_bench(model, tokenizer, texts: int, tokens: int, model_name: str) -> None:
    """Layer-wise gradient spectra of the built-in corpus vs the Debian license texts."""
    from rankwise.analysis.gradients import GRADIENT_SOURCES, gradient_datasets, gradient_spectra
    from rankwise.analysis.report import gradient_plot, gradient_rows

    t0 = time.perf_counter()
    blocks = gradient_datasets(list(GRADIENT_SOURCES), tokenizer, count=texts, tokens=tokens)
    grads = gradient_spectra(model, tokenizer, blocks, max_tokens=tokens)
    seconds = time.perf_counter() - t0
    rows = []
    for r in gradient_rows(grads):
        rows.append([r["kind"], r["layers"]] + [f"{r[f'{d} {m}']:.3g}" for m in ("nuclear norm", "effective rank") for d in grads.datasets])
    header = ["layer kind", "layers"] + [f"{d}: {m}" for m in ("nuclear norm", "effective rank") for d in grads.datasets]
    table = markdown_table(header, rows)
    table += (
        f"\n\n{model_name}: mean over blocks of the per-layer gradient nuclear norm and effective rank, "
        f"{texts} texts of exactly {tokens} tokens per dataset (evenly spaced blocks of the built-in corpus's "
        f"validation split, and of /usr/share/common-licenses); mean loss "
        + ", ".join(f"{d} {grads.loss[d]:.3f}" for d in grads.datasets) + f". {seconds:.0f} s."
    )
    save_png(gradient_plot(grads), "analysis-gradients.png")
    write_results("analysis_gradients", {"texts": texts, "tokens": tokens, "loss": grads.loss, "by_kind": gradient_rows(grads), "seconds": seconds, "markdown": table}, table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--texts", type=int, default=8, help="documents for the nuclear-norm table")
    parser.add_argument("--lora-vs-full", action="store_true", help="run the LoRA vs full fine-tuning comparison instead")
    parser.add_argument("--runs", default=RUN_DEFAULT, help="with --lora-vs-full: method:rank:lr,... (full:0:LR for full fine-tuning)")
    parser.add_argument("--checkpoints", default="10,25,50,100", help="with --lora-vs-full: steps at which intruders are counted")
    parser.add_argument("--batch", type=int, default=1, help="with --lora-vs-full: blocks per step")
    parser.add_argument("--seq-len", type=int, default=64, help="with --lora-vs-full: tokens per block")
    parser.add_argument("--fresh", action="store_true", help="with --lora-vs-full: forget runs recorded by earlier invocations")
    parser.add_argument("--intrinsic", action="store_true", help="run the intrinsic-dimension curve on the digits task instead")
    parser.add_argument("--seeds", type=int, default=3, help="with --intrinsic: seeds (model init and projections)")
    parser.add_argument("--steps", type=int, default=500, help="with --intrinsic: Adam steps per dimension")
    parser.add_argument("--gradients", type=int, default=0, metavar="TEXTS", help="run the gradient spectra (built-in vs licenses) with TEXTS per dataset instead")
    parser.add_argument("--gradient-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats

    if args.intrinsic:
        intrinsic_bench(1 if args.quick else args.seeds, 150 if args.quick else args.steps)
        return
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    if args.gradients:
        gradients_bench(model, tokenizer, args.gradients, args.gradient_tokens, args.model)
        return
    if args.lora_vs_full:
        checkpoints = sorted({int(s) for s in args.checkpoints.split(",")})
        lora_vs_full(model, tokenizer, parse_runs(args.runs), checkpoints, args.fresh, args.model, args.batch, args.seq_len)
        return
    out: dict = {}
    names = [layer.name for layer in spectrum(model, top_k=1, exact_below=0).layers]
    runs = {
        "rankwise auto (exact, Gram eigenvalues)": lambda: out.__setitem__("auto", spectrum(model, top_k=64)),
        "rankwise randomized (rsvd top-64)": lambda: out.__setitem__("randomized", spectrum(model, top_k=64, method="randomized")),
        "torch.linalg.svdvals per layer": lambda: out.__setitem__("dense", dense_svdvals(model, names)),
    }
    times = interleaved(runs, repeats=repeats)
    dense_s = times["torch.linalg.svdvals per layer"]
    acc = {"auto": accuracy(out["auto"], out["dense"]), "randomized": accuracy(out["randomized"], out["dense"])}
    rows = []
    for (label, t), key in zip(times.items(), ["auto", "randomized", None], strict=True):
        a = acc.get(key) if key else None
        rows.append([
            label, f"{t:.2f} s", f"{dense_s / t:.1f}x",
            f"{a['top_k_max_error_rel_sigma1']:.1e}" if a else "reference",
            f"{a['effective_rank_max_rel_diff']:.2%}" if a else "",
            f"+{a['energy_rank_max_over']} / -{a['energy_rank_max_under']}" if a else "",
        ])
    table = markdown_table(
        ["spectrum of every linear layer", "time (median)", "vs dense", "top-64 error (of σ₁)", "effective rank error", "energy rank (90%) error"],
        rows,
    )
    table += (
        f"\n\n{args.model}: {len(names)} linear layers (the tied output head is the embedding and is "
        f"skipped). Median of {repeats} interleaved runs; model load {load_s:.1f} s."
    )
    intr_table, intr_data = intruder_table(model, names)
    table += "\n\n" + intr_table
    texts = [t for t in load_corpus("builtin").validation if len(t) > 2000][: args.texts]
    nn_result = nuclear_norm_score(model, tokenizer, texts, max_tokens=256, exact=True)
    rel = [abs(t.approx - t.exact) / t.exact for t in nn_result.texts]
    mats = probability_matrices(model, tokenizer, texts, 256)
    nn_times = interleaved(
        {"exact": lambda: [nuclear_norm(A) for A in mats], "approx": lambda: [l12_nuclear_norm(A) for A in mats]},
        repeats=repeats,
    )
    nn_table = markdown_table(
        ["Matrix Nuclear-Norm", "score (mean ‖A‖_*/L)", "time of the norms (median)", "speed-up"],
        [
            ["exact (SVD, rankwise.linalg.nuclear_norm)", f"{nn_result.exact_score:.4f}", f"{nn_times['exact']:.3f} s", "1.0x"],
            ["L1,2 approximation (paper)", f"{nn_result.score:.4f}", f"{nn_times['approx']:.4f} s",
             f"{nn_times['exact'] / max(nn_times['approx'], 1e-9):.0f}x"],
        ],
    )
    nn_table += (
        f"\n\n{len(texts)} built-in validation documents, 256 tokens each, vocabulary {len(tokenizer)}; "
        f"per-text relative difference approx vs exact: median {sorted(rel)[len(rel) // 2]:.1%}, max {max(rel):.1%}."
    )
    table += "\n\n" + nn_table
    payload = {
        "model": args.model,
        "repeats": repeats,
        "layers": len(names),
        "seconds": times,
        "accuracy": acc,
        "load_seconds": load_s,
        "nuclear_norm": nn_result.to_dict() | {"seconds_median": nn_times},
        "intruders": intr_data,
        "markdown": table,
    }
    write_results("analysis", payload, table)
    print(table)


if __name__ == "__main__":
    main()
