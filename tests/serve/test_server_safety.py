"""Safety and limits of the HTTP server, with raw requests: authentication, adapter names that
try to leave the adapters folder, oversize bodies, bad requests, unknown models and a full
queue. Each bad request must get a 4xx with OpenAI's error body, and the server must go on
answering afterwards."""

from __future__ import annotations

import os
import time

import httpx
import openai
import pytest
from doc_commands import save_tiny_adapter

from rankwise.errors import ConfigError
from rankwise.serve import Engine, GenerationRequest, QueueFullError
from rankwise.serve.server import ServerThread, create_app

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 4000


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    save_tiny_adapter(root / "adapters" / "alpha", seed=1)
    save_tiny_adapter(root / "adapters" / "beta", seed=2)
    save_tiny_adapter(root / "outside" / "secret", seed=3)
    os.symlink(root / "outside" / "secret", root / "adapters" / "escape")
    return root / "adapters"


@pytest.fixture(scope="module")
def engine(adapters_dir):
    return Engine("tiny-llama", adapters_dir, max_batch_size=1, max_queue=1, max_prompt_tokens=32, max_new_tokens=600)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, api_key=KEY, max_body_bytes=BODY_LIMIT)) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c
        assert c.get("/health").status_code == 200, "the server stopped answering"


def check_error(response: httpx.Response, status: int, *, param: str | None = None, says: tuple[str, ...] = ()) -> dict:
    """A ``status`` answer with OpenAI's error body naming ``param`` and containing ``says``."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    for text in says:
        assert text in error["message"], error["message"]
    return error


def completion(**fields) -> dict:
    return {"model": "alpha", "prompt": "Hello", "max_tokens": 4, "temperature": 0, **fields}


# ----------------------------------------------------------------------------- authentication


def test_health_needs_no_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", KEY, "Bearer", f"Bearer {KEY}x"])
@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
def test_every_other_route_needs_the_key(server, header, path):
    headers = {"Authorization": header} if header else {}
    response = httpx.get(server.url + path, headers=headers)
    error = check_error(response, 401, says=("Authorization: Bearer",))
    assert error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer"


def test_posts_need_the_key_too(server):
    check_error(httpx.post(server.url + "/v1/completions", json=completion()), 401)
    check_error(httpx.post(server.url + "/v1/adapters", json={"name": "alpha"}), 401)


def test_the_openai_client_with_the_key(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list().data} >= {"alpha", "beta"}


def test_a_blank_key_is_refused(engine):
    with pytest.raises(ConfigError, match="api_key"):
        create_app(engine, api_key="  ")


# ----------------------------------------------------------------------------- adapter names


@pytest.mark.parametrize("name", ["../outside/secret", "/etc", "alpha/../../outside/secret", "escape", ".."])
def test_names_leaving_the_adapters_folder_are_refused(http, name):
    check_error(http.post("/v1/adapters", json={"name": name}), 400)
    resident = {m["id"] for m in http.get("/v1/models").json()["data"] if m["resident"]}
    assert name not in resident


@pytest.mark.parametrize("name", ["..%2Foutside%2Fsecret", "%2Fetc", "escape"])
def test_unload_with_a_path_is_refused(http, name):
    check_error(http.delete(f"/v1/adapters/{name}"), 400)


@pytest.mark.parametrize("model", ["../outside/secret", "/etc/passwd", "escape"])
def test_a_path_as_model_is_refused(http, model):
    response = http.post("/v1/completions", json=completion(model=model))
    assert response.status_code in (400, 404), response.text
    check_error(response, response.status_code)


def test_unknown_adapter_is_a_404_naming_the_known_ones(http, server, adapters_dir):
    answer = http.post("/v1/completions", json=completion(model="gamma"))
    error = check_error(answer, 404, param="model", says=("'gamma'", "tiny-llama", "alpha", "beta"))
    assert error["code"] == "model_not_found"
    assert str(adapters_dir) not in answer.text, "the server's folders are none of the client's business"
    check_error(http.post("/v1/adapters", json={"name": "gamma"}), 404, says=("alpha",))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


# ----------------------------------------------------------------------------- body and limits


def test_a_body_over_the_limit_is_a_413(http):
    big = completion(prompt="x" * (2 * BODY_LIMIT))
    check_error(http.post("/v1/completions", json=big), 413, says=("--max-body-bytes",))


def test_a_chunked_body_over_the_limit_is_a_413(http):
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    check_error(response, 413)


BAD_BODIES = {
    "not json": (b"{", None),
    "a list": (b"[1, 2]", None),
    "no model": ({"prompt": "Hi"}, "model"),
    "no prompt": ({"model": "alpha"}, "prompt"),
    "max_tokens 0": (completion(max_tokens=0), "max_tokens"),
    "max_tokens a word": (completion(max_tokens="ten"), "max_tokens"),
    "temperature 5": (completion(temperature=5), "temperature"),
    "top_p 0": (completion(top_p=0), "top_p"),
    "n 2": (completion(n=2), "n"),
    "logprobs": (completion(logprobs=2), "logprobs"),
    "echo": (completion(echo=True), "echo"),
    "five stops": (completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    "empty prompt list": (completion(prompt=[]), "prompt"),
    "token id too big": (completion(prompt=[1, 10**9]), "prompt"),
    "negative token id": (completion(prompt=[-1]), "prompt"),
}


@pytest.mark.parametrize("body,param", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_completion_requests_are_400(http, body, param):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    check_error(http.post("/v1/completions", **kwargs), 400, param=param)


BAD_CHATS = {
    "no messages": ({"model": "alpha", "messages": []}, "messages"),
    "unknown role": ({"model": "alpha", "messages": [{"role": "robot", "content": "hi"}]}, None),
    "tools": ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
}


@pytest.mark.parametrize("body,param", BAD_CHATS.values(), ids=BAD_CHATS.keys())
def test_bad_chat_requests_are_400(http, body, param):
    check_error(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_engine_limits_are_400_naming_the_limit(http):
    check_error(http.post("/v1/completions", json=completion(max_tokens=601)), 400, says=("600",))
    check_error(http.post("/v1/completions", json=completion(prompt="word " * 200)), 400, says=("32",))


def test_unknown_routes_and_methods_get_json_errors(http):
    check_error(http.get("/v1/nothing"), 404)
    check_error(http.get("/v1/completions"), 405)


def test_an_unexpected_failure_is_a_500_and_the_server_goes_on(http, engine, monkeypatch):
    def broken() -> list:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "models", broken)
    error = check_error(http.get("/v1/models"), 500)
    assert error["type"] == "server_error" and "disk on fire" not in error["message"]
    monkeypatch.undo()
    assert http.get("/v1/models").status_code == 200


def test_a_client_that_goes_away_frees_its_slot(server, engine):
    """Closing a stream mid-way cancels its request (the batch has one slot here)."""
    before = engine.metrics()["generated_tokens_total"]
    body = completion(max_tokens=600, stream=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert next(line for line in response.iter_lines() if line).startswith("data: ")
    deadline = time.monotonic() + 30
    while engine.metrics()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.metrics()["running"] == 0, "the abandoned request still runs"
    generated = engine.metrics()["generated_tokens_total"] - before
    assert generated < 600, "the abandoned request ran to its end instead of being cancelled"


def test_a_client_that_stops_waiting_frees_its_slot(server, engine):
    """The same for a plain (not streamed) request whose client times out."""
    before = engine.metrics()["generated_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=completion(max_tokens=600), headers=AUTH, timeout=0.25)  # 600 tiny-llama tokens take ~1 s on a quiet machine
    deadline = time.monotonic() + 30
    while engine.metrics()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.metrics()["running"] == 0, "the abandoned request still runs"
    assert engine.metrics()["generated_tokens_total"] - before < 600, "it ran to its end"


def test_a_full_queue_is_a_429_with_retry_after(http, engine):
    """The engine runs one request and queues one: a third is refused, until they are done."""
    handles = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # full: one request running, one waiting
        try:
            handles.append(engine.submit(GenerationRequest(model="alpha", prompt="Hello", max_tokens=600)))
        except QueueFullError:
            if engine.metrics()["running"] == 1:
                break
            time.sleep(0.02)  # the engine has not taken the first one into its batch yet
    else:
        pytest.fail("the engine never reported a full queue")
    response = http.post("/v1/completions", json=completion())
    check_error(response, 429, says=("retry",))
    assert int(response.headers["retry-after"]) >= 1
    for handle in handles:
        handle.cancel()
    for handle in handles:
        handle.result(timeout=60)
    assert http.post("/v1/completions", json=completion()).status_code == 200
