"""``rankwise serve`` as a user runs it: a subprocess on a free port, requests over HTTP, an
API key from the environment, and a SIGTERM that lets the request in flight finish and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading

import httpx
import pytest
from doc_commands import ServeProcess, rankwise_script, save_tiny_adapter


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    save_tiny_adapter(root / "support-bot", seed=1)
    return root


def serve(*args: str) -> list[str]:
    return [*rankwise_script(), "serve", "--model", "tiny-llama", "--port", "0", "--log-level", "warning", *args]


def test_help_explains_the_options():
    result = subprocess.run([*rankwise_script(), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ["--adapters", "--api-key", "RANKWISE_API_KEY", "--max-queue", "--max-body-bytes", "127.0.0.1"]:
        assert option in result.stdout


def test_serves_with_a_key_from_the_environment_and_exits_0_on_sigterm(adapters_dir):
    env = {**os.environ, "RANKWISE_API_KEY": "from-env"}
    with ServeProcess(serve("--adapters", str(adapters_dir)), env=env) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(server.url + "/v1/models").status_code == 401
        headers = {"Authorization": "Bearer from-env"}
        ids = {m["id"] for m in httpx.get(server.url + "/v1/models", headers=headers).json()["data"]}
        assert ids == {"tiny-llama", "support-bot"}
        body = {"model": "support-bot", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        answer = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    assert server.returncode == 0, server.stderr[-3000:]
    assert "from-env" not in "".join(server.stdout) + server.stderr


def test_sigterm_lets_the_request_in_flight_finish(adapters_dir):
    events: list[str] = []
    started = threading.Event()

    def stream(url: str) -> None:
        body = {"model": "support-bot", "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    with ServeProcess(serve("--adapters", str(adapters_dir), "--max-tokens", "400")) as server:
        reader = threading.Thread(target=stream, args=(server.url,))
        reader.start()
        assert started.wait(60), "no event arrived"
        server.process.send_signal(signal.SIGTERM)
        at_sigterm = len(events)
        server.stop()
        reader.join(120)
    assert server.returncode == 0, server.stderr[-3000:]
    assert events[-1] == "data: [DONE]" and len(events) > at_sigterm + 1
    reasons = [c["finish_reason"] for e in events[:-1] for c in json.loads(e[6:])["choices"]]
    assert reasons[-1] == "length", "the request was cut off instead of finishing"


def test_a_taken_port_fails_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        command = [*rankwise_script(), "serve", "--model", "smollm2", "--port", port]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_adapters_folder_is_refused(tmp_path):
    result = subprocess.run(serve("--adapters", str(tmp_path / "nope")), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--adapters" in result.stderr


def test_which_hosts_count_as_this_machine_only():
    from rankwise.serve.listen import is_loopback

    assert all(is_loopback(h) for h in ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "::", "192.168.1.10", "example.org"])


def test_bind_names_the_option_to_change():
    from rankwise.errors import ConfigError
    from rankwise.serve.listen import bind, url_of

    with pytest.raises(ConfigError, match="--port"):
        bind("127.0.0.1", 70000)
    with pytest.raises(ConfigError, match="--host"):
        bind("no-such-host.invalid", 0)
    sock = bind("127.0.0.1", 0)
    try:
        assert url_of(sock).startswith("http://127.0.0.1:") and not url_of(sock).endswith(":0")
    finally:
        sock.close()


def test_a_bad_dtype_is_refused_before_the_model_loads():
    result = subprocess.run(serve("--dtype", "float64"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--dtype must be one of float32, bfloat16, float16" in result.stderr
