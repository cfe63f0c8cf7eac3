"""Faster decoding for MusicGen's LM, behind ``LMModel.generate``'s own signature.

``Decoder(lm, mode).generate`` takes the arguments audiocraft's
``MusicGen._generate_tokens`` passes to ``lm.generate`` (once per extension
window), so audiocraft keeps doing conditioning, windowed extension and melody
handling; only the step loop changes. Modes:

- ``stock``: audiocraft's ``LMModel.generate`` itself (fallback and reference);
- ``exact``: :class:`.runner.Runner` in the parameters' own dtype: the same
  operators on the same values as stock, hence the same logits and tokens, minus
  the per-step waste (cross-attention re-projection, cache concatenation, einops);
- ``fast``: reduced-precision weights (bf16 on CPUs with native bf16, fp16 on
  AVX2 CPUs and on GPUs), explicit dtypes with autocast off, and on CUDA whole
  decoding steps (layers, guidance, sampling, token write) replayed from CUDA
  graphs (:mod:`.graphs`). Its cost in quality is measured by bench/quality.py
  (token agreement, logit divergence).

What ``exact`` promises: on the CPU, stock's very tokens for the same seed
(tested). On CUDA it runs under the same fp16 autocast as stock, with stock's
operators on stock's values, and the promise is a measured agreement, reported by
``bench/gpu_check.py`` next to stock's agreement with itself: on an H200, stock's
tokens for musicgen-small and 99.8% of them for stereo-melody-large (stock agreed
with itself 100%). On GPUs ``fast`` computes the same fp16 logits as ``exact``
(audiocraft's GPU dtype; KL 0 measured), with sampling in fp32 and whole steps
replayed from CUDA graphs.

The loop mirrors ``LMModel.generate`` step for step (codebook pattern, CFG as one
batch-2 forward, the same sampling functions, so the random stream is consumed
identically) and never reads a device value back on the host inside the loop.
"""
from __future__ import annotations

import typing as tp

import torch

from .runner import Runner, unsupported_reason

MODES = ("stock", "exact", "fast")


def fast_dtype(device: torch.device) -> tp.Optional[torch.dtype]:
    """The reduced precision ``fast`` mode computes in on this device (None: none pays off)."""
    if device.type == "cuda":
        return torch.float16  # audiocraft's own dtype on GPUs: the gain there is CUDA graphs
    if device.type == "cpu":
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16  # native bf16 matrix units (AVX512-BF16 / AMX)
        if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
            # AVX2 + F16C: torch's fp16 matrix-vector kernels read half the bytes of fp32 ones
            return torch.float16
    return None


class Decoder:
    """Generates with one LM in one mode; prepares (and caches) that mode's weights once."""

    def __init__(self, lm: tp.Any, mode: str = "exact", use_cuda_graphs: bool = True,
                 dtype: tp.Optional[torch.dtype] = None, static_steps: tp.Optional[bool] = None):
        """``dtype`` overrides ``fast`` mode's reduced precision (for measurements). ``static_steps``:
        run ``fast`` through the static loop (:mod:`.graphs`; default: on CUDA, where its steps are
        recorded as CUDA graphs unless ``use_cuda_graphs`` is False); on the CPU it runs eagerly,
        which is how tests check what a graph would replay."""
        if mode not in MODES:
            raise ValueError(f"decoding mode must be one of {MODES}, not {mode!r}")
        self.lm = lm
        self.requested = mode
        self.mode = mode
        self.reason: tp.Optional[str] = None
        device = next(lm.parameters()).device
        if mode != "stock":
            self.reason = unsupported_reason(lm)
            self.dtype = dtype or fast_dtype(device)
            if self.reason is None and mode == "fast" and self.dtype is None:
                self.reason = "no reduced precision pays off on this device"
            if self.reason is not None:
                self.mode = "stock"
        self.runner: tp.Optional[Runner] = None
        if self.mode == "exact":
            self.runner = Runner(lm)
        elif self.mode == "fast":
            self.runner = Runner(lm, self.dtype)
        self.graphs = None
        if static_steps is None:
            static_steps = device.type == "cuda"
        if self.mode == "fast" and static_steps:
            from .graphs import StepGraphs

            self.graphs = StepGraphs(self.runner, record=use_cuda_graphs)

    def describe(self) -> str:
        if self.mode == self.requested:
            dtype = "" if self.runner is None or self.runner.exact else f", {self.runner.dtype}".replace("torch.", "")
            steps = ""
            if self.graphs is not None:
                steps = ", CUDA graphs" if self.graphs.record else ", static steps"
            return f"{self.mode}{dtype}{steps}"
        return f"stock (asked for {self.requested}: {self.reason})"

    @torch.no_grad()
    def generate(self, prompt: tp.Optional[torch.Tensor] = None, conditions: tp.Sequence[tp.Any] = (),
                 num_samples: tp.Optional[int] = None, max_gen_len: int = 256, use_sampling: bool = True,
                 temp: float = 1.0, top_k: int = 250, top_p: float = 0.0, cfg_coef: tp.Optional[float] = None,
                 two_step_cfg: tp.Optional[bool] = None, remove_prompts: bool = False, check: bool = False,
                 callback: tp.Optional[tp.Callable[[int, int], None]] = None, **kwargs: tp.Any) -> torch.Tensor:
        lm = self.lm
        two_step_cfg = lm.two_step_cfg if two_step_cfg is None else two_step_cfg
        if self.runner is None or two_step_cfg:
            return type(lm).generate(lm, prompt, list(conditions), num_samples, max_gen_len, use_sampling, temp,
                                     top_k, top_p, cfg_coef, two_step_cfg, remove_prompts, check, callback,
                                     **kwargs)
        from .loop import generate

        return generate(self, prompt, list(conditions), num_samples, max_gen_len, use_sampling, temp, top_k,
                        top_p, cfg_coef, remove_prompts, callback)
