"""Every ```python block in README.md and docs/*.md runs (blocks of one page share a namespace,
in page order). Compressing SmolLM2 takes minutes, so those examples run here on the tiny
Llama instead (same code path); `make demo` runs the SmolLM2 one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(page)):
        block = block.replace('compress("smollm2"', 'compress("tiny-llama"')
        exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
