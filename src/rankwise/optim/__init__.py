"""rankwise.optim: optimizers whose state scales with rank, on one projected Adam update.

A projector (``"svd"``, ``"dct"``, ``"identity"``; :data:`PROJECTORS`) picks the subspace;
:class:`ProjectedAdamW` is the update; each paper is a small subclass:

- :class:`GaLoreAdamW` (GaLore 2024; refresh by randomized SVD),
- :class:`DCTAdamW` (SVD-free DCT projection 2025),
- :class:`FrugalAdamW` (FRUGAL 2024; signSGD on the residual),
- :class:`GradNormLoRPAdamW` (GradNormLoRP 2024; weight-normalised directions).
"""

from rankwise.optim.base import (
    GROUP_OPTIONS,
    PROJ_TYPES,
    PROJECTORS,
    ProjectedAdamW,
    Projector,
    adam_direction,
    embedding_parameters,
    projection_sides,
    register_projector,
)
from rankwise.optim.dct import DCTAdamW, DCTProjector
from rankwise.optim.frugal import FrugalAdamW
from rankwise.optim.galore import GaLoreAdamW, SVDProjector
from rankwise.optim.gradnorm import GradNormLoRPAdamW
from rankwise.optim.identity import IdentityProjector

__all__ = [
    "GROUP_OPTIONS",
    "PROJECTORS",
    "PROJ_TYPES",
    "DCTAdamW",
    "DCTProjector",
    "FrugalAdamW",
    "GaLoreAdamW",
    "GradNormLoRPAdamW",
    "IdentityProjector",
    "ProjectedAdamW",
    "Projector",
    "SVDProjector",
    "adam_direction",
    "embedding_parameters",
    "projection_sides",
    "register_projector",
]
