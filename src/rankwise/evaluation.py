"""``rankwise eval`` and ``rankwise generate`` in Python: one call each.

:func:`evaluate` loads a model (optionally with an adapter), loads text, and measures
perplexity; :func:`generate` continues a prompt. Both accept every model
:func:`rankwise.load_model` accepts: an embedded name, a Hugging Face folder, a ``.gguf``
file, or a folder written by ``rankwise compress``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rankwise.data import (
    BUILTIN,
    check_max_tokens,
    check_window,
    load_corpus,
    perplexity,
    read_texts,
    resolve_texts,
    texts_fingerprint,
)
from rankwise.errors import ConfigError, ModelError
from rankwise.models import check_seq_len, context_length, count_parameters
from rankwise.progress import stage

WHOLE = "all"  # the split label of a user file scored whole


def _check_adapter_folder(adapter: str | os.PathLike | None) -> None:
    from rankwise.errors import CheckpointError

    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise CheckpointError(f"adapter folder {str(adapter)!r} does not exist; pass a folder written by save_adapter or PEFT")


def _load(model: str | os.PathLike, adapter: str | os.PathLike | None, *, progress: bool = False):
    """The model (with the adapter attached, if any) and its tokenizer; refuses non-causal models."""
    from rankwise import load_model

    with stage(f"load {model}", show=progress):
        net, tokenizer = load_model(model)
    if not hasattr(net, "lm_head") and "CausalLM" not in type(net).__name__:
        raise ModelError(
            f"model {str(model)!r} ({type(net).__name__}) is not a causal language model; "
            "perplexity and generation need one (e.g. smollm2 or tiny-llama)"
        )
    if adapter is not None:
        from rankwise.adapters import load_adapter

        load_adapter(net, Path(adapter).expanduser())
    return net, tokenizer


def _texts(data: str | os.PathLike | Sequence[str], split: str | None) -> tuple[list[str], str | None, str | None]:
    """(texts, split label, corpus fingerprint) of what is scored.

    The built-in corpus: its ``split`` (validation by default). A user file or folder: all of
    it, each file whole, unless a ``split`` is given (then the same 90/5/5 split by document
    as ``load_corpus``). A list of strings: the strings as they are.
    """
    if not isinstance(data, str | os.PathLike):
        if split is not None:
            raise ConfigError("split applies to a corpus source ('builtin' or a path), not to a list of texts")
        return resolve_texts(data, "validation"), None, None
    if str(data) == BUILTIN or split is not None:
        split = split or "validation"
        corpus = load_corpus(data)
        return corpus.split(split), split, corpus.fingerprint()
    texts = read_texts(data)
    return texts, WHOLE, texts_fingerprint(texts)


def evaluate(
    model: str | os.PathLike = "smollm2",
    data: str | os.PathLike | Sequence[str] = BUILTIN,
    *,
    split: str | None = None,
    adapter: str | os.PathLike | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = 16384,
    progress: bool = False,
) -> dict:
    """Perplexity of a causal LM on text, with parameter count, speed and recipe.

    ``model`` is anything :func:`rankwise.load_model` accepts; ``adapter`` a folder written
    by ``save_adapter`` or PEFT, attached before scoring. ``data`` is ``"builtin"`` (scored:
    its ``split``, validation by default), a text file or folder of ``.txt`` files (scored:
    all of it, unless ``split`` is given), or a list of strings (used as they are).
    ``max_tokens`` caps the scored stream (None: all). ``parameters`` in the report is
    :func:`~rankwise.models.count_parameters` (storage-aware), adapter included.
    """
    check_window(seq_len, stride, batch_size)  # cheap checks before any loading
    check_max_tokens(max_tokens)
    _check_adapter_folder(adapter)
    t0 = time.perf_counter()
    net, tokenizer = _load(model, adapter, progress=progress)
    load_seconds = time.perf_counter() - t0
    check_seq_len(net, seq_len)
    texts, split_label, fingerprint = _texts(data, split)
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
        "adapter": None if adapter is None else str(adapter),
        "parameters": count_parameters(net),
        "data": str(data) if isinstance(data, str | os.PathLike) else f"{len(texts)} texts",
        "split": split_label,
        "corpus_fingerprint": fingerprint,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "eval_seconds": result.seconds,
        "load_seconds": load_seconds,
        "recipe": result.recipe() | {"max_tokens": max_tokens, "batch_size": batch_size},
    }


def _check_generation_options(prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("prompt is empty; pass the text to continue (--prompt)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer (--max-new-tokens); got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy); got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1]; got {top_p!r}")


@torch.no_grad()
def generate(
    model: str | os.PathLike = "smollm2",
    prompt: str = "",
    *,
    adapter: str | os.PathLike | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict:
    """Continue ``prompt`` with a causal LM (and adapter); returns the completion and its speed.

    ``temperature=0`` decodes greedily (deterministic); above 0 it samples, with nucleus
    ``top_p``, from a generator seeded by ``seed``. Generation stops at ``max_new_tokens`` or
    the end-of-text token. The prompt plus ``max_new_tokens`` must fit the model's context.
    """
    from transformers import GenerationConfig

    _check_generation_options(prompt, max_new_tokens, temperature, top_p)
    _check_adapter_folder(adapter)
    net, tokenizer = _load(model, adapter)
    inputs = tokenizer(prompt, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    limit = context_length(net)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise ConfigError(
            f"the prompt ({n_prompt} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context ({limit} positions); use --max-new-tokens {max(1, limit - n_prompt)} or a shorter prompt"
        )
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = next(net.parameters()).device
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = net.generate(**{k: v.to(device) for k, v in inputs.items()}, generation_config=config)
    seconds = time.perf_counter() - t0
    new = out[0, n_prompt:]
    return {
        "model": str(model),
        "adapter": None if adapter is None else str(adapter),
        "prompt": prompt,
        "completion": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": len(new),
        "tokens_per_second": len(new) / seconds if seconds > 0 else float("nan"),
        "recipe": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed},
    }


__all__ = ["evaluate", "generate"]
