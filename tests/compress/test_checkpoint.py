import json
import os
import stat
from pathlib import Path

import pytest
import torch

from rankwise.compress.api import compress
from rankwise.compress.checkpoint import COMPRESSED_MARKER, load_compressed, save_compressed
from rankwise.errors import CheckpointError
from rankwise.fileio import MANIFEST
from rankwise.layers import LowRankLinear
from rankwise.models import count_parameters, load_model, tiny_llama


def _compressed(texts, *, tie: bool = False):
    model, tok = tiny_llama(seed=1)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return compress(
        model, tokenizer=tok, method="svdllm", ratio=0.8, data=texts, calib_tokens=256, seq_len=64,
        evaluate=False, measure_speed=False,
    )


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_gives_identical_logits_and_low_rank_modules(tmp_path, texts, tie):
    result = _compressed(texts, tie=tie)
    folder = save_compressed(result.model, result.tokenizer, tmp_path / "out", method="svdllm")
    loaded, tok = load_model(folder)  # dispatches on the marker file
    ids = torch.randint(0, 250, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0)
    low = [m for m in loaded.modules() if isinstance(m, LowRankLinear)]
    marker = json.loads((folder / COMPRESSED_MARKER).read_text())
    assert len(low) == len(marker["low_rank"]) > 0
    assert all(m.rank < m.in_features * m.out_features / (m.in_features + m.out_features) for m in low)
    assert count_parameters(loaded) == count_parameters(result.model) < count_parameters(tiny_llama(seed=1)[0])
    assert tok("abc")["input_ids"] == result.tokenizer("abc")["input_ids"]
    assert not any(p.name.endswith((".pt", ".bin", ".pkl")) for p in folder.iterdir())


def test_a_folder_of_user_files_is_never_replaced_even_with_overwrite(tmp_path, texts):
    result = _compressed(texts)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years of work")
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        save_compressed(result.model, result.tokenizer, out, method="svdllm")
    with pytest.raises(CheckpointError, match="did not write.*'sub'"):
        save_compressed(result.model, result.tokenizer, out, method="svdllm", overwrite=True)
    assert (out / "thesis.txt").read_text() == "four years of work"
    assert (out / "sub" / "data.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_overwrite_replaces_a_folder_rankwise_wrote(tmp_path, texts):
    result = _compressed(texts)
    out = save_compressed(result.model, result.tokenizer, tmp_path / "out", method="svdllm")
    assert json.loads((out / MANIFEST).read_text())["kind"] == "compressed"
    with pytest.raises(CheckpointError, match="overwrite"):
        save_compressed(result.model, result.tokenizer, out, method="svdllm")
    save_compressed(result.model, result.tokenizer, out, method="svd", overwrite=True)
    assert json.loads((out / COMPRESSED_MARKER).read_text())["method"] == "svd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_model(out)


def test_folder_and_weights_get_the_users_umask(tmp_path, texts):
    result = _compressed(texts)
    old = os.umask(0o022)
    try:
        out = save_compressed(result.model, result.tokenizer, tmp_path / "out", method="svdllm")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / COMPRESSED_MARKER).stat().st_mode) == 0o644


def test_load_model_finds_the_registered_folder_format(tmp_path, texts):
    """The compressed format is registered with rankwise.models (models.py knows no compress)."""
    import rankwise.models as models

    assert models.folder_format(Path("/nonexistent")) is None
    result = _compressed(texts)
    folder = save_compressed(result.model, result.tokenizer, tmp_path / "out", method="svdllm")
    assert models.folder_format(folder).loader is load_compressed
    loaded, _ = models.load_model(folder)  # the lowest layer's own load_model
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())


def test_a_failure_while_saving_leaves_no_folder(tmp_path, texts):
    result = _compressed(texts)

    def broken(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(result.model, result.tokenizer, tmp_path / "out", method="svdllm", extra=broken)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoints_raise(tmp_path, texts):
    result = _compressed(texts)
    folder = save_compressed(result.model, result.tokenizer, tmp_path / "out", method="svdllm")
    marker = json.loads((folder / COMPRESSED_MARKER).read_text())
    name = next(iter(marker["low_rank"]))
    marker["low_rank"][name]["rank"] += 1  # factors on disk no longer fit
    (folder / COMPRESSED_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError):
        load_compressed(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_compressed(folder)
