"""Properties every public function of rankwise.linalg shares: one input convention
(tensors, NumPy arrays converted, anything else a ShapeError naming the fix), one name
per concept, and docstrings whose documented defaults match the signatures."""

from __future__ import annotations

import ast
import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rankwise.linalg as L
from rankwise.errors import ShapeError

g = torch.Generator().manual_seed(0)
A = torch.randn(12, 9, generator=g, dtype=torch.float64)  # a general matrix
P = A @ A.T  # symmetric PSD
M1, M2 = A[:, :5], A[:, 5:]
W = torch.randn(8, 12, generator=g, dtype=torch.float64)  # 2 Monarch blocks
LF, RF = L.monarch_project(W, 2)
U0, S0, Vh0 = L.truncated_svd(A[:, :6])
rows, cols = (torch.rand(12, 9, generator=g) < 0.7).nonzero(as_tuple=True)
SENS = torch.randn(40, 4, 3, generator=g, dtype=torch.float64)
Y = SENS.reshape(40, -1) @ (torch.randn(4, 1, generator=g, dtype=torch.float64) @ torch.randn(
    1, 3, generator=g, dtype=torch.float64
)).reshape(-1)


def seed() -> torch.Generator:
    return torch.Generator().manual_seed(1)


# Every public callable that takes a matrix (or matrices), called with each matrix argument
# passed through `c`: the identity (tensors), .numpy() (arrays) or .tolist() (refused).
CALLS = {
    "rsvd": lambda c: L.rsvd(c(A), 3, generator=seed()),
    "truncated_svd": lambda c: L.truncated_svd(c(A), 3),
    "svd_update": lambda c: L.svd_update((c(U0), c(S0), c(Vh0)), cols=c(A[:, 6:])),
    "nystrom": lambda c: L.nystrom(c(P), 3, generator=seed()),
    "nystrom_general": lambda c: L.nystrom_general(c(A), 3, generator=seed()),
    "ProductOperator": lambda c: L.ProductOperator(c(A), c(A.T)) @ torch.ones(12, 1).double(),
    "nuclear_norm": lambda c: L.nuclear_norm(c(A)),
    "effective_rank": lambda c: L.effective_rank(c(A)),
    "stable_rank": lambda c: L.stable_rank(c(A)),
    "energy_rank": lambda c: L.energy_rank(c(S0)),
    "complete_altmin": lambda c: L.complete_altmin(
        c(rows), c(cols), c(A[rows, cols]), (12, 9), 2, max_iter=3, generator=seed()
    ),
    "concat_svd": lambda c: L.concat_svd([c(M1), c(M2)], 3),
    "concat_svd_update": lambda c: L.concat_svd_update(L.concat_svd([M1], 3), [c(M2)]),
    "cluster_concat": lambda c: L.cluster_concat([c(M1), c(M2)], 3, max_error=0.5),
    "dct_select": lambda c: L.dct_select(c(A), 3),
    "monarch_project": lambda c: L.monarch_project(c(W), 2),
    "monarch_matmul": lambda c: L.monarch_matmul(c(torch.ones(3, 12).double()), c(LF), c(RF)),
    "monarch_dense": lambda c: L.monarch_dense(c(LF), c(RF)),
    "recover_sensing": lambda c: L.recover_sensing(c(Y), c(SENS), 2, max_iter=5, generator=seed()),
    "recover_subgradient": lambda c: L.recover_subgradient(
        c(Y), c(SENS), 2, max_iter=5, generator=seed()
    ),
    "streaming_top_eigvec": lambda c: L.streaming_top_eigvec(
        iter([c(A[:6]), c(A[6:])]), generator=seed()
    ),
}
# Public callables that take no matrix: result types, operator wrappers built from
# callables, and dct_basis(n).
NO_MATRIX = {
    "LinearOperator",
    "MatrixOperator",
    "SensingOperator",
    "MFAC",  # a stateful object over a window of gradient tensors (its own checks)
    "dct_basis",
    *(n for n in L.__all__ if n.endswith(("Result", "Factors", "SVD", "Clusters", "Selection"))),
}


def _tensors(result: object) -> list[torch.Tensor]:
    """Every tensor in a result (NamedTuple fields, tuples of tensors, extra attributes)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, tuple | list):
        return [t for item in result for t in _tensors(item)]
    extra = [getattr(result, k) for k in ("residual", "ranks") if hasattr(result, k)]
    return [t for item in extra for t in _tensors(item)]


def test_every_public_callable_is_classified():
    public = {n for n in L.__all__ if callable(getattr(L, n))}
    assert public == set(CALLS) | NO_MATRIX, "add new public functions to CALLS or NO_MATRIX"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_numpy_input_gives_the_same_tensors(name):
    expected = CALLS[name](lambda t: t)
    got = CALLS[name](lambda t: t.numpy())
    want, have = _tensors(expected), _tensors(got)
    assert want and len(want) == len(have)
    for w, h in zip(want, have, strict=True):
        assert isinstance(h, torch.Tensor), f"{name} returned {type(h).__name__}"
        assert h.dtype == w.dtype and torch.allclose(h, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_other_array_likes_are_refused_naming_the_fix(name):
    with pytest.raises(ShapeError) as e:
        CALLS[name](lambda t: t.tolist())
    msg = str(e.value)
    assert msg.startswith(f"{name}: argument '"), msg
    assert "got list" in msg and "torch.as_tensor(" in msg, msg


def test_numpy_special_arrays():
    a = A.numpy()
    ro = a.copy()
    ro.flags.writeable = False  # torch cannot share read-only memory: copied, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(L.truncated_svd(ro, 2).S, L.truncated_svd(A, 2).S)
    flipped = a[::-1, ::-1]  # negative strides: copied
    assert torch.allclose(L.stable_rank(flipped), L.stable_rank(torch.from_numpy(a.copy())))
    assert L.rsvd(a.astype(np.float16), 2).S.dtype == torch.float16
    with pytest.raises(ShapeError, match="dtype torch.int64; expected a floating dtype"):
        L.rsvd(np.ones((4, 4), dtype=np.int64), 2)
    with pytest.raises(ShapeError, match="complex dtype"):
        L.truncated_svd(np.ones((4, 4), dtype=np.complex64))
    with pytest.raises(ShapeError, match="numpy array of dtype object"):
        L.nuclear_norm(np.array([[1.0, "x"]], dtype=object))


# One name per concept across rankwise: the power/Krylov iteration count is `n_iter`.
@pytest.mark.parametrize("name", sorted(n for n in L.__all__ if callable(getattr(L, n))))
def test_iteration_count_is_called_n_iter(name):
    try:
        params = inspect.signature(getattr(L, name)).parameters
    except (TypeError, ValueError):
        return
    assert not {"power_iters", "power_iter", "niter", "n_power_iter"} & set(params)


def test_rsvd_n_iter_fixes_the_depth():
    big = torch.randn(200, 100, generator=seed())
    assert L.rsvd(big, 3, n_iter=2, generator=seed()).depth == 2
    with pytest.raises(TypeError):
        L.rsvd(A, 3, power_iters=2)  # renamed, no alias


# Signatures quoted in docs/linalg.md (`rsvd(A, rank, *, oversample=10, ...)`) name real
# parameters, and literal values there are the signature's defaults.
DOC = Path(__file__).resolve().parents[2] / "docs" / "linalg.md"
INLINE_CALL = re.compile(r"`(\w+)\(([^`()]*)\)`")


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return inspect.Parameter.empty  # not a literal (a variable in an example)


def _documented_keywords() -> list[tuple[str, str, str]]:
    found = []
    for name, args in INLINE_CALL.findall(DOC.read_text()):
        if name in L.__all__:
            for part in args.split(","):
                if "=" in part:
                    key, value = part.split("=", 1)
                    found.append((name, key.strip(), value.strip()))
    return found


def test_docs_find_quoted_signatures():
    assert ("rsvd", "n_iter", '"auto"') in _documented_keywords()


@pytest.mark.parametrize(("name", "key", "value"), _documented_keywords())
def test_documented_defaults_match_signatures(name, key, value):
    params = inspect.signature(getattr(L, name)).parameters
    assert key in params, f"docs/linalg.md quotes {name}({key}=...), which has no such argument"
    literal = _literal(value)
    if literal is not inspect.Parameter.empty:
        assert params[key].default == literal, f"docs/linalg.md: {name}({key}={value})"
