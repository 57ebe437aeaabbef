"""Helpers shared by the subcommands."""

from __future__ import annotations

import json

from rankwise.errors import ConfigError


def parse_options(pairs: list[str]) -> dict:
    """``key=value`` pairs from repeated ``--option``; values are read as JSON when they parse
    (numbers, true/false, lists), otherwise kept as strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
