"""The LM's weight matrices, by their state-dict names: in every transformer layer the self-attention's
fused q/k/v projection (``in_proj_weight``, a bare Parameter audiocraft multiplies with ``F.linear``) and
its output projection, the cross-attention's two (text models), the feed-forward's ``linear1`` /
``linear2``; and the ``K`` output heads ``linears.k``. They are what a decoding step streams (a
reduced-precision decoder keeps its own copies of them: :mod:`..decoding.runner`) and what LoRA adapts
(:mod:`.lora`). Embeddings, norms, biases and the conditioners' projections are not among them.
"""
from __future__ import annotations

import re

MATRICES = re.compile(r"^(transformer\.layers\.\d+\.(self_attn\.in_proj_weight|self_attn\.out_proj\.weight|"
                      r"cross_attention\.in_proj_weight|cross_attention\.out_proj\.weight|linear1\.weight|"
                      r"linear2\.weight)|linears\.\d+\.weight)$")


def is_matrix(parameter: str) -> bool:
    """Whether the LM parameter of that state-dict name is one of its weight matrices."""
    return MATRICES.match(parameter) is not None
