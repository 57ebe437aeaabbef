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
from collections.abc import Sequence
from pathlib import Path

from rankwise.analysis.gradients import (
    GRADIENT_SOURCES,
    check_sources,
    gradient_datasets,
    gradient_spectra,
)
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


def gradient_plot(grads) -> str:
    """Gradient nuclear norm (top row) and effective rank (bottom row) over blocks, one panel
    per layer kind, one line per dataset."""
    from rankwise.analysis._layers import block_of, layer_kind

    plt = _pyplot()
    kinds = list(dict.fromkeys(layer_kind(n) for n in grads.layers))
    fig, axes = plt.subplots(2, len(kinds), figsize=(2.4 * len(kinds) + 0.8, 4.6), squeeze=False)
    for col, kind in enumerate(kinds):
        names = [n for n in grads.layers if layer_kind(n) == kind]
        x = [block_of(n) if block_of(n) is not None else i for i, n in enumerate(names)]
        for dataset in grads.datasets:
            axes[0][col].plot(x, [grads.nuclear_norm[dataset][n] for n in names], ".-", lw=1.1, ms=3, label=dataset)
            axes[1][col].plot(x, [grads.effective_rank[dataset][n] for n in names], ".-", lw=1.1, ms=3, label=dataset)
        axes[0][col].set_title(kind, fontsize=9)
        axes[1][col].set_xlabel("block", fontsize=8)
        for ax in axes[:, col]:
            ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("gradient nuclear norm", fontsize=8)
    axes[1][0].set_ylabel("gradient effective rank", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Layer-wise gradient spectra per dataset (mean over texts of equal length)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def gradient_rows(grads) -> list[dict]:
    """One row per layer kind: the mean over blocks of each dataset's two measures."""
    from rankwise.analysis._layers import layer_kind

    rows = []
    for kind in dict.fromkeys(layer_kind(n) for n in grads.layers):
        names = [n for n in grads.layers if layer_kind(n) == kind]
        row: dict = {"kind": kind, "layers": len(names)}
        for d in grads.datasets:
            row[f"{d} nuclear norm"] = sum(grads.nuclear_norm[d][n] for n in names) / len(names)
            row[f"{d} effective rank"] = sum(grads.effective_rank[d][n] for n in names) / len(names)
        rows.append(row)
    return rows


def intrinsic_plot(result, title: str) -> str:
    """The performance curve over subspace dimensions d, as a fraction of normal training,
    with the threshold line and d_int marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    fractions = [m / result.baseline if result.baseline else float("nan") for m in result.metrics]
    ax.semilogx(result.dims, fractions, "-o", lw=1.2, label="training in a random d-dim subspace")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":", label="normal training (all parameters)")
    ax.axhline(result.threshold, color="tab:red", lw=0.8, ls="--", label=f"{result.threshold:.0%} of it")
    if result.intrinsic_dimension is not None:
        ax.axvline(result.intrinsic_dimension, color="tab:red", lw=0.8)
        ax.annotate(f"d_int{round(result.threshold * 100)} = {result.intrinsic_dimension}", (result.intrinsic_dimension, 0.5),
                    xytext=(4, 0), textcoords="offset points", fontsize=8, color="tab:red")
    ax.set_xlabel(f"subspace dimension d (of D = {result.parameters:,} parameters)", fontsize=8)
    ax.set_ylabel("metric / normal training", fontsize=8)
    ax.set_ylim(min(0.0, *fractions) - 0.02, max(1.05, *fractions) + 0.02)
    ax.legend(fontsize=7, loc="best", framealpha=0.9)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
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
    if "gradients" in report:
        g = report["gradients"]
        names = ", ".join(f"{d} ({g['texts'][d]} texts, loss {g['loss'][d]:.3f})" for d in g["datasets"])
        parts.append(
            "<h2>Gradient spectra</h2><p>Per linear layer, the nuclear norm (size) and effective rank (spread) "
            f"of the next-token loss gradient, averaged over texts of exactly {g['tokens']} tokens, for "
            f"{html.escape(names)} (Li et al. 2025: higher-quality data give smaller nuclear norms and higher "
            "effective ranks). Mean over blocks per layer kind:</p>"
        )
        if plots.get("gradients"):
            parts.append(_img(plots["gradients"], "gradient spectra"))
        columns = ["kind", "layers"] + [f"{d} {m}" for m in ("nuclear norm", "effective rank") for d in g["datasets"]]
        parts.append(_table(g["by_kind"], columns))
    if "intrinsic" in report:
        i = report["intrinsic"]
        found = i["intrinsic_dimension"]
        parts.append(
            f"<h2>Intrinsic dimension</h2><p>Fitting {i['blocks']} blocks of {i['tokens']} tokens of "
            f"{html.escape(str(i['data']))} for {i['steps']} Adam steps while moving only a random d-dimensional "
            f"subspace of the {i['parameters']:,} trainable parameters (Li et al. 2018); metric: the training-loss "
            f"reduction, as a fraction of what normal training reached ({i['baseline']:.4g}). "
            + (f"d_int{round(i['threshold'] * 100)} = <b>{found}</b>." if found is not None else
               f"No tried d reached {i['threshold']:.0%}: the intrinsic dimension is above {max(i['dims'])}.")
            + "</p>"
        )
        if plots.get("intrinsic"):
            parts.append(_img(plots["intrinsic"], "intrinsic dimension"))
        parts.append(_table(i["rows"], ["dim", "metric", "fraction_of_baseline"]))
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
    if "intrinsic" in report:
        i = report["intrinsic"]
        out.append({"metric": f"intrinsic dimension d_int{round(i['threshold'] * 100)} (tried {min(i['dims'])}-{max(i['dims'])})",
                    "value": i["intrinsic_dimension"] if i["intrinsic_dimension"] is not None else f"> {max(i['dims'])}"})
    g = report.get("gradients")
    for d in g["datasets"] if g else []:
        rows_g = g["rows"]
        out.append({"metric": f"mean gradient nuclear norm ({d})", "value": sum(r[f"{d}_nuclear_norm"] for r in rows_g) / len(rows_g)})
        out.append({"metric": f"mean gradient effective rank ({d})", "value": sum(r[f"{d}_effective_rank"] for r in rows_g) / len(rows_g)})
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
    gradients: int = 0,
    gradient_data: Sequence[str] = GRADIENT_SOURCES,
    gradient_tokens: int = 128,
    intrinsic: Sequence[int] = (),
    intrinsic_parameters: str | Sequence[str] | None = None,
    intrinsic_steps: int = 20,
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
        gradients, gradient_data, gradient_tokens: layer-wise gradient spectra of the base model
            on ``gradients`` texts (0, the default, skips them) of exactly ``gradient_tokens``
            tokens from each source in ``gradient_data`` (default: the built-in corpus and the
            license texts under /usr/share/common-licenses), side by side. Causal LMs only.
        intrinsic, intrinsic_parameters, intrinsic_steps: subspace dimensions d for the intrinsic
            dimension of fitting the model to 4 blocks of 64 tokens of ``data`` (empty, the
            default, skips it): ``intrinsic_steps`` Adam steps in each random subspace of the
            parameters matching ``intrinsic_parameters`` (glob on parameter names; None: every
            trainable one), against normal training of those parameters. Costs about
            ``(len(intrinsic) + 1) * intrinsic_steps`` training steps.
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
    intrinsic = _intrinsic_dims(intrinsic)
    if intrinsic and (isinstance(intrinsic_steps, bool) or not isinstance(intrinsic_steps, int) or intrinsic_steps < 1):
        raise ConfigError(f"intrinsic_steps must be a positive integer, got {intrinsic_steps!r}")
    if isinstance(gradients, bool) or not isinstance(gradients, int) or gradients < 0:
        raise ConfigError(f"gradients must be a non-negative number of texts per dataset (0 skips them), got {gradients!r}")
    from rankwise.progress import stage

    def step(what: str):
        return stage(what, show=progress)

    if gradients:
        if isinstance(gradient_tokens, bool) or not isinstance(gradient_tokens, int) or gradient_tokens < 2:
            raise ConfigError(f"gradient_tokens must be an integer >= 2 (a next-token loss needs two tokens), got {gradient_tokens!r}")
        gradient_data = check_sources(gradient_data)
    if intrinsic and str(data) != "builtin":
        check_sources([str(data)])
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
    if gradients:
        if tokenizer is None:
            raise ConfigError("gradient spectra need the model's tokenizer: pass tokenizer=, or gradients=0")
        with step(f"gradient spectra on {gradients} texts of {len(gradient_data)} datasets"):
            t0 = time.perf_counter()
            blocks = gradient_datasets(list(gradient_data), tokenizer, count=gradients, tokens=gradient_tokens)
            import contextlib

            from rankwise.adapters import disable

            with disable(base) if adapter is not None else contextlib.nullcontext():
                grads = gradient_spectra(base, tokenizer, blocks, max_tokens=gradient_tokens)
            timing["gradients_s"] = time.perf_counter() - t0
        report["gradients"] = {
            "datasets": grads.datasets, "texts": grads.texts, "tokens": gradient_tokens, "loss": grads.loss,
            "by_kind": gradient_rows(grads), "rows": grads.to_rows(),
        }
        plots["gradients"] = gradient_plot(grads)
    if intrinsic:
        if tokenizer is None:
            raise ConfigError("the intrinsic dimension needs the model's tokenizer: pass tokenizer=, or no intrinsic dims")
        t0 = time.perf_counter()
        with step(f"intrinsic dimension (d = {', '.join(map(str, intrinsic))}; {intrinsic_steps} steps each)"):
            report["intrinsic"] = _intrinsic(base, tokenizer, data, intrinsic, intrinsic_parameters, intrinsic_steps)
        timing["intrinsic_s"] = time.perf_counter() - t0
        plots["intrinsic"] = intrinsic_plot(_IntrinsicView(report["intrinsic"]), f"Intrinsic dimension of fitting {model} to {data}")
    timing["total_s"] = time.perf_counter() - started
    report["timing"] = timing
    report["recipe"] = {
        "spectrum": {"top_k": top_k, **spec.recipe},
        "intruders": {"threshold": threshold, "top_k": intruder_top_k} if intruders else None,
        "nuclear_norm": {"data": str(data), "texts": len(docs), "max_tokens": max_tokens} if docs else None,
        "gradients": {"data": list(gradient_data), "texts": gradients, "tokens": gradient_tokens} if gradients else None,
        "intrinsic": {"dims": intrinsic, "parameters": intrinsic_parameters, "steps": intrinsic_steps,
                      "lr": INTRINSIC_LR, "baseline_lr": INTRINSIC_BASELINE_LR} if intrinsic else None,
    }
    report["summary"] = _summary(report)
    with step("writing the report"):
        page = render_html(report, plots)
        _write(out, overwrite, report, page)
    return report


INTRINSIC_LR = 1e-2  # Adam on z (each unit of z moves the parameters by a unit vector)
INTRINSIC_BASELINE_LR = 1e-4  # Adam on the parameters themselves (a fine-tuning rate)
INTRINSIC_BLOCKS, INTRINSIC_TOKENS = 4, 64


def _intrinsic_dims(dims) -> list[int]:
    if dims is None or isinstance(dims, str):
        raise ConfigError(f"intrinsic must be a list of subspace dimensions (e.g. [4, 16, 64]), got {dims!r}")
    try:
        out = sorted({int(d) for d in dims})
    except (TypeError, ValueError):
        raise ConfigError(f"intrinsic must be a list of positive integers, got {dims!r}") from None
    if out and out[0] < 1:
        raise ConfigError(f"intrinsic dimensions must be positive, got {list(dims)!r}")
    return out


class _IntrinsicView:
    """The attributes :func:`intrinsic_plot` reads, from the report's dict."""

    def __init__(self, d: dict) -> None:
        self.__dict__.update(d)


def _intrinsic(model, tokenizer, data, dims: list[int], parameters, steps: int) -> dict:
    """Intrinsic dimension of fitting ``model`` to a few blocks of ``data`` (training loss)."""
    import torch

    from rankwise.analysis.intrinsic import intrinsic_dimension

    source = "builtin" if str(data) == "builtin" else str(data)
    blocks = gradient_datasets([source], tokenizer, count=INTRINSIC_BLOCKS, tokens=INTRINSIC_TOKENS)[source]
    blocks = blocks.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()  # no dropout: the landscape of the model as it is

    def loss(m):
        return m(input_ids=blocks, labels=blocks).loss

    try:
        with torch.no_grad():
            start = float(loss(model))
        result = intrinsic_dimension(
            model, loss, lambda m: start - float(loss(m)), dims, steps=steps, lr=INTRINSIC_LR,
            baseline_lr=INTRINSIC_BASELINE_LR, parameters=parameters,
        )
    finally:
        model.train(was_training)
    return result.to_dict() | {
        "rows": result.to_rows(), "data": str(data), "blocks": INTRINSIC_BLOCKS, "tokens": INTRINSIC_TOKENS,
        "steps": steps, "start_loss": start,
    }


def _write(out, overwrite: bool, report: dict, page: str) -> None:
    from rankwise.fileio import output_dir

    with output_dir(out, overwrite=overwrite, kind="analysis") as tmp:
        Path(tmp, "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        Path(tmp, "report.html").write_text(page)


__all__ = ["analyze", "heatmap", "render_html", "spectra_plot"]
