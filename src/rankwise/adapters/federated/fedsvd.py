"""FedSVD, and the two LoRA baselines it is measured against (FFA-LoRA, FedAvg of factors).

"FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA" (2025).
Each client trains only ``B`` of its LoRA (``A`` is the server's, frozen) and sends ``B``.
Because every client shares ``A``, the mean of the ``B``'s gives exactly the mean of the
client updates: ``s·B̄ A = mean_c s·B_c A``. The server then refactorises that product by
SVD, ``B̄ A = U Σ Vᵀ``: the new ``A = Vᵀ`` has orthonormal rows along the principal
directions of the aggregate update, and ``B = U Σ`` (the product is unchanged). The SVD of
the rank-r product costs two thin QRs and an r×r SVD (:func:`rankwise.linalg.truncated_svd`).

- ``FedSVD(reorthogonalise=False)`` is FFA-LoRA (``A`` stays the random initial one).
- :class:`FedAvgLoRA` trains both factors and averages each, the plain baseline whose
  aggregate ``mean(B)·mean(A)`` is not the mean of the client updates.

Differential privacy, the paper's main setting: with ``RoundConfig(dp_clip=C,
dp_noise_multiplier=σ)`` each client trains ``B`` with DP-SGD (per-sample gradient clipping
to norm ``C`` and Gaussian noise of std ``σC`` on each batch's sum, ``privacy.py``). Only
``B`` is trained, so the noise enters the update ``B A`` linearly (training both factors
multiplies noise by noise), and the server's orthonormal ``A`` keeps ``‖A x‖ ≤ ‖x‖``, which
bounds the gradient of ``B`` and so what clipping cuts off. The server side is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rankwise.adapters.federated.core import Message, Strategy, local_training
from rankwise.adapters.inject import adapted_layers, attach
from rankwise.adapters.local_training import LossFn, lm_loss
from rankwise.errors import ConfigError
from rankwise.linalg import truncated_svd


def refactor(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` with ``B' A' = B A``, ``A'`` (r, in) orthonormal rows = the right
    singular vectors of ``B A``, ``B' = U Σ``; computed from thin QRs of ``B`` and ``Aᵀ`` and
    the SVD of the r×r core, never forming ``B A``."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = truncated_svd(rb @ ra.T)
    return ((qb @ u) * s).to(b.dtype), (vh @ qa.T).to(a.dtype)


class _LoraStrategy(Strategy):
    """Shared parts: attach a LoRA, keep the global factors ``{path: (A, B)}``, send tensors."""

    def __init__(self, *, rank: int = 8, alpha: float | None = None, targets="all-linear") -> None:
        self.rank, self.alpha, self.targets = rank, alpha, targets
        self.global_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _adapters(self, model: nn.Module):
        return {p: layer.adapters["default"] for p, layer in adapted_layers(model).items() if "default" in layer.adapters}

    def setup(self, model: nn.Module) -> None:
        if adapted_layers(model):
            raise ConfigError(f"{self.name} attaches its own LoRA; give a model without adapters")
        attach(model, "lora", self.targets, rank=self.rank, alpha=self.alpha)
        self.global_factors = {
            p: (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for p, a in self._adapters(model).items()
        }

    def load(self, model: nn.Module) -> None:
        with torch.no_grad():
            for path, adapter in self._adapters(model).items():
                a, b = self.global_factors[path]
                adapter.lora_A.copy_(a)
                adapter.lora_B.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, (a, b) in self.global_factors.items():
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = a, b
        return out

    def poison(self, message: Message) -> Message:
        """Send the update reversed and amplified (``-10 B``)."""
        return {k: (-10 * v if k.endswith("lora_B") else v) for k, v in message.items()}

    def update(self, path: str) -> torch.Tensor:
        """The global dense update ``B A`` of layer ``path`` (scale excluded)."""
        a, b = self.global_factors[path]
        return b.float() @ a.float()


class FedSVD(_LoraStrategy):
    """FedSVD: clients train ``B`` only; the server averages ``B`` and re-orthogonalises ``A``
    by SVD of ``B̄ A`` (``reorthogonalise=False``: FFA-LoRA)."""

    name = "fedsvd"

    def __init__(self, *, rank: int = 8, alpha: float | None = None, targets="all-linear", reorthogonalise: bool = True) -> None:
        super().__init__(rank=rank, alpha=alpha, targets=targets)
        self.reorthogonalise = reorthogonalise

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        for adapter in self._adapters(model).values():
            adapter.lora_A.requires_grad_(False)

    def local_update(self, model: nn.Module, batches, *, steps: int, lr: float, loss_fn: LossFn = lm_loss) -> Message:
        loss = local_training(model, batches, steps=steps, lr=lr, loss_fn=loss_fn)
        message = {f"{p}.lora_B": a.lora_B.detach().clone() for p, a in self._adapters(model).items()}
        return {**message, "loss": torch.tensor(loss)}

    def aggregate(self, messages: Sequence[Message]) -> None:
        for path, (a, _) in self.global_factors.items():
            b = torch.stack([m[f"{path}.lora_B"] for m in messages]).mean(0)
            if self.reorthogonalise and bool(b.any()):
                b, a = refactor(b, a)
            self.global_factors[path] = (a, b)


class FedAvgLoRA(_LoraStrategy):
    """FedAvg of LoRA factors: clients train ``A`` and ``B``; the server averages each."""

    name = "fedavg_lora"

    def local_update(self, model: nn.Module, batches, *, steps: int, lr: float, loss_fn: LossFn = lm_loss) -> Message:
        loss = local_training(model, batches, steps=steps, lr=lr, loss_fn=loss_fn)
        message: Message = {"loss": torch.tensor(loss)}
        for p, a in self._adapters(model).items():
            message[f"{p}.lora_A"], message[f"{p}.lora_B"] = a.lora_A.detach().clone(), a.lora_B.detach().clone()
        return message

    def aggregate(self, messages: Sequence[Message]) -> None:
        for path in self.global_factors:
            a = torch.stack([m[f"{path}.lora_A"] for m in messages]).mean(0)
            b = torch.stack([m[f"{path}.lora_B"] for m in messages]).mean(0)
            self.global_factors[path] = (a, b)


__all__ = ["FedAvgLoRA", "FedSVD", "refactor"]
