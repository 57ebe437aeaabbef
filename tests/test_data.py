from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rankwise.data import (
    load_corpus,
    perplexity,
    read_text_file,
    read_texts,
    token_blocks,
    tokenize_stream,
)
from rankwise.errors import ConfigError, DataError
from rankwise.models import byte_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_builtin_corpus_is_large_deterministic_and_disjoint(corpus):
    assert corpus.characters >= 2_000_000
    again = load_corpus("builtin")
    assert again.fingerprint() == corpus.fingerprint()
    assert again.validation == corpus.validation
    train, val, cal = set(corpus.train), set(corpus.validation), set(corpus.calibration)
    assert not (train & val) and not (train & cal) and not (val & cal)
    assert len(corpus.validation) > 100 and len(corpus.calibration) > 100


def test_user_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n\nthird doc\n\nfourth")
    (tmp_path / "b.txt").write_text("another one\n\nand more")
    single = load_corpus(tmp_path / "a.txt")
    folder = load_corpus(tmp_path)
    assert len(single.train) + len(single.validation) + len(single.calibration) == 4
    assert sum(map(len, (folder.train, folder.validation, folder.calibration))) == 6


@pytest.mark.parametrize("content", ["", "   \n\n  ", "one\n\ntwo"])
def test_empty_or_tiny_corpus_is_refused(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(DataError):
        load_corpus(f)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")


def test_token_blocks_shape_and_content():
    tok = byte_tokenizer()
    blocks = token_blocks(tok, ["abcdef", "ghij"], seq_len=4)
    stream = tokenize_stream(tok, ["abcdef", "ghij"])
    assert len(stream) == 12  # 10 bytes + 2 EOS
    assert blocks.shape == (3, 4)
    assert torch.equal(blocks.flatten(), stream)
    with pytest.raises(DataError):
        token_blocks(tok, ["ab"], seq_len=64)


class UniformLM(torch.nn.Module):
    """Predicts every token with equal probability: perplexity is exactly the vocab size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.dummy
        return type("Out", (), {"logits": logits})()


def test_perplexity_of_uniform_model_is_vocab_size():
    tok = byte_tokenizer()
    res = perplexity(UniformLM(len(tok)), tok, ["hello world, this is text"] * 3, seq_len=16)
    assert res.perplexity == pytest.approx(len(tok), rel=1e-6)


def test_perplexity_matches_hand_computation(tiny_llama):
    model, tok = tiny_llama
    texts = ["The cat sat on the mat.", "A second, longer document about dogs and cats."]
    ids = tokenize_stream(tok, texts)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    hand = math.exp(F.cross_entropy(logits[:-1].double(), ids[1:]).item())
    # one window covering everything
    res = perplexity(model, tok, texts, seq_len=len(ids))
    assert res.tokens == len(ids) - 1
    assert res.perplexity == pytest.approx(hand, rel=1e-5)


def test_blocked_perplexity_matches_per_block_hand_computation(tiny_llama):
    model, tok = tiny_llama
    texts = ["x" * 50, "some more text to make blocks", "and an end"]
    ids = tokenize_stream(tok, texts)
    seq = 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), seq):
            block = ids[s : s + seq]
            if len(block) < 2:
                continue
            logits = model(input_ids=block[None]).logits[0]
            nll += F.cross_entropy(logits[:-1].double(), block[1:], reduction="sum").item()
            count += len(block) - 1
    res = perplexity(model, tok, texts, seq_len=seq, batch_size=3)
    assert res.tokens == count
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_sliding_window_scores_each_token_once_with_context(tiny_llama):
    model, tok = tiny_llama
    texts = ["sliding windows give every token more context " * 3]
    ids = tokenize_stream(tok, texts)
    seq, stride = 32, 8
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, len(ids), stride):
            e = min(s + seq, len(ids))
            first = max(prev_end, s + 1)
            if e > first:
                logits = model(input_ids=ids[None, s:e]).logits[0]
                target = ids[first:e]
                nll += F.cross_entropy(
                    logits[first - s - 1 : e - s - 1].double(), target, reduction="sum"
                ).item()
                count += len(target)
            prev_end = e
            if e == len(ids):
                break
    res = perplexity(model, tok, texts, seq_len=seq, stride=stride, batch_size=2)
    assert res.tokens == count == len(ids) - 1
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_bad_options(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ConfigError):
        perplexity(model, tok, ["text"], seq_len=8, stride=9)
    with pytest.raises(DataError):
        perplexity(model, tok, ["a"], seq_len=8, max_tokens=1)


# --- text that is not text ------------------------------------------------------------------


def test_latin1_file_names_the_file_and_byte_offset(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\u00e9 au lait\n\nsecond\n\nthird".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt.*not valid UTF-8.*0xe9 at byte offset 3.*convert"):
        load_corpus(f)


def test_invalid_utf8_in_the_middle_of_a_folder_names_that_file(tmp_path):
    (tmp_path / "a.txt").write_text("fine text\n\nmore\n\nand more")
    (tmp_path / "b.txt").write_bytes(b"ok so far " * 10 + b"\xff\xfe" + b" tail")
    with pytest.raises(DataError, match=r"b.txt.*byte offset 100"):
        load_corpus(tmp_path)


def test_random_bytes_are_binary_not_text(tmp_path):
    f = tmp_path / "random.txt"
    raw = torch.randint(0, 256, (8192,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    f.write_bytes(raw.numpy().tobytes())
    with pytest.raises(DataError, match=r"random.txt.*binary.*NUL byte at byte offset"):
        load_corpus(f)
    f.write_bytes(bytes(b for b in raw.tolist() if b))  # no NUL byte: still mostly not text
    with pytest.raises(DataError, match=r"random.txt.*binary"):
        read_text_file(f)


def test_control_characters_are_binary(tmp_path):
    f = tmp_path / "ctrl.txt"
    f.write_bytes(bytes(range(1, 32)) * 100 + b"a little text")
    with pytest.raises(DataError, match="binary"):
        read_texts(f)


def test_utf8_bom_and_non_ascii_text_are_read(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffnaïve café — 東京".encode())
    assert read_text_file(f) == "naïve café — 東京"


def test_read_texts_gives_each_file_whole(tmp_path):
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n")
    (tmp_path / "b.txt").write_text("other file")
    (tmp_path / "empty.txt").write_text("  \n")
    assert read_texts(tmp_path) == ["first para\n\nsecond para", "other file"]
    assert read_texts(tmp_path / "a.txt") == ["first para\n\nsecond para"]
    with pytest.raises(DataError, match="empty"):
        read_texts(tmp_path / "empty.txt")


# --- token budgets ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True])
def test_bad_max_tokens_is_refused(tiny_llama, bad):
    model, tok = tiny_llama
    with pytest.raises(ConfigError, match="max_tokens"):
        tokenize_stream(tok, ["some text"], max_tokens=bad)
    with pytest.raises(ConfigError, match="max_tokens"):
        perplexity(model, tok, ["some text"] * 3, seq_len=8, max_tokens=bad)


class CharCountingTokenizer:
    """Wraps a tokenizer and counts the characters it is asked to tokenise."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.chars = 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.inner(text, **kwargs)


def test_token_budget_bounds_the_text_tokenised():
    line = "words on one very long line " * 200_000  # ~5.6 MB, no newline
    tok = CharCountingTokenizer(byte_tokenizer())
    ids = tokenize_stream(tok, [line, "a second text"], max_tokens=512)
    assert len(ids) == 512
    assert ids.tolist() == byte_tokenizer()(line[:512], add_special_tokens=False)["input_ids"]
    assert tok.chars <= 20 * 512  # not the 5.6 MB


def _trained_bpe(text: str):
    """A small BPE tokenizer with merges (so tokens span characters), trained in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"], show_progress=False)
    bpe.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("budget", [1, 37, 500, 4000])
def test_bounded_tokenisation_equals_the_prefix_of_the_full_one(budget):
    text = " ".join(f"token{i % 97} and words{i % 13}, more text" for i in range(4000))
    tok = _trained_bpe(text)
    full = tokenize_stream(tok, [text, "second document"])
    for limit in (budget, len(full) - 2):  # within the first text, and into the second one
        bounded = tokenize_stream(tok, [text, "second document"], max_tokens=limit)
        assert torch.equal(bounded, full[:limit])


def test_builtin_corpus_is_cached_and_the_cache_gives_the_same_documents(tmp_path, monkeypatch):
    from rankwise import data

    calls = []

    def collect():
        calls.append(1)
        return ("first document " * 10, "second document " * 10)

    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_collect_stdlib_documents", collect)
    data._stdlib_documents.cache_clear()
    try:
        built = data._stdlib_documents()
        files = list((tmp_path / "corpus").glob("builtin-*.json"))
        assert len(files) == 1 and len(calls) == 1
        data._stdlib_documents.cache_clear()
        assert data._stdlib_documents() == built and len(calls) == 1  # read back, not collected
        files[0].write_text("not json")  # a damaged cache is rebuilt, not trusted
        data._stdlib_documents.cache_clear()
        assert data._stdlib_documents() == built and len(calls) == 2
    finally:
        data._stdlib_documents.cache_clear()


def test_heldout_corpus_is_license_prose_deterministic_and_not_a_calibration_source(monkeypatch, tmp_path):
    from rankwise import data

    texts = data.heldout_texts()
    assert sum(len(t) for t in texts) > 100_000  # enough for 8,192 evaluation tokens
    assert any("License" in t for t in texts[:20])  # shuffled paragraphs: licenses mixed from the start
    assert not any("* *" in t or "-----" in t for t in texts)  # decoration dropped, words kept
    assert len(set(texts)) == len(texts)
    with pytest.raises(DataError, match="never calibrated"):
        load_corpus(data.HELDOUT)
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path / "missing")
    data.heldout_texts.cache_clear()
    try:
        with pytest.raises(DataError, match="heldout=False"):
            data.heldout_texts()
    finally:
        data.heldout_texts.cache_clear()


def test_several_sources_mix_balanced_by_characters(tmp_path):
    from rankwise.data import mix_corpora

    (tmp_path / "long.txt").write_text("\n\n".join(f"long {i} " + "x" * 400 for i in range(60)))
    (tmp_path / "short.txt").write_text("\n\n".join(f"short {i} words" for i in range(600)))
    mixed = load_corpus([tmp_path / "long.txt", tmp_path / "short.txt"])
    a, b = load_corpus(tmp_path / "long.txt"), load_corpus(tmp_path / "short.txt")
    assert mixed.name == f"{a.name}+{b.name}"
    assert sorted(mixed.calibration) == sorted(a.calibration + b.calibration)
    prefix = mixed.calibration[: len(mixed.calibration) // 2]
    long_chars = sum(len(t) for t in prefix if t.startswith("long"))
    short_chars = sum(len(t) for t in prefix if t.startswith("short"))
    assert long_chars > 0 and short_chars > 0  # every prefix holds both sources
    assert mix_corpora([a]).calibration == a.calibration
    with pytest.raises(DataError, match="empty list of sources"):
        load_corpus([])


def test_a_single_string_is_one_text_not_one_text_per_character():
    from rankwise.models import tiny_llama

    _, tok = tiny_llama(seed=0, layers=1, hidden=32)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    as_str = token_blocks(tok, text, seq_len=16)
    assert torch.equal(as_str, token_blocks(tok, [text], seq_len=16))
    assert tokenize_stream(tok, text).tolist().count(tok.eos_token_id) == 1
