"""LoRA's arithmetic, one definition for training and serving: which weights it adapts, how its
tensors are named in a trained file, and the update ``scale * B @ A`` of an adapted weight (training adds
it at every forward: :mod:`..training.adapters`; serving merges it once: :func:`merge`).

For a weight ``W`` [out, in] and rank ``r``: ``A`` [r, in], ``B`` [out, r], ``scale = alpha / r``; the
adapted weight is ``W + scale * B @ A``. A trained file stores ``<weight>.lora_A`` and ``<weight>.lora_B``
(:mod:`.trained`).
"""
from __future__ import annotations

import typing as tp

from ..core.errors import TrainedError
from .layout import MATRICES

if tp.TYPE_CHECKING:
    import torch
    from torch import nn

TARGETS = MATRICES  # LoRA adapts every weight matrix of the LM (weights/layout.py)
A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"


def targets(lm: "nn.Module") -> tp.List[str]:
    """The LM's parameter names that LoRA adapts."""
    return [name for name, _ in lm.named_parameters() if TARGETS.match(name)]


def max_rank(dim: int, card: int) -> int:
    """The rank a LoRA on an LM of width ``dim`` and codebook size ``card`` cannot exceed: the narrowest
    side of an adapted matrix (the feed-forward's sides are wider than the width)."""
    return min(dim, card)


def tensor_names(weight: str) -> tp.Tuple[str, str]:
    """The names of ``weight``'s A and B in a trained file."""
    return weight + A_SUFFIX, weight + B_SUFFIX


def adapted(names: tp.Iterable[str]) -> tp.List[str]:
    """The weights a trained file's tensor ``names`` adapt, sorted."""
    return sorted(n[: -len(A_SUFFIX)] for n in names if n.endswith(A_SUFFIX))


def delta(a: "torch.Tensor", b: "torch.Tensor", scale: float) -> "torch.Tensor":
    """The update of one adapted weight: ``scale * B @ A``, in the dtype of ``a`` and ``b``."""
    return (b @ a) * scale


def merge(lm: "nn.Module", tensors: tp.Mapping[str, "torch.Tensor"], rank: int, alpha: float) -> int:
    """``W += scale * B @ A`` for every adapted weight of ``lm``, computed in fp32 then cast to the
    weight's dtype. Weights left empty (a stored decoder holds them, made from these very weights) are
    skipped. Returns the number merged."""
    import torch

    scale = float(alpha) / int(rank)
    merged = 0
    with torch.no_grad():
        for name in adapted(tensors):
            try:
                weight = lm.get_parameter(name)
            except AttributeError:
                raise TrainedError(f"the trained file adapts {name}, which this LM does not have") from None
            if weight.numel() == 0:
                continue
            a_name, b_name = tensor_names(name)
            a, b = tensors[a_name].float().to(weight.device), tensors[b_name].float().to(weight.device)
            if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise TrainedError(f"the trained file's {name} is {b.shape[0]}x{a.shape[1]}, the LM's "
                                   f"{tuple(weight.shape)}")
            weight.data.copy_((weight.data.float() + delta(a, b, scale)).to(weight.dtype))
            merged += 1
    return merged
