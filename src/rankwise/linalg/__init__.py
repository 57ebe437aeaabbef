"""rankwise.linalg: numerical kernels for low-rank structure (pure functions on tensors).

Shapes are ``(..., M, N)`` (batched over leading dimensions); results are NamedTuples;
randomness comes from an explicit ``generator``. Inputs are tensors or NumPy arrays
(converted with ``torch.as_tensor``; results are tensors), of any finite magnitude (see
:mod:`rankwise.linalg._checks`).
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

# --- other linalg kernels (streaming, completion, recovery, concat_svd, monarch, dct, mfac) below ---

from rankwise.linalg.completion import CompletionResult, complete_altmin  # noqa: E402
from rankwise.linalg.concat import (  # noqa: E402
    ConcatClusters,
    ConcatSVD,
    cluster_concat,
    concat_svd,
    concat_svd_update,
)
from rankwise.linalg.dct import DCTSelection, dct_basis, dct_select  # noqa: E402
from rankwise.linalg.mfac import MFAC  # noqa: E402
from rankwise.linalg.monarch import (  # noqa: E402
    MonarchFactors,
    monarch_dense,
    monarch_matmul,
    monarch_project,
)
from rankwise.linalg.recovery import (  # noqa: E402
    RecoveryResult,
    SensingOperator,
    recover_sensing,
    recover_subgradient,
)
from rankwise.linalg.streaming import TopEigResult, streaming_top_eigvec  # noqa: E402

__all__ += [
    "CompletionResult",
    "ConcatClusters",
    "ConcatSVD",
    "DCTSelection",
    "MFAC",
    "MonarchFactors",
    "RecoveryResult",
    "SensingOperator",
    "TopEigResult",
    "cluster_concat",
    "complete_altmin",
    "concat_svd",
    "concat_svd_update",
    "dct_basis",
    "dct_select",
    "monarch_dense",
    "monarch_matmul",
    "monarch_project",
    "recover_sensing",
    "recover_subgradient",
    "streaming_top_eigvec",
]
