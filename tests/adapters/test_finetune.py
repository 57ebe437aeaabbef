from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import logits, tokens
from distributed_run import torchrun
from safetensors.torch import load_file

import rankwise
from rankwise.adapters import load_adapter, method_names
from rankwise.adapters.finetune import FinetuneConfig, checkpoint_dir, finetune
from rankwise.cli import main
from rankwise.errors import CheckpointError, ConfigError
from rankwise.models import tiny_llama

TINY = dict(model="tiny-llama", rank=4, seq_len=64, lr=3e-3, eval_tokens=1024, seed=0)


def test_finetune_lowers_loss_and_perplexity():
    result = finetune(FinetuneConfig(**TINY, steps=25, batch_size=8), progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.05
    assert result.perplexity_after < result.perplexity_before
    assert 0 < result.trainable_parameters < result.total_parameters


def test_gradient_accumulation_matches_a_bigger_batch():
    quiet = {**TINY, "eval_tokens": 0}
    big = finetune(FinetuneConfig(**quiet, steps=4, batch_size=8), progress=False)
    acc = finetune(FinetuneConfig(**quiet, steps=4, batch_size=4, grad_accum=2), progress=False)
    assert acc.losses == pytest.approx(big.losses, rel=1e-4)


@pytest.mark.parametrize(
    "bad",
    [dict(steps=0), dict(rank=-1), dict(seq_len=1), dict(lr=0.0), dict(warmup_steps=50, steps=10)],
)
def test_bad_options(bad):
    with pytest.raises(ConfigError):
        FinetuneConfig(**{**TINY, **bad})


def test_refuses_non_causal_model():
    with pytest.raises(ConfigError, match="causal"):
        finetune(FinetuneConfig(**{**TINY, "model": "tiny-bert"}, steps=1), progress=False)


def test_refuses_existing_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="not empty.*overwrite"):
        finetune(FinetuneConfig(**TINY, steps=1, out=str(tmp_path)), progress=False)
    with pytest.raises(CheckpointError, match="keep.txt"):
        finetune(FinetuneConfig(**TINY, steps=1, out=str(tmp_path), overwrite=True), progress=False)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def _no_model_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(rankwise, "load_model", fail)


def _read_only_folder(tmp_path) -> Path:
    if os.geteuid() == 0:  # root writes anywhere except on read-only file systems
        return Path("/proc")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_read_only_destination_fails_before_any_work(tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    out = _read_only_folder(tmp_path) / "rankwise-test" / "adapter"
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="not a writable folder"):
        finetune(FinetuneConfig(**TINY, steps=1, out=str(out)), progress=False)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"dropout": "abc"}, r"option 'dropout' must be float, got 'abc' \(str\)"),
        ({"use_rslora": 3}, "option 'use_rslora' must be bool"),
        ({"nonsense": 1}, "unknown option"),
        ({"r": 4}, "give it as rank="),
        ({"init": "no-such-init"}, "unknown init"),
    ],
)
def test_bad_method_options_fail_before_loading(monkeypatch, options, pattern):
    _no_model_loading(monkeypatch)
    with pytest.raises(ConfigError, match=pattern):
        finetune(FinetuneConfig(**TINY, steps=1, method_options=options), progress=False)


def test_checkpointing_needs_an_output_folder():
    with pytest.raises(ConfigError, match="need out"):
        FinetuneConfig(**TINY, checkpoint_every=2)
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0"):
        FinetuneConfig(**TINY, checkpoint_every=-1, out="x")


def test_seq_len_beyond_the_context_is_refused_at_once(capsys):
    code = main(
        [
            "finetune",
            "--model",
            "tiny-llama",
            "--seq-len",
            "100000",
            "--steps",
            "1",
            "--eval-tokens",
            "0",
        ]
    )
    assert code == 2
    assert "100000 is longer than the model's context (1024" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every method, end to end


def _cli_finetune(method: str, out: Path, *extra: str) -> int:
    return main(
        ["finetune", "--model", "tiny-llama", "--method", method, "--rank", "4", "--steps", "3",
         "--seq-len", "32", "--batch-size", "2", "--eval-tokens", "0", "--out", str(out), *extra]
    )  # fmt: skip


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_saves_and_loads_back(tmp_path, method):
    out = tmp_path / "a"
    assert _cli_finetune(method, out) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    weights = "adapter_model.safetensors" if cfg.get("peft_type") else "adapter.safetensors"
    assert (out / weights).is_file()
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    assert not checkpoint_dir(out).exists()
    x = tokens()
    base, _ = tiny_llama()
    loaded, _ = tiny_llama()
    load_adapter(loaded, out)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    ours = logits(loaded, x)
    assert (ours - logits(base, x)).abs().max() > 1e-5
    if method in ("lora", "dora"):
        from peft import PeftModel

        theirs = PeftModel.from_pretrained(tiny_llama()[0], out)
        torch.testing.assert_close(logits(theirs, x), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["eva", "pissa"])
def test_initialisers_through_finetune_load_back_unchanged(tmp_path, init):
    out = tmp_path / "a"
    options = {"init": init, "init_options": {"rho": 1.0}} if init == "eva" else {"init": init}
    config = FinetuneConfig(
        **{**TINY, "eval_tokens": 0}, steps=2, method_options=options, out=str(out)
    )
    finetune(config, progress=False)
    x = tokens()
    loaded, _ = tiny_llama()
    load_adapter(loaded, out)
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(tiny_llama()[0], out)  # on the original base weights
    torch.testing.assert_close(logits(theirs, x), logits(loaded, x), atol=1e-5, rtol=1e-5)
    assert (logits(loaded, x) - logits(tiny_llama()[0], x)).abs().max() > 1e-5


def test_residual_init_is_saved_as_a_lora_on_the_original_base(tmp_path):
    out = tmp_path / "a"
    config = FinetuneConfig(**{**TINY, "eval_tokens": 0}, method="nlora", steps=3, out=str(out))
    finetune(config, progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8  # rank 2r LoRA, loads in PEFT too


def test_residual_init_that_cannot_be_converted_is_refused_before_training(monkeypatch):
    config = FinetuneConfig(**TINY, method="dora", method_options={"init": "pissa"}, steps=1)
    with pytest.raises(ConfigError, match="rewrites the base weights.*dora"):
        finetune(config, progress=False, on_step=lambda *a: pytest.fail("trained anyway"))


def test_list_methods_names_every_method_with_a_summary(capsys):
    assert main(["finetune", "--list-methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == method_names()
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)
    assert "DoRA" in lines[method_names().index("dora")]


def test_cli_bad_option_type_is_one_line(capsys):
    assert main(["finetune", "--model", "tiny-llama", "-o", "dropout=abc", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "option 'dropout' must be float" in err


# ----------------------------------------------------------------------------- checkpoints


class _Interrupt(Exception):
    pass


def _stop_at(step: int):
    def on_step(done: int, loss: float) -> None:
        if done == step:
            raise _Interrupt

    return on_step


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    common = {**TINY, "eval_tokens": 256, "steps": 6, "batch_size": 2, "seq_len": 32}
    common["method_options"] = {"dropout": 0.1}  # dropout makes the RNG state matter
    whole = finetune(FinetuneConfig(**common, out=str(tmp_path / "whole")), progress=False)

    out = tmp_path / "parts"
    config = FinetuneConfig(**common, out=str(out), checkpoint_every=2)
    with pytest.raises(_Interrupt):
        finetune(config, progress=False, on_step=_stop_at(5))  # step 5 is lost, 4 is saved
    assert json.loads((checkpoint_dir(out) / "checkpoint.json").read_text())["step"] == 4
    assert not out.exists()
    resumed = finetune(replace(config, resume=True), progress=False)
    assert resumed.resumed_from == 4
    assert resumed.losses == whole.losses
    assert resumed.perplexity_before == whole.perplexity_before
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint_dir(out).exists()  # removed once the adapter is saved


def test_resume_refuses_a_missing_or_mismatched_checkpoint(tmp_path):
    out = tmp_path / "a"
    base = {**TINY, "eval_tokens": 0, "steps": 4, "batch_size": 2, "seq_len": 32}
    with pytest.raises(CheckpointError, match="no checkpoint"):
        finetune(FinetuneConfig(**base, out=str(out), resume=True), progress=False)
    config = FinetuneConfig(**base, out=str(out), checkpoint_every=1)
    with pytest.raises(_Interrupt):
        finetune(config, progress=False, on_step=_stop_at(2))
    with pytest.raises(ConfigError, match="other options.*lr=0.003"):
        finetune(replace(config, lr=1e-2, resume=True), progress=False)
    with pytest.raises(CheckpointError, match="interrupted run.*--resume"):
        finetune(config, progress=False)  # a fresh run does not silently drop the checkpoint


@pytest.mark.slow
def test_two_process_data_parallel_equals_one_process_with_double_batch():
    args = [
        "finetune",
        "--model",
        "tiny-llama",
        "--rank",
        "4",
        "--steps",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "3e-3",
        "--eval-tokens",
        "0",
        "--json",
    ]
    ddp = torchrun(["-m", "rankwise", *args, "--batch-size", "2"], timeout=300)
    report = json.loads(ddp.stdout[ddp.stdout.index("{") :])
    assert report["world_size"] == 2
    single = finetune(
        FinetuneConfig(**{**TINY, "eval_tokens": 0}, steps=4, batch_size=4), progress=False
    )
    assert report["losses"] == pytest.approx(single.losses, rel=1e-4)


def test_a_compressed_folder_can_be_finetuned_in_a_fresh_process(tmp_path):
    """`rankwise finetune --model <compressed folder>` loads the low-rank model (the folder
    format is registered by rankwise.compress, which nothing imported yet in that process)."""
    from rankwise.compress import compress

    compress("tiny-llama", method="svd", ratio=0.9, evaluate=False, measure_speed=False,
             out=tmp_path / "small", report_html=False)  # fmt: skip
    cmd = [sys.executable, "-m", "rankwise", "finetune", "--model", str(tmp_path / "small"),
           "--method", "lora", "--rank", "2", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
           "--eval-tokens", "0", "--targets", "lm_head", "--out", str(tmp_path / "adapter"), "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RANKWISE_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert json.loads(done.stdout)["total_parameters"] < tiny_llama()[0].num_parameters()
