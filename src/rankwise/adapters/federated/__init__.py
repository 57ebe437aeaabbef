"""Federated training of adapters: FedSVD, FRL and the FedAvg baseline, simulated in one
process (:func:`simulate`) or run across ``torch.distributed`` processes
(:func:`run_distributed`), optionally with DP-SGD clients (``privacy.py``). See ``core.py``
for the round and ``docs/transfer.md``."""

from rankwise.adapters.federated.core import (
    FederatedResult,
    RoundConfig,
    Strategy,
    run_distributed,
    simulate,
)
from rankwise.adapters.federated.fedsvd import FedAvgLoRA, FedSVD, refactor
from rankwise.adapters.federated.frl import FRL, positions, vote
from rankwise.adapters.federated.privacy import per_sample_grads, private_gradient, private_lm_loss

__all__ = [
    "FRL",
    "FedAvgLoRA",
    "FedSVD",
    "FederatedResult",
    "RoundConfig",
    "Strategy",
    "per_sample_grads",
    "positions",
    "private_gradient",
    "private_lm_loss",
    "refactor",
    "run_distributed",
    "simulate",
    "vote",
]
