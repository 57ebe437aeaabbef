import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg.completion import complete_altmin


def _planted(m, n, r, frac, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)
    idx = torch.randperm(m * n, generator=g)[: int(frac * m * n)]
    rows, cols = idx // n, idx % n
    return M, rows, cols, M[rows, cols]


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_recovers_planted_low_rank(solver):
    M, rows, cols, vals = _planted(120, 90, 4, 0.3, 0)
    res = complete_altmin(rows, cols, vals, (120, 90), 4, solver=solver, tol=1e-9)
    assert res.converged
    assert ((res.U @ res.V.T - M).norm() / M.norm()) < 1e-6
    # residual history decreases overall and the predict helper agrees with U V^T
    assert res.residuals[-1] < 1e-3 * res.residuals[0]
    r, c = torch.tensor([0, 5, 119]), torch.tensor([3, 89, 0])
    assert torch.allclose(res.predict(r, c), (res.U @ res.V.T)[r, c])


def test_float32_and_trimming():
    M, rows, cols, vals = _planted(100, 80, 3, 0.35, 1, dtype=torch.float32)
    res = complete_altmin(rows, cols, vals, (100, 80), 3, trim=2.0)
    assert res.U.dtype == torch.float32
    assert ((res.U @ res.V.T - M).norm() / M.norm()) < 1e-4


def test_unobserved_row_gets_zeros_not_nan():
    M, rows, cols, vals = _planted(50, 40, 2, 0.5, 2)
    keep = rows != 7
    res = complete_altmin(rows[keep], cols[keep], vals[keep], (50, 40), 2)
    assert torch.isfinite(res.U).all()
    assert torch.allclose(res.U[7], torch.zeros(2, dtype=torch.float64))


@given(seed=st.integers(0, 1000), r=st.integers(1, 3))
@settings(deadline=None, max_examples=5)
def test_same_seed_same_result(seed, r):
    M, rows, cols, vals = _planted(40, 30, r, 0.5, seed)
    a = complete_altmin(rows, cols, vals, (40, 30), r, generator=torch.Generator().manual_seed(5))
    b = complete_altmin(rows, cols, vals, (40, 30), r, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    assert ((a.U @ a.V.T - M).norm() / M.norm()) < 1e-4


def test_max_iter_bounds_work():
    M, rows, cols, vals = _planted(60, 50, 3, 0.3, 3)
    res = complete_altmin(rows, cols, vals, (60, 50), 3, max_iter=2, tol=0.0)
    assert res.n_iter == 2 and not res.converged and res.residuals.shape == (2,)


def test_bad_input():
    rows, cols = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    vals = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ShapeError, match="complete_altmin.*'rows', 'cols' and 'values'"):
        complete_altmin(rows, cols[:2], vals, (3, 3), 1)
    with pytest.raises(ShapeError, match="complete_altmin.*'cols'.*valid range"):
        complete_altmin(rows, torch.tensor([0, 1, 3]), vals, (3, 3), 1)
    with pytest.raises(ShapeError, match="complete_altmin.*'rows'.*valid range"):
        complete_altmin(torch.tensor([-1, 0, 1]), cols, vals, (3, 3), 1)
    with pytest.raises(ShapeError, match="complete_altmin.*'values'.*NaN"):
        complete_altmin(rows, cols, torch.tensor([1.0, float("nan"), 3.0]), (3, 3), 1)
    with pytest.raises(ShapeError, match="complete_altmin.*'rows'.*integer"):
        complete_altmin(rows.float(), cols, vals, (3, 3), 1)
    with pytest.raises(ShapeError, match="complete_altmin.*'values'.*dtype"):
        complete_altmin(rows, cols, torch.tensor([1, 2, 3]), (3, 3), 1)
    with pytest.raises(ShapeError, match="complete_altmin.*'values'.*non-empty"):
        complete_altmin(rows[:0], cols[:0], vals[:0], (3, 3), 1)
    with pytest.raises(ConfigError, match="complete_altmin.*'rank'"):
        complete_altmin(rows, cols, vals, (3, 3), 0)
    with pytest.raises(ConfigError, match="complete_altmin.*'rank'"):
        complete_altmin(rows, cols, vals, (3, 3), 4)
    with pytest.raises(ConfigError, match="complete_altmin.*'shape'"):
        complete_altmin(rows, cols, vals, (3, 0), 1)
    with pytest.raises(ConfigError, match="complete_altmin.*'solver'"):
        complete_altmin(rows, cols, vals, (3, 3), 1, solver="lu")
    with pytest.raises(ConfigError, match="complete_altmin.*'max_iter'"):
        complete_altmin(rows, cols, vals, (3, 3), 1, max_iter=0)
