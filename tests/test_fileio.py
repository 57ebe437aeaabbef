"""The one output-folder policy (rankwise/fileio.py): refuse what rankwise did not write,
check before work, build in a temporary sibling, user permissions, stale temp cleanup."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rankwise.errors import CheckpointError
from rankwise.fileio import MANIFEST, atomic_write, check_output_dir, output_dir, write_json


def write_output(path: Path, files: dict[str, str], *, overwrite: bool = False) -> Path:
    with output_dir(path, overwrite=overwrite, kind="test") as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return path


def test_new_folder_is_written_with_manifest(tmp_path):
    out = write_output(tmp_path / "out", {"a.txt": "1", "b.txt": "2"})
    assert (out / "a.txt").read_text() == "1"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == ["a.txt", "b.txt"] and manifest["kind"] == "test"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left


def test_existing_nonempty_folder_is_refused_without_overwrite(tmp_path):
    out = write_output(tmp_path / "out", {"a.txt": "1"})
    with pytest.raises(CheckpointError, match="--overwrite"):
        check_output_dir(out)


def test_overwrite_replaces_only_rankwise_output(tmp_path):
    out = write_output(tmp_path / "out", {"a.txt": "1"})
    write_output(out, {"c.txt": "3"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["c.txt", MANIFEST]


def test_overwrite_refuses_a_folder_with_user_files_and_keeps_them(tmp_path):
    user = tmp_path / "u"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    (user / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match="sub|thesis.txt"):
        write_output(user, {"a.txt": "1"}, overwrite=True)
    assert (user / "thesis.txt").read_text() == "years of work"
    assert (user / "sub" / "data.csv").read_text() == "1,2"


def test_overwrite_refuses_rankwise_output_with_a_foreign_file_added(tmp_path):
    out = write_output(tmp_path / "out", {"a.txt": "1"})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        check_output_dir(out, overwrite=True)


def test_peft_adapter_folder_may_be_replaced(tmp_path):
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"x")
    assert check_output_dir(peft, overwrite=True) == peft.absolute()


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    out = write_output(tmp_path / "empty", {"a.txt": "1"})
    assert (out / "a.txt").exists()


def test_current_folder_and_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for path in (".", "..", str(work)):
        with pytest.raises(CheckpointError, match="current folder"):
            check_output_dir(path)


def test_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        check_output_dir(tmp_path / "f", overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_parent_is_refused_before_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="not a writable folder"):
            check_output_dir(ro / "out")
    finally:
        ro.chmod(0o755)


def test_read_only_parent_is_refused_as_root_too(tmp_path, monkeypatch):
    """os.access is what the check asks; as root it says yes, so simulate the answer."""
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ro)
    with pytest.raises(CheckpointError, match="not a writable folder"):
        check_output_dir(ro / "out")


def test_failure_while_writing_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_overwriting_keeps_the_old_folder(tmp_path):
    out = write_output(tmp_path / "out", {"a.txt": "old"})
    with pytest.raises(RuntimeError):
        with output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temp_of_a_killed_run_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp.{dead.stdout.strip()}.abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.tmp.{os.getpid()}.xyz"  # a run in progress (this process)
    live.mkdir()
    write_output(tmp_path / "out", {"a.txt": "1"})
    assert not stale.exists() and live.exists()


def test_old_folder_of_a_run_killed_between_renames_is_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".out.tmp.{dead.stdout.strip()}.old"
    old.mkdir()
    (old / "a.txt").write_text("old")
    check_output_dir(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"


def test_permissions_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        out = write_output(tmp_path / "out", {"a.txt": "1"})
        single = atomic_write(tmp_path / "single.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(single.stat().st_mode) == 0o644


def test_write_json_refuses_unserialisable_payload_before_writing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"f": object()})
    assert list(tmp_path.iterdir()) == []
