"""analyze() and `rankwise analyze`: report.json + one self-contained report.html; bad input."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
from torch import nn

from rankwise.analysis.report import analyze
from rankwise.cli import main
from rankwise.errors import CheckpointError, ConfigError, DataError, ModelError, ShapeError

LAYER = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text(
        "Low-rank structure is everywhere.\n\nSingular values decay quickly in trained weights.\n\n"
        "Adapters add a small update to a frozen weight.\n"
    )
    return path


@pytest.fixture(scope="module")
def tuned_folder(tmp_path_factory):
    """tiny-llama with one strong rank-one update in LAYER, saved as a Hugging Face folder."""
    from rankwise.models import tiny_llama

    model, tok = tiny_llama()
    layer = model.get_submodule(LAYER)
    W = layer.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    with torch.no_grad():
        layer.weight += (5 * S[0] * torch.outer(U[:, :16].sum(1) / 4, Vh[:16].sum(0) / 4)).float()
    folder = tmp_path_factory.mktemp("tuned") / "tuned"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)]


def _self_contained(page: str) -> None:
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page references an external resource"
    assert "url(" not in page


def test_analyze_one_model(tmp_path, text_file):
    out = tmp_path / "report"
    report = analyze("tiny-llama", out, data=text_file, texts=2)
    assert sorted(p.name for p in out.iterdir()) == ["rankwise_output.json", "report.html", "report.json"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["model"] == "tiny-llama" and saved["tuned"] is None
    assert len(saved["spectrum"]["rows"]) == 15
    assert saved["nuclear_norm"]["rows"][0]["texts"] == 2
    assert "intruders" not in saved
    assert report["summary"] == saved["summary"]
    page = (out / "report.html").read_text()
    images = _images(page)
    assert len(images) == 2 and all(img.startswith(b"\x89PNG") for img in images)
    _self_contained(page)
    assert "model.layers.0.self_attn.q_proj" in page
    assert json.loads((out / "rankwise_output.json").read_text())["kind"] == "analysis"


def test_analyze_against_a_tuned_model_finds_the_intruder(tmp_path, tuned_folder):
    report = analyze("tiny-llama", tmp_path / "cmp", against=tuned_folder, texts=0)
    counts = {r["name"]: r["count"] for r in report["intruders"]["rows"]}
    assert counts[LAYER] == 1 and report["intruders"]["total"] == 1
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert len(_images(page)) == 4  # spectra, ranks, tuned spectra, intruders
    _self_contained(page)
    assert "Intruder dimensions" in page


def test_analyze_with_an_adapter(tmp_path, text_file):
    from rankwise.adapters import attach, save_adapter
    from rankwise.models import tiny_llama

    model, _ = tiny_llama()
    attach(model, "lora", targets=["up_proj"], r=2, alpha=2)
    layer = model.get_submodule(LAYER)
    adapter = next(iter(layer.adapters.values()))
    W = layer.base_layer.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    with torch.no_grad():
        adapter.lora_A.zero_()
        adapter.lora_B.zero_()
        adapter.lora_A[0] = (Vh[16:32].sum(0) / 4).float()
        adapter.lora_B[:, 0] = (8 * S[0] * U[:, 16:32].sum(1) / 4).float() / adapter.config.scaling
    folder = save_adapter(model, tmp_path / "adapter")
    report = analyze("tiny-llama", tmp_path / "rep", adapter=folder, data=text_file, texts=1)
    assert report["intruders"]["total"] == 1
    scores = report["nuclear_norm"]["rows"]
    assert [r["model"] for r in scores] == ["tiny-llama", f"tiny-llama + adapter {folder}"]
    assert scores[0]["score"] != scores[1]["score"]  # base view vs adapted view


def test_mismatched_architectures_name_the_first_layer(tmp_path):
    from rankwise.models import tiny_llama

    wider, tok = tiny_llama(hidden=32)
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        analyze("tiny-llama", tmp_path / "x", against=wider, texts=0)
    assert not (tmp_path / "x").exists()


def test_model_without_linear_layers(tmp_path):
    with pytest.raises(ModelError, match="no linear layers"):
        analyze(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), tmp_path / "x", texts=0)
    assert not (tmp_path / "x").exists()


def test_empty_text_is_refused_before_loading(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    with pytest.raises(DataError, match="empty"):
        analyze("tiny-llama", tmp_path / "x", data=empty)
    assert not (tmp_path / "x").exists()


def test_existing_output_and_option_conflicts(tmp_path, tuned_folder):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        analyze("tiny-llama", taken, texts=0)
    with pytest.raises(ConfigError, match="not both"):
        analyze("tiny-llama", tmp_path / "y", against=tuned_folder, adapter=tuned_folder)
    with pytest.raises(ModelError, match="language-model head"):
        analyze("tiny-bert", tmp_path / "z", texts=1)


def test_overwrite_replaces_a_previous_report(tmp_path):
    out = tmp_path / "r"
    analyze("tiny-llama", out, texts=0, top_k=4)
    with pytest.raises(CheckpointError):
        analyze("tiny-llama", out, texts=0)
    report = analyze("tiny-llama", out, texts=0, top_k=8, overwrite=True)
    assert report["spectrum"]["top_k"] == 8


def test_cli_writes_the_report(tmp_path, text_file, capsys):
    out = tmp_path / "cli"
    code = main(["analyze", "--model", "tiny-llama", "--data", str(text_file), "--texts", "1", "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["summary"][0] == {"metric": "linear layers", "value": 15}
    assert (out / "report.html").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny-llama"], "--out is required"),
        (["--model", "tiny-llama", "--against", "tiny-bert", "--texts", "0"], "differ in architecture"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    code = main(["analyze", *args] + (["--out", str(tmp_path / "o")] if "--out is required" not in message else []))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_cli_shows_progress_lines_in_a_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANKWISE_PROGRESS", "1")
    assert main(["analyze", "--model", "tiny-llama", "--texts", "0", "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "[rankwise] spectra of every linear layer" in err and "[rankwise] writing the report" in err


def test_adapter_for_another_base_model_is_refused(tmp_path):
    from rankwise.adapters import attach, save_adapter
    from rankwise.models import tiny_llama

    other, _ = tiny_llama(hidden=32)
    attach(other, "lora", targets=["q_proj"], r=2)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    folder = save_adapter(other, tmp_path / "other-adapter")
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj.*\(2, 32\).*\(2, 64\).*different base model"):
        analyze("tiny-llama", tmp_path / "x", adapter=folder, texts=0)
    assert not (tmp_path / "x").exists()


def test_gradient_spectra_of_two_datasets_in_the_report(tmp_path, text_file):
    out = tmp_path / "grad"
    report = analyze("tiny-llama", out, texts=0, gradients=2, gradient_data=["builtin", str(text_file)], gradient_tokens=8)
    g = report["gradients"]
    assert g["datasets"] == ["builtin", str(text_file)] and g["texts"] == {"builtin": 2, str(text_file): 2}
    assert len(g["rows"]) == 15 and len(g["by_kind"]) == 8  # 7 kinds in 2 blocks + lm_head
    row = g["by_kind"][0]
    assert row["builtin nuclear norm"] > 0 and row[f"{text_file} effective rank"] >= 1
    assert row["builtin nuclear norm"] != row[f"{text_file} nuclear norm"]
    metrics = [r["metric"] for r in report["summary"]]
    assert "mean gradient effective rank (builtin)" in metrics
    page = (out / "report.html").read_text()
    assert "Gradient spectra" in page and len(_images(page)) == 3  # spectra, ranks, gradients
    _self_contained(page)
    assert json.loads((out / "report.json").read_text())["recipe"]["gradients"]["tokens"] == 8


def test_gradients_are_off_by_default_and_bad_values_refused(tmp_path, text_file):
    report = analyze("tiny-llama", tmp_path / "none", texts=0, top_k=4)
    assert "gradients" not in report and report["recipe"]["gradients"] is None
    with pytest.raises(ConfigError, match="gradients must be"):
        analyze("tiny-llama", tmp_path / "bad", texts=0, gradients=-1)
    with pytest.raises(ConfigError, match="tokens must be"):
        analyze("tiny-llama", tmp_path / "bad", texts=0, gradients=1, gradient_tokens=1)
    with pytest.raises(DataError, match="missing.txt' does not exist"):
        analyze("tiny-llama", tmp_path / "bad", texts=0, gradients=1, gradient_data=["builtin", str(tmp_path / "missing.txt")])
    with pytest.raises(ConfigError, match="repeat"):
        analyze("tiny-llama", tmp_path / "bad", texts=0, gradients=1, gradient_data=["builtin", "builtin"])
    assert not (tmp_path / "bad").exists()


def test_cli_gradient_options(tmp_path, text_file, capsys):
    out = tmp_path / "cli-grad"
    args = ["analyze", "--model", "tiny-llama", "--texts", "0", "--gradients", "1",
            "--gradient-data", f"builtin,{text_file}", "--gradient-tokens", "8", "--out", str(out), "--json"]
    assert main(args) == 0
    metrics = [r["metric"] for r in json.loads(capsys.readouterr().out)["summary"]]
    assert f"mean gradient nuclear norm ({text_file})" in metrics


def test_intrinsic_dimension_curve_in_the_report(tmp_path, text_file):
    out = tmp_path / "intr"
    report = analyze("tiny-llama", out, texts=0, intrinsic=[2, 8], intrinsic_steps=3, intrinsic_parameters="*.mlp.*")
    i = report["intrinsic"]
    assert i["dims"] == [2, 8] and len(i["metrics"]) == 2 and i["steps"] == 3
    assert i["baseline"] > 0  # normal training lowered the training loss
    from rankwise.models import tiny_llama

    model, _ = tiny_llama()
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert i["parameters"] == mlp < sum(p.numel() for p in model.parameters())  # only the MLP weights
    assert any("intrinsic dimension" in r["metric"] for r in report["summary"])
    page = (out / "report.html").read_text()
    assert "Intrinsic dimension" in page and len(_images(page)) == 3  # spectra, ranks, intrinsic curve
    _self_contained(page)


def test_intrinsic_bad_values(tmp_path, capsys):
    with pytest.raises(ConfigError, match="intrinsic dimensions must be positive"):
        analyze("tiny-llama", tmp_path / "b", texts=0, intrinsic=[0, 4])
    with pytest.raises(ConfigError, match="intrinsic_steps"):
        analyze("tiny-llama", tmp_path / "b", texts=0, intrinsic=[4], intrinsic_steps=0)
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        analyze("tiny-llama", tmp_path / "b", texts=0, intrinsic=[4], intrinsic_steps=1, intrinsic_parameters="nope*")
    assert not (tmp_path / "b").exists()
    assert main(["analyze", "--model", "tiny-llama", "--texts", "0", "--intrinsic", "4,x", "--out", str(tmp_path / "c")]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
