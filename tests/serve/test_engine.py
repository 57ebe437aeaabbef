"""The engine's request API: validation, greedy and seeded sampling, stop strings, streaming
(sync and asyncio), cancel, shutdown and metrics."""

from __future__ import annotations

import asyncio

import pytest
from doc_commands import save_tiny_adapter

from rankwise.errors import ConfigError, ModelError
from rankwise.models import byte_tokenizer
from rankwise.serve import Engine, GenerationRequest, QueueFullError, UnknownAdapterError
from rankwise.serve.sampling import TextStream

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_tiny_adapter(root / "alpha", seed=1)
    engine = Engine("tiny-llama", root, max_batch_size=8, max_prompt_tokens=40, max_new_tokens=24)
    engine.start()
    yield engine
    engine.stop()


def run(engine, **options):
    options.setdefault("model", "alpha")
    options.setdefault("prompt", PROMPT)
    return engine.submit(GenerationRequest(**options)).result(timeout=120)


def test_interface_basics(engine):
    assert engine.base_name == "tiny-llama"
    assert engine.tokenizer.encode("ab")
    out = run(engine, max_tokens=5)
    assert out.finish_reason == "length" and out.completion_tokens == 5
    assert out.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert run(engine, prompt=engine.tokenizer.encode(PROMPT), max_tokens=5) == out


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": 25}, "max_new_tokens=24"),
        ({"prompt": "x" * 41}, "max_prompt_tokens=40"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": [1, 10**9]}, "outside the vocabulary"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"stop": "x"}, "stop must be a list of strings"),
    ],
)
def test_bad_values_raise_config_error(engine, options, message):
    with pytest.raises(ConfigError, match=message):
        engine.submit(GenerationRequest(model="alpha", prompt=options.pop("prompt", PROMPT), **options))


def test_unknown_model_is_an_error_not_the_base(engine):
    with pytest.raises(UnknownAdapterError, match="known adapters: \\['alpha'\\]") as info:
        run(engine, model="alpah")
    assert isinstance(info.value, ModelError) and info.value.known == ["alpha"]


def test_bad_engine_options(tmp_path):
    with pytest.raises(ConfigError, match="max_batch_size must be a positive integer"):
        Engine("tiny-llama", max_batch_size=0)
    with pytest.raises(ConfigError, match="memory_budget_bytes must be positive"):
        Engine("tiny-llama", memory_budget_bytes=0)
    with pytest.raises(ConfigError, match="dtype must be a floating torch dtype"):
        Engine("tiny-llama", dtype="bf16")


def test_bfloat16_engine_serves_a_mixed_batch(tmp_path):
    """``dtype=torch.bfloat16``: the base runs in bf16, adapters stay float32, and a mixed batch
    gives each request the tokens it gets alone in the same engine."""
    import torch

    save_tiny_adapter(tmp_path / "alpha", seed=1)
    save_tiny_adapter(tmp_path / "beta", seed=2, rank=8)
    with Engine("tiny-llama", tmp_path, dtype=torch.bfloat16) as engine:
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        names = ["alpha", "tiny-llama", "beta"]
        def tokens(handle):
            return [t for e in handle.events(timeout=120) for t in e.token_ids]

        def submit(name):
            return engine.submit(GenerationRequest(model=name, prompt=PROMPT, max_tokens=6))

        alone = [tokens(submit(n)) for n in names]
        handles = [submit(n) for n in names]
        assert [tokens(h) for h in handles] == alone
        assert len(set(map(tuple, alone))) > 1  # the adapters changed the tokens
        adapter = next(a for layer in engine.model.modules() if hasattr(layer, "adapters") for a in layer.adapters.values())
        assert adapter.dtype == torch.float32


def test_seeded_sampling_is_reproducible(engine):
    a = run(engine, temperature=1.0, top_p=0.9, seed=123, max_tokens=12)
    b = run(engine, temperature=1.0, top_p=0.9, seed=123, max_tokens=12)
    c = run(engine, temperature=1.0, top_p=0.9, seed=124, max_tokens=12)
    greedy = run(engine, max_tokens=12)
    assert a == b
    assert a.text != c.text and a.text != greedy.text
    # in a batch with other requests, the seeded request draws the same tokens
    handles = [
        engine.submit(GenerationRequest(model=m, prompt=p, temperature=1.0, top_p=0.9, seed=s, max_tokens=12))
        for m, p, s in [("tiny-llama", "other", 5), ("alpha", PROMPT, 123), ("alpha", "x y", 9)]
    ]
    assert handles[1].result(timeout=120) == a


def test_tiny_top_p_is_greedy(engine):
    assert run(engine, temperature=0.7, top_p=1e-6, seed=1, max_tokens=8) == run(engine, max_tokens=8)


def test_stop_string_cuts_the_text(engine):
    full = run(engine, max_tokens=16).text
    stop = full[5:8]
    cut = run(engine, max_tokens=16, stop=[stop, "never-there"])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert cut.completion_tokens < 16


def test_text_stream_holds_back_a_possible_stop_string():
    tok = byte_tokenizer()
    stream = TextStream(tok, stop=["END"])
    shown = [stream.add(t) for t in tok.encode("abcEN")]
    assert "".join(shown) == "abc"  # "EN" may still become "END"
    assert stream.add(tok.encode("X")[0]) == "ENX" and not stream.stopped
    rest = [stream.add(t) for t in tok.encode("yyEND")]
    assert stream.stopped and rest == ["y", "y", "", "", ""]
    plain = TextStream(tok)
    euro = tok.encode("€")  # one character, three byte tokens: nothing until it is whole
    assert [plain.add(t) for t in euro] == ["", "", "€"]


def test_events_stream_adds_up_to_the_result(engine):
    handle = engine.submit(GenerationRequest(model="alpha", prompt=PROMPT, max_tokens=10))
    events = list(handle.events(timeout=120))
    assert len(events) == 10 and all(len(e.token_ids) == 1 for e in events)
    assert [e.finish_reason for e in events] == [None] * 9 + ["length"]
    result = handle.result()
    assert "".join(e.text for e in events) == result.text
    assert list(handle.events()) == events  # the events can be read again


def test_async_events(engine):
    async def collect():
        handle = engine.submit(GenerationRequest(model="alpha", prompt=PROMPT, max_tokens=7))
        return [e async for e in handle.aevents()], handle

    events, handle = asyncio.run(collect())
    assert "".join(e.text for e in events) == handle.result().text
    assert events[-1].finish_reason == "length"


def test_leaving_async_stream_early_cancels(engine):
    async def first_event():
        handle = engine.submit(GenerationRequest(model="alpha", prompt=PROMPT, max_tokens=24))
        stream = handle.aevents()
        await stream.__anext__()
        await stream.aclose()  # the client went away
        return handle

    handle = asyncio.run(first_event())
    result = handle.result(timeout=120)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 24


def test_cancel(engine):
    handle = engine.submit(GenerationRequest(model="alpha", prompt=PROMPT, max_tokens=24))
    next(handle.events(timeout=120))
    handle.cancel()
    assert handle.result(timeout=120).finish_reason == "cancelled"


def test_metrics(engine):
    before = engine.metrics()["generated_tokens_total"]
    run(engine, max_tokens=4)
    m = engine.metrics()
    assert set(m) == {
        "queue_length", "running", "generated_tokens_total", "tokens_per_s",
        "resident_adapters", "evictions", "adapter_loads",
    }  # fmt: skip
    assert m["generated_tokens_total"] == before + 4
    assert m["tokens_per_s"] > 0 and m["resident_adapters"] == 1 and m["queue_length"] == 0


def test_stop_drains_then_refuses(tmp_path):
    engine = Engine("tiny-llama").start()
    handles = [engine.submit(GenerationRequest(model="tiny-llama", prompt="hi", max_tokens=6)) for _ in range(3)]
    engine.stop(drain=True, timeout=60)
    assert [h.result(timeout=1).finish_reason for h in handles] == ["length"] * 3
    engine.stop()  # idempotent
    with pytest.raises(QueueFullError, match="shutting down"):
        engine.submit(GenerationRequest(model="tiny-llama", prompt="hi"))


def test_stop_without_drain_cancels():
    engine = Engine("tiny-llama")  # never started: everything is still queued
    handle = engine.submit(GenerationRequest(model="tiny-llama", prompt="hi", max_tokens=6))
    engine.stop(drain=False)
    assert handle.result(timeout=1).finish_reason == "cancelled"


def test_serves_a_compressed_model_folder(tmp_path):
    import torch

    import rankwise
    from rankwise.compress.api import compress

    folder = tmp_path / "compressed"
    compress(
        "tiny-llama", ratio=0.8, out=folder, calib_tokens=512, seq_len=32, evaluate=False,
        measure_speed=False, report_html=False,
    )  # fmt: skip
    model, tok = rankwise.load_model(folder)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    with Engine(folder, base_name="small") as engine:
        out = engine.submit(GenerationRequest(model="small", prompt=PROMPT, max_tokens=5))
        assert [t for e in out.events(timeout=120) for t in e.token_ids] == ids[-5:]


def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    real = engine._forward
    calls = []

    def broken(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", broken)
    handle = engine.submit(GenerationRequest(model="alpha", prompt=PROMPT, max_tokens=4))
    with pytest.raises(RuntimeError, match="boom"):
        handle.result(timeout=120)
    assert engine.pool.resident["alpha"].pins == 0  # the failed request let go of its adapter
    assert run(engine, max_tokens=4).completion_tokens == 4
