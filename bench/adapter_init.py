"""Initialiser cost and quality: rankwise PiSSA / EVA vs PEFT's on SmolLM2-135M.

PiSSA: rankwise ``init="pissa"`` (randomized block-Krylov SVD, ``n_iter="auto"`` and
``n_iter=4``) vs PEFT ``init_lora_weights="pissa"`` (full ``torch.linalg.svd``) and
``"pissa_niter_4"`` (``torch.svd_lowrank``), all linear layers, rank 16. Quality: PiSSA's
``W_res + s·B A`` must equal ``W`` (max abs error), how close ``B A`` is to the best rank-r
approximation (``‖W - BA‖_F / ‖W - W_r‖_F``, 1 = optimal) and the agreement of each
method's top-r right-singular subspace with the full SVD's (mean ``cos²`` of the principal
angles).

EVA: rankwise ``init="eva"`` (rank=32, rho=2, centred) vs PEFT ``init_lora_weights="eva"``
(r=16, ``EvaConfig(rho=2)``), which is the same budget (16 per layer on average) and cap
(32); then the agreement of the two ``A`` subspaces, layer by layer, over the components
both kept.

Interleaved, median of 3 repeats (``--quick``: first 2 decoder layers), one torch thread
by default (``--threads``), wall and process CPU time.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import markdown_table, write_results  # noqa: E402
from rankwise.adapters import adapted_layers, attach  # noqa: E402
from rankwise.data import load_corpus, token_blocks  # noqa: E402
from rankwise.models import load_model  # noqa: E402

R = 16


def targets_for(quick: bool) -> re.Pattern | str:
    if quick:
        return re.compile(r"model\.layers\.[0-1]\..*_proj")
    return re.compile(r"model\.layers\.\d+\..*_proj")


def peft_targets(quick: bool) -> str:
    return r".*layers\.[0-1]\..*_proj" if quick else r".*layers\.\d+\..*_proj"


def linear_weights(model: torch.nn.Module, pattern: re.Pattern) -> dict[str, torch.Tensor]:
    return {
        p: m.weight.detach().clone()
        for p, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and pattern.fullmatch(p)
    }


def subspace_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cos² of the principal angles between the row spaces of ``a`` and ``b`` (k, n)."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    return float((qa.T @ qb).square().sum() / min(a.shape[0], b.shape[0]))


def peft_lora_factors(
    peft_model,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]]:
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            out[path] = (
                module.lora_B["default"].weight.detach(),
                module.lora_A["default"].weight.detach(),
                float(module.scaling["default"]),
                module.base_layer.weight.detach(),
            )
    return out


def ours_lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]]:
    return {
        p: (
            ly.adapters["default"].lora_B.detach(),
            ly.adapters["default"].lora_A.detach(),
            ly.adapters["default"].scaling,
            ly.base_layer.weight.detach(),
        )
        for p, ly in adapted_layers(model).items()
    }


def pissa_quality(factors, originals, best_right) -> dict[str, float]:
    recon, ratio, agree = [], [], []
    for path, (b, a, s, w_res) in factors.items():
        w = originals[path]
        ba = s * (b.double() @ a.double())
        recon.append(float((w_res.double() + ba - w.double()).abs().max()))
        U, S, Vh = best_right[path]
        opt = float(S[R:].square().sum().sqrt())
        ratio.append(float((w.double() - ba).norm()) / opt)
        agree.append(subspace_agreement(a, Vh[:R]))
    return {
        "max_abs_reconstruction_error": max(recon),
        "error_vs_optimal_mean": statistics.mean(ratio),
        "error_vs_optimal_max": max(ratio),
        "subspace_agreement_mean": statistics.mean(agree),
        "subspace_agreement_min": min(agree),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 decoder layers (< 60 s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both libraries (default 1: steadiest on a shared 2-core box)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = 3
    torch.manual_seed(0)

    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    base, tokenizer = load_model("smollm2")
    base = base.float().eval()
    pattern = targets_for(quick)
    originals = linear_weights(base, pattern)
    dense = {p: torch.linalg.svd(w.double(), full_matrices=False) for p, w in originals.items()}
    n_layers = len(originals)

    corpus = load_corpus("builtin")
    seq_len, n_blocks = (128, 2) if quick else (128, 8)
    blocks = token_blocks(tokenizer, corpus.calibration, seq_len=seq_len,
                          max_tokens=seq_len * n_blocks)[:n_blocks]  # fmt: skip
    batch = 4

    def peft_cfg(init, **kw):
        return LoraConfig(r=R, lora_alpha=R, target_modules=peft_targets(quick),
                          init_lora_weights=init, **kw)  # fmt: skip

    results: dict[str, dict] = {}
    models: dict[str, object] = {}

    def run(label: str, fn):
        def timed():
            model = copy.deepcopy(base)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(model)
            entry = results.setdefault(label, {"times": [], "cpu_times": []})
            entry["times"].append(time.perf_counter() - t0)
            entry["cpu_times"].append(time.process_time() - c0)
            models[label] = out

        return timed

    def ours_pissa(n_iter):
        return lambda m: (attach(m, "lora", pattern, rank=R, init="pissa",
                                 init_options={"n_iter": n_iter}), m)[1]  # fmt: skip

    def peft_pissa(init):
        return lambda m: get_peft_model(m, peft_cfg(init))

    def ours_eva(m):
        options = {"inputs": blocks, "rho": 2.0, "batch_size": batch, "center": True}
        attach(m, "lora", pattern, rank=2 * R, init="eva", init_options=options)
        return m

    def peft_eva(m):
        cfg = peft_cfg("eva", eva_config=EvaConfig(rho=2.0))
        pm = get_peft_model(m, cfg)
        loader = [
            {"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks.split(batch)
        ]
        initialize_lora_eva_weights(pm, loader, show_progress_bar=False)
        return pm

    fns = {
        "rankwise pissa (rsvd auto)": run("rankwise pissa (rsvd auto)", ours_pissa("auto")),
        "rankwise pissa (rsvd n_iter=4)": run("rankwise pissa (rsvd n_iter=4)", ours_pissa(4)),
        "peft pissa (full svd)": run("peft pissa (full svd)", peft_pissa("pissa")),
        "peft pissa_niter_4 (svd_lowrank)": run(
            "peft pissa_niter_4 (svd_lowrank)", peft_pissa("pissa_niter_4")
        ),
        "rankwise eva": run("rankwise eva", ours_eva),
        "peft eva": run("peft eva", peft_eva),
    }
    for _ in range(repeats):  # interleaved: every method once per round
        for fn in fns.values():
            fn()

    # quality, from the last run of each
    best = {p: (U, S, Vh) for p, (U, S, Vh) in dense.items()}
    for label in fns:
        results[label]["median_s"] = statistics.median(results[label]["times"])
        results[label]["median_cpu_s"] = statistics.median(results[label]["cpu_times"])
    for label in ("rankwise pissa (rsvd auto)", "rankwise pissa (rsvd n_iter=4)"):
        results[label].update(pissa_quality(ours_lora_factors(models[label]), originals, best))
    for label in ("peft pissa (full svd)", "peft pissa_niter_4 (svd_lowrank)"):
        results[label].update(pissa_quality(peft_lora_factors(models[label]), originals, best))

    ours = ours_lora_factors(models["rankwise eva"])
    theirs = peft_lora_factors(models["peft eva"])
    agree, rank_ours, rank_peft = [], {}, {}
    for path, (_, a, _, _) in ours.items():
        k_ours = int((a.abs().sum(1) > 0).sum())
        a_peft = theirs[path][1]
        k_peft = a_peft.shape[0]
        rank_ours[path], rank_peft[path] = k_ours, k_peft
        k = min(k_ours, k_peft)
        if k:
            agree.append(subspace_agreement(a[:k], a_peft[:k]))
    for label, ranks in (("rankwise eva", rank_ours), ("peft eva", rank_peft)):
        results[label].update(total_rank=sum(ranks.values()), max_rank=max(ranks.values()),
                              min_rank=min(ranks.values()))  # fmt: skip
    results["rankwise eva"]["subspace_agreement_with_peft_mean"] = statistics.mean(agree)
    results["rankwise eva"]["subspace_agreement_with_peft_min"] = min(agree)

    t_full = results["peft pissa (full svd)"]["median_cpu_s"]
    t_low = results["peft pissa_niter_4 (svd_lowrank)"]["median_cpu_s"]
    rows = []
    for label in list(fns)[:4]:
        q = results[label]
        rows.append([
            label, q["median_s"], q["median_cpu_s"], t_full / q["median_cpu_s"],
            t_low / q["median_cpu_s"],
            q["max_abs_reconstruction_error"], 100 * (q["error_vs_optimal_mean"] - 1),
            100 * (q["error_vs_optimal_max"] - 1), q["subspace_agreement_mean"],
        ])  # fmt: skip
    eva_rows = [
        [label, results[label]["median_s"], results[label]["median_cpu_s"],
         results["peft eva"]["median_cpu_s"] / results[label]["median_cpu_s"],
         results[label]["total_rank"], results[label]["min_rank"], results[label]["max_rank"]]
        for label in ("rankwise eva", "peft eva")
    ]  # fmt: skip
    mode = "quick (layers 0-1)" if quick else "full"
    md = "\n\n".join([
        f"### Adapter initialisers: PiSSA and EVA on SmolLM2-135M ({mode}, {n_layers} linear "
        f"layers, rank {R}, median of {repeats})",
        "Wall time and process CPU time (the machine may be shared; CPU time is the steadier "
        "measure). Ratio columns are the peer's CPU time over this row's (>1: this row is "
        "faster). `excess err %` is how much ‖W − BA‖_F exceeds the best rank-r error; "
        "`agree` the mean cos² of the principal angles to the full SVD's top-r subspace.",
        markdown_table(
            ["method", "wall (s)", "cpu (s)", "vs peft full", "vs peft niter_4",
             "max |W_res+BA−W|",
             "excess err % mean", "excess err % max", "agree"], rows),
        f"EVA: {len(blocks)} blocks × {seq_len} tokens, batch {batch}; rankwise rank={2 * R} "
        f"rho=2 centred = PEFT r={R} rho=2 (same budget and cap). Subspace agreement of the "
        f"two `A`s over the components both kept: mean "
        f"{results['rankwise eva']['subspace_agreement_with_peft_mean']:.3f}, min "
        f"{results['rankwise eva']['subspace_agreement_with_peft_min']:.3f}.",
        markdown_table(["method", "wall (s)", "cpu (s)", "vs peft", "total rank", "min rank",
                        "max rank"],
                       eva_rows),
    ])  # fmt: skip
    payload = {
        "mode": mode,
        "rank": R,
        "layers": n_layers,
        "repeats": repeats,
        "eva_tokens": int(blocks.numel()),
        "results": {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
    }
    write_results("adapter_init", payload, md)
    print(md)


if __name__ == "__main__":
    main()
