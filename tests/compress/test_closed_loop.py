"""Closed-loop (sequential) calibration: statistics of block b measured after blocks < b were
compressed; the compress() option that uses it; interleaved decode timing."""

import pytest
import torch
from torch import nn

from rankwise.compress.api import compress, decode_speeds_interleaved
from rankwise.compress.calibrate import (
    calibrate,
    closed_loop_calibration,
    decoder_blocks,
    linear_layers,
)
from rankwise.errors import ConfigError, ModelError

FAST = {"evaluate": False, "measure_speed": False, "calib_tokens": 256, "seq_len": 64}


def _factors(model: nn.Module, block: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{block}."
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith(prefix) and n.endswith((".U", ".V"))}


def test_closed_loop_equals_open_loop_in_the_first_block_and_differs_after(texts):
    from rankwise.models import tiny_llama

    results = {}
    for mode in ("open-loop", "closed-loop"):
        model, tok = tiny_llama(seed=0, layers=2, hidden=64)
        results[mode] = compress(model, tokenizer=tok, method="svdllm", ratio=0.6, data=texts, calibration=mode, **FAST)
    open_model, closed_model = results["open-loop"].model, results["closed-loop"].model
    assert results["closed-loop"].report["calibration"]["mode"] == "closed-loop"
    assert [r["rank"] for r in results["open-loop"].report["layers"]] == [r["rank"] for r in results["closed-loop"].report["layers"]]
    first_open, first_closed = _factors(open_model, 0), _factors(closed_model, 0)
    assert first_open and first_open.keys() == first_closed.keys()
    for name in first_open:
        torch.testing.assert_close(first_closed[name], first_open[name], rtol=1e-3, atol=1e-4)  # float32 sums
    second_open, second_closed = _factors(open_model, 1), _factors(closed_model, 1)
    assert second_open
    assert max(float((second_open[n] - second_closed[n]).abs().max()) for n in second_open) > 1e-3


def test_block_statistics_come_from_the_compressed_blocks_before(tiny, texts):
    model, tok = tiny
    layers = linear_layers(model)
    opened = calibrate(model, tok, texts, tokens=256, seq_len=64, statistics=("gram",), layers=layers)
    walk = closed_loop_calibration(model, tok, texts, tokens=256, seq_len=64, statistics=("gram",), layers=layers).stats
    first, second = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(walk[first].gram, opened.stats[first].gram, rtol=1e-5, atol=1e-4)
    assert walk[first].tokens == 256
    with torch.no_grad():  # "compress" block 0: its MLP output shrinks, so block 1 sees new inputs
        model.model.layers[0].mlp.down_proj.weight.mul_(0.1)
    assert not torch.allclose(walk[second].gram, opened.stats[second].gram, rtol=1e-3)
    walk.finish()
    assert walk.compressed_blocks == 0  # scaled in place, not replaced: no block counts as compressed
    with pytest.raises(ConfigError, match="block by block in order"):
        walk[first]


def test_a_walk_over_unchanged_blocks_runs_each_block_once(tiny, texts):
    """Reading a block's statistics runs it; passing it reuses those outputs unless the block
    changed meanwhile (a replaced layer, or a weight edited in place)."""
    model, tok = tiny
    layers = linear_layers(model)
    blocks = decoder_blocks(model, layers)
    calls = {b.name: 0 for b in blocks}
    handles = [b.module.register_forward_pre_hook(lambda m, a, name=b.name: calls.__setitem__(name, calls[name] + 1)) for b in blocks]
    walk = closed_loop_calibration(model, tok, texts, tokens=256, seq_len=64, batch_size=4, statistics=("gram",), layers=layers).stats
    batches = 256 // 64 // 4
    for name in layers:
        walk[name]
    walk.finish()
    capture = {blocks[0].name: batches}  # the forward capturing block 0's inputs stops in its pre-hook
    assert calls == {b.name: batches + capture.get(b.name, 0) for b in blocks}  # read once, never rerun
    edited = closed_loop_calibration(model, tok, texts, tokens=256, seq_len=64, batch_size=4, statistics=("gram",), layers=layers).stats
    calls.update({b.name: 0 for b in blocks})
    edited[next(iter(blocks[0].layers))]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.0)  # an in-place edit, even one keeping values
    edited.finish()
    for h in handles:
        h.remove()
    assert calls[blocks[0].name] == 2 * batches  # read, then run again when passed


def test_closed_loop_refuses_what_it_cannot_do(tiny, texts):
    model, tok = tiny
    with pytest.raises(ConfigError, match="open-loop calibration passed as base"):
        closed_loop_calibration(model, tok, texts, tokens=128, seq_len=64, statistics=("gram", "out_grad"))
    with pytest.raises(ConfigError, match="--calibration open-loop"):
        compress(model, tokenizer=tok, method="svd", ratio=0.8, data=texts, calibration="closed-loop", **FAST)
    with pytest.raises(ConfigError, match="auto, open-loop or closed-loop"):
        compress(model, tokenizer=tok, method="svdllm", ratio=0.8, data=texts, calibration="sequential", **FAST)
    flat = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ModelError, match="calibration='open-loop'"):
        decoder_blocks(flat, linear_layers(flat))


def test_modegpt_walks_block_by_block_and_auto_is_the_default(tiny, texts):
    from rankwise.compress.api import DEFAULT_CALIBRATION

    model, tok = tiny
    res = compress(model, tokenizer=tok, method="modegpt", ratio=0.7, data=texts, calibration="closed-loop", **FAST)
    cal = res.report["calibration"]
    assert cal["mode"] == "closed-loop" and cal["blocks"] == 2
    assert cal["blocks_compressed_before_the_walk_passed_them"] == 2
    res = compress(tiny_model_again(), tokenizer=tok, method="modegpt", ratio=0.7, data=texts, **FAST)
    assert res.report["calibration"]["mode"] == DEFAULT_CALIBRATION
    res = compress(tiny_model_again(), tokenizer=tok, method="svd", ratio=0.8, data=texts, allocation="uniform", **FAST)
    assert res.report["calibration"] is None  # data-free: nothing to calibrate, open or closed


def tiny_model_again():
    from rankwise.models import tiny_llama

    return tiny_llama(seed=0, layers=2, hidden=64)[0]


def test_report_measures_both_corpora_and_decodes_interleaved(tiny, texts):
    model, tok = tiny
    res = compress(model, tokenizer=tok, method="svdllm", ratio=0.7, data=texts, calib_tokens=256, seq_len=64,
                   eval_tokens=256, decode_tokens=4)  # fmt: skip
    q = res.report["perplexity"]
    assert q["before"] > 1 and q["after"] > 1
    assert q["heldout"]["before"] > 1 and q["heldout"]["after"] > 1 and q["heldout"]["before"] != q["before"]
    assert "licenses" in q["heldout"]["corpus"] and q["heldout"]["recipe"]["scored_tokens"] > 200
    d = res.report["decode"]
    assert d["before_tokens_per_s"] > 0 and d["after_tokens_per_s"] > 0 and "interleaved" in d["timing"]
    assert res.report["memory"]["peak_rss_bytes"] > 10**7


def test_interleaved_decoding_puts_the_compressed_modules_back(tiny):
    model, tok = tiny
    name = "model.layers.0.mlp.up_proj"
    dense = model.get_submodule(name)
    smaller = nn.Linear(dense.in_features, dense.out_features, bias=False)
    from rankwise.modules import replace_module

    replace_module(model, name, smaller)
    dense_speed, speed = decode_speeds_interleaved(model, tok, {name: dense}, new_tokens=3, repeats=1)
    assert dense_speed > 0 and speed > 0
    assert model.get_submodule(name) is smaller


def test_memory_mapped_weights_compress_to_exactly_the_same_factors(tmp_path, texts):
    from rankwise.compress.checkpoint import map_weights
    from rankwise.models import load_model, tiny_llama

    model, tok = tiny_llama(seed=0, layers=2, hidden=64)
    folder = tmp_path / "dense"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    runs = {}
    for mapped in (False, True):
        res = compress(str(folder), method="svdllm", ratio=0.6, data=texts, memory_map=mapped, **FAST)
        runs[mapped] = dict(res.model.named_parameters())
    assert runs[True].keys() == runs[False].keys()
    for name, p in runs[False].items():
        assert torch.equal(runs[True][name], p), name

    loaded, _ = load_model(folder)
    before = (folder / "model.safetensors").read_bytes()
    assert map_weights(loaded, folder / "model.safetensors") > 0.9 * sum(p.numel() * 4 for p in loaded.parameters())
    with torch.no_grad():
        loaded.model.layers[0].mlp.up_proj.weight.mul_(2)  # copy-on-write: the file never changes
    assert (folder / "model.safetensors").read_bytes() == before


def test_a_device_this_machine_lacks_is_refused_before_loading(texts):
    with pytest.raises(ConfigError, match="--device"):
        compress("tiny-llama", ratio=0.8, data=texts, device="cuda:7", **FAST)
    with pytest.raises(ConfigError, match="not a device"):
        compress("tiny-llama", ratio=0.8, data=texts, device="gpu please", **FAST)


def test_the_target_weight_maps_actual_inputs_to_the_dense_outputs(tiny, texts):
    import copy

    from rankwise.compress.calibrate import CROSS_DAMP
    from rankwise.modules import replace_module

    model, tok = tiny
    walk = closed_loop_calibration(model, tok, texts, tokens=256, seq_len=64, statistics=("gram",), cross=True).stats
    first = walk["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(first.cross, first.gram)  # block 0: same inputs on both streams
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    torch.testing.assert_close(first.target_weight(w), w)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"):  # "compress" block 0
        changed = copy.deepcopy(model.get_submodule(name))
        with torch.no_grad():
            changed.weight.mul_(0.5)
        replace_module(model, name, changed)
    s = walk["model.layers.1.mlp.up_proj"]
    assert s.cross is walk["model.layers.1.mlp.gate_proj"].cross  # shared input, shared statistics
    assert not torch.allclose(s.cross, s.gram, rtol=1e-2)
    w = model.model.layers[1].mlp.up_proj.weight.detach().double()
    m = s.target_weight(w)
    ridge = CROSS_DAMP * s.gram.diagonal().mean() * torch.eye(s.gram.shape[0], dtype=torch.float64)
    torch.testing.assert_close((m - w) @ (s.gram + ridge), w @ (s.cross - s.gram), rtol=1e-6, atol=1e-6)
