"""Initialisers: PiSSA and Nyström residual inits, EVA, their failure modes, PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_state, llama, logits, make_trained, snapshot, tokens
from torch import nn

from rankwise.adapters import Adapter, adapted_layers, attach, save_adapter
from rankwise.adapters.init import eva_ranks, residual_to_lora
from rankwise.errors import ConfigError, ModelError
from rankwise.linalg import nystrom_general


def llama64() -> nn.Module:
    return llama().double()


def dense_rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U[:, :r] * S[:r] @ Vh[:r]


def originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.removesuffix(".weight"): m.weight.detach().clone()
        for n, m in ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))
        for n in [n + ".weight"]
    }


# ----------------------------------------------------------------------------- pissa


@pytest.mark.parametrize("exact", [True, False])
def test_pissa_residual_plus_ba_is_w_and_ba_is_the_truncated_svd(exact):
    model = llama64()
    w0 = originals(model)
    x = tokens(vocab=200)
    before = logits(model, x)
    attach(
        model, "lora", "all-linear", rank=4, alpha=8, init="pissa", init_options={"exact": exact}
    )
    for path, layer in adapted_layers(model).items():
        ad = layer.adapters["default"]
        ba = ad.scaling * ad.lora_B @ ad.lora_A
        w_res = layer.base_layer.weight
        torch.testing.assert_close(w_res + ba, w0[path], atol=1e-10, rtol=0)
        best = dense_rank_r(w0[path], 4)
        if exact:
            torch.testing.assert_close(ba, best, atol=1e-10, rtol=0)
        else:  # randomized on a flat (random-init) spectrum: near-optimal, not identical
            err, opt = (w0[path] - ba.detach()).norm(), (w0[path] - best).norm()
            assert float(err) <= 1.001 * float(opt), path
            assert float((ba - best).norm() / best.norm()) < 0.05, path
        # B and A carry sqrt(S) each: equal column / row norms
        torch.testing.assert_close(ad.lora_B.norm(dim=0), ad.lora_A.norm(dim=1))
    torch.testing.assert_close(logits(model, x), before, atol=1e-10, rtol=0)


def test_pissa_on_dora_keeps_the_model_and_reads_new_row_norms():
    model = llama()
    x = tokens(vocab=200)
    before = logits(model, x)
    attach(model, "dora", ["q_proj", "down_proj"], rank=4, init="pissa")
    torch.testing.assert_close(logits(model, x), before, atol=2e-5, rtol=0)
    for layer in adapted_layers(model).values():
        ad = layer.adapters["default"]
        torch.testing.assert_close(ad.lora_magnitude, ad.weight_norm())
    with pytest.raises(ConfigError, match="DoRA magnitude"):
        residual_to_lora(model)


@pytest.mark.parametrize("options", [{"n_iter": -1}, {"seed": "x"}, {"bogus": 1}])
def test_pissa_bad_options_leave_the_model_unchanged(options):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="n_iter|seed|unknown init_options"):
        attach(model, "lora", "all-linear", rank=4, init="pissa", init_options=options)
    assert_same_state(model, before)
    assert not adapted_layers(model)


def test_pissa_failing_on_a_later_layer_changes_no_earlier_weight():
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ModelError, match="NaN"):
        attach(model, "lora", "all-linear", rank=4, init="pissa")
    for k, v in before.items():  # NaN != NaN, so compare with equal_nan
        assert torch.allclose(model.state_dict()[k], v, equal_nan=True, rtol=0, atol=0), k
    assert not adapted_layers(model)


def test_pissa_converts_to_a_plain_lora_that_peft_loads_on_the_original_base(tmp_path):
    from peft import PeftModel

    model = llama()
    base = copy.deepcopy(model)
    w0 = originals(model)
    x = tokens(vocab=200)
    attach(model, "lora", ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8, init="pissa")
    make_trained(model, std=0.05)
    trained = logits(model, x)
    ranks = residual_to_lora(model)
    assert set(ranks.values()) == {8}
    for path, layer in adapted_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, w0[path], atol=1e-6, rtol=0)
        assert layer.adapters["default"].method == "lora"
    torch.testing.assert_close(logits(model, x), trained, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path, format="peft")
    theirs = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(theirs, x), trained, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="no residual init"):
        residual_to_lora(model)


# ----------------------------------------------------------------------------- nystrom


def test_nystrom_init_is_the_generalized_nystrom_approximation():
    model = llama64()
    w0 = originals(model)
    x = tokens(vocab=200)
    before = logits(model, x)
    attach(model, "lora", ["o_proj", "up_proj"], rank=4, alpha=4, init="nystrom")
    for path, layer in adapted_layers(model).items():
        ad = layer.adapters["default"]
        gen = torch.Generator().manual_seed(0)
        C, Z, R = nystrom_general(w0[path], 4, generator=gen)
        torch.testing.assert_close(ad.scaling * ad.lora_B @ ad.lora_A, C @ Z @ R)
        torch.testing.assert_close(
            layer.base_layer.weight + C @ Z @ R, w0[path], atol=1e-10, rtol=0
        )
    torch.testing.assert_close(logits(model, x), before, atol=1e-10, rtol=0)


def test_nystrom_recovers_a_rank_r_weight_exactly_like_the_dense_svd():
    layer = nn.Linear(40, 30, bias=False).double()
    g = torch.Generator().manual_seed(3)
    low = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 40, generator=g, dtype=torch.float64
    )
    with torch.no_grad():
        layer.weight.copy_(low)
    model = nn.Sequential(layer)
    attach(model, "lora", "0", rank=3, init="nystrom")
    ad = model[0].adapters["default"]
    torch.testing.assert_close(ad.scaling * ad.lora_B @ ad.lora_A, dense_rank_r(low, 3))
    assert float(model[0].base_layer.weight.abs().max()) < 1e-10


# ----------------------------------------------------------------------------- eva


def collect_inputs(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, p=p: got[p].append(a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for p in paths
    ]
    with torch.no_grad():
        for batch in x.split(2):
            model(batch)
    for h in hooks:
        h.remove()
    return {p: torch.cat(v) for p, v in got.items()}


def projector(rows: torch.Tensor) -> torch.Tensor:
    q = torch.linalg.qr(rows.T).Q
    return q @ q.T


def test_eva_a_spans_the_top_right_singular_subspace_and_ranks_follow_dense_ratios():
    model = llama64()
    x = tokens(n=2, length=24, vocab=200)  # one batch: the incremental SVD is the dense one
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in p]
    acts = collect_inputs(copy.deepcopy(model), paths, x)
    r, rho = 4, 2.0
    attach(model, "lora", "all-linear", rank=r, init="eva", init_options={"inputs": x, "rho": rho})
    ranks = eva_ranks(model)
    # dense reference: explained variance ratio of each layer's top-r components
    pool = []
    for path in paths:
        S = torch.linalg.svdvals(acts[path])
        pool += [(float(s * s / S.square().sum()), path) for s in S[:r]]
    pool.sort(reverse=True)
    budget = round(len(paths) * r / rho)
    want = {p: sum(1 for _, q in pool[:budget] if q == p) for p in paths}
    assert ranks == want
    assert sum(ranks.values()) == budget and max(ranks.values()) <= r
    assert len(set(ranks.values())) > 1  # ranks really were redistributed
    for path, layer in adapted_layers(model).items():
        ad, k = layer.adapters["default"], ranks[path]
        assert not ad.lora_B.any()
        assert not ad.lora_A[k:].any()
        if k:
            Vh = torch.linalg.svd(acts[path], full_matrices=False).Vh[:k]
            diff = projector(ad.lora_A[:k]) - projector(Vh)
            assert float(diff.norm()) < 1e-6, path


def test_eva_streams_batches_and_centres_like_incremental_pca():
    model = llama64()
    x = tokens(n=8, length=16, vocab=200, seed=4)
    paths = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    acts = collect_inputs(copy.deepcopy(model), paths, x)
    attach(model, "lora", paths, rank=4, init="eva",
           init_options={"inputs": x, "batch_size": 2, "rho": 1.0, "center": True})  # fmt: skip
    assert set(eva_ranks(model).values()) == {4}
    for path in paths:
        a = adapted_layers(model)[path].adapters["default"].lora_A
        centred = acts[path] - acts[path].mean(0)
        S = torch.linalg.svdvals(centred)
        captured = (centred @ a.detach().T).square().sum()  # A has orthonormal rows
        # 4 streamed batches truncated to 2r on a flat spectrum: near the optimal variance
        assert float(captured) >= 0.95 * float(S[:4].square().sum()), path
        torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=a.dtype), atol=1e-8, rtol=0)


@pytest.mark.parametrize("center", [False, True])
def test_eva_stream_without_truncation_reproduces_the_scatter_matrix(center):
    from rankwise.adapters.init import _Stream

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 6, generator=g, dtype=torch.float64) + 3.0
    stream = _Stream(6, center=center, n_iter="auto", seed=0)
    for block in rows.split([7, 20, 1, 22]):
        stream.update(block)
    ref = rows - rows.mean(0) if center else rows
    torch.testing.assert_close(stream.sv.T @ stream.sv, ref.T @ ref)
    assert stream.energy == pytest.approx(float(ref.square().sum()))
    _, ratio = stream.result()
    assert float(ratio.sum()) == pytest.approx(1.0)


def test_eva_zeroed_components_stay_zero_under_adamw():
    model = llama()
    x = tokens(n=4, length=16, vocab=200)
    attach(model, "lora", "all-linear", rank=4, init="eva", init_options={"inputs": x, "rho": 4.0})
    ranks = eva_ranks(model)
    assert min(ranks.values()) < 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    assert eva_ranks(model) == ranks
    assert any(
        bool(layer.adapters["default"].lora_B.any()) for layer in adapted_layers(model).values()
    )


@pytest.mark.parametrize(
    ("targets", "options", "error"),
    [
        ("all-linear", {}, ConfigError),  # no inputs
        ("all-linear", {"inputs": torch.zeros(2, 3)}, ConfigError),  # not token ids
        ("all-linear", {"inputs": tokens(vocab=200), "rho": 0.5}, ConfigError),
        (["embed_tokens", "q_proj"], {"inputs": tokens(vocab=200)}, ConfigError),  # embedding
    ],
)
def test_eva_failures_leave_the_model_unchanged(targets, options, error):
    model = llama()
    before = snapshot(model)
    with pytest.raises(error):
        attach(model, "lora", targets, rank=4, init="eva", init_options=options)
    assert_same_state(model, before)
    assert not adapted_layers(model)


def test_eva_adapter_loads_in_peft_as_a_plain_lora(tmp_path):
    from peft import PeftModel

    model = llama()
    base = copy.deepcopy(model)
    x = tokens(vocab=200)
    attach(model, "lora", ["q_proj", "up_proj"], rank=4, init="eva", init_options={"inputs": x})
    make_trained(model, std=0.05)
    save_adapter(model, tmp_path, format="peft")
    theirs = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- method hooks


class _SplitPair(Adapter):
    """A test method whose factors are not named lora_A/lora_B: it starts from a rank-r
    product through its own ``lowrank_start`` (all of ``core`` on the left factor)."""

    method = "split_pair"

    def build(self) -> None:
        r, out, inp = self.config.rank, self.layer.out_features, self.layer.in_features
        self.left = nn.Parameter(torch.zeros(out, r, dtype=self.param_dtype))
        self.right = nn.Parameter(torch.zeros(r, inp, dtype=self.param_dtype))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.right)

    def delta(self, x, base):
        return x @ (self.left @ self.right).t() * self.scaling

    def delta_weight(self):
        return (self.left @ self.right).float() * self.scaling

    def lowrank_start(self, b, core, a):
        left = b @ core / self.scaling

        def write():
            with torch.no_grad():
                self.left.copy_(left)
                self.right.copy_(a)

        return write

    def lowrank_factors(self):
        return self.left, self.right


@pytest.mark.parametrize("init", ["pissa", "nystrom"])
def test_residual_inits_use_the_methods_own_start_and_conversion(init):
    from rankwise.adapters.base import METHODS

    model = llama64()
    w0 = originals(model)
    x = tokens(vocab=200)
    before = logits(model, x)
    with METHODS.temporary("split_pair", _SplitPair):
        attach(model, "split_pair", ["q_proj", "down_proj"], rank=4, alpha=8, init=init)
        torch.testing.assert_close(logits(model, x), before, atol=1e-10, rtol=0)
        for path, layer in adapted_layers(model).items():
            ad = layer.adapters["default"]
            total = layer.base_layer.weight + ad.delta_weight().double()
            torch.testing.assert_close(total, w0[path], atol=1e-6, rtol=0)
        make_trained(model, std=0.05)
        want = logits(model, x)
        residual_to_lora(model)  # through the method's lowrank_factors
        torch.testing.assert_close(logits(model, x), want, atol=1e-6, rtol=0)  # float32 factors
        for path, layer in adapted_layers(model).items():
            torch.testing.assert_close(layer.base_layer.weight, w0[path], atol=1e-10, rtol=0)


@pytest.mark.parametrize(("method", "init"), [("svfit", "pissa"), ("lora_xs", "nystrom")])
def test_a_method_without_a_lowrank_start_is_refused_and_the_model_kept(method, init):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=f"init={init!r} does not apply to {method!r}"):
        attach(model, method, "q_proj", rank=4, init=init)
    assert_same_state(model, before)
    assert not adapted_layers(model)


def test_default_hooks_follow_the_factor_pair_convention():
    model = llama()
    attach(model, "lora", "q_proj", name="a", rank=4)
    attach(model, "dora", "q_proj", name="b", rank=4)
    attach(model, "svfit", "q_proj", name="c", rank=4)
    layer = next(iter(adapted_layers(model).values()))
    lora, dora, svfit = (layer.adapters[n] for n in "abc")
    assert lora.lowrank_factors() == (lora.lora_B, lora.lora_A)
    assert dora.factor_pair() is not None and dora.lowrank_factors() is None  # magnitude
    assert svfit.factor_pair() is None and svfit.lowrank_start(None, None, None) is None
