"""Trans-LoRA: synthetic data from the source base, distilled into a LoRA on a new base."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import gpt2

from rankwise.adapters import adapted_layers, attach
from rankwise.adapters.local_training import batches_of, lm_loss, train_adapters
from rankwise.adapters.trans_lora import (
    Discriminator,
    TransLoraConfig,
    distill,
    filter_synthetic,
    fit_discriminator,
    synthesize,
    train_discriminator,
    transfer,
)
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


def test_discriminator_separates_real_from_obviously_synthetic_text(source):
    src, tok = source
    g = torch.Generator().manual_seed(0)
    code = task_blocks(tok, seq_len=24)[:24]  # real: code snippets
    noise = torch.randint(0, 260, (72, 24), generator=g)  # "synthetic": random bytes
    for rank in (2, 4):
        disc = fit_discriminator(src, code[:12], noise[:48], rank=rank, steps=30, lr=1e-2, batch_size=8)
        real, fake = disc.prob_real(code[12:]), disc.prob_real(noise[48:])  # held-out sequences
        accuracy = ((real > 0.5).float().mean() + (fake < 0.5).float().mean()) / 2
        assert accuracy > 0.9, (rank, real, fake)
    # the source model is not changed: its adapter is still the only one
    assert {n for layer in adapted_layers(src).values() for n in layer.adapters} == {"default"}


def test_discriminator_trains_only_its_lora_and_head(source):
    src, _ = source
    for rank, lora in ((0, 0), (2, 1)):
        disc = Discriminator(src, rank=rank)
        trained = {n for n, p in disc.named_parameters() if p.requires_grad}
        assert {n for n in trained if not n.startswith("head.")} == {n for n in trained if "discriminator" in n}
        assert len({n for n in trained if "lora" in n}) > 0 if lora else not any("lora" in n for n in trained)
        assert not any(".adapters.default." in n for n, _ in disc.named_parameters())  # the task adapter is not copied


def test_filter_keeps_the_most_real_like_fraction(source):
    src, tok = source
    target, _ = tiny_llama(seed=1, hidden=48)
    config = TransLoraConfig(samples=6, length=40, keep=0.25, discriminator=True, discriminator_samples=8, discriminator_steps=10, steps=3, batch_size=4)
    result = transfer(src, target, tok, TASK, config)
    assert result.scores.shape == (24,) and result.kept.shape == (6,)  # 6 of ceil(6 / 0.25) = 24
    assert result.synthetic.shape == (6, 40)
    top = set(torch.argsort(result.scores, descending=True)[:6].tolist())
    assert set(result.kept.tolist()) == top
    assert result.scores[result.kept].min() == result.scores.sort(descending=True).values[5]
    candidates = synthesize(src, tok, TASK, dataclasses.replace(config, samples=24))
    assert torch.equal(result.synthetic, candidates[result.kept])  # the kept rows, in their order


def test_filter_function_keeps_count_and_refuses_more_than_it_has(source):
    src, tok = source
    disc, window = train_discriminator(src, tok, TASK, TransLoraConfig(length=40, discriminator_samples=4, discriminator_steps=2))
    assert window == min(40, min(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TASK))
    candidates = synthesize(src, tok, TASK, TransLoraConfig(samples=10, length=40))
    kept, scores, index = filter_synthetic(disc, candidates, 3, window=window)
    assert kept.shape == (3, 40) and scores.shape == (10,) and index.tolist() == sorted(index.tolist())
    with pytest.raises(ConfigError, match="cannot keep 11 of 10"):
        filter_synthetic(disc, candidates, 11)


def test_without_the_filter_transfer_is_synthesize_then_distill(source):
    src, tok = source
    config = TransLoraConfig(samples=8, length=32, steps=4, batch_size=4)
    result = transfer(src, tiny_llama(seed=1, hidden=48)[0], tok, TASK, config)
    assert result.scores is None and result.kept is None
    synthetic = synthesize(src, tok, TASK, config)
    assert torch.equal(result.synthetic, synthetic)
    assert distill(src, tiny_llama(seed=1, hidden=48)[0], synthetic, config) == result.losses


def test_the_target_base_can_write_the_transfer_data(source):
    src, tok = source
    config = TransLoraConfig(samples=4, length=24, steps=2, batch_size=4, synthesizer="target")
    result = transfer(src, tiny_llama(seed=1, hidden=48)[0], tok, TASK, config)
    assert torch.equal(result.synthetic, synthesize(tiny_llama(seed=1, hidden=48)[0], tok, TASK, config))
    assert not torch.equal(result.synthetic, synthesize(src, tok, TASK, config))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"keep": 0.0}, r"keep .* must be in \(0, 1\]"),
    ({"keep": 1.5}, r"keep .* must be in \(0, 1\]"),
    ({"synthesizer": "teacher"}, "synthesizer must be one of"),
    ({"discriminator_rank": -1}, "discriminator_rank must be an integer >= 0"),
    ({"discriminator_steps": 0}, "discriminator_steps must be a positive integer"),
    ({"discriminator_lr": 0.0}, "discriminator_lr must be a positive number"),
])
def test_bad_filter_options_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TransLoraConfig(**kwargs)


def test_seeds_too_short_for_the_discriminator_window(source):
    src, tok = source
    with pytest.raises(ConfigError, match="give longer seeds or a smaller prompt_tokens"):
        train_discriminator(src, tok, ["def f(a):", "def g(b):"], TransLoraConfig(prompt_tokens=9))


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
