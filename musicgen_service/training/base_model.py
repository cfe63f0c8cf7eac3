"""The base model as training uses it: loaded as the service loads it, then LoRA attached (a frozen
base) or every LM weight made trainable."""

from __future__ import annotations

import typing as tp

import torch

from ..core.settings import Settings
from . import adapters
from .options import Options

if tp.TYPE_CHECKING:
    from audiocraft.models import MusicGen


def load(settings: Settings, base: str, device: str) -> "MusicGen":
    """The base model, as the service loads it."""
    from ..weights import loading

    return loading.load_musicgen(settings.weights_dir, base, device)


def trainable(
    model: tp.Any, o: Options, seed: int
) -> tp.Tuple[tp.List[torch.nn.Parameter], tp.Dict[str, adapters.LoRA]]:
    """LoRA attached (frozen base) or every LM weight trainable; the trainable parameters."""
    lm = model.lm
    cuda = str(model.device).startswith("cuda")
    if o.method == "lora":
        if cuda and torch.cuda.is_bf16_supported():
            lm.to(torch.bfloat16)  # the frozen base in bf16; the adapters stay fp32
        loras = adapters.attach(lm, o.lora_rank, o.lora_alpha, seed)
        params = [p for lora in loras.values() for p in (lora.A, lora.B)]
        return params, loras
    lm.float()  # full: fp32 weights (bf16 autocast computes on GPUs)
    for p in lm.parameters():
        p.requires_grad_(True)
    return list(lm.parameters()), {}
