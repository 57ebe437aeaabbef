"""M-FAC inverse-Fisher-vector products: the kernel lives in :mod:`rankwise.linalg.mfac`
(tensors in, no modules) so ``rankwise.compress`` can use it for the ``mfac`` rank
allocator; this module re-exports it for ``from rankwise.analysis import MFAC``."""

from rankwise.linalg.mfac import MFAC

__all__ = ["MFAC"]
