"""rankwise.optim: the shared projected Adam update and the optimizers built on it."""

from __future__ import annotations

import copy
import io
import logging
import warnings

import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.optim import (
    PROJECTORS,
    DCTAdamW,
    FrugalAdamW,
    GaLoreAdamW,
    GradNormLoRPAdamW,
    ProjectedAdamW,
)
from rankwise.optim.galore import SVDProjector

PROJECTED = [GaLoreAdamW, DCTAdamW, FrugalAdamW, ProjectedAdamW]
ALL = [*PROJECTED, GradNormLoRPAdamW]


class Net(nn.Module):
    """Embedding -> Linear (wide) -> LayerNorm -> Linear (tall) -> head: every rule."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.up = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)
        self.down = nn.Linear(9, 5)
        self.head = nn.Linear(5, 11, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.norm(torch.tanh(self.up(self.emb(ids))))))

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (4, 7), generator=g)
    target = (3 * ids + 1) % 11  # a fixed token map: learnable position by position
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("cls", PROJECTED)
def test_full_rank_identity_projector_equals_torch_adamw(cls):
    torch.manual_seed(0)
    ref = Net()
    ours = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), **HYPER)
    opt = cls(ours, projector="identity", rank=9, embeddings=True, **HYPER)
    assert sum(" r=" in r for r in opt.rules.values()) == 4  # emb, up, down, head projected
    train(ref, opt_ref, 6)
    train(ours, opt, 6)
    for (name, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_gradnormlorp_identity_equals_adamw_on_weight_norm():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ref = copy.deepcopy(plain)
    for i in (0, 2):
        weight_norm(ref[i], dim=0)
    opt_ref = torch.optim.AdamW(ref.parameters(), **HYPER)
    opt = GradNormLoRPAdamW(plain, projector="identity", rank=8, **HYPER)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    for model, o in ((ref, opt_ref), (plain, opt)):
        for _ in range(6):
            o.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            o.step()
    for i in (0, 2):
        torch.testing.assert_close(plain[i].weight, ref[i].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain[i].bias, ref[i].bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW, GradNormLoRPAdamW])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_projected_update_lies_in_the_subspace(cls, proj_type):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(12, 7))
    opt = cls([W], rank=3, proj_type=proj_type, update_proj_gap=100, scale=0.5, lr=0.1)
    for step in range(3):
        before = W.detach().clone()
        W.grad = torch.randn(12, 7, generator=torch.Generator().manual_seed(step))
        if cls is GradNormLoRPAdamW:  # the direction moves in the subspace, not W itself
            vnorm, g = opt.state[W].get("wn_norm"), opt.state[W].get("wn_g")
            before = before * (vnorm / g).unsqueeze(1) if vnorm is not None else before
        opt.step()
        after = W.detach()
        if cls is GradNormLoRPAdamW:
            st = opt.state[W]
            after = after * (st["wn_norm"] / st["wn_g"]).unsqueeze(1)
            # the step minus weight-norm rescaling: compare directions via V = ‖V‖·W/g
        proj = PROJECTORS.get(opt.param_groups[0]["projector"])(
            opt.state[W], (12, 7), rank=3, proj_type=proj_type
        )
        delta = after - before
        for side in proj.sides:
            P = proj.basis(side, delta)
            assert P.shape[1] == 3
            torch.testing.assert_close(P.mT @ P, torch.eye(3), atol=1e-5, rtol=0)
            outside = delta - P @ (P.mT @ delta) if side == "left" else delta - (delta @ P) @ P.mT
            assert float(outside.norm()) < 1e-4 * float(delta.norm())


def test_galore_subspace_matches_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(40, 40, generator=g)).Q
    V = torch.linalg.qr(torch.randn(24, 24, generator=g)).Q
    s = torch.cat([torch.tensor([10.0, 8, 6, 5]), torch.full((20,), 0.1)])
    grad = (U[:, :24] * s) @ V.mT
    for shape_grad in (grad, grad.mT):  # tall: right side; wide: left side
        a = nn.Parameter(torch.zeros_like(shape_grad))
        b = nn.Parameter(torch.zeros_like(shape_grad))
        group = {"rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}
        theirs = galore_torch.GaLoreAdamW([{"params": [a], **group}], lr=0.1)
        ours = GaLoreAdamW([{"params": [b], **group}], lr=0.1)
        a.grad, b.grad = shape_grad.clone(), shape_grad.clone()
        theirs.step()
        ours.step()
        Pt = theirs.state[a]["projector"].ortho_matrix
        Pt = Pt.mT if Pt.shape[0] == 4 else Pt  # galore-torch stores (r, N) on the right
        side = "right" if shape_grad.shape[0] >= shape_grad.shape[1] else "left"
        Po = ours.state[b][f"proj_{side}"]
        torch.testing.assert_close(Po @ Po.mT, Pt @ Pt.mT, atol=1e-4, rtol=0)
        # Both steps lie in the same subspace with the same scale (moments start at zero,
        # so the first step's size is lr·scale per coordinate in either basis's frame).
        torch.testing.assert_close(b.norm(), a.norm(), rtol=0.05, atol=0)


@pytest.mark.parametrize("cls", ALL)
def test_tiny_task_loss_drops(cls):
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, lr=2e-2, rank=3, update_proj_gap=10)
    losses = train(model, opt, 60)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trip_with_weights_only(cls, tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, lr=1e-2, rank=3, update_proj_gap=2)
    train(model, opt, 3)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    clone = copy.deepcopy(model)
    loaded = torch.load(path, weights_only=True)
    opt2 = cls(clone, lr=1e-2, rank=3, update_proj_gap=2)
    opt2.load_state_dict(loaded)
    train(model, opt, 4, start=3)
    train(clone, opt2, 4, start=3)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", ALL)
def test_nonfinite_gradient_skips_the_step_and_counts_it(cls, bad, caplog):
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, lr=1e-2, rank=3)
    train(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_of(model, 5).backward()
    model.up.weight.grad[0, 0] = bad
    with caplog.at_level(logging.WARNING, logger="rankwise.optim"):
        opt.step()
    assert opt.skipped_steps == 1
    assert "non-finite gradient" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.state_dict()["state"]
    for k, st in state["state"].items():
        for key, t in st.items():
            assert torch.equal(t, after[k][key]), key
    train(model, opt, 1, start=6)  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_refreshes_are_staggered_and_timed(monkeypatch):
    seen: list[tuple[int, int]] = []
    renew = SVDProjector._renew

    def spy(self, grad, step):
        seen.append((self.phase, step))
        renew(self, grad, step)

    monkeypatch.setattr(SVDProjector, "_renew", spy)
    params = [nn.Parameter(torch.randn(8, 6)) for _ in range(4)]
    opt = GaLoreAdamW(params, rank=2, update_proj_gap=4)
    for _ in range(9):
        for p in params:
            p.grad = torch.randn(8, 6)
        opt.step()
    phases = sorted({phase for phase, _ in seen})
    assert phases == [0, 1, 2, 3]
    for phase in phases:
        steps = [s for ph, s in seen if ph == phase]
        expected = sorted({0} | {s for s in range(9) if s % 4 == phase})
        assert steps == expected
    per_step = [sum(1 for _, s in seen if s == t) for t in range(1, 9)]
    assert max(per_step) == 1  # after the first step, never two layers at once
    assert opt.refresh_count == len(seen) and opt.refresh_seconds > 0
    no_stagger = GaLoreAdamW(
        [nn.Parameter(torch.randn(8, 6)) for _ in range(3)], rank=2, stagger=False
    )
    assert set(no_stagger._phase.values()) == {0}


def test_rank_too_large_uses_full_rank_and_warns_once():
    params = [
        nn.Parameter(torch.randn(8, 6)),
        nn.Parameter(torch.randn(5, 7)),
        nn.Parameter(torch.randn(30, 20)),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = GaLoreAdamW(params, rank=10)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "2 parameter(s)" in msgs[0] and "(8, 6)" in msgs[0]
    assert "full rank" in msgs[0]
    assert list(opt.rules.values()) == ["svd r=6 (right)", "svd r=5 (left)", "svd r=10 (right)"]
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.state[params[0]]["proj_right"].shape == (6, 6)


def test_unknown_projector_lists_the_valid_ones():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ConfigError, match="projector 'svdd'.*valid: dct, identity, svd"):
        GaLoreAdamW([p], rank=2, projector="svdd")


def test_misspelled_group_option_lists_the_valid_ones():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(
        ConfigError, match="param group 0: option 'update_proj_gaps'.*valid: .*update_proj_gap"
    ):
        GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gaps": 5}])
    with pytest.raises(ConfigError, match="argument 'rnak'.*valid: free_scale"):
        FrugalAdamW([p], rnak=2)
    with pytest.raises(ConfigError, match="'proj_type' must be one of std"):
        GaLoreAdamW([p], rank=2, proj_type="sideways")
    with pytest.raises(ConfigError, match="'rank' must be an int >= 1"):
        GaLoreAdamW([p], rank=0)


def test_rules_and_summary_say_who_gets_what(caplog):
    with caplog.at_level(logging.INFO, logger="rankwise.optim"):
        opt = GaLoreAdamW(Net(), rank=3)
    rules = opt.rules
    assert rules["up.weight"] == "svd r=3 (right)" and rules["down.weight"] == "svd r=3 (left)"
    assert rules["emb.weight"].startswith("adamw (embedding")
    assert rules["head.weight"].startswith("adamw (embedding")  # the output embedding
    assert rules["norm.weight"].startswith("adamw (1-D")
    assert rules["up.bias"].startswith("adamw (1-D")
    assert "GaLoreAdamW: " in caplog.text and "2 svd" in caplog.text
    text = opt.summary()
    assert "up.weight" in text and "svd r=3 (right)" in text
    with_emb = GaLoreAdamW(Net(), rank=3, embeddings=True)
    assert with_emb.rules["emb.weight"] == "svd r=3 (right)"


class TiedLM(nn.Module):
    """A (vocab 40, d 6) embedding tied to the LM head, one hidden matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 6)
        self.mid = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def _lm_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    ids = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()


def test_embeddings_on_request_are_projected_on_their_small_side():
    """embeddings=True: the (vocab, d) tied embedding/head is one projected matrix whose
    moments are vocab × rank and whose basis is d × rank; without it, full-size AdamW moments."""
    plain_model, asked_model = TiedLM(), TiedLM()
    plain = GaLoreAdamW(plain_model, rank=2)
    asked = GaLoreAdamW(asked_model, rank=2, embeddings=True)
    assert plain.rules["emb.weight"].startswith("adamw (embedding; pass embeddings=True")
    assert asked.rules == {"emb.weight": "svd r=2 (right)", "mid.weight": "svd r=2 (right)"}
    _lm_step(plain_model, plain)
    _lm_step(asked_model, asked)
    assert plain.state[plain_model.emb.weight]["exp_avg"].shape == (40, 6)
    state = asked.state[asked_model.emb.weight]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (40, 2)
    assert state["proj_right"].shape == (6, 2)
    assert asked.state_bytes() < plain.state_bytes() - 40 * 6 * 4


def test_named_parameter_groups_name_the_rules():
    model = TiedLM()
    groups = [
        {"params": [("mid.weight", model.mid.weight)]},
        {"params": [("emb.weight", model.emb.weight)], "rank": 3},  # galore-torch's way to ask
    ]
    opt = GaLoreAdamW(groups)
    assert opt.rules == {"mid.weight": "adamw (no rank in its group)", "emb.weight": "svd r=3 (right)"}
    _lm_step(model, opt)
    assert opt.state[model.emb.weight]["exp_avg"].shape == (40, 3)


def test_galore_torch_style_groups_and_plain_group():
    model = Net()
    matrices = [model.up.weight, model.down.weight]
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    groups = [
        {"params": others},
        {"params": matrices, "rank": 2, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std"},
    ]
    opt = GaLoreAdamW(groups, lr=1e-2)
    assert sum(r.startswith("svd") for r in opt.rules.values()) == 2
    assert sum("no rank in its group" in r for r in opt.rules.values()) == len(others)
    train(model, opt, 2)


def test_state_is_smaller_than_adamw():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    for cls in ALL:
        model = copy.deepcopy(big)
        opt = cls(model, rank=4)
        model(torch.randn(3, 64)).sum().backward()
        opt.step()
        full = 2 * 2 * 64 * 64 * 4  # two moments of two matrices, float32
        assert opt.state_bytes() < 0.6 * full, cls.__name__


def test_state_dict_holds_only_plain_data():
    model = Net()
    opt = DCTAdamW(model, rank=3)
    train(model, opt, 1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    keys = {k for st in sd["state"].values() for k in st}
    assert {"proj_left_idx", "proj_right_idx", "exp_avg", "step"} <= keys


def test_param_group_added_later_is_checked_and_classified():
    a, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6, 10))
    opt = GaLoreAdamW([a], rank=2)
    with pytest.raises(ConfigError, match="param group 1: option 'rnak'"):
        opt.add_param_group({"params": [b], "rnak": 3})
    with pytest.raises(ConfigError, match="param group 1: 'rank' must be an int"):
        opt.add_param_group({"params": [b], "rank": -1})
    assert len(opt.param_groups) == 1  # nothing added by a refused group
    opt.add_param_group({"params": [b], "rank": 3, "proj_type": "left"})
    assert opt.rules == {"group0.param0": "svd r=2 (right)", "group1.param0": "svd r=3 (left)"}
    a.grad, b.grad = torch.randn(8, 6), torch.randn(6, 10)
    opt.step()
    assert opt.state[b]["exp_avg"].shape == (3, 10)


def test_renew_subspaces_renews_every_projected_matrix_now():
    model = Net()
    opt = GaLoreAdamW(model, rank=2, update_proj_gap=1000)
    for seed in range(2):
        opt.zero_grad()
        loss_of(model, seed).backward()
        opt.step()
    before = {p: opt.state[p]["proj_right" if "proj_right" in opt.state[p] else "proj_left"].clone() for p in opt._rank}
    count = opt.refresh_count
    opt.zero_grad()
    loss_of(model, 7).backward()
    seconds = opt.renew_subspaces()
    assert seconds > 0 and opt.refresh_count == count + len(before) == count + 2
    for p, old in before.items():
        new = opt.state[p]["proj_right" if "proj_right" in opt.state[p] else "proj_left"]
        assert new.shape == old.shape and not torch.allclose(new.abs(), old.abs(), atol=1e-3)
    assert opt.state[model.up.weight]["exp_avg"].shape == (9, 2)  # moments kept
