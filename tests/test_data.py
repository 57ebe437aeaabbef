from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rankwise.data import load_corpus, perplexity, token_blocks, tokenize_stream
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
