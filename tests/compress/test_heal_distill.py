"""Distillation healing: the dense model's top-k next-token distribution as the target."""

from __future__ import annotations

import copy

import pytest
import torch

from rankwise.compress.api import compress
from rankwise.compress.heal import _distillation_loss, heal, heal_blocks, teacher_targets
from rankwise.errors import ConfigError, ShapeError

FAST = {"evaluate": False, "measure_speed": False, "seq_len": 64, "calib_tokens": 256}


@pytest.fixture()
def dense_and_compressed(tiny, texts):
    model, tok = tiny
    with torch.no_grad():  # a random model's next-token distribution is nearly flat: sharpen it
        for block in model.model.layers:
            block.mlp.down_proj.weight.mul_(8)
        model.lm_head.weight.mul_(4)
    dense = copy.deepcopy(model).eval()
    compress(model, tokenizer=tok, method="svdllm", ratio=0.5, data=texts, **FAST)
    return dense, model, tok


def _kl_to(dense, model, blocks) -> float:
    """Mean KL(dense || model) over every position: the independent reference (full vocabulary)."""
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=blocks).logits, -1)
        q = torch.log_softmax(model(input_ids=blocks).logits, -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())


def test_targets_are_the_top_k_of_the_dense_distribution(dense_and_compressed, texts):
    dense, _, tok = dense_and_compressed
    blocks = heal_blocks(tok, texts, seq_len=32)
    targets = teacher_targets(dense, blocks, top_k=5, batch_size=3, progress=False)
    assert targets.ids.shape == (*blocks.shape, 5) and targets.ids.dtype == torch.int32
    with torch.no_grad():
        logits = dense(input_ids=blocks).logits
    top = torch.softmax(logits, -1).topk(5, -1)
    assert torch.equal(targets.ids.long(), top.indices)
    assert torch.allclose(targets.probs.float(), top.values, rtol=2e-3, atol=1e-4)  # full-softmax mass
    assert torch.allclose(targets.rest, 1 - top.values.sum(-1), atol=1e-5)  # "any other token"


def test_full_vocabulary_loss_is_kl_plus_the_teachers_entropy(dense_and_compressed, texts):
    dense, model, tok = dense_and_compressed
    blocks = heal_blocks(tok, texts, seq_len=32)[:4]
    vocab = dense.config.vocab_size
    targets = teacher_targets(dense, blocks, top_k=vocab, progress=False)
    with torch.no_grad():
        loss = _distillation_loss(model(input_ids=blocks).logits, targets, torch.arange(len(blocks)))
        p = torch.log_softmax(dense(input_ids=blocks).logits, -1)
    entropy = float(-(p.exp() * p).sum(-1).mean())
    assert float(loss) == pytest.approx(_kl_to(dense, model, blocks) + entropy, rel=2e-3)


def test_distillation_brings_the_compressed_model_back_towards_the_dense_one(dense_and_compressed, texts):
    dense, model, tok = dense_and_compressed
    train = heal_blocks(tok, texts[:30], seq_len=32)
    held_out = heal_blocks(tok, [t.replace("fox", "cat") for t in texts[30:]], seq_len=32)
    before = _kl_to(dense, model, held_out)
    targets = teacher_targets(dense, train, top_k=32, progress=False)
    result = heal(model, train, steps=30, lr=1e-3, batch_size=4, progress=False, teacher=targets)
    after = _kl_to(dense, model, held_out)
    assert after < 0.8 * before, (before, after)
    assert result.last_loss < result.first_loss


def test_targets_of_other_blocks_or_a_bad_k_are_refused(dense_and_compressed, texts):
    dense, model, tok = dense_and_compressed
    blocks = heal_blocks(tok, texts, seq_len=32)
    targets = teacher_targets(dense, blocks[:2], top_k=4, progress=False)
    with pytest.raises(ShapeError, match="teacher_targets"):
        heal(model, blocks, steps=1, progress=False, teacher=targets)
    with pytest.raises(ConfigError, match="top_k"):
        teacher_targets(dense, blocks, top_k=0, progress=False)


def test_top_k_loss_is_the_cross_entropy_over_k_tokens_and_the_rest(dense_and_compressed, texts):
    """Reference: the student's probability of "any other token" summed over the vocabulary
    outside the teacher's k, in float64."""
    dense, model, tok = dense_and_compressed
    blocks = heal_blocks(tok, texts, seq_len=32)[:3]
    targets = teacher_targets(dense, blocks, top_k=8, progress=False)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
        loss = _distillation_loss(logits, targets, torch.arange(len(blocks)))
    log_p = torch.log_softmax(logits.double(), -1)
    ids = targets.ids.long()
    outside = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, ids, False)
    log_rest = log_p.masked_fill(~outside, float("-inf")).logsumexp(-1)
    expected = -((targets.probs.double() * log_p.gather(-1, ids)).sum(-1) + targets.rest.double() * log_rest).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
