import json

import pytest
import torch

from rankwise.compress.api import compress
from rankwise.compress.base import LowRankLinear
from rankwise.compress.checkpoint import load_compressed, save_compressed
from rankwise.errors import CheckpointError
from rankwise.models import COMPRESSED_MARKER, count_parameters, load_model, tiny_llama


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


def test_existing_folder_is_refused_and_overwrite_replaces_it(tmp_path, texts):
    result = _compressed(texts)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        save_compressed(result.model, result.tokenizer, out, method="svdllm")
    assert (out / "keep.txt").read_text() == "user data"
    save_compressed(result.model, result.tokenizer, out, method="svdllm", overwrite=True)
    assert (out / COMPRESSED_MARKER).exists() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


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
