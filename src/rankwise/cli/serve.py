"""``rankwise serve``: one base model and a folder of adapters behind an OpenAI-compatible
HTTP server (see docs/serve.md)."""

from __future__ import annotations

import os
import signal

import typer

from rankwise.errors import ConfigError

API_KEY_ENV = "RANKWISE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _exit_cleanly(signum, frame) -> None:
    """SIGTERM before the server runs, and re-raised by uvicorn after its graceful shutdown:
    a requested stop, so exit code 0."""
    raise SystemExit(0)


def serve_command(
    model: str = typer.Option("smollm2", "--model", "-m", help="Base model: smollm2, tiny-llama, a local Hugging Face or compressed folder, or a .gguf file."),
    adapters: str = typer.Option(None, "--adapters", "-a", help="Folder of adapter folders (PEFT or rankwise format, as `rankwise finetune --out` writes them); a request's `model` names one of them. Adapters load only from here."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default is reachable from this machine only; use --api-key when opening it further."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on (0: any free port; the URL is printed)."),
    api_key: str = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True, help="Require 'Authorization: Bearer <key>' on every route but /health (prefer the environment variable: command lines are visible to other users)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option(None, "--dtype", help="Run the base model in float32, bfloat16 or float16 (default: as loaded). bfloat16 is about 3x faster on CPUs with AMX/AVX-512 BF16 and halves the memory; adapters stay float32."),
    max_batch_size: int = typer.Option(64, "--max-batch-size", min=1, help="Requests decoded together in one batch."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Requests waiting beyond the batch; more get HTTP 429 with Retry-After."),
    memory_budget: str = typer.Option(None, "--memory-budget", help="Memory for resident adapters and the KV cache, e.g. 2GB or 512MiB (least recently used adapters are evicted); default: the engine's."),
    max_prompt_tokens: int = typer.Option(2048, "--max-prompt-tokens", min=1, help="Longer prompts are refused (HTTP 400)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Largest max_tokens a request may ask for (HTTP 400 beyond); also the default of chat requests."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="Larger request bodies are refused (HTTP 413)."),
    served_name: str = typer.Option(None, "--served-name", help="The name requests use for the base model (default: --model)."),
    shutdown_timeout: float = typer.Option(30.0, "--shutdown-timeout", min=0.0, help="On SIGTERM or Ctrl+C, seconds to let in-flight requests finish before cancelling them."),
    log_level: str = typer.Option("info", "--log-level", help=f"Server log level: {', '.join(LOG_LEVELS)}."),
) -> None:
    """Serve a base model and its adapters over HTTP with OpenAI's API (/v1/completions,
    /v1/chat/completions, /v1/models), plus /v1/adapters, /health and /metrics.

    Stops on SIGTERM or Ctrl+C after in-flight requests finish (exit code 0 on SIGTERM).
    """
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if api_key is not None and not api_key.strip():
        raise ConfigError(f"--api-key (or {API_KEY_ENV}) is empty; give a key or leave it unset")
    dtypes = ("float32", "bfloat16", "float16")
    if dtype is not None and dtype not in dtypes:
        raise ConfigError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    budget = None
    if memory_budget is not None:
        from rankwise.compress.api import parse_size

        budget = parse_size(memory_budget)
    if adapters is not None and not os.path.isdir(adapters):
        raise ConfigError(f"--adapters {adapters!r} is not a folder; give the folder that holds the adapter folders")
    import torch
    import uvicorn

    from rankwise.serve.listen import bind, is_loopback, url_of

    signal.signal(signal.SIGTERM, _exit_cleanly)
    sock = bind(host, port)
    if not is_loopback(host) and api_key is None:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who reaches this port can use the model", err=True)
    from rankwise.serve import Engine
    from rankwise.serve.server import create_app

    engine = Engine(
        model, adapters, device=device, max_batch_size=max_batch_size, max_queue=max_queue,
        memory_budget_bytes=budget, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_tokens,
        base_name=served_name, dtype=None if dtype is None else getattr(torch, dtype),
    )  # fmt: skip
    app = create_app(
        engine, api_key=api_key, max_body_bytes=max_body_bytes, default_max_tokens=max_tokens,
        shutdown_timeout=shutdown_timeout,
    )  # fmt: skip
    names = [m["id"] for m in engine.models() if m.get("kind") == "adapter"]
    typer.echo(f"serving {engine.base_name} and {len(names)} adapter(s) on {url_of(sock)} (OpenAI API at {url_of(sock)}/v1)", err=False)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
