"""The docs' examples that talk to a running server (``curl`` lines and ```python blocks
addressed to http://127.0.0.1:8000, see ``needs_server`` in tests/doc_commands.py) run here
against a started one: tiny-llama with tiny stand-ins for the adapters the page trains, the
address replaced by the test server's. tests/test_docs.py runs the page's other blocks."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import pytest
from doc_commands import (
    DOC_SERVER_URL,
    PAGES,
    for_tests_python,
    needs_server,
    python_blocks,
    shell_lines,
    write_served_adapters,
)

from rankwise.serve import Engine
from rankwise.serve.server import ServerThread, create_app


def server_examples(page) -> tuple[list[str], list[str]]:
    """The page's shell lines and Python blocks that need the server, in page order."""
    return [line for _, line in shell_lines(page) if needs_server(line)], [b for b in python_blocks(page) if needs_server(b)]


PAGES_WITH_SERVER = [p for p in PAGES if any(server_examples(p))]


def check_curl_output(line: str, out: str) -> None:
    """JSON without an error, server-sent events ending with [DONE], or Prometheus text."""
    if out.startswith("data: "):
        events = [e for e in out.split("\n") if e]
        assert events[-1] == "data: [DONE]", out
        for event in events[:-1]:
            assert "error" not in json.loads(event.removeprefix("data: ")), event
    elif "/metrics" in line:
        assert "rankwise_generated_tokens_total" in out
    else:
        assert "error" not in json.loads(out), out


def test_the_serve_page_has_server_examples():
    assert [p.name for p in PAGES_WITH_SERVER] == ["serve.md"]
    lines, blocks = server_examples(PAGES_WITH_SERVER[0])
    assert any(line.startswith("curl") for line in lines) and blocks


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("page", PAGES_WITH_SERVER, ids=lambda p: p.name)
def test_server_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    served = write_served_adapters([page], tmp_path)
    folder = tmp_path / next(iter(served)) if served else None
    lines, blocks = server_examples(page)
    with ServerThread(create_app(Engine("tiny-llama", folder, max_new_tokens=64))) as server:
        for line in lines:
            command = shlex.split(for_tests_python(line).replace(DOC_SERVER_URL, server.url))
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"`{line}` failed: {result.stderr[-2000:]}"
            check_curl_output(line, result.stdout)
        namespace: dict = {"__name__": "__docs__"}
        for i, block in enumerate(blocks):
            code = for_tests_python(block).replace(DOC_SERVER_URL, server.url)
            exec(compile(code, f"{page.name}[server block {i}]", "exec"), namespace)
