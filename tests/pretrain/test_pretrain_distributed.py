"""`torchrun --nproc-per-node 2 -m rankwise pretrain` on the tiny config, gloo on CPU:
DDP equals one process with the combined batch; FSDP trains and matches DDP's loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rankwise.pretrain import PretrainConfig, pretrain

RUN = ["--config", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--warmup", "1",
       "--eval-tokens", "0", "--rank", "8", "--update-proj-gap", "2", "--lr", "3e-3"]  # fmt: skip


def run(out, *extra: str) -> dict:
    """2 processes of `rankwise pretrain`; the JSON result process 0 prints."""
    from distributed_run import torchrun  # here: this file also runs as a torchrun worker

    done = torchrun(["-m", "rankwise", "pretrain", *RUN, "--out", str(out), "--json", *extra], out=Path(out))
    return json.loads(done.stdout[done.stdout.index("{") :])


def fsdp_resume_worker(out: str) -> None:
    """Run under torchrun (this file as a script): 4 steps straight vs 2 steps, a checkpoint,
    a fresh sharded trainer loading it, 2 more steps; process 0 prints whether they are equal."""
    import torch
    import torch.distributed as dist

    from rankwise.pretrain import Trainer
    from rankwise.pretrain import checkpoint as ckpt
    from rankwise.pretrain.trainer import join_world

    world, _ = join_world()
    config = PretrainConfig(config="tiny", steps=4, batch_size=4, seq_len=32, warmup=1, eval_tokens=0, fsdp=True)
    straight = Trainer(config, world=world)
    for _ in range(4):
        straight.train_step()
    cut = Trainer(config, world=world)
    for _ in range(2):
        cut.train_step()
    model_state, optimizer_state, info = cut.state()
    if world.rank == 0:
        ckpt.save_checkpoint(Path(out), model_state, optimizer_state, info)
    dist.barrier()
    resumed = Trainer(config, world=world)
    model_state, optimizer_state, rng = ckpt.load_tensors(Path(out))
    resumed.load_state(model_state, optimizer_state, info, rng)
    for _ in range(2):
        resumed.train_step()
    a, b = straight.state()[0], resumed.state()[0]
    if world.rank == 0:
        print(json.dumps({"equal": all(torch.equal(a[k], b[k]) for k in a), "tensors": len(a)}))
    dist.destroy_process_group()


def test_fsdp_resume_is_bit_identical(tmp_path):
    from distributed_run import torchrun

    done = torchrun([__file__, str(tmp_path / "run")], out=tmp_path / "run")
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["tensors"] > 10 and result["equal"]


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
    result = run(tmp_path / "ddp", "--method", method)
    assert result["processes"] == 2 and result["steps"] == 3
    ddp = load_file(str(tmp_path / "ddp" / "checkpoint" / "model.safetensors"))
    reference = single(tmp_path, method)
    assert close(ddp, reference, 1e-5) < 1e-5
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]  # it trained


def test_fsdp_trains_and_matches_ddp(tmp_path):
    fsdp = run(tmp_path / "fsdp", "--method", "adamw", "--fsdp")
    assert fsdp["processes"] == 2 and fsdp["steps"] == 3
    reference = single(tmp_path, "adamw")  # = DDP (test above)
    sharded = load_file(str(tmp_path / "fsdp" / "checkpoint" / "model.safetensors"))
    assert close(sharded, reference, 1e-4) < 1e-4, "FSDP's gathered weights differ from DDP's"
    config = PretrainConfig(config="tiny", steps=3, batch_size=4, seq_len=32, warmup=1, eval_tokens=0, lr=3e-3)
    losses = [h["loss"] for h in pretrain(config).history]
    assert [h["loss"] for h in fsdp["history"]] == pytest.approx(losses, rel=1e-4)


if __name__ == "__main__":
    fsdp_resume_worker(sys.argv[1])
