"""The decoding loop: ``LMModel.generate`` (audiocraft 1.3.0) step for step, on a :class:`Runner`.

Kept identical to stock where it decides what the output is: conditions and their
null (unconditional) twins in one batch, the codebook interleaving pattern, the
sampling functions (so the random stream is consumed the same way), the handling
of masked pattern positions and the final checks. What differs is where the
logits come from (:meth:`Window.prefill` / :meth:`Window.step`), and that nothing
inside the loop waits for the device: masked positions are set with
``torch.where`` instead of boolean indexing, and progress is counted on the host.

Two ways through the steps:

- dynamic (``exact``, and every precision on CPUs): :meth:`.window.Window.step` and :func:`sample`,
  audiocraft's own sampling functions;
- static (a reduced precision on CUDA): whole steps on fixed buffers, replayed from CUDA
  graphs (:class:`.graphs.StepGraphs`; sampling by :class:`.sampling.StepSampler`,
  which gives :func:`sample`'s tokens for the same seed).
"""

from __future__ import annotations

import typing as tp

import torch

from .sampling import guide


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


def condition_tensors(
    lm: tp.Any, conditions: tp.List[tp.Any], negative: tp.Optional[str] = None
) -> tp.Dict[str, tp.Any]:
    """The conditions and their null (unconditional) twins in one batch, as stock computes them
    without two-step guidance; {} without conditions. ``negative``: a negative prompt, the twins'
    text instead of none, so that guidance steers away from it (their melody stays null)."""
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

    if not conditions:
        return {}
    null_conditions = ClassifierFreeGuidanceDropout(p=1.0)(conditions)
    if negative:
        for twin in null_conditions:
            for name in twin.text:
                twin.text[name] = negative
    return lm.condition_provider(lm.condition_provider.tokenize(conditions + null_conditions))


UNKNOWN = -1  # a token not generated yet (LMModel.generate's unknown_token)


def masked_column(
    valid: torch.Tensor, current: torch.Tensor, sampled: torch.Tensor, special: torch.Tensor
) -> torch.Tensor:
    """The token column to write from sampled [B, K, 1] tokens: masked pattern positions (``valid``
    false) get the special token, known positions (a prompt's, ``current`` not :data:`UNKNOWN`) keep
    theirs (``LMModel.generate``'s step, without a host read)."""
    return torch.where(current == UNKNOWN, torch.where(valid, sampled, special), current)


class Sequence:
    """One window's codebook pattern: the interleaved token sequence being filled, its validity
    mask and where generation starts (``LMModel.generate``'s bookkeeping, step for step)."""

    UNKNOWN = UNKNOWN

    def __init__(self, lm: tp.Any, prompt: torch.Tensor, max_gen_len: int):
        B, K, T = prompt.shape
        assert T < max_gen_len
        self.lm = lm
        self.prompt_len = T
        self.max_gen_len = max_gen_len
        self.pattern = lm.pattern_provider.get_pattern(max_gen_len)
        gen_codes = torch.full((B, K, max_gen_len), self.UNKNOWN, dtype=torch.long, device=prompt.device)
        gen_codes[..., :T] = prompt
        self.tokens, _, self.mask = self.pattern.build_pattern_sequence(gen_codes, lm.special_token_id)
        self.start = self.pattern.get_first_step_with_timesteps(T)
        assert self.start is not None
        self.length = self.tokens.shape[-1]
        self.special = torch.full((), lm.special_token_id, dtype=torch.long, device=prompt.device)

    def write(self, offset: int, next_token: torch.Tensor) -> None:
        """Set column ``offset`` from sampled [B, K, 1] tokens (:func:`masked_column`)."""
        B = self.tokens.shape[0]
        valid = self.mask[..., offset : offset + 1].expand(B, -1, -1)
        current = self.tokens[..., offset : offset + 1]
        self.tokens[..., offset : offset + 1] = masked_column(valid, current, next_token, self.special)

    def codes(self, remove_prompts: bool = False) -> torch.Tensor:
        """The finished sequence back in codebook order, with stock's final checks."""
        lm, gen_sequence, B = self.lm, self.tokens, self.tokens.shape[0]
        assert not (gen_sequence == self.UNKNOWN).any()
        assert (
            gen_sequence == torch.where(self.mask[None, ...].expand(B, -1, -1), gen_sequence, lm.special_token_id)
        ).all()
        out_codes, _, _ = self.pattern.revert_pattern_sequence(gen_sequence, special_token=self.UNKNOWN)
        assert (out_codes[..., : self.max_gen_len] != self.UNKNOWN).all()
        out_codes = out_codes[..., (self.prompt_len if remove_prompts else 0) : self.max_gen_len]
        assert (out_codes >= 0).all() and (out_codes <= lm.card).all()
        return out_codes


class WindowView:
    """What a window has generated so far, in codebook order (for streaming: :mod:`..serving.streaming`)."""

    def __init__(self, seq: Sequence, live: tp.Callable[[], torch.Tensor]):
        self.seq, self.live = seq, live

    @property
    def prompt_frames(self) -> int:
        return self.seq.prompt_len

    def completed(self) -> torch.Tensor:
        """[B, K, n]: the frames whose every codebook is known (the prompt's included)."""
        tokens = self.live().clone()
        codes, _, _ = self.seq.pattern.revert_pattern_sequence(tokens, special_token=Sequence.UNKNOWN)
        codes = codes[..., : self.seq.max_gen_len]
        unknown = (codes == Sequence.UNKNOWN).any(dim=1).any(dim=0)  # [T]
        n = int(unknown.nonzero()[0]) if unknown.any() else codes.shape[-1]
        return codes[..., :n]


def generate(
    decoder: tp.Any,
    prompt: tp.Optional[torch.Tensor],
    conditions: tp.List[tp.Any],
    num_samples: tp.Optional[int],
    max_gen_len: int,
    use_sampling: bool,
    temp: float,
    top_k: int,
    top_p: float,
    cfg_coef: tp.Optional[float],
    remove_prompts: bool,
    callback: tp.Optional[tp.Callable[[int, int], None]],
    tap: tp.Optional[tp.Callable[[WindowView], None]] = None,
    negative: tp.Optional[str] = None,
) -> torch.Tensor:
    lm = decoder.lm
    runner = decoder.runner
    assert not lm.training, "generation shouldn't be used in training mode."
    device = next(iter(lm.parameters())).device
    cfg_coef = lm.cfg_coef if cfg_coef is None else cfg_coef

    if num_samples is None:
        num_samples = prompt.shape[0] if prompt is not None else (len(conditions) if conditions else 1)
    tensors = condition_tensors(lm, conditions, negative)
    if prompt is None:
        prompt = torch.zeros((num_samples, lm.num_codebooks, 0), dtype=torch.long, device=device)
    seq = Sequence(lm, prompt, max_gen_len)
    B = prompt.shape[0]
    batch = 2 * B if tensors else B
    cfg = bool(tensors)

    if tap is not None:  # (the graphs keep the tokens in their own buffer while they run)
        tap(
            WindowView(
                seq,
                (lambda: decoder.graphs.tokens[..., : seq.length])
                if decoder.graphs is not None
                else (lambda: seq.tokens),
            )
        )
    if decoder.graphs is not None:
        graphs = decoder.graphs
        window = runner.start(tensors, batch, seq.length, caches=graphs.caches_for(batch))
        graphs.sampler.set(use_sampling, temp, top_k, top_p, cfg_coef)
        graphs.run(window, seq.tokens, seq.mask, seq.start, cfg, callback)
    else:
        window = runner.start(tensors, batch, seq.length)
        prev_offset = 0
        for offset in range(seq.start, seq.length):
            curr_sequence = seq.tokens[..., prev_offset:offset]
            if cfg:
                curr_sequence = torch.cat([curr_sequence, curr_sequence], dim=0)
            all_logits = window.prefill(curr_sequence) if prev_offset == 0 else window.step(curr_sequence)
            logits = guide(all_logits, B, cfg_coef) if cfg else all_logits  # [B, K, card]
            seq.write(offset, sample(logits, use_sampling, temp, top_k, top_p))  # [B, K, 1]
            prev_offset = offset
            if callback is not None:
                callback(1 + offset - seq.start, seq.length - seq.start)
    return seq.codes(remove_prompts)
