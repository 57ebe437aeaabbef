"""``analyze``: one call that measures a model (and what tuning changed) and writes a report.

``analyze("smollm2", out="report")`` writes ``report.json`` (every number and how it was
computed) and one self-contained ``report.html`` (tables and PNG plots embedded as base64:
it opens offline in any browser and fetches nothing). With ``against=`` (a second model of
the same architecture) or ``adapter=`` (an adapter folder attached to the model), the report
also compares the tuned weights with the base ones: spectra side by side and intruder
dimensions per layer.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from pathlib import Path

from rankwise.analysis.intruders import IntruderResult, intruder_dimensions
from rankwise.analysis.nuclear_norm import nuclear_norm_score
from rankwise.analysis.spectrum import SpectrumResult, spectrum
from rankwise.errors import ConfigError, DataError, ModelError

# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _by_kind(rows: list) -> dict[str, list]:
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r.kind, []).append(r)
    return groups


def spectra_plot(result: SpectrumResult, title: str) -> str:
    """Normalised singular values per layer kind (one panel each; early blocks dark)."""
    plt = _pyplot()
    groups = _by_kind(result.layers)
    cols = min(len(groups), 4)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, (kind, layers) in zip(axes.flat, groups.items(), strict=False):
        for j, layer in enumerate(layers):
            s = layer.singular_values
            if s and s[0] > 0:
                ax.semilogy([v / s[0] for v in s], color=plt.cm.viridis(j / max(1, len(layers) - 1)), lw=0.9)
        ax.set_title(f"{kind} ({len(layers)} layers)", fontsize=9)
        ax.set_xlabel("index", fontsize=8)
    axes[0][0].set_ylabel("σ / σ₁", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def heatmap(values: dict[str, float], title: str, label: str, *, cmap: str = "viridis", vmax: float | None = None) -> str | None:
    """A kinds × blocks heat map of one number per layer; layers outside the numbered blocks
    (an output head) are left out. None when no layer is in a block."""
    from rankwise.analysis._layers import block_of, layer_kind

    values = {n: v for n, v in values.items() if block_of(n) is not None}
    if not values:
        return None
    plt = _pyplot()
    kinds = list(dict.fromkeys(layer_kind(n) for n in values))
    blocks = sorted({block_of(n) for n in values})
    grid = [[float("nan")] * len(blocks) for _ in kinds]
    for name, v in values.items():
        grid[kinds.index(layer_kind(name))][blocks.index(block_of(name))] = v
    fig, ax = plt.subplots(figsize=(min(14, 1.5 + 0.35 * len(blocks)), 0.9 + 0.38 * len(kinds)))
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return _png(fig)


# ----------------------------------------------------------------------------- html


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape("" if v is None else str(v))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


SPECTRUM_COLUMNS = ["name", "shape", "sigma_max", "stable_rank", "effective_rank", "energy_rank", "full_rank", "exact"]


def render_html(report: dict, plots: dict[str, str]) -> str:
    """The report as one self-contained page (no scripts, no external resources)."""
    title = f"rankwise analyze: {report['model']}"
    if report.get("tuned"):
        title += f" vs {report['tuned']}"
    summary = _table(report["summary"], ["metric", "value"])
    parts = [f"<h1>{html.escape(title)}</h1>", summary]
    parts.append("<h2>Spectra</h2>")
    parts.extend(_img(plots[k], k) for k in ("spectra", "ranks", "tuned_spectra") if plots.get(k))
    if "intruders" in report:
        i = report["intruders"]
        parts.append(
            f"<h2>Intruder dimensions</h2><p>Left singular vectors among the top {i['top_k']} of each tuned "
            f"weight whose largest |cos| with every base singular vector is below {i['threshold']:g} "
            "(Shuttleworth et al. 2024). LoRA updates tend to create them; full fine-tuning does not.</p>"
        )
        if plots.get("intruders"):
            parts.append(_img(plots["intruders"], "intruder dimensions"))
        hit = [r for r in i["rows"] if r["count"]]
        parts.append(
            _table(hit, ["name", "shape", "count", "indices", "min_max_cosine"])
            if hit
            else "<p>No layer has an intruder dimension.</p>"
        )
    if "nuclear_norm" in report:
        n = report["nuclear_norm"]
        parts.append(
            "<h2>Matrix Nuclear-Norm</h2><p>Mean ‖A‖<sub>*</sub>/L of the next-token probability matrix "
            "A over the texts, by the paper's L1,2 approximation (Li et al. 2024).</p>"
        )
        parts.append(_table(n["rows"], ["model", "score", "texts", "tokens"]))
    parts.append("<h2>Layers</h2>")
    parts.append(_table(report["spectrum"]["rows"], SPECTRUM_COLUMNS))
    recipe = html.escape(json.dumps(report["recipe"], indent=2))
    parts.append(f"<h2>Recipe</h2><pre>{recipe}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# ----------------------------------------------------------------------------- analyze


def _texts(data: str | os.PathLike, count: int) -> list[str]:
    """``count`` documents: the built-in corpus's validation split, or a user file's documents."""
    from rankwise.data import BUILTIN, load_corpus

    corpus = load_corpus(data)
    docs = corpus.validation if str(data) == BUILTIN else corpus.train + corpus.validation + corpus.calibration
    docs = [d for d in docs if d.strip()][:count]
    if not docs:
        raise DataError(f"data {str(data)!r} holds no text to score; give a file with some text")
    return docs


def _load(model, tokenizer=None):
    """``(model, tokenizer)`` from a name/path, or a loaded ``nn.Module`` passed through."""
    from torch import nn

    if isinstance(model, nn.Module):
        return model, tokenizer
    from rankwise.models import load_model

    return load_model(model)


def _display_name(model) -> str:
    from torch import nn

    return type(model).__name__ if isinstance(model, nn.Module) else str(model)


def _has_logits(model) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _score_row(name: str, model, tokenizer, docs: list[str], max_tokens: int, *, without_adapters: bool = False) -> dict:
    """One row of the nuclear-norm table (``without_adapters``: the base view of an adapted model)."""
    import contextlib

    from rankwise.adapters import disable

    with disable(model) if without_adapters else contextlib.nullcontext():
        r = nuclear_norm_score(model, tokenizer, docs, max_tokens=max_tokens)
    return {"model": name, "score": r.score, "texts": len(r.texts), "tokens": sum(t.tokens for t in r.texts)}


def _summary(report: dict) -> list[dict]:
    rows = report["spectrum"]["rows"]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    out = [
        {"metric": "linear layers", "value": len(rows)},
        {"metric": "mean effective rank / full rank", "value": sum(r["effective_rank"] / r["full_rank"] for r in rows) / len(rows)},
        {"metric": "mean stable rank", "value": mean("stable_rank")},
        {"metric": f"mean energy rank ({report['spectrum']['energy']:.0%} of ‖W‖²) / full rank", "value": sum(r["energy_rank"] / r["full_rank"] for r in rows) / len(rows)},
    ]
    if "intruders" in report:
        i = report["intruders"]
        out.append({"metric": f"intruder dimensions (top {i['top_k']}, cos < {i['threshold']:g})", "value": i["total"]})
        out.append({"metric": "layers with intruders", "value": sum(r["count"] > 0 for r in i["rows"])})
    for r in report.get("nuclear_norm", {}).get("rows", []):
        out.append({"metric": f"Matrix Nuclear-Norm ({r['model']})", "value": r["score"]})
    out.append({"metric": "analysis time (s)", "value": report["timing"]["total_s"]})
    return out


def analyze(
    model,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    against=None,
    adapter: str | os.PathLike | None = None,
    overwrite: bool = False,
    top_k: int = 64,
    threshold: float = 0.5,
    intruder_top_k: int = 10,
    data: str | os.PathLike = "builtin",
    texts: int = 8,
    max_tokens: int = 256,
    progress: bool = False,
) -> dict:
    """Analyse ``model`` (and ``against`` or ``adapter``) and write ``out/report.{json,html}``.

    Args:
        model: a model name or path (see :func:`rankwise.models.load_model`), or a loaded
            ``nn.Module`` (then pass its ``tokenizer`` for the Matrix Nuclear-Norm).
        out: the output folder (refused if it holds other files; ``overwrite`` replaces a
            folder rankwise wrote).
        against: a tuned model (name, path or module) of the same architecture.
        adapter: an adapter folder (PEFT or rankwise) to attach to ``model`` and compare.
        top_k: singular values per layer in the spectrum.
        threshold, intruder_top_k: intruder-dimension settings (see :func:`intruder_dimensions`).
        data, texts, max_tokens: the texts for the Matrix Nuclear-Norm score (``texts`` = 0
            skips it); causal language models only.
        progress: show each step on stderr (see :mod:`rankwise.progress`).

    Returns the report (the content of ``report.json``).

    Raises:
        ConfigError: both ``against`` and ``adapter``, or bad settings. ShapeError: the two
        models differ (the first mismatching layer is named). ModelError: no linear layers.
        DataError: no text to score. CheckpointError: ``out`` cannot be written.
    """
    from rankwise.fileio import check_output_dir

    if against is not None and adapter is not None:
        raise ConfigError("give either against (a second model) or adapter (an adapter folder), not both")
    if isinstance(texts, bool) or not isinstance(texts, int) or texts < 0:
        raise ConfigError(f"texts must be a non-negative integer, got {texts!r}")
    from rankwise.progress import stage

    def step(what: str):
        return stage(what, show=progress)

    check_output_dir(out, overwrite=overwrite)
    started = time.perf_counter()
    with step("reading texts"):
        docs = _texts(data, texts) if texts else []
    with step("loading the model"):
        base, tokenizer = _load(model, tokenizer)
    model = _display_name(model)
    tuned, tuned_name = None, None
    if against is not None:
        with step("loading the tuned model"):
            tuned, _ = _load(against)
        tuned_name = _display_name(against)
    elif adapter is not None:
        from rankwise.adapters import load_adapter

        with step("attaching the adapter"):
            load_adapter(base, adapter)
        tuned, tuned_name = base, f"{model} + adapter {adapter}"
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    with step("spectra of every linear layer"):
        spec = spectrum(base, top_k=top_k, merged=False)
    timing["spectrum_s"] = time.perf_counter() - t0
    report: dict = {
        "model": str(model),
        "tuned": tuned_name,
        "spectrum": {"energy": spec.energy, "top_k": top_k, "rows": spec.to_rows(), "recipe": spec.recipe},
    }
    plots = {
        "spectra": spectra_plot(spec, f"Singular values of {model} per layer kind (σ/σ₁, early blocks dark)"),
        "ranks": heatmap(
            {r.name: r.effective_rank / r.full_rank for r in spec.layers},
            "Effective rank / full rank per layer (1 = flat spectrum, near 0 = low-rank)",
            "effective rank / min(M, N)",
            vmax=1.0,
        ),
    }
    intruders: IntruderResult | None = None
    if tuned is not None:
        t0 = time.perf_counter()
        with step("intruder dimensions"):
            intruders = intruder_dimensions(base, tuned, threshold=threshold, top_k=intruder_top_k)
        timing["intruders_s"] = time.perf_counter() - t0
        with step("spectra of the tuned model"):
            tuned_spec = spectrum(tuned, top_k=top_k, merged=True)
        report["tuned_spectrum"] = {"rows": tuned_spec.to_rows()}
        report["intruders"] = intruders.to_dict() | {"rows": intruders.to_rows()}
        del report["intruders"]["layers"]
        plots["tuned_spectra"] = spectra_plot(tuned_spec, f"Singular values of {tuned_name} per layer kind")
        if intruders.total:  # an all-zero map says nothing the sentence below does not
            plots["intruders"] = heatmap(
                intruders.counts(), "Intruder dimensions per layer", "count", cmap="magma",
                vmax=max(intruders.counts().values()),
            )
    if docs:
        if tokenizer is None:
            raise ConfigError("the Matrix Nuclear-Norm needs the model's tokenizer: pass tokenizer=, or texts=0")
        if not _has_logits(base):
            raise ModelError(
                f"{model!r} has no language-model head, so the Matrix Nuclear-Norm cannot be scored; "
                "pass texts=0 (--texts 0) to analyse its weights only"
            )
        t0 = time.perf_counter()
        with step(f"Matrix Nuclear-Norm on {len(docs)} texts"):
            rows = [_score_row(str(model), base, tokenizer, docs, max_tokens, without_adapters=adapter is not None)]
            if tuned is not None:
                rows.append(_score_row(tuned_name, tuned, tokenizer, docs, max_tokens))
        timing["nuclear_norm_s"] = time.perf_counter() - t0
        report["nuclear_norm"] = {"rows": rows, "max_tokens": max_tokens, "data": str(data)}
    timing["total_s"] = time.perf_counter() - started
    report["timing"] = timing
    report["recipe"] = {
        "spectrum": {"top_k": top_k, **spec.recipe},
        "intruders": {"threshold": threshold, "top_k": intruder_top_k} if intruders else None,
        "nuclear_norm": {"data": str(data), "texts": len(docs), "max_tokens": max_tokens} if docs else None,
    }
    report["summary"] = _summary(report)
    with step("writing the report"):
        page = render_html(report, plots)
        _write(out, overwrite, report, page)
    return report


def _write(out, overwrite: bool, report: dict, page: str) -> None:
    from rankwise.fileio import output_dir

    with output_dir(out, overwrite=overwrite, kind="analysis") as tmp:
        Path(tmp, "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        Path(tmp, "report.html").write_text(page)


__all__ = ["analyze", "heatmap", "render_html", "spectra_plot"]
