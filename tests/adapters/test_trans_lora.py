"""Trans-LoRA: synthetic data from the source base, distilled into a LoRA on a new base."""

from __future__ import annotations

import pytest
import torch
from conftest import gpt2

from rankwise.adapters import attach
from rankwise.adapters.local_training import batches_of, lm_loss, train_adapters
from rankwise.adapters.trans_lora import TransLoraConfig, synthesize, transfer
from rankwise.errors import ConfigError
from rankwise.models import tiny_llama

TASK = [
    "def add(a, b):\n    return a + b\n",
    "def mul(x, y):\n    return x * y\n",
    "def neg(v):\n    return -v\n",
    "def sub(p, q):\n    return p - q\n",
]


def task_blocks(tok, seq_len=32):
    ids = torch.tensor(tok("".join(TASK * 20))["input_ids"])
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def task_loss(model, blocks):
    model.eval()
    with torch.no_grad():
        return lm_loss(model, blocks).item()


@pytest.fixture(scope="module")
def source():
    model, tok = tiny_llama(seed=0)
    attach(model, "lora", "all-linear", rank=8)
    train_adapters(model, batches_of(task_blocks(tok), 4), steps=60, lr=5e-3)
    return model.eval(), tok


def test_transfer_to_a_wider_variant_beats_its_base(source):
    src, tok = source
    blocks = task_blocks(tok)
    target, _ = tiny_llama(seed=1, hidden=48)
    base = task_loss(target, blocks)
    config = TransLoraConfig(samples=32, length=48, steps=80, lr=5e-3)
    result = transfer(src, target, tok, TASK, config)
    assert result.synthetic.shape == (32, 48)
    assert result.losses[-1] < result.losses[0]
    assert task_loss(target, blocks) < base - 0.1


def test_synthesis_is_the_base_model_prompted_by_seeds(source):
    src, tok = source
    config = TransLoraConfig(samples=4, length=20, prompt_tokens=6, seed=3)
    text = synthesize(src, tok, TASK, config)
    prompts = [tok(t, add_special_tokens=False)["input_ids"][:6] for t in TASK]
    assert [row[:6].tolist() for row in text] == prompts
    assert torch.equal(text, synthesize(src, tok, TASK, config))  # seeded
    plain, _ = tiny_llama(seed=0)  # the same base without any adapter writes the same text
    assert torch.equal(text, synthesize(plain, tok, TASK, config))


def test_bad_inputs_name_the_fix(source):
    src, tok = source
    with pytest.raises(ConfigError, match="share the tokenizer"):
        transfer(src, gpt2(), tok, TASK)
    with pytest.raises(ConfigError, match="seeds"):
        synthesize(src, tok, [])
    plain, _ = tiny_llama(seed=2)
    with pytest.raises(ConfigError, match="no adapter to transfer"):
        transfer(plain, tiny_llama(seed=3)[0], tok, TASK)
    with pytest.raises(ConfigError, match="prompt_tokens"):
        TransLoraConfig(length=8, prompt_tokens=8)
    with pytest.raises(ConfigError, match="fewer than prompt_tokens"):
        synthesize(src, tok, ["ab"], TransLoraConfig(prompt_tokens=4))


@pytest.mark.slow
def test_smollm2_adapter_transfers_to_a_pruned_smollm2():
    import rankwise
    from rankwise.adapters.loram import loram_prune
    from rankwise.data import heldout_texts

    source, tok = rankwise.load_model("smollm2")
    texts = list(heldout_texts())
    ids = torch.tensor(tok("\n".join(texts))["input_ids"][: 64 * 40]).view(40, 64)
    target, _ = loram_prune(source, 0.25)
    base = task_loss(target, ids[:8])
    attach(source, "lora", ["q_proj", "v_proj"], rank=8)
    train_adapters(source, batches_of(ids, 4), steps=10, lr=2e-3)
    seeds = [t[:400] for t in texts if len(t) > 400][:4]
    config = TransLoraConfig(samples=8, length=48, prompt_tokens=16, steps=10, lr=2e-3, batch_size=4, targets=("q_proj", "v_proj"))
    transfer(source, target, tok, seeds, config)
    assert task_loss(target, ids[:8]) < base
