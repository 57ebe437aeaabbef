"""Federated training of adapters: FedSVD, FRL and the FedAvg baseline, simulated in one
process (:func:`simulate`) or run across ``torch.distributed`` processes
(:func:`run_distributed`). See ``core.py`` for the round and ``docs/transfer.md``."""

from rankwise.adapters.federated.core import (
    FederatedResult,
    RoundConfig,
    Strategy,
    run_distributed,
    simulate,
)
from rankwise.adapters.federated.fedsvd import FedAvgLoRA, FedSVD, refactor
from rankwise.adapters.federated.frl import FRL, positions, vote

__all__ = [
    "FRL",
    "FedAvgLoRA",
    "FedSVD",
    "FederatedResult",
    "RoundConfig",
    "Strategy",
    "positions",
    "refactor",
    "run_distributed",
    "simulate",
    "vote",
]
