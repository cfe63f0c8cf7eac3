"""Several requests decoded together, one row each (with its null twin for guidance), step by step.

The scheduler (:mod:`musicgen_service.serving.scheduler`) admits rows between steps and
removes them when they finish or are cancelled; this module decodes them. Each
row keeps everything of its own: its window (caches, position, conditions), its
codebook pattern (:class:`.loop.Sequence`), its sampling parameters and its own
random generator seeded with its seed. Only the weight-streaming matrix products
are shared, at a padded row count (:func:`.window.batched_step`, :class:`RowDecoder`).
So a row's tokens do not depend on the rows beside it: a request gives the same tokens alone or in
any batch (tests/test_batching.py checks it).

A row's prefill runs alone, on its own shapes, when it is admitted.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import torch

from .loop import Sequence
from .runner import Runner
from .sampling import StepSampler
from .window import Window, batched_step


@dataclass
class Row:
    """One request as the LM sees it."""

    condition_tensors: tp.Dict[str, tp.Any]  # the conditions with their null twins (batch 2)
    prompt: tp.Optional[torch.Tensor]  # [1, K, T] tokens to continue, or None
    max_gen_len: int  # frames of the whole window, prompt included
    seed: int
    temp: float
    top_k: int
    top_p: float
    cfg_coef: float
    use_sampling: bool = True
    progress: tp.Optional[tp.Callable[[int, int], None]] = None
    # decoding state
    seq: tp.Any = field(default=None, repr=False)
    window: tp.Optional[Window] = field(default=None, repr=False)
    sampler: tp.Optional[StepSampler] = field(default=None, repr=False)
    generator: tp.Optional[torch.Generator] = field(default=None, repr=False)
    offset: int = 0
    steps: int = 0  # batched steps taken
    shared: int = 0  # of which with other rows

    @property
    def done(self) -> bool:
        return self.seq is not None and self.offset >= self.seq.length

    def codes(self) -> torch.Tensor:
        return self.seq.codes()


class RowDecoder:
    """Decodes up to ``slots`` rows at a time on one runner (2 matrix rows each).

    The shared products run on a padded number of matrix rows. ``fixed`` padding (always
    ``2 * slots``) makes every step use the same kernels, so a row's bits cannot depend on the
    others; but a lone request then pays for the padding (on the AMD EPYC measured, int8's products
    cost 2x at 8 rows what they cost at 2). ``adaptive`` padding (the next power of two of the rows in
    use) is chosen when this machine's kernels give a row the same bits at every row count and
    position (:meth:`invariant_across_row_counts`, checked on every matrix shape of the runner)."""

    def __init__(self, runner: Runner, slots: int, padding: tp.Optional[str] = None):
        self.runner = runner
        self.slots = slots
        self.lm = runner.lm
        self.padding = padding or ("adaptive" if self.invariant_across_row_counts() else "fixed")

    def describe_padding(self) -> str:
        why = (
            "a row's bits do not depend on the row count here"
            if self.padding == "adaptive"
            else "rows always padded to the full batch, so that none depends on the others"
        )
        return f"{self.padding} padding ({why}), up to {self.slots} requests per step"

    def padded(self, rows: int) -> int:
        if self.padding == "fixed":
            return 2 * self.slots
        return min(max(2, 1 << (rows - 1).bit_length()), 2 * self.slots)

    @torch.no_grad()
    def invariant_across_row_counts(self) -> bool:
        """Whether each matrix shape of the runner gives a row the same bits at every padded row
        count (2, 4, ... 2 * slots) and position, beside random other rows."""
        counts = [n for n in (2, 4, 8, 16, 32, 64) if n <= 2 * self.slots]
        if len(counts) == 1:
            return True
        gen = torch.Generator().manual_seed(0)
        seen: tp.Set[tp.Tuple[int, ...]] = set()
        for m in self.runner.matrices():
            if m.shape in seen:
                continue
            seen.add(m.shape)
            dtype = self.runner.act_dtype
            row = torch.randn(1, 1, m.shape[1], generator=gen).to(self.runner.device, dtype)
            reference = m(torch.cat([row, torch.zeros_like(row)]))[0]
            for n in counts[1:]:
                for position in (0, n - 1):
                    x = torch.randn(n, 1, m.shape[1], generator=gen).to(self.runner.device, dtype)
                    x[position] = row[0]
                    if not torch.equal(m(x)[position], reference):
                        return False
        return True

    @torch.no_grad()
    def admit(self, row: Row) -> None:
        """Prefill the row alone and sample its first token."""
        lm, device = self.lm, self.runner.device
        prompt = (
            row.prompt
            if row.prompt is not None
            else torch.zeros((1, lm.num_codebooks, 0), dtype=torch.long, device=device)
        )
        row.seq = seq = Sequence(lm, prompt, row.max_gen_len)
        row.window = self.runner.start(row.condition_tensors, 2, seq.length)
        row.sampler = StepSampler(device, lm.card)
        row.sampler.set(row.use_sampling, row.temp, row.top_k, row.top_p, row.cfg_coef)
        row.generator = torch.Generator(device).manual_seed(row.seed)
        first = seq.tokens[..., : seq.start]
        self._commit(row, row.window.prefill(torch.cat([first, first])), seq.start)

    @torch.no_grad()
    def step(self, rows: tp.Sequence[Row]) -> None:
        """One step for every row given (all admitted, none done)."""
        columns = [row.seq.tokens[..., row.offset - 1 : row.offset] for row in rows]
        logits = batched_step(
            [row.window for row in rows], [torch.cat([c, c]) for c in columns], self.padded(2 * len(rows))
        )
        for row, all_logits in zip(rows, logits):
            row.steps += 1
            row.shared += len(rows) > 1
            self._commit(row, all_logits, row.offset)

    def _commit(self, row: Row, all_logits: torch.Tensor, offset: int) -> None:
        row.seq.write(offset, row.sampler(row.sampler.guide(all_logits, 1), row.generator))
        row.offset = offset + 1
        if row.progress is not None:
            row.progress(row.offset - row.seq.start, row.seq.length - row.seq.start)
