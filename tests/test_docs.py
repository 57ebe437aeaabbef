"""Every ```python block in README.md and docs/*.md runs (blocks of one page share a namespace,
in page order). The embedded models' names become the tiny models' (the mapping of
tests/doc_commands.py, shared with the documented-commands test): compressing SmolLM2 takes
minutes, the tiny Llama runs the same code path; `make demo` runs the SmolLM2 one.

Blocks that talk to the documented HTTP server (``needs_server``) are run by
tests/serve/test_server_docs.py against a started server, not here; the adapters a page's
``rankwise serve`` line serves are written first (tiny stand-ins), as a reader would have
trained them with the page's commands."""

from __future__ import annotations

import re

import pytest
from doc_commands import (
    PAGES,
    ROOT,
    for_tests_python,
    needs_server,
    python_blocks,
    write_served_adapters,
)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    write_served_adapters([page], tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(page)):
        if needs_server(block):
            continue  # run by tests/serve/test_server_docs.py, with a server
        exec(compile(for_tests_python(block), f"{page.name}[block {i}]", "exec"), namespace)


def test_python_rewrite_uses_tiny_models():
    code = 'compress("smollm2", out="smollm2-80")\nload_model(\'minilm\')\nload_model("smollm2x")'
    assert for_tests_python(code) == (
        'compress("tiny-llama", out="smollm2-80")\nload_model(\'tiny-bert\')\nload_model("smollm2x")'
    )


def layout_paths(readme=PAGES[0]) -> list[str]:
    """The paths named in README's "Layout" block, relative to the repository: a line's leading
    words that end in ``/`` or ``.py``; indented lines are inside the last unindented folder."""
    section = readme.read_text().split("\n## Layout\n", 1)[1]
    block = re.search(r"^```\n(.*?)^```", section, flags=re.S | re.M).group(1)
    paths, parent = [], ""
    for line in block.splitlines():
        names = []
        for word in line.split():
            if not word.endswith(("/", ".py")):
                break
            names.append(word)
        if line[:1].isspace():
            paths += [parent + n for n in names]
        elif names:
            parent = names[0]
            paths += names
    return paths


def test_layout_names_existing_paths():
    paths = layout_paths()
    assert "src/rankwise/models.py" in paths and "tests/" in paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_layout_names_every_module_of_the_package():
    package = ROOT / "src" / "rankwise"
    modules = {f"src/rankwise/{p.name}" for p in package.glob("*.py") if not p.name.startswith("_")}
    packages = {f"src/rankwise/{p.parent.name}/" for p in package.glob("*/__init__.py")}
    unnamed = sorted((modules | packages) - set(layout_paths()))
    assert not unnamed, f"README Layout does not name: {unnamed} (add a line saying what each is)"
