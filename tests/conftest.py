"""Shared fixtures: tiny models built in code (fast, deterministic) and no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (seeded from each test's name): a CI run
# on a clean clone must not fail on a case no earlier run drew. Edge cases found once are kept
# as explicit @example(...) lines beside the test.
settings.register_profile("rankwise", derandomize=True)
settings.load_profile("rankwise")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RANKWISE_PROGRESS", "0")

# tests/doc_commands.py (the docs' examples made runnable) is imported by tests in several
# folders; make that work in every pytest import mode, not only the default one.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture
def tiny_llama():
    from rankwise.models import tiny_llama

    return tiny_llama()


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    """Every test starts from the same global random state, whatever ran before it on its
    pytest worker: a test drawing unseeded data gives the same result in every run and order."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
