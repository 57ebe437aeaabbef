"""Load test of `rankwise serve` over real HTTP: concurrent clients, many adapters, 3 rounds.

The server is started as a user starts it (`rankwise serve --port 0`, a subprocess bound to
127.0.0.1) with a folder of LoRA adapters of mixed ranks (8-64; random non-zero weights).
Concurrent clients (asyncio + httpx, one process) send a bounded number of requests per
round, cycling through the base model and every adapter, completions and chat, streamed and
not, greedy and seeded sampling. A warm-up round (one request per model, not counted) loads
every adapter first. Per round: failed requests (anything but a 200 with a complete answer;
streams must end with `data: [DONE]`), generated tokens/s end to end, p50/p99 request
latency, and the server's resident memory (VmRSS) after the round: it must not grow from
round to round. The server is then stopped with SIGTERM and must exit 0.

    .venv/bin/python bench/serve_http.py [--quick]

--quick: tiny-llama, 8 adapters, 16 clients, 48 requests per round (well under a minute);
full: SmolLM2-135M, 32 adapters, 32 clients, 96 requests per round. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import markdown_table, write_results  # noqa: E402
from doc_commands import ServeProcess, rankwise_script  # noqa: E402 - the tests' server launcher

RANKS = (8, 16, 32, 64)
QUICK_RANKS = (4, 8, 16, 32)  # tiny-llama's v_proj has 32 outputs
MAX_TOKENS = 16
PROMPTS = [
    "The weather today is",
    "To reset your password, open the settings page and",
    "A short story about a lighthouse keeper:",
    "def fibonacci(n):",
    "The three most important things about a good API are",
    "Translate to French: good morning, how are you?",
]
ROUNDS = 3
RSS_GROWTH_LIMIT = 0.05  # a round may add at most 5% of resident memory


def make_adapters(model_name: str, folder: Path, count: int, ranks: tuple[int, ...]) -> list[str]:
    """``count`` LoRA adapters on q_proj/v_proj with ranks cycling through ``ranks``, saved in
    ``folder`` (PEFT format); returns their names."""
    from rankwise import load_model
    from rankwise.adapters import attach, delete, save_adapter

    model, _ = load_model(model_name)
    generator = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        name, rank = f"adapter-{i:03d}", ranks[i % len(ranks)]
        attach(model, "lora", targets=["q_proj", "v_proj"], name=name, rank=rank)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.requires_grad and f".{name}." in pname:
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        save_adapter(model, folder / name, name=name)
        delete(model, name)
        names.append(name)
    return names


def request_for(i: int, models: list[str]) -> tuple[str, dict, bool]:
    """The i-th request: (path, body, streamed); cycles models, endpoints, streaming, sampling."""
    model, prompt = models[i % len(models)], PROMPTS[i % len(PROMPTS)]
    stream = (i // len(models)) % 2 == 1
    sampling = {"temperature": 0} if i % 3 else {"temperature": 0.8, "seed": i}
    body = {"model": model, "max_tokens": MAX_TOKENS, "stream": stream, **sampling}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if i % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}, stream
    return "/v1/completions", {**body, "prompt": prompt}, stream


async def one_request(client: httpx.AsyncClient, path: str, body: dict, stream: bool) -> tuple[bool, int, str]:
    """(ok, completion tokens, what went wrong)."""
    try:
        if not stream:
            response = await client.post(path, json=body)
            if response.status_code != 200:
                return False, 0, f"HTTP {response.status_code}: {response.text[:200]}"
            return True, response.json()["usage"]["completion_tokens"], ""
        tokens, last = 0, ""
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return False, 0, f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                if not line:
                    continue
                last = line
                if line != "data: [DONE]":
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:
                        return False, 0, chunk["error"]["message"]
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return last == "data: [DONE]" and tokens > 0, tokens, "" if last == "data: [DONE]" else "stream cut short"
    except httpx.HTTPError as e:
        return False, 0, f"{type(e).__name__}: {e}"


async def run_round(url: str, models: list[str], requests: int, clients: int, offset: int) -> dict:
    """``requests`` requests from ``clients`` concurrent clients; counts, throughput, latency."""
    queue = list(range(offset, offset + requests))
    latencies, tokens, failures = [], 0, []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            path, body, stream = request_for(queue.pop(0), models)
            t0 = time.perf_counter()
            ok, n, problem = await one_request(client, path, body, stream)
            latencies.append(time.perf_counter() - t0)
            tokens += n
            if not ok:
                failures.append(problem)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": requests,
        "failed": len(failures),
        "failures": failures[:5],
        "generated_tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def engine_metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=60).text
    pairs = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 8 adapters, 48 requests per round")
    args = parser.parse_args()
    model = "tiny-llama" if args.quick else "smollm2"
    load_before = os.getloadavg()[0]
    n_adapters, clients, per_round = (8, 16, 48) if args.quick else (32, 32, 96)
    ranks = QUICK_RANKS if args.quick else RANKS

    with tempfile.TemporaryDirectory(prefix="rankwise-serve-http-") as tmp:
        names = make_adapters(model, Path(tmp), n_adapters, ranks)
        command = [*rankwise_script(), "serve", "--model", model, "--adapters", tmp, "--port", "0",
                   "--log-level", "warning", "--max-batch-size", str(clients), "--max-tokens", str(MAX_TOKENS)]  # fmt: skip
        server = ServeProcess(command, timeout=600)
        with server:
            assert server.url.startswith("http://127.0.0.1:"), server.url
            models = [model, *names]
            warmup = asyncio.run(run_round(server.url, models, len(models), clients, 0))
            rounds = []
            for r in range(ROUNDS):
                result = asyncio.run(run_round(server.url, models, per_round, clients, (r + 1) * per_round))
                result["rss_bytes"] = rss_bytes(server.process.pid)
                rounds.append(result)
                print(f"round {r + 1}: {json.dumps({k: v for k, v in result.items() if k != 'failures'})}", flush=True)
            metrics = engine_metrics(server.url)
        exit_code = server.returncode

    failed = warmup["failed"] + sum(r["failed"] for r in rounds)
    growth = max(rounds[i + 1]["rss_bytes"] / rounds[i]["rss_bytes"] - 1 for i in range(ROUNDS - 1))
    passed = failed == 0 and growth <= RSS_GROWTH_LIMIT and exit_code == 0
    payload = {
        "quick": args.quick,
        "model": model,
        "adapters": n_adapters,
        "ranks": list(ranks),
        "clients": clients,
        "requests_per_round": per_round,
        "max_tokens": MAX_TOKENS,
        "warmup": warmup,
        "rounds": rounds,
        "max_rss_growth_per_round": growth,
        "server_metrics": metrics,
        "exit_code_after_sigterm": exit_code,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "passed": passed,
    }
    rows = [
        [i + 1, r["requests"], r["failed"], round(r["tokens_per_s"], 1), r["p50_latency_s"], r["p99_latency_s"],
         int(r["rss_bytes"] / 2**20)]
        for i, r in enumerate(rounds)
    ]  # fmt: skip
    table = markdown_table(
        ["round", "requests", "failed", "generated tokens/s", "p50 latency (s)", "p99 latency (s)", "server RSS (MiB)"], rows
    )
    markdown = (
        f"### `rankwise serve` under load over HTTP{' (--quick)' if args.quick else ''}\n\n"
        f"`bench/serve_http.py{' --quick' if args.quick else ''}`: `rankwise serve --model {model}` with "
        f"{n_adapters} LoRA adapters (ranks {', '.join(map(str, ranks))}), {clients} concurrent clients on "
        f"127.0.0.1, {per_round} requests per round cycling through the base model and every adapter, "
        f"completions and chat, streamed and not, {MAX_TOKENS} new tokens each, after a warm-up round "
        f"that loads every adapter.\n\n{table}\n\n"
        f"Failed requests: {failed}. Largest RSS growth from one round to the next: {100 * growth:+.1f}% "
        f"(limit {100 * RSS_GROWTH_LIMIT:.0f}%). Exit code after SIGTERM: {exit_code}. "
        f"{'Passed.' if passed else 'FAILED.'} The machine was shared (1-minute load average "
        f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores): "
        "the absolute speed is the machine's, the failures and memory are the server's."
    )
    write_results("serve_http", payload, markdown)
    print(markdown)
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
