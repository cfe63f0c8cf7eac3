"""The decoding loop: ``LMModel.generate`` (audiocraft 1.3.0) step for step, on a :class:`Runner`.

Kept identical to stock where it decides what the output is: conditions and their
null (unconditional) twins in one batch, the codebook interleaving pattern, the
sampling functions (so the random stream is consumed the same way), the handling
of masked pattern positions and the final checks. What differs is where the
logits come from (:meth:`Window.prefill` / :meth:`Window.step`), and that nothing
inside the loop waits for the device: masked positions are set with
``torch.where`` instead of boolean indexing, and progress is counted on the host.

Two ways through the steps:

- dynamic (``exact``; ``fast`` on CPUs): :meth:`Window.step` and :func:`sample`,
  audiocraft's own sampling functions;
- static (``fast`` on CUDA): whole steps on fixed buffers, replayed from CUDA
  graphs (:class:`.graphs.StepGraphs`; sampling by :class:`.sampling.StepSampler`,
  which gives :func:`sample`'s tokens for the same seed).
"""
from __future__ import annotations

import typing as tp

import torch


def sample(logits: torch.Tensor, use_sampling: bool, temp: float, top_k: int, top_p: float) -> torch.Tensor:
    """``LMModel._sample_next_token``'s sampling, from [B, K, card] logits."""
    from audiocraft.utils import utils

    if use_sampling and temp > 0.0:
        probs = torch.softmax(logits / temp, dim=-1)
        if top_p > 0.0:
            return utils.sample_top_p(probs, p=top_p)
        if top_k > 0:
            return utils.sample_top_k(probs, k=top_k)
        return utils.multinomial(probs, num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)


def generate(decoder: tp.Any, prompt: tp.Optional[torch.Tensor], conditions: tp.List[tp.Any],
             num_samples: tp.Optional[int], max_gen_len: int, use_sampling: bool, temp: float, top_k: int,
             top_p: float, cfg_coef: tp.Optional[float], remove_prompts: bool,
             callback: tp.Optional[tp.Callable[[int, int], None]]) -> torch.Tensor:
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

    lm = decoder.lm
    runner = decoder.runner
    assert not lm.training, "generation shouldn't be used in training mode."
    device = next(iter(lm.parameters())).device
    cfg_coef = lm.cfg_coef if cfg_coef is None else cfg_coef

    if num_samples is None:
        num_samples = prompt.shape[0] if prompt is not None else (len(conditions) if conditions else 1)
    if conditions:  # conditional and unconditional in one batch, as stock does without two_step_cfg
        null_conditions = ClassifierFreeGuidanceDropout(p=1.0)(conditions)
        condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(conditions + null_conditions))
    else:
        condition_tensors = {}
    if prompt is None:
        prompt = torch.zeros((num_samples, lm.num_codebooks, 0), dtype=torch.long, device=device)

    B, K, T = prompt.shape
    start_offset = T
    assert start_offset < max_gen_len
    pattern = lm.pattern_provider.get_pattern(max_gen_len)
    unknown_token = -1
    gen_codes = torch.full((B, K, max_gen_len), unknown_token, dtype=torch.long, device=device)
    gen_codes[..., :start_offset] = prompt
    gen_sequence, _, mask = pattern.build_pattern_sequence(gen_codes, lm.special_token_id)
    start_offset_sequence = pattern.get_first_step_with_timesteps(start_offset)
    assert start_offset_sequence is not None
    gen_sequence_len = gen_sequence.shape[-1]
    batch = 2 * B if condition_tensors else B
    cfg = bool(condition_tensors)

    if decoder.graphs is not None:
        graphs = decoder.graphs
        window = runner.start(condition_tensors, batch, gen_sequence_len, caches=graphs.caches_for(batch))
        graphs.sampler.set(use_sampling, temp, top_k, top_p, cfg_coef)
        graphs.run(window, gen_sequence, mask, start_offset_sequence, cfg, callback)
    else:
        window = runner.start(condition_tensors, batch, gen_sequence_len)
        special = torch.full((), lm.special_token_id, dtype=torch.long, device=device)
        prev_offset = 0
        for offset in range(start_offset_sequence, gen_sequence_len):
            curr_sequence = gen_sequence[..., prev_offset:offset]
            if cfg:
                curr_sequence = torch.cat([curr_sequence, curr_sequence], dim=0)
            all_logits = window.prefill(curr_sequence) if prev_offset == 0 else window.step(curr_sequence)
            if cfg:
                cond_logits, uncond_logits = all_logits.split(B, dim=0)  # [B, K, card]
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_coef
            else:
                logits = all_logits
            next_token = sample(logits, use_sampling, temp, top_k, top_p)  # [B, K, 1]
            valid_mask = mask[..., offset:offset + 1].expand(B, -1, -1)
            next_token = torch.where(valid_mask, next_token, special)
            current = gen_sequence[..., offset:offset + 1]
            gen_sequence[..., offset:offset + 1] = torch.where(current == unknown_token, next_token, current)
            prev_offset = offset
            if callback is not None:
                callback(1 + offset - start_offset_sequence, gen_sequence_len - start_offset_sequence)

    assert not (gen_sequence == unknown_token).any()
    assert (gen_sequence == torch.where(mask[None, ...].expand(B, -1, -1), gen_sequence,
                                        lm.special_token_id)).all()
    out_codes, _, _ = pattern.revert_pattern_sequence(gen_sequence, special_token=unknown_token)
    assert (out_codes[..., :max_gen_len] != unknown_token).all()
    out_start_offset = start_offset if remove_prompts else 0
    out_codes = out_codes[..., out_start_offset:max_gen_len]
    assert (out_codes >= 0).all() and (out_codes <= lm.card).all()
    return out_codes
