"""Matrix completion: rankwise.linalg.complete_altmin vs a dense SoftImpute reference.

Problem: an m x n rank-10 matrix ``A B^T`` (Gaussian factors, float64) with a uniformly
random fraction of entries observed. Every method runs in its own subprocess (so peak
memory is its own: max RSS during the solve minus RSS before it), the runs are
interleaved across repeats, and we report median time, the relative Frobenius error on
ALL entries (computed blockwise from the factors, never forming the dense ground truth
in rankwise's run) and the peak-memory increase.

The peer is a dense iterative-SVD method: SoftImpute (Mazumder, Hastie, Tibshirani, 2010)
with a rank cap, a geometrically decreasing shrinkage and ``torch.svd_lowrank`` for the
truncated SVD of the dense filled-in matrix at every iteration. fancyimpute's SoftImpute
could not be used: it installs with ``--no-deps`` but its package import needs cvxpy.

    .venv/bin/python bench/completion.py            # 5000 x 5000, 2% observed
    .venv/bin/python bench/completion.py --quick    # 1000 x 1000, 8% observed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RANK = 10


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _problem(m: int, n: int, frac: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, RANK, generator=g, dtype=torch.float64)
    B = torch.randn(n, RANK, generator=g, dtype=torch.float64)
    nobs = int(frac * m * n)
    # distinct random positions without an m*n-sized permutation (keeps the base RSS small)
    keys = torch.unique(torch.randint(0, m * n, (int(nobs * 1.1) + 16,), generator=g))
    idx = keys[torch.randperm(keys.numel(), generator=g)[:nobs]]
    rows, cols = idx // n, idx % n
    vals = (A[rows] * B[cols]).sum(-1)
    return A, B, rows, cols, vals


def _rel_error(A, B, U, V, block: int = 512) -> float:
    """``||U V^T - A B^T||_F / ||A B^T||_F`` in row blocks (no dense m x n matrix)."""
    num = den = 0.0
    for s in range(0, A.shape[0], block):
        truth = A[s : s + block] @ B.T
        num += float((U[s : s + block] @ V.T - truth).square().sum())
        den += float(truth.square().sum())
    return (num / den) ** 0.5


def _soft_impute(rows, cols, vals, m, n, *, max_iter, tol, time_budget):
    """Dense SoftImpute with rank cap RANK; returns factors (U * S, V) and iterations run."""
    observed = torch.zeros(m, n, dtype=vals.dtype)
    observed[rows, cols] = vals
    mask = torch.zeros(m, n, dtype=torch.bool)
    mask[rows, cols] = True
    Z = torch.zeros(m, n, dtype=vals.dtype)
    lam = None
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    it = 0
    for _ in range(max_iter):
        it += 1
        X = torch.where(mask, observed, Z)  # fill unobserved entries with the estimate
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        U, S, V = torch.svd_lowrank(X, q=RANK + 5, niter=2)
        U, S, V = U[:, :RANK], S[:RANK], V[:, :RANK]
        lam = 0.5 * float(S[0]) if lam is None else lam * 0.7
        S = (S - lam).clamp_min(0.0)
        Z_new = (U * S) @ V.T
        change = float((Z_new - Z).norm()) / max(float(Z_new.norm()), 1e-300)
        Z = Z_new
        if change < tol or time.perf_counter() - t0 > time_budget:
            break
    return U * S, V, it


def worker(method: str, m: int, n: int, frac: float, seed: int, budget: float) -> dict:
    from rankwise.linalg.completion import complete_altmin

    A, B, rows, cols, vals = _problem(m, n, frac, seed)
    base = _rss_mb()
    t0 = time.perf_counter()
    if method == "rankwise":
        res = complete_altmin(
            rows, cols, vals, (m, n), RANK, tol=1e-8, generator=torch.Generator().manual_seed(1)
        )
        U, V, iters = res.U, res.V, res.n_iter
    else:
        U, V, iters = _soft_impute(
            rows, cols, vals, m, n, max_iter=1000, tol=1e-9, time_budget=budget
        )
    elapsed = time.perf_counter() - t0
    peak = _peak_mb()
    return {
        "method": method,
        "seconds": elapsed,
        "iterations": iters,
        "rel_error": _rel_error(A, B, U, V),
        "peak_mb_over_base": max(peak - base, 0.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per method (default 1: on a shared, oversubscribed 2-core "
        "machine multi-threaded sparse kernels mostly measure scheduler noise)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--frac", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        out = worker(args.worker, args.size, args.size, args.frac, 0, args.budget)
        print(json.dumps(out))
        return

    size, frac = (1000, 0.08) if args.quick else (5000, 0.02)
    repeats = args.repeats or (2 if args.quick else 1)
    budget = 8.0 if args.quick else 240.0  # SoftImpute wall-time cap per run
    runs: dict[str, list[dict]] = {"rankwise": [], "softimpute": []}
    for _ in range(repeats):  # interleaved: drift on a shared machine hits both alike
        for method in runs:
            cmd = [sys.executable, __file__, "--worker", method, "--size", str(size)]
            cmd += ["--frac", str(frac), "--budget", str(budget), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))

    from _common import markdown_table, write_results

    summary = {}
    for method, rs in runs.items():
        summary[method] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "rel_error": statistics.median(r["rel_error"] for r in rs),
            "peak_mb_over_base": statistics.median(r["peak_mb_over_base"] for r in rs),
            "iterations": statistics.median(r["iterations"] for r in rs),
        }
    rw, si = summary["rankwise"], summary["softimpute"]
    speedup = si["seconds"] / rw["seconds"]
    header = ["method", "time (s)", "iterations", "rel. error (all entries)", "peak RSS +MB"]
    rows = [
        [
            "rankwise `complete_altmin`",
            rw["seconds"],
            rw["iterations"],
            f"{rw['rel_error']:.2e}",
            rw["peak_mb_over_base"],
        ],
        [
            "dense SoftImpute (svd_lowrank)",
            si["seconds"],
            si["iterations"],
            f"{si['rel_error']:.2e}",
            si["peak_mb_over_base"],
        ],
    ]
    md = (
        f"## Matrix completion ({size} x {size}, rank {RANK}, {frac:.0%} observed"
        f"{', quick' if args.quick else ''})\n\n"
        + markdown_table(header, rows)
        + f"\n\nMedian of {repeats} interleaved run(s), each method in its own subprocess "
        f"(peak RSS over the RSS before the solve). Time ratio SoftImpute / rankwise: "
        f"{speedup:.3g}x; SoftImpute is capped at {budget:g} s per run, so compare the errors "
        "too. Script: `bench/completion.py`.\n"
    )
    write_results(
        "completion",
        {
            "size": size,
            "rank": RANK,
            "observed_fraction": frac,
            "repeats": repeats,
            "runs": runs,
            "summary": summary,
            "time_ratio_softimpute_over_rankwise": speedup,
        },
        md,
    )
    print(md)


if __name__ == "__main__":
    main()
