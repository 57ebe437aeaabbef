"""One call that loads a model, loads text, and measures perplexity: ``rankwise eval`` in Python."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from rankwise.data import check_window, load_corpus, perplexity, resolve_texts
from rankwise.errors import ModelError
from rankwise.models import count_parameters, load_model


def evaluate(
    model: str | os.PathLike = "smollm2",
    data: str | os.PathLike | Sequence[str] = "builtin",
    *,
    split: str = "validation",
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = 16384,
    progress: bool = False,
) -> dict:
    """Perplexity of a causal LM on a corpus split, with parameter count, speed and recipe.

    ``model`` is anything :func:`rankwise.load_model` accepts; ``data`` is ``"builtin"``, a
    text file, a folder of ``.txt`` files, or a list of strings (used as they are).
    """
    check_window(seq_len, stride, batch_size)  # cheap checks before any loading
    t0 = time.perf_counter()
    net, tokenizer = load_model(model)
    load_seconds = time.perf_counter() - t0
    if not hasattr(net, "lm_head") and "CausalLM" not in type(net).__name__:
        raise ModelError(
            f"model {str(model)!r} ({type(net).__name__}) is not a causal language model; "
            "perplexity needs one (e.g. smollm2 or tiny-llama)"
        )
    if isinstance(data, str | os.PathLike):
        corpus = load_corpus(data)
        texts, fingerprint = corpus.split(split), corpus.fingerprint()
    else:
        texts, fingerprint = resolve_texts(data, split), None
    result = perplexity(
        net,
        tokenizer,
        texts,
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
    )
    return {
        "model": str(model),
        "parameters": count_parameters(net),
        "data": str(data) if isinstance(data, str | os.PathLike) else f"{len(texts)} texts",
        "split": split,
        "corpus_fingerprint": fingerprint,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "eval_seconds": result.seconds,
        "load_seconds": load_seconds,
        "recipe": result.recipe() | {"max_tokens": max_tokens, "batch_size": batch_size},
    }
