"""Shared fixtures: tiny models built in code (fast, deterministic) and no network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RANKWISE_PROGRESS", "0")


@pytest.fixture
def tiny_llama():
    from rankwise.models import tiny_llama

    return tiny_llama()
