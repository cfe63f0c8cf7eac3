"""What the ``fast`` decoder's reduced precision costs, against ``exact`` (= stock audiocraft).

Two measures on the same model and inputs:

- teacher-forced: both decoders read the same token sequence (one ``exact``
  generation), and at every step their next-token distributions (after
  classifier-free guidance, at temperature 1) are compared: KL(exact || fast),
  total variation, agreement of the most likely token, max |logit difference|;
- free-running: the share of tokens two generations from the same seed have in
  common (once one sampled token differs, the continuations part ways, so this
  mostly says how early the first difference comes).

Random weights give flatter distributions than trained ones; the divergences are a
measure of numerical error, which is what precision changes.
"""

from __future__ import annotations

import typing as tp

import torch

from musicgen_service.decoding.precision import DECIDED_MARGIN


def _conditions(lm: tp.Any, prompt: str) -> tp.Dict[str, tp.Any]:
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout, ConditioningAttributes

    conditions = [ConditioningAttributes(text={"description": prompt})]
    model_wavs = "self_wav" in lm.condition_provider.conditioners
    if model_wavs:  # a melody model without a melody: stock's null melody
        from audiocraft.modules.conditioners import WavCondition

        device = next(lm.parameters()).device
        for attr in conditions:
            attr.wav["self_wav"] = WavCondition(
                torch.zeros((1, 1, 1), device=device),
                torch.tensor([0], device=device),
                sample_rate=[32000],
                path=[None],
            )
    conditions = conditions + ClassifierFreeGuidanceDropout(p=1.0)(conditions)
    return lm.condition_provider(lm.condition_provider.tokenize(conditions))


@torch.no_grad()
def teacher_forced(
    model: tp.Any, reference: tp.Any, candidate: tp.Any, prompt: str, codes: torch.Tensor, cfg_coef: float = 3.0
) -> tp.Dict[str, float]:
    """Compare two Runners step by step on the pattern sequence of ``codes`` ([1, K, T])."""
    lm = model.lm
    tensors = _conditions(lm, prompt)
    pattern = lm.pattern_provider.get_pattern(codes.shape[-1])
    seq, _, _ = pattern.build_pattern_sequence(codes, lm.special_token_id)
    seq = torch.cat([seq, seq], dim=0)
    steps = seq.shape[-1]
    a, b = reference.start(tensors, 2, steps), candidate.start(tensors, 2, steps)
    kl, tv, agree, max_diff = [], [], [], 0.0
    decided_agree, decided = 0, 0  # top-1 where exact is decided: auto's bar (decoding/precision.py)

    def combine(logits: torch.Tensor) -> torch.Tensor:
        cond, uncond = logits.float().split(1, dim=0)
        return uncond + (cond - uncond) * cfg_coef

    for t in range(1, steps):
        if t == 1:
            la, lb = a.prefill(seq[..., :1]), b.prefill(seq[..., :1])
        else:
            la, lb = a.step(seq[..., t - 1 : t]), b.step(seq[..., t - 1 : t])
        la, lb = combine(la), combine(lb)
        pa, pb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
        kl.append((pa.exp() * (pa - pb)).sum(-1).mean().item())
        tv.append(0.5 * (pa.exp() - pb.exp()).abs().sum(-1).mean().item())
        same = la.argmax(-1) == lb.argmax(-1)
        agree.append(same.float().mean().item())
        top2 = pa.exp().topk(2, dim=-1).values
        sure = (top2[..., 0] - top2[..., 1]) >= DECIDED_MARGIN
        decided_agree += int(same[sure].sum())
        decided += int(sure.sum())
        max_diff = max(max_diff, (la - lb).abs().max().item())
    return {
        "steps": steps - 1,
        "kl_mean": sum(kl) / len(kl),
        "kl_max": max(kl),
        "total_variation_mean": sum(tv) / len(tv),
        "top1_agreement": sum(agree) / len(agree),
        "max_abs_logit_diff": max_diff,
        "decided_positions": decided,
        "top1_agreement_decided": decided_agree / decided if decided else None,
    }
