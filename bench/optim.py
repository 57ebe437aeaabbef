"""Memory-efficient pretraining on one small LLaMA: every method, same data and token budget.

Methods: full-rank AdamW, galore-torch's GaLoreAdamW, rankwise's GaLore, DCT, FRUGAL and
GradNormLoRP optimizers, and the layer types of ``rankwise.layers`` that train from scratch
(whatever is registered when the script runs, minus those that start from a trained weight),
in the spirit of "Scalable Parameter and Memory Efficient Pretraining for LLM" (2025). Each
method is one :class:`rankwise.pretrain.Trainer` (the loop ``rankwise pretrain`` runs) on
its own copy of the same randomly initialised LLaMA and the same batches of the built-in
corpus, the methods interleaved step by step. The projected optimizers project every 2-D
weight of the blocks at the same rank, gap and scale (galore-torch's recipe); a method
written ``name+emb`` (e.g. ``galore+emb``, ``sltrain+emb``) also projects the embedding / LM
head (``PretrainConfig.project_embeddings``). Layer types convert every block linear layer at
the same rank and train with AdamW.

The budget (``--budget``) is the same number of tokens for every method: given in tokens
(``800k``, ``2M``) or in minutes per method (``10min``, the default of the full run: the
tokens AdamW trains in that time, measured by a probe of a few steps of each method, which
also gives the printed estimate of the whole run's time).

Columns, from the training run: validation perplexity after the budget; optimizer-state
bytes; weight bytes; peak resident memory of a child process running three steps of that
method alone. From a separate timing phase after training, round-robin over the methods
(median of repeats, so a shared machine's drift hits all alike): the time of a step without
any subspace refresh (forward + backward + update; refresh time inside the step subtracted),
and the time of one refresh of every subspace of the model from the current gradients, with
its cost per step at the run's ``update_proj_gap``. Wall times of the training run itself
mix the staggered refreshes into different steps per method, so they are not used.

The full run's model is ``llama-20m-bpe8k`` (20.8M parameters, 3.1M of them the tied
embedding of an 8k BPE vocabulary: mostly transformer body, as in the papers' tables); quick
mode uses the byte-tokenizer ``llama-small``. A second table gives every method's optimizer
state on ``llama-20m-bpe8k`` and on ``llama-20m`` (49k vocabulary: 80% of the parameters are
the embedding) with the embedding on AdamW and projected, against the issue's "≥ 40% below
AdamW" bar. It costs one step per method and config.

Refresh benchmark (the issue's target): on the block-matrix gradients of ``llama-small``
(256 wide), ``llama-20m-bpe8k`` (384) and ``llama-60m`` (512; quick mode: two layers of each) after a few AdamW
steps, galore-torch's refresh (full ``torch.linalg.svd``), rankwise's (``SVDProjector``
exactly as GaLoreAdamW calls it) and each path of ``leading_subspace`` forced (subspace
iteration, Gram eigh) are timed interleaved (median of repeats), per shape and for the whole
model; the gradient energy each subspace captures, ``‖PᵀG‖²/‖G‖²``, is compared with the exact
one. The per-shape table is what ``rankwise.optim.galore.subspace_method``'s rule comes from.

Run: .venv/bin/python bench/optim.py [--quick] [--budget 10min|800k] [--methods ...]
     [--refresh-only] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
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

from rankwise.errors import ConfigError, RankwiseError  # noqa: E402
from rankwise.optim import ProjectedAdamW  # noqa: E402
from rankwise.pretrain import OPTIMIZERS, PretrainConfig, Trainer, load_data  # noqa: E402
from rankwise.pretrain.methods import projected_groups  # noqa: E402

OPTIMIZER_METHODS = ["adamw", "galore-torch", "galore", "dct", "frugal", "gradnorm"]
PROJECTED = ["galore-torch", "galore", "dct", "frugal", "gradnorm"]
EMB = "+emb"  # method suffix: also project the embedding / LM head
# Layer types that start from a trained model's weights (a pruned / distilled checkpoint), not
# from scratch: left out of a pretraining comparison.
FROM_TRAINED = {"pela", "welore"}
DEFAULT_BUDGET = {"full": "10min", "quick": "3072"}
STATE_BAR = 0.60  # the issue: every method's optimizer state >= 40% below AdamW's
# The full run's model: ~20M parameters mostly in the blocks (8k BPE vocabulary), as in the
# GaLore / SLTrain papers' tables; the state table also shows llama-20m (49k vocabulary).
FULL_CONFIG = "llama-20m-bpe8k"
STATE_CONFIGS = ("llama-20m-bpe8k", "llama-20m")


def layer_methods() -> list[str]:
    from rankwise.layers import names

    return [n for n in names() if n not in FROM_TRAINED]


def split_spec(spec: str) -> tuple[str, bool]:
    """``"galore+emb"`` -> ``("galore", True)``; ``"galore"`` -> ``("galore", False)``."""
    return (spec[: -len(EMB)], True) if spec.endswith(EMB) else (spec, False)


def spec_config(config: PretrainConfig, spec: str) -> PretrainConfig:
    method, emb = split_spec(spec)
    return dataclasses.replace(config, method=method, project_embeddings=emb)


def parse_budget(text: str) -> tuple[str, float]:
    """``"10min"`` -> ``("minutes", 10.0)``; ``"800k"``, ``"2M"``, ``"3072"`` -> ``("tokens", n)``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(min|k|M)?\s*(?:tok|tokens)?\s*", text)
    if not m:
        raise ConfigError(f"--budget {text!r}: give minutes per method ('10min') or tokens per method ('800k', '2M', '3072')")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise ConfigError(f"--budget {text!r} must be positive")
    if unit == "min":
        return "minutes", value
    return "tokens", value * {"k": 1e3, "M": 1e6, None: 1.0}[unit]


def run_config(quick: bool, steps: int) -> PretrainConfig:
    """The run every method shares: :data:`FULL_CONFIG` (quick: the byte-tokenizer 4 x 256 model). Warm-up is 10% of
    the steps; subspaces are renewed about 8 times per run (every 4 to 200 steps, 200 being
    galore-torch's default)."""
    gap = min(200, max(4, steps // 8))
    if quick:
        base = dict(config="llama-small", batch_size=2, seq_len=128, rank=64, eval_tokens=2048)
    else:
        base = dict(config=FULL_CONFIG, batch_size=4, seq_len=256, rank=64, eval_tokens=16384)
    return PretrainConfig(
        lr=2e-3, scale=0.25, eval_every=10**6, checkpoint_every=10**6, steps=steps,
        warmup=max(1, steps // 10), update_proj_gap=gap, **base,
    )  # fmt: skip


# ------------------------------------------------------------------ galore-torch as a method


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


def galore_torch(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    GaloreTorchTimer.install()
    return GaLoreAdamW(projected_groups(model, config), lr=config.lr, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True)


galore_torch.projected = True  # a projected optimizer: --project-embeddings applies to it
if "galore-torch" not in OPTIMIZERS:
    OPTIMIZERS.register("galore-torch", galore_torch)


def state_bytes(trainer: Trainer) -> int:
    """Optimizer-state bytes; galore-torch's projector objects hold their matrices too."""
    total = trainer.optimizer_state_bytes()
    for st in trainer.optimizer.state.values():
        v = st.get("projector")
        if v is not None and getattr(v, "ortho_matrix", None) is not None:
            mats = v.ortho_matrix if isinstance(v.ortho_matrix, list) else [v.ortho_matrix]
            total += sum(m.numel() * m.element_size() for m in mats)
    return total


def refresh_clock(spec: str, trainer: Trainer) -> float:
    """Seconds spent renewing subspaces so far: the optimizer's own counter (rankwise), or
    galore-torch's timer, which all galore-torch optimizers share (methods run one at a time,
    so the difference around one method's step is that method's)."""
    if split_spec(spec)[0] == "galore-torch":
        return GaloreTorchTimer.seconds
    return trainer.refresh_seconds()


def galore_torch_renew(optimizer: torch.optim.Optimizer) -> float:
    """One refresh of every galore-torch subspace from the current gradients, as its step
    does it (``get_orthogonal_matrix`` on the side ``proj_type="std"`` picks); seconds."""
    from galore_torch.galore_projector import GaLoreProjector

    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        for p in group["params"]:
            if p.grad is not None:
                side = "right" if p.shape[0] >= p.shape[1] else "left"
                GaLoreProjector(group["rank"], proj_type="std").get_orthogonal_matrix(p.grad, group["rank"], side)
    return time.perf_counter() - t0


def renew_all(spec: str, trainer: Trainer) -> float | None:
    """Seconds of one refresh of every subspace of the method (None: it has none)."""
    if split_spec(spec)[0] == "galore-torch":
        return galore_torch_renew(trainer.optimizer)
    opt = trainer.optimizer
    if isinstance(opt, ProjectedAdamW) and any(g["rank"] is not None for g in opt.param_groups):
        return opt.renew_subspaces()
    return None


# ------------------------------------------------------------------ peak memory (child)


def peak_child(spec: str, quick: bool) -> None:
    """Run three steps of one method alone and print the peak RSS in bytes."""
    config = dataclasses.replace(spec_config(run_config(quick, 3), spec), eval_tokens=0)
    data = load_data(config)
    reset_peak()  # the corpus is read first; count only what the method itself holds
    trainer = Trainer(config, data=data)
    for _ in range(3):
        trainer.train_step()
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


def peak_memory(spec: str, quick: bool) -> int | None:
    cmd = [sys.executable, __file__, "--peak-child", spec] + (["--quick"] if quick else [])
    env = {**os.environ, "RANKWISE_PROGRESS": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"peak memory of {spec} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return int(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ refresh benchmark

# The models whose block-matrix gradients the refresh benchmark uses, and the rank at each
# (GaLore's ranks: 64 up to 384 wide, 128 at 512).
REFRESH_MODELS = [("llama-small", 64), ("llama-20m-bpe8k", 64), ("llama-60m", 128)]


def refresh_gradients(config_name: str, rank: int, quick: bool) -> tuple[list[torch.Tensor], PretrainConfig]:
    """Block-matrix gradients of ``config_name`` after a few AdamW steps (quick: two layers)."""
    config = PretrainConfig(
        config=config_name, method="adamw", steps=3 if quick else 20, batch_size=2 if quick else 4,
        seq_len=128 if quick else 256, warmup=2, lr=2e-3, rank=rank, eval_tokens=0,
        eval_every=10**6, checkpoint_every=10**6,
    )  # fmt: skip
    trainer = Trainer(config)
    for _ in range(config.steps):
        trainer.train_step()
    model = trainer.model
    model.zero_grad(set_to_none=True)
    batch = trainer.batch(0)
    model(input_ids=batch, labels=batch).loss.backward()
    layers = model.model.layers[:2] if quick else model.model.layers
    grads = [p.grad.detach().clone() for p in layers.parameters() if p.ndim == 2]
    return grads, config


def _side(g: torch.Tensor) -> str:
    return "right" if g.shape[0] >= g.shape[1] else "left"


def _captured(g: torch.Tensor, P: torch.Tensor) -> float:
    return float((g @ P if _side(g) == "right" else P.mT @ g).square().sum())


def refresh_bench(grads: list[torch.Tensor], rank: int, repeats: int) -> dict:
    """rankwise's refresh (``SVDProjector`` as GaLoreAdamW calls it, and each path of
    ``leading_subspace`` forced) vs galore-torch's (full SVD) on the same gradients, per shape
    and for all of them, interleaved; captured energy against galore-torch's exact subspace."""
    from galore_torch.galore_projector import GaLoreProjector

    from rankwise.optim import SVDProjector
    from rankwise.optim.galore import leading_subspace, subspace_method

    projector = GaLoreProjector(rank, proj_type="std")

    def theirs(gs: list[torch.Tensor]) -> list[torch.Tensor]:  # (d, r) bases
        out = []
        for g in gs:
            P = projector.get_orthogonal_matrix(g, rank, _side(g))
            out.append(P.mT if _side(g) == "right" else P)
        return out

    def ours(gs: list[torch.Tensor]) -> list[torch.Tensor]:  # exactly GaLoreAdamW's refresh call
        out = []
        for i, g in enumerate(gs):
            state: dict = {}
            SVDProjector(state, tuple(g.shape), rank=rank, seed=i).refresh(g, 0)
            out.append(state[f"proj_{_side(g)}"])
        return out

    def forced(method: str):
        def run(gs: list[torch.Tensor]) -> list[torch.Tensor]:
            gen = torch.Generator().manual_seed(0)
            return [leading_subspace(g, rank, _side(g), generator=gen, method=method) for g in gs]

        return run

    paths = {"galore-torch": theirs, "rankwise": ours, "iteration": forced("iteration"), "gram": forced("gram")}

    def measure(gs: list[torch.Tensor]) -> dict:
        times = interleaved({k: (lambda f=f: f(gs)) for k, f in paths.items()}, repeats=repeats)
        exact = [_captured(g, P) for g, P in zip(gs, theirs(gs), strict=True)]
        energy = {}
        for k in ("rankwise", "iteration", "gram"):
            ratios = [_captured(g, P) / e for g, P, e in zip(gs, paths[k](gs), exact, strict=True)]
            energy[k] = min(ratios)
        return {"times": times, "energy_min": energy, "speedup": times["galore-torch"] / times["rankwise"]}

    by_shape = []
    for shape in sorted({tuple(g.shape) for g in grads}):
        same = [g for g in grads if tuple(g.shape) == shape]
        d = shape[1] if _side(same[0]) == "right" else shape[0]
        by_shape.append({"shape": list(shape), "count": len(same), "auto": subspace_method(d, rank), **measure(same)})
    whole = measure(grads)
    return {
        "matrices": len(grads),
        "shapes": [r["shape"] for r in by_shape],
        "rank": rank,
        "repeats": repeats,
        "galore_torch_s": whole["times"]["galore-torch"],
        "rankwise_s": whole["times"]["rankwise"],
        "speedup": whole["speedup"],
        "energy_ratio_min": whole["energy_min"]["rankwise"],
        "by_shape": by_shape,
    }


def refresh_benchmarks(quick: bool) -> list[dict]:
    """:func:`refresh_bench` on each model of :data:`REFRESH_MODELS`."""
    out = []
    for config_name, rank in REFRESH_MODELS:
        grads, config = refresh_gradients(config_name, rank, quick)
        result = {"config": config_name, "steps": config.steps, **refresh_bench(grads, rank, repeats=3 if quick else 7)}
        print({k: v for k, v in result.items() if k != "by_shape"}, flush=True)
        out.append(result)
        del grads
        gc.collect()
    return out


# ------------------------------------------------------------------ budget and estimate


def build_trainers(config: PretrainConfig, specs: list[str], data) -> tuple[dict[str, Trainer], dict[str, str]]:
    """One Trainer per method on shared data; methods that cannot run are reported, not fatal."""
    trainers, failed = {}, {}
    for spec in specs:
        try:
            trainers[spec] = Trainer(spec_config(config, spec), data=data)
        except (RankwiseError, TypeError, ValueError) as e:
            failed[spec] = f"{type(e).__name__}: {e}"
            print(f"{spec}: cannot run ({failed[spec]})", flush=True)
    return trainers, failed


def probe(config: PretrainConfig, specs: list[str]) -> dict[str, float]:
    """Seconds per step of each method: a throwaway trainer, one warm-up step (every subspace
    is computed there), then the median of two steps. Methods run one after the other."""
    config = dataclasses.replace(config, steps=3, eval_tokens=0)
    data = load_data(config)
    seconds = {}
    for spec in specs:
        trainers, _ = build_trainers(config, [spec], data)
        if spec in trainers:
            trainer = trainers[spec]
            trainer.train_step()
            seconds[spec] = statistics.median(trainer.train_step().seconds for _ in range(2))
        del trainers
        gc.collect()
    return seconds


def plan(args, specs: list[str]) -> tuple[PretrainConfig, dict]:
    """The shared run config for the budget, and the estimate (printed)."""
    mode = "quick" if args.quick else "full"
    kind, value = parse_budget(args.budget or DEFAULT_BUDGET[mode])
    probe_config = run_config(args.quick, 10)
    per_step_tokens = probe_config.batch_size * probe_config.seq_len
    t0 = time.perf_counter()
    step_s = probe(probe_config, specs)
    probe_s = time.perf_counter() - t0
    reference = step_s.get("adamw") or statistics.median(step_s.values())
    if args.steps:
        steps = args.steps
    elif kind == "minutes":
        steps = max(1, round(value * 60 / reference))
    else:
        steps = max(1, round(value / per_step_tokens))
    config = run_config(args.quick, steps)
    train_s = sum(steps * s for s in step_s.values())
    repeats = 3 if args.quick else 7
    timing_s = (repeats + 1) * sum(step_s.values()) * 1.5  # steps plus the projected methods' refreshes
    peaks_s = 30.0 * (len(specs) if not args.quick else sum(split_spec(s)[0] in OPTIMIZER_METHODS for s in specs))
    extra_s = (90.0 if args.quick else 240.0) + 10.0 * len(specs)  # refresh benchmarks, the two state tables
    estimate = {
        "budget": f"{value:g} {kind} per method", "steps": steps, "tokens_per_method": steps * per_step_tokens,
        "probe_step_s": step_s, "probe_s": probe_s, "train_s": train_s, "timing_s": timing_s,
        "peaks_s": peaks_s, "extra_s": extra_s, "total_s": probe_s + train_s + timing_s + peaks_s + extra_s,
    }  # fmt: skip
    slowest = max(step_s, key=step_s.get)
    print(
        f"budget {estimate['budget']}: {steps} steps of {config.batch_size}x{config.seq_len} tokens = "
        f"{steps * per_step_tokens:,} tokens per method ({len(step_s)} methods; probe: adamw "
        f"{step_s.get('adamw', float('nan')):.3f} s/step, slowest {slowest} {step_s[slowest]:.3f} s/step).\n"
        f"estimate: training {train_s / 60:.1f} min + timing phase {timing_s / 60:.1f} min + peak-memory "
        f"children {peaks_s / 60:.1f} min + refresh benchmark and state table {extra_s / 60:.1f} min "
        f"= about {estimate['total_s'] / 60:.0f} min in all",
        flush=True,
    )
    return config, estimate


# ------------------------------------------------------------------ the training run


def train_all(config: PretrainConfig, specs: list[str], repeats: int) -> tuple[list[dict], int]:
    """Train every method on the same batches (interleaved step by step), read the quality
    columns, then run the timing phase on the trained models."""
    data = load_data(config)
    trainers, failed = build_trainers(config, specs, data)
    reference = trainers.get("adamw") or next(iter(trainers.values()))  # the unconverted model
    n_params = sum(p.numel() for p in reference.model.parameters())
    print(f"{n_params / 1e6:.1f}M parameters, {config.steps} steps of {config.batch_size}x{config.seq_len} tokens", flush=True)
    losses: dict[str, float] = {}
    refresh_run = dict.fromkeys(trainers, 0.0)
    t_run = time.perf_counter()
    for step in range(config.steps):
        for spec, trainer in trainers.items():
            before = refresh_clock(spec, trainer)
            losses[spec] = trainer.train_step().loss
            refresh_run[spec] += refresh_clock(spec, trainer) - before
        if step % 25 == 0 or step == config.steps - 1:
            done = (time.perf_counter() - t_run) / 60
            print(f"step {step + 1}/{config.steps} ({done:.1f} min): " + ", ".join(f"{m} {v:.3f}" for m, v in losses.items()), flush=True)
    rows = {}
    for spec, trainer in trainers.items():
        rows[spec] = {
            "method": spec,
            "val_ppl": trainer.evaluate(),
            "state_bytes": state_bytes(trainer),
            "weight_bytes": trainer.weight_bytes(),
            "final_train_loss": losses[spec],
            "skipped_steps": trainer.skipped_steps,
            "refresh_during_run_s": refresh_run[spec],
        }  # fmt: skip
    for spec, timing in timing_phase(trainers, repeats).items():
        rows[spec].update(timing)
        rows[spec]["refresh_per_step_s"] = (
            None if timing["refresh_all_s"] is None else timing["refresh_all_s"] / config.update_proj_gap
        )
        print(rows[spec], flush=True)
    return [*rows.values(), *({"method": m, "error": err} for m, err in failed.items())], n_params


def timing_phase(trainers: dict[str, Trainer], repeats: int) -> dict[str, dict]:
    """Round-robin over the methods, ``repeats`` rounds after one warm-up round: each round,
    every method does one training step (its refresh time inside the step subtracted), then
    every method with subspaces renews all of them once. Medians."""
    step_times: dict[str, list[float]] = {m: [] for m in trainers}
    refresh_times: dict[str, list[float]] = {m: [] for m in trainers}
    for round_ in range(repeats + 1):
        for spec, trainer in trainers.items():
            before = refresh_clock(spec, trainer)
            t0 = time.perf_counter()
            trainer.train_step()
            seconds = time.perf_counter() - t0 - (refresh_clock(spec, trainer) - before)
            if round_:
                step_times[spec].append(seconds)
        for spec, trainer in trainers.items():
            seconds = renew_all(spec, trainer)
            if round_ and seconds is not None:
                refresh_times[spec].append(seconds)
    return {
        spec: {
            "step_s": statistics.median(step_times[spec]),
            "refresh_all_s": statistics.median(refresh_times[spec]) if refresh_times[spec] else None,
            "timing_repeats": repeats,
        }
        for spec in trainers
    }


# ------------------------------------------------------------------ state per config


def config_states(config_name: str, methods: list[str]) -> list[dict]:
    """Optimizer-state bytes of every method on ``config_name`` after one step (1 x 32 tokens),
    with the embedding on AdamW and projected (``+emb``); against AdamW's."""
    config = PretrainConfig(
        config=config_name, steps=1, batch_size=1, seq_len=32, warmup=1, rank=64, update_proj_gap=50,
        eval_tokens=0, eval_every=10**6, checkpoint_every=10**6,
    )  # fmt: skip
    data = load_data(config)
    measured: dict[str, int] = {}
    for method in methods:
        for spec in (method, method + EMB) if method != "adamw" else (method,):
            trainers, failed = build_trainers(config, [spec], data)
            if spec in trainers:
                trainers[spec].train_step()
                measured[spec] = state_bytes(trainers[spec])
            del trainers
            gc.collect()
    base = measured["adamw"]
    rows = []
    for method in methods:
        row = {"method": method, "state_bytes": measured.get(method), "state_emb_bytes": measured.get(method + EMB)}
        for key in ("state_bytes", "state_emb_bytes"):
            row[key.replace("bytes", "vs_adamw")] = None if row[key] is None else row[key] / base
        rows.append(row)
    return rows


def parameter_split(config_name: str) -> dict:
    """Total parameters and the embedding's (tied) of ``config_name``."""
    from rankwise.pretrain import build_model, load_tokenizer

    m = PretrainConfig(config=config_name).model
    model = build_model(m, load_tokenizer(m.tokenizer))
    return {"parameters": sum(p.numel() for p in model.parameters()), "embedding": model.model.embed_tokens.weight.numel()}


# ------------------------------------------------------------------ main


def default_specs() -> list[str]:
    """The table: every method with the embedding on AdamW (the papers' and galore-torch's
    setting; projecting the embedding cost much perplexity at equal tokens on llama-20m, see
    docs/optim.md), plus GaLore and FRUGAL with the embedding projected (what the state target
    needs on llama-20m: FRUGAL's state-free residual update keeps the embedding learning)."""
    return [*OPTIMIZER_METHODS, "galore" + EMB, "frugal" + EMB, *layer_methods()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4-layer 256-wide byte-tokenizer LLaMA (llama-small), 12 steps (minutes)")
    ap.add_argument("--budget", default=None, help="per method: minutes ('10min', the full run's default) or tokens ('800k', '2M'; quick: '3072')")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (overrides --budget)")
    ap.add_argument("--methods", nargs="*", default=None, help="only these methods; 'NAME+emb' also projects the embedding (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print the table; do not write bench/results or docs/benchmarks.md")
    ap.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--refresh-only", action="store_true", help="only the refresh benchmark; keep the last table")
    args = ap.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.quick)
        return
    t_start = time.perf_counter()
    name = name_of(args)
    repeats = 3 if args.quick else 7
    if args.refresh_only:
        import json

        from _common import RESULTS

        last = json.loads((RESULTS / f"{name}.json").read_text())
        rows, n_params, states = last["rows"], last["parameters"], last.get("states", {})
        config = PretrainConfig(**last["settings"])
        estimate = last.get("estimate", {"budget": f"{config.steps} steps per method", "total_s": float("nan")})
        estimate["previous_run_s"] = last.get("whole_run_s")
    else:
        specs = args.methods or default_specs()
        config, estimate = plan(args, specs)
        rows, n_params = train_all(config, specs, repeats)
        gc.collect()
        for row in rows:  # quick: only the optimizers (a child process each costs ~30 s here)
            if "error" not in row and (not args.quick or split_spec(row["method"])[0] in OPTIMIZER_METHODS):
                row["peak_rss_bytes"] = peak_memory(row["method"], args.quick)
        base = next((r for r in rows if r["method"] == "adamw"), None)
        for row in rows:
            if "error" not in row and base is not None:
                row["state_vs_adamw"] = row["state_bytes"] / base["state_bytes"]
                row["step_vs_adamw"] = row["step_s"] / base["step_s"]
        methods = sorted({split_spec(s)[0] for s in specs}, key=[*OPTIMIZER_METHODS, *layer_methods()].index)
        ordered = ["adamw", *(m for m in methods if m != "adamw")]
        states = {c: {**parameter_split(c), "rows": config_states(c, ordered)} for c in STATE_CONFIGS}
    micro = refresh_benchmarks(args.quick)
    report(args, config, n_params, rows, states, micro, estimate, time.perf_counter() - t_start)


def _mb(v: int | None) -> str:
    return "–" if v is None else f"{v / 2**20:.2f}"


def _s(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main_table(rows: list[dict]) -> str:
    header = ["method", "val. perplexity", "optimizer state (MB)", "vs AdamW", "weights (MB)", "peak RSS (MB)",
              "step w/o refresh (s)", "step vs AdamW", "one full refresh (s)", "refresh per step (s)"]  # fmt: skip
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["method"], f"could not run: {r['error'][:80]}"] + [""] * (len(header) - 2))
            continue
        table_rows.append([
            r["method"], f"{r['val_ppl']:.2f}", _mb(r["state_bytes"]), _s(r.get("state_vs_adamw"), 2),
            _mb(r["weight_bytes"]), _mb(r.get("peak_rss_bytes")).split(".")[0], _s(r.get("step_s")),
            _s(r.get("step_vs_adamw"), 2), _s(r.get("refresh_all_s")), _s(r.get("refresh_per_step_s"), 4),
        ])  # fmt: skip
    return markdown_table(header, table_rows)


def state_table(states: list[dict]) -> str:
    header = ["method", "state, embedding on AdamW (MB)", "vs AdamW", "state, embedding projected (MB)", "vs AdamW",
              "≥ 40% below AdamW"]  # fmt: skip

    def verdict(r: dict) -> str:
        ok = [k for k in ("state_vs_adamw", "state_emb_vs_adamw") if r[k] is not None and r[k] <= STATE_BAR]
        if r["method"] == "adamw":
            return "(baseline)"
        if "state_vs_adamw" in ok:
            return "yes"
        return "with the embedding projected" if ok else "**no**"

    table_rows = [
        [r["method"], _mb(r["state_bytes"]), _s(r["state_vs_adamw"], 2), _mb(r["state_emb_bytes"]),
         _s(r["state_emb_vs_adamw"], 2), verdict(r)]
        for r in states
    ]  # fmt: skip
    return markdown_table(header, table_rows)


def states_section(states: dict) -> str:
    """One state table per config of :data:`STATE_CONFIGS`, with its parameter split."""
    parts = []
    for name, st in states.items():
        m = PretrainConfig(config=name).model
        parts.append(
            f"`{name}` ({m.layers} layers × {m.hidden} wide, MLP {m.intermediate}, {m.tokenizer} tokenizer, tied "
            f"embeddings: {st['embedding'] / 1e6:.1f}M of its {st['parameters'] / 1e6:.1f}M parameters, "
            f"{100 * st['embedding'] / st['parameters']:.0f}%, are the embedding):\n\n{state_table(st['rows'])}"
        )
    return "\n\n".join(parts)


def refresh_section(micro: list[dict]) -> str:
    """The refresh benchmark: one line per model, one table row per shape."""
    header = ["model", "shape (count)", "rank", "auto path", "galore-torch (s)", "rankwise (s)", "speed-up",
              "iteration (s)", "gram (s)", "energy vs exact, worst: rankwise / iteration / gram"]  # fmt: skip
    rows, lines = [], []
    for r in micro:
        lines.append(
            f"`{r['config']}` ({r['matrices']} block matrices after {r['steps']} AdamW steps, rank {r['rank']}): "
            f"galore-torch {r['galore_torch_s']:.3f} s vs rankwise {r['rankwise_s']:.3f} s for all of them, "
            f"**{r['speedup']:.1f}×**, worst captured energy {100 * r['energy_ratio_min']:.3f}% of the exact subspace's"
        )
        for b in r["by_shape"]:
            t, e = b["times"], b["energy_min"]
            rows.append([
                r["config"], f"{'×'.join(map(str, b['shape']))} ({b['count']})", r["rank"], b["auto"],
                f"{t['galore-torch']:.4f}", f"{t['rankwise']:.4f}", f"{b['speedup']:.1f}×", f"{t['iteration']:.4f}",
                f"{t['gram']:.4f}", " / ".join(f"{100 * e[k]:.3f}%" for k in ("rankwise", "iteration", "gram")),
            ])  # fmt: skip
    return "\n".join(f"- {line}" for line in lines) + "\n\n" + markdown_table(header, rows)


def report(args, config: PretrainConfig, n_params: int, rows: list[dict], states: dict, micro: list[dict],
           estimate: dict, seconds: float) -> None:  # fmt: skip
    mode = "quick" if args.quick else "full"
    m = config.model
    repeats = next((r["timing_repeats"] for r in rows if "timing_repeats" in r), "?")
    md = (
        f"## Low-rank optimizers and layers, pretraining (`bench/optim.py`, {mode} mode)\n\n"
        f"`{config.config}`: LLaMA {m.layers} layers × {m.hidden} wide (MLP {m.intermediate}), "
        f"{m.tokenizer} tokenizer, {n_params / 1e6:.1f}M parameters, random init (seed {config.seed}); "
        f"budget {estimate['budget']}: {config.steps} steps of {config.batch_size}×{config.seq_len} tokens of the "
        f"built-in corpus ({config.steps * config.batch_size * config.seq_len:,} tokens, the same batches for "
        f"every method), lr {config.lr:g} with {config.warmup} warm-up steps then cosine to 10%, eps 1e-6, no "
        f"weight decay. Every method is a `rankwise.pretrain.Trainer` (the loop of `rankwise pretrain`). "
        f"Projected optimizers: every block matrix at rank {config.rank}, update_proj_gap "
        f"{config.update_proj_gap}, scale {config.scale}, proj_type std; the embedding / LM head and norms "
        f"use AdamW, except in `+emb` rows, where the embedding / LM head is projected at rank {config.rank} "
        f"too (`--project-embeddings`). Layer types: every block linear layer converted at rank {config.rank} "
        f"(default options), trained with AdamW. Validation perplexity on {config.eval_tokens:,} validation "
        "tokens; optimizer state and weights after training; peak RSS: a child process running three steps "
        "of that method alone, counted from after the corpus is read (quick mode: optimizers only). Times "
        f"come from a timing phase after training, round-robin over the methods, median of {repeats} rounds: "
        "a step (forward, backward, update) with the time of any subspace refresh inside it subtracted, and "
        "one refresh of every subspace of the model from the current gradients (its cost per step is that "
        f"divided by update_proj_gap {config.update_proj_gap}, whether refreshes are staggered or not). The "
        "budget is far below a real pretraining run: perplexities compare methods at equal tokens, not "
        "converged models.\n\n"
        f"{main_table(rows)}\n\n"
        "Optimizer state after one step, with the embedding / LM head on AdamW (as above) and projected at "
        "rank 64 (`--project-embeddings`; for a layer type, GaLore on the embedding alone), against the "
        "target \"every method's optimizer state ≥ 40% below full-rank AdamW's\", on the full run's model "
        "and on `llama-20m`, whose 49k-token vocabulary puts most parameters in the embedding:\n\n"
        f"{states_section(states)}\n\n"
        "Refresh benchmark: the block-matrix gradients of each model after a few AdamW steps go to "
        "galore-torch's refresh (full `torch.linalg.svd`) and to rankwise's (`SVDProjector`, exactly as "
        "GaLoreAdamW calls it: `leading_subspace` with its `auto` path), and to each path of "
        "`leading_subspace` forced (`iteration`: randomized subspace iteration; `gram`: eigh of the small "
        "side's Gram), interleaved, median of "
        f"{micro[0]['repeats'] if micro else '?'} repeats; targets: ≥ 3× at ≥ 99% of the energy galore-torch's "
        "exact subspace captures.\n\n"
        f"{refresh_section(micro)}\n\n"
        f"_{whole_run(estimate, seconds)}_\n"
    )
    payload = {
        "mode": mode, "settings": config.to_dict(), "parameters": n_params, "rows": rows,
        "states": states, "estimate": estimate, "refresh": micro,
        "whole_run_s": estimate.get("previous_run_s") or seconds,
    }  # fmt: skip
    if args.no_write:
        print(md)
        return
    write_results(name_of(args), payload, md)


def whole_run(estimate: dict, seconds: float) -> str:
    """The run-time line (a --refresh-only rerun keeps the training run's time and says so)."""
    planned = f"estimated at the start: {estimate['total_s'] / 60:.0f} min"
    previous = estimate.get("previous_run_s")
    if previous:
        return f"Whole run: {previous / 60:.1f} min ({planned}); refresh benchmark rerun alone: {seconds / 60:.1f} min."
    return f"Whole run: {seconds / 60:.1f} min ({planned})."


def name_of(args) -> str:
    return "optim_quick" if args.quick else "optim"


if __name__ == "__main__":
    main()
