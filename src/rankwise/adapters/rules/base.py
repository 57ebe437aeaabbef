"""Training rules: changes to HOW adapters are trained, as hooks on the training step.

Some papers change the training step rather than the adapter's shape: a per-row learning
rate (ALLoRA), a weight perturbation around each step (LoRA-GGPO), a penalty gradient and
a re-selection of what trains (SaRA), rank that grows while training (IncreLoRA,
TriAdaptLoRA). Each is one :class:`TrainingRule` subclass; every training loop that calls
the hooks below (``rankwise finetune`` does, see :class:`TrainingRules`) runs every rule,
so no paper gets its own copy of the loop. Rules compose: several run in the order given.

The step, and where each hook runs::

    rules.before_backward(step)              # before the step's forward + backward passes
    loss.backward()  (× grad_accum)
    rules.after_backward(step)               # gradients present, before clipping
    clip_grad_norm_(...)
    adapter.before_optimizer_step(lr)        # the adapters' own hook
    rules.before_optimizer_step(step, lr)
    optimizer.step()
    rules.after_optimizer_step(step)         # then the lr schedule steps
    ...
    rules.teardown()                         # when training ends, also by an exception

``step`` counts optimizer steps from 0. ``setup(model, adapters, optimizer, steps=...)``
runs once before the first step, with ``{module path: adapter}`` for every trainable
adapter and the run's total number of optimizer steps.

How to add a rule
-----------------
Create ``src/rankwise/adapters/rules/<name>.py`` (imported automatically), with a frozen
:class:`RuleConfig` subclass for its options (typed fields, ``validate()`` for ranges) and
a :class:`TrainingRule` subclass decorated with ``@register_rule("<name>")``. Override the
hooks it needs, and :meth:`TrainingRule.applies_to` when it cannot work with every adapter
(return the reason; set ``works_with`` to the valid combinations, both go into the
ConfigError). A rule a method cannot train without (IncreLoRA's rank growth) lists that
method in ``implied_by``: it is switched on whenever the method is trained.
State a resumed run needs goes in :meth:`TrainingRule.state_dict` (tensors, numbers, lists).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rankwise.adapters.base import Adapter
from rankwise.errors import ConfigError
from rankwise.options import coerce, field_types, type_name
from rankwise.registry import Registry


@dataclass(frozen=True)
class RuleConfig:
    """A rule's options. Subclass it (frozen) with typed fields; ``validate()`` checks ranges."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            hint = field_types(type(self))[f.name]
            ok, value = coerce(getattr(self, f.name), hint)
            if not ok:
                raise ConfigError(
                    f"rule option {f.name!r} must be {type_name(hint)}, got "
                    f"{getattr(self, f.name)!r} ({type(getattr(self, f.name)).__name__})"
                )
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the option, the value and the valid range."""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


class TrainingRule:
    """One way of changing the training step; see the module docstring for the hooks.

    ``self.config`` is the rule's frozen :class:`RuleConfig`; after :meth:`setup`,
    ``self.model``, ``self.adapters`` (``{module path: adapter}``), ``self.optimizer`` and
    ``self.steps`` are available to every hook.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``rankwise finetune --list-rules``
    config_class: ClassVar[type[RuleConfig]] = RuleConfig
    works_with: ClassVar[str] = "every adapter method"  # the valid combinations, for errors
    implied_by: ClassVar[tuple[str, ...]] = ()  # methods that always train with this rule

    def __init__(self, config: RuleConfig | None = None) -> None:
        self.config = self.config_class() if config is None else config
        self.model: nn.Module | None = None
        self.adapters: dict[str, Adapter] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0

    def applies_to(self, adapter: Adapter) -> str | None:
        """Why this rule cannot train ``adapter``, or None (default: every adapter)."""
        return None

    def setup(
        self,
        model: nn.Module,
        adapters: Mapping[str, Adapter],
        optimizer: torch.optim.Optimizer,
        *,
        steps: int,
    ) -> None:
        """Called once before training (after :meth:`applies_to` passed for every adapter)."""
        self.model, self.adapters, self.optimizer, self.steps = model, dict(adapters), optimizer, steps

    def before_backward(self, step: int) -> None:
        """Before the step's forward and backward passes."""

    def after_backward(self, step: int) -> None:
        """After backward: gradients are present (summed over micro-batches), not yet clipped."""

    def before_optimizer_step(self, step: int, lr: float) -> None:
        """After clipping, right before ``optimizer.step()``; ``lr`` is the current learning rate."""

    def after_optimizer_step(self, step: int) -> None:
        """Right after ``optimizer.step()``."""

    def teardown(self) -> None:
        """Called when training ends, normally or by an exception: undo any temporary change
        to the model (GGPO's perturbation) so the model is left as the optimizer made it."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (called after :meth:`setup` when a run resumes)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


RULES: Registry[type[TrainingRule]] = Registry("training rule", plugins=("rankwise.adapters.rules",))


def register_rule(name: str) -> Callable[[type[TrainingRule]], type[TrainingRule]]:
    """Class decorator: make a :class:`TrainingRule` subclass available as ``--rule name``."""

    def deco(cls: type[TrainingRule]) -> type[TrainingRule]:
        if not (isinstance(cls, type) and issubclass(cls, TrainingRule)):
            raise ConfigError(f"{cls!r} must subclass rankwise.adapters.rules.TrainingRule")
        RULES.register(name, cls)
        cls.name = name
        if not cls.__dict__.get("summary"):
            cls.summary = (inspect.getdoc(cls) or name).splitlines()[0]
        return cls

    return deco


def rule_names() -> list[str]:
    """The registered training rules, sorted."""
    return RULES.names()


def split_rule_options(
    names: Sequence[str], options: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Give each rule its options: ``key=value`` goes to the one rule with that option,
    ``rule.key=value`` to the named rule. ConfigError on a key no rule (or several) has."""
    per_rule: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, value in options.items():
        prefix, dot, bare = key.partition(".")
        if dot:
            if prefix not in per_rule:
                raise ConfigError(
                    f"rule option {key!r} names rule {prefix!r}, which is not switched on "
                    f"(rules: {list(names) or 'none'}); add --rule {prefix}"
                )
            per_rule[prefix][bare] = value
            continue
        owners = [n for n in names if key in RULES.get(n).config_class.option_names()]
        if not owners:
            valid = {n: RULES.get(n).config_class.option_names() for n in names}
            raise ConfigError(f"rule option {key!r} belongs to no rule switched on; valid: {valid}")
        if len(owners) > 1:
            raise ConfigError(
                f"rule option {key!r} is an option of several rules {owners}; write it as "
                f"{owners[0]}.{key}=..."
            )
        per_rule[owners[0]][key] = value
    return per_rule


def build_rules(
    names: Sequence[str], options: Mapping[str, Any] | None = None, *, methods: Iterable[str] = ()
) -> list[TrainingRule]:
    """The rules ``names`` (in that order, then those implied by ``methods``), configured from
    ``options`` (see :func:`split_rule_options`). Validates names and options; attaches nothing."""
    names = list(dict.fromkeys(names))
    for method in dict.fromkeys(methods):
        names += [n for n, cls in RULES.items() if method in cls.implied_by and n not in names]
    per_rule = split_rule_options(names, options or {})
    rules = []
    for name in names:
        cls = RULES.get(name)
        values = per_rule[name]
        unknown = sorted(set(values) - set(cls.config_class.option_names()))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for rule {name!r}; valid: "
                f"{cls.config_class.option_names()}"
            )
        rules.append(cls(cls.config_class(**values)))
    return rules


class TrainingRules:
    """The rules of one training run, called in order at each hook (see the module docstring).

    ``TrainingRules(rules).setup(model, adapters, optimizer, steps=N)`` first checks that
    every rule applies to every adapter (ConfigError naming the rule, the layer, the
    method, why, and which combinations are valid), then sets each rule up.
    """

    def __init__(self, rules: Sequence[TrainingRule] = ()) -> None:
        self.rules = list(rules)
        self.adapters: dict[str, Adapter] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def check(self, adapters: Mapping[str, Adapter]) -> None:
        """ConfigError if a rule cannot train one of ``adapters`` ({module path: adapter})."""
        for rule in self.rules:
            for path, adapter in adapters.items():
                reason = rule.applies_to(adapter)
                if reason:
                    raise ConfigError(
                        f"rule {rule.name!r} cannot train the {adapter.method!r} adapter on "
                        f"{path}: {reason}; rule {rule.name!r} works with {rule.works_with}"
                    )

    def setup(
        self,
        model: nn.Module,
        adapters: Mapping[str, Adapter],
        optimizer: torch.optim.Optimizer,
        *,
        steps: int,
    ) -> None:
        self.check(adapters)
        self.adapters = dict(adapters)
        for rule in self.rules:
            rule.setup(model, adapters, optimizer, steps=steps)

    def train_step(
        self,
        step: int,
        loss_fn: Callable[[], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None = None,
    ) -> float:
        """One optimizer step of a simple loop (no accumulation) with every hook in its place;
        returns the loss. ``rankwise finetune`` calls the same hooks around its own step."""
        self.before_backward(step)
        loss = loss_fn()
        loss.backward()
        self.after_backward(step)
        if max_grad_norm is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        for adapter in self.adapters.values():
            adapter.before_optimizer_step(lr)
        self.before_optimizer_step(step, lr)
        optimizer.step()
        self.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def before_backward(self, step: int) -> None:
        for rule in self.rules:
            rule.before_backward(step)

    def after_backward(self, step: int) -> None:
        for rule in self.rules:
            rule.after_backward(step)

    def before_optimizer_step(self, step: int, lr: float) -> None:
        for rule in self.rules:
            rule.before_optimizer_step(step, lr)

    def after_optimizer_step(self, step: int) -> None:
        for rule in self.rules:
            rule.after_optimizer_step(step)

    def teardown(self) -> None:
        for rule in self.rules:
            rule.teardown()

    def state_dict(self) -> dict[str, Any]:
        return {rule.name: rule.state_dict() for rule in self.rules}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for rule in self.rules:
            rule.load_state_dict(state.get(rule.name, {}))


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
