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

``--lora-vs-full STEPS``: instead, the paper's comparison on real training: SmolLM2 tuned on
the built-in corpus's train split (seq 128, batch 4, the same blocks in the same order) once
with LoRA (rank 8 on every linear layer, AdamW lr 1e-3) and once fully (AdamW lr 1e-5), then
intruder dimensions of each against the base. Writes bench/results/analysis_lora_vs_full.json and its docs/benchmarks.md section.

Run: .venv/bin/python bench/analysis.py [--quick] [--lora-vs-full 100]
"""

from __future__ import annotations

import argparse
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


def train(model, params, blocks: torch.Tensor, lr: float, batch: int = 4) -> list[float]:
    """Plain AdamW steps on ``blocks`` (one pass, ``batch`` blocks a step); returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for i in range(0, len(blocks) - batch + 1, batch):
        ids = blocks[i : i + batch]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def lora_vs_full(model, tokenizer, steps: int) -> None:
    """The paper's comparison on real (short) training runs; see the module docstring."""
    import copy

    from rankwise.adapters import attach
    from rankwise.data import token_blocks

    blocks = token_blocks(tokenizer, load_corpus("builtin").train, seq_len=128, max_tokens=128 * 4 * steps)
    rows, data = [], {}
    for label, lr in (("LoRA rank 8 (lr 1e-3)", 1e-3), ("full fine-tuning (lr 1e-5)", 1e-5)):
        tuned = copy.deepcopy(model)
        if label.startswith("LoRA"):
            attach(tuned, "lora", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=8, alpha=16)
            params = [p for n, p in tuned.named_parameters() if "lora_" in n]
            for p in params:
                p.requires_grad_(True)
        else:
            params = list(tuned.parameters())
        t0 = time.perf_counter()
        losses = train(tuned, params, blocks, lr)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = intruder_dimensions(model, tuned)
        intr_s = time.perf_counter() - t0
        hit = sum(layer.count > 0 for layer in result.layers)
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        rows.append([label, len(losses), f"{first:.3f} -> {last:.3f}", f"{train_s:.0f} s", result.total, f"{hit} of {len(result.layers)}", f"{intr_s:.1f} s"])
        data[label] = {"steps": len(losses), "loss_first5": first, "loss_last5": last, "train_s": train_s,
                       "intruders": result.total, "layers_with_intruders": hit, "intruders_s": intr_s, "counts": result.counts()}
        del tuned
    table = markdown_table(["SmolLM2 tuned with", "steps", "train loss (first 5 -> last 5)", "train time", "intruder dimensions", "layers with intruders", "detection time"], rows)
    table += "\n\nIntruders: top 10 left singular vectors of each tuned weight, max |cos| with every base singular vector < 0.5. Built-in corpus train split, seq 128, batch 4, same blocks for both."
    write_results("analysis_lora_vs_full", {"results": data, "markdown": table}, table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--texts", type=int, default=8, help="documents for the nuclear-norm table")
    parser.add_argument("--lora-vs-full", type=int, default=0, metavar="STEPS", help="run the LoRA vs full fine-tuning comparison instead")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    if args.lora_vs_full:
        lora_vs_full(model, tokenizer, args.lora_vs_full)
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
