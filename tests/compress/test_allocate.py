import dataclasses

import pytest
import torch

from rankwise.compress.allocate import (
    STRATEGIES,
    LayerSpectrum,
    allocate_ranks,
    minimum_parameters,
    statistics_for,
    total_parameters,
)
from rankwise.compress.calibrate import LayerStats
from rankwise.errors import ConfigError


def spectra(seed: int = 0) -> dict[str, LayerSpectrum]:
    """Layers of different shapes; some spectra decay fast (very low-rank), some slowly."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (m, n, decay) in enumerate([(64, 64, 0.5), (64, 128, 0.02), (128, 64, 0.1), (96, 96, 0.005)] * 3):
        k = min(m, n)
        s = torch.exp(-decay * torch.arange(k, dtype=torch.float64)) * (1 + 0.1 * torch.rand(k, generator=g, dtype=torch.float64))
        s = s.sort(descending=True).values
        isotropic = torch.full((k,), 1.0 + i, dtype=torch.float64)  # mfac's weights = fisher's
        out[f"layer{i}"] = LayerSpectrum(m, n, s, s, sensitivity=1.0 + i, direction_sensitivity=isotropic)
    return out


def dense_total(layers):
    return sum(layer.out_features * layer.in_features for layer in layers.values())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_allocation_meets_the_budget_within_one_percent(strategy, fraction):
    layers = spectra()
    budget = int(fraction * dense_total(layers))
    ranks = allocate_ranks(layers, budget, strategy=strategy)
    used = total_parameters(ranks, layers)
    assert used <= budget
    assert used >= budget - 0.01 * dense_total(layers)
    for name, rank in ranks.items():  # factorised only below break-even
        assert rank is None or 1 <= rank < layers[name].breakeven


def test_global_allocation_has_less_error_than_uniform():
    layers = spectra()
    budget = int(0.5 * dense_total(layers))

    def error(ranks):
        return sum(
            0.0 if r is None else float(layer.spectrum[r:].pow(2).sum() / layer.spectrum.pow(2).sum())
            for layer, r in ((layers[n], r) for n, r in ranks.items())
        )

    uniform = allocate_ranks(layers, budget, strategy="uniform")
    best = allocate_ranks(layers, budget, strategy="global")
    assert error(best) < 0.9 * error(uniform)


def test_fisher_allocation_is_the_loss_weighted_greedy():
    layers = spectra()
    budget = int(0.5 * dense_total(layers))
    equal = {n: dataclasses.replace(layer, sensitivity=3.0) for n, layer in layers.items()}
    # equal sensitivities: the same ranks as the greedy on absolute errors
    assert allocate_ranks(equal, budget, strategy="fisher") == allocate_ranks(
        equal, budget, strategy="global", relative=False
    )

    def loss(ranks, weights):
        return sum(
            weights[n].sensitivity * float(layers[n].spectrum[r:].pow(2).sum())
            for n, r in ranks.items() if r is not None
        )  # fmt: skip

    # a layer 1000x more sensitive keeps more rank, and the weighted loss is the lowest
    skewed = dict(equal, layer1=dataclasses.replace(equal["layer1"], sensitivity=3000.0))
    fisher = allocate_ranks(skewed, budget, strategy="fisher")
    plain = allocate_ranks(skewed, budget, strategy="global", relative=False)
    assert (fisher["layer1"] or 10**9) > plain["layer1"]
    assert loss(fisher, skewed) < loss(plain, skewed)
    for other in ("uniform", "energy", "welore", "global"):
        assert loss(fisher, skewed) <= loss(allocate_ranks(skewed, budget, strategy=other), skewed)
    missing = dict(layers, layer0=dataclasses.replace(layers["layer0"], sensitivity=None))
    with pytest.raises(ConfigError, match="out_grad"):
        allocate_ranks(missing, budget, strategy="fisher")


def test_mfac_with_isotropic_fishers_is_exactly_the_fisher_allocation():
    layers = spectra()  # direction_sensitivity = sensitivity for every direction
    for fraction in (0.3, 0.5, 0.8):
        budget = int(fraction * dense_total(layers))
        assert allocate_ranks(layers, budget, strategy="mfac") == allocate_ranks(layers, budget, strategy="fisher")
    assert statistics_for("mfac") == {"out_fisher"} and statistics_for("fisher") == {"out_grad"}
    assert statistics_for("global") == frozenset()


def _directional_layers(c: float = 2.0) -> tuple[dict[str, LayerSpectrum], torch.Tensor]:
    """Two identical 64 x 64 layers with the same mean output Fisher c: in "flat" it is c I,
    in "focused" all of it lies along the layer's 20 leading output directions u_0..u_19.
    The Fishers go through LayerStats -> MFAC like a calibration's sketch would."""
    out, tokens, focus = 64, 100, 20
    U = torch.linalg.qr(torch.randn(out, out, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).Q
    S = torch.linspace(2.0, 1.0, out, dtype=torch.float64)
    # window rows g_j = a u_j: (1/m) Σ a² u_j u_jᵀ has trace a² = c·out (the same as c I)
    focused = (c * out) ** 0.5 * U[:, :focus].T
    flat = (c * out) ** 0.5 * torch.eye(out, dtype=torch.float64)  # (1/out) Σ a² e_j e_jᵀ = c I
    layers = {}
    for name, window in (("flat", flat), ("focused", focused)):
        stats = LayerStats(out_features=out, in_features=out, out_grad_sketch=window * tokens**0.5, tokens=tokens)
        weights = stats.direction_sensitivity(U)
        layers[name] = LayerSpectrum(out, out, S, sensitivity=c, direction_sensitivity=weights)
    return layers, weights


def test_mfac_keeps_rank_where_the_fisher_points():
    layers, weights = _directional_layers()
    assert float(weights[:20].min()) == pytest.approx(2.0 * 64 / 20, rel=1e-2)  # c·out/20
    assert float(weights[20:].max()) < 1e-2  # only the M-FAC dampening
    budget = 2 * 10 * 128  # rank 10 in each layer if they were treated alike
    fisher = allocate_ranks(layers, budget, strategy="fisher")
    mfac = allocate_ranks(layers, budget, strategy="mfac")
    assert fisher["flat"] == fisher["focused"] == 10  # same spectrum, same mean sensitivity
    assert mfac["focused"] >= 19 and mfac["flat"] < 3

    def loss(ranks):  # Σ over dropped directions of S_i² u_iᵀ F u_i, the second-order cost
        return sum(float((layers[n].spectrum[r:].pow(2) * layers[n].direction_sensitivity[r:]).sum()) for n, r in ranks.items())

    assert loss(mfac) < 0.8 * loss(fisher)  # 310 vs 426


def test_mfac_without_direction_weights_raises_naming_the_statistic():
    layers = spectra()
    budget = int(0.5 * dense_total(layers))
    missing = dict(layers, layer2=dataclasses.replace(layers["layer2"], direction_sensitivity=None))
    with pytest.raises(ConfigError, match="'out_fisher'.*layer2"):
        allocate_ranks(missing, budget, strategy="mfac")
    short = dict(layers, layer0=dataclasses.replace(layers["layer0"], direction_sensitivity=torch.ones(3)))
    with pytest.raises(ConfigError, match="one positive value per singular value"):
        allocate_ranks(short, budget, strategy="mfac")


def test_welore_compresses_low_rank_layers_more():
    layers = spectra()
    ranks = allocate_ranks(layers, int(0.5 * dense_total(layers)), strategy="welore")
    fast, slow = ranks["layer0"], ranks["layer3"]  # decay 0.5 vs 0.005, both square
    fast = layers["layer0"].breakeven if fast is None else fast
    slow = layers["layer3"].breakeven if slow is None else slow
    assert fast / layers["layer0"].breakeven < slow / layers["layer3"].breakeven


def test_budget_below_minimum_and_unknown_strategy_raise():
    layers = spectra()
    with pytest.raises(ConfigError, match="below the minimum"):
        allocate_ranks(layers, minimum_parameters(layers) - 1)
    with pytest.raises(ConfigError, match="valid: fisher, uniform, energy, welore, global, mfac"):
        allocate_ranks(layers, dense_total(layers), strategy="magic")


def test_full_budget_keeps_everything_dense():
    layers = spectra()
    ranks = allocate_ranks(layers, dense_total(layers), strategy="global")
    assert all(r is None for r in ranks.values())


def test_bisect_knob_finds_the_largest_fitting_knob():
    from rankwise.compress.allocate import bisect_knob

    cost = lambda t: int(1000 * t)  # noqa: E731
    assert bisect_knob(cost, 2000) == 1.0
    t = bisect_knob(cost, 437)
    assert cost(t) <= 437 and cost(t + 1e-6) >= 437


def test_greedy_fill_takes_the_best_gain_per_step_and_rounds_robin_on_ties():
    from rankwise.compress.allocate import greedy_fill

    caps = {"a": 3, "b": 5, "c": 5}
    step = lambda k, s: (2 if k == "a" else 1) if s < caps[k] else None  # noqa: E731
    # gains fall with size: a's first steps are worth most, then b and c in turn
    gains = {"a": [10, 9, 8], "b": [5, 4, 3, 2, 1], "c": [5, 4, 3, 2, 1]}
    grown = greedy_fill({"a": 0, "b": 0, "c": 0}, 9, step=step, gain=lambda k, s: gains[k][s])
    assert grown == {"a": 3, "b": 2, "c": 1}  # 6 + 3 = 9 spent, b before c on the tie
    equal = greedy_fill({"x": 0, "y": 0}, 5, step=lambda k, s: 1, gain=lambda k, s: 1.0)
    assert equal == {"x": 3, "y": 2}  # equal gains: in turn, not all to one key
    assert greedy_fill({"a": 0}, 1, step=step, gain=lambda k, s: 1.0) == {"a": 0}  # a step too big


def test_allocation_with_overhead_fits_the_budget_and_gives_back_unused_reserve():
    from rankwise.compress.allocate import allocate_with_overhead

    layers = spectra()
    budget = int(0.9 * dense_total(layers))
    zero = {n: 0 for n in layers}
    assert allocate_with_overhead(layers, budget, zero, strategy="global") == allocate_ranks(layers, budget, strategy="global")
    overhead = {n: 4 * (layer.out_features + layer.in_features) for n, layer in layers.items()}
    ranks = allocate_with_overhead(layers, budget, overhead, strategy="global")
    used = total_parameters(ranks, layers) + sum(overhead[n] for n, r in ranks.items() if r is not None)
    assert used <= budget
    naive = allocate_ranks(layers, budget - sum(overhead.values()), strategy="global")
    assert any(r is None for r in naive.values())  # some layers stay dense, their reserve unused...
    assert total_parameters(ranks, layers) > total_parameters(naive, layers)  # ...and is given back
