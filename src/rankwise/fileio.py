"""Writing files and output folders safely: one policy for every command that writes.

- :func:`check_output_dir` runs BEFORE any work: an existing non-empty folder is refused
  unless ``overwrite``; even then only a folder rankwise wrote is replaced (it carries
  :data:`MANIFEST`, or an adapter config with only adapter files beside it); a folder that
  holds anything else is refused naming one of those files. The parent must be writable,
  and ``--out`` may not be the current folder or one of its parents.
- :func:`output_dir` builds the folder in a hidden temporary sibling and renames it into
  place only when everything was written; the old folder is removed after the new one is in
  place. Temporary siblings left by a killed run are removed on the next run.
- :func:`atomic_write` writes one file through a temporary file and ``os.replace``.
- Everything written gets the user's normal permissions (``0666``/``0777`` minus umask),
  not the ``0600``/``0700`` of ``mkstemp``/``mkdtemp``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from rankwise.errors import CheckpointError

MANIFEST = "rankwise_output.json"
# Files PEFT (or any adapter tool) writes into an adapter folder; such a folder may be replaced.
ADAPTER_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md", "adapter.safetensors"}
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything under it) the user's default permissions."""
    mask = _umask()
    root = Path(path)
    if root.is_dir():
        os.chmod(root, 0o777 & ~mask)
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)
    else:
        os.chmod(root, 0o666 & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    final = Path(path)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def write_json(path: str | os.PathLike, payload: object) -> Path:
    """Atomically write ``payload`` as indented JSON (checked to serialise before writing)."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _foreign_entry(folder: Path) -> str | None:
    """The first entry of ``folder`` that rankwise did not write there, or None if it owns all."""
    entries = sorted(p.name for p in folder.iterdir())
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            owned = set(json.loads(manifest.read_text()).get("files", [])) | {MANIFEST}
        except (OSError, ValueError, AttributeError):
            owned = {MANIFEST}
        return next((e for e in entries if e not in owned), None)
    if "adapter_config.json" in entries:
        return next((e for e in entries if e not in ADAPTER_FILES), None)
    return entries[0] if entries else None


def _is_live_temp(name: str) -> bool:
    """Temporary siblings are named ``.<out>.tmp.<pid>.<random>``; live if that pid runs."""
    parts = name.split(".tmp.", 1)
    pid = parts[1].split(".", 1)[0] if len(parts) == 2 else ""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temps(final: Path) -> None:
    if not final.parent.is_dir():
        return
    for sibling in sorted(final.parent.glob(f".{final.name}.tmp.*")):
        if not sibling.is_dir() or _is_live_temp(sibling.name):
            continue
        if sibling.name.endswith(".old") and not final.exists():
            os.replace(sibling, final)  # killed between the two renames: put the old folder back
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _writable(folder: Path) -> bool:
    """Whether a folder can be created in ``folder`` (asked of the file system, not guessed)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".rankwise-probe."))
    except OSError:
        return False
    return True


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, option: str = "--out") -> Path:
    """Validate an output folder before any work; returns its absolute path.

    Raises :class:`~rankwise.errors.CheckpointError` naming the problem and the fix.
    """
    final = Path(path).expanduser().absolute()
    resolved = final.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise CheckpointError(
            f"{option} {str(path)!r} is the current folder or one of its parents; name a new folder "
            "for the output (e.g. --out my-model)"
        )
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"{option} {str(path)!r} exists and is not a folder; choose another {option}")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"output folder {str(path)!r} already exists and is not empty; pass overwrite=True "
                f"(--overwrite) to replace it, or choose another {option}"
            )
        foreign = _foreign_entry(final)
        if foreign is not None:
            raise CheckpointError(
                f"output folder {str(path)!r} holds files rankwise did not write (e.g. {foreign!r}); "
                f"--overwrite only replaces rankwise's own output: choose another {option}"
            )
    parent = final.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not _writable(existing):
        raise CheckpointError(
            f"cannot write {option} {str(path)!r}: {str(existing)!r} is not a writable folder"
        )
    if parent.exists() and final.is_dir() and not os.access(final, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {option} {str(path)!r}: the folder is not writable")
    _clean_stale_temps(final)
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an old ``final`` is removed only after the new one is in place."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f".{final.name}.tmp.{os.getpid()}.old"
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_dir(
    path: str | os.PathLike, *, overwrite: bool = False, kind: str = "output", option: str = "--out"
) -> Iterator[Path]:
    """Build an output folder atomically: ``with output_dir(out) as tmp: <write into tmp>``.

    The folder is checked again (:func:`check_output_dir`), written to a hidden sibling,
    given :data:`MANIFEST` (what rankwise wrote, so ``--overwrite`` can later replace it) and
    the user's permissions, then renamed into place. An exception leaves nothing behind.
    """
    from rankwise import __version__

    final = check_output_dir(path, overwrite=overwrite, option=option)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp.{os.getpid()}."))
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        write_json(tmp / MANIFEST, {"written_by": f"rankwise {__version__}", "kind": kind, "files": files})
        apply_umask(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["MANIFEST", "check_output_dir", "output_dir", "atomic_write", "write_json", "apply_umask"]
