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

Second table: ``nuclear_norm_score`` on ``--texts`` validation documents of the built-in
corpus (256 tokens each): the paper's L1,2 approximation against the exact SVD nuclear norm
of the same probability matrices (time of the norms alone; the forward passes are shared).

Writes bench/results/analysis.json and prints the markdown table (docs/benchmarks.md is
edited by hand from it).

Run: .venv/bin/python bench/analysis.py [--quick]
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
from _common import RESULTS, interleaved, machine, markdown_table  # noqa: E402

from rankwise.analysis import nuclear_norm_score, spectrum  # noqa: E402
from rankwise.data import load_corpus  # noqa: E402
from rankwise.linalg import effective_rank, energy_rank  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--texts", type=int, default=8, help="documents for the nuclear-norm table")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
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
    texts = [t for t in load_corpus("builtin").validation if len(t) > 2000][: args.texts]
    nn_result = nuclear_norm_score(model, tokenizer, texts, max_tokens=256, exact=True)
    rel = [abs(t.approx - t.exact) / t.exact for t in nn_result.texts]
    nn_table = markdown_table(
        ["Matrix Nuclear-Norm", "score (mean ‖A‖_*/L)", "time of the norms", "speed-up"],
        [
            ["exact (SVD)", f"{nn_result.exact_score:.4f}", f"{nn_result.seconds_exact:.3f} s", "1.0x"],
            ["L1,2 approximation (paper)", f"{nn_result.score:.4f}", f"{nn_result.seconds_approx:.4f} s",
             f"{nn_result.seconds_exact / max(nn_result.seconds_approx, 1e-9):.0f}x"],
        ],
    )
    nn_table += (
        f"\n\n{len(texts)} built-in validation documents, 256 tokens each, vocabulary {nn_result.texts[0] and len(tokenizer)}; "
        f"per-text relative difference approx vs exact: median {sorted(rel)[len(rel) // 2]:.1%}, max {max(rel):.1%}."
    )
    table += "\n\n" + nn_table
    payload = {
        "benchmark": "analysis",
        "machine": machine(),
        "model": args.model,
        "repeats": repeats,
        "layers": len(names),
        "seconds": times,
        "accuracy": acc,
        "load_seconds": load_s,
        "nuclear_norm": nn_result.to_dict(),
        "markdown": table,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "analysis.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
