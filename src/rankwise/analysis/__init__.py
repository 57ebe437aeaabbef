"""rankwise.analysis: how low-rank a model's weights are, and what fine-tuning changed.

- :func:`spectrum`: singular values and effective / stable / energy ranks of every linear layer.

See ``docs/analysis.md``.
"""

from rankwise.analysis.spectrum import LayerSpectrum, SpectrumResult, spectrum

__all__ = ["LayerSpectrum", "SpectrumResult", "spectrum"]
