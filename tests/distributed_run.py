"""Run a 2-process ``torchrun`` job from a test, once more after a failure that is not ours.

Two such failures were seen: the probed free port taken before torchrun binds it, and a gloo
process aborting inside torch's C++ ("terminate called without an active exception": once in
the CI run of 2026-11-30; 0 of 50 reruns here, loaded or not). A run failing either way is
repeated once, with a new port and, if given, a fresh output folder; a second failure, or any
other failure, fails the test with the job's stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

NOT_OURS = ("terminate called without an active exception", "address already in use", "EADDRINUSE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """``cmd`` in its own session; on timeout the whole session is killed (torchrun's workers
    too, which killing the launcher alone leaves running), then TimeoutExpired is raised."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun(args: list[str], *, out: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2 ... args`` on 127.0.0.1 with one
    thread per process; returns the finished process (asserting exit code 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANKWISE_PROGRESS": "0"}
    for attempt in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *args,
        ]  # fmt: skip
        done = _run(cmd, env, timeout)
        if done.returncode == 0 or attempt or not any(s in done.stderr for s in NOT_OURS):
            break
        if out is not None and out.exists():
            shutil.rmtree(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
