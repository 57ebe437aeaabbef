"""GaLore's refresh (leading_subspace): orthonormal, captures the exact subspace's energy."""

from __future__ import annotations

import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.optim.galore import leading_subspace, subspace_method


def graded(m: int, n: int, decay: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (U * s) @ V.mT


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("decay", [0.9, 0.97])
@pytest.mark.parametrize("method", ["auto", "iteration", "gram"])
def test_captures_the_exact_subspace_energy(shape, side, decay, method):
    A = graded(*shape, decay)
    rank = 8
    P = leading_subspace(A, rank, side, generator=torch.Generator().manual_seed(1), method=method)
    d = shape[0] if side == "left" else shape[1]
    assert P.shape == (d, rank)
    torch.testing.assert_close(P.mT @ P, torch.eye(rank), atol=1e-5, rtol=0)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    exact = float(S[:rank].square().sum())
    captured = float((P.mT @ A if side == "left" else A @ P).square().sum())
    assert captured >= 0.99 * exact
    assert captured <= exact * (1 + 1e-5)


def test_full_rank_spans_the_whole_side_and_low_rank_input_is_fine():
    A = graded(30, 12, 0.5)
    P = leading_subspace(A, 12, "right", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(P @ P.mT, torch.eye(12), atol=1e-5, rtol=0)
    rank_one = torch.outer(torch.randn(30), torch.randn(12))
    Q = leading_subspace(rank_one, 4, "left", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(Q.mT @ Q, torch.eye(4), atol=1e-5, rtol=0)
    captured = float((Q.mT @ rank_one).square().sum())
    assert captured == pytest.approx(float(rank_one.square().sum()), rel=1e-5)
    assert leading_subspace(rank_one.double(), 2, "right").dtype == torch.float64


def test_check_finite_off_leaves_the_check_to_the_loop():
    from torch import nn

    from rankwise.optim import GaLoreAdamW

    layer = nn.Linear(6, 5)
    opt = GaLoreAdamW(layer, rank=2, update_proj_gap=100, check_finite=False)
    layer.weight.grad, layer.bias.grad = torch.randn(5, 6), torch.zeros(5)
    opt.step()  # the subspace is found here; the next step does not renew it
    layer.weight.grad = torch.full((5, 6), float("nan"))
    opt.step()
    assert opt.skipped_steps == 0 and torch.isnan(layer.weight).all()  # not checked: the caller's job


@pytest.mark.parametrize("method", ["iteration", "gram"])
@pytest.mark.parametrize("shape, side", [((128, 344), "left"), ((344, 128), "right"), ((200, 200), "left")])
def test_every_path_spans_the_reference_subspace(method, shape, side):
    """Both paths give the span of the top singular vectors (torch.linalg.svd, galore-torch's
    refresh): the mean squared cosine of the principal angles is >= 0.999 (the iteration stops
    at 0.1% of captured energy, so directions at the rank's edge may tilt a little); the exact
    Gram path's projector equals the reference's to 1e-4."""
    A = graded(*shape, 0.93, seed=2)
    rank = 24
    P = leading_subspace(A, rank, side, generator=torch.Generator().manual_seed(0), method=method)
    U, _, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    ref = (U if side == "left" else Vh.mT)[:, :rank].float()
    assert float((ref.mT @ P).square().sum()) / rank >= 0.999
    if method == "gram":
        assert float(torch.linalg.matrix_norm(P @ P.mT - ref @ ref.mT, 2)) <= 1e-4


def test_auto_takes_the_gram_path_when_the_sketch_is_a_large_share_of_the_side():
    assert subspace_method(128, 64) == "gram"  # sketch 74 of 128
    assert subspace_method(256, 64) == "iteration"  # sketch 74 of 256
    assert subspace_method(512, 128) == "iteration"
    A = graded(128, 300, 0.95)
    auto = leading_subspace(A, 64, "left", generator=torch.Generator().manual_seed(0))
    gram = leading_subspace(A, 64, "left", method="gram")
    assert torch.equal(auto, gram)
    with pytest.raises(ConfigError, match="method must be one of auto, iteration, gram"):
        leading_subspace(A, 4, "left", method="svd")
