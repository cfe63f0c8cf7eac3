"""Faster decoding for MusicGen's LM, behind ``LMModel.generate``'s own signature.

``Decoder(lm, mode).generate`` takes the arguments audiocraft's
``MusicGen._generate_tokens`` passes to ``lm.generate`` (once per extension
window), so audiocraft keeps doing conditioning, windowed extension and melody
handling; only the step loop changes. Modes:

- ``stock``: audiocraft's ``LMModel.generate`` itself (fallback and reference);
- ``exact``: :class:`.runner.Runner` on the parameters themselves: the same
  operators on the same values as stock, hence the same logits and tokens, minus
  the per-step waste (cross-attention re-projection, cache concatenation, einops);
- ``fp16``, ``bf16``, ``int8``, ``int8dyn``: the weight matrices in that precision
  (:mod:`.formats`), explicit dtypes with autocast off;
- ``auto`` (the default; ``fast`` is its old name): on CPUs the fastest of those
  that meets the quality bar, measured on this machine at setup, never slower
  than ``exact`` (:func:`.precision.choose`); on GPUs fp16 (audiocraft's own GPU
  dtype). On GPUs every reduced-precision mode replays whole decoding steps
  (layers, guidance, sampling, token write) from CUDA graphs (:mod:`.graphs`).

What ``exact`` promises: on the CPU, stock's very tokens for the same seed
(tested). On CUDA it runs under the same fp16 autocast as stock, with stock's
operators on stock's values, and the promise is a measured agreement, reported by
``bench/gpu_check.py`` next to stock's agreement with itself (bench/results/gpu.json). On GPUs
fp16 computes the same logits as ``exact``, with sampling in fp32 and whole steps replayed from
CUDA graphs.

The loop mirrors ``LMModel.generate`` step for step (codebook pattern, CFG as one
batch-2 forward, the same sampling functions, so the random stream is consumed
identically) and never reads a device value back on the host inside the loop.
"""

from __future__ import annotations

import logging
import typing as tp

import torch

from . import formats
from . import precision as precisions
from .runner import Runner, unsupported_reason

if tp.TYPE_CHECKING:
    from .prepared import PreparedDecoder

MODES = ("auto", "exact", "fp16", "bf16", "int8", "int8dyn", "stock")
ALIASES = {"fast": "auto"}
SHARES_STEPS = ("fp16", "bf16", "int8")  # see Decoder.shares_steps

log = logging.getLogger("musicgen")


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: measured on musicgen-small,
    setup with ``auto`` kept ~0.6 GB more resident than with its choice set by name, the memory of
    the measurement's probe weights and of the released fp32 matrices)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Decoder:
    """Generates with one LM in one mode; prepares (and caches) that mode's weights once."""

    def __init__(
        self,
        lm: tp.Any,
        mode: str = "exact",
        use_cuda_graphs: bool = True,
        static_steps: tp.Optional[bool] = None,
        rows: int = 2,
        prepared: tp.Optional["PreparedDecoder"] = None,
    ):
        """``static_steps``: run through the static loop (:mod:`.graphs`; default: on CUDA, for every
        mode but ``exact``, where its steps are recorded as CUDA graphs unless ``use_cuda_graphs`` is
        False); on the CPU it runs eagerly, which is how tests check what a graph would replay.
        ``rows``: the matrix rows a step decodes at full load (2 per request; more when concurrent
        requests share steps): what ``auto`` times, and then only precisions whose rows do not
        depend on each other (:data:`.formats.BATCH_INVARIANT`) are candidates. ``prepared``: a
        decision and converted matrices read from disk (:mod:`.prepared`) for this LM, mode and
        rows, taken instead of measuring and converting."""
        mode = ALIASES.get(mode, mode)
        if mode not in MODES:
            raise ValueError(f"decoding mode must be one of {MODES}, not {mode!r}")
        self.lm = lm
        self.rows = rows
        self.requested = mode
        self.mode = mode
        self.reason: tp.Optional[str] = None
        self.trials: tp.List[precisions.Trial] = []
        self.choose_s: tp.Dict[str, float] = {}
        self.released = False
        device = next(lm.parameters()).device
        self.runner: tp.Optional[Runner] = None
        if mode != "stock":
            self.reason = unsupported_reason(lm)
            if self.reason is not None:
                self.mode = "stock"
        self.prepared = prepared if self.mode != "stock" else None
        if self.prepared is not None:
            entry = self.prepared
            self.mode, self.trials, self.choose_s = entry.precision, entry.trials, entry.choose_s
            self.runner = Runner(lm, self.mode, stored=entry.matrices)
        elif self.mode == "auto":
            if device.type == "cuda":
                self.mode, self.runner = "fp16", Runner(lm, "fp16")
            else:
                candidates = formats.PRECISIONS if rows <= 2 else formats.BATCH_INVARIANT
                self.mode, self.runner, self.trials, self.choose_s = precisions.choose(lm, candidates, rows)
        elif self.mode != "stock":
            unavailable = formats.unavailable_reason(self.mode, device)
            if unavailable is not None:  # exact runs everywhere
                self.reason, self.mode = f"{self.mode} unavailable here: {unavailable}", "exact"
            self.runner = Runner(lm, self.mode)
        self.graphs = None
        if static_steps is None:
            static_steps = device.type == "cuda" and self.mode not in ("stock", "exact")
        if static_steps and self.runner is not None:
            from .graphs import StepGraphs

            self.graphs = StepGraphs(self.runner, record=use_cuda_graphs)

    @property
    def shares_steps(self) -> bool:
        """Whether concurrent requests can share this decoder's steps, one row each
        (:mod:`..serving.scheduler`): on CPUs, in a precision whose products give a row the same bits
        whatever the other rows (``fp16``, ``bf16``, ``int8``). Not ``exact``: its promise is stock's
        tokens, which its rows padded beside others' would not keep (fp32 kernels round differently at
        different row counts); not ``int8dyn``, whose activation scale spans all rows; not ``stock``
        (audiocraft's loop); not on GPUs, which decode each request alone, from CUDA graphs."""
        return (
            self.graphs is None
            and self.runner is not None
            and self.runner.device.type == "cpu"
            and self.mode in SHARES_STEPS
        )

    @property
    def negative_unavailable(self) -> tp.Optional[str]:
        """Why this decoder cannot take a negative prompt (None: it can): only this project's loop
        conditions guidance's unconditional branch on a text."""
        if self.runner is None:
            return (
                "negative prompts need this project's decoding loop; this deployment decodes with "
                f"stock audiocraft ({self.reason or 'MUSICGEN_DECODER=stock'})"
            )
        if self.lm.two_step_cfg:
            return "negative prompts need one-step guidance; this model uses two-step guidance"
        return None

    def describe(self) -> str:
        steps = ""
        if self.graphs is not None:
            steps = ", CUDA graphs" if self.graphs.record else ", static steps"
        if self.prepared is not None:
            return f"{self.mode} ({'auto, ' if self.requested == 'auto' else ''}{self.prepared.describe()}){steps}"
        if self.requested == "auto":
            how = (
                "fp16 on GPUs"
                if not self.trials
                else (
                    f"measured at {self.rows} rows in {self.choose_s['measuring']:.2f} s, converted in "
                    f"{self.choose_s['converting']:.2f} s"
                )
            )
            return f"auto: {self.mode} ({how}){steps}"
        if self.mode == self.requested:
            return f"{self.mode}{steps}"
        return f"{self.mode} (asked for {self.requested}: {self.reason}){steps}"

    def log_choice(self) -> None:
        """The measurement table behind ``auto``'s choice, one line per candidate."""
        for trial in self.trials:
            log.info("  decoder candidate %s", trial.row())

    def release_stock_weights(self) -> int:
        """Free the LM's own copies of the matrices this decoder keeps in another precision (stock
        and exact decoding of this LM are no longer possible afterwards). Returns the bytes freed."""
        if self.runner is None or self.runner.exact:
            return 0
        kept = {
            m.w.untyped_storage().data_ptr()
            for m in self.runner.matrices() + self._cross_matrices()
            if isinstance(m, formats.Dense)
        }
        freed = 0
        modules = [
            m
            for layer in self.lm.transformer.layers
            for m in (
                layer.self_attn,
                layer.self_attn.out_proj,
                layer.cross_attention,
                getattr(layer.cross_attention, "out_proj", None),
                layer.linear1,
                layer.linear2,
            )
        ]
        for module in modules + list(self.lm.linears):
            if module is None:
                continue
            for name in ("in_proj_weight", "weight"):
                param = getattr(module, name, None)
                if (
                    isinstance(param, torch.nn.Parameter)
                    and param.numel()
                    and param.untyped_storage().data_ptr() not in kept
                ):
                    freed += param.numel() * param.element_size()
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.released = True
        _return_freed_memory()
        return freed

    def _cross_matrices(self) -> tp.List[tp.Any]:
        layers = self.runner.layers if self.runner is not None else []
        return [m for L in layers for m in (L.cross_k, L.cross_v) if m is not None]

    @torch.no_grad()
    def generate(
        self,
        prompt: tp.Optional[torch.Tensor] = None,
        conditions: tp.Sequence[tp.Any] = (),
        num_samples: tp.Optional[int] = None,
        max_gen_len: int = 256,
        use_sampling: bool = True,
        temp: float = 1.0,
        top_k: int = 250,
        top_p: float = 0.0,
        cfg_coef: tp.Optional[float] = None,
        two_step_cfg: tp.Optional[bool] = None,
        remove_prompts: bool = False,
        check: bool = False,
        callback: tp.Optional[tp.Callable[[int, int], None]] = None,
        **kwargs: tp.Any,
    ) -> torch.Tensor:
        lm = self.lm
        tap = kwargs.pop("tap", None)  # streaming's view of the window (our loop only; stock has none)
        negative = kwargs.pop("negative", None)  # a negative prompt (our loop only: see negative_unavailable)
        two_step_cfg = lm.two_step_cfg if two_step_cfg is None else two_step_cfg
        if self.runner is None or two_step_cfg:
            if negative:
                raise RuntimeError(self.negative_unavailable or "negative prompts need this project's decoding loop")
            if self.released:
                raise RuntimeError("two-step guidance needs the LM's own weights, released for this decoder")
            return type(lm).generate(
                lm,
                prompt,
                list(conditions),
                num_samples,
                max_gen_len,
                use_sampling,
                temp,
                top_k,
                top_p,
                cfg_coef,
                two_step_cfg,
                remove_prompts,
                check,
                callback,
                **kwargs,
            )
        from .loop import generate

        return generate(
            self,
            prompt,
            list(conditions),
            num_samples,
            max_gen_len,
            use_sampling,
            temp,
            top_k,
            top_p,
            cfg_coef,
            remove_prompts,
            callback,
            tap,
            negative,
        )
