"""The HTTP API with real requests: uvicorn on a free 127.0.0.1 port, the `openai` client.

Every answer is checked against the engine's own output for the same request (greedy), so a
server that dropped the adapter, the prompt or a sampling option would fail here.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from doc_commands import save_tiny_adapter

from rankwise.serve import Engine, GenerationRequest
from rankwise.serve.openai_schema import ChatMessage, chat_prompt
from rankwise.serve.server import ServerThread, create_app

PROMPT = "The quick brown fox"
ADAPTERS = {"alpha": ("lora", 4, 1), "beta": ("lora", 8, 2), "gamma": ("dora", 4, 3)}


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, (method, rank, seed) in ADAPTERS.items():
        save_tiny_adapter(root / name, seed=seed, rank=rank, method=method)
    return root


@pytest.fixture(scope="module")
def engine(adapters_dir):
    return Engine("tiny-llama", adapters_dir, max_batch_size=8, max_queue=64, max_prompt_tokens=64, max_new_tokens=32)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def direct(engine, model: str, prompt, max_tokens: int, **options):
    """What the engine answers itself (no HTTP)."""
    request = GenerationRequest(model=model, prompt=prompt, max_tokens=max_tokens, **options)
    return engine.submit(request).result(timeout=120)


def test_models_lists_the_base_and_every_adapter(client, engine):
    cards = client.models.list().data
    assert {c.id for c in cards} == {"tiny-llama", *ADAPTERS}
    kinds = {c.id: c.model_extra["kind"] for c in cards}
    assert kinds["tiny-llama"] == "base" and kinds["alpha"] == "adapter"
    assert {c.id: c.model_extra["parent"] for c in cards}["beta"] == "tiny-llama"


@pytest.mark.parametrize("model", ["tiny-llama", "alpha", "gamma"])
def test_completion_is_the_engines_output(client, engine, model):
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    want = direct(engine, model, PROMPT, 8, temperature=0.0)
    assert got.object == "text_completion" and got.model == model
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 8)
    assert got.usage.total_tokens == want.prompt_tokens + 8


def test_the_adapter_named_is_the_one_used(client):
    texts = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text for m in ["tiny-llama", *ADAPTERS]}
    assert len(set(texts.values())) == len(texts), f"two models answered alike: {texts}"


def test_streamed_completion_joins_to_the_same_text(client, engine):
    stream = client.completions.create(
        model="beta", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == direct(engine, "beta", PROMPT, 8, temperature=0.0).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_chat_completion_uses_the_prompt_of_the_messages(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    got = client.chat.completions.create(model="alpha", messages=messages, max_tokens=6, temperature=0)
    prompt = chat_prompt(engine.tokenizer, [ChatMessage(**m) for m in messages])
    want = direct(engine, "alpha", prompt, 6, temperature=0.0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == want.completion_tokens


def test_streamed_chat_sends_the_role_then_the_text(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    whole = client.chat.completions.create(model="gamma", messages=messages, max_tokens=6, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="gamma", messages=messages, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sampling_is_reproducible_with_a_seed(client, engine):
    def sample(seed: int) -> str:
        return client.completions.create(model="beta", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed).choices[0].text

    assert sample(7) == sample(7) == direct(engine, "beta", PROMPT, 12, temperature=1.0, seed=7).text


def test_several_prompts_and_token_ids(client, engine):
    got = client.completions.create(model="alpha", prompt=["One", "Two words"], max_tokens=5, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [direct(engine, "alpha", p, 5, temperature=0.0).text for p in ["One", "Two words"]]
    ids = engine.tokenizer(PROMPT).input_ids
    by_ids = client.completions.create(model="alpha", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == direct(engine, "alpha", ids, 5, temperature=0.0).text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_stop_string_ends_the_completion(client):
    def ask(**options):
        return client.completions.create(model="alpha", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=3, **options).choices[0]

    full = ask().text
    stop = next(c for c in full[1:] if full.index(c) >= 1)  # a character the text does not start with
    got = ask(stop=[stop, "never-generated"])
    assert got.text == full[: full.index(stop)]
    assert got.finish_reason == "stop"


def test_concurrent_requests_for_different_adapters(client, engine):
    jobs = [(m, f"{PROMPT} {i}") for i in range(3) for m in ["tiny-llama", *ADAPTERS]]
    results: dict[int, str] = {}

    def ask(i: int, model: str, prompt: str) -> None:
        results[i] = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(jobs))] == [direct(engine, m, p, 6, temperature=0.0).text for m, p in jobs]


def test_adapters_load_and_unload_over_http(server, engine):
    def resident(name: str) -> bool:
        cards = httpx.get(server.url + "/v1/models").json()["data"]
        return {c["id"]: c["resident"] for c in cards}[name]

    loaded = httpx.post(server.url + "/v1/adapters", json={"name": "beta"}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == "beta" and resident("beta")
    removed = httpx.delete(server.url + "/v1/adapters/beta", timeout=60)
    assert removed.status_code == 200 and removed.json()["deleted"] is True
    assert not resident("beta")


def test_health_and_metrics(server, client):
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "tiny-llama"}
    client.completions.create(model="alpha", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in ["rankwise_queue_length", "rankwise_tokens_per_s", "rankwise_resident_adapters", "rankwise_evictions_total"]:
        assert name in values, f"{name} missing from /metrics:\n{text}"
    assert values["rankwise_generated_tokens_total"] >= 3
    assert values['rankwise_http_responses_total{code="200"}'] >= 1
