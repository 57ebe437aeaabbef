"""rankwise.pretrain on the tiny config: training lowers the loss, resume is bit-identical,
a checkpoint of another run is refused, NaN/Inf steps are skipped and counted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rankwise.errors import CheckpointError, ConfigError
from rankwise.pretrain import PretrainConfig, Trainer, pretrain


def tiny(**options) -> PretrainConfig:
    base = dict(
        config="tiny", steps=6, batch_size=2, seq_len=32, warmup=2, rank=8, update_proj_gap=2,
        eval_every=3, eval_tokens=128, checkpoint_every=2,
    )  # fmt: skip
    return PretrainConfig(**{**base, **options})


class Interrupt(Exception):
    pass


def stop_after(n: int):
    def hook(trainer, record):
        if trainer.step == n:
            raise Interrupt

    return hook


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize(
    "method, project_embeddings",
    [("adamw", False), ("galore", False), ("dct", False), ("sltrain", False), ("galore", True), ("sltrain", True)],
)
def test_resumed_run_is_bit_identical(tmp_path, method, project_embeddings):
    config = tiny(method=method, project_embeddings=project_embeddings)
    whole = pretrain(config, tmp_path / "whole")
    with pytest.raises(Interrupt):
        pretrain(config, tmp_path / "cut", on_step=stop_after(3))  # last checkpoint: step 2
    saved = json.loads((tmp_path / "cut" / "checkpoint" / "trainer.json").read_text())
    assert saved["step"] == 2
    resumed = pretrain(config, tmp_path / "cut", resume=True)
    assert resumed.steps == whole.steps == 6
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert resumed.val_perplexity == whole.val_perplexity
    opt_a = torch.load(tmp_path / "whole" / "checkpoint" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "cut" / "checkpoint" / "optimizer.pt", weights_only=True)
    for s_a, s_b in zip(opt_a["optimizer"]["state"].values(), opt_b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(s_a[k], s_b[k]) for k in s_a if torch.is_tensor(s_a[k]))


def test_training_lowers_loss_and_reports_memory(tmp_path):
    result = pretrain(tiny(method="adamw", steps=12, lr=3e-3, eval_tokens=0), tmp_path / "run")
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    params = sum(p.numel() * 4 for p in Trainer(tiny()).model.parameters())
    assert result.weight_bytes >= params
    assert 2 * params <= result.optimizer_state_bytes <= 2 * params + 4096  # two moments + step counters
    logged = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert logged["steps"] == 12 and logged["history"][-1]["tokens_per_second"] > 0


def test_projected_state_is_smaller_than_adamw():
    adamw = Trainer(tiny(method="adamw"))
    galore = Trainer(tiny(method="galore", rank=4), data=adamw.data)
    for t in (adamw, galore):
        t.train_step()
    assert galore.optimizer_state_bytes() < 0.8 * adamw.optimizer_state_bytes()


def test_resume_with_other_options_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny(method="galore", steps=2), out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoint").iterdir()}
    with pytest.raises(CheckpointError) as e:
        pretrain(tiny(method="dct", steps=2, rank=4), out, resume=True)
    assert "method: 'galore' in the checkpoint, 'dct' now" in str(e.value)
    assert "rank: 8 in the checkpoint, 4 now" in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoint").iterdir()} == before
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        pretrain(tiny(), tmp_path / "empty", resume=True)


def test_resume_with_another_embedding_setting_is_refused(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny(method="galore", steps=2), out)
    with pytest.raises(CheckpointError, match="project_embeddings: False in the checkpoint, True now"):
        pretrain(tiny(method="galore", steps=4, project_embeddings=True), out, resume=True)


def test_a_checkpoint_predating_project_embeddings_resumes_as_without_it(tmp_path):
    from rankwise.pretrain.checkpoint import check_identity

    current = tiny(method="galore").identity()
    old = {k: v for k, v in current.items() if k != "project_embeddings"}
    check_identity(old, current, tmp_path)  # no error: it ran without projected embeddings
    with pytest.raises(CheckpointError, match="project_embeddings"):
        check_identity(old, tiny(method="galore", project_embeddings=True).identity(), tmp_path)


@pytest.mark.parametrize("method", ["galore", "frugal", "sltrain"])
def test_project_embeddings_gives_the_embedding_rank_sized_state(method):
    plain = Trainer(tiny(method=method))
    asked = Trainer(tiny(method=method, project_embeddings=True), data=plain.data)
    for t in (plain, asked):
        t.train_step()
    name = "model.embed_tokens.weight"
    rules = asked.optimizer.rules
    assert rules[name] == "svd r=8 (right)", rules[name]
    emb = asked.model.model.embed_tokens.weight
    vocab, d = emb.shape
    assert asked.optimizer.state[emb]["exp_avg"].shape == (vocab, 8)
    assert asked.optimizer.state[emb]["proj_right"].shape == (d, 8)
    # only the embedding's state changed: 2·vocab·(d - 8) floats fewer, plus the d × 8 basis
    saved = plain.optimizer_state_bytes() - asked.optimizer_state_bytes()
    assert saved == 4 * (2 * vocab * (d - 8) - d * 8)
    if method == "sltrain":  # the converted layers still train with plain AdamW
        assert all(r.startswith("adamw") for n, r in rules.items() if n != name)


def test_project_embeddings_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="--method galore --project-embeddings"):
        Trainer(tiny(method="adamw", project_embeddings=True))
    with pytest.raises(ConfigError, match="without --fsdp"):
        Trainer(tiny(method="sltrain", fsdp=True, project_embeddings=True))
    with pytest.raises(ConfigError, match="project_embeddings must be True or False"):
        tiny(project_embeddings="yes")


def test_existing_out_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny(steps=2), out)
    with pytest.raises(CheckpointError, match="--overwrite"):
        pretrain(tiny(steps=2), out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="notes.txt"):
        pretrain(tiny(steps=2), tmp_path / "mine", overwrite=True)
    assert pretrain(tiny(steps=2), out, overwrite=True).steps == 2


def test_non_finite_gradient_skips_the_step(tmp_path):
    trainer = Trainer(tiny(method="galore", eval_tokens=0))
    p = trainer.model.model.layers[0].mlp.up_proj.weight
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    handle = p.register_hook(lambda g: torch.full_like(g, math.nan))
    record = trainer.train_step()
    handle.remove()
    assert record.skipped and trainer.skipped_steps == 1 and trainer.step == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert not trainer.train_step().skipped


def test_bad_method_and_options_name_the_fix():
    with pytest.raises(ConfigError, match="valid: adamw, .*galore.*sltrain"):
        Trainer(tiny(method="galroe"))
    with pytest.raises(ConfigError, match="llama-20m"):
        tiny(config="llama-2m")
    with pytest.raises(ConfigError, match="seq_len"):
        tiny(seq_len=4096)
    with pytest.raises(ConfigError, match="torchrun"):
        Trainer(tiny(fsdp=True))
    with pytest.raises(ConfigError, match="DDP"):
        Trainer(tiny(method="galore", fsdp=True))


def test_a_layer_types_penalty_is_part_of_the_training_objective():
    """Maestro's group lasso, weighted, pulls the factors' tail norms down against the same
    run without it (same data, same seed): the loop adds rankwise.layers.penalty to the loss."""
    runs = {}
    for weight in (0.0, 0.05):
        trainer = Trainer(tiny(method="maestro", steps=4, method_options={"penalty_weight": weight}))
        for _ in range(4):
            trainer.train_step()
        lasso = sum(m.group_lasso() for m in trainer.model.modules() if hasattr(m, "group_lasso"))
        runs[weight] = float(lasso)
    assert runs[0.05] < runs[0.0]
