"""Next-token sampling that a CUDA graph can record, with audiocraft's results.

audiocraft samples with ``utils.sample_top_k`` / ``sample_top_p`` /
``multinomial`` (``LMModel._sample_next_token``): Python-number parameters,
a ``torch.topk`` whose ``k`` is a shape, and ``torch.multinomial``, which reads
values back on the host for its sanity checks. None of that can live in a
recorded graph that serves every request. :class:`StepSampler` computes the
same thing from parameters held in device tensors:

- classifier-free guidance ``uncond + (cond - uncond) * cfg``;
- ``softmax(logits / temperature)`` (on CUDA, stock's division by a Python float
  is a multiplication by its float32 reciprocal: done the same way here);
- one ``torch.sort`` gives both the top-k threshold (the k-th largest value, as
  ``topk(probs, k)[..., -1]``) and top-p's sorted probabilities;
- ``torch.multinomial(p, 1)`` is ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn by
  ``exponential_`` on a tensor of p's shape (torch's own algorithm for one
  sample): one draw serves every branch, so the random stream advances exactly
  as stock's does, and the same seed gives the same tokens
  (tests/test_decoding.py compares them with :func:`.loop.sample`);
- greedy (``use_sampling=False`` or temperature 0): ``argmax`` of the logits.

Every branch is computed and one is selected with ``torch.where``: a few small
kernels per step, no host synchronisation, one graph for every parameter set.
"""

from __future__ import annotations

import typing as tp

import torch


def guide(all_logits: torch.Tensor, batch: int, cfg_coef: tp.Union[float, torch.Tensor]) -> torch.Tensor:
    """Classifier-free guidance: [2B, K, card] conditional then unconditional logits -> [B, K, card]
    ``uncond + (cond - uncond) * cfg_coef`` (``LMModel._sample_next_token``'s arithmetic)."""
    cond, uncond = all_logits.split(batch, dim=0)
    return uncond + (cond - uncond) * cfg_coef


class StepSampler:
    """Sampling parameters as device tensors, and the sampling computation on them."""

    def __init__(self, device: torch.device, card: int):
        self.device = device
        self.card = card
        f32 = dict(device=device, dtype=torch.float32)
        self.cfg_coef = torch.zeros((), **f32)
        self.temp = torch.ones((), **f32)
        self.inv_temp = torch.ones((), **f32)
        self.top_p = torch.zeros((), **f32)
        self.k_index = torch.zeros((1, 1, 1), device=device, dtype=torch.long)
        self.greedy = torch.zeros((), device=device, dtype=torch.bool)
        self.use_top_p = torch.zeros((), device=device, dtype=torch.bool)
        self.use_top_k = torch.zeros((), device=device, dtype=torch.bool)

    def set(self, use_sampling: bool, temp: float, top_k: int, top_p: float, cfg_coef: float) -> None:
        """Load one request's parameters (host-to-device copies, before the steps run)."""
        greedy = not (use_sampling and temp > 0.0)
        temp = 1.0 if greedy else float(temp)
        self.cfg_coef.fill_(float(cfg_coef))
        self.temp.fill_(temp)
        # float32 reciprocal of the float32 temperature: what CUDA's division by a scalar computes
        self.inv_temp.copy_(torch.ones((), dtype=torch.float32) / torch.tensor(temp, dtype=torch.float32))
        self.top_p.fill_(float(top_p))
        self.k_index.fill_(min(max(int(top_k), 1), self.card) - 1)
        self.greedy.fill_(greedy)
        self.use_top_p.fill_(top_p > 0.0)
        self.use_top_k.fill_(top_k > 0)

    def guide(self, all_logits: torch.Tensor, batch: int) -> torch.Tensor:
        """:func:`guide` with this request's weight (a device tensor)."""
        return guide(all_logits, batch, self.cfg_coef)

    def __call__(self, logits: torch.Tensor, generator: tp.Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, K, card] logits -> [B, K, 1] tokens; the draw from ``generator`` (default: torch's)."""
        if logits.device.type == "cuda":
            scaled = logits * self.inv_temp
        else:
            scaled = logits / self.temp
        probs = torch.softmax(scaled, dim=-1)
        # torch.multinomial(probs.reshape(-1, card), 1): q ~ Exp(1) of that shape, argmax(p / q)
        q = torch.empty_like(probs.reshape(-1, probs.shape[-1])).exponential_(1, generator=generator).view_as(probs)
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
        # top-k: keep probabilities >= the k-th largest, renormalize
        kth = probs_sort.gather(-1, self.k_index.expand(*probs.shape[:-1], 1))
        top_k = probs * (probs >= kth).float()
        top_k = top_k / top_k.sum(dim=-1, keepdim=True)
        # top-p: in sorted order, drop what lies past the cumulative mass p
        mask = torch.cumsum(probs_sort, dim=-1) - probs_sort > self.top_p
        top_p = probs_sort * (~mask).float()
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        token_p = probs_idx.gather(-1, (top_p / q).argmax(dim=-1, keepdim=True))
        token_k = (top_k / q).argmax(dim=-1, keepdim=True)
        token_all = (probs / q).argmax(dim=-1, keepdim=True)
        sampled = torch.where(self.use_top_p, token_p, torch.where(self.use_top_k, token_k, token_all))
        return torch.where(self.greedy, logits.argmax(dim=-1, keepdim=True), sampled)
