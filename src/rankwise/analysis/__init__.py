"""rankwise.analysis: how low-rank a model's weights are, and what fine-tuning changed.

- :func:`spectrum`: singular values and effective / stable / energy ranks of every linear layer.
- :func:`intruder_dimensions`: new leading singular vectors of a fine-tuned model (LoRA's
  "intruder dimensions") relative to its base; :func:`reduce_intruder_dimensions` shrinks them.
- :func:`nuclear_norm_score`: the Matrix Nuclear-Norm evaluation of a language model.
- :func:`gradient_spectra`: per-layer nuclear norm / effective rank of loss gradients, per dataset.
- :func:`intrinsic_dimension`: training in random subspaces to find a task's d_int90.
- :class:`MFAC`: matrix-free inverse-Fisher-vector products over a window of gradients.

See ``docs/analysis.md``.
"""

from rankwise.analysis.gradients import GradientSpectra, gradient_spectra
from rankwise.analysis.intrinsic import IntrinsicDimensionResult, intrinsic_dimension
from rankwise.analysis.intruders import (
    IntruderResult,
    LayerIntruders,
    intruder_dimensions,
    reduce_intruder_dimensions,
)
from rankwise.analysis.mfac import MFAC
from rankwise.analysis.nuclear_norm import NuclearNormResult, nuclear_norm_score
from rankwise.analysis.spectrum import LayerSpectrum, SpectrumResult, spectrum

__all__ = [
    "GradientSpectra",
    "IntrinsicDimensionResult",
    "IntruderResult",
    "LayerIntruders",
    "LayerSpectrum",
    "MFAC",
    "NuclearNormResult",
    "SpectrumResult",
    "gradient_spectra",
    "intrinsic_dimension",
    "intruder_dimensions",
    "nuclear_norm_score",
    "reduce_intruder_dimensions",
    "spectrum",
]
