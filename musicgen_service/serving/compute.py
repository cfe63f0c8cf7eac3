"""The one thread that runs all of the service's torch work, setup included.

Why one thread: torch's CPU kernels run in parallel with OpenMP, which gives every
OS thread that calls them a team of worker threads of its own, alive as long as
that thread. Once a second team exists (say, setup ran in the main thread and
predictions run in the threads serving requests), libgomp counts more threads
than cores and stops letting its workers spin between parallel regions: each
region then pays a futex wake-up of its workers. Measured (AMD EPYC, 2 cores,
torch 2.11, 2 threads): a LayerNorm of [16, 1, 1024] takes 7.8 us in the thread of
the only team and 53 us in a second thread; a musicgen-small int8 decoding step
18.5 ms and 32 ms. So the service (:mod:`.service`) sends everything that runs
torch (loading, conditions, decoding steps, EnCodec, normalization, encoding) to
this thread, and the threads serving requests only wait and log.

A caller's log lines: records of the ``musicgen`` logger written while this
thread works on a task go back to the task's caller (:func:`..core.logs.redirected`),
which logs them in its own thread, where Cog attributes them to its prediction.

Other work that belongs to this thread runs between tasks: the batch scheduler
(:class:`.scheduler.Scheduler`) takes its turns (one decoding step each) here.

There is one such thread per process (:func:`shared`), whatever the number of
services in it (tests and benchmarks make several).
"""

from __future__ import annotations

import functools
import queue
import threading
import typing as tp
import weakref
from concurrent.futures import Future
from dataclasses import dataclass

from ..core.logs import get_logger, redirected

log = get_logger()


class Background(tp.Protocol):
    """Work the compute thread does between tasks (the batch scheduler)."""

    def wait(self) -> tp.Optional[float]:
        """How long the thread may wait for a task before :meth:`turn` (None: nothing to do)."""

    def turn(self) -> None:
        """One unit of work (one decoding step): short, so that tasks are not held up."""

    def fail(self, exc: BaseException) -> None:
        """A turn raised (a bug): fail what is in flight rather than leave it hanging."""


@dataclass
class _Task:
    fn: tp.Callable[[], tp.Any]
    say: tp.Optional[tp.Callable[[str], None]]
    future: Future


class ComputeThread:
    def __init__(self, name: str = "musicgen-compute"):
        self.queue: "queue.SimpleQueue[_Task]" = queue.SimpleQueue()
        # the schedulers of the live services (weak: a service dropped takes its scheduler along)
        self.backgrounds: "weakref.WeakSet[Background]" = weakref.WeakSet()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def inside(self) -> bool:
        return threading.current_thread() is self.thread

    def post(self, fn: tp.Callable[[], tp.Any], say: tp.Optional[tp.Callable[[str], None]] = None) -> Future:
        """Queue ``fn`` for the thread; its ``musicgen`` log lines go to ``say`` (when given)."""
        future: Future = Future()
        self.queue.put(_Task(fn, say, future))
        return future

    def call(
        self,
        fn: tp.Callable[..., tp.Any],
        *args: tp.Any,
        lines: tp.Optional["queue.SimpleQueue[str]"] = None,
        **kwargs: tp.Any,
    ) -> tp.Any:
        """Run ``fn(*args, **kwargs)`` in the thread and return its result (or raise its exception),
        logging its lines in the calling thread. From the thread itself: run at once."""
        if self.inside():
            return fn(*args, **kwargs)
        lines = lines if lines is not None else queue.SimpleQueue()
        return relay(self.post(functools.partial(fn, *args, **kwargs), say=lines.put), lines)

    def _loop(self) -> None:
        # (no local variable outlives an iteration: a service dropped must not be kept alive here)
        while True:
            wait = self._wait()
            try:
                self._run(self.queue.get(timeout=wait) if wait is None or wait > 0 else self.queue.get_nowait())
            except queue.Empty:
                self._turns()

    def _wait(self) -> tp.Optional[float]:
        due = [w for w in (b.wait() for b in list(self.backgrounds)) if w is not None]
        return min(due) if due else None

    def _turns(self) -> None:
        for background in list(self.backgrounds):
            if background.wait() == 0:
                try:
                    background.turn()
                except Exception as exc:
                    log.exception("scheduler error")
                    background.fail(exc)

    @staticmethod
    def _run(task: _Task) -> None:
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            with redirected(task.say):
                result = task.fn()
        except BaseException as exc:  # the caller gets it, whatever it is
            task.future.set_exception(exc)
        else:
            task.future.set_result(result)


_SHARED: tp.Optional[ComputeThread] = None
_SHARED_LOCK = threading.Lock()


def shared() -> ComputeThread:
    """The process' compute thread (started on first use)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = ComputeThread()
        return _SHARED


def relay(future: Future, lines: "queue.SimpleQueue[str]") -> tp.Any:
    """Wait for ``future`` in this thread, logging the lines that arrive for it meanwhile."""
    while not future.done() or not lines.empty():
        try:
            log.info(lines.get(timeout=0.05))
        except queue.Empty:
            pass
    return future.result()
