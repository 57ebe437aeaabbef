"""Every ``rankwise`` command line shown in README.md and docs/*.md runs, end to end.

The command lines are read from the pages' shell blocks (a new line is a new test), made
small for the test machine by ``tests/doc_commands.py`` (tiny models, few steps and tokens)
and run through the installed console script in a temporary folder. Each test checks what
a user would: exit code 0; ``--json`` output parses; progress shows up in a log (stderr is a
pipe here); an ``--out`` folder holds the files its manifest lists and loads back
(``rankwise.load_model`` for a compressed model, ``load_adapter`` and ``peft.PeftModel`` for
an adapter, which must change the base model's outputs). A command that reads a folder an
earlier documented command writes (``eval --model smollm2-80``) gets that folder first (from
the earlier test when it ran in this process, else by running its command).
Prose mentions (``rankwise compress --list-methods`` inline) are often abbreviated, so for
those only the subcommand and option names are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from doc_commands import (
    PAGES,
    DocCommand,
    ServeProcess,
    documented_commands,
    for_tests,
    inline_commands,
    option_value,
    rankwise_script,
    torchrun_lines,
    write_sample_text,
    write_served_adapters,
)

import rankwise
from rankwise.cli import build_command

COMMANDS = documented_commands()
CLI = build_command()
QUICK_FLAGS = {"--help", "-h", "--list-methods"}
SHOWS_PROGRESS = {"eval", "compress", "finetune", "heal"}
READS_FOLDER = (("--model", "-m"), ("--adapter",))
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def command_of(doc: DocCommand):
    return CLI.commands.get(doc.subcommand) if doc.subcommand else CLI


def args_for_test(doc: DocCommand) -> list[str]:
    return for_tests(doc.args, CLI.commands.get(doc.subcommand) if doc.subcommand else None)


def producer_of(folder: str) -> DocCommand | None:
    return next((c for c in COMMANDS if c.option("--out") == folder), None)


class Outputs:
    """The ``--out`` folders documented commands wrote in this test session, copied into the
    folder of a later command that reads them (instead of running their command again)."""

    def __init__(self, root: Path) -> None:
        self.root, self.folders = root, {}

    def keep(self, doc: DocCommand, folder: Path) -> None:
        if doc not in self.folders:
            self.folders[doc] = self.root / str(len(self.folders))
            shutil.copytree(folder, self.folders[doc])

    def place(self, doc: DocCommand, cwd: Path) -> bool:
        if doc not in self.folders:
            return False
        shutil.copytree(self.folders[doc], cwd / doc.option("--out"))
        return True


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> Outputs:
    return Outputs(tmp_path_factory.mktemp("documented-outputs"))


def prepare_inputs(doc: DocCommand, cwd: Path, outputs: Outputs) -> None:
    """Create the user's text (``--data my_texts/``) and the folders this command reads,
    written by the documented commands that make them."""
    data = option_value(args_for_test(doc), "--data", "-d")
    if data and data != "builtin" and not (cwd / data).exists():
        write_sample_text(cwd / data)
    for producer in prerequisites(doc):
        folder = cwd / producer.option("--out")
        if folder.exists() or outputs.place(producer, cwd):
            continue
        result = run(producer, cwd, outputs)
        assert result.returncode == 0, f"`{producer.text}` (needed first) failed:\n{result.stderr[-3000:]}"
        outputs.keep(producer, folder)


def run(doc: DocCommand, cwd: Path, outputs: Outputs) -> subprocess.CompletedProcess:
    prepare_inputs(doc, cwd, outputs)
    env = {**os.environ, "RANKWISE_PROGRESS": "1"}  # on, as for a user; stderr is not a TTY
    return subprocess.run(
        [*rankwise_script(), *args_for_test(doc)], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
    )


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_compressed(folder: Path) -> None:
    """Loads back with its low-rank layers, as small as the report says, and runs."""
    from rankwise.models import count_parameters

    model, tokenizer = rankwise.load_model(folder)
    report = json.loads((folder / "report.json").read_text())
    assert count_parameters(model) == report["parameters"]["after"]
    assert torch.isfinite(logits(model, tokenizer)).all()


def check_adapter(folder: Path, base: str) -> None:
    """Attaches to a fresh base model and changes its outputs; a PEFT-format folder also
    loads in PEFT, with the same outputs."""
    from rankwise.adapters import load_adapter

    model, tokenizer = rankwise.load_model(base)
    before = logits(model, tokenizer)
    load_adapter(model, folder)
    after = logits(model, tokenizer)
    assert not torch.allclose(before, after, rtol=0, atol=1e-7), "the saved adapter changes nothing"
    config = json.loads((folder / "adapter_config.json").read_text())
    if "peft_type" in config:
        from peft import PeftModel

        fresh, _ = rankwise.load_model(base)
        in_peft = logits(PeftModel.from_pretrained(fresh, folder), tokenizer)
        torch.testing.assert_close(in_peft, after, rtol=1e-4, atol=1e-5)


def check_output_folder(folder: Path, args: list[str]) -> None:
    """The folder holds the files its manifest lists, every JSON file parses, and a model or
    adapter loads back (kind from the manifest, else from the marker files)."""
    assert folder.is_dir() and any(folder.iterdir()), f"--out {folder.name}: no folder written"
    manifest = folder / "rankwise_output.json"
    listed = json.loads(manifest.read_text()) if manifest.exists() else {}
    missing = [f for f in listed.get("files", []) if not (folder / f).exists()]
    assert not missing, f"files listed in {manifest.name} are missing: {missing}"
    for path in folder.glob("*.json"):
        json.loads(path.read_text())
    kind = listed.get("kind")
    if kind == "compressed" or (folder / "rankwise_compressed.json").exists():
        check_compressed(folder)
    elif kind == "adapter" or (folder / "adapter_config.json").exists():
        check_adapter(folder, option_value(args, "--model", "-m") or "tiny-llama")


def prerequisites(doc: DocCommand) -> list[DocCommand]:
    """The documented commands that write the folders ``doc`` reads (``--model``, ``--adapter``)."""
    folders = [doc.option(*names) for names in READS_FOLDER]
    found = [producer_of(f) for f in folders if f]
    return [p for p in found if p is not None and p != doc]


def is_slow(doc: DocCommand) -> bool:
    """Over ~20 s on two shared cores even with tiny settings: compressing, training,
    anything reading the built-in corpus (assembling it alone takes ~10 s), or needing one
    of those first."""
    if QUICK_FLAGS & set(doc.args):
        return False
    if any(is_slow(p) for p in prerequisites(doc)):
        return True
    if doc.subcommand not in SHOWS_PROGRESS:
        return False
    return doc.subcommand != "eval" or doc.option("--data", "-d") in (None, "builtin")


def params(commands: list[DocCommand]):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if is_slow(c) else []) for c in commands]


def test_the_docs_show_commands():
    assert {c.subcommand for c in COMMANDS} >= {"eval", "compress", "finetune"}


def test_reading_shell_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Intro `rankwise eval --model smollm2 --json` in prose.\n\n"
        "```bash\n"
        "make demo\n"
        "$ rankwise compress --model smollm2 \\\n"
        "    --out 'my model'   # a comment\n"
        "torchrun --nproc_per_node 2 -m rankwise finetune --steps 5\n"
        "python -m rankwise info\n"
        "```\n"
        "```\nrankwise compress: not a shell block\n```\n"
    )
    commands = documented_commands([page])
    assert [(c.line, c.args) for c in commands] == [
        (5, ("compress", "--model", "smollm2", "--out", "my model")),
        (8, ("info",)),
    ]
    assert commands[0].option("--out") == "my model"
    assert torchrun_lines([page]) == ["page.md:7: torchrun --nproc_per_node 2 -m rankwise finetune --steps 5"]
    assert [(c.line, c.args) for c in inline_commands([page])] == [(1, ("eval", "--model", "smollm2", "--json"))]


def test_commands_made_small_for_tests():
    finetune = for_tests(("finetune", "-m", "smollm2", "--steps", "100", "--out", "x"), CLI.commands["finetune"])
    assert option_value(finetune, "--model", "-m") == "tiny-llama"
    assert option_value(finetune, "--steps") == "3" and finetune.count("--steps") == 1
    assert option_value(finetune, "--eval-tokens") == "0" and option_value(finetune, "--out") == "x"
    # a model left at its default (smollm2) becomes the tiny one too
    listing = for_tests(("compress", "--list-methods"), CLI.commands["compress"])
    assert option_value(listing, "--model", "-m") == "tiny-llama"
    assert option_value(listing, "--calib-tokens") == "512"


def starts_a_server(doc: DocCommand) -> bool:
    return doc.subcommand == "serve" and not QUICK_FLAGS & set(doc.args)


def check_server(doc: DocCommand, cwd: Path, outputs: Outputs) -> None:
    """A documented ``rankwise serve`` line (on a free port): it answers /health, lists the
    adapters of its folder (tiny stand-ins for those the docs train), completes a request
    with one of them, and exits 0 on SIGTERM."""
    import httpx

    prepare_inputs(doc, cwd, outputs)
    args = args_for_test(doc)
    served = write_served_adapters([p for p in PAGES if p.name == doc.page], cwd)
    names = served.get(doc.option("--adapters", "-a"), [])
    key = option_value(args, "--api-key")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with ServeProcess([*rankwise_script(), *args], cwd=cwd) as server:
        cards = httpx.get(server.url + "/v1/models", headers=headers, timeout=60).json()["data"]
        assert {c["id"] for c in cards} >= set(names), cards
        model = names[0] if names else next(c["id"] for c in cards if c["kind"] == "base")
        body = {"model": model, "prompt": PROBE_TEXT, "max_tokens": 2}
        answer = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
    assert server.returncode == 0, f"exit {server.returncode} after SIGTERM:\n{server.stderr[-3000:]}"


def test_a_documented_server_is_started_on_a_free_port():
    serve = for_tests(("serve", "--model", "smollm2", "--adapters", "adapters", "--port", "8000"), CLI.commands["serve"])
    assert option_value(serve, "--port", "-p") == "0" and option_value(serve, "--model", "-m") == "tiny-llama"
    doc = DocCommand("page.md", 1, "rankwise serve", ("serve", "--port", "8000"))
    assert starts_a_server(doc) and not starts_a_server(DocCommand("page.md", 2, "", ("serve", "--help")))


@pytest.mark.parametrize("doc", params(COMMANDS))
def test_documented_command(doc, tmp_path, outputs):
    if starts_a_server(doc):
        return check_server(doc, tmp_path, outputs)
    args = args_for_test(doc)
    result = run(doc, tmp_path, outputs)
    assert result.returncode == 0, f"rankwise {' '.join(args)} -> exit {result.returncode}\n{result.stderr[-3000:]}"
    if "--json" in args:
        json.loads(result.stdout)
    quiet = {"--json", "--help", "-h", "--list-methods"} & set(args)
    if doc.subcommand in SHOWS_PROGRESS and not quiet:
        assert "[rankwise] " in result.stderr, "no progress lines in a log (stderr not a terminal)"
    out = doc.option("--out")
    if out:
        check_output_folder(tmp_path / out, args)
        outputs.keep(doc, tmp_path / out)


@pytest.mark.parametrize("doc", inline_commands(), ids=lambda c: c.id)
def test_inline_command_options_exist(doc):
    command = command_of(doc)
    assert command is not None, f"no subcommand {doc.subcommand!r}"
    known = {n for p in [*command.params, *CLI.params] for n in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    unknown = [a.partition("=")[0] for a in doc.args if a.startswith("-") and a.partition("=")[0] not in known]
    assert not unknown, f"`{doc.text}`: {doc.subcommand or 'rankwise'} has no option {unknown}"
