"""What the docs show, made runnable on the test machine (shared by tests/test_docs.py and
tests/cli/test_documented_commands.py).

The docs use the embedded SmolLM2 model and full-size runs; tests use the tiny random models
and a few steps/tokens. This module finds the examples in README.md and docs/*.md and holds
the one mapping from "as documented" to "as tested":

- :data:`TEST_MODELS`: embedded model name -> tiny model of the same kind;
- :data:`TEST_LIMITS`: per subcommand, options set to small values (only those the
  subcommand has, so a new command needs an entry only to be fast).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

TEST_MODELS = {"smollm2": "tiny-llama", "minilm": "tiny-bert"}
TEST_LIMITS: dict[str, dict[str, str]] = {
    "eval": {"--max-tokens": "256", "--seq-len": "32", "--batch-size": "2"},
    "compress": {"--calib-tokens": "512", "--eval-tokens": "256", "--decode-tokens": "4", "--seq-len": "32"},
    "finetune": {"--steps": "3", "--seq-len": "32", "--batch-size": "2", "--eval-tokens": "0"},
    "generate": {"--max-new-tokens": "4", "--max-tokens": "4"},
    "analyze": {"--texts": "2", "--max-tokens": "32", "--gradient-tokens": "16", "--intrinsic-steps": "2"},
    "heal": {"--steps": "2", "--seq-len": "32", "--eval-tokens": "256"},
    "serve": {"--port": "0", "--log-level": "warning"},
    "pretrain": {"--config": "tiny", "--steps": "3", "--batch-size": "2", "--seq-len": "32", "--eval-tokens": "128", "--warmup": "1"},
}
# Where the docs' server listens (`rankwise serve ... --port 8000`): Python blocks and curl lines
# that talk to it are run by tests/serve/test_server_docs.py against a started server, with
# this address replaced by the test server's; tests/test_docs.py leaves those blocks to it.
DOC_SERVER_URL = "http://127.0.0.1:8000"

PYTHON_FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console|zsh)\n(.*?)^```", flags=re.S | re.M)
ANY_FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
# How a documented line may start the command: `rankwise ...`, `.venv/bin/rankwise ...`,
# `python -m rankwise ...` (a leading `$ ` prompt is dropped).
LAUNCHERS = (("rankwise",), (".venv/bin/rankwise",), ("python", "-m", "rankwise"), ("python3", "-m", "rankwise"))


@dataclass(frozen=True)
class DocCommand:
    """One ``rankwise`` command line from a page: ``args`` are what follows ``rankwise``."""

    page: str
    line: int
    text: str
    args: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"

    @property
    def subcommand(self) -> str | None:
        return next((a for a in self.args if not a.startswith("-")), None)

    def option(self, *names: str) -> str | None:
        """The value given to option ``names`` (last one wins), or None."""
        return option_value(self.args, *names)


def rankwise_script() -> list[str]:
    """The console script installed beside this Python (``python -m rankwise`` if none)."""
    import sys

    script = Path(sys.executable).with_name("rankwise")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rankwise"]


def python_blocks(page: Path) -> list[str]:
    return PYTHON_FENCE.findall(page.read_text())


def needs_server(code: str) -> bool:
    """The block or command line talks to the documented server (run with one started)."""
    return DOC_SERVER_URL in code or "localhost:8000" in code


def served_adapters(pages: list[Path] = PAGES) -> dict[str, list[str]]:
    """For each ``--adapters`` folder of a documented ``rankwise serve`` line, the adapter names
    the documented commands write into it (``--out <folder>/<name>``)."""
    commands = documented_commands(pages)
    found: dict[str, list[str]] = {}
    for serve in (c for c in commands if c.subcommand == "serve"):
        folder = serve.option("--adapters", "-a")
        if folder is None:
            continue
        outs = [Path(c.option("--out")) for c in commands if c.option("--out")]
        found[folder] = [out.name for out in outs if out.parent == Path(folder)]
    return found


def write_served_adapters(pages: list[Path], cwd: Path) -> dict[str, list[str]]:
    """Tiny stand-ins (:func:`save_tiny_adapter`) for the adapters the pages' documented
    commands would train into their servers' ``--adapters`` folders (one named ``example``
    when the pages train none there); returns folder -> names."""
    written = {}
    for folder, names in served_adapters(pages).items():
        written[folder] = names or ["example"]
        for seed, name in enumerate(written[folder]):
            if not (cwd / folder / name).exists():
                save_tiny_adapter(cwd / folder / name, seed=seed)
    return written


def for_tests_python(code: str) -> str:
    """A documented Python block with the embedded models' names replaced by tiny ones."""
    for name, tiny in TEST_MODELS.items():
        code = re.sub(rf"""(["']){re.escape(name)}\1""", rf"\g<1>{tiny}\g<1>", code)
    return code


def _shell_lines(block: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, text) of a shell block, continuation lines (``\\``) joined, comments dropped."""
    lines: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(block.splitlines()):
        number, text = (pending[0], pending[1] + " " + raw.strip()) if pending else (first_line + offset, raw.strip())
        if text.endswith("\\"):
            pending = (number, text[:-1].rstrip())
            continue
        pending = None
        words = shlex.split(text.removeprefix("$ "), comments=True)
        if words:
            lines.append((number, shlex.join(words)))
    return lines


def _launcher_args(words: list[str]) -> list[str] | None:
    for launcher in LAUNCHERS:
        if tuple(words[: len(launcher)]) == launcher:
            return words[len(launcher) :]
    return None


def shell_lines(page: Path) -> list[tuple[int, str]]:
    """Every command line of the page's shell blocks, with its line number."""
    text = page.read_text()
    found = []
    for m in SHELL_FENCE.finditer(text):
        first = text.count("\n", 0, m.start(1)) + 1
        found += _shell_lines(m.group(1), first)
    return found


def documented_commands(pages: list[Path] = PAGES) -> list[DocCommand]:
    """Every ``rankwise`` command line in the shell blocks of ``pages``, in document order."""
    commands = []
    for page in pages:
        for number, line in shell_lines(page):
            args = _launcher_args(shlex.split(line))
            if args is not None:
                commands.append(DocCommand(page.name, number, line, tuple(args)))
    return commands


def torchrun_lines(pages: list[Path] = PAGES) -> list[str]:
    """Documented ``torchrun`` lines: several processes, not run by the tests."""
    return [f"{p.name}:{n}: {line}" for p in pages for n, line in shell_lines(p) if line.startswith("torchrun")]


def inline_commands(pages: list[Path] = PAGES) -> list[DocCommand]:
    """``rankwise <subcommand> --option ...`` written inline in prose (outside code blocks):
    often abbreviated (no --out, ``...``), so tests only check their options exist."""
    commands = []
    for page in pages:
        text = page.read_text()
        prose = ANY_FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for m in INLINE_CODE.finditer(prose):
            span = " ".join(m.group(1).split())
            if not span.startswith("rankwise ") or " -" not in span:
                continue
            args = [a for a in shlex.split(span)[1:] if a not in ("...", "…")]
            commands.append(DocCommand(page.name, prose.count("\n", 0, m.start()) + 1, span, tuple(args)))
    return commands


def option_value(args: tuple[str, ...] | list[str], *names: str) -> str | None:
    value = None
    for i, a in enumerate(args):
        key, eq, inline = a.partition("=")
        if key in names:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def _set_option(args: list[str], names: tuple[str, ...], value: str) -> list[str]:
    """``args`` with every occurrence of option ``names`` set to ``value`` (appended if absent)."""
    out, found, i = [], False, 0
    while i < len(args):
        key, eq, _ = args[i].partition("=")
        if key in names:
            out += [names[0], value]
            found = True
            i += 1 if eq else 2
            continue
        out.append(args[i])
        i += 1
    return out if found else [*out, names[0], value]


def for_tests(args: tuple[str, ...], command) -> list[str]:
    """A documented command's arguments as the tests run them.

    ``command`` is the subcommand's click command (its options say what can be set): embedded
    models become tiny ones (also when the model is left at its default), and the
    :data:`TEST_LIMITS` of the subcommand are applied.
    """
    out = [TEST_MODELS.get(a, a) for a in args]
    if command is None:
        return out
    sub = args[0] if args and not args[0].startswith("-") else None
    for param in command.params:
        names = tuple(n for n in (*param.opts, *param.secondary_opts) if n.startswith("-"))
        default = param.default if isinstance(param.default, str) else None
        if default in TEST_MODELS and option_value(out, *names) is None:
            out = _set_option(out, names, TEST_MODELS[default])
        limit = next((v for k, v in TEST_LIMITS.get(sub, {}).items() if k in names), None)
        if limit is not None:
            out = _set_option(out, names, limit)
    return out


def write_sample_text(path: Path) -> None:
    """A text file (``*.txt`` path) or a folder of three text files standing in for a user's
    own text (standard-library docstrings: plain English, deterministic per Python version)."""
    import collections
    import json
    import pathlib

    docs = [inspect_text(m) for m in (collections, json, pathlib)]
    if path.suffix == ".txt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(docs), encoding="utf-8")
        return
    path.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (path / f"part{i}.txt").write_text(text, encoding="utf-8")


def inspect_text(module) -> str:
    """A module's docstring followed by its public members' docstrings."""
    import inspect

    parts = [inspect.getdoc(module) or ""]
    for name, member in sorted(vars(module).items()):
        if not name.startswith("_") and (doc := inspect.getdoc(member)):
            parts.append(f"{name}: {doc}")
    return "\n\n".join(parts)


def save_tiny_adapter(folder: Path, *, seed: int = 0, rank: int = 4, method: str = "lora") -> Path:
    """A trained-looking adapter (random non-zero weights) for ``tiny-llama``, saved to
    ``folder``: stands in for the folders ``rankwise finetune --out`` writes, in seconds."""
    import torch

    from rankwise.adapters import attach, save_adapter
    from rankwise.models import tiny_llama

    model, _ = tiny_llama()
    attach(model, method, targets=["q_proj", "v_proj"], rank=rank)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return save_adapter(model, folder)


class ServeProcess:
    """``rankwise serve ARGS`` started as a user would (a subprocess; ``--port 0`` picks a free
    port), with the URL it prints, ``/health`` probed until it answers, and a SIGTERM stop::

        with ServeProcess([*launcher, "serve", "--model", "tiny-llama", "--port", "0"]) as server:
            httpx.get(server.url + "/v1/models")
        assert server.returncode == 0
    """

    URL = re.compile(r"http://[^\s)]+")

    def __init__(self, command: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 180) -> None:
        self.command, self.cwd, self.env, self.timeout = command, cwd, env, timeout
        self.url: str | None = None
        self.returncode: int | None = None
        self.stdout: list[str] = []
        self.stderr = ""

    def __enter__(self) -> ServeProcess:
        import subprocess
        import threading

        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._err.start()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.stdout.append(line)
            if self.url is None and (m := self.URL.search(line)):
                self.url = m.group(0).rstrip(".,")

    def _read_stderr(self) -> None:
        self.stderr = self.process.stderr.read()

    def _wait_healthy(self) -> None:
        import time

        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._err.join(5)
                raise AssertionError(f"rankwise serve exited with {self.process.returncode}:\n{self.stderr[-3000:]}")
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"rankwise serve did not answer /health within {self.timeout} s")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.returncode = self.process.wait()
        self._err.join(5)
        return self.returncode

    def __exit__(self, *exc) -> None:
        if self.returncode is None:
            self.stop()
