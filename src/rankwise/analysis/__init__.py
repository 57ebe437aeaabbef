"""rankwise.analysis: how low-rank a model's weights are, and what fine-tuning changed.

- :func:`spectrum`: singular values and effective / stable / energy ranks of every linear layer.
- :func:`intruder_dimensions`: new leading singular vectors of a fine-tuned model (LoRA's
  "intruder dimensions") relative to its base.
- :func:`nuclear_norm_score`: the Matrix Nuclear-Norm evaluation of a language model.

See ``docs/analysis.md``.
"""

from rankwise.analysis.intruders import IntruderResult, LayerIntruders, intruder_dimensions
from rankwise.analysis.nuclear_norm import NuclearNormResult, nuclear_norm_score
from rankwise.analysis.spectrum import LayerSpectrum, SpectrumResult, spectrum

__all__ = [
    "IntruderResult",
    "LayerIntruders",
    "LayerSpectrum",
    "NuclearNormResult",
    "SpectrumResult",
    "intruder_dimensions",
    "nuclear_norm_score",
    "spectrum",
]
