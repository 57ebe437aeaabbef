"""Nyström (PSD and general) against dense eigh / SVD."""

import pytest
import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg import LinearOperator, ProductOperator, nystrom, nystrom_general


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def psd(n, eigs, *, seed=0, dtype=torch.float64, batch=()):
    g = gen(seed)
    Q = torch.linalg.qr(torch.randn(*batch, n, len(eigs), generator=g, dtype=torch.float64)).Q
    return ((Q * torch.as_tensor(eigs, dtype=torch.float64)) @ Q.mT).to(dtype)


def test_psd_low_rank_matches_eigh_exactly():
    A = psd(80, [5.0, 3.0, 2.0, 1.0, 0.5])
    r = nystrom(A, 5, generator=gen())
    w, V = torch.linalg.eigh(A)
    torch.testing.assert_close(r.eigenvalues, w.flip(0)[:5], rtol=1e-9, atol=1e-9)
    recon = (r.eigenvectors * r.eigenvalues) @ r.eigenvectors.mT
    torch.testing.assert_close(recon, A, rtol=0, atol=1e-9)
    eye = torch.eye(5, dtype=A.dtype)
    torch.testing.assert_close(r.eigenvectors.mT @ r.eigenvectors, eye, rtol=0, atol=1e-10)


def test_psd_decaying_spectrum_near_optimal_and_float32():
    eigs = 0.7 ** torch.arange(60.0)
    A = psd(60, eigs, dtype=torch.float32)
    r = nystrom(A, 8, oversample=12, generator=gen())
    assert r.eigenvalues.dtype == torch.float32
    torch.testing.assert_close(r.eigenvalues.double(), eigs[:8].double(), rtol=1e-2, atol=1e-6)
    assert (r.eigenvalues[:-1] >= r.eigenvalues[1:]).all() and (r.eigenvalues >= 0).all()
    err = torch.linalg.norm(A - (r.eigenvectors * r.eigenvalues) @ r.eigenvectors.mT)
    best = eigs[8:].square().sum().sqrt()
    assert float(err) <= 1.5 * float(best)  # Tropp et al. 2017, Thm. 4.1: (1 + r/(l-r-1))


def test_psd_batched_equals_looped_and_operator_equals_dense():
    A = psd(40, [4.0, 2.0, 1.0], batch=(3,))
    r = nystrom(A, 3, generator=gen())
    for i in range(3):
        one = nystrom(A[i], 3, generator=gen(9))
        torch.testing.assert_close(r.eigenvalues[i], one.eigenvalues, rtol=1e-9, atol=1e-9)
    op = LinearOperator(A.shape, lambda X: A @ X, lambda Y: A @ Y, dtype=A.dtype)
    o = nystrom(op, 3, generator=gen(1))
    d = nystrom(A, 3, generator=gen(1))
    torch.testing.assert_close(o.eigenvalues, d.eigenvalues)
    torch.testing.assert_close(o.eigenvectors, d.eigenvectors)


def test_psd_same_seed_same_result_and_bf16():
    A = psd(50, 0.8 ** torch.arange(50.0), dtype=torch.float32)
    a, b = nystrom(A, 4, generator=gen(3)), nystrom(A, 4, generator=gen(3))
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    r = nystrom(A.bfloat16(), 4, generator=gen())
    assert r.eigenvalues.dtype == r.eigenvectors.dtype == torch.bfloat16


def test_psd_bad_input():
    with pytest.raises(ShapeError, match="nystrom: argument 'A' must be square"):
        nystrom(torch.ones(4, 5), 2)
    with pytest.raises(ShapeError, match="nystrom: argument 'A' must be symmetric"):
        nystrom(torch.triu(torch.ones(5, 5)), 2)
    with pytest.raises(ShapeError, match="not positive semidefinite"):
        nystrom(-torch.eye(6), 2, oversample=0)
    with pytest.raises(ShapeError, match="'A' contains 1 NaN/Inf"):
        nystrom(torch.tensor([[1.0, 0.0], [0.0, float("nan")]]), 1)
    with pytest.raises(ConfigError, match=r"nystrom: argument 'rank' must be an integer in"):
        nystrom(torch.eye(4), 5)
    with pytest.raises(ShapeError, match="dtype torch.int64"):
        nystrom(torch.eye(4, dtype=torch.int64), 2)


def test_general_exact_on_low_rank_and_near_svd_otherwise():
    g = gen(2)
    A = torch.randn(70, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 50, generator=g, dtype=torch.float64
    )
    f = nystrom_general(A, 6, generator=gen())
    assert f.C.shape == (70, 6) and f.W.shape == (6, 9) and f.R.shape == (9, 50)
    torch.testing.assert_close(f.C @ f.W @ f.R, A, rtol=0, atol=1e-9)
    # Decaying spectrum: within a modest factor of the optimal rank-k error.
    i = torch.arange(1, 51, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(70, 50, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
    B = (U * 0.6**i) @ V.mT
    f = nystrom_general(B, 10, generator=gen())
    err = torch.linalg.norm(B - f.C @ f.W @ f.R)
    best = (0.6**i)[10:].square().sum().sqrt()
    assert float(err) < 10 * float(best)


def test_general_operator_batched_and_dtype():
    g = gen(3)
    X, W = torch.randn(2, 30, 4, generator=g), torch.randn(2, 4, 20, generator=g)
    f = nystrom_general(ProductOperator(X, W), 4, oversample=3, generator=gen())
    assert f.W.shape == (2, 4, 7)
    torch.testing.assert_close(f.C @ f.W @ f.R, X @ W, rtol=0, atol=1e-3)
    d = nystrom_general(X @ W, 4, oversample=3, generator=gen())
    torch.testing.assert_close(d.C @ d.W @ d.R, X @ W, rtol=0, atol=1e-3)
    h = nystrom_general((X @ W).half(), 4, generator=gen())
    assert h.C.dtype == h.W.dtype == h.R.dtype == torch.float16


def test_general_bad_input():
    with pytest.raises(ConfigError, match="nystrom_general: argument 'rank'"):
        nystrom_general(torch.ones(3, 5), 4)
    with pytest.raises(ConfigError, match="nystrom_general: argument 'oversample'"):
        nystrom_general(torch.ones(3, 5), 2, oversample=-2)
    with pytest.raises(ShapeError, match="nystrom_general: argument 'A' has complex"):
        nystrom_general(torch.ones(3, 5, dtype=torch.complex64), 2)
