"""Healing trains only the compressed factors, lowers held-out loss, never changes the size."""

from __future__ import annotations

import pytest
import torch

from rankwise.compress.api import compress
from rankwise.compress.heal import (
    MIN_WARMUP_STEPS,
    WARMUP_FRACTION,
    _schedule,
    check_heal_steps,
    heal,
    heal_blocks,
    healable_parameters,
)
from rankwise.errors import ConfigError, DataError
from rankwise.layers import LowRankLinear
from rankwise.models import count_parameters

FAST = {"evaluate": False, "measure_speed": False, "seq_len": 64, "calib_tokens": 256}


@pytest.fixture()
def compressed(tiny, texts):
    model, tok = tiny
    compress(model, tokenizer=tok, method="svdllm", ratio=0.6, data=texts, **FAST)
    return model, tok


def _loss(model, blocks):
    model.eval()
    with torch.no_grad():
        return model(input_ids=blocks, labels=blocks).loss.item()


def test_healing_lowers_held_out_loss_and_keeps_the_size(compressed, texts):
    model, tok = compressed
    train = heal_blocks(tok, texts[:30], seq_len=32)
    held_out = heal_blocks(tok, [t.replace("fox", "cat") for t in texts[30:]], seq_len=32)
    size = count_parameters(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in healable_parameters(model)}
    before = _loss(model, held_out)
    result = heal(model, train, steps=30, lr=3e-3, batch_size=4, progress=False)
    after = _loss(model, held_out)
    assert after < before - 0.1, (before, after)
    assert count_parameters(model) == size
    for name, p in model.named_parameters():  # only factors moved
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert result.steps == 30 and len(result.losses) == 30
    assert result.tokens == 30 * 4 * 32
    assert result.last_loss < result.first_loss


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 40, 200, 1000])
def test_schedule_warms_up_for_at_least_ten_steps_then_decays_to_a_tenth(steps):
    factors = [_schedule(steps)(s) for s in range(steps)]
    warmup = min(steps, max(MIN_WARMUP_STEPS, int(steps * WARMUP_FRACTION)))
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    if steps >= MIN_WARMUP_STEPS:  # Adam's first, sign-like step is a tenth of the peak or less
        assert factors[0] <= 1 / MIN_WARMUP_STEPS + 1e-12
    tail = factors[warmup:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False))  # cosine decay, never up
    assert all(0 < f <= 1 for f in factors) and all(f >= 0.1 for f in tail)
    if steps > 2 * warmup:
        assert tail[-1] == pytest.approx(0.1, abs=0.01)


def test_only_compressed_factors_are_healable(compressed):
    model, _ = compressed
    names = healable_parameters(model)
    low_rank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert low_rank and names
    assert all(any(n.startswith(m + ".") for m in low_rank) for n in names)
    assert not any("embed" in n or "norm" in n for n in names)


def test_requires_grad_and_mode_are_restored(compressed, texts):
    model, tok = compressed
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    heal(model, heal_blocks(tok, texts, seq_len=32), steps=2, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


@pytest.mark.parametrize("bad", [-1, 2.5, "ten", True])
def test_bad_step_counts_name_the_option(bad):
    with pytest.raises(ConfigError, match="heal_steps must be"):
        check_heal_steps(bad)
    assert check_heal_steps(3.0) == 3 and check_heal_steps(0) == 0


def test_text_shorter_than_one_block_or_empty(tiny):
    _, tok = tiny
    with pytest.raises(DataError, match="healing: .*fewer than one block"):
        heal_blocks(tok, ["two words"], seq_len=64)
    with pytest.raises(DataError, match="healing text is empty"):
        heal_blocks(tok, ["  ", ""], seq_len=64)


def test_a_dense_model_has_nothing_to_heal(tiny, texts):
    model, tok = tiny
    with pytest.raises(ConfigError, match="no compressed layers"):
        heal(model, heal_blocks(tok, texts, seq_len=32), steps=1, progress=False)


def test_zero_steps_changes_nothing(compressed, texts):
    model, tok = compressed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = heal(model, heal_blocks(tok, texts, seq_len=32), steps=0, progress=False)
    assert result.steps == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_rankwise_heal_heals_a_compressed_folder_into_a_new_one(tiny, texts, tmp_path, capsys):
    import json

    from rankwise import load_model
    from rankwise.cli import main

    model, tok = tiny
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(texts * 3))
    folder, healed, dense = tmp_path / "c", tmp_path / "c-healed", tmp_path / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    compress(model, tokenizer=tok, method="svdllm", ratio=0.6, data=texts, out=folder, report_html=False, **FAST)
    args = ["heal", "--model", str(folder), "--steps", "4", "--seq-len", "32", "--data", str(data),
            "--eval-tokens", "256", "--lr", "3e-3", "--json"]  # fmt: skip
    # distillation (the default) needs the dense model: this folder was compressed from a module
    assert main([*args, "--out", str(healed)]) == 2
    assert "--teacher" in capsys.readouterr().err and not healed.exists()
    assert main([*args, "--out", str(healed), "--teacher", str(dense)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((healed / "heal.json").read_text())
    assert report["heal"]["steps"] == 4 and set(report["perplexity"]["before"]) == {"validation", "heldout"}
    assert report["heal"]["loss"] == "distill" and report["heal"]["teacher"] == str(dense)
    before, _ = load_model(folder)
    after, _ = load_model(healed)
    assert count_parameters(after) == count_parameters(before)
    summary = json.loads((healed / "report.json").read_text())  # the compression report, healing added
    assert summary["parameters"]["after"] == count_parameters(after) and summary["heal"]["steps"] == 4
    assert summary["method"] == json.loads((folder / "report.json").read_text())["method"]
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert changed and all(n in healable_parameters(after) for n in changed)
    # in place only with --overwrite; a folder that is not compressed is refused
    assert main([*args, "--out", str(folder)]) == 2
    assert "add --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(folder), "--overwrite", "--loss", "ce"]) == 0
    assert json.loads((folder / "heal.json").read_text())["heal"]["loss"] == "ce"
    assert main([*args, "--out", str(tmp_path / "y"), "--loss", "kl"]) == 2
    assert "--loss must be 'distill'" in capsys.readouterr().err
    assert main(["heal", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a compressed folder" in capsys.readouterr().err


def test_precision_is_checked_and_bfloat16_heals_with_float32_weights(compressed, texts):
    from rankwise.compress.heal import resolve_precision

    model, tok = compressed
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, bfloat16"):
        resolve_precision("fp16", cpu)
    assert resolve_precision("float32", cpu) == "float32" and resolve_precision("auto", cpu) in ("float32", "bfloat16")
    train = heal_blocks(tok, texts[:30], seq_len=32)
    before = _loss(model, train)
    result = heal(model, train, steps=20, lr=3e-3, batch_size=4, progress=False, precision="bfloat16")
    assert result.precision == "bfloat16" and result.as_dict()["precision"] == "bfloat16"
    assert _loss(model, train) < before - 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ConfigError, match="precision must be one of"):
        heal(model, train, steps=1, progress=False, precision="half")
