"""The training loop: audiocraft's loss on the LM, an optimizer schedule, data parallelism.

- **loss**: the LM's teacher-forced predictions through ``LMModel.compute_predictions`` (its codebook
  delay pattern and mask) and the MusicGen solver's own per-codebook masked cross-entropy
  (``MusicGenSolver._compute_cross_entropy``), with the solver's mask: padding & pattern-valid
  positions. Shorter segments in a batch are padded with the LM's special token and masked out of
  the loss, as the solver does (``tokens.padding_with_special_token``): never silence presented
  as music.
- **optimizer**: AdamW over the trainable parameters (the LoRA matrices, or every LM weight), linear
  warmup then cosine decay (:mod:`.options`), gradient clipping, gradient accumulation over
  micro-batches; bf16 autocast on GPUs that support it (no fp16 GradScaler), fp32 on CPUs; gradient
  checkpointing through audiocraft's own transformer option (``checkpointing='torch'``).
- **data parallel**: with ``world`` processes (one per GPU, started by ``torch.multiprocessing``; the
  tests use two CPU processes with gloo), each takes its share of every update's segments and the
  LM runs under ``DistributedDataParallel``, which averages the gradients. Every process draws the
  same order and dropout decisions from the run's seed, so the update is the one a single process
  makes with the same global batch (tested), as long as every share holds as many tokens (each
  process averages over its own tokens, as audiocraft's solver does).
- **memory on CPUs**: glibc's mmap threshold is fixed for the run (:mod:`.allocator`), so that a
  step's large blocks go back to the system when freed instead of fragmenting its heap.
- **progress**: step, loss, learning rate, tokens per second and time left, about every 5% of the
  run (and every 30 s); ``cancelled`` is checked before every micro-batch.
"""

from __future__ import annotations

import contextlib
import math
import time
import typing as tp
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import Cancelled
from ..core.logs import get_logger
from . import allocator
from . import options as opts
from .tokens import Example, Features, conditions, dropout_probabilities

log = get_logger()


@dataclass
class History:
    losses: tp.List[float] = field(default_factory=list)  # per update
    learning_rates: tp.List[float] = field(default_factory=list)
    grad_norms: tp.List[float] = field(default_factory=list)  # before clipping, of the whole update
    seconds: float = 0.0
    tokens: int = 0

    @property
    def final_loss(self) -> float:
        """The mean loss of the last epoch's worth of updates (at least one)."""
        return (
            float(sum(self.losses[-self.last :]) / max(1, len(self.losses[-self.last :]))) if self.losses else math.nan
        )

    last: int = 1


class _Predictions(nn.Module):
    """The LM's teacher-forced predictions as a module, so that ``DistributedDataParallel`` wraps
    the forward that ``compute_predictions`` runs."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, codes: torch.Tensor, condition_tensors: tp.Dict[str, tp.Any]) -> tp.Any:
        return self.lm.compute_predictions(codes, [], condition_tensors)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """audiocraft's MusicGen solver's loss (per codebook, masked, averaged over codebooks)."""
    from audiocraft.solvers.musicgen import MusicGenSolver

    ce, _ = MusicGenSolver._compute_cross_entropy(None, logits, targets, mask)  # (self is unused there)
    return ce


def batch_codes(lm: nn.Module, batch: tp.Sequence[Example], device: tp.Any) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """[B, K, T] codes padded with the LM's special token, and the mask of the positions each
    example would be trained on alone: its own codebook pattern's valid positions (with the delay
    pattern, codebook k up to T_i - delay_k), so that padding never enters its loss, not even as
    the context of its last delayed codebooks."""
    length = max(e.codes.shape[-1] for e in batch)
    codes = torch.full((len(batch), batch[0].codes.shape[0], length), lm.special_token_id, dtype=torch.long)
    real = torch.zeros_like(codes, dtype=torch.bool)
    masks: tp.Dict[int, torch.Tensor] = {}
    for i, e in enumerate(batch):
        n = e.codes.shape[-1]
        codes[i, :, :n] = e.codes.long()
        if n not in masks:
            masks[n] = _valid_alone(lm, e.codes.shape[0], n)
        real[i, :, :n] = masks[n]
    return codes.to(device), real.to(device)


def _valid_alone(lm: nn.Module, K: int, length: int) -> torch.Tensor:
    """[K, length]: the positions ``compute_predictions`` predicts from real context for a sequence
    of that length (the pattern's own mask)."""
    pattern = lm.pattern_provider.get_pattern(length)
    seq, _, _ = pattern.build_pattern_sequence(
        torch.zeros(1, K, length, dtype=torch.long), lm.special_token_id, keep_only_valid_steps=True
    )
    _, _, mask = pattern.revert_pattern_logits(
        torch.zeros(1, 1, K, seq.shape[-1]), float("nan"), keep_only_valid_steps=True
    )
    return mask.bool()


def loss_of(
    predict: nn.Module,
    lm: nn.Module,
    features: Features,
    batch: tp.Sequence[Example],
    drop_all: torch.Tensor,
    drop_melody: torch.Tensor,
    autocast: tp.Any,
) -> torch.Tensor:
    device = next(lm.parameters()).device
    codes, real = batch_codes(lm, batch, device)
    cond = conditions(lm, features, batch, drop_all, drop_melody)
    with autocast:
        out = predict(codes, cond)
        return cross_entropy(out.logits.float(), codes, real & out.mask)


@torch.no_grad()
def teacher_forced_loss(lm: nn.Module, features: Features, batch_size: int = 4) -> float:
    """The loss on the whole training set, conditions kept (no dropout), in eval mode: the figure a
    run should lower."""
    was_training = lm.training
    lm.eval()
    total, n = 0.0, 0
    none = torch.zeros(len(features.examples), dtype=torch.bool)
    predict = _Predictions(lm)
    for i in range(0, len(features.examples), batch_size):
        batch = features.examples[i : i + batch_size]
        total += loss_of(
            predict, lm, features, batch, none[: len(batch)], none[: len(batch)], contextlib.nullcontext()
        ).item() * len(batch)
        n += len(batch)
    lm.train(was_training)
    return total / max(n, 1)


def schedule(total: int, warmup: int) -> tp.Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return opts.FINAL_LR_FRACTION + (1 - opts.FINAL_LR_FRACTION) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress))
        )

    return factor


def plan(n_examples: int, o: opts.Options) -> tp.Tuple[int, int, int]:
    """(effective batch, updates per epoch, total updates)."""
    batch = min(o.batch_size, n_examples)
    per_epoch = n_examples // batch
    total = per_epoch * max(o.epochs, 1) if o.max_steps == 0 else o.max_steps
    if o.max_steps and o.epochs:
        total = min(o.max_steps, per_epoch * o.epochs)
    return batch, per_epoch, total


def train(
    lm: nn.Module,
    features: Features,
    o: opts.Options,
    trainable: tp.Sequence[nn.Parameter],
    rank: int = 0,
    world: int = 1,
    cancelled: tp.Callable[[], bool] = lambda: False,
) -> History:
    """Run the updates of ``o`` on ``lm`` (its ``trainable`` parameters), this process being ``rank``
    of ``world`` (the process group is set up by the caller when ``world`` > 1)."""
    device = next(lm.parameters()).device
    examples = features.examples
    batch, per_epoch, total = plan(len(examples), o)
    if batch != o.batch_size and rank == 0:
        log.info("batch_size %d is more than the %d segments: using %d", o.batch_size, len(examples), batch)
    if batch % (o.gradient_accumulation * world):
        raise ValueError(
            f"a batch of {batch} cannot be split into {o.gradient_accumulation} micro-batches "
            f"on each of {world} processes"
        )
    micro = batch // (o.gradient_accumulation * world)
    if device.type == "cpu" and allocator.map_large_blocks() and rank == 0:
        log.info(
            "allocator: blocks from %d KiB up mapped, and returned when freed (glibc's mmap threshold "
            "fixed: training.allocator)",
            allocator.THRESHOLD // 1024,
        )
    warmup = max(1, round(opts.WARMUP_FRACTION * total))
    optimizer = torch.optim.AdamW(
        trainable, lr=o.learning_rate, betas=opts.BETAS, weight_decay=opts.WEIGHT_DECAY[o.method]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(total, warmup))
    if o.gradient_checkpointing:
        lm.transformer.checkpointing = "torch"  # audiocraft's own option: layers recomputed in backward
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    predict: nn.Module = _Predictions(lm)
    if world > 1:
        predict = nn.parallel.DistributedDataParallel(
            predict, device_ids=[device.index] if device.type == "cuda" else None
        )
    p_all, p_melody = dropout_probabilities(lm)
    history = History(last=max(1, per_epoch))
    lm.train()
    start = time.perf_counter()
    last_report = start
    report_every = max(1, total // 20)
    step = 0
    if rank == 0:
        log.info(
            "training: %d updates (%d per epoch) of %d segments each (%d per micro-batch, %d micro-batches, "
            "%d process(es)), lr %.1e with %d warmup updates, %s%s",
            total,
            per_epoch,
            batch,
            micro,
            o.gradient_accumulation,
            world,
            o.learning_rate,
            warmup,
            "bf16 autocast" if bf16 else "fp32",
            ", gradient checkpointing" if o.gradient_checkpointing else "",
        )
    while step < total:
        epoch = step // max(per_epoch, 1)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(o.seed * 1000 + epoch)).tolist()
        for j in range(per_epoch):
            if step >= total:
                break
            chosen = [examples[i] for i in order[j * batch : (j + 1) * batch]]
            rng = torch.Generator().manual_seed(o.seed * 1_000_003 + step)  # the same on every process
            drop_all = torch.rand(batch, generator=rng) < p_all
            drop_melody = torch.rand(batch, generator=rng) < p_melody
            mine = range(rank * batch // world, (rank + 1) * batch // world)
            loss_sum = 0.0
            for m in range(o.gradient_accumulation):
                if cancelled():
                    raise Cancelled("training cancelled")
                idx = list(mine)[m * micro : (m + 1) * micro]
                sync = m == o.gradient_accumulation - 1 or world == 1
                ctx = predict.no_sync() if not sync and world > 1 else contextlib.nullcontext()
                # (each adapted weight, W + B @ A, computed once per forward however often it is read)
                with ctx, parametrize.cached():
                    loss = loss_of(
                        predict, lm, features, [chosen[i] for i in idx], drop_all[idx], drop_melody[idx], autocast
                    )
                    (loss / o.gradient_accumulation).backward()
                loss_sum += loss.item() / o.gradient_accumulation
                history.tokens += sum(chosen[i].codes.numel() for i in idx)
            if not math.isfinite(loss_sum):
                raise RuntimeError(f"the loss became {loss_sum} at update {step + 1}: lower the learning rate")
            history.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, opts.MAX_GRAD_NORM)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:  # the logged loss: the mean over processes
                t = torch.tensor([loss_sum], device=device)
                torch.distributed.all_reduce(t)
                loss_sum = float(t) / world
            history.losses.append(loss_sum)
            history.learning_rates.append(scheduler.get_last_lr()[0])
            step += 1
            now = time.perf_counter()
            if rank == 0 and (step % report_every == 0 or step == total or now - last_report > 30):
                elapsed = now - start
                rate = history.tokens * world / elapsed
                log.info(
                    "step %d/%d (epoch %d): loss %.4f, lr %.2e, %.0f tokens/s, %s left",
                    step,
                    total,
                    epoch + 1,
                    loss_sum,
                    history.learning_rates[-1],
                    rate,
                    _duration(elapsed / step * (total - step)),
                )
                last_report = now
    lm.eval()
    lm.transformer.checkpointing = "none"
    history.seconds = time.perf_counter() - start
    return history


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
