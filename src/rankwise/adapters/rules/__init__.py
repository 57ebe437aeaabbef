"""Training rules (``rankwise finetune --rule NAME``): hooks on the training step.

See ``rules/base.py`` for the hooks and how to add a rule; every module in this folder is
imported (and so registered) with the package.
"""

import importlib
import pkgutil

from rankwise.adapters.rules.base import (
    RULES,
    RuleConfig,
    TrainingRule,
    TrainingRules,
    build_rules,
    register_rule,
    rule_names,
    split_rule_options,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "RULES",
    "RuleConfig",
    "TrainingRule",
    "TrainingRules",
    "build_rules",
    "register_rule",
    "rule_names",
    "split_rule_options",
]
