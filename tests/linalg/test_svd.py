"""rsvd, truncated_svd and svd_update against dense torch.linalg.svd."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg import (
    LinearOperator,
    ProductOperator,
    RSVDResult,
    SVDResult,
    rsvd,
    svd_update,
    truncated_svd,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def spectrum_matrix(m, n, s, *, seed=0, dtype=torch.float64):
    """U diag(s) Vᵀ with random orthonormal U (m, k), V (n, k) and given singular values."""
    g = gen(seed)
    k = len(s)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((U * torch.as_tensor(s, dtype=torch.float64)) @ V.mT).to(dtype)


def rel_err(A, r):
    return float(torch.linalg.norm(A - (r.U * r.S.unsqueeze(-2)) @ r.Vh) / torch.linalg.norm(A))


def assert_orthonormal_cols(U, atol):
    eye = torch.eye(U.shape[-1], dtype=U.dtype)
    torch.testing.assert_close(U.mT @ U, eye.expand_as(U.mT @ U), atol=atol, rtol=0)


# ---------------------------------------------------------------- rsvd: accuracy


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("decay", ["geometric", "power"])
def test_rsvd_matches_dense_svd(shape, decay):
    m, n = shape
    i = torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    s = 0.9 ** (i - 1) if decay == "geometric" else i**-0.5
    A = spectrum_matrix(m, n, s, dtype=torch.float32)
    k = 10
    r = rsvd(A, k, generator=gen())
    assert isinstance(r, RSVDResult) and isinstance(r, SVDResult)
    assert r.U.shape == (m, k) and r.S.shape == (k,) and r.Vh.shape == (k, n)
    S = torch.linalg.svdvals(A.double())
    torch.testing.assert_close(r.S.double(), S[:k], rtol=1e-3, atol=0)
    assert_orthonormal_cols(r.U, 1e-4)
    assert_orthonormal_cols(r.Vh.mT, 1e-4)
    optimal = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
    err = rel_err(A, r)
    assert err <= optimal * 1.01 + 1e-6
    assert abs(float(r.residual) - err) < 2e-3  # the attached estimate is the actual error


def test_rsvd_float64_is_accurate_to_double_precision():
    A = spectrum_matrix(120, 80, 0.5 ** torch.arange(12.0), dtype=torch.float64)
    r = rsvd(A, 12, n_iter=2, generator=gen())
    assert r.U.dtype == torch.float64
    torch.testing.assert_close(r.S, torch.linalg.svdvals(A)[:12], rtol=1e-9, atol=1e-12)
    assert rel_err(A, r) < 1e-10


def test_rsvd_wide_result_orientation():
    A = torch.randn(20, 90, generator=gen())
    r = rsvd(A, 20, generator=gen())  # full rank: exact
    torch.testing.assert_close((r.U * r.S) @ r.Vh, A, atol=1e-4, rtol=0)
    assert r.U.shape == (20, 20) and r.Vh.shape == (20, 90)


def test_more_power_iterations_never_hurt():
    # Same seed: the depth-(q+1) Krylov space contains the depth-q one, so every singular
    # value estimate can only grow (and never past the true value).
    i = torch.arange(1, 151, dtype=torch.float64)
    A = spectrum_matrix(200, 150, i**-0.3, dtype=torch.float64)
    S = torch.linalg.svdvals(A)[:8]
    prev = torch.zeros(8, dtype=torch.float64)
    for q in range(5):
        s = rsvd(A, 8, oversample=2, n_iter=q, generator=gen(3)).S
        assert (s >= prev - 1e-12).all() and (s <= S + 1e-10).all()
        prev = s
    assert float(((S - prev) / S).max()) < 1e-3


def test_auto_power_iterations_reach_one_percent_on_slow_decay():
    i = torch.arange(1, 301, dtype=torch.float64)
    A = spectrum_matrix(400, 300, i**-0.5, dtype=torch.float32)
    S = torch.linalg.svdvals(A.double())
    r = rsvd(A, 20, generator=gen())
    assert r.depth >= 1
    assert float(((S[:20] - r.S.double()).abs() / S[:20]).max()) < 0.01
    plain = rsvd(A, 20, n_iter=0, generator=gen())
    assert float(((S[:20] - plain.S.double()).abs() / S[:20]).max()) > 0.05  # needed depth


def bar(A, S, k, r):
    """(residual / optimal residual, worst relative error of the top-k singular values)."""
    resid = torch.linalg.vector_norm((A - (r.U * r.S.unsqueeze(-2)) @ r.Vh).double())
    sv = ((r.S.double() - S[:k]).abs() / S[:k]).max()
    return float(resid / S[k:].square().sum().sqrt()), float(sv)


@pytest.mark.parametrize(
    ("decay", "shape", "k"),
    [
        (lambda i: i**-0.5, (400, 300), 20),
        (lambda i: i**-1.0, (600, 500), 30),
        (lambda i: torch.exp(-(i - 1) / 4), (400, 300), 20),
    ],
)
def test_auto_depth_stops_at_the_one_percent_bar_not_past_it(decay, shape, k):
    # The default stops on the Ritz residuals: it meets the bar of bench/rsvd.py (σ within
    # 1%, residual within 2% of optimal) and goes at most one block past the smallest depth
    # that meets it (the previous rule, "σ moved < 0.1%", went two or three past).
    i = torch.arange(1, min(shape) + 1, dtype=torch.float64)
    A = spectrum_matrix(*shape, decay(i), dtype=torch.float32)
    S = torch.linalg.svdvals(A.double())
    r = rsvd(A, k, generator=gen())
    resid, sv = bar(A, S, k, r)
    assert resid <= 1.02 and sv <= 0.01
    fixed = [bar(A, S, k, rsvd(A, k, n_iter=q, generator=gen())) for q in range(r.depth + 1)]
    smallest = next(q for q, (a, b) in enumerate(fixed) if a <= 1.02 and b <= 0.01)
    assert r.depth <= smallest + 1


def test_looser_rtol_and_energy_accuracy_stop_earlier():
    i = torch.arange(1, 301, dtype=torch.float64)
    A = spectrum_matrix(400, 300, i**-0.5, dtype=torch.float32)
    S = torch.linalg.svdvals(A.double())
    values = rsvd(A, 20, generator=gen())
    loose = rsvd(A, 20, rtol=0.2, generator=gen())
    energy = rsvd(A, 20, accuracy="energy", rtol=1e-3, generator=gen())
    assert loose.depth < values.depth and energy.depth < values.depth
    # the energy the rank-20 subspace captures is within 1% of the optimum
    captured = float((energy.U.double().mT @ A.double()).square().sum())
    assert captured >= 0.99 * float(S[:20].square().sum())


def test_last_block_takes_the_rest_so_the_result_is_exact():
    # 576 x 192 at rank 64: blocks of 74 columns; after the first, 118 <= 2 blocks remain,
    # so the next block takes them all and QᵀA is the whole matrix: an exact SVD at depth 1.
    i = torch.arange(1, 193, dtype=torch.float64)
    A = spectrum_matrix(576, 192, i**-0.25, dtype=torch.float32)
    S = torch.linalg.svdvals(A.double())
    r = rsvd(A, 64, n_iter=1, generator=gen())
    assert r.depth == 1
    torch.testing.assert_close(r.S.double(), S[:64], rtol=1e-5, atol=0)
    assert bar(A, S, 64, r)[0] < 1 + 1e-4


def test_rank_deficient_blocks_avoid_householder_qr(monkeypatch):
    # Householder QR of a rank-deficient block is 10-100x slower on a busy CPU; the
    # Krylov blocks of a low-rank matrix are orthonormalised without it.
    A = spectrum_matrix(300, 200, [5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float32)  # rank 5

    def no_qr(*args, **kwargs):
        raise AssertionError("Householder QR called")

    monkeypatch.setattr(torch.linalg, "qr", no_qr)
    r = rsvd(A, 20, generator=gen())
    torch.testing.assert_close(r.S[:5], torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), atol=1e-4, rtol=0)
    assert_orthonormal_cols(r.U, 1e-4)


def test_rank_deficient_input_still_gives_orthonormal_factors():
    A = spectrum_matrix(60, 40, [3.0, 2.0, 1.0], dtype=torch.float32)  # exact rank 3
    r = rsvd(A, 8, n_iter=2, generator=gen())
    torch.testing.assert_close(r.S[:3], torch.tensor([3.0, 2.0, 1.0]), atol=1e-4, rtol=0)
    assert (r.S[3:] < 1e-4).all()
    assert_orthonormal_cols(r.U, 1e-4)
    assert_orthonormal_cols(r.Vh.mT, 1e-4)
    assert rel_err(A, r) < 1e-4  # float32 rounding of A itself is ~1e-7 per entry


def test_zero_matrix():
    r = rsvd(torch.zeros(10, 6), 2, generator=gen())
    assert (r.S == 0).all() and float(r.residual) == 0.0


# ---------------------------------------------------------------- tol mode


@pytest.mark.parametrize("tol", [0.3, 0.1, 0.02])
def test_tol_mode_meets_tolerance_with_near_minimal_rank(tol):
    i = torch.arange(1, 151, dtype=torch.float64)
    A = spectrum_matrix(250, 150, 0.95**i, dtype=torch.float32)
    r = rsvd(A, None, tol=tol, generator=gen())
    err = rel_err(A, r)
    assert err <= tol * 1.001
    S = torch.linalg.svdvals(A.double())
    tail = (S.square().flip(0).cumsum(0).flip(0) / S.square().sum()).sqrt()  # tail[k]: rank-k err
    k_min = int((tail > tol).sum())  # the smallest k with optimal error <= tol
    assert k_min <= int(r.ranks) <= k_min + 2
    assert r.S.shape == (int(r.ranks),)
    assert abs(float(r.residual) - err) < 2e-3


def test_tol_mode_batched_reports_each_rank():
    i = torch.arange(1, 81, dtype=torch.float64)
    A = torch.stack([spectrum_matrix(100, 80, 0.7**i), spectrum_matrix(100, 80, 0.9**i)]).float()
    r = rsvd(A, 60, tol=0.05, generator=gen())
    assert r.ranks.shape == (2,) and int(r.ranks[0]) < int(r.ranks[1]) == r.S.shape[-1]
    for b in range(2):
        k = int(r.ranks[b])
        approx = (r.U[b, :, :k] * r.S[b, :k]) @ r.Vh[b, :k]
        assert float(torch.linalg.norm(A[b] - approx) / torch.linalg.norm(A[b])) <= 0.05


def test_tol_mode_warns_when_rank_cap_too_small():
    A = torch.randn(50, 40, generator=gen())
    with pytest.warns(RuntimeWarning, match="tol=0.01 was not reached"):
        r = rsvd(A, 5, tol=0.01, generator=gen())
    assert r.S.shape == (5,) and float(r.residual) > 0.5


# ---------------------------------------------------------------- batching, seeds, dtypes


def test_batched_equals_looped():
    g = gen(1)
    A = torch.randn(3, 2, 40, 8, generator=g, dtype=torch.float64) @ torch.randn(
        3, 2, 8, 30, generator=g, dtype=torch.float64
    )  # exact rank 8: every run recovers it exactly
    r = rsvd(A, 5, n_iter=1, generator=gen())
    assert r.U.shape == (3, 2, 40, 5) and r.residual.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            one = rsvd(A[i, j], 5, n_iter=1, generator=gen(7))
            torch.testing.assert_close(r.S[i, j], one.S, rtol=1e-9, atol=0)
            torch.testing.assert_close(
                (r.U[i, j] * r.S[i, j]) @ r.Vh[i, j], (one.U * one.S) @ one.Vh, atol=1e-9, rtol=0
            )
            torch.testing.assert_close(r.residual[i, j], one.residual, atol=1e-6, rtol=0)


def test_same_seed_same_result_different_seed_differs():
    A = torch.randn(80, 60, generator=gen())
    a = rsvd(A, 5, n_iter=0, generator=gen(5))
    b = rsvd(A, 5, n_iter=0, generator=gen(5))
    c = rsvd(A, 5, n_iter=0, generator=gen(6))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.allclose(a.S, c.S)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_in_and_out(dtype):
    A = spectrum_matrix(64, 48, [4.0, 2.0, 1.0, 0.5], dtype=dtype)
    r = rsvd(A, 3, generator=gen())
    assert r.U.dtype == r.S.dtype == r.Vh.dtype == dtype
    torch.testing.assert_close(r.S.float(), torch.tensor([4.0, 2.0, 1.0]), rtol=2e-2, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    A = spectrum_matrix(100, 80, 0.8 ** torch.arange(80.0), dtype=torch.float32)
    r = rsvd(A.cuda(), 6, generator=torch.Generator("cuda").manual_seed(0))
    assert r.U.is_cuda
    torch.testing.assert_close(r.S.cpu(), torch.linalg.svdvals(A)[:6], rtol=1e-3, atol=0)


# ---------------------------------------------------------------- operators


def test_operator_input_equals_dense_input():
    A = torch.randn(70, 50, generator=gen())
    op = LinearOperator(A.shape, lambda X: A @ X, lambda Y: A.mT @ Y)
    d = rsvd(A, 6, n_iter=2, generator=gen(2))
    o = rsvd(op, 6, n_iter=2, generator=gen(2))
    torch.testing.assert_close(o.S, d.S, rtol=1e-5, atol=0)
    torch.testing.assert_close((o.U * o.S) @ o.Vh, (d.U * d.S) @ d.Vh, atol=1e-4, rtol=0)


def test_product_operator_never_forms_the_product():
    g = gen()
    X, W = torch.randn(300, 12, generator=g), torch.randn(12, 200, generator=g)
    op = ProductOperator(X, W)
    assert op.shape == (300, 200)
    torch.testing.assert_close(op.fro_norm().float(), torch.linalg.norm(X @ W), rtol=1e-5, atol=0)
    r = rsvd(op, 12, generator=gen())
    torch.testing.assert_close(r.S, torch.linalg.svdvals(X @ W)[:12], rtol=1e-4, atol=0)
    assert float(r.residual) < 1e-3


def test_operator_with_rmatmul_only_and_batched():
    A = torch.randn(2, 30, 20, generator=gen(), dtype=torch.float64)

    class Op:  # scipy-style: rmatmul(Y) = Aᵀ Y
        shape, dtype = A.shape, A.dtype

        def __matmul__(self, X):
            return A @ X

        def rmatmul(self, Y):
            return A.mT @ Y

    r = rsvd(Op(), 4, n_iter=3, generator=gen())
    torch.testing.assert_close(r.S, torch.linalg.svdvals(A)[:, :4], rtol=1e-6, atol=0)


def test_bf16_operator_returns_bf16():
    X, W = torch.randn(40, 3).bfloat16(), torch.randn(3, 30).bfloat16()
    r = rsvd(ProductOperator(X, W), 3, generator=gen())
    assert r.S.dtype == torch.bfloat16
    exact = torch.linalg.svdvals(X.float() @ W.float())[:3]
    torch.testing.assert_close(r.S.float(), exact, rtol=2e-2, atol=0)


# ---------------------------------------------------------------- property tests


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    frac=st.floats(0.01, 1.0),
    q=st.sampled_from([0, 1, "auto"]),
    oversample=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_rsvd_properties(m, n, frac, q, oversample, seed):
    k = max(1, round(frac * min(m, n)))
    A = torch.randn(m, n, generator=gen(seed), dtype=torch.float64)
    r = rsvd(A, k, oversample=oversample, n_iter=q, generator=gen(seed))
    assert r.U.shape == (m, k) and r.S.shape == (k,) and r.Vh.shape == (k, n)
    S = torch.linalg.svdvals(A)
    assert (r.S[:-1] >= r.S[1:] - 1e-12).all()
    assert (r.S <= S[:k] + 1e-9).all()  # Ritz values never exceed the true ones
    assert_orthonormal_cols(r.U, 1e-8)
    assert_orthonormal_cols(r.Vh.mT, 1e-8)
    err = rel_err(A, r) if float(torch.linalg.norm(A)) > 0 else 0.0
    assert abs(float(r.residual) - err) < 1e-6
    if k == min(m, n) or k + oversample >= min(m, n):  # the sketch spans the matrix: exact
        torch.testing.assert_close(r.S, S[:k], rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- bad input


BAD_A = [
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ShapeError, "'A' contains 1 NaN/Inf"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ShapeError, "'A' contains 1 NaN/Inf"),
    (torch.ones(4, 4, dtype=torch.int32), ShapeError, "'A' has dtype torch.int32"),
    (torch.ones(4, 4, dtype=torch.complex64), ShapeError, "'A' has complex dtype"),
    (torch.ones(0, 4), ShapeError, "'A' is empty"),
    (torch.ones(4), ShapeError, "'A' must have shape"),
    ("matrix", ShapeError, "'A' must be a torch.Tensor, a numpy.ndarray or a matrix operator"),
]


@pytest.mark.parametrize(("A", "err", "pattern"), BAD_A)
def test_rsvd_bad_matrix(A, err, pattern):
    with pytest.raises(
        err, match="rsvd: argument " + pattern if "argument" not in pattern else pattern
    ):
        rsvd(A, 1)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rank": 0}, r"'rank' must be an integer in \[1, min\(M, N\)\] = \[1, 4\].*got 0"),
        ({"rank": 5}, r"'rank' must be an integer in \[1, min\(M, N\)\] = \[1, 4\].*got 5"),
        ({"rank": 2.5}, "'rank' must be an integer"),
        ({"rank": None}, "'rank' must be an integer"),
        ({"rank": 2, "oversample": -1}, "'oversample'.*got -1"),
        ({"rank": 2, "n_iter": "fast"}, "'n_iter' must be one of 'auto'"),
        ({"rank": 2, "n_iter": -1}, "'n_iter'.*got -1"),
        ({"rank": 2, "tol": 0.0}, "'tol' must be a number in"),
        ({"rank": 2, "tol": float("nan")}, "'tol' must be a number in"),
        ({"rank": 2, "generator": 0}, "'generator' must be a torch.Generator"),
        ({"rank": 2, "rtol": 0.0}, "'rtol' must be a number in"),
        ({"rank": 2, "accuracy": "fast"}, "'accuracy' must be one of 'values', 'energy'"),
    ],
)
def test_rsvd_bad_options(kwargs, pattern):
    with pytest.raises(ConfigError, match="rsvd: argument " + pattern):
        rsvd(torch.randn(6, 4), **kwargs)


def test_operator_without_transpose_or_with_nan_output():
    class NoT:
        shape, dtype = (5, 4), torch.float32

        def __matmul__(self, X):
            return torch.ones(5, X.shape[-1])

    with pytest.raises(ShapeError, match="neither .mT nor .rmatmul"):
        rsvd(NoT(), 2)
    nan_op = LinearOperator(
        (5, 4), lambda X: torch.full((5, X.shape[-1]), float("nan")), lambda Y: Y[:4]
    )
    with pytest.raises(ShapeError, match="produced NaN/Inf"):
        rsvd(nan_op, 2)
    with pytest.raises(ShapeError, match="factors 0 and 1 do not chain"):
        ProductOperator(torch.ones(3, 4), torch.ones(5, 2))


# ---------------------------------------------------------------- truncated_svd


def test_truncated_svd_matches_dense_and_keeps_dtype():
    A = torch.randn(2, 30, 20, generator=gen())
    r = truncated_svd(A, 5)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    torch.testing.assert_close(r.S, S[..., :5])
    torch.testing.assert_close(
        (r.U * r.S.unsqueeze(-2)) @ r.Vh, (U[..., :5] * S[..., None, :5]) @ Vh[..., :5, :]
    )
    assert truncated_svd(A).S.shape == (2, 20)
    assert truncated_svd(A.bfloat16(), 3).U.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="truncated_svd: argument 'rank'"):
        truncated_svd(A, 21)
    with pytest.raises(ShapeError, match="truncated_svd: argument 'A' contains"):
        truncated_svd(torch.full((3, 3), float("nan")), 1)


# ---------------------------------------------------------------- svd_update


@pytest.mark.parametrize("side", ["cols", "rows"])
def test_svd_update_equals_svd_of_concatenation(side):
    g = gen(4)
    A = torch.randn(40, 30, generator=g, dtype=torch.float64)
    if side == "cols":
        new = torch.randn(40, 7, generator=g, dtype=torch.float64)
        full = torch.cat([A, new], -1)
        r = svd_update(truncated_svd(A), cols=new)
    else:
        new = torch.randn(5, 30, generator=g, dtype=torch.float64)
        full = torch.cat([A, new], -2)
        r = svd_update(truncated_svd(A), rows=new)
    S = torch.linalg.svdvals(full)
    torch.testing.assert_close(r.S, S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((r.U * r.S) @ r.Vh, full, rtol=0, atol=1e-10)
    assert_orthonormal_cols(r.U, 1e-10)
    assert_orthonormal_cols(r.Vh.mT, 1e-10)


def test_svd_update_truncated_batched_and_low_rank_base():
    g = gen(5)
    base = torch.randn(3, 50, 4, generator=g, dtype=torch.float64) @ torch.randn(
        3, 4, 20, generator=g, dtype=torch.float64
    )
    new = torch.randn(3, 50, 2, generator=g, dtype=torch.float64)
    r = svd_update(truncated_svd(base, 4), cols=new, rank=6)  # rank 4 + 2 columns: exact
    full = torch.cat([base, new], -1)
    assert r.U.shape == (3, 50, 6) and r.Vh.shape == (3, 6, 22)
    torch.testing.assert_close((r.U * r.S.unsqueeze(-2)) @ r.Vh, full, rtol=0, atol=1e-9)
    r3 = svd_update(truncated_svd(base, 4), cols=new, rank=3)
    torch.testing.assert_close(r3.S, torch.linalg.svdvals(full)[:, :3], rtol=1e-10, atol=0)


def test_svd_update_bad_input():
    s = truncated_svd(torch.randn(6, 5))
    with pytest.raises(ConfigError, match="exactly one of 'cols' or 'rows'; got neither"):
        svd_update(s)
    with pytest.raises(ConfigError, match="got both"):
        svd_update(s, cols=torch.ones(6, 1), rows=torch.ones(1, 5))
    with pytest.raises(ShapeError, match="'cols' must have M = 6 rows"):
        svd_update(s, cols=torch.ones(5, 1))
    with pytest.raises(ShapeError, match="'rows' must have N = 5 columns"):
        svd_update(s, rows=torch.ones(1, 4))
    with pytest.raises(ShapeError, match="'cols' contains 6 NaN/Inf"):
        svd_update(s, cols=torch.tensor([[float("nan")]] * 6))
    with pytest.raises(ConfigError, match="svd_update: argument 'rank'"):
        svd_update(s, cols=torch.ones(6, 1), rank=7)
    with pytest.raises(ShapeError, match="inconsistent shapes"):
        svd_update((s.U, s.S[:3], s.Vh), cols=torch.ones(6, 1))


def test_no_warnings_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rsvd(torch.randn(30, 20, generator=gen()), 3, generator=gen())
