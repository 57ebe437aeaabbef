import pytest
import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg.recovery import SensingOperator, recover_sensing, recover_subgradient


def _problem(n=20, r=2, m=600, outliers=0.1, symmetric=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, r, generator=g, dtype=torch.float64)
    W = Z if symmetric else torch.randn(n, r, generator=g, dtype=torch.float64)
    X = Z @ W.T
    A = torch.randn(m, n, n, generator=g, dtype=torch.float64)
    y = A.reshape(m, -1) @ X.reshape(-1)
    k = int(outliers * m)
    bad = torch.randperm(m, generator=g)[:k]
    y_bad = y.clone()
    y_bad[bad] += 100 * y.abs().max() * torch.randn(k, generator=g, dtype=torch.float64)
    return X, A, y, y_bad


def _rel(res, X):
    return float((res.X - X).norm() / X.norm())


@pytest.mark.parametrize("symmetric", [True, False])
def test_subgradient_recovers_despite_outliers(symmetric):
    X, A, _, y_bad = _problem(symmetric=symmetric)
    res = recover_subgradient(
        y_bad, A, 2, symmetric=symmetric, generator=torch.Generator().manual_seed(1)
    )
    assert _rel(res, X) < 1e-5
    if symmetric:
        assert res.R is res.L


def test_subgradient_over_parameterised_small_init():
    X, A, _, y_bad = _problem()
    res = recover_subgradient(
        y_bad, A, 5, symmetric=True, generator=torch.Generator().manual_seed(1)
    )
    assert _rel(res, X) < 1e-4
    # least squares on the same corrupted data is far off: the l1 loss is what helps
    Xls = torch.linalg.lstsq(A.reshape(A.shape[0], -1), y_bad).solution.reshape(20, 20)
    assert float((Xls - X).norm() / X.norm()) > 1.0


def test_subgradient_geometric_schedule_and_operator_form():
    X, A, _, y_bad = _problem(symmetric=False, seed=3)
    flat = A.reshape(A.shape[0], -1)
    op = SensingOperator(
        lambda Z: flat @ Z.reshape(-1), lambda r: (r @ flat).reshape(20, 20), (20, 20)
    )
    gen = torch.Generator().manual_seed(2)
    a = recover_subgradient(y_bad, op, 2, schedule="geometric", init_scale=1e-6, generator=gen)
    assert _rel(a, X) < 1e-5
    b = recover_subgradient(
        y_bad,
        A,
        2,
        schedule="geometric",
        init_scale=1e-6,
        generator=torch.Generator().manual_seed(2),
    )
    assert torch.allclose(a.X, b.X, atol=1e-10)


def test_sensing_asymmetric_fix_beats_symmetric_gd_when_over_parameterised():
    X, A, y, _ = _problem(m=400, outliers=0.0)
    kw = dict(tol=1e-6, max_iter=1500, generator=None)
    asym = recover_sensing(
        y, A, 5, method="asymmetric", **{**kw, "generator": torch.Generator().manual_seed(1)}
    )
    sym = recover_sensing(
        y, A, 5, method="symmetric", **{**kw, "generator": torch.Generator().manual_seed(1)}
    )
    assert asym.converged and _rel(asym, X) < 1e-4
    assert not sym.converged  # sublinear: still above tol after 1500 iterations
    assert asym.n_iter < 0.5 * sym.n_iter
    # at the exact rank both are fast
    exact = recover_sensing(
        y, A, 2, method="symmetric", tol=1e-6, generator=torch.Generator().manual_seed(1)
    )
    assert exact.converged and exact.n_iter < asym.n_iter


def test_same_seed_same_result():
    X, A, y, _ = _problem(m=300, outliers=0.0, symmetric=False)
    a = recover_sensing(y, A, 3, generator=torch.Generator().manual_seed(7), max_iter=50)
    b = recover_sensing(y, A, 3, generator=torch.Generator().manual_seed(7), max_iter=50)
    assert torch.equal(a.L, b.L) and torch.equal(a.R, b.R)


def test_bad_input():
    X, A, y, _ = _problem(m=50, outliers=0.0)
    for fn in (recover_subgradient, recover_sensing):
        name = fn.__name__
        with pytest.raises(ShapeError, match=f"{name}.*'A'.*m = len\\(y\\)"):
            fn(y[:-1], A, 2)
        with pytest.raises(ShapeError, match=f"{name}.*'y'.*NaN"):
            fn(torch.full_like(y, float("nan")), A, 2)
        with pytest.raises(ShapeError, match=f"{name}.*'A'.*NaN"):
            fn(y, A * float("inf"), 2)
        with pytest.raises(ShapeError, match=f"{name}.*'y'.*dtype"):
            fn(y.long(), A, 2)
        with pytest.raises(ConfigError, match=f"{name}.*'rank'"):
            fn(y, A, 0)
        with pytest.raises(ConfigError, match=f"{name}.*'rank'"):
            fn(y, A, 21)
        with pytest.raises(ShapeError, match=f"{name}.*'A'.*SensingOperator"):
            fn(y, "A", 2)
        with pytest.raises(ConfigError, match=f"{name}.*'max_iter'"):
            fn(y, A, 2, max_iter=0)
    bad_op = SensingOperator(lambda Z: torch.zeros(3, dtype=torch.float64), lambda r: r, (20, 20))
    with pytest.raises(ShapeError, match="recover_sensing.*forward"):
        recover_sensing(y, bad_op, 2)
    with pytest.raises(ShapeError, match="recover_subgradient.*symmetric.*square"):
        recover_subgradient(y, A[:, :, :10], 2, symmetric=True)
    with pytest.raises(ConfigError, match="recover_sensing.*'method'"):
        recover_sensing(y, A, 2, method="plain")
    with pytest.raises(ConfigError, match="recover_subgradient.*'decay'"):
        recover_subgradient(y, A, 2, decay=1.5)
