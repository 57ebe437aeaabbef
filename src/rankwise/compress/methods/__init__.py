"""Compression methods, one per module, each registered by name on import.

Every module in this package is imported here, so adding a method is adding a file
(see the docstring of :mod:`rankwise.compress.base` for the contract).
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
