"""Shared fixtures for the compression tests: tiny models and calibration text built in code."""

from __future__ import annotations

import pytest
import torch

from rankwise.models import tiny_llama

WORDS = (
    "the quick brown fox jumps over the lazy dog while a compiler parses tokens into trees "
    "and an interpreter walks them, raising errors when names are missing from the scope "
)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Deterministic English-ish text: enough tokens for a few calibration blocks."""
    return [f"{i}: " + WORDS * 3 for i in range(40)]


@pytest.fixture()
def tiny():
    return tiny_llama(seed=0, layers=2, hidden=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: the suite runs two xdist workers on two cores, and small
    LAPACK calls from oversubscribed thread pools are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_registry_leftovers():
    """A test may register methods or layer types only for its own duration."""
    from rankwise.compress.base import METHODS
    from rankwise.layers import LAYER_TYPES

    before = (METHODS.names(), LAYER_TYPES.names())
    yield
    assert (METHODS.names(), LAYER_TYPES.names()) == before, "a test left registry entries behind"
