"""Shared input validation: each check names the function, the argument and the value."""

import pytest
import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg._checks import (
    as_float,
    check_choice,
    check_float,
    check_generator,
    check_int,
    check_matrix,
    check_rank,
)


@pytest.mark.parametrize(
    ("A", "pattern"),
    [
        (torch.ones(3, 3, dtype=torch.int64), "dtype torch.int64"),
        (torch.ones(3, 3, dtype=torch.bool), "dtype torch.bool"),
        (torch.ones(3, 3, dtype=torch.complex64), "complex"),
        (torch.ones(0, 3), "empty"),
        (torch.ones(2, 0, 3), "empty"),
        (torch.ones(3), r"\(\.\.\., M, N\)"),
        (torch.tensor([[1.0, float("nan")]]), "1 NaN/Inf"),
        (torch.tensor([[float("inf"), -float("inf")]]), "2 NaN/Inf"),
    ],
)
def test_check_matrix_rejects(A, pattern):
    with pytest.raises(ShapeError, match=pattern) as e:
        check_matrix(A, "W", "myfn")
    assert str(e.value).startswith("myfn: argument 'W'")


def test_check_matrix_accepts_huge_finite_values_whose_sum_overflows():
    A = torch.full((4, 4), 3e38)
    assert check_matrix(A, "A", "f") is A


def test_check_matrix_not_a_tensor():
    with pytest.raises(ShapeError, match=r"must be a torch.Tensor \(or a numpy.ndarray\); got list"):
        check_matrix([[1.0]], "A", "f")


def test_check_matrix_unbatched():
    with pytest.raises(ShapeError, match=r"\(M, N\)"):
        check_matrix(torch.ones(2, 3, 3), "A", "f", batched=False)


@pytest.mark.parametrize("rank", [0, -1, 6, 2.0, True, "3", None])
def test_check_rank_rejects(rank):
    with pytest.raises(ConfigError, match=r"f: argument 'rank' must be an integer in \[1, min"):
        check_rank(rank, 5, 7, "f")


def test_check_rank_accepts_bounds():
    assert check_rank(1, 5, 7, "f") == 1
    assert check_rank(5, 5, 7, "f") == 5


def test_check_int_and_float_and_choice():
    assert check_int(3, "n", "f", low=0) == 3
    with pytest.raises(ConfigError, match="'n'.*got -1"):
        check_int(-1, "n", "f", low=0)
    assert check_float(0.5, "tol", "f", low=0, high=1, low_open=True) == 0.5
    for bad in [0, 1.5, float("nan"), "x"]:
        with pytest.raises(ConfigError, match=r"'tol' must be a number in \(0, 1\]"):
            check_float(bad, "tol", "f", low=0, high=1, low_open=True)
    with pytest.raises(ConfigError, match="one of 'auto'; got 'fast'"):
        check_choice("fast", "n_iter", "f", ("auto",))


def test_check_generator():
    check_generator(None, "f")
    check_generator(torch.Generator(), "f", torch.device("cpu"))
    with pytest.raises(ConfigError, match="'generator' must be a torch.Generator"):
        check_generator(3, "f")


def test_as_float_promotes_low_precision_only():
    for dt in (torch.float16, torch.bfloat16):
        w, out = as_float(torch.ones(2, 2, dtype=dt))
        assert w.dtype == torch.float32 and out == dt
    x = torch.ones(2, 2, dtype=torch.float64)
    w, out = as_float(x)
    assert w is x and out == torch.float64
