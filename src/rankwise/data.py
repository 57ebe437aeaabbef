"""Text for training, calibration and evaluation, token-block batching, and perplexity.

The built-in corpus is assembled at run time from English text every Python installation
carries: the ``pydoc`` topic pages (the language reference and library docs behind
``help()``) and the docstrings of the standard-library modules, classes and functions.
It needs no download, is deterministic for a given Python version, and is split into
train / validation / calibration parts by document with a fixed seed.

Any user text file, or folder of ``.txt`` files, can replace it (``load_corpus(path)``
splits it the same way; ``read_texts(path)`` gives each file whole). User files must be
UTF-8 text: binary data and undecodable bytes are refused, naming the file and the byte
offset, never replaced and trained on.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import random
import sys
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
CORPUS_VERSION = 1  # bump when the collection rule changes (invalidates cached corpora)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
BINARY_SAMPLE_BYTES = 1 << 16
BINARY_FRACTION = 0.3  # more control / undecodable characters than this: binary, not text
TOKENIZE_MARGIN = 16  # tokens beyond a budget before a prefix's tokenisation is trusted


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
        return texts_fingerprint(self.train, self.validation, self.calibration)


def texts_fingerprint(*parts: Sequence[str]) -> str:
    """A short hash of lists of texts (in order), recorded beside numbers computed on them."""
    h = hashlib.sha256()
    for part in parts:
        for t in part:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[str, ...]:
    """The built-in corpus's documents, read from the user cache when this Python built them
    before (collecting them parses the whole standard library: ~6 s per process)."""
    from rankwise.fileio import write_json
    from rankwise.models import cache_dir

    recipe = f"{CORPUS_VERSION}|{sys.version}|{sysconfig.get_paths()['stdlib']}|{MIN_DOCSTRING_CHARS}|{sorted(_SKIP_DIRS)}"
    cached = cache_dir() / "corpus" / f"builtin-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.json"
    try:
        docs = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
            return tuple(docs)
    except (OSError, ValueError):
        pass
    docs = _collect_stdlib_documents()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json(cached, list(docs))
    except OSError:
        pass  # a read-only cache only costs the time to collect again
    return docs


def _collect_stdlib_documents() -> tuple[str, ...]:
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


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"data folder {str(path)!r} holds no .txt files; put text in *.txt files")
        return files
    raise DataError(
        f"data {str(path)!r} does not exist; pass 'builtin', a text file or a folder of .txt files"
    )


def _looks_binary(raw: bytes) -> bool:
    """Mostly control characters or undecodable bytes in the first 64 KiB: not text."""
    sample = raw[:BINARY_SAMPLE_BYTES].decode("utf-8", errors="replace")
    bad = sum(1 for c in sample if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v"))
    return bad > BINARY_FRACTION * max(1, len(sample))


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; DataError naming the file for binary data or undecodable bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {str(path)!r}: {e.strerror}") from e
    nul = raw.find(b"\0")
    if nul >= 0 or _looks_binary(raw):
        where = f" (a NUL byte at byte offset {nul})" if nul >= 0 else ""
        raise DataError(f"data file {str(path)!r} is binary, not text{where}; pass UTF-8 text files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {str(path)!r} is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start} cannot be decoded; convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    return text.removeprefix("\ufeff")


def read_texts(source: str | os.PathLike) -> list[str]:
    """Each file of a text file or folder of ``.txt`` files, whole (what ``rankwise eval`` scores)."""
    texts = [read_text_file(f).strip() for f in _text_files(Path(source).expanduser())]
    if not any(texts):
        raise DataError(f"data {str(source)!r} is empty; it needs some text")
    return [t for t in texts if t]


def _user_documents(path: Path) -> list[str]:
    # A blank line separates documents, so one big file still splits three ways.
    return [p.strip() for f in _text_files(path) for p in read_text_file(f).split("\n\n") if p.strip()]


def load_corpus(source: str | os.PathLike | Sequence[str | os.PathLike] = BUILTIN) -> Corpus:
    """Load the built-in corpus (``"builtin"``), a user text file / folder of ``.txt`` files, or
    a list of such sources mixed (:func:`mix_corpora`: calibration on several kinds of text).

    Documents are shuffled with a fixed seed and split 90% / 5% / 5% into train,
    validation and calibration, so the same source always gives the same splits.
    """
    if not isinstance(source, str | os.PathLike):
        sources = list(source)
        if not sources:
            raise DataError("data is an empty list of sources; pass 'builtin', a text file or a folder")
        return mix_corpora([load_corpus(s) for s in sources]) if len(sources) > 1 else load_corpus(sources[0])
    if str(source) == HELDOUT:
        raise DataError(
            f"{HELDOUT!r} is the held-out corpus every compression number is also measured on; "
            "it is never calibrated or trained on — pass 'builtin' or your own text"
        )
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


def mix_corpora(corpora: Sequence[Corpus]) -> Corpus:
    """One corpus from several: each split interleaves the sources' documents so that every
    prefix holds about as many characters of each source (the next document always comes from
    the source with the fewest characters taken so far). So the first ``calib_tokens`` of the
    calibration split are a balanced mix, whatever the sources' document lengths."""
    if not corpora:
        raise DataError("no corpora to mix")

    def interleave(parts: list[list[str]]) -> list[str]:
        taken, index, out = [0] * len(parts), [0] * len(parts), []
        while True:
            open_ = [i for i, p in enumerate(parts) if index[i] < len(p)]
            if not open_:
                return out
            i = min(open_, key=lambda j: (taken[j], j))
            doc = parts[i][index[i]]
            out.append(doc)
            taken[i] += len(doc)
            index[i] += 1

    return Corpus(
        name="+".join(c.name for c in corpora),
        train=interleave([c.train for c in corpora]),
        validation=interleave([c.validation for c in corpora]),
        calibration=interleave([c.calibration for c in corpora]),
    )


HELDOUT = "licenses"
LICENSES_DIR = Path("/usr/share/common-licenses")


@functools.lru_cache(maxsize=1)
def heldout_texts() -> tuple[str, ...]:
    """The held-out corpus: a second, different kind of English text for measuring quality off
    the calibration domain — never used for calibration, allocation or healing.

    It is the license texts in ``/usr/share/common-licenses`` (GPL, LGPL, GFDL, Apache, MPL,
    Artistic, BSD, CC0): shipped by Debian's essential ``base-files`` package, so present on
    every Debian or Ubuntu machine without any download (man pages and ``/usr/share/doc`` are
    stripped from minimal images; the venv's package descriptions change with every upgrade and
    are mostly Markdown about Python). It is legal prose — long sentences, definitions,
    conditions — unlike the built-in corpus's technical docstrings. Files are read once per real
    file (``GPL`` links to ``GPL-3``), split into paragraphs (each once: versions share text),
    and the paragraphs shuffled with a
    fixed seed, so the first tokens mix all licenses. Reading it takes milliseconds, so it is
    cached per process only. DataError when the folder is missing.
    """
    files = sorted(p for p in LICENSES_DIR.glob("*") if p.is_file()) if LICENSES_DIR.is_dir() else []
    seen, paragraphs = set(), []
    for f in files:
        real = f.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            text = read_text_file(real)
        except DataError:
            continue
        for paragraph in text.split("\n\n"):  # words only: drop "* * *" and "-----" decoration
            words = [w for w in paragraph.split() if any(c.isalnum() for c in w)]
            if len(words) >= 8 and " ".join(words) not in paragraphs:  # GPL-2/LGPL-2 share text
                paragraphs.append(" ".join(words))
    if not paragraphs:
        raise DataError(
            f"the held-out corpus needs the license texts in {LICENSES_DIR} (Debian's base-files "
            "package); none were found — evaluate with heldout=False"
        )
    random.Random(SPLIT_SEED).shuffle(paragraphs)
    return tuple(paragraphs)


def resolve_texts(data: str | os.PathLike | Sequence[str], split: str) -> list[str]:
    """Texts from a corpus source (``"builtin"``, a path) or an explicit list of strings."""
    if isinstance(data, str | os.PathLike):
        return load_corpus(data).split(split)
    texts = list(data)
    if not texts or not any(t.strip() for t in texts):
        raise DataError("texts are empty; pass at least one non-empty string")
    return texts


def check_max_tokens(max_tokens: int | None, *, option: str = "max_tokens") -> None:
    """Refuse a token budget that is not a positive integer (None means: all tokens)."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"{option} must be a positive number of tokens (or None: all); got {max_tokens!r}")


def _prefix_ids(tokenizer, text: str, budget: int) -> list[int]:
    """The first ``budget`` token ids of ``text``, tokenising only a prefix of it.

    Prefixes cut at whitespace grow geometrically until they hold ``budget`` tokens plus a
    margin (so the tokens kept do not depend on where the prefix was cut); the characters
    tokenised stay within a small multiple of what the budget needs, even for one huge line.
    """
    chars = 4 * (budget + TOKENIZE_MARGIN) + 64
    while True:
        if chars >= len(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
        cut = max(text.rfind(c, chars // 2, chars) for c in " \n\t")
        ids = tokenizer(text[: cut if cut > 0 else chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= budget + TOKENIZE_MARGIN:
            return ids[:budget]
        chars *= 2


def tokenize_stream(tokenizer, texts: Sequence[str], *, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of all texts, concatenated with the EOS token between documents, shape ``(T,)``.

    With ``max_tokens``, at most that many ids, and only as much text is tokenised as needed.
    A single string is one text (not a sequence of one-character texts).
    """
    check_max_tokens(max_tokens)
    if isinstance(texts, str):
        texts = [texts]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if max_tokens is None:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids += _prefix_ids(tokenizer, text, max_tokens - len(ids))
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
    "HELDOUT",
    "Corpus",
    "heldout_texts",
    "mix_corpora",
    "PerplexityResult",
    "check_max_tokens",
    "load_corpus",
    "read_text_file",
    "read_texts",
    "texts_fingerprint",
    "resolve_texts",
    "tokenize_stream",
    "token_blocks",
    "perplexity",
]
