"""What a request logs as it generates: how much new audio there is, about every tenth of it."""

from __future__ import annotations

import time
import typing as tp

from ..core.errors import Cancelled
from ..core.logs import get_logger

log = get_logger()


class Progress:
    """Logs how much new audio has been generated, about every tenth of the request, whatever
    the number of extension windows; positions are in seconds of new audio."""

    def __init__(
        self,
        new_frames: int,
        prompt_frames: int,
        frame_rate: float,
        stride_frames: int,
        step: float = 0.1,
        say: tp.Optional[tp.Callable[[str], None]] = None,
        cancelled: tp.Optional[tp.Callable[[], bool]] = None,
    ):
        """``say``: where the lines go (default: the log); ``cancelled``: checked at every step, it
        stops the generation by raising :class:`~..core.errors.Cancelled`."""
        self.say = say or log.info
        self.cancelled = cancelled
        self.new_frames = new_frames
        self.prompt_frames = prompt_frames
        self.frame_rate = frame_rate
        self.stride_frames = stride_frames
        self.step = step
        self.window = -1
        self.next_report = step
        self.start = time.perf_counter()

    def new_window(self, window_prompt_frames: int) -> tp.Callable[[int, int], None]:
        """The callback for one ``lm.generate`` call (one window) whose prompt has that length."""
        self.window += 1
        window_start = self.window * self.stride_frames

        def callback(generated: int, _to_generate: int) -> None:
            self.update(window_start + window_prompt_frames + generated - self.prompt_frames)

        return callback

    def update(self, done_frames: int) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("cancelled")
        fraction = min(done_frames / self.new_frames, 1.0)
        if fraction + 1e-9 < self.next_report:
            return
        while self.next_report <= fraction + 1e-9:
            self.next_report += self.step
        self.say(
            "generated %.1f s / %.1f s of audio (%d%%), %.1f s elapsed"
            % (
                min(done_frames, self.new_frames) / self.frame_rate,
                self.new_frames / self.frame_rate,
                round(100 * fraction),
                time.perf_counter() - self.start,
            )
        )
