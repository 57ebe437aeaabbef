"""The training-rule mechanism: registry, options, hook order in finetune, composition, resume."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rankwise.adapters.finetune import FinetuneConfig, finetune
from rankwise.adapters.rules import (
    RULES,
    RuleConfig,
    TrainingRule,
    build_rules,
    rule_names,
    split_rule_options,
)
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class _EtaConfig(RuleConfig):
    eta: float = 1.0


TINY = dict(model="tiny-llama", rank=4, seq_len=32, lr=3e-3, eval_tokens=0, seed=0, batch_size=2)


class Recorder(TrainingRule):
    """Records every hook call, and whether gradients were present then."""

    calls: list = []

    def setup(self, model, adapters, optimizer, *, steps):
        super().setup(model, adapters, optimizer, steps=steps)
        self.calls.append(("setup", steps, len(adapters)))

    def _has_grad(self) -> bool:
        return any(p.grad is not None for a in self.adapters.values() for p in a.parameters())

    def before_backward(self, step):
        self.calls.append(("before_backward", step, self._has_grad()))

    def after_backward(self, step):
        self.calls.append(("after_backward", step, self._has_grad()))

    def before_optimizer_step(self, step, lr):
        self.calls.append(("before_optimizer_step", step, lr > 0))

    def after_optimizer_step(self, step):
        self.calls.append(("after_optimizer_step", step, None))


def test_finetune_calls_every_hook_in_order():
    Recorder.calls = []
    with RULES.temporary("recorder", Recorder):
        finetune(FinetuneConfig(**TINY, steps=2, rules=("recorder",)), progress=False)
    assert Recorder.calls[0][0] == "setup" and Recorder.calls[0][1] == 2
    hooks = [c for c in Recorder.calls[1:]]
    names = [h[0] for h in hooks]
    per_step = ["before_backward", "after_backward", "before_optimizer_step", "after_optimizer_step"]
    assert names == per_step * 2
    assert [h[1] for h in hooks] == [0] * 4 + [1] * 4
    assert hooks[0][2] is False and hooks[1][2] is True  # grads appear between the two


def test_rules_run_in_the_order_given():
    order = []

    class First(TrainingRule):
        def after_backward(self, step):
            order.append("first")

    class Second(TrainingRule):
        def after_backward(self, step):
            order.append("second")

    with RULES.temporary("first", First), RULES.temporary("second", Second):
        First.name, Second.name = "first", "second"
        finetune(FinetuneConfig(**TINY, steps=1, rules=("second", "first")), progress=False)
    assert order == ["second", "first"]


def test_a_rule_that_does_not_apply_names_the_valid_combinations():
    class OnlyDora(TrainingRule):
        works_with = "method dora"

        def applies_to(self, adapter):
            return None if adapter.method == "dora" else "needs a magnitude vector"

    with RULES.temporary("only_dora", OnlyDora):
        OnlyDora.name = "only_dora"
        with pytest.raises(ConfigError, match=r"only_dora.*'lora'.*magnitude.*works with method dora"):
            finetune(FinetuneConfig(**TINY, steps=1, rules=("only_dora",)), progress=False)


def test_unknown_rule_and_option_fail_before_loading(monkeypatch):
    import rankwise

    monkeypatch.setattr(rankwise, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="training rule 'nope' is not registered; valid: .*allora"):
        finetune(FinetuneConfig(**TINY, steps=1, rules=("nope",)), progress=False)
    with pytest.raises(ConfigError, match="rule option 'zzz' belongs to no rule"):
        finetune(FinetuneConfig(**TINY, steps=1, rules=("allora",), rule_options={"zzz": 1}), progress=False)
    with pytest.raises(ConfigError, match="rule option 'eta' must be float"):
        finetune(FinetuneConfig(**TINY, steps=1, rules=("allora",), rule_options={"eta": "x"}), progress=False)


def test_options_go_to_the_rule_that_has_them():
    with RULES.temporary("twin", type("Twin", (TrainingRule,), {"config_class": _EtaConfig})):
        assert split_rule_options(["allora"], {"eta": 2.0}) == {"allora": {"eta": 2.0}}
        with pytest.raises(ConfigError, match="several rules.*allora.eta="):
            split_rule_options(["allora", "twin"], {"eta": 2.0})
        assert split_rule_options(["allora", "twin"], {"twin.eta": 3.0}) == {
            "allora": {},
            "twin": {"eta": 3.0},
        }
    with pytest.raises(ConfigError, match="add --rule ggpo"):
        split_rule_options(["allora"], {"ggpo.rho": 1.0})


def test_methods_bring_their_own_rules():
    rules = build_rules([], methods=["increlora"])
    assert [r.name for r in rules] == ["rank_growth"]
    assert [r.name for r in build_rules(["rank_growth"], methods=["increlora"])] == ["rank_growth"]
    assert {"allora", "ggpo", "sara", "rank_growth"} <= set(rule_names())


def test_cli_rule_options(capsys):
    from rankwise.cli import main

    assert main(["finetune", "--list-rules"]) == 0
    out = capsys.readouterr().out
    assert "allora" in out and "ggpo" in out
    code = main(
        ["finetune", "--model", "tiny-llama", "--rank", "4", "--steps", "1", "--seq-len", "32",
         "--batch-size", "2", "--eval-tokens", "0", "--rule", "allora", "-r", "8"]
    )
    assert code == 2 and "--rank 8" in capsys.readouterr().err


class _Stop(Exception):
    pass


def _stop_at(step):
    def on_step(s, loss):
        if s == step:
            raise _Stop

    return on_step


@pytest.mark.parametrize(
    "method, rules, options",
    [
        ("increlora", (), {"init_rank": 1, "target_rank": 3, "grow_every": 1, "grow_until": 1.0}),
        ("lora", ("ggpo", "allora"), {}),
    ],
)
def test_rule_state_resumes_exactly(tmp_path, method, rules, options):
    """Rule state (importance, noise generator, gradient norms) is in the checkpoint."""
    from dataclasses import replace

    from safetensors.torch import load_file

    common = {**TINY, "steps": 6, "method": method, "rules": rules, "method_options": options}
    whole = finetune(FinetuneConfig(**common, out=str(tmp_path / "whole")), progress=False)
    config = FinetuneConfig(**common, out=str(tmp_path / "parts"), checkpoint_every=2)
    with pytest.raises(_Stop):
        finetune(config, progress=False, on_step=_stop_at(5))
    resumed = finetune(replace(config, resume=True), progress=False)
    assert resumed.resumed_from == 4 and resumed.losses == whole.losses
    (name,) = [f.name for f in (tmp_path / "whole").glob("*.safetensors")]
    a, b = load_file(tmp_path / "parts" / name), load_file(tmp_path / "whole" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
