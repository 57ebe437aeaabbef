import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg.concat import cluster_concat, concat_svd, concat_svd_update


def _mats(widths, d=30, seed=0, families=None, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(d, 3, generator=g, dtype=torch.float64) for _ in range(families or 1)]
    out = []
    for i, w in enumerate(widths):
        M = bases[i % len(bases)] @ torch.randn(3, w, generator=g, dtype=torch.float64)
        out.append(M + noise * torch.randn(d, w, generator=g, dtype=torch.float64))
    return out


@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=5), data=st.data())
@settings(deadline=None, max_examples=20)
def test_matches_dense_svd_of_concatenation(widths, data):
    mats = _mats(widths, noise=0.1, seed=sum(widths))
    A = torch.cat(mats, dim=1)
    rank = data.draw(st.integers(1, min(A.shape)))
    res = concat_svd(mats, rank)
    U, S, _ = torch.linalg.svd(A, full_matrices=False)
    assert torch.allclose(res.S, S[:rank], atol=1e-10)
    # same subspace as the dense SVD (projectors agree when the gap is not degenerate)
    if rank == min(A.shape) or S[rank - 1] - S[rank] > 1e-6:
        assert torch.allclose(res.U @ res.U.T, U[:, :rank] @ U[:, :rank].T, atol=1e-8)
    # optimal error: the tail of the singular values, and coefficients reconstruct per block
    assert math.isclose(res.residual, float(S[rank:].norm()), rel_tol=1e-8, abs_tol=1e-10)
    err = sum(float((M - res.reconstruct(i)).square().sum()) for i, M in enumerate(mats))
    assert math.isclose(math.sqrt(err), res.residual, rel_tol=1e-8, abs_tol=1e-10)
    assert [c.shape for c in res.coeffs] == [(rank, w) for w in widths]


def test_incremental_update_bound_holds_and_is_exact_for_low_rank():
    mats = _mats([4, 5, 6, 3, 7, 2], noise=0.05, seed=1)
    inc = concat_svd(mats[:2], 3)
    for M in mats[2:]:
        inc = concat_svd_update(inc, [M])
    true = math.sqrt(
        sum(float((M - inc.reconstruct(i)).square().sum()) for i, M in enumerate(mats))
    )
    best = concat_svd(mats, 3)
    assert best.residual <= true + 1e-9 <= inc.residual + 2e-9  # optimal <= actual <= bound
    assert math.isclose(inc.norm, best.norm, rel_tol=1e-12)
    # invariant sum_i C_i C_i^T = diag(S^2)
    C = torch.cat(inc.coeffs, dim=1)
    assert torch.allclose(C @ C.T, torch.diag(inc.S.square()), atol=1e-8)
    # exactly rank-3 data: the update recovers it exactly
    exact = _mats([4, 5, 6], seed=2)
    upd = concat_svd_update(concat_svd(exact[:1], 3), exact[1:])
    for i, M in enumerate(exact):
        assert torch.allclose(upd.reconstruct(i), M, atol=1e-9)
    assert upd.residual < 1e-9


@pytest.mark.parametrize("estimator", ["exact", "incremental"])
def test_clustering_respects_bound_and_finds_families(estimator):
    mats = _mats([5] * 9, families=3, noise=1e-3, seed=3)
    out = cluster_concat(mats, 3, max_error=0.01, estimator=estimator)
    assert sorted(i for g in out.groups for i in g) == list(range(9))
    assert sorted(sorted(g) for g in out.groups) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert (out.errors <= 0.01).all()
    for grp, f, e in zip(out.groups, out.factors, out.errors, strict=True):
        A = torch.cat([mats[i] for i in grp], dim=1)
        rebuilt = torch.cat([f.reconstruct(j) for j in range(len(grp))], dim=1)
        assert math.isclose(float((A - rebuilt).norm() / A.norm()), float(e), rel_tol=1e-6)


def test_looser_bound_gives_fewer_groups():
    mats = _mats([5] * 9, families=3, noise=1e-3, seed=4)
    tight = cluster_concat(mats, 3, max_error=0.01)
    loose = cluster_concat(mats, 3, max_error=0.9)
    assert len(loose.groups) < len(tight.groups)
    assert (loose.errors <= 0.9).all()


def test_bad_input():
    mats = _mats([3, 4])
    with pytest.raises(ShapeError, match="concat_svd.*'mats'"):
        concat_svd([], 2)
    with pytest.raises(ShapeError, match="concat_svd.*'mats\\[1\\]'.*same row dimension"):
        concat_svd([mats[0], mats[1][:-1]], 2)
    with pytest.raises(ShapeError, match="concat_svd.*'mats\\[0\\]'.*NaN"):
        concat_svd([mats[0] * float("nan")], 2)
    with pytest.raises(ShapeError, match="concat_svd.*'mats\\[0\\]'.*dtype"):
        concat_svd([mats[0].long()], 2)
    with pytest.raises(ConfigError, match="concat_svd.*'rank'"):
        concat_svd(mats, 0)
    with pytest.raises(ConfigError, match="concat_svd.*'rank'"):
        concat_svd(mats, 8)
    with pytest.raises(ConfigError, match="concat_svd_update.*'result'"):
        concat_svd_update(mats[0], mats)
    with pytest.raises(ShapeError, match="concat_svd_update.*'mats\\[0\\]'"):
        concat_svd_update(concat_svd(mats, 2), [torch.randn(5, 2, dtype=torch.float64)])
    with pytest.raises(ConfigError, match="cluster_concat.*'max_error'"):
        cluster_concat(mats, 2, max_error=-1.0)
    with pytest.raises(ConfigError, match="cluster_concat.*'estimator'"):
        cluster_concat(mats, 2, max_error=0.1, estimator="fast")
