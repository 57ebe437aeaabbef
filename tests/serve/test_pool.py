"""The adapter pool: safe names only, on-demand loading, LRU eviction under a memory budget."""

from __future__ import annotations

import os

import pytest
from doc_commands import save_tiny_adapter

from rankwise.errors import ConfigError, ModelError
from rankwise.serve import Engine, GenerationRequest, QueueFullError, UnknownAdapterError


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(["one", "two", "three"]):
        save_tiny_adapter(root / name, seed=i + 1, rank=4 * (i + 1))
    return root


@pytest.fixture(scope="module")
def engine(adapters_dir):
    engine = Engine("tiny-llama", adapters_dir, max_batch_size=4).start()
    yield engine
    engine.stop()


def ask(engine, model, prompt="Hello there", max_tokens=6):
    return engine.submit(GenerationRequest(model=model, prompt=prompt, max_tokens=max_tokens)).result(timeout=120)


def test_unknown_adapter_lists_the_known_ones(engine):
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'.*'one'") as info:
        ask(engine, "nope")
    assert isinstance(info.value, ModelError)
    assert info.value.known == ["one", "three", "two"]
    with pytest.raises(UnknownAdapterError):
        engine.load_adapter("nope")


@pytest.mark.parametrize(
    "name, message",
    [
        ("/etc/passwd", "absolute path"),
        ("../adapters", r"contains '\.\.'"),
        ("one/../two", r"contains '\.\.'"),
        ("", "non-empty string"),
    ],
)
def test_unsafe_names_are_refused(engine, name, message):
    with pytest.raises(ConfigError, match=message):
        engine.load_adapter(name)
    with pytest.raises(ConfigError, match=message):
        engine.submit(GenerationRequest(model=name, prompt="hi"))


def test_symlink_leaving_the_folder_and_pickled_weights_are_refused(tmp_path):
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    root.mkdir()
    save_tiny_adapter(outside / "evil")
    os.symlink(outside / "evil", root / "evil")
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (root / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    engine = Engine("tiny-llama", root)
    assert "evil" not in {m["id"] for m in engine.models()}  # never offered
    with pytest.raises(ConfigError, match="symlink.*outside the adapters folder"):
        engine.load_adapter("evil")
    with pytest.raises(ConfigError, match=r"only in \['adapter_model.bin'\].*only safetensors"):
        engine.load_adapter("pickled")
    with pytest.raises(ConfigError, match="is not a folder"):
        Engine("tiny-llama", tmp_path / "missing")


def test_load_unload_and_models(engine):
    entry = engine.load_adapter("two")
    assert entry == {"id": "two", "kind": "adapter", "resident": True, "method": "lora", "rank": 8}
    cards = {m["id"]: m for m in engine.models()}
    assert cards["tiny-llama"]["kind"] == "base" and cards["two"]["resident"]
    engine.unload_adapter("two")
    assert not {m["id"]: m for m in engine.models()}["two"]["resident"]
    with pytest.raises(ConfigError, match="base model"):
        engine.unload_adapter("tiny-llama")


def test_eviction_then_reload_gives_the_same_outputs(adapters_dir):
    with Engine("tiny-llama", adapters_dir) as probe:  # what each adapter holds once it ran
        held = {}
        for name in ("one", "two"):
            ask(probe, name)
            held[name] = probe.pool.used_bytes()
            probe.unload_adapter(name)
            probe.pool._drop_empty_slot_pools()
        kv = (len(probe.tokenizer.encode("Hello there")) + 6) * probe._kv_per_token
    budget = held["two"] + kv  # "two" and a request fit; adding "one" does not
    assert held["one"] + held["two"] + kv > budget
    with Engine("tiny-llama", adapters_dir, memory_budget_bytes=budget) as engine:
        first = ask(engine, "one")
        assert engine.metrics()["evictions"] == 0
        ask(engine, "two")  # evicts "one"
        assert [m["id"] for m in engine.models() if m["resident"]] == ["tiny-llama", "two"]
        again = ask(engine, "one")  # evicts "two", loads "one" again
        metrics = engine.metrics()
    assert metrics["evictions"] == 2 and metrics["adapter_loads"] == 3
    assert metrics["resident_adapters"] == 1
    assert again == first


def test_adapter_in_use_cannot_be_unloaded(adapters_dir):
    engine = Engine("tiny-llama", adapters_dir)  # not started: requests stay queued
    handle = engine.submit(GenerationRequest(model="three", prompt="hi"))
    with pytest.raises(ConfigError, match="in use by 1 request"):
        engine.unload_adapter("three")
    engine.stop()
    assert handle.result(timeout=5).finish_reason == "cancelled"
    engine.unload_adapter("three")


def test_full_queue_raises_with_retry_after(adapters_dir):
    engine = Engine("tiny-llama", adapters_dir, max_queue=2)
    for _ in range(2):
        engine.submit(GenerationRequest(model="tiny-llama", prompt="hi"))
    with pytest.raises(QueueFullError, match="queue is full") as info:
        engine.submit(GenerationRequest(model="tiny-llama", prompt="hi"))
    assert info.value.retry_after >= 1
    engine.stop(drain=False)
    with pytest.raises(QueueFullError, match="shutting down"):
        engine.submit(GenerationRequest(model="tiny-llama", prompt="hi"))


def test_slot_pool_slack_counts_in_the_budget_and_evicts(adapters_dir):
    with Engine("tiny-llama", adapters_dir) as probe:
        ask(probe, "three")  # rank 12: its factors plus the free slots of its new pools
        alone, three = probe.pool.used_bytes(), probe.pool.resident["three"].nbytes
        ask(probe, "two")
        two = probe.pool.resident["two"].nbytes
        kv = (len(probe.tokenizer.encode("Hello there")) + 6) * probe._kv_per_token
    budget = alone + kv
    assert two + three + kv <= budget  # without the slack, "two" and "three" would both fit
    with Engine("tiny-llama", adapters_dir, memory_budget_bytes=budget) as engine:
        pool = engine.pool
        first = ask(engine, "two")
        assert pool.slot_slack_bytes() > 0
        assert pool.used_bytes() == two + pool.slot_slack_bytes()
        ask(engine, "three")  # "two"'s free slots and the pools "three" needs do not fit
        assert pool.evictions == 1 and list(pool.resident) == ["three"]
        assert pool.used_bytes() == three + pool.slot_slack_bytes() <= budget  # "two"'s pools freed
        assert ask(engine, "two") == first  # evicts "three" in turn
        assert pool.evictions == 2 and pool.used_bytes() <= budget


def test_predicted_slot_growth_is_what_the_pools_grow_by(adapters_dir):
    with Engine("tiny-llama", adapters_dir) as engine:
        pool = engine.pool
        ask(engine, "two")  # keeps the layers adapted while "one" comes and goes
        before = pool.slot_slack_bytes()
        checkpoint, _ = pool._read("one")
        growth = pool._slot_growth(checkpoint.factor_shapes())
        assert growth > 0  # no pool for rank 4 yet: new 4-slot pools, 3 of them free
        ask(engine, "one")
        slack = pool.slot_slack_bytes()
        assert slack - before == growth
        engine.unload_adapter("one")  # its slots are freed, the pools stay (no budget)
        assert pool.slot_slack_bytes() > slack
        assert pool._slot_growth(checkpoint.factor_shapes()) == 0  # a free slot is waiting
        ask(engine, "one")
        assert pool.slot_slack_bytes() == slack
