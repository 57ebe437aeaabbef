"""Shared plumbing for the benchmark scripts: timing, machine facts, writing results.

Each script in bench/ writes ``bench/results/<name>.json`` and replaces its own section of
``docs/benchmarks.md`` (between ``<!-- bench:<name> -->`` markers), so scripts never
overwrite each other's tables and no number is typed by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
DOC_HEADER = (
    "# Benchmarks\n\n"
    "Every table below is written by a script in `bench/` (never by hand). Each script runs "
    "rankwise and its peers on the same inputs in the same process, interleaved, and reports "
    "medians. Re-run one with `.venv/bin/python bench/<name>.py` (add `--quick` for a "
    "sub-minute run).\n"
)


def machine() -> dict:
    """Facts about where a benchmark ran, recorded beside its numbers."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def timeit(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 5) -> dict[str, float]:
    """Median time of each function, running them round-robin so drift hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, with the user's umask (rankwise.fileio's rule)."""
    from rankwise.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_results(name: str, payload: dict, markdown: str) -> None:
    """Save ``payload`` as JSON and put ``markdown`` in this benchmark's section of the doc."""
    payload = {"benchmark": name, "machine": machine(), **payload}
    _atomic_write(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    m = payload["machine"]
    where = (
        f"_Run on {m['date']}: {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"{m['torch_threads']} threads, Python {m['python']}._\n"
    )
    section = f"{start}\n{markdown.rstrip()}\n\n{where}{end}"
    # benchmarks running at the same time each replace their own section: lock the
    # read-modify-write so one never writes back a copy without the other's new section
    with open(DOC.with_name(".benchmarks.md.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_section(section, start, end)


def _replace_section(section: str, start: str, end: str) -> None:
    doc = DOC.read_text() if DOC.exists() else DOC_HEADER
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        tail = rest.split(end, 1)[1]
        doc = head + section + tail
    else:
        doc = doc.rstrip() + "\n\n" + section + "\n"
    _atomic_write(DOC, doc)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
