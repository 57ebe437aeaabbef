"""The compression report: one :class:`LayerReport` per layer, ``report.json`` (every number
with its recipe) and ``report.html`` (a summary table plus per-layer rank and singular-value
plots, PNGs embedded as base64 so the single file opens in any browser)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from torch import nn

from rankwise.compress.allocate import LayerSpectrum, breakeven_rank
from rankwise.errors import ShapeError
from rankwise.fileio import atomic_write, write_json

Detail = Mapping[str, "int | float | str"]


@dataclass(frozen=True)
class LayerReport:
    """What compression did to one linear layer (one row of ``report.json``'s ``layers``).

    - ``name``: the module's path; ``kind``: its role (``q_proj``, ``down_proj``, ...).
    - ``shape``: ``(out_features, in_features)`` of the dense layer.
    - ``layer_type``: the class that now computes the layer (``"Linear"``: it stays dense).
    - ``rank``: the rank of the layer's low-rank term — ``U V`` of a ``LowRankLinear``, the
      compensation ``B A`` of ``eora``/``lq`` layers — or ``None`` when it has none (a dense
      layer, or a quantized / sparse / resized layer without a low-rank term). Never 0.
    - ``detail``: method-specific structure, flat ``str → int | float | str``:
      ``modegpt`` ``kept`` (MLP channels, or value / query-key head dims, kept); ``cospadi``
      ``atoms``, ``nonzeros`` (per row of the codes); ``lq`` ``bits`` (of the quantized
      base); ``eora`` ``base`` (``"quantize"`` or a method name) with ``bits`` or
      ``base_rank`` (the rank the base method gave the layer).
    - ``parameters_before`` / ``parameters_after``: the weight's storage in parameters of the
      model's dtype (bias excluded); ``relative_error``: the method's own relative error
      (output error for calibrated methods), 0.0 for a dense layer.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    layer_type: str
    rank: int | None
    parameters_before: int
    parameters_after: int
    relative_error: float
    detail: Detail = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ShapeError(f"layer {self.name!r}: rank must be a positive int or None; got {self.rank!r}")
        bad = {k: v for k, v in self.detail.items() if isinstance(v, bool) or not isinstance(v, int | float | str)}
        if bad:
            raise ShapeError(f"layer {self.name!r}: detail values must be int, float or str; got {bad}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "detail", MappingProxyType(dict(self.detail)))

    @classmethod
    def of(
        cls,
        name: str,
        dense: nn.Linear,
        new: nn.Module,
        *,
        rank: int | None,
        parameters_after: int,
        relative_error: float,
        kind: str | None = None,
        **detail: int | float | str,
    ) -> LayerReport:
        """The row for ``dense`` (the original layer), now computed by ``new``."""
        return cls(
            name=name,
            kind=kind or name.rsplit(".", 1)[-1],
            shape=(dense.out_features, dense.in_features),
            layer_type=type(new).__name__,
            rank=rank,
            parameters_before=dense.weight.numel(),
            parameters_after=int(parameters_after),
            relative_error=float(relative_error),
            detail=detail,
        )

    @property
    def dense(self) -> bool:
        return self.layer_type == "Linear"

    @property
    def breakeven_rank(self) -> int:
        return breakeven_rank(*self.shape)

    def to_dict(self) -> dict:
        """The JSON row of ``report.json``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "layer_type": self.layer_type,
            "rank": self.rank,
            "breakeven_rank": self.breakeven_rank,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "relative_error": self.relative_error,
            "detail": dict(self.detail),
        }


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _block_of(name: str, fallback: int) -> int:
    """The first integer in a layer path (``model.layers.12.mlp.up_proj`` -> 12)."""
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else fallback


def _rank_plot(rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in rows})
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for i, kind in enumerate(kinds):
        mine = [(_block_of(r["name"], j), r) for j, r in enumerate(rows) if r["kind"] == kind]
        ax.plot(
            [b for b, _ in mine],
            [r["parameters_after"] / r["parameters_before"] for _, r in mine],
            marker="o", markersize=3, linewidth=1, color=plt.cm.tab10(i % 10), label=kind,
        )  # fmt: skip
    ax.set_xlabel("block")
    ax.set_ylabel("parameters kept")
    ax.set_ylim(0, 1.05)
    ax.set_title("Fraction of each layer's parameters kept, per block (1.0 = stays dense)")
    ax.legend(ncol=min(len(kinds), 7), fontsize=8, loc="lower left")
    data = _png(fig)
    plt.close(fig)
    return data


def _spectrum_plot(rows: list[dict], spectra: dict[str, LayerSpectrum]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    fig, axes = plt.subplots(1, len(by_kind), figsize=(3.2 * len(by_kind), 3.2), squeeze=False)
    for ax, (kind, group) in zip(axes[0], sorted(by_kind.items()), strict=True):
        cmap = plt.cm.viridis
        for j, r in enumerate(group):
            s = spectra[r["name"]].spectrum.double()
            s = (s / s[0]).numpy() if float(s[0]) > 0 else s.numpy()
            colour = cmap(j / max(1, len(group) - 1))
            ax.semilogy(s, color=colour, lw=0.8)
            if r["rank"] is not None:
                ax.plot(r["rank"], s[min(r["rank"], len(s) - 1)], "o", color=colour, ms=3)
        ax.set_title(f"{kind} ({len(group)})", fontsize=9)
        ax.set_xlabel("index")
    axes[0][0].set_ylabel("singular value / largest")
    fig.suptitle("Method's (weighted) singular values per layer, early layers dark; dots = kept rank", fontsize=10)
    data = _png(fig)
    plt.close(fig)
    return data


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _structure(row: dict) -> str:
    """``dense``, or the layer type with its method-specific detail (``SparseDictLinear atoms=8 ...``)."""
    if row["layer_type"] == "Linear":
        return "dense"
    return " ".join([row["layer_type"], *(f"{k}={v}" for k, v in sorted(row["detail"].items()))])


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows shared by the HTML report and the CLI table."""
    p = report["parameters"]
    rows = [("parameters", _fmt(p["before"]), f"{_fmt(p['after'])} ({p['kept_fraction']:.1%} kept, {_fmt(p['removed'])} removed)")]
    if "file_bytes" in report:
        bpp = p.get("bytes_per_parameter")
        before = f"{p['before'] * bpp / 1e6:,.1f} MB" if bpp else ""
        rows.append(("weights file", before, f"{report['file_bytes'] / 1e6:,.1f} MB"))
    if "perplexity" in report:
        q = report["perplexity"]
        rows.append((f"perplexity: {q.get('corpus', 'validation')} validation", *_perplexities(q)))
        if "heldout" in q:
            rows.append(("perplexity: held-out licenses", *_perplexities(q["heldout"])))
    if "decode" in report:
        d = report["decode"]
        rows.append(
            (f"decode tokens/s ({d['new_tokens']} new, greedy, interleaved)", f"{d['before_tokens_per_s']:.1f}", f"{d['after_tokens_per_s']:.1f} ({d['speedup']:.2f}x)")
        )
    rows.append(("compression time", "", f"{report['timing']['compress_s']:.1f} s"))
    if "memory" in report:
        rows.append(("peak resident memory", "", f"{report['memory']['peak_rss_bytes'] / 1e9:.2f} GB"))
    return rows


def _perplexities(q: dict) -> tuple[str, str]:
    """(before, after) cells: the dense perplexity, and the compressed one with its ratio to dense
    (and the healed one, when the model was healed)."""
    after = f"{q['after']:.3f} ({q['after'] / q['before']:.2f}x)"
    if "healed" in q:
        after += f" → healed {q['healed']:.3f} ({q['healed'] / q['before']:.2f}x)"
    return f"{q['before']:.3f}", after


def render_html(report: dict, spectra: dict[str, LayerSpectrum] | None = None) -> str:
    """The report as one self-contained HTML page."""
    head = "".join(f"<tr><td>{html.escape(m)}</td><td>{b}</td><td>{a}</td></tr>" for m, b, a in summary_rows(report))
    layer_rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_fmt(v)}</td>"
            for v in (
                r["name"],
                f"{r['shape'][0]}x{r['shape'][1]}",
                _structure(r),
                "–" if r["rank"] is None else r["rank"],
                r["breakeven_rank"],
                r["parameters_after"],
                r["relative_error"],
            )
        )
        + "</tr>"
        for r in report["layers"]
    )
    plots = f'<img alt="ranks" src="data:image/png;base64,{_rank_plot(report["layers"])}">'
    if spectra:
        plots += f'<img alt="spectra" src="data:image/png;base64,{_spectrum_plot(report["layers"], spectra)}">'
    recipe = html.escape(json.dumps({k: report.get(k) for k in ("target", "calibration", "perplexity", "timing")}, indent=2, default=str))
    title = f"rankwise compress: {html.escape(report['model'])} with {html.escape(report['method'])} ({html.escape(report['allocation'])} allocation)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>{title}</h1>
<p>Parameters count every distinct model parameter (embeddings included, tied weights once).</p>
<table><tr><th>metric</th><th>before</th><th>after</th></tr>{head}</table>
<h2>Layers</h2>{plots}
<table><tr><th>layer</th><th>shape</th><th>now</th><th>rank</th><th>break-even rank</th><th>parameters</th><th>relative error</th></tr>{layer_rows}</table>
<h2>Recipe</h2><pre>{recipe}</pre></body></html>
"""


def write_report(
    report: dict, folder: str | os.PathLike, *, spectra: dict[str, LayerSpectrum] | None = None, html: bool = True
) -> None:
    """Write ``report.json`` (and ``report.html``) into ``folder``."""
    folder = Path(folder)
    write_json(folder / "report.json", report)
    if html:
        page = render_html(report, spectra)
        atomic_write(folder / "report.html", lambda tmp: Path(tmp).write_text(page))


__all__ = ["LayerReport", "write_report", "render_html", "summary_rows"]
