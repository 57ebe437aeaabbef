"""Memory-efficient pretraining optimizers on one small LLaMA, same data and token budget.

Methods: full-rank AdamW (torch), galore-torch's GaLoreAdamW, and rankwise's GaLoreAdamW,
DCTAdamW, FrugalAdamW and GradNormLoRPAdamW, in the spirit of "Scalable Parameter and
Memory Efficient Pretraining for LLM" (2025). Every method trains its own copy of the same
randomly initialised LLaMA (built here from transformers.LlamaConfig) on the same batches
of the built-in corpus (byte tokenizer), the methods interleaved step by step so machine
noise hits all alike. The projected methods get identical parameter groups: every linear
weight of the transformer blocks (attention and MLP) projected at the same rank, gap and
scale; embeddings, the LM head and norms train with plain AdamW.

Columns: validation perplexity after the budget; optimizer-state bytes (moments, projection
matrices or indices, shared DCT bases); peak resident memory of a child process running
three steps of that method alone; median step time (forward + backward + update);
total subspace-refresh time over the run.

Refresh micro-benchmark: the gradients of every projected matrix (captured from the AdamW
model at the end of the run) are given to galore-torch's refresh (full torch.linalg.svd)
and rankwise's (rsvd, default accuracy); both are timed interleaved (median of repeats),
and the gradient energy each captures, ‖PᵀG‖²/‖G‖², is compared.

Run: .venv/bin/python bench/optim.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, write_results  # noqa: E402

from rankwise.data import load_corpus, token_blocks  # noqa: E402
from rankwise.linalg import rsvd  # noqa: E402
from rankwise.models import byte_tokenizer  # noqa: E402
from rankwise.optim import DCTAdamW, FrugalAdamW, GaLoreAdamW, GradNormLoRPAdamW  # noqa: E402
from rankwise.optim.galore import ENERGY_RTOL  # noqa: E402

METHODS = [
    "adamw",
    "galore-torch",
    "rankwise galore",
    "rankwise dct",
    "rankwise frugal",
    "rankwise gradnormlorp",
]
RANKWISE = {
    "rankwise galore": GaLoreAdamW,
    "rankwise dct": DCTAdamW,
    "rankwise frugal": FrugalAdamW,
    "rankwise gradnormlorp": GradNormLoRPAdamW,
}
BATCH, SEQ = 4, 256
LR, WARMUP = 2e-3, 10


def settings(quick: bool) -> dict:
    """Model size, budget and projection options of a run."""
    if quick:  # the reference model: 4 layers, 256 wide
        return dict(
            hidden=256, layers=4, intermediate=688, heads=4, steps=30, rank=64, gap=10, val_blocks=8
        )
    return dict(
        hidden=512, layers=6, intermediate=1376, heads=8, steps=40, rank=128, gap=10, val_blocks=8
    )


def build_model(cfg: dict, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def param_groups(model: nn.Module, cfg: dict) -> list[dict]:
    """galore-torch's recipe: block linear weights projected, everything else plain."""
    projected = [p for n, p in model.model.layers.named_parameters() if p.ndim == 2]
    ids = {id(p) for p in projected}
    plain = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": plain},
        {
            "params": projected,
            "rank": cfg["rank"],
            "update_proj_gap": cfg["gap"],
            "scale": 0.25,
            "proj_type": "std",
        },
    ]


class GaloreTorchTimer:
    """Accumulates the time galore-torch spends computing projection matrices."""

    seconds = 0.0
    count = 0

    @classmethod
    def install(cls) -> None:
        from galore_torch.galore_projector import GaLoreProjector

        original = GaLoreProjector.get_orthogonal_matrix
        if getattr(original, "_timed", False):
            return

        def timed(self, weights, rank, type):
            t0 = time.perf_counter()
            out = original(self, weights, rank, type)
            cls.seconds += time.perf_counter() - t0
            cls.count += 1
            return out

        timed._timed = True
        GaLoreProjector.get_orthogonal_matrix = timed


def build_optimizer(method: str, model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6, weight_decay=0.0)
    groups = param_groups(model, cfg)
    if method == "galore-torch":
        from galore_torch import GaLoreAdamW as TorchGaLore

        GaloreTorchTimer.install()
        return TorchGaLore(groups, lr=LR, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True)
    return RANKWISE[method](groups, lr=LR, eps=1e-6, weight_decay=0.0)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (galore-torch's projector matrices too)."""
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and v.ortho_matrix is not None:
                mats = v.ortho_matrix if isinstance(v.ortho_matrix, list) else [v.ortho_matrix]
                total += sum(m.numel() * m.element_size() for m in mats)
    return total


def refresh_seconds(method: str, opt: torch.optim.Optimizer) -> float:
    if method == "galore-torch":
        return GaloreTorchTimer.seconds
    return getattr(opt, "refresh_seconds", 0.0)


def data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    tok = byte_tokenizer()
    corpus = load_corpus()
    train = token_blocks(
        tok, corpus.train, seq_len=SEQ, max_tokens=cfg["steps"] * BATCH * SEQ + SEQ
    )
    val = token_blocks(tok, corpus.validation, seq_len=SEQ, max_tokens=cfg["val_blocks"] * SEQ)
    if len(train) < cfg["steps"] * BATCH:
        raise SystemExit(f"corpus too small for {cfg['steps']} steps of {BATCH}x{SEQ} tokens")
    return train, val


def lr_factor(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


def train_step(model, opt, batch: torch.Tensor, step: int) -> float:
    for g in opt.param_groups:
        g["lr"] = LR * lr_factor(step)
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def perplexity(model, val: torch.Tensor) -> float:
    losses = [
        float(model(input_ids=val[i : i + BATCH], labels=val[i : i + BATCH]).loss)
        for i in range(0, len(val), BATCH)
    ]
    return math.exp(statistics.mean(losses))


# ------------------------------------------------------------------ peak memory (child)


def peak_child(method: str, quick: bool) -> None:
    """Run three steps of one method alone and print the peak RSS in bytes."""
    cfg = settings(quick)
    cfg["steps"] = 3
    train, _ = data(cfg)
    reset_peak()  # the corpus is read first; count only what the method itself holds
    model = build_model(cfg)
    opt = build_optimizer(method, model, cfg) if method != "none" else None
    for step in range(3):
        batch = train[step * BATCH : (step + 1) * BATCH]
        if opt is None:
            model(input_ids=batch, labels=batch).loss.backward()
        else:
            train_step(model, opt, batch, step)
    print(peak_rss())


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux; no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident memory in bytes since :func:`reset_peak` (VmHWM), else since start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(method: str, quick: bool) -> int:
    cmd = [sys.executable, __file__, "--peak-child", method] + (["--quick"] if quick else [])
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RANKWISE_PROGRESS": "0"},
    )
    return int(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ refresh micro-benchmark


def refresh_bench(model: nn.Module, batch: torch.Tensor, rank: int, repeats: int) -> dict:
    """rankwise's refresh (rsvd) vs galore-torch's (full SVD) on the same real gradients."""
    from galore_torch.galore_projector import GaLoreProjector

    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    grads = [
        p.grad.detach().clone() for _, p in model.model.layers.named_parameters() if p.ndim == 2
    ]
    model.zero_grad(set_to_none=True)
    projector = GaLoreProjector(rank, proj_type="std")

    def theirs():
        return [
            projector.get_orthogonal_matrix(
                g, rank, "right" if g.shape[0] >= g.shape[1] else "left"
            )
            for g in grads
        ]

    def ours():  # exactly the call GaLoreAdamW's refresh makes
        out = []
        for i, g in enumerate(grads):
            gen = torch.Generator().manual_seed(i)
            U, _, Vh = rsvd(g, rank, accuracy="energy", rtol=ENERGY_RTOL, generator=gen)
            out.append(Vh if g.shape[0] >= g.shape[1] else U)
        return out

    times = interleaved({"galore-torch": theirs, "rankwise": ours}, repeats=repeats)
    ratios = []
    for g, Pt, Po in zip(grads, theirs(), ours(), strict=True):
        right = g.shape[0] >= g.shape[1]
        cap_t = (g @ Pt.mT if right else Pt.mT @ g).square().sum()
        cap_o = (g @ Po.mT if right else Po.mT @ g).square().sum()
        ratios.append(float(cap_o / cap_t))
    shapes = sorted({tuple(g.shape) for g in grads})
    return {
        "matrices": len(grads),
        "shapes": [list(s) for s in shapes],
        "rank": rank,
        "galore_torch_s": times["galore-torch"],
        "rankwise_s": times["rankwise"],
        "speedup": times["galore-torch"] / times["rankwise"],
        "energy_ratio_min": min(ratios),
        "energy_ratio_mean": statistics.mean(ratios),
    }


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4-layer 256-wide LLaMA, 30 steps")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method")
    ap.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--refresh-only",
        action="store_true",
        help="train only AdamW, redo the refresh micro-benchmark, keep the table of the last run",
    )
    args = ap.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.quick)
        return
    t_start = time.perf_counter()
    cfg = settings(args.quick)
    if args.steps:
        cfg["steps"] = args.steps
    train, val = data(cfg)
    if args.refresh_only:
        refresh_only(args, cfg, train, val, t_start)
        return
    runs = {}
    for method in METHODS:
        model = build_model(cfg)
        runs[method] = {
            "model": model,
            "opt": build_optimizer(method, model, cfg),
            "times": [],
            "losses": [],
        }
    n_params = sum(p.numel() for p in runs["adamw"]["model"].parameters())
    print(
        f"{n_params / 1e6:.1f}M parameters, {cfg['steps']} steps of {BATCH}x{SEQ} tokens",
        flush=True,
    )
    for step in range(cfg["steps"]):
        batch = train[step * BATCH : (step + 1) * BATCH]
        for run in runs.values():
            t0 = time.perf_counter()
            run["losses"].append(train_step(run["model"], run["opt"], batch, step))
            run["times"].append(time.perf_counter() - t0)
        if step % 10 == 0 or step == cfg["steps"] - 1:
            print(
                f"step {step}: " + ", ".join(f"{m} {r['losses'][-1]:.3f}" for m, r in runs.items()),
                flush=True,
            )
    rows = []
    for method, run in runs.items():
        rows.append(
            {
                "method": method,
                "val_ppl": perplexity(run["model"], val),
                "final_train_loss": statistics.mean(run["losses"][-5:]),
                "state_bytes": state_bytes(run["opt"]),
                "step_s": statistics.median(run["times"]),
                "refresh_s": refresh_seconds(method, run["opt"]),
            }
        )
        print(rows[-1], flush=True)
    for row in rows:
        row["peak_rss_bytes"] = peak_memory(row["method"], args.quick)
    base = next(r for r in rows if r["method"] == "adamw")
    for row in rows:
        row["state_vs_adamw"] = row["state_bytes"] / base["state_bytes"]
        row["step_vs_adamw"] = row["step_s"] / base["step_s"]
    micro = refresh_bench(runs["adamw"]["model"], val[:BATCH], cfg["rank"], repeats=5)
    print(micro, flush=True)
    report(args, cfg, n_params, rows, micro, time.perf_counter() - t_start)


def refresh_only(args, cfg: dict, train: torch.Tensor, val: torch.Tensor, t_start: float) -> None:
    """Train AdamW alone on the same budget, then re-run the refresh micro-benchmark; the
    training table is taken from the last full run of this mode."""
    import json

    from _common import RESULTS

    name = "optim" if not args.quick else "optim_quick"
    last = json.loads((RESULTS / f"{name}.json").read_text())
    model = build_model(cfg)
    opt = build_optimizer("adamw", model, cfg)
    for step in range(cfg["steps"]):
        train_step(model, opt, train[step * BATCH : (step + 1) * BATCH], step)
    micro = refresh_bench(model, val[:BATCH], cfg["rank"], repeats=5)
    print(micro, flush=True)
    for row in last["rows"]:
        row["peak_rss_bytes"] = peak_memory(row["method"], args.quick)
    report(
        args,
        last["settings"],
        last["parameters"],
        last["rows"],
        micro,
        time.perf_counter() - t_start,
    )


def report(args, cfg: dict, n_params: int, rows: list[dict], micro: dict, seconds: float) -> None:
    mode = "quick" if args.quick else "full"
    table = markdown_table(
        [
            "method",
            "val. perplexity",
            "optimizer state (MB)",
            "vs AdamW",
            "peak RSS (MB)",
            "step (s)",
            "step vs AdamW",
            "refresh total (s)",
        ],
        [
            [
                r["method"],
                f"{r['val_ppl']:.2f}",
                f"{r['state_bytes'] / 2**20:.2f}",
                f"{r['state_vs_adamw']:.2f}",
                f"{r['peak_rss_bytes'] / 2**20:.0f}",
                f"{r['step_s']:.3f}",
                f"{r['step_vs_adamw']:.2f}",
                f"{r['refresh_s']:.2f}",
            ]
            for r in rows
        ],
    )
    shapes = ", ".join("×".join(map(str, s)) for s in micro["shapes"])
    md = (
        f"## Low-rank optimizers, pretraining (`bench/optim.py`, {mode} mode)\n\n"
        f"LLaMA {cfg['layers']} layers × {cfg['hidden']} wide (MLP {cfg['intermediate']}), "
        f"{n_params / 1e6:.1f}M parameters, byte tokenizer, random init (seed 0); "
        f"{cfg['steps']} steps of {BATCH}×{SEQ} tokens of the built-in corpus "
        f"({cfg['steps'] * BATCH * SEQ:,} tokens, the same batches for every method), lr {LR:g} "
        f"with {WARMUP} warm-up steps, eps 1e-6, no weight decay. Projected methods: every "
        f"block linear weight at rank {cfg['rank']}, update_proj_gap {cfg['gap']} (short "
        "budget, so the subspace is renewed several times), scale 0.25, proj_type std; "
        "embeddings, LM head and norms use AdamW. Validation perplexity on "
        f"{cfg['val_blocks']}×{SEQ} validation tokens. Step time: median over the run, "
        "methods interleaved step by step (a shared, noisy 2-core machine). Peak RSS: a "
        "child process running three steps of that method alone, counted from after the "
        "corpus is read (model, activations, gradients, optimizer state, Python and torch). The budget is far below a real pretraining run, so "
        "perplexities compare methods at equal tokens, not converged models.\n\n"
        f"{table}\n\n"
        f"Refresh micro-benchmark: the {micro['matrices']} projected gradients ({shapes}) of "
        f"the AdamW model after the run, rank {micro['rank']}; galore-torch's refresh (full "
        f"`torch.linalg.svd`) {micro['galore_torch_s']:.3f} s vs rankwise's (`rsvd` as "
        f'GaLoreAdamW calls it: accuracy="energy", rtol={ENERGY_RTOL:g}) '
        f"{micro['rankwise_s']:.3f} s for all of them: speed-up **{micro['speedup']:.1f}×**, "
        f"capturing {100 * micro['energy_ratio_min']:.2f}% (worst matrix) and "
        f"{100 * micro['energy_ratio_mean']:.2f}% (mean) of the gradient energy galore-torch's "
        "exact subspace captures (median of 5 interleaved repeats).\n\n"
        f"_Whole run: {seconds / 60:.1f} min._\n"
    )
    payload = {
        "mode": mode,
        "settings": cfg,
        "parameters": n_params,
        "rows": rows,
        "refresh": micro,
    }
    write_results("optim" if not args.quick else "optim_quick", payload, md)


if __name__ == "__main__":
    main()
