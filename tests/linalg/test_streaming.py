import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, ShapeError
from rankwise.linalg.streaming import streaming_top_eigvec


def _spiked(n, d, theta, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=dtype), dim=0)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    X += theta**0.5 * torch.randn(n, 1, generator=g, dtype=dtype) * u
    return X


@given(seed=st.integers(0, 10_000), block=st.sampled_from([1, 16, 100]))
@settings(deadline=None, max_examples=8)
def test_planted_spike_aligns_with_eigh(seed, block):
    X = _spiked(8000, 40, 3.0, seed)
    evals, evecs = torch.linalg.eigh(X.T @ X / X.shape[0])
    res = streaming_top_eigvec(iter(X.split(block)), generator=torch.Generator().manual_seed(1))
    assert res.n_rows == 8000
    assert torch.isclose(res.vector.norm(), torch.tensor(1.0))
    assert abs(float(res.vector @ evecs[:, -1])) > 0.99
    assert abs(res.value - float(evals[-1])) < 0.1 * float(evals[-1])


def test_vectors_one_at_a_time_float64_and_generator_only_input():
    X = _spiked(3000, 10, 5.0, 0, dtype=torch.float64)
    top = torch.linalg.eigh(X.T @ X)[1][:, -1]
    res = streaming_top_eigvec((row for row in X), generator=torch.Generator().manual_seed(0))
    assert res.vector.dtype == torch.float64
    assert abs(float(res.vector @ top)) > 0.99
    again = streaming_top_eigvec((row for row in X), generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.vector, again.vector)


def test_max_rows_stops_an_endless_stream():
    def endless():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(7, 5, generator=g)

    res = streaming_top_eigvec(endless(), max_rows=100)
    assert res.n_rows == 100


def test_bad_input():
    with pytest.raises(ShapeError, match="streaming_top_eigvec.*'stream' is empty"):
        streaming_top_eigvec(iter([]))
    with pytest.raises(ShapeError, match=r"streaming_top_eigvec: argument 'stream\[1\]' contains 1 NaN"):
        streaming_top_eigvec([torch.ones(3), torch.tensor([1.0, float("nan"), 0.0])])
    with pytest.raises(ShapeError, match="streaming_top_eigvec.*'stream' item 1 has 4 columns"):
        streaming_top_eigvec([torch.ones(3), torch.ones(4)])
    with pytest.raises(ShapeError, match="streaming_top_eigvec.*item 0 has 3 columns"):
        streaming_top_eigvec([torch.ones(3)], dim=4)
    with pytest.raises(ShapeError, match="streaming_top_eigvec.*stream\\[0\\].*dtype"):
        streaming_top_eigvec([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ShapeError, match="streaming_top_eigvec.*'stream'.*iterable"):
        streaming_top_eigvec(5)
    with pytest.raises(ConfigError, match="streaming_top_eigvec.*'lr'"):
        streaming_top_eigvec([torch.ones(3)], lr=0.0)
    with pytest.raises(ConfigError, match="streaming_top_eigvec.*'max_rows'"):
        streaming_top_eigvec([torch.ones(3)], max_rows=0)
