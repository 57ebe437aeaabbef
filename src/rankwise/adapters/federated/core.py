"""Federated rounds over adapters: one strategy, in one process or across torch.distributed.

A :class:`Strategy` is one federated algorithm (FedSVD, FRL, FedAvg of LoRA factors): what
the server sends, what a client trains and sends back (a *message*: named tensors), and how
the server aggregates messages into the next global state. The same round runs two ways:

- :func:`simulate`: every client in this process, one after the other;
- :func:`run_distributed`: under ``torchrun`` (or any initialised process group; gloo on
  CPU), client ``c`` runs on process ``c % world_size``; messages are gathered to every
  process and aggregated there in client order, so every process holds the same state.

Each client's local training is seeded by ``(seed, round, client)`` alone, so both ways
compute the same rounds: a 2-process run equals the in-process simulation.

With ``RoundConfig(dp_clip=C, dp_noise_multiplier=σ)`` every client trains with DP-SGD
(per-sample clipping and Gaussian noise, ``privacy.py``) instead of the plain LM-loss gradient;
strategies that do not train by gradient (FRL) refuse it.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.adapters.federated.privacy import check_dp_options, private_lm_loss
from rankwise.adapters.local_training import (
    LossFn,
    batches_of,
    check_positive,
    lm_loss,
    train_adapters,
)
from rankwise.errors import ConfigError

Message = dict[str, torch.Tensor]


class Strategy(abc.ABC):
    """One federated algorithm on a model's adapters. Subclasses define the four steps."""

    name = ""
    private_training = True  # whether clients can train with DP-SGD (RoundConfig.dp_clip)

    @abc.abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Attach the adapters to ``model`` and create the initial global state."""

    @abc.abstractmethod
    def load(self, model: nn.Module) -> None:
        """Put the current global state into ``model`` (what the server sends a client)."""

    @abc.abstractmethod
    def local_update(self, model: nn.Module, batches, *, steps: int, lr: float, loss_fn: LossFn = lm_loss) -> Message:
        """Train on one client's ``batches`` from the global state with ``loss_fn`` (the LM
        loss, or its DP-SGD version); return what it sends."""

    @abc.abstractmethod
    def aggregate(self, messages: Sequence[Message]) -> None:
        """Combine the clients' messages (in client order) into the next global state."""

    def poison(self, message: Message) -> Message:
        """What a malicious client sends instead of ``message`` (robustness experiments)."""
        raise ConfigError(f"strategy {self.name!r} defines no poisoning attack")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The global state as named tensors (compared across runs in tests)."""
        return {}


@dataclass
class FederatedResult:
    """Per-round mean client loss (last local step) and the final global state."""

    losses: list[float] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundConfig:
    """``rounds`` of ``local_steps`` AdamW steps (``lr``, ``batch_size`` blocks) per client;
    clients in ``attackers`` send :meth:`Strategy.poison` of their message. ``dp_clip`` (a
    per-sample gradient norm bound) switches DP-SGD on, with Gaussian noise of std
    ``dp_noise_multiplier × dp_clip`` on each batch's clipped gradient sum (``privacy.py``)."""

    rounds: int = 5
    local_steps: int = 5
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    attackers: tuple[int, ...] = ()
    dp_clip: float | None = None
    dp_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "batch_size"):
            check_positive(name, getattr(self, name))
        check_dp_options(self.dp_clip, self.dp_noise_multiplier)

    def loss_fn(self) -> LossFn:
        """What clients train on: the LM loss, or its DP-SGD version when ``dp_clip`` is set."""
        return lm_loss if self.dp_clip is None else private_lm_loss(self.dp_clip, self.dp_noise_multiplier)


def _check_clients(clients: Sequence[torch.Tensor], config: RoundConfig, strategy: Strategy) -> None:
    if config.dp_clip is not None and not strategy.private_training:
        raise ConfigError(
            f"dp_clip: strategy {strategy.name!r} does not train its messages by gradient descent, "
            "so DP-SGD does not apply; use it with fedsvd or fedavg_lora, or set dp_clip=None"
        )
    if len(clients) == 0:
        raise ConfigError("federated training needs at least 1 client; give a list of per-client token blocks")
    bad = [a for a in config.attackers if not 0 <= a < len(clients)]
    if bad:
        raise ConfigError(f"attackers {bad} are not client indices; valid: 0..{len(clients) - 1}")


def _client_seed(seed: int, round_: int, client: int) -> int:
    return (seed * 1_000_003 + round_ * 10_007 + client) % (2**63)


def _client_message(strategy: Strategy, model: nn.Module, data: torch.Tensor, config: RoundConfig, round_: int, client: int) -> Message:
    seed = _client_seed(config.seed, round_, client)
    torch.manual_seed(seed)
    strategy.load(model)
    batches = batches_of(data, config.batch_size, seed=seed)
    message = strategy.local_update(model, batches, steps=config.local_steps, lr=config.lr, loss_fn=config.loss_fn())
    if client in config.attackers:
        message = strategy.poison(message)
    return message


def _run(model, strategy, clients, config, mine, gather) -> FederatedResult:
    _check_clients(clients, config, strategy)
    torch.manual_seed(config.seed)
    strategy.setup(model)
    result = FederatedResult()
    for round_ in range(config.rounds):
        local = {c: _client_message(strategy, model, clients[c], config, round_, c) for c in mine}
        messages = gather(local)
        ordered = [messages[c] for c in range(len(clients))]
        result.losses.append(float(sum(m["loss"].item() for m in ordered) / len(ordered)))
        strategy.aggregate([{k: v for k, v in m.items() if k != "loss"} for m in ordered])
    strategy.load(model)
    result.state = {k: v.detach().clone() for k, v in strategy.state_dict().items()}
    return result


def simulate(
    model: nn.Module, strategy: Strategy, clients: Sequence[torch.Tensor], config: RoundConfig | None = None
) -> FederatedResult:
    """Run ``config.rounds`` federated rounds with every client in this process.

    ``clients[c]`` is client c's training token blocks ``(n, seq_len)``. ``model`` ends
    holding the final global adapter state. ConfigError for 0 clients or bad options.
    """
    config = config or RoundConfig()
    return _run(model, strategy, clients, config, range(len(clients)), lambda local: local)


def _all_gather(local: dict[int, Message]) -> dict[int, Message]:
    import torch.distributed as dist

    parts: list[dict[int, Message] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[int, Message] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def run_distributed(
    model: nn.Module, strategy: Strategy, clients: Sequence[torch.Tensor], config: RoundConfig | None = None
) -> FederatedResult:
    """:func:`simulate` with the clients spread over the processes of ``torch.distributed``
    (initialised from torchrun's environment if needed; gloo on CPU). Every process must
    build the same model and pass the same ``clients``; every process returns the result."""
    from rankwise.adapters.finetune import distributed_rank

    config = config or RoundConfig()
    rank, world = distributed_rank()
    if world < 2:
        raise ConfigError(
            "run_distributed needs a process group of 2 or more processes; launch with "
            "torchrun --nproc_per_node N, or call simulate() in one process"
        )
    mine = [c for c in range(len(clients)) if c % world == rank]
    return _run(model, strategy, clients, config, mine, _all_gather)


def local_training(model: nn.Module, batches, *, steps: int, lr: float, rules=(), loss_fn: LossFn = lm_loss) -> float:
    """A client's local steps (:func:`~rankwise.adapters.local_training.train_adapters`);
    returns the last step's loss."""
    return train_adapters(model, batches, steps=steps, lr=lr, rules=rules, loss_fn=loss_fn).losses[-1]


__all__ = [
    "FederatedResult",
    "Message",
    "RoundConfig",
    "Strategy",
    "local_training",
    "run_distributed",
    "simulate",
]
