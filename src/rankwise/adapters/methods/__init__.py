"""Adapter methods, one module per method; every module here is imported (and so registered).

Adding a method means adding ``<name>.py`` to this folder; see ``rankwise.adapters.base``.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
