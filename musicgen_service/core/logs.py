"""Log lines a user reads on the prediction page: plain text on stdout, one line per event.

Cog shows a prediction's stdout/stderr as its logs. The handler looks up
``sys.stdout`` at every record (rather than holding the stream it saw at
start-up) so that Cog's per-prediction capture of stdout receives the lines.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import typing as tp

LOGGER_NAME = "musicgen"
_REDIRECT = threading.local()


class _CurrentStdout(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # a closed stream must never fail a prediction
            self.handleError(record)


class _Redirect(logging.Filter):
    """Sends a record to this thread's redirection (:func:`redirected`) instead, when one is set."""

    def filter(self, record: logging.LogRecord) -> bool:
        say = getattr(_REDIRECT, "say", None)
        if say is None:
            return True
        _REDIRECT.say = None  # what ``say`` logs itself (it may be ``log.info``) is logged here
        try:
            say(record.getMessage())
        finally:
            _REDIRECT.say = say
        return False


@contextlib.contextmanager
def redirected(say: tp.Optional[tp.Callable[[str], None]]) -> tp.Iterator[None]:
    """Within the block, this thread's ``musicgen`` log lines go to ``say`` (None: logged as usual):
    how work done in the compute thread (:mod:`..serving.compute`) is logged by the request it is done for."""
    previous = getattr(_REDIRECT, "say", None)
    _REDIRECT.say = say
    try:
        yield
    finally:
        _REDIRECT.say = previous


def get_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_Redirect())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@contextlib.contextmanager
def timed(label: str, logger: tp.Optional[logging.Logger] = None) -> tp.Iterator[tp.Dict[str, float]]:
    """Log ``label: 1.23 s`` when the block ends; the dict receives ``seconds``."""
    out: tp.Dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
    (logger or get_logger()).info("%s: %.2f s", label, out["seconds"])
