"""The ``llama-20m-bpe8k`` config: its BPE tokenizer is deterministic and cached, the model has
the parameter split docs/pretrain.md states, and resuming it is exact, with the tokenizer kept
in the checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rankwise.data import BUILTIN, load_corpus
from rankwise.models import count_parameters
from rankwise.pretrain import PretrainConfig, Trainer, pretrain
from rankwise.pretrain.config import (
    TRAINED_TOKENIZERS,
    tokenizer_from_json,
    train_bpe,
    trained_tokenizer,
)

CONFIG = "llama-20m-bpe8k"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenizers"


def test_bpe_is_deterministic_and_reloads_the_same_from_the_cache(cache):
    first = trained_tokenizer("bpe8k")  # trains and caches
    files = list(cache.glob("bpe8k-*.json"))
    assert len(files) == 1
    again = train_bpe(load_corpus(BUILTIN).train, TRAINED_TOKENIZERS["bpe8k"])
    assert again == files[0].read_text(), "training the BPE twice gave different tokenizers"
    reloaded = trained_tokenizer("bpe8k")  # from the cache
    text = load_corpus(BUILTIN).validation[0][:4000]
    ids = first(text)["input_ids"]
    assert len(first) == len(reloaded) == 8192
    assert ids == tokenizer_from_json(again)(text)["input_ids"] == reloaded(text)["input_ids"]
    assert len(ids) < len(text.encode()) / 2  # merges learned: far fewer tokens than bytes
    assert reloaded.decode(ids) == text


def test_parameter_count_is_the_documented_split(cache):
    trainer = Trainer(PretrainConfig(config=CONFIG, steps=1, batch_size=1, seq_len=16, warmup=1, eval_tokens=0))
    model = trainer.model
    assert count_parameters(model) == 20_848_512  # docs/pretrain.md: 20.8M
    assert model.model.embed_tokens.weight.numel() == 8192 * 384 == 3_145_728  # 3.1M, tied
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_resume_is_exact_and_uses_the_checkpoints_tokenizer(tmp_path, cache):
    config = PretrainConfig(
        config=CONFIG, method="galore", steps=3, batch_size=1, seq_len=16, warmup=1, rank=16,
        update_proj_gap=2, eval_tokens=0, checkpoint_every=1,
    )  # fmt: skip
    whole = pretrain(config, tmp_path / "whole")

    def stop(trainer, record):
        if trainer.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "cut", on_step=stop)
    assert (tmp_path / "cut" / "checkpoint" / "tokenizer.json").is_file()
    # The cache now holds another tokenizer (another corpus): the resumed run must not use it.
    (cached,) = cache.glob("bpe8k-*.json")
    cached.write_text(train_bpe(["some other text entirely, " * 50, "more of it"] * 3, 300))
    resumed = pretrain(config, tmp_path / "cut", resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    a = load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
