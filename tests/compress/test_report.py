"""LayerReport: one typed record per layer; report.json rows are its to_dict()."""

import json

import pytest
from torch import nn

from rankwise.compress.report import LayerReport
from rankwise.errors import ShapeError
from rankwise.layers import LowRankLinear


def test_layer_report_of_a_factorised_layer():
    dense = nn.Linear(48, 32, bias=False)
    row = LayerReport.of("model.layers.0.mlp.up_proj", dense, LowRankLinear(48, 32, 4, bias=False),
                         rank=4, parameters_after=4 * 80, relative_error=0.25)  # fmt: skip
    assert row.kind == "up_proj" and row.shape == (32, 48) and not row.dense
    assert row.to_dict() == {
        "name": "model.layers.0.mlp.up_proj", "kind": "up_proj", "shape": [32, 48],
        "layer_type": "LowRankLinear", "rank": 4, "breakeven_rank": 20, "parameters_before": 1536,
        "parameters_after": 320, "relative_error": 0.25, "detail": {},
    }  # fmt: skip
    json.dumps(row.to_dict())
    kept = LayerReport.of("x", dense, dense, rank=None, parameters_after=1536, relative_error=0.0)
    assert kept.dense and kept.rank is None


@pytest.mark.parametrize("rank", [0, -3, "16+16", 2.0, True])
def test_rank_is_a_positive_int_or_none(rank):
    dense = nn.Linear(8, 8)
    with pytest.raises(ShapeError, match="rank must be a positive int or None"):
        LayerReport.of("x", dense, dense, rank=rank, parameters_after=64, relative_error=0.0)


def test_detail_is_flat_and_frozen():
    dense = nn.Linear(8, 8)
    with pytest.raises(ShapeError, match="detail values"):
        LayerReport.of("x", dense, dense, rank=None, parameters_after=64, relative_error=0.0, kept=[1, 2])
    row = LayerReport.of("x", dense, dense, rank=None, parameters_after=64, relative_error=0.0, bits=4)
    with pytest.raises(TypeError):
        row.detail["bits"] = 8
