"""Registry (one name table type) and replace_module (one submodule swap)."""

from __future__ import annotations

import pytest
from torch import nn

from rankwise.errors import ConfigError, ModelError
from rankwise.modules import parent_of, replace_module
from rankwise.registry import Registry


def test_register_get_and_list():
    reg = Registry("widget")
    reg.register("b", 2)
    reg.decorator("a")(1)
    assert reg.names() == ["a", "b"] and reg.get("a") == 1 and "b" in reg and len(reg) == 2


def test_duplicate_name_raises_and_same_entry_is_idempotent():
    reg = Registry("widget")
    reg.register("a", 1)
    reg.register("a", 1)
    with pytest.raises(ConfigError, match="widget 'a' is already registered"):
        reg.register("a", 2)


@pytest.mark.parametrize("name", ["", "1abc", "has space", "a/b", None])
def test_bad_names_are_refused(name):
    with pytest.raises(ConfigError, match="invalid"):
        Registry("widget").register(name, 1)


def test_unknown_name_lists_valid_ones():
    reg = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(ConfigError, match="widget 'beta' is not registered; valid: alpha"):
        reg.get("beta")


def test_temporary_entry_is_removed():
    reg = Registry("widget")
    with reg.temporary("t", 1):
        assert reg.get("t") == 1
    assert "t" not in reg


def test_plugins_are_imported_on_first_lookup():
    reg = Registry("widget", plugins=("rankwise.nonexistent_plugin_module",))
    with pytest.raises(ModuleNotFoundError):
        reg.names()


def test_replace_module_swaps_and_returns_old():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    new = nn.Linear(3, 1)
    old = replace_module(model, "1.1", new, expect=nn.Linear)
    assert model[1][1] is new and isinstance(old, nn.Linear) and old is not new


def test_replace_module_checks_type_and_changes_nothing():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with pytest.raises(ModelError, match="ReLU, expected Linear"):
        replace_module(model, "1", nn.Identity(), expect=nn.Linear)
    assert isinstance(model[1], nn.ReLU)


@pytest.mark.parametrize("path", ["2", "0.weight", "x.y", ""])
def test_missing_path_is_a_model_error(path):
    model = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(ModelError, match="does not exist"):
        parent_of(model, path)
