"""Text for training, calibration and evaluation, token-block batching, and perplexity.

The built-in corpus is assembled at run time from English text every Python installation
carries: the ``pydoc`` topic pages (the language reference and library docs behind
``help()``) and the docstrings of the standard-library modules, classes and functions.
It needs no download, is deterministic for a given Python version, and is split into
train / validation / calibration parts by document with a fixed seed.

Any user text file, or folder of ``.txt`` files, can replace it (``load_corpus(path)``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import os
import random
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise.errors import ConfigError, DataError
from rankwise.progress import Bar

BUILTIN = "builtin"
SPLIT_SEED = 0
SPLIT_FRACTIONS = {"train": 0.90, "validation": 0.05, "calibration": 0.05}
MIN_DOCSTRING_CHARS = 80
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """A text corpus split into documents for training, validation and calibration."""

    name: str
    train: list[str]
    validation: list[str]
    calibration: list[str]

    def split(self, name: str) -> list[str]:
        if name not in SPLIT_FRACTIONS:
            raise ConfigError(f"split {name!r} is not one of {', '.join(SPLIT_FRACTIONS)}")
        return getattr(self, name)

    @property
    def characters(self) -> int:
        return sum(len(t) for part in (self.train, self.validation, self.calibration) for t in part)

    def fingerprint(self) -> str:
        """A short hash of the whole corpus, recorded beside every number computed on it."""
        h = hashlib.sha256()
        for part in (self.train, self.validation, self.calibration):
            for t in part:
                h.update(t.encode("utf-8"))
                h.update(b"\0")
        return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[str, ...]:
    """Pydoc topic pages plus every standard-library docstring of at least 80 characters."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for fname in sorted(files):
            if not fname.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(root, fname).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOCSTRING_CHARS and doc not in seen:
                        seen.add(doc)
                        docs.append(doc)
    return tuple(docs)


def _user_documents(path: Path) -> list[str]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"data folder {str(path)!r} holds no .txt files; put text in *.txt files")
    else:
        raise DataError(
            f"data {str(path)!r} does not exist; pass 'builtin', a text file or a folder of .txt files"
        )
    docs: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read data file {str(f)!r}: {e.strerror}") from e
        # A blank line separates documents, so one big file still splits three ways.
        docs += [p.strip() for p in text.split("\n\n") if p.strip()]
    return docs


def load_corpus(source: str | os.PathLike = BUILTIN) -> Corpus:
    """Load the built-in corpus (``"builtin"``) or a user text file / folder of ``.txt`` files.

    Documents are shuffled with a fixed seed and split 90% / 5% / 5% into train,
    validation and calibration, so the same source always gives the same splits.
    """
    if str(source) == BUILTIN:
        name, docs = BUILTIN, _stdlib_documents()
    else:
        path = Path(source).expanduser()
        name, docs = str(path), _user_documents(path)
    if sum(len(d) for d in docs) == 0:
        raise DataError(f"data {name!r} is empty; it needs some text")
    if len(docs) < 3:
        raise DataError(
            f"data {name!r} has {len(docs)} document(s); at least 3 (separated by blank lines) "
            "are needed to split it into train / validation / calibration"
        )
    order = list(range(len(docs)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = max(1, round(SPLIT_FRACTIONS["validation"] * len(docs)))
    n_cal = max(1, round(SPLIT_FRACTIONS["calibration"] * len(docs)))
    val = [docs[i] for i in order[:n_val]]
    cal = [docs[i] for i in order[n_val : n_val + n_cal]]
    train = [docs[i] for i in order[n_val + n_cal :]]
    return Corpus(name=name, train=train, validation=val, calibration=cal)


def resolve_texts(data: str | os.PathLike | Sequence[str], split: str) -> list[str]:
    """Texts from a corpus source (``"builtin"``, a path) or an explicit list of strings."""
    if isinstance(data, str | os.PathLike):
        return load_corpus(data).split(split)
    texts = list(data)
    if not texts or not any(t.strip() for t in texts):
        raise DataError("texts are empty; pass at least one non-empty string")
    return texts


def tokenize_stream(tokenizer, texts: Sequence[str], *, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of all texts, concatenated with the EOS token between documents, shape ``(T,)``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    drop_last: bool = True,
) -> torch.Tensor:
    """Concatenate the texts' tokens and cut them into blocks, shape ``(n_blocks, seq_len)``."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 to predict anything; got {seq_len}")
    ids = tokenize_stream(tokenizer, texts, max_tokens=max_tokens)
    n = len(ids) // seq_len if drop_last else math.ceil(len(ids) / seq_len)
    if n == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, fewer than one block of seq_len={seq_len}; "
            "give more text or a smaller seq_len"
        )
    if not drop_last and len(ids) % seq_len:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.cat([ids, ids.new_full((n * seq_len - len(ids),), pad)])
    return ids[: n * seq_len].view(n, seq_len)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and the exact recipe that produced it (so the number can be reproduced)."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # number of predicted (scored) tokens
    seconds: float
    seq_len: int
    stride: int
    add_bos: bool

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def recipe(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "stride": self.stride,
            "add_bos": self.add_bos,
            "scored_tokens": self.tokens,
            "documents_joined_with": "eos",
        }


def check_window(seq_len: int, stride: int | None, batch_size: int = 1) -> int:
    """Validate evaluation-window options; return the stride (``seq_len`` when None)."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 to predict anything; got {seq_len}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride must be in [1, seq_len={seq_len}]; got {stride}")
    return stride


def _windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) windows: each token after the first is scored exactly once."""
    out, prev_end, start = [], 0, 0
    while prev_end < total:
        end = min(start + seq_len, total)
        first = max(prev_end, start + 1)  # a window's first token has no context to predict it
        if end - first > 0:
            out.append((start, end, first))
        prev_end = end
        start += stride
    return out


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    add_bos: bool = False,
    progress: bool = False,
) -> PerplexityResult:
    """Causal-LM perplexity ``exp(mean NLL)`` of the texts, blocked or sliding-window.

    The texts are joined with EOS into one token stream. With ``stride=None`` (blocked)
    the stream is cut into consecutive windows of ``seq_len``; with ``stride < seq_len``
    windows overlap and each token is scored once, with up to ``seq_len - 1`` tokens of
    context (the standard sliding-window evaluation). ``add_bos`` prepends the BOS token to
    every window as extra context. ``max_tokens`` caps the stream length.
    """
    stride = check_window(seq_len, stride, batch_size)
    ids = tokenize_stream(tokenizer, texts, max_tokens=max_tokens)
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ConfigError("add_bos=True but the tokenizer has no BOS token")
    windows = _windows(len(ids), seq_len, stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    bar = Bar(len(windows), "perplexity", show=progress)
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            width = max(e - s for s, e, _ in batch) + (bos is not None)
            inp = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (s, e, first) in enumerate(batch):
                seg = ids[s:e]
                if bos is not None:
                    seg = torch.cat([seg.new_tensor([bos]), seg])
                off = bos is not None
                inp[row, : len(seg)] = seg
                mask[row, : len(seg)] = 1
                labels[row, first - s + off : e - s + off] = ids[first:e]
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
            # shapes: logits (B, W, V) predicts position t+1 from t; labels (B, W)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = labels[:, 1:].to(device)
            valid = target != -100
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total_nll -= picked[valid].double().sum().item()
            total_tokens += int(valid.sum())
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    nll = total_nll / total_tokens
    if not math.isfinite(nll):
        raise DataError("the model produced NaN/Inf log-probabilities; its weights may be broken")
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=total_tokens,
        seconds=seconds,
        seq_len=seq_len,
        stride=stride,
        add_bos=add_bos,
    )


__all__ = [
    "BUILTIN",
    "Corpus",
    "PerplexityResult",
    "load_corpus",
    "resolve_texts",
    "tokenize_stream",
    "token_blocks",
    "perplexity",
]
