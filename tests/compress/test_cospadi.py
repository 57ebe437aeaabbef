"""cospadi: sparse dictionary beats low rank on a union of subspaces; whitening matters."""

from __future__ import annotations

import pytest
import torch
from test_lord import end_to_end

from rankwise.compress.base import damped_cholesky
from rankwise.compress.methods.cospadi import (
    learn_sparse_dictionary,
    sparse_code,
    sparse_dict_parameters,
)
from rankwise.errors import ConfigError
from rankwise.layers import SparseDictLinear
from rankwise.models import count_parameters


def _union_of_subspaces(seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(8, 3, 64, dtype=torch.float64, generator=g)  # 8 subspaces of dim 3
    label = torch.randint(0, 8, (128,), generator=g)
    coeff = torch.randn(128, 3, dtype=torch.float64, generator=g)
    return torch.einsum("ok,okn->on", coeff, bases[label])


def test_sparse_dictionary_beats_low_rank_at_equal_storage():
    w = _union_of_subspaces()
    atoms, cost = sparse_dict_parameters(128, 64, 3, 8.0, 32)  # 24 atoms, 3 per row
    rank = cost // (128 + 64)
    learned = learn_sparse_dictionary(w, atoms, 3, iterations=8)
    s = torch.linalg.svdvals(w)
    low_rank = float(s[rank:].pow(2).sum() / s.pow(2).sum())
    assert learned.error < 0.3 * low_rank
    # s non-zeros per row, distinct atoms, and the learning never ends worse than its start
    assert learned.indices.shape == (128, 3)
    assert all(len(set(r.tolist())) == 3 for r in learned.indices)
    assert learned.error <= learn_sparse_dictionary(w, atoms, 3, iterations=0).error


def test_whitened_learning_lowers_the_output_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 32, dtype=torch.float64, generator=g)
    x = torch.randn(400, 32, dtype=torch.float64, generator=g) * torch.logspace(
        -2, 1, 32, dtype=torch.float64
    )
    chol = damped_cholesky(x.T @ x)

    def output_error(dictionary, values, indices):
        codes = values.new_zeros(40, dictionary.shape[0]).scatter(1, indices, values)
        return float(((w - codes @ dictionary) @ x.T).norm())

    aware = learn_sparse_dictionary(w @ chol, 16, 4)
    d_aware = torch.linalg.solve_triangular(chol, aware.D, upper=False, left=False)
    blind = learn_sparse_dictionary(w, 16, 4)
    assert output_error(d_aware, aware.values, aware.indices) < 0.8 * output_error(
        blind.D, blind.values, blind.indices
    )


def test_cospadi_end_to_end(tmp_path, texts):
    rel, res = end_to_end("cospadi", {"iterations": 2}, 0.8, texts, out=tmp_path / "m")
    layers = [m for m in res.model.modules() if isinstance(m, SparseDictLinear)]
    assert layers and all(m.indices.dtype == torch.int16 for m in layers)
    assert rel < 0.3
    file_bytes = (res.path / "model.safetensors").stat().st_size
    assert abs(file_bytes - 4 * count_parameters(res.model)) < 0.02 * file_bytes


def _exact_support_fit(target, dictionary, indices):
    """Per-row least squares on the chosen atoms (the reference the batched CG must match)."""
    rows = [torch.linalg.lstsq(dictionary[idx].T, t[:, None]).solution[:, 0] for t, idx in zip(target, indices, strict=True)]
    return torch.stack(rows)


def test_batched_support_fit_equals_per_row_least_squares():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(50, 40, dtype=torch.float64, generator=g)
    dictionary = torch.randn(24, 40, dtype=torch.float64, generator=g)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)  # correlated unit atoms
    values, indices = sparse_code(target, dictionary, 6, tol=1e-10, max_iter=500)
    assert indices.shape == (50, 6) and all(len(set(r.tolist())) == 6 for r in indices)
    assert torch.allclose(values, _exact_support_fit(target, dictionary, indices), atol=1e-6)
    # a warm start keeps the given supports and refits them exactly
    support = torch.stack([torch.randperm(24, generator=g)[:6] for _ in range(50)])
    refit, same = sparse_code(target, dictionary, 6, support=support, tol=1e-10, max_iter=500)
    assert torch.equal(same, support)
    assert torch.allclose(refit, _exact_support_fit(target, dictionary, support), atol=1e-6)


def test_float32_learning_matches_float64_and_warm_starts_stay_close():
    w = _union_of_subspaces(4) + 0.1 * torch.randn(128, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = learn_sparse_dictionary(w, 24, 3, iterations=4, dtype=torch.float64)
    fast = learn_sparse_dictionary(w, 24, 3, iterations=4)
    assert fast.D.dtype == torch.float64 and fast.values.dtype == torch.float64
    assert abs(fast.error - exact.error) < 0.02 * exact.error
    warm = learn_sparse_dictionary(w, 24, 3, iterations=4, search_every=2)
    start = learn_sparse_dictionary(w, 24, 3, iterations=0)
    assert warm.error <= start.error and warm.error < 1.2 * fast.error
    with pytest.raises(ConfigError, match="search_every"):
        learn_sparse_dictionary(w, 24, 3, search_every=0)


@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
def test_start_dictionary_is_the_top_right_singular_vectors(shape):
    from rankwise.compress.methods.cospadi import _top_right_singular_vectors

    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    start = _top_right_singular_vectors(w, 10)
    assert torch.allclose(start.abs(), vh[:10].abs(), atol=1e-10)  # up to each vector's sign
