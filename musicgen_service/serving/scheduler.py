"""How concurrent requests share the LM: rows admitted between decoding steps.

A MusicGen step streams all the LM's weights whether it decodes one request or
eight, so requests that overlap in time are decoded together, one row each
(:mod:`..decoding.rows`): continuous batching. The scheduler takes its turns in the
compute thread (:mod:`.compute`), between that thread's other tasks (conditions,
decoding audio, writing files: one request's are done while the others wait a step):

- a request arrives (:meth:`Scheduler.submit`, after its conditions are computed)
  and waits;
- when the scheduler is idle it waits :data:`GATHER_SECONDS` for others that
  arrive together, so they start together; while rows are decoding, a new
  request joins at the next step (its prefill runs alone, then it shares the
  steps);
- every row stops at its own length; its tokens go back to its request, which
  has them decoded, normalized and written (a task of the compute thread);
- a cancelled request leaves at the next step; a failing one fails alone.

Which requests share steps: text, melody and continuation requests whose
generation fits in the model's window (prompt + new audio <= 30 s), when the
decoder shares steps at all (:attr:`..decoding.Decoder.shares_steps`: which
precisions and devices, and why). The rest run alone, in arrival order, between
batches. Either way a request's tokens depend only on its own inputs and seed.
"""

from __future__ import annotations

import threading
import time
import typing as tp
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..core.errors import Cancelled
from ..core.logs import get_logger

if tp.TYPE_CHECKING:
    from ..generation.generator import Conditioned, Generator
    from .compute import ComputeThread

log = get_logger()

# How long an idle scheduler waits for requests arriving together (e.g. a client sending four at
# once) before starting: 50 ms is ~1% of a 4 s request on a CPU.
GATHER_SECONDS = 0.05


@dataclass
class Job:
    conditioned: "Conditioned"
    cancel: threading.Event
    future: Future = field(default_factory=Future)
    row: tp.Any = None  # decoding.rows.Row while decoding in a batch
    started: float = 0.0


class Scheduler:
    """Runs in the compute thread (:mod:`.compute`), between its tasks: each turn admits what
    arrived and takes one decoding step for every active row."""

    def __init__(
        self, generator: "Generator", slots: int, compute: "ComputeThread", gather_seconds: float = GATHER_SECONDS
    ):
        self.generator = generator
        self.slots = max(1, slots)
        self.compute = compute
        self.gather_seconds = gather_seconds
        decoder = generator.decoder
        self.batching = decoder.shares_steps
        self.rows = None
        if self.batching:
            from ..decoding.rows import RowDecoder

            self.rows = RowDecoder(decoder.runner, self.slots)
            log.info("batching: %s", self.rows.describe_padding())
            compute.backgrounds.add(self)  # otherwise the service runs each request as one task
        # touched in the compute thread only
        self.waiting: tp.List[Job] = []
        self.active: tp.List[Job] = []
        self.deadline = 0.0  # end of the gathering delay, while idle
        self.steps = 0
        self.batch_sizes: tp.Dict[int, int] = {}  # rows per step -> steps, for the logs and bench

    def describe(self) -> str:
        if self.batching:
            return f"batched: up to {self.slots} requests share each decoding step"
        return f"one request at a time (decoder {self.generator.decoder.mode})"

    def batchable(self, conditioned: "Conditioned") -> bool:
        return self.generator.one_window(conditioned)

    def submit(self, conditioned: "Conditioned", cancel: tp.Optional[threading.Event] = None) -> Future:
        """Queue a conditioned request; its tokens arrive in the returned future."""
        assert self.batching, "without batching the service runs requests itself"
        job = Job(conditioned, cancel or threading.Event())
        self.compute.post(lambda: self._arrive(job))
        return job.future

    # ---------------------------------------------------------------- in the compute thread

    def _arrive(self, job: Job) -> None:
        if not self.active and not self.waiting:  # idle: wait a moment for others arriving together
            self.deadline = time.monotonic() + self.gather_seconds
        self.waiting.append(job)

    def wait(self) -> tp.Optional[float]:
        if not self.active and not self.waiting:
            return None
        if not self.active and len(self.waiting) < self.slots:
            return max(0.0, self.deadline - time.monotonic())
        return 0.0

    def turn(self) -> None:
        """Admit, then one step (or one request that must run alone)."""
        self.waiting = [job for job in self.waiting if not self._dropped(job)]
        # arrival order: a request that must run alone waits for the batch to drain, then runs
        while self.waiting and len(self.active) < self.slots and self.batchable(self.waiting[0].conditioned):
            job = self.waiting.pop(0)
            if self._admit(job):
                self.active.append(job)
        if not self.active and self.waiting:
            self._alone(self.waiting.pop(0))
            return
        self.active = [job for job in self.active if not self._dropped(job)]
        if self.active:
            self._step(self.active)
            self.active = [job for job in self.active if not self._finished(job)]

    def fail(self, exc: BaseException) -> None:
        for job in self.waiting + self.active:
            if not job.future.done():
                job.future.set_exception(exc)
        self.waiting, self.active = [], []

    def _dropped(self, job: Job) -> bool:
        if job.cancel.is_set():
            if not job.future.done():
                job.future.set_exception(Cancelled("cancelled"))
            return True
        return False

    def _admit(self, job: Job) -> bool:
        from ..decoding.rows import Row

        conditioned = job.conditioned
        req = conditioned.req
        progress = self._progress(conditioned)
        try:
            job.row = Row(
                condition_tensors=conditioned.condition_tensors,
                prompt=conditioned.context,
                max_gen_len=conditioned.prompt_frames + conditioned.new_frames,
                seed=conditioned.seed,
                temp=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                use_sampling=not req.greedy,
                cfg_coef=float(req.classifier_free_guidance),
                progress=lambda done, total: progress.update(done),
            )
            job.started = time.perf_counter()
            self.rows.admit(job.row)
        except Exception as exc:  # this request fails alone
            job.future.set_exception(exc)
            return False
        return True

    def _progress(self, conditioned: "Conditioned") -> tp.Any:
        from ..generation.generator import EXTEND_STRIDE
        from ..generation.progress import Progress

        fr = self.generator.model.frame_rate
        return Progress(conditioned.new_frames, 0, fr, int(EXTEND_STRIDE * fr), say=conditioned.say)

    def _step(self, active: tp.List[Job]) -> None:
        rows = [job.row for job in active if not job.row.done]
        if not rows:
            return
        try:
            self.rows.step(rows)
        except Exception as exc:  # a bug, not an input: every request of the step fails with it
            for job in active:
                if not job.future.done():
                    job.future.set_exception(exc)
                job.cancel.set()
            return
        self.steps += 1
        self.batch_sizes[len(rows)] = self.batch_sizes.get(len(rows), 0) + 1

    def _finished(self, job: Job) -> bool:
        if job.future.done():
            return True
        if not job.row.done:
            return False
        try:
            tokens = job.row.codes()
            self.generator.report(job.conditioned, time.perf_counter() - job.started)
            job.conditioned.say("decoding steps shared with other requests: %d of %d" % (job.row.shared, job.row.steps))
            job.future.set_result(tokens)
        except Exception as exc:
            job.future.set_exception(exc)
        return True

    def _alone(self, job: Job) -> None:
        from ..core.logs import redirected

        try:
            with redirected(job.conditioned.say):
                job.future.set_result(self.generator.tokens(job.conditioned, cancelled=job.cancel.is_set))
        except Exception as exc:
            job.future.set_exception(Cancelled("cancelled") if job.cancel.is_set() else exc)
