"""FRL: federated rank learning — clients send rankings, the server aggregates by vote.

"FRL: Federated Rank Learning" (Mozaffari et al., 2021). Instead of weights, FRL learns
*which* parameters of a fixed random network to use (a supermask, trained edge-popup style
through scores), and clients send only a ranking of them; the server sums the clients'
rankings (every client one vote per item: the item's position) and sorts the sums into the
next global ranking, so a malicious client can move the result only as far as one vote goes.

On adapters, the ranked items are the rank-1 components ``b_i a_iᵀ`` of a frozen random
LoRA on every target layer (``A`` Kaiming-uniform, ``B`` Gaussian with ``init_scale``, both
from the shared seed, never sent). The global model uses the top ``budget`` components of the
global ranking across all layers, so each layer's LoRA rank — how many of its components are
in the top ``budget`` — is what the votes decide: it grows in the layers clients rank up and
shrinks elsewhere (:meth:`FRL.layer_ranks`). A client turns the global ranking into scores
(``position / K``), trains them for its local steps (straight-through: the gradient of a
component's mask, ``b_iᵀ (∂L/∂B)_i``, read from the LoRA gradient, moves its score; Adam at
``score_lr``), and sends the ranking of its final scores (integers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rankwise.adapters.federated.core import Message, Strategy, local_training
from rankwise.adapters.inject import adapted_layers, attach
from rankwise.adapters.local_training import LossFn, lm_loss
from rankwise.adapters.rules.base import TrainingRule
from rankwise.errors import ConfigError


def positions(values: torch.Tensor) -> torch.Tensor:
    """The ranking of ``values``: each item's position in ascending order (ties: lower index
    first), as int64 in ``0..K-1`` (higher = more important)."""
    order = torch.argsort(values, stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(len(values))
    return out


def vote(rankings: Sequence[torch.Tensor]) -> torch.Tensor:
    """FRL's aggregation: sum the clients' positions per item and rank the sums."""
    if len(rankings) == 0:
        raise ConfigError("vote needs at least one client ranking")
    return positions(torch.stack([r.long() for r in rankings]).sum(0))


class _ScoreTraining(TrainingRule):
    """Edge-popup on component scores: after backward, move the scores by the mask gradient
    read from ``lora_B.grad``, clear that gradient, and rewrite ``lora_B = B ⊙ mask``."""

    def __init__(self, frl: FRL, model: nn.Module, scores: torch.Tensor) -> None:
        super().__init__()
        self.frl, self.net = frl, model
        self.scores = nn.Parameter(scores)
        self.score_optimizer = torch.optim.Adam([self.scores], lr=frl.score_lr)

    def after_backward(self, step: int) -> None:
        grads = []
        for path, adapter in self.frl.adapters(self.net).items():
            g = adapter.lora_B.grad
            grads.append((self.frl.frozen_b[path] * g).sum(0) if g is not None else torch.zeros(self.frl.rank))
            adapter.lora_B.grad = None  # B is frozen: only the scores learn
        self.scores.grad = torch.cat(grads).to(self.scores.dtype)
        self.score_optimizer.step()
        self.score_optimizer.zero_grad(set_to_none=True)
        self.frl.write_mask(self.net, self.frl.top(self.scores.detach()))


class FRL(Strategy):
    """FRL on LoRA components: supermask of a frozen random LoRA, learned by ranking votes."""

    name = "frl"
    private_training = False  # clients send rankings of trained scores, not gradient-trained weights

    def __init__(
        self,
        *,
        rank: int = 8,
        budget: int | None = None,
        alpha: float | None = None,
        targets="all-linear",
        init_scale: float = 0.02,
        score_lr: float = 0.05,
    ) -> None:
        if not init_scale > 0 or not score_lr > 0:
            raise ConfigError(f"init_scale and score_lr must be positive, got {init_scale!r}, {score_lr!r}")
        self.rank, self.budget, self.alpha, self.targets = rank, budget, alpha, targets
        self.init_scale, self.score_lr = init_scale, score_lr
        self.frozen_b: dict[str, torch.Tensor] = {}
        self.ranking = torch.zeros(0, dtype=torch.long)

    def adapters(self, model: nn.Module):
        return {p: layer.adapters["default"] for p, layer in adapted_layers(model).items() if "default" in layer.adapters}

    @property
    def components(self) -> int:
        return self.rank * len(self.frozen_b)

    def setup(self, model: nn.Module) -> None:
        if adapted_layers(model):
            raise ConfigError("FRL attaches its own LoRA; give a model without adapters")
        plan = attach(model, "lora", self.targets, rank=self.rank, alpha=self.alpha, dry_run=True)
        total = self.rank * len(plan.layers)
        if self.budget is None:
            self.budget = total // 2
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or not 1 <= self.budget <= total:
            raise ConfigError(
                f"budget (the components kept over all layers) must be in [1, {total}] "
                f"(rank {self.rank} x {len(plan.layers)} layers), got {self.budget!r}"
            )
        attach(model, "lora", self.targets, rank=self.rank, alpha=self.alpha)
        for path, adapter in self.adapters(model).items():
            adapter.lora_A.requires_grad_(False)
            self.frozen_b[path] = torch.randn(adapter.lora_B.shape) * self.init_scale
        self.ranking = positions(torch.rand(total))

    def top(self, scores: torch.Tensor) -> torch.Tensor:
        """The mask (bool, K) of the ``budget`` highest-ranked components."""
        return positions(scores) >= len(scores) - self.budget

    def write_mask(self, model: nn.Module, mask: torch.Tensor) -> None:
        with torch.no_grad():
            for i, (path, adapter) in enumerate(self.adapters(model).items()):
                keep = mask[i * self.rank : (i + 1) * self.rank].to(adapter.lora_B.dtype)
                adapter.lora_B.copy_(self.frozen_b[path] * keep)

    def load(self, model: nn.Module) -> None:
        self.write_mask(model, self.top(self.ranking))

    def local_update(self, model: nn.Module, batches, *, steps: int, lr: float, loss_fn: LossFn = lm_loss) -> Message:
        rule = _ScoreTraining(self, model, self.ranking.float() / self.components)
        loss = local_training(model, batches, steps=steps, lr=lr, rules=[rule], loss_fn=loss_fn)
        return {"ranking": positions(rule.scores.detach()), "loss": torch.tensor(loss)}

    def poison(self, message: Message) -> Message:
        """Send the ranking reversed (the most useful components voted last)."""
        return {**message, "ranking": self.components - 1 - message["ranking"]}

    def aggregate(self, messages: Sequence[Message]) -> None:
        self.ranking = vote([m["ranking"] for m in messages])

    def layer_ranks(self) -> dict[str, int]:
        """Each layer's LoRA rank in the global model: its components in the top ``budget``."""
        mask = self.top(self.ranking)
        return {p: int(mask[i * self.rank : (i + 1) * self.rank].sum()) for i, p in enumerate(self.frozen_b)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ranking": self.ranking.clone()}


__all__ = ["FRL", "positions", "vote"]
