"""Extreme but finite magnitudes: float32 entries near 1e20 overflow when squared (Gram
matrices, Cholesky-QR, norms) and entries near 1e-30 underflow. Every kernel rescales by
an exact power of two inside, so its answer matches the float64 reference at any scale."""

from __future__ import annotations

import pytest
import torch

import rankwise.linalg as L

SCALES = [1e20, 1e-30, 2.0**110, 2.0**-120]


def seed(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def low_rank(m: int = 120, n: int = 80, rank: int = 6, s: int = 0) -> torch.Tensor:
    """float64, decaying spectrum 1, 1/2, ... plus a small full-rank tail."""
    g = seed(s)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    S = 1.0 / torch.arange(1, rank + 1, dtype=torch.float64)
    return (U * S) @ V.T + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)


def assert_svd_matches(res, A64: torch.Tensor, k: int, rtol: float = 1e-4) -> None:
    """S matches the float64 SVD relative to σ₁; the rank-k error is near optimal."""
    S_true = torch.linalg.svdvals(A64)
    S = res.S.double()
    assert torch.isfinite(S).all() and torch.isfinite(res.U).all() and torch.isfinite(res.Vh).all()
    assert (S - S_true[..., :k]).abs().max() <= rtol * S_true[..., 0].max()
    approx = (res.U.double() * S.unsqueeze(-2)) @ res.Vh.double()
    err = torch.linalg.matrix_norm(A64 - approx)
    best = S_true[..., k:].square().sum(-1).sqrt()
    assert (err <= 1.02 * best + 1e-5 * S_true[..., 0]).all()


def assert_same_up_to_scale(res, ref, scale: float, rtol: float) -> None:
    """rsvd of ``scale·A`` equals ``scale`` times rsvd of ``A`` (same seed)."""
    assert torch.allclose(res.S.double() / scale, ref.S.double(), rtol=rtol, atol=0)
    assert float(res.residual) == pytest.approx(float(ref.residual), rel=1e-2, abs=1e-6)
    assert res.depth == ref.depth


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n_iter", ["auto", 0, 3])
def test_rsvd_float32_extreme_scale_matches_dense_float64(scale, n_iter):
    A64 = low_rank()
    ref = L.rsvd(A64.float(), 6, n_iter=n_iter, generator=seed())
    res = L.rsvd((A64 * scale).float(), 6, n_iter=n_iter, generator=seed())
    assert_same_up_to_scale(res, ref, scale, rtol=1e-5)
    if n_iter != 0:  # without power iterations the answer is only as good as one sketch
        assert_svd_matches(res, A64 * scale, 6)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_rsvd_tol_mode_extreme_scale(scale):
    A64 = low_rank() * scale
    res = L.rsvd(A64.float(), None, tol=0.01, generator=seed())
    assert int(res.ranks) == 6  # 1/6 is above 1% of ‖A‖_F, the tail is far below
    assert 0 < float(res.residual) <= 0.01


def test_rsvd_mixed_magnitudes_in_one_matrix():
    """Rows from 1e20 down to 1e-30: the top singular values are right relative to σ₁."""
    g = seed(3)
    rows = 10.0 ** torch.linspace(20, -30, 60, dtype=torch.float64)
    A64 = rows[:, None] * torch.randn(60, 40, generator=g, dtype=torch.float64)
    res = L.rsvd(A64.float(), 5, generator=seed())
    S_true = torch.linalg.svdvals(A64)
    assert ((res.S.double() - S_true[:5]).abs() <= 1e-5 * S_true[0]).all()


def test_rsvd_batch_of_different_scales():
    """Each matrix of a batch is rescaled by its own power of two."""
    base = low_rank()
    scales = torch.tensor([1e20, 1.0, 1e-30], dtype=torch.float64)
    A64 = base * scales[:, None, None]
    res = L.rsvd(A64.float(), 6, generator=seed())
    assert_svd_matches(res, A64, 6)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_rsvd_float64_extreme_scale(scale):
    A64 = low_rank()
    res = L.rsvd(A64 * scale, 6, generator=seed())
    assert_same_up_to_scale(res, L.rsvd(A64, 6, generator=seed()), scale, rtol=1e-10)
    assert_svd_matches(res, A64 * scale, 6)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_rsvd_operator_extreme_scale(scale):
    A64 = low_rank() * scale
    A = A64.float()
    op = L.LinearOperator(A.shape, lambda X: A @ X, lambda Y: A.T @ Y)
    # a fixed depth: this is about scale, not about where n_iter="auto" stops (1% by default)
    assert_svd_matches(L.rsvd(op, 6, n_iter=4, generator=seed()), A64, 6)
    X, W = low_rank(120, 6, 6).float() * scale, low_rank(6, 80, 6, s=1).float()
    prod = L.rsvd(L.ProductOperator(X, W), 4, n_iter=4, generator=seed())
    assert_svd_matches(prod, X.double() @ W.double(), 4)


def test_rsvd_bf16_large_entries():
    A64 = low_rank() * 1e20
    res = L.rsvd(A64.bfloat16(), 3, generator=seed())
    assert res.S.dtype == torch.bfloat16 and torch.isfinite(res.S.float()).all()
    S_true = torch.linalg.svdvals(A64.bfloat16().double())
    assert ((res.S.double() - S_true[:3]).abs() <= 2e-2 * S_true[0]).all()


@pytest.mark.parametrize("scale", SCALES)
def test_nystrom_extreme_scale(scale):
    Z = low_rank(100, 8, 8)
    P64 = (Z @ Z.T) * scale
    res = L.nystrom(P64.float(), 5, generator=seed())
    ev = torch.linalg.eigvalsh(P64).flip(0)[:5]
    assert ((res.eigenvalues.double() - ev).abs() <= 1e-4 * ev[0]).all()


@pytest.mark.parametrize("scale", SCALES)
def test_nystrom_general_extreme_scale(scale):
    A64 = low_rank(rank=4)
    ref = L.nystrom_general(A64.float(), 4, generator=seed())
    res = L.nystrom_general((A64 * scale).float(), 4, generator=seed())
    approx = res.C.double() @ res.W.double() @ res.R.double()
    ref_err = float((ref.C.double() @ ref.W.double() @ ref.R.double() - A64).norm() / A64.norm())
    err = float((approx - A64 * scale).norm() / (A64 * scale).norm())
    assert err <= 1.01 * ref_err + 1e-5


@pytest.mark.parametrize("scale", SCALES)
def test_rank_metrics_extreme_scale(scale):
    A64 = low_rank()
    A = (A64 * scale).float()
    S = torch.linalg.svdvals(A64)
    assert float(L.stable_rank(A)) == pytest.approx(float(S.square().sum() / S[0] ** 2), rel=1e-4)
    assert float(L.effective_rank(A)) == pytest.approx(float(L.effective_rank(A64)), rel=1e-4)
    assert float(L.nuclear_norm(A)) == pytest.approx(float(S.sum()) * scale, rel=1e-4)
    want = int(L.energy_rank(S, energy=0.99))
    assert int(L.energy_rank((S * scale).float(), energy=0.99)) == want
    assert int(L.energy_rank(S * 1e200, energy=0.99)) == want  # float64 squares overflow


@pytest.mark.parametrize("scale", SCALES)
def test_concat_extreme_scale(scale):
    A64 = low_rank()
    mats = [(A64[:, :40] * scale).float(), (A64[:, 40:] * scale).float()]
    ref = L.concat_svd([A64[:, :40].float(), A64[:, 40:].float()], 4)
    whole = L.concat_svd(mats, 4)
    assert whole.norm == pytest.approx(float(A64.norm()) * scale, rel=1e-5)
    assert whole.rel_error == pytest.approx(ref.rel_error, rel=1e-3)
    inc = L.concat_svd_update(L.concat_svd(mats[:1], 4), mats[1:])
    assert inc.norm == pytest.approx(whole.norm, rel=1e-5)
    assert whole.rel_error * 0.999 <= inc.rel_error < 1
    groups = L.cluster_concat(mats, 4, max_error=0.5, estimator="incremental")
    assert sorted(map(sorted, groups.groups)) == [[0, 1]]


@pytest.mark.parametrize("scale", SCALES)
def test_dct_select_extreme_scale(scale):
    G = low_rank(64, 200, 8)
    for side in ("left", "right"):
        want = L.dct_select(G.float(), 8, side=side).indices
        got = L.dct_select((G * scale).float(), 8, side=side).indices
        assert torch.equal(got, want)


@pytest.mark.parametrize("scale", SCALES)
def test_streaming_top_eigvec_extreme_scale(scale):
    g = seed(5)
    u = torch.nn.functional.normalize(torch.randn(20, generator=g, dtype=torch.float64), dim=0)
    X = torch.randn(4000, 20, generator=g, dtype=torch.float64)
    X = X + 3 * torch.randn(4000, 1, generator=g, dtype=torch.float64) * u
    ref = L.streaming_top_eigvec(iter(X.float().split(50)), generator=seed())
    res = L.streaming_top_eigvec(iter((X * scale).float().split(50)), generator=seed())
    assert abs(float(res.vector.double() @ u)) > 0.98
    assert abs(float(res.vector @ ref.vector)) > 1 - 1e-4
    assert res.value == pytest.approx(ref.value * scale**2, rel=1e-3)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_complete_altmin_extreme_scale(scale, solver):
    g = seed(2)
    M = torch.randn(60, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 50, generator=g, dtype=torch.float64
    )
    r, c = (torch.rand(60, 50, generator=g) < 0.5).nonzero(as_tuple=True)
    ref = L.complete_altmin(r, c, M[r, c].float(), (60, 50), 3, solver=solver, generator=seed())
    res = L.complete_altmin(
        r, c, (M[r, c] * scale).float(), (60, 50), 3, solver=solver, generator=seed()
    )
    ref_err = float((ref.U.double() @ ref.V.double().T - M).norm() / M.norm())
    err = float((res.U.double() @ res.V.double().T - M * scale).norm() / (M.norm() * scale))
    assert res.n_iter == ref.n_iter and err <= 1.01 * ref_err + 1e-6 and ref_err < 1e-3


@pytest.mark.parametrize("scale", [1e20, 1e-30])
@pytest.mark.parametrize("fn", ["recover_sensing", "recover_subgradient"])
def test_recovery_extreme_scale(scale, fn):
    g = seed(4)
    Z = torch.randn(10, 2, generator=g, dtype=torch.float64)
    X = Z @ Z.T
    A = torch.randn(200, 10, 10, generator=g, dtype=torch.float64)
    y = A.reshape(200, -1) @ X.reshape(-1)
    kwargs = {"symmetric": True} if fn == "recover_subgradient" else {}
    recover = getattr(L, fn)
    ref = recover(y.float(), A.float(), 2, generator=seed(), **kwargs)
    # large/small measurements (X scaled) and large/small sensing matrices (A scaled)
    big_x = recover((y * scale).float(), A.float(), 2, generator=seed(), **kwargs)
    big_a = recover((y * scale).float(), (A * scale).float(), 2, generator=seed(), **kwargs)
    ref_err = float((ref.X.double() - X).norm() / X.norm())
    assert ref_err < 1e-4
    assert float((big_x.X.double() - X * scale).norm() / (X.norm() * scale)) < 10 * ref_err
    assert float((big_a.X.double() - X).norm() / X.norm()) < 10 * ref_err
