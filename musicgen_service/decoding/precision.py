"""Which precision the decoder's matrices use, and how ``auto`` chooses it: by measuring this machine.

A MusicGen decoding step at batch 2 streams every weight matrix of the LM once,
so its time is set by the bytes of the weights and by how fast this CPU's
kernels stream them, which differs by machine: on an AMD EPYC with AVX2, fp16
``F.linear`` streams at full bandwidth; on an Intel Xeon with AVX-512 but no
native bf16, fp16 and bf16 are *slower* than fp32; int8 kernels range from 3x
fp32 to 12x slower than it (PLATFORM-NOTES). So no rule of thumb picks well.

Candidates (each selectable by name: ``MUSICGEN_DECODER=exact|fp16|bf16|int8|int8dyn``):

- ``exact``: the parameters themselves, stock's operators (fp32 on CPUs);
- ``fp16`` / ``bf16``: weights converted once, each product's input cast to the
  weight's dtype and its output back (residual stream, norms, attention and
  sampling keep the stock dtype);
- ``int8``: weight-only int8, per output channel (symmetric, scale max|w|/127),
  products by ``torch._weight_int8pack_mm`` with bf16 inputs (its fast path;
  the residual stream stays fp32); a quarter of fp32's bytes per step;
- ``int8dyn``: the same int8 weights, products by fbgemm's dynamic int8 kernel
  (``quantized::linear_dynamic``: the activations too are quantized per call, per
  tensor, to 8 bits on CPUs with VNNI and 7 bits without, see
  :data:`REDUCE_RANGE`). Which int8 kernel is fast differs by CPU (an Intel Xeon
  without bf16: ``_weight_int8pack_mm`` 12x slower than fp32, fbgemm 3.2x faster;
  an AMD EPYC with AVX512-BF16: both stream ~31 GB/s of int8, 15x fp32's 2 ms per
  4096x1024 matrix), hence both.

``auto`` (:func:`choose`):

1. **speed**: each candidate the CPU can run computes a decoding step's matrix
   products (batch 2) for the first :data:`PROBE_LAYERS` layers, weights larger
   than the last-level cache so they stream from memory as in a full step (the
   rest of a step, attention, norms, sampling, costs the same in every
   precision). Candidates take turns for :data:`PROBE_ROUNDS` rounds after a
   warm-up one; each keeps its best pass, so that a busy machine's interruptions
   do not decide. Time per layer.
2. **quality**: candidates faster than ``exact``, fastest first, are checked
   against ``exact`` teacher-forced on the same tokens (one pass over
   :data:`QUALITY_STEPS` positions with classifier-free guidance), first on the
   probe layers alone (a cheap screen), then on the whole model: they must meet
   :data:`QUALITY_BAR` (KL divergence of the next-token distributions, and top-1
   agreement counted where ``exact``'s top two tokens are at least
   :data:`DECIDED_MARGIN` apart: a near-tie is no quality signal). The first that
   does is chosen; ``exact`` needs no check.

It never picks a candidate slower than ``exact`` in its own measurement, nor one
that fails the bar. The table and the choice are logged. On CUDA, ``auto`` is
fp16 without measuring: audiocraft's own GPU dtype, where ``exact`` is fp16 too.
"""
from __future__ import annotations

import logging
import time
import typing as tp
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger("musicgen")

PRECISIONS = ("exact", "fp16", "bf16", "int8", "int8dyn")
# a row's product does not depend on the other rows (at a fixed row count; int8dyn's activation
# scale spans every row): what concurrent requests can share steps in (musicgen_service/batching.py)
BATCH_INVARIANT = ("exact", "fp16", "bf16", "int8")
DENSE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# auto's bar, against exact, teacher-forced (see the module docstring)
QUALITY_BAR = {"kl_mean": 1e-3, "top1": 0.98}
DECIDED_MARGIN = 0.02  # top-1 agreement counts positions where exact's top-2 probabilities differ by this
QUALITY_STEPS = 8
PROBE_LAYERS = 4
PROBE_ROUNDS = 4


# ------------------------------------------------------------------------------------------ matrices

def _cast(t: tp.Optional[torch.Tensor], dtype: tp.Optional[torch.dtype]) -> tp.Optional[torch.Tensor]:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.detach().to(dtype).contiguous()


class Dense:
    """``F.linear`` with the weight in ``dtype`` (None: the parameter itself, no cast)."""

    def __init__(self, w: torch.Tensor, b: tp.Optional[torch.Tensor], dtype: tp.Optional[torch.dtype]):
        self.w, self.b = _cast(w, dtype), _cast(b, dtype)
        self.cast = dtype is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.w.dtype) if self.cast else x, self.w, self.b)

    @property
    def shape(self) -> tp.Tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


def cpu_flags() -> tp.Set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# fbgemm multiplies u8 activations by s8 weights. With VNNI (vpdpbusd) the pair sums go straight to
# 32 bits; without it (AVX2's vpmaddubsw) they are saturated to 16 bits, so the activations are
# quantized to 7 bits there ("reduce_range"), which costs precision.
REDUCE_RANGE = not ({"avx512_vnni", "avx_vnni"} & cpu_flags())


def quantize(w: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 weights, fp32 scales max|w| / 127)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale


class Int8:
    """int8 weights per output channel (symmetric), weight-only: ``torch._weight_int8pack_mm``, whose
    fast CPU path takes bf16 activations (measured: 31 GB/s of int8 there, 1.5 GB/s with fp32 ones),
    so each product's input is cast to bf16 and its output back to fp32, as the bf16 mode does."""

    def __init__(self, w: torch.Tensor, b: tp.Optional[torch.Tensor]):
        self.q, scale = quantize(w)
        self.scale = scale.to(torch.bfloat16)
        self.b = None if b is None else b.detach().float()
        self.shape = tuple(w.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.q, self.scale).float()
        if self.b is not None:
            y = y + self.b
        return y.view(*x.shape[:-1], self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]


class Int8Dynamic:
    """int8 weights per output channel, fbgemm's dynamic int8 product (fp32 in and out)."""

    def __init__(self, w: torch.Tensor, b: tp.Optional[torch.Tensor]):
        # Int8's very weights and scales, wrapped as a quantized tensor (5x faster than
        # torch.quantize_per_channel, measured: 2.6 vs 13.3 ms a 4096x1024 matrix; auto converts 4
        # layers of every candidate at setup)
        q, scale = quantize(w)
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None if b is None else b.detach().float())
        self.shape = tuple(w.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, REDUCE_RANGE)
        return y.view(*x.shape[:-1], self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]


Matrix = tp.Union[Dense, Int8, Int8Dynamic]


def matrix(precision: str, w: torch.Tensor, b: tp.Optional[torch.Tensor]) -> Matrix:
    if precision == "int8":
        return Int8(w, b)
    if precision == "int8dyn":
        return Int8Dynamic(w, b)
    return Dense(w, b, DENSE_DTYPES.get(precision))


def unavailable_reason(precision: str, device: torch.device) -> tp.Optional[str]:
    """Why ``precision`` cannot run on ``device`` (None: it can): a one-matrix smoke test."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}"
    if precision.startswith("int8") and device.type != "cpu":
        return "the int8 products are CPU kernels"
    if precision == "int8dyn" and "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch has no fbgemm"
    try:
        w = torch.randn(8, 16, device=device)
        matrix(precision, w, None)(torch.randn(2, 16, device=device))
    except Exception as exc:  # an unsupported dtype/kernel on this machine
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------------ choosing

@dataclass
class Trial:
    precision: str
    ms_per_layer_step: tp.Optional[float] = None
    quality: tp.Dict[str, float] = field(default_factory=dict)
    note: str = ""

    def row(self) -> str:
        speed = "-" if self.ms_per_layer_step is None else f"{self.ms_per_layer_step:.2f} ms/layer-step"
        q = (f", KL {self.quality['kl_mean']:.1e}, top-1 {self.quality['top1']:.1%}" if self.quality else "")
        return f"{self.precision}: {speed}{q}{' (' + self.note + ')' if self.note else ''}"


def meets_bar(quality: tp.Dict[str, float]) -> bool:
    return quality["kl_mean"] <= QUALITY_BAR["kl_mean"] and quality["top1"] >= QUALITY_BAR["top1"]


def decide(trials: tp.Sequence[Trial]) -> str:
    """The choice from measured trials: the fastest whose quality meets the bar, never slower than
    exact. Trials without a speed (unavailable, dropped) or whose quality was measured and failed
    are out; exact needs no quality measurement."""
    exact = next(t for t in trials if t.precision == "exact")
    ranked = sorted((t for t in trials if t.ms_per_layer_step is not None), key=lambda t: t.ms_per_layer_step)
    for t in ranked:
        if t.precision == "exact":
            return "exact"
        if exact.ms_per_layer_step is not None and t.ms_per_layer_step >= exact.ms_per_layer_step:
            return "exact"
        if t.quality and meets_bar(t.quality):
            return t.precision
    return "exact"


def probe_conditions(lm: tp.Any, length: int = 8, seed: int = 0) -> tp.Dict[str, tp.Any]:
    """Conditions for measurements, without running T5 (~1 s on a CPU): a random text embedding of
    ``length`` tokens and an empty one (batch 2, as classifier-free guidance decodes), entering the
    LM as the text does (cross-attention, or prepended on melody models). Melody models get no
    chroma, whose 30 s prefix would dominate a short measurement."""
    device = next(lm.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(1, length, lm.dim, generator=gen)
    cond = torch.cat([text, torch.zeros_like(text)]).to(device)
    mask = torch.cat([torch.ones(1, length), torch.zeros(1, length)]).to(device)
    return {"description": (cond, mask)}


def _products_ms(candidates: tp.Dict[str, tp.Sequence[Matrix]], device: torch.device, dtype: torch.dtype,
                 layers: int, rows: int = 2, rounds: int = PROBE_ROUNDS) -> tp.Dict[str, float]:
    """Per candidate, the time per layer of one pass over the probe layers' products at ``rows``
    rows (2: one request with its guidance twin; more: concurrent requests sharing steps).
    Candidates take turns, one pass each per round, after a warm-up round (first calls pay one-off
    costs: allocations, kernel dispatch caches); each keeps its best pass, so a pass that another
    process interrupted (a whole scheduler time slice, tens of ms) does not count."""
    inputs = {name: [torch.randn(rows, 1, m.shape[1], device=device, dtype=dtype) for m in mats]
              for name, mats in candidates.items()}
    best = {name: float("inf") for name in candidates}
    for round_ in range(rounds + 1):
        for name, mats in candidates.items():
            start = time.perf_counter()
            for m, x in zip(mats, inputs[name]):
                m(x)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000 * seconds / layers for name, seconds in best.items()}


@torch.no_grad()
def teacher_forced_quality(lm: tp.Any, reference: tp.Any, candidate: tp.Any, tensors: tp.Dict[str, tp.Any],
                           steps: int = QUALITY_STEPS, cfg_coef: float = 3.0, seed: int = 0) -> tp.Dict[str, float]:
    """Both runners read the same random tokens in one prefill; their next-token distributions
    after guidance are compared: KL(reference || candidate) mean and max, top-1 agreement where the
    reference is decided (top-2 probabilities >= DECIDED_MARGIN apart; random-weight models are
    rarely decided, and then top-1 is not measured: ``decided`` says on how many it was)."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, lm.card, (1, lm.n_q, steps), generator=gen).to(reference.device)
    seq = torch.cat([seq, seq])
    logits = []
    for runner in (reference, candidate):
        all_logits = runner.start(tensors, 2, steps).prefill(seq, all_positions=True).float()  # [2, K, T, card]
        cond, uncond = all_logits.split(1, dim=0)
        logits.append(uncond + (cond - uncond) * cfg_coef)
    pa, pb = (torch.log_softmax(x, dim=-1) for x in logits)
    kl = (pa.exp() * (pa - pb)).sum(-1)
    top2 = pa.exp().topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) >= DECIDED_MARGIN
    agree = (pa.argmax(-1) == pb.argmax(-1))[decided]
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1": agree.float().mean().item() if agree.numel() else 1.0, "decided": int(agree.numel())}


def choose(lm: tp.Any, candidates: tp.Sequence[str] = PRECISIONS, rows: int = 2
           ) -> tp.Tuple[str, tp.Any, tp.List[Trial], tp.Dict[str, float]]:
    """Measure and pick (CPU). Returns the precision, its full-model Runner, the table, and the
    seconds spent: ``measuring`` and ``converting`` (the chosen precision's conversion of the whole
    LM, which an explicit choice of it pays too).

    1. speed: every runnable candidate's products over the first PROBE_LAYERS layers, at ``rows``
       rows: what a full step decodes (2 per request: a server taking concurrent requests times
       them at its full load, where kernels differ most: on an AMD EPYC, fp16's cost grows with the
       rows, bf16's and int8's hardly);
    2. for candidates faster than exact, fastest first: quality teacher-forced on those layers alone
       (a cheap screen: error grows with depth), then on the whole model; the first within the bar
       is chosen."""
    from .runner import Runner

    start = time.perf_counter()
    device = next(lm.parameters()).device
    act_dtype = lm.emb[0].weight.dtype
    tensors = probe_conditions(lm)
    layers = min(PROBE_LAYERS, len(lm.transformer.layers))
    trials: tp.List[Trial] = []
    slices: tp.Dict[str, tp.Any] = {}
    for name in ["exact"] + [c for c in candidates if c != "exact"]:
        reason = unavailable_reason(name, device)
        if reason is not None:
            trials.append(Trial(name, note=f"unavailable: {reason}"))
        else:
            slices[name] = Runner(lm, name, layers=layers)
            trials.append(Trial(name))
    # the layers' products (the output heads, one more product, are left out)
    speed = _products_ms({name: r.matrices()[:-len(r.output)] for name, r in slices.items()}, device, act_dtype,
                         layers, rows)
    for trial in trials:
        trial.ms_per_layer_step = speed.get(trial.precision)
    exact_ms = speed["exact"]
    reference = Runner(lm, "exact")
    runners = {"exact": reference}
    converting = 0.0
    for trial in sorted((t for t in trials if t.ms_per_layer_step is not None), key=lambda t: t.ms_per_layer_step):
        if trial.precision == "exact" or trial.ms_per_layer_step >= exact_ms:
            break
        screen = teacher_forced_quality(lm, slices["exact"], slices[trial.precision], tensors)
        if not meets_bar(screen):
            trial.quality, trial.note = screen, f"fails the quality bar on {layers} layers"
            continue
        converted = time.perf_counter()
        candidate = Runner(lm, trial.precision)
        converting = time.perf_counter() - converted
        trial.quality = teacher_forced_quality(lm, reference, candidate, tensors)
        if meets_bar(trial.quality):
            runners[trial.precision] = candidate
            break
        trial.note = "fails the quality bar"
        converting = 0.0
        del candidate
    chosen = decide(trials)
    total = time.perf_counter() - start
    return chosen, runners[chosen], trials, {"measuring": total - converting, "converting": converting}
