"""``modegpt``: modular decomposition of transformer module pairs (MoDeGPT, Lin et al. 2024,
Sec. 3.2–3.4, Alg. 1–3). Shrinks inner *dimensions* of matrix pairs instead of inserting factors.

For each decoder block (Llama-style: ``mlp.{gate,up,down}_proj``, ``self_attn.{q,k,v,o}_proj``):

- **MLP, type I (Nyström).** The pair ``up/gate → down`` shares the intermediate dimension
  ``I``. With ``C = Σ z zᵀ`` the Gram of the intermediate activations ``z = σ(gate x) ⊙ up x``
  (exactly the input Gram of ``down_proj``, which calibration already keeps), pick ``k``
  columns ``S`` by ridge leverage scores ``diag(C (C + λI)⁻¹)`` (``λ = ridge · mean diag C``)
  and set ``gate' = gate[S]``, ``up' = up[S]``, ``down' = down · C[:, S] C[S, S]⁻¹`` — the
  Nyström reconstruction of ``z`` from its kept coordinates. The MLP really gets ``k``
  channels (plain linear layers of the new shape).
- **VO, type III (SVD).** Per KV group ``g`` (value head ``V_g (d, H)``, output blocks ``O_h
  (H, d)`` of its query heads), minimise ``Σ_h ‖(O_h V_g − Ô_h V̂_g) X‖`` with ``X`` the
  attention input (whitened by its Gram ``L Lᵀ``): with ``V_g L = U Σ Wᵀ`` and ``Z`` the top-``k``
  right singular vectors of ``[O_h U Σ]_h`` (stacked), ``V̂_g = Zᵀ Σ⁻¹ Uᵀ V_g (k, H)`` and
  ``Ô_h = O_h U Σ Z (H, k)``. With one query head per group this is the paper's per-head SVD
  of ``O_h V_h L``; with grouped-query attention the stacked SVD keeps ``V̂_g`` shared.
- **QK, type II (CR).** Per KV group keep the ``p`` rotary pairs of head dims with the largest
  norm products ``Σ_h ‖Q_h[j] L‖ · ‖K_g[j] L‖`` (CR column selection). RoPE rotates dim ``j``
  with ``j + d/2``, so dims are kept or dropped in those pairs: the attention scores are then
  exactly the sums over kept pairs, rotary embedding included.

Realisation: Hugging Face attention needs one ``head_dim`` for q, k and v, so kept value / query
-key dims are written into their slots of each head by a
:class:`~rankwise.layers.ScatterLinear` (zeros elsewhere) and ``o_proj`` reads only
kept slots (:class:`~rankwise.layers.GatherLinear`). Parameters shrink as in the
paper (plus the int32 slot indices, counted); attention FLOPs and the KV cache do not — a
custom attention with per-layer ``qk_dim``/``v_dim`` would, and is not written.

Budget: one keep fraction ``t`` for every part (``k = t·I``, ``k_v = t·d``, ``p = t·d/2``),
largest ``t`` that fits (bisection), then the leftover is filled one MLP channel per block in
turn (``allocate.py``). The paper allocates per-layer sparsity from block-importance scores;
that is not done here: the only ``--allocate`` it supports is this ``uniform`` one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress.allocate import bisect_knob, greedy_fill
from rankwise.compress.base import (
    CompressionJob,
    CompressionMethod,
    damped_cholesky,
    register_method,
)
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError, ModelError
from rankwise.layers import GatherLinear, ResizedLinear, ScatterLinear, module_storage_bits
from rankwise.modules import replace_module
from rankwise.progress import Bar

PARTS = ("mlp", "vo", "qk")


def ridge_leverage_scores(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """``diag(C (C + λI)⁻¹)`` with ``λ = ridge · mean(diag C)``, shape ``(n,)``."""
    c = gram.to(torch.float64)
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    evals = evals.clamp(min=0)
    lam = ridge * max(float(c.diagonal().mean()), 1e-300)
    return (evecs.pow(2) * (evals / (evals + lam))).sum(1)


def nystrom_mlp(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gram: torch.Tensor,
    keep: int,
    *,
    ridge: float = 1.0,
    damp: float = 1e-6,
):
    """Type-I compression of an MLP to ``keep`` intermediate channels.

    ``gate, up (I, H)``, ``down (H, I)``, ``gram (I, I)`` of the intermediate activations.
    Returns ``(index (k,), gate' (k, H), up' (k, H), down' (H, k))``.
    """
    scores = ridge_leverage_scores(gram, ridge)
    index = scores.topk(keep).indices.sort().values
    c = gram.to(torch.float64)
    sub = c[index][:, index]
    sub = sub + damp * max(float(sub.diagonal().mean()), 1e-300) * torch.eye(keep, dtype=c.dtype)
    # down' = down C[:, S] C[S, S]⁻¹, via a symmetric solve: C[S,S] Xᵀ = (down C[:, S])ᵀ
    new_down = torch.linalg.solve(sub, (down.to(torch.float64) @ c[:, index]).T).T
    return index, gate[index], up[index], new_down


def vo_svd(values: torch.Tensor, outputs: list[torch.Tensor], chol: torch.Tensor, keep: int):
    """Type-III compression of one KV group: ``values (d, H)``, ``outputs`` = ``O_h (H, d)`` per
    query head of the group, ``chol (H, H)`` lower Cholesky factor of the input Gram.

    Returns ``(V̂ (k, H), [Ô_h (H, k)], R (k, d))`` with ``V̂ = R V`` (``R`` maps a value bias too).
    """
    v = values.to(torch.float64)
    u, s, _ = torch.linalg.svd(v @ chol, full_matrices=False)  # (d, d), (d,)
    s = s.clamp(min=float(s[0]) * 1e-10 if float(s[0]) > 0 else 1e-300)
    stacked = torch.cat([o.to(torch.float64) @ (u * s) for o in outputs])  # (n_g·H, d)
    _, _, zt = torch.linalg.svd(stacked, full_matrices=False)
    z = zt[:keep].T  # (d, k)
    mix = (z.T / s) @ u.T  # R = Zᵀ Σ⁻¹ Uᵀ, (k, d)
    return mix @ v, [o.to(torch.float64) @ (u * s) @ z for o in outputs], mix


def qk_pairs(
    queries: list[torch.Tensor], key: torch.Tensor, chol: torch.Tensor, keep_pairs: int
) -> torch.Tensor:
    """Type-II selection for one KV group: the ``keep_pairs`` rotary pairs (``j``, ``j + d/2``) of
    head dims with the largest ``Σ_h ‖Q_h[pair] L‖ · ‖K[pair] L‖``. Returns the kept dims, sorted."""
    d = key.shape[0]
    half = d // 2

    def pair_norms(m: torch.Tensor) -> torch.Tensor:
        rows = (m.to(torch.float64) @ chol).pow(2).sum(1)  # (d,) ‖row · L‖²
        return (rows[:half] + rows[half:]).sqrt()

    key_norm = pair_norms(key)
    score = sum(pair_norms(q) * key_norm for q in queries)
    pairs = score.topk(keep_pairs).indices.sort().values
    return torch.cat([pairs, pairs + half]).sort().values


def block_parts(model: nn.Module, layers: dict[str, nn.Linear]) -> list[dict]:
    """Every decoder block's projections, head counts and module names."""
    blocks = []
    for name, module in model.named_modules():
        mlp, attn = getattr(module, "mlp", None), getattr(module, "self_attn", None)
        if mlp is None or attn is None:
            continue
        prefix = f"{name}." if name else ""
        names = {p: f"{prefix}mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        names |= {p: f"{prefix}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        missing = [n for n in names.values() if n not in layers]
        if missing:
            raise ModelError(
                f"modegpt needs Llama-style blocks; {missing[0]!r} is not a compressible linear layer"
            )
        config = getattr(attn, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(attn, "head_dim", None)
        if not heads or not head_dim or head_dim % 2:
            raise ModelError(
                f"modegpt cannot read the head layout of {name!r} (heads={heads}, head_dim={head_dim})"
            )
        blocks.append({"names": names, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim})
    if not blocks:
        raise ModelError(
            f"modegpt found no decoder blocks with .mlp and .self_attn in {type(model).__name__}"
        )
    return blocks


@register_method
@dataclass(frozen=True)
class MoDeGPT(CompressionMethod):
    """MLP Nyström + VO SVD + QK CR (rotary pairs) per block, one keep fraction for all."""

    parts: tuple[str, ...] = PARTS
    ridge: float = 1.0
    damp: float = 1e-4

    name = "modegpt"
    summary = "MoDeGPT: shrink MLP/head dims per module pair (Nystrom, CR, SVD; MoDeGPT 2024)"
    needs = frozenset({"gram"})
    allocations = ("uniform",)
    layer_tensors = ("weight", "index")
    closed_loop = True  # reads each block's statistics, then compresses it, block by block

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        bad = sorted(set(self.parts) - set(PARTS))
        if bad or not self.parts:
            raise ConfigError(
                f"modegpt parts must be a non-empty subset of {PARTS}; got {self.parts}"
            )
        if not self.ridge > 0 or not 0.0 < self.damp < 1.0:
            raise ConfigError(
                f"modegpt needs ridge > 0 and damp in (0, 1); got {self.ridge}, {self.damp}"
            )

    def _sizes(self, block: dict, dims: dict[str, int], t: float) -> dict[str, int]:
        return {
            "mlp": max(1, round(t * dims["mlp"])) if "mlp" in self.parts else dims["mlp"],
            "vo": max(1, round(t * block["head_dim"])) if "vo" in self.parts else block["head_dim"],
            "qk": max(1, round(t * block["head_dim"] / 2))
            if "qk" in self.parts
            else block["head_dim"] // 2,
        }

    @staticmethod
    def _cost(block: dict, dims: dict[str, int], size: dict[str, int], element_bits: int) -> int:
        h, n_h, n_kv, d = dims["hidden"], block["heads"], block["kv_heads"], block["head_dim"]
        idx = 32 / element_bits  # one int32 slot index, in parameters
        cost = 3 * h * size["mlp"]
        for kept in (size["vo"], 2 * size["qk"]):  # (v, o) then (q, k): n_kv + n_h heads each
            cost += math.ceil((n_kv + n_h) * kept * (h + idx)) if kept < d else (n_kv + n_h) * d * h
        return cost

    def compress_model(self, job: CompressionJob) -> list[LayerReport]:
        calibration = self.require(job.calibration)
        model, layers, budget, element_bits = job.model, job.layers, job.budget, job.element_bits
        blocks = block_parts(model, layers)
        covered = {n for b in blocks for n in b["names"].values()}
        fixed = sum(m.weight.numel() for n, m in layers.items() if n not in covered)
        dims = [
            {
                "mlp": layers[b["names"]["down_proj"]].in_features,
                "hidden": layers[b["names"]["down_proj"]].out_features,
            }
            for b in blocks
        ]

        def block_cost(i: int, t: float, extra: int = 0) -> int:
            size = self._sizes(blocks[i], dims[i], t)
            size["mlp"] = min(dims[i]["mlp"], size["mlp"] + extra)
            return self._cost(blocks[i], dims[i], size, element_bits)

        def total(t: float) -> int:
            return fixed + sum(block_cost(i, t) for i in range(len(blocks)))

        floor = total(0.0)
        if floor > budget:
            raise ConfigError(
                f"modegpt: a budget of {budget:,} is below the smallest model it makes ({floor:,})"
            )
        t = bisect_knob(total, budget)

        def step(i: int, extra: int) -> int | None:  # one more MLP channel in block i
            if self._sizes(blocks[i], dims[i], t)["mlp"] + extra >= dims[i]["mlp"]:
                return None
            return block_cost(i, t, extra + 1) - block_cost(i, t, extra)

        extra = greedy_fill(
            {i: 0 for i in range(len(blocks))}, budget - total(t), step=step, gain=lambda i, e: 1.0
        )
        rows: list[LayerReport] = []
        bar = Bar(len(blocks), "modegpt: decompose blocks", show=job.progress)
        for i, block in enumerate(blocks):
            size = self._sizes(block, dims[i], t)
            size["mlp"] = min(dims[i]["mlp"], size["mlp"] + extra[i])
            errors = self._compress_block(model, layers, calibration, block, size)
            for part, name in block["names"].items():
                layer, module = layers[name], model.get_submodule(name)
                kept, error = errors.get(part, (None, 0.0))
                rows.append(
                    LayerReport.of(
                        name, layer, module, kind=part, rank=None,
                        parameters_after=-(-module_storage_bits(module) // element_bits),
                        relative_error=error, **({} if kept is None else {"kept": kept}),
                    )  # fmt: skip
                )
            bar.update(1)
        bar.close()
        return rows

    def _compress_block(
        self, model, layers, calibration, block, size
    ) -> dict[str, tuple[int, float]]:
        names, stats = block["names"], calibration.stats
        n_h, n_kv, d = block["heads"], block["kv_heads"], block["head_dim"]
        group = n_h // n_kv
        errors: dict[str, tuple[int, float]] = {}

        def put(name: str, module: nn.Module) -> None:
            replace_module(model, name, module, expect=nn.Linear)

        def weight(part: str) -> torch.Tensor:
            return layers[names[part]].weight.detach().to(torch.float64)

        def bias(part: str) -> torch.Tensor | None:
            b = layers[names[part]].bias
            return None if b is None else b.detach().to(torch.float64)

        dtype = layers[names["down_proj"]].weight.dtype
        inter = layers[names["down_proj"]].in_features
        if size["mlp"] < inter:
            gram = stats[names["down_proj"]].gram
            idx, gate, up, down = nystrom_mlp(
                weight("gate_proj"),
                weight("up_proj"),
                weight("down_proj"),
                gram,
                size["mlp"],
                ridge=self.ridge,
            )
            for part, w, b in (
                ("gate_proj", gate, bias("gate_proj")),
                ("up_proj", up, bias("up_proj")),
            ):
                put(
                    names[part],
                    ResizedLinear.from_weight(w.to(dtype), None if b is None else b[idx].to(dtype)),
                )
            put(
                names["down_proj"],
                ResizedLinear.from_weight(down.to(dtype), _cast(bias("down_proj"), dtype)),
            )
            errors["down_proj"] = (
                size["mlp"],
                _nystrom_error(weight("down_proj"), down, idx, gram),
            )
            errors["gate_proj"] = errors["up_proj"] = (size["mlp"], errors["down_proj"][1])

        attn_gram = stats[names["v_proj"]].gram
        chol = (
            damped_cholesky(attn_gram, damp=self.damp)
            if ("vo" in self.parts or "qk" in self.parts)
            else None
        )
        if size["vo"] < d:
            v, o = weight("v_proj"), weight("o_proj")
            k = size["vo"]
            new_v, new_o, v_bias = [], [None] * n_h, []
            bv = bias("v_proj")
            for g in range(n_kv):
                heads = range(g * group, (g + 1) * group)
                vg, outs, mix = vo_svd(
                    v[g * d : (g + 1) * d], [o[:, h * d : (h + 1) * d] for h in heads], chol, k
                )
                new_v.append(vg)
                for h, oh in zip(heads, outs, strict=True):
                    new_o[h] = oh
                if bv is not None:
                    v_bias.append(mix @ bv[g * d : (g + 1) * d])
            v_index = torch.cat([torch.arange(k) + g * d for g in range(n_kv)])
            o_index = torch.cat([torch.arange(k) + h * d for h in range(n_h)])
            put(
                names["v_proj"],
                ScatterLinear.from_parts(
                    torch.cat(new_v).to(dtype),
                    v_index,
                    n_kv * d,
                    torch.cat(v_bias).to(dtype) if v_bias else None,
                ),
            )
            put(
                names["o_proj"],
                GatherLinear.from_parts(
                    torch.cat(new_o, 1).to(dtype), o_index, n_h * d, _cast(bias("o_proj"), dtype)
                ),
            )
            approx = torch.cat(new_o, 1) @ torch.block_diag(
                *[new_v[h // group] for h in range(n_h)]
            )
            exact = o @ torch.block_diag(
                *[v[(h // group) * d : (h // group + 1) * d] for h in range(n_h)]
            )
            err = float(
                ((exact - approx) @ torch.cat([chol] * n_h)).norm()
                / (exact @ torch.cat([chol] * n_h)).norm()
            )
            errors["v_proj"] = errors["o_proj"] = (k, err)
        if size["qk"] < d // 2:
            q, kw = weight("q_proj"), weight("k_proj")
            bq, bk = bias("q_proj"), bias("k_proj")
            q_index, k_index = [], []
            for g in range(n_kv):
                heads = range(g * group, (g + 1) * group)
                dims = qk_pairs(
                    [q[h * d : (h + 1) * d] for h in heads],
                    kw[g * d : (g + 1) * d],
                    chol,
                    size["qk"],
                )
                k_index.append(dims + g * d)
                q_index.extend(dims + h * d for h in heads)
            q_index, k_index = torch.cat(q_index), torch.cat(k_index)
            for part, w, b, index, full in (
                ("q_proj", q, bq, q_index, n_h * d),
                ("k_proj", kw, bk, k_index, n_kv * d),
            ):
                kept_bias = None if b is None else b[index].to(dtype)
                put(names[part], ScatterLinear.from_parts(w[index].to(dtype), index, full, kept_bias))
            dropped = 1.0 - float((q[q_index] @ chol).pow(2).sum() / (q @ chol).pow(2).sum())
            errors["q_proj"] = errors["k_proj"] = (2 * size["qk"], math.sqrt(max(dropped, 0.0)))
        return errors


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _nystrom_error(
    down: torch.Tensor, new_down: torch.Tensor, index: torch.Tensor, gram: torch.Tensor
) -> float:
    """``‖W_D z − W_D' z_S‖ / ‖W_D z‖`` over the calibration activations, from the Gram alone."""
    select = torch.zeros(new_down.shape[1], down.shape[1], dtype=torch.float64)
    select[torch.arange(len(index)), index] = 1.0
    diff = down - new_down @ select  # (H, I)
    c = gram.to(torch.float64)
    num = float((diff @ c * diff).sum())
    den = float((down @ c * down).sum()) or 1.0
    return math.sqrt(max(num, 0.0) / den)
