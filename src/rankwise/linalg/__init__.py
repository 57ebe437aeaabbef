"""rankwise.linalg: numerical kernels for low-rank structure (pure functions on tensors).

Shapes are ``(..., M, N)`` (batched over leading dimensions); results are NamedTuples;
randomness comes from an explicit ``generator``.
"""

from rankwise.linalg.metrics import effective_rank, energy_rank, nuclear_norm, stable_rank
from rankwise.linalg.nystrom import NystromFactors, NystromResult, nystrom, nystrom_general
from rankwise.linalg.svd import (
    LinearOperator,
    MatrixOperator,
    ProductOperator,
    RSVDResult,
    SVDResult,
    rsvd,
    svd_update,
    truncated_svd,
)

__all__ = [
    "LinearOperator",
    "MatrixOperator",
    "NystromFactors",
    "NystromResult",
    "ProductOperator",
    "RSVDResult",
    "SVDResult",
    "effective_rank",
    "energy_rank",
    "nuclear_norm",
    "nystrom",
    "nystrom_general",
    "rsvd",
    "stable_rank",
    "svd_update",
    "truncated_svd",
]

# --- other linalg kernels (streaming, completion, recovery, concat_svd, monarch, dct) below ---
