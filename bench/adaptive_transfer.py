"""Pruning, transfer and federated adapters at small scale, each next to plain LoRA.

One row per method, reproducing its paper's qualitative claim, with plain LoRA trained for
the same number of steps at the same rank as the reference:

- LoRAPrune: pruning guided by LoRA gradients keeps a lower perplexity than pruning the
  same units by weight magnitude or at random (each then trained with the same LoRA steps);
- LoRAM: a LoRA trained on a 50%-pruned copy and recovered to the full model beats the full
  model without adapter and comes near a LoRA trained on the full model, while training
  against fewer base parameters; aligning the pruned copy first (a short continual
  pre-training on other general text) brings it nearer;
- Trans-LoRA: an adapter moved to another base model with synthetic data from the source
  base alone comes near a LoRA trained on the target with the real task data; filtering the
  synthetic data with the discriminator brings it nearer;
- FedSVD: at the same rank, clients and rounds, FedSVD beats FFA-LoRA (frozen random A),
  and so it does with DP-SGD clients (per-sample clip 1, noise multiplier 1): its
  re-orthogonalised A keeps more signal under the same noise than the fixed A or FedAvg;
- FRL: with one of four clients poisoned, FRL's model moves less than FedAvg's.

Perplexity on the built-in corpus's validation split (``seq_len`` 64); the Trans-LoRA task is
the license texts on the machine (held-out corpus; code snippets with ``--quick``). Full mode
uses SmolLM2-135M (minutes); ``--quick`` the tiny Llama (under a minute). Quality numbers,
not timings: no speed claim is made here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import markdown_table, write_results  # noqa: E402
from rankwise.adapters import attach, disable  # noqa: E402
from rankwise.adapters.federated import FRL, FedAvgLoRA, FedSVD, RoundConfig, simulate  # noqa: E402
from rankwise.adapters.local_training import batches_of, train_adapters  # noqa: E402
from rankwise.adapters.loram import LoramConfig, loram, loram_prune  # noqa: E402
from rankwise.adapters.prune import LoraPruneConfig, lora_prune  # noqa: E402
from rankwise.adapters.trans_lora import TransLoraConfig, transfer  # noqa: E402
from rankwise.data import heldout_texts, load_corpus, perplexity  # noqa: E402
from rankwise.models import count_parameters, load_model, tiny_llama  # noqa: E402

SEQ = 64
TINY_TASK = ["def add(a, b):\n    return a + b\n", "def mul(x, y):\n    return x * y\n", "def neg(v):\n    return -v\n"]


class Setup:
    """The model, data and budgets of one run (quick: tiny Llama; full: SmolLM2)."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.name = "tiny-llama" if quick else "smollm2"
        self.base, self.tok = load_model(self.name)
        corpus = load_corpus()
        self.train = self.blocks(corpus.train[:80], 16_000 if quick else 40_000)
        self.general = self.blocks(corpus.train[80:160], 8_000 if quick else 20_000)  # LoRAM's alignment text
        self.validation = corpus.validation[:30]
        self.eval_tokens = 3_000 if quick else 8_000
        self.steps, self.rank, self.lr = (30, 8, 3e-3) if quick else (60, 8, 1e-3)
        task = TINY_TASK * 40 if quick else list(heldout_texts())
        self.task = self.blocks(task, 40 * SEQ)
        self.seeds = TINY_TASK if quick else [t[:600] for t in heldout_texts() if len(t) > 600][:4]

    def blocks(self, texts, max_tokens: int) -> torch.Tensor:
        ids = torch.tensor(self.tok("\n".join(texts))["input_ids"][:max_tokens])
        n = len(ids) // SEQ
        return ids[: n * SEQ].view(n, SEQ)

    def fresh(self):
        return copy.deepcopy(self.base)

    def ppl(self, model) -> float:
        return perplexity(model, self.tok, self.validation, seq_len=SEQ, max_tokens=self.eval_tokens).perplexity

    def task_loss(self, model) -> float:
        model.eval()
        with torch.no_grad():
            x = self.task[-8:]
            return model(input_ids=x, labels=x).loss.item()

    def lora(self, model, blocks, steps=None, targets="all-linear"):
        torch.manual_seed(0)
        attach(model, "lora", targets, rank=self.rank)
        return train_adapters(model, batches_of(blocks, 4), steps=steps or self.steps, lr=self.lr)


def lora_prune_row(s: Setup) -> dict:
    iterations, per = 3, s.steps // 3
    model = s.fresh()
    result = lora_prune(model, s.train, LoraPruneConfig(ratio=0.5, iterations=iterations, steps_per_iteration=per, recovery_steps=per, rank=s.rank, lr=s.lr))
    total = iterations * per + per
    out = {"lora_prune": s.ppl(model), "kept_parameters": result.kept_fraction}
    for criterion in ("magnitude", "random"):
        small, _ = loram_prune(s.fresh(), 0.5, criterion=criterion)
        s.lora(small, s.train, steps=total)
        out[criterion] = s.ppl(small)
    full = s.fresh()
    s.lora(full, s.train, steps=total)
    out["plain_lora"] = s.ppl(full)
    out["base"] = s.ppl(s.base)
    return out


def loram_row(s: Setup) -> dict:
    model = s.fresh()
    result = loram(model, s.train, LoramConfig(ratio=0.5, steps=s.steps, rank=s.rank, lr=s.lr))
    with disable(model):
        base = s.ppl(model)
    aligned = s.fresh()
    config = LoramConfig(ratio=0.5, steps=s.steps, rank=s.rank, lr=s.lr, align_steps=s.steps, align_lr=s.lr / 10)
    loram(aligned, s.train, config, align_blocks=s.general)
    full = s.fresh()
    s.lora(full, s.train)
    return {
        "loram": s.ppl(model), "loram_aligned": s.ppl(aligned), "base": base, "plain_lora": s.ppl(full),
        "trained_against": result.parameters[1] / result.parameters[0],
    }


def target_model(s: Setup):
    if s.quick:
        return tiny_llama(seed=1, hidden=48)[0]
    return loram_prune(s.base, 0.25)[0]  # the "new base": a smaller SmolLM2


def trans_lora_row(s: Setup) -> dict:
    source = s.fresh()
    s.lora(source, s.task)
    target = target_model(s)
    base = s.task_loss(target)
    config = TransLoraConfig(samples=32, length=SEQ, prompt_tokens=16, steps=s.steps, rank=s.rank, lr=s.lr, batch_size=4)
    transfer(source, target, s.tok, s.seeds, config)
    filtered = target_model(s)
    transfer(source, filtered, s.tok, s.seeds, dataclasses.replace(config, discriminator=True, keep=0.5))
    direct = target_model(s)
    s.lora(direct, s.task)
    return {
        "source": s.task_loss(source), "target_base": base, "trans_lora": s.task_loss(target),
        "trans_lora_filtered": s.task_loss(filtered), "plain_lora_on_target": s.task_loss(direct),
    }


DP = {"dp_clip": 1.0, "dp_noise_multiplier": 1.0}


def federated(s: Setup, strategy, attackers=(), **dp) -> float:
    clients = [s.train[i::4] for i in range(4)]
    rounds = 3 if s.quick else 5
    config = RoundConfig(rounds=rounds, local_steps=max(2, s.steps // (2 * rounds)), lr=s.lr, batch_size=4, attackers=attackers, **dp)
    model = s.fresh()
    simulate(model, strategy, clients, config)
    return s.ppl(model)


def fedsvd_row(s: Setup) -> dict:
    return {
        "fedsvd": federated(s, FedSVD(rank=s.rank)),
        "ffa_lora": federated(s, FedSVD(rank=s.rank, reorthogonalise=False)),
        "fedavg_lora": federated(s, FedAvgLoRA(rank=s.rank)),
    }


def fedsvd_dp_row(s: Setup) -> dict:
    return {
        "fedsvd": federated(s, FedSVD(rank=s.rank), **DP),
        "ffa_lora": federated(s, FedSVD(rank=s.rank, reorthogonalise=False), **DP),
        "fedavg_lora": federated(s, FedAvgLoRA(rank=s.rank), **DP),
    }


def frl_row(s: Setup) -> dict:
    return {
        "frl": federated(s, FRL(rank=s.rank, init_scale=0.05, score_lr=0.1)),
        "frl_attacked": federated(s, FRL(rank=s.rank, init_scale=0.05, score_lr=0.1), attackers=(0,)),
        "fedavg_lora": federated(s, FedAvgLoRA(rank=s.rank)),
        "fedavg_attacked": federated(s, FedAvgLoRA(rank=s.rank), attackers=(0,)),
    }


def markdown(s: Setup, rows: dict) -> str:
    p, m, t, f, r = rows["lora_prune"], rows["loram"], rows["trans_lora"], rows["fedsvd"], rows["frl"]
    d = rows["fedsvd_dp"]
    table = markdown_table(
        ["method", "claim", "method's number", "comparison", "plain LoRA (same steps, rank)", "claim holds"],
        [
            ["LoRAPrune (50% heads+channels)", "LoRA-guided pruning beats magnitude/random pruning",
             f"ppl {p['lora_prune']:.1f}", f"magnitude {p['magnitude']:.1f}, random {p['random']:.1f}",
             f"unpruned {p['plain_lora']:.1f} (base {p['base']:.1f})", p["lora_prune"] < min(p["magnitude"], p["random"])],
            ["LoRAM (train on 50% pruned)", "recovered adapter beats no adapter, near full LoRA",
             f"ppl {m['loram']:.1f}", f"no adapter {m['base']:.1f}; trained against {100 * m['trained_against']:.0f}% of base params",
             f"{m['plain_lora']:.1f}", m["loram"] < m["base"]],
            ["LoRAM, pruned copy aligned first", "alignment brings the recovered adapter nearer full LoRA",
             f"ppl {m['loram_aligned']:.1f}", f"LoRAM without alignment {m['loram']:.1f}",
             f"{m['plain_lora']:.1f}", m["loram_aligned"] < m["loram"]],
            ["Trans-LoRA", "synthetic-data transfer beats the target base (gap to real-data LoRA shown)",
             f"task loss {t['trans_lora']:.3f}", f"target base {t['target_base']:.3f}; source+adapter {t['source']:.3f}",
             f"{t['plain_lora_on_target']:.3f} (real data)", t["trans_lora"] < t["target_base"]],
            ["Trans-LoRA, discriminator filter (keep 50%)", "filtered synthetic data transfers better",
             f"task loss {t['trans_lora_filtered']:.3f}", f"unfiltered {t['trans_lora']:.3f}",
             f"{t['plain_lora_on_target']:.3f} (real data)", t["trans_lora_filtered"] < t["trans_lora"]],
            ["FedSVD (4 clients)", "beats FFA-LoRA (frozen random A)",
             f"ppl {f['fedsvd']:.1f}", f"FFA-LoRA {f['ffa_lora']:.1f}", f"FedAvg of A,B {f['fedavg_lora']:.1f}",
             f["fedsvd"] < f["ffa_lora"]],
            ["FedSVD, DP-SGD clients (clip 1, noise 1)", "beats FFA-LoRA at the same privacy noise",
             f"ppl {d['fedsvd']:.1f}", f"FFA-LoRA {d['ffa_lora']:.1f}", f"FedAvg of A,B {d['fedavg_lora']:.1f}",
             d["fedsvd"] < d["ffa_lora"]],
            ["FRL (1 of 4 clients poisoned)", "votes limit a poisoned client's effect",
             f"ppl {r['frl']:.1f} -> {r['frl_attacked']:.1f} attacked", f"FedAvg {r['fedavg_lora']:.1f} -> {r['fedavg_attacked']:.1f} attacked",
             f"{r['fedavg_lora']:.1f}", abs(r["frl_attacked"] - r["frl"]) < abs(r["fedavg_attacked"] - r["fedavg_lora"])],
        ],
    )
    return (
        f"## Pruning, transfer and federated adapters ({s.name})\n\n"
        f"`bench/adaptive_transfer.py{' --quick' if s.quick else ''}`: rank {s.rank}, {s.steps} LoRA steps at lr "
        f"{s.lr:g} per trained adapter, blocks of {SEQ} tokens; perplexity on the built-in validation split "
        f"({s.eval_tokens} tokens); Trans-LoRA task loss on {'code snippets' if s.quick else 'the license texts'}. "
        "Lower is better. See docs/transfer.md."
        + (
            " The tiny Llama has random weights: `--quick` checks the pipeline end to end; the "
            "claims are SmolLM2's (run without `--quick`)."
            if s.quick
            else ""
        )
        + "\n\n"
        + table
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, under a minute")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    s = Setup(args.quick)
    rows = {}
    for name, fn in [("lora_prune", lora_prune_row), ("loram", loram_row), ("trans_lora", trans_lora_row), ("fedsvd", fedsvd_row), ("fedsvd_dp", fedsvd_dp_row), ("frl", frl_row)]:
        t = time.perf_counter()
        rows[name] = fn(s)
        print(f"{name}: {rows[name]} ({time.perf_counter() - t:.0f} s)", flush=True)
    payload = {"model": s.name, "quick": args.quick, "rank": s.rank, "steps": s.steps, "rows": rows,
               "base_parameters": count_parameters(s.base), "seconds": time.perf_counter() - t0}
    write_results("adaptive_transfer", payload, markdown(s, rows))
    print(markdown(s, rows))


if __name__ == "__main__":
    main()
