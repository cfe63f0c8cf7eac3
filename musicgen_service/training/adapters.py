"""LoRA adapters on MusicGen's LM: how they are attached for training, and saved.

Targets (:data:`..weights.lora.TARGETS`, the LM's weight matrices): in every transformer layer the
self-attention's fused q/k/v projection ``self_attn.in_proj_weight`` (a bare ``nn.Parameter`` that
audiocraft multiplies with ``F.linear``, not an ``nn.Linear``), its output projection, the
cross-attention's (text models: its keys/values read the text) and the feed-forward ``linear1`` /
``linear2``; and the ``K`` output heads ``linears.k`` (they map the transformer's state to each
codebook's distribution, where a style shows first). Embeddings, norms and the conditioners'
projections stay frozen.

Mechanism: a :class:`LoRA` parametrization (``torch.nn.utils.parametrize``) on each target weight, so
that reading the weight gives ``W + scale * B @ A`` (:func:`..weights.lora.delta`) with ``B`` starting at
zero (the adapted model starts as the base) and ``scale = alpha / rank``; the training loop computes
each adapted weight once per forward (``parametrize.cached()``). One mechanism for ``nn.Linear`` weights
and bare Parameters alike, with audiocraft's modules left as they are. Measured against recomputing at
every read and against forward hooks on the ``nn.Linear`` targets (the usual ``x @ A.T @ B.T``, which
ran out of memory at batch 2 on a 23 GB CPU machine): bench/results/train.md. What remains above the
activations is each adapted weight computed once per forward (~1.6 GB in fp32 for musicgen-small).

``peft`` was considered: its LoRA layers replace ``nn.Linear`` modules with its own, and a bare
Parameter needs its ``target_parameters`` (0.17+), itself a parametrization; one small class does
both here, without another dependency pinned against this torch and transformers.

Saved as ``<parameter>.lora_A`` [rank, in] / ``<parameter>.lora_B`` [out, rank] in fp16
(:mod:`..weights.trained`); merged into the weights when served (:func:`..weights.lora.merge`).
"""

from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..weights import lora


class LoRA(nn.Module):
    """``W -> W + scale * B @ A``; ``A`` [rank, in] Kaiming-uniform (as ``nn.Linear``'s init), ``B``
    [out, rank] zero. Kept in fp32 whatever the base weight's dtype (the update is cast to it)."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        generator: torch.Generator,
        device: tp.Any = None,
    ):
        super().__init__()
        a = torch.empty(rank, in_features)
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear initialises
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + lora.delta(self.A, self.B, self.scale).to(weight.dtype)


def _owner(lm: nn.Module, name: str) -> tp.Tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return lm.get_submodule(module_name), attr


def attach(lm: nn.Module, rank: int, alpha: float, seed: int) -> tp.Dict[str, LoRA]:
    """Add a LoRA to every target of ``lm``; everything else is frozen. Returns them by parameter name."""
    generator = torch.Generator().manual_seed(seed)
    for p in lm.parameters():
        p.requires_grad_(False)
    adapters = {}
    for name in lora.targets(lm):
        module, attr = _owner(lm, name)
        weight = getattr(module, attr)
        adapter = LoRA(weight.shape[0], weight.shape[1], rank, alpha, generator, weight.device)
        parametrize.register_parametrization(module, attr, adapter)
        adapters[name] = adapter
    return adapters


def detach_merged(lm: nn.Module, adapters: tp.Mapping[str, LoRA]) -> None:
    """Remove the parametrizations, leaving each weight as its merged value (for sampling after
    training)."""
    with torch.no_grad():
        for name in adapters:
            module, attr = _owner(lm, name)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def state(adapters: tp.Mapping[str, LoRA]) -> tp.Dict[str, torch.Tensor]:
    """What the trained file stores: ``<parameter>.lora_A`` / ``.lora_B`` in fp16."""
    out = {}
    for name, adapter in adapters.items():
        a_name, b_name = lora.tensor_names(name)
        out[a_name] = adapter.A.detach().to("cpu", torch.float16)
        out[b_name] = adapter.B.detach().to("cpu", torch.float16)
    return out
