import json

from rankwise.cli import main


def test_cli_compress_tiny_llama_writes_folder_and_report(tmp_path, capsys, texts):
    out, data = tmp_path / "tiny-80", tmp_path / "text.txt"
    data.write_text("\n\n".join(texts * 3))
    code = main(
        ["compress", "--model", "tiny-llama", "--method", "svdllm", "--ratio", "0.8", "--out", str(out),
         "--data", str(data), "--calib-tokens", "512", "--eval-tokens", "512", "--seq-len", "128",
         "--decode-tokens", "8", "--json", "-o", "damp=0.001", "--option", "update=false"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    assert report["parameters"]["after"] == printed["parameters"]["after"]
    assert abs(report["parameters"]["kept_fraction"] - 0.8) <= 0.01
    assert report["perplexity"]["after"] > 0 and report["decode"]["after_tokens_per_s"] > 0
    assert report["calibration"]["tokens"] == 512 and report["layers"]
    assert report["method_options"] == {"damp": 0.001, "update": False}
    assert main(["eval", "--model", str(out), "--data", str(data), "--max-tokens", "256", "--seq-len", "128", "--json"]) == 0


def test_cli_compress_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["compress", "--model", "tiny-llama", "--ratio", "1.7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ratio must be in (0, 1]") and "\n" not in err
    (tmp_path / "exists").mkdir()
    assert main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compress", "--model", "tiny-llama", "--method", "nope", "--out", str(tmp_path / "y")]) == 2
    assert main(["compress", "--model", "tiny-llama", "-o", "dampp=1", "--out", str(tmp_path / "z")]) == 2
    assert "no option(s) ['dampp']" in capsys.readouterr().err
    assert main(["compress", "--model", "tiny-llama", "-o", "damp", "--out", str(tmp_path / "z")]) == 2
    assert "key=value" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
