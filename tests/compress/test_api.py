import copy

import pytest

from rankwise.compress.api import compress, parse_size
from rankwise.compress.base import method_names
from rankwise.errors import CheckpointError, ConfigError, DataError
from rankwise.models import tiny_llama

FAST = {"evaluate": False, "measure_speed": False, "seq_len": 64, "calib_tokens": 256}


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.5, float("nan")])
def test_ratio_outside_zero_one_is_refused(tiny, texts, ratio):
    model, tok = tiny
    with pytest.raises(ConfigError, match="ratio must be in"):
        compress(model, tokenizer=tok, ratio=ratio, data=texts, **FAST)


def test_size_below_what_any_rank_allows_names_the_option(tiny, texts):
    model, tok = tiny
    with pytest.raises(ConfigError, match="size='10KB'.*raise --ratio or --size"):
        compress(model, tokenizer=tok, size="10KB", data=texts, **FAST)
    with pytest.raises(ConfigError, match="either ratio"):
        compress(model, tokenizer=tok, ratio=0.5, size="1MB", data=texts, **FAST)


@pytest.mark.parametrize("method", method_names())
def test_size_caps_the_weights_file_header_included(tiny, texts, tmp_path, method):
    model, tok = tiny
    result = compress(
        model, tokenizer=tok, method=method, size="360KB", data=texts, out=tmp_path / "m", report_html=False, **FAST
    )
    file_bytes = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert file_bytes <= 360_000
    assert file_bytes >= 0.98 * 360_000  # the header bound is tight: little of the budget is lost
    assert result.report["target"]["header_bytes_bound"] > 0


def test_parse_size():
    assert parse_size("200MB") == 200_000_000
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("300MiB") == 300 * 2**20
    assert parse_size("64k") == 64_000
    for bad in ("lots", "-3MB", "0", "12XB"):
        with pytest.raises(ConfigError, match="size"):
            parse_size(bad)


def test_calibration_text_too_short(tiny):
    model, tok = tiny
    with pytest.raises(DataError, match="calib_tokens"):
        compress(model, tokenizer=tok, ratio=0.8, data=["a short text", "and another"], **FAST)


def test_bad_method_allocation_and_existing_folder(tiny, texts, tmp_path):
    model, tok = tiny
    with pytest.raises(ConfigError, match="'zip' is not registered; valid: asvd"):
        compress(model, tokenizer=tok, method="zip", data=texts, **FAST)
    with pytest.raises(ConfigError, match="cannot allocate with 'best'; it supports --allocate auto"):
        compress(model, tokenizer=tok, allocation="best", data=texts, **FAST)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="--overwrite"):
        compress(model, tokenizer=tok, data=texts, out=tmp_path / "out", **FAST)


def test_failed_compression_leaves_the_model_untouched(texts):
    model, tok = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError):
        compress(model, tokenizer=tok, ratio=0.8, data=["too short"], **FAST)
    after = model.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


@pytest.mark.parametrize("allocation", ["uniform", "energy", "welore", "global"])
def test_every_allocation_reaches_the_ratio(tiny, texts, allocation):
    model, tok = tiny
    result = compress(model, tokenizer=tok, ratio=0.7, allocation=allocation, data=texts, **FAST)
    p = result.report["parameters"]
    assert abs(p["after"] - 0.7 * p["before"]) <= 0.01 * p["before"]
    assert p["removed"] == p["before"] - p["after"]


def test_an_encoder_model_is_refused_before_any_work(texts):
    from rankwise.errors import ModelError
    from rankwise.models import tiny_bert

    model, tok = tiny_bert()
    with pytest.raises(ModelError, match="compress needs a causal language model.*is a BertModel"):
        compress(model, tokenizer=tok, data=texts, **FAST)


def test_compress_and_eval_print_the_same_parameter_count(tmp_path, texts):
    """A quantized method's folder: report.json's parameters.after is what `rankwise eval` says."""
    import json

    from rankwise.evaluation import evaluate

    out = tmp_path / "q"
    compress(
        "tiny-llama", method="lq", method_options={"bits": [3, 4], "ranks": [0, 4], "iterations": 1},
        ratio=0.5, data=texts, out=out, report_html=False, **FAST,
    )  # fmt: skip
    after = json.loads((out / "report.json").read_text())["parameters"]["after"]
    assert evaluate(out, texts, seq_len=64, max_tokens=128)["parameters"] == after


def test_the_default_allocation_is_the_methods_own(tiny, texts):
    model, tok = tiny
    result = compress(model, tokenizer=tok, method="modegpt", ratio=0.9, data=texts, **FAST)
    assert result.report["allocation"] == "uniform"
    assert {r["detail"].get("kept") for r in result.report["layers"]} - {None}


def test_a_sequence_longer_than_the_context_is_refused(tiny, texts):
    model, tok = tiny
    with pytest.raises(ConfigError, match="--seq-len 4096 is longer than the model's context .1024"):
        compress(model, tokenizer=tok, data=texts, **{**FAST, "seq_len": 4096})


def test_heal_steps_lower_perplexity_keep_the_size_and_are_checked_first(tiny, texts, tmp_path):
    from rankwise.models import count_parameters

    model, tok = tiny
    fast = {"calib_tokens": 256, "seq_len": 64, "eval_tokens": 256, "measure_speed": False, "heldout": False}
    with pytest.raises(ConfigError, match="heal_steps must be >= 0"):
        compress(model, tokenizer=tok, ratio=0.7, data=texts, heal_steps=-1, **fast)
    with pytest.raises(DataError, match="healing"):
        compress(model, tokenizer=tok, ratio=0.7, data=["too short"] * 3, heal_steps=5, **fast)
    with pytest.raises(ConfigError, match="heal_loss must be 'distill'"):
        compress(model, tokenizer=tok, ratio=0.7, data=texts, heal_steps=5, heal_loss="mse", **fast)
    dense = copy.deepcopy(model)
    res = compress(model, tokenizer=tok, ratio=0.7, data=texts, heal_steps=30, heal_lr=3e-3, heal_loss="ce", out=tmp_path / "m", **fast)
    q = res.report["perplexity"]
    assert q["healed"] < q["after"]  # the train split is the list itself here
    assert res.report["heal"]["steps"] == 30 and res.report["heal"]["loss"] == "ce"
    distilled = compress(dense, tokenizer=tok, ratio=0.7, data=texts, heal_steps=2, **fast).report["heal"]  # the default
    assert distilled["loss"] == "distill" and distilled["teacher_top_k"] == 64 and distilled["teacher_seconds"] > 0
    assert count_parameters(res.model) == res.report["parameters"]["after"]
    from rankwise.compress.checkpoint import load_compressed

    loaded, _ = load_compressed(tmp_path / "m")
    assert count_parameters(loaded) == res.report["parameters"]["after"]


def test_own_statistics_are_freed_given_ones_kept_and_the_factors_are_the_same(texts, tmp_path, monkeypatch):
    """compress() on its own statistics walks the dense model block by block (one block's Gram
    matrices at a time) and parks statistics and decompositions on disk (in a temporary folder it
    removes); the factors equal, bit for bit, those from one-pass statistics the caller keeps."""
    import tempfile

    import torch

    from rankwise.compress.base import get_method
    from rankwise.compress.calibrate import calibrate

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    given_model, tok = tiny_llama(seed=0, layers=2, hidden=64)
    needs = sorted(get_method("svdllm").statistics("auto"))
    given = calibrate(given_model, tok, texts, tokens=256, seq_len=64, statistics=needs, batch_size=1)  # compress's batches
    kept = compress(given_model, tokenizer=tok, ratio=0.6, data=texts, statistics=given, **FAST).model
    assert len(given.stats) == 14  # the caller's statistics are left whole
    own_model, _ = tiny_llama(seed=0, layers=2, hidden=64)
    own_result = compress(own_model, tokenizer=tok, ratio=0.6, data=texts, **FAST)
    assert own_result.report["calibration"]["walk"] == "block by block, dense model"
    assert own_result.report["calibration"]["mode"] == "open-loop"
    own = own_result.model
    factors = {n: p for n, p in own.named_parameters() if n.endswith((".U", ".V"))}
    assert factors
    for name, p in kept.named_parameters():
        if name in factors:
            assert torch.equal(p, factors[name]), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("rankwise-")]  # the decompositions' folder is gone


def test_a_bad_healing_precision_is_refused_before_any_work(tiny, texts):
    model, tok = tiny
    with pytest.raises(ConfigError, match="heal_precision must be one of auto, float32, bfloat16"):
        compress(model, tokenizer=tok, ratio=0.7, data=texts, heal_steps=5, heal_precision="fp16", **FAST)
