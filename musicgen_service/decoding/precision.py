"""Which precision the decoder's matrices use, and how ``auto`` chooses it: by measuring this machine.

A MusicGen decoding step at batch 2 streams every weight matrix of the LM once,
so its time is set by the bytes of the weights and by how fast this CPU's
kernels stream them, which differs by machine: on an AMD EPYC with AVX2, fp16
``F.linear`` streams at full bandwidth; on an Intel Xeon with AVX-512 but no
native bf16, fp16 and bf16 are *slower* than fp32; int8 kernels range from 3x
fp32 to 12x slower than it (PLATFORM-NOTES). So no rule of thumb picks well.

Candidates: the formats of :mod:`.formats` (``exact``, ``fp16``, ``bf16``, ``int8``,
``int8dyn``; each also selectable by name in ``MUSICGEN_DECODER``), those this machine's torch can
run. Which int8 kernel is fast differs by CPU too (an Intel Xeon without bf16:
``_weight_int8pack_mm`` 12x slower than fp32, fbgemm 3.2x faster; an AMD EPYC with AVX512-BF16:
both stream ~31 GB/s of int8, 15x fp32's 2 ms per 4096x1024 matrix), hence both.

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

from .formats import PRECISIONS, Matrix, unavailable_reason
from .runner import Runner
from .sampling import guide

log = logging.getLogger("musicgen")

# auto's bar, against exact, teacher-forced (see the module docstring)
QUALITY_BAR = {"kl_mean": 1e-3, "top1": 0.98}
DECIDED_MARGIN = 0.02  # top-1 agreement counts positions where exact's top-2 probabilities differ by this
QUALITY_STEPS = 8
PROBE_LAYERS = 4
PROBE_ROUNDS = 4


# ------------------------------------------------------------------------------------------ choosing


@dataclass
class Trial:
    precision: str
    ms_per_layer_step: tp.Optional[float] = None
    quality: tp.Dict[str, float] = field(default_factory=dict)
    note: str = ""

    def row(self) -> str:
        speed = "-" if self.ms_per_layer_step is None else f"{self.ms_per_layer_step:.2f} ms/layer-step"
        q = f", KL {self.quality['kl_mean']:.1e}, top-1 {self.quality['top1']:.1%}" if self.quality else ""
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


def _products_ms(
    candidates: tp.Dict[str, tp.Sequence[Matrix]],
    device: torch.device,
    dtype: torch.dtype,
    layers: int,
    rows: int = 2,
    rounds: int = PROBE_ROUNDS,
) -> tp.Dict[str, float]:
    """Per candidate, the time per layer of one pass over the probe layers' products at ``rows``
    rows (2: one request with its guidance twin; more: concurrent requests sharing steps).
    Candidates take turns, one pass each per round, after a warm-up round (first calls pay one-off
    costs: allocations, kernel dispatch caches); each keeps its best pass, so a pass that another
    process interrupted (a whole scheduler time slice, tens of ms) does not count."""
    inputs = {
        name: [torch.randn(rows, 1, m.shape[1], device=device, dtype=dtype) for m in mats]
        for name, mats in candidates.items()
    }
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
def teacher_forced_quality(
    lm: tp.Any,
    reference: tp.Any,
    candidate: tp.Any,
    tensors: tp.Dict[str, tp.Any],
    steps: int = QUALITY_STEPS,
    cfg_coef: float = 3.0,
    seed: int = 0,
) -> tp.Dict[str, float]:
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
        logits.append(guide(all_logits, 1, cfg_coef))
    pa, pb = (torch.log_softmax(x, dim=-1) for x in logits)
    kl = (pa.exp() * (pa - pb)).sum(-1)
    top2 = pa.exp().topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) >= DECIDED_MARGIN
    agree = (pa.argmax(-1) == pb.argmax(-1))[decided]
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1": agree.float().mean().item() if agree.numel() else 1.0,
        "decided": int(agree.numel()),
    }


def choose(
    lm: tp.Any, candidates: tp.Sequence[str] = PRECISIONS, rows: int = 2
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
    speed = _products_ms(
        {name: r.matrices()[: -len(r.output)] for name, r in slices.items()}, device, act_dtype, layers, rows
    )
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
