"""`torchrun --nproc-per-node 2 -m rankwise pretrain` on the tiny config, gloo on CPU:
DDP equals one process with the combined batch; FSDP trains and matches DDP's loss."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from rankwise.pretrain import PretrainConfig, pretrain

RUN = ["--config", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--warmup", "1",
       "--eval-tokens", "0", "--rank", "8", "--update-proj-gap", "2", "--lr", "3e-3"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, *extra: str) -> dict:
    """Run 2 processes (bounded in time); the JSON result process 0 prints."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "rankwise", "pretrain", *RUN, "--out", str(out), "--json", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANKWISE_PROGRESS": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def single(tmp_path, method: str) -> dict:
    config = PretrainConfig(
        config="tiny", method=method, steps=3, batch_size=4, seq_len=32, warmup=1, eval_tokens=0,
        rank=8, update_proj_gap=2, lr=3e-3,
    )  # fmt: skip
    pretrain(config, tmp_path / f"single-{method}")
    return load_file(str(tmp_path / f"single-{method}" / "checkpoint" / "model.safetensors"))


def close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) if a else 0.0


@pytest.mark.parametrize("method", ["adamw", "galore"])
def test_ddp_equals_one_process_with_the_combined_batch(tmp_path, method):
    result = torchrun(tmp_path / "ddp", "--method", method)
    assert result["processes"] == 2 and result["steps"] == 3
    ddp = load_file(str(tmp_path / "ddp" / "checkpoint" / "model.safetensors"))
    reference = single(tmp_path, method)
    assert close(ddp, reference, 1e-5) < 1e-5
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]  # it trained


def test_fsdp_trains_and_matches_ddp(tmp_path):
    fsdp = torchrun(tmp_path / "fsdp", "--method", "adamw", "--fsdp")
    assert fsdp["processes"] == 2 and fsdp["steps"] == 3
    reference = single(tmp_path, "adamw")  # = DDP (test above)
    sharded = load_file(str(tmp_path / "fsdp" / "checkpoint" / "model.safetensors"))
    assert close(sharded, reference, 1e-4) < 1e-4, "FSDP's gathered weights differ from DDP's"
    config = PretrainConfig(config="tiny", steps=3, batch_size=4, seq_len=32, warmup=1, eval_tokens=0, lr=3e-3)
    losses = [h["loss"] for h in pretrain(config).history]
    assert [h["loss"] for h in fsdp["history"]] == pytest.approx(losses, rel=1e-4)
