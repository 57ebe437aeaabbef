"""``PELALinear``: low-rank approximation of a pretrained model, then training the factors
("PELA: Learning Parameter-Efficient Models with Low-Rank Approximation", Guo et al., CVPR 2024).

PELA replaces each pretrained weight ``W`` by its best rank-``r`` factors (truncated SVD,
``W ≈ U V``) and trains only those factors in an intermediate pre-training stage, with the
original model frozen beside it as a teacher. Two extra terms keep the low-rank model close to
the original:

- feature distillation (:func:`feature_distillation_loss`): the low-rank model's token features
  are pulled towards the frozen model's (mean squared error);
- weight perturbation regularisation (:func:`weight_perturbation_loss`): each recovered matrix
  ``U V`` is kept close to the original ``W`` (relative squared Frobenius distance).

The training objective is ``task + λ_fd · distill + λ_wp · perturbation``. After training, the
layers are ordinary low-rank layers: a ``PELALinear`` is a
:class:`~rankwise.layers.LowRankLinear` (same forward, same checkpoint format), and it equals
the original layer when ``r = min(in, out)``.

Parameters: ``r (in + out)`` (+ ``out`` bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError, ShapeError
from rankwise.layers.base import register_trainable
from rankwise.layers.lowrank import LowRankLinear


@register_trainable("pela")
class PELALinear(LowRankLinear):
    """A :class:`LowRankLinear` built by PELA's truncated SVD of a pretrained layer, whose factors
    ``U (out, r)``, ``V (r, in)`` (and bias) are trained with the losses of this module."""


def feature_distillation_loss(
    student: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean squared error between the low-rank model's features and the frozen model's
    (detached), averaged over the given feature tensors (e.g. every hidden state of a
    ``output_hidden_states=True`` forward)."""
    students = [student] if isinstance(student, torch.Tensor) else list(student)
    teachers = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    if not students or len(students) != len(teachers):
        raise ShapeError(f"need as many student as teacher features (>= 1); got {len(students)} and {len(teachers)}")
    losses = []
    for s, t in zip(students, teachers, strict=True):
        if s.shape != t.shape:
            raise ShapeError(f"student features {tuple(s.shape)} and teacher features {tuple(t.shape)} differ in shape")
        losses.append(F.mse_loss(s.float(), t.detach().float()))
    return torch.stack(losses).mean()


def weight_perturbation_loss(student: nn.Module, teacher: nn.Module) -> torch.Tensor:
    """``mean_l ‖U_l V_l − W_l‖²_F / ‖W_l‖²_F`` over the :class:`PELALinear` layers of
    ``student``, ``W_l`` the weight at the same path in the frozen ``teacher`` (detached)."""
    terms = []
    for path, layer in student.named_modules():
        if not isinstance(layer, PELALinear):
            continue
        original = teacher.get_submodule(path).weight.detach().float()
        if original.shape != (layer.out_features, layer.in_features):
            raise ShapeError(f"{path!r}: teacher weight {tuple(original.shape)} does not match the low-rank layer")
        diff = layer.dense_weight().float() - original
        terms.append(diff.pow(2).sum() / original.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny))
    if not terms:
        raise ConfigError("the student has no PELALinear layer; convert it with rankwise.layers.convert(model, 'pela', ...)")
    return torch.stack(terms).mean()


__all__ = ["PELALinear", "feature_distillation_loss", "weight_perturbation_loss"]
