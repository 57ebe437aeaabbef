"""rankwise.analysis: how low-rank a model's weights are, and what fine-tuning changed.

- :func:`spectrum`: singular values and effective / stable / energy ranks of every linear layer.
- :func:`intruder_dimensions`: new leading singular vectors of a fine-tuned model (LoRA's
  "intruder dimensions") relative to its base.
- :func:`nuclear_norm_score`: the Matrix Nuclear-Norm evaluation of a language model.
- :class:`MFAC`: matrix-free inverse-Fisher-vector products over a window of gradients.

See ``docs/analysis.md``.
"""

from rankwise.analysis.intruders import IntruderResult, LayerIntruders, intruder_dimensions
from rankwise.analysis.mfac import MFAC
from rankwise.analysis.nuclear_norm import NuclearNormResult, nuclear_norm_score
from rankwise.analysis.spectrum import LayerSpectrum, SpectrumResult, spectrum

__all__ = [
    "IntruderResult",
    "LayerIntruders",
    "LayerSpectrum",
    "MFAC",
    "NuclearNormResult",
    "SpectrumResult",
    "intruder_dimensions",
    "nuclear_norm_score",
    "spectrum",
]
