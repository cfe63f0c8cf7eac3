"""Decoding ``input_audio``: any common format in, the model's rate and channels out, bounded.

PyAV (FFmpeg, already an audiocraft dependency) decodes in-process: wav, mp3,
flac, ogg/vorbis, opus, m4a/aac and anything else FFmpeg reads. Each decoded
frame is resampled to the model's rate (libswresample) and converted to the
model's channel count with audiocraft's own rule (``convert_audio_channels``:
mono is the average of all channels, stereo from more channels keeps the first
two, mono to stereo repeats) *while* decoding, so memory is bounded by the kept
audio at 32 kHz, whatever the file's own rate or channel count. audiocraft's ``audio_read`` is not used: it
returns the whole file at its native rate and channel count before any
conversion, which is what a limit must prevent.

Limits, checked as early as possible: the file's size before opening it, the
duration its header claims before decoding, and the decoded length while
decoding (a header can lie). Every failure is an ``InputError`` naming
``input_audio`` (or the continuation bounds) in plain words, never a decoder
stack trace.
"""
from __future__ import annotations

import typing as tp
import wave
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

MAX_BYTES = 100 * 1024 * 1024
MAX_SECONDS = 600.0
FIELD = "input_audio"
# Formats whose header length is only an estimate (mp3 without an exact Xing/Info frame):
# a shorter decode there is not evidence of truncation.
_ESTIMATED_DURATION_FORMATS = {"mp3"}
_TRUNCATION_TOLERANCE = 0.5  # seconds


def _fail(rule: str, field: str = FIELD) -> tp.NoReturn:
    raise InputError([(field, rule)])


@dataclass
class Clip:
    """The selected part of ``input_audio`` at the model's rate and channel count."""

    wav: tp.Any  # torch.Tensor [channels, samples], float32
    sample_rate: int
    start: float  # seconds into the file where ``wav`` begins
    file_seconds: tp.Optional[float]  # the whole file's length, when it was decoded to the end

    @property
    def seconds(self) -> float:
        return self.wav.shape[-1] / self.sample_rate


def check_size(path: Path, max_bytes: tp.Optional[int] = None, field: str = FIELD) -> None:
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    try:
        size = path.stat().st_size
    except OSError as exc:
        _fail(f"could not be read ({exc.strerror or exc})", field)
    if size == 0:
        _fail("the file is empty", field)
    if size > max_bytes:
        _fail(f"the file is {size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB", field)


def load(path: tp.Union[str, Path], sample_rate: int, channels: int, start: float = 0.0,
         end: tp.Optional[float] = None, max_bytes: tp.Optional[int] = None,
         max_seconds: tp.Optional[float] = None, field: str = FIELD) -> Clip:
    """Decode ``path`` from ``start`` to ``end`` seconds (None: to the end) as float32
    ``[channels, samples]`` at ``sample_rate``.

    Raises InputError (naming ``field``) for a missing, empty, oversized (``max_bytes``), too long
    (``max_seconds``), damaged or non-audio file, or a ``start`` at or past the end of the audio (the
    message gives the clip's real length). Training datasets use their own limits and field.
    """
    import av
    import torch

    path = Path(path)
    max_seconds = MAX_SECONDS if max_seconds is None else max_seconds  # (read now: tests lower the limits)
    check_size(path, max_bytes, field)

    def fail(rule: str, f: str = field) -> tp.NoReturn:
        raise InputError([(f, rule)])

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        fail(f"could not be read as audio (wav, mp3, flac, ogg, opus or m4a expected): {_reason(exc)}")
    with container:
        if not container.streams.audio:
            fail("could not be read as audio: the file holds no audio stream")
        stream = container.streams.audio[0]
        declared = _declared_seconds(path, container, stream)
        if declared is not None and declared > max_seconds:
            fail(f"is {declared / 60:.1f} minutes long; the limit is {max_seconds / 60:.0f} minutes")
        resampler = av.AudioResampler(format="flt", rate=sample_rate)  # keeps the source layout
        first = int(round(start * sample_rate))
        last = None if end is None else int(round(end * sample_rate))
        limit = int(max_seconds * sample_rate)
        chunks: tp.List[tp.Any] = []
        decoded = 0  # samples at sample_rate since the start of the file
        reached_end = True
        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler follow sample counts, not damaged timestamps
                for out in resampler.resample(frame):
                    decoded = _keep(out, chunks, decoded, first, last, channels)
                if decoded > limit:
                    fail(f"is longer than {max_seconds / 60:.0f} minutes, the limit")
                if last is not None and decoded >= last:
                    reached_end = False
                    break
            else:
                for out in resampler.resample(None):
                    decoded = _keep(out, chunks, decoded, first, last, channels)
        except av.error.FFmpegError as exc:
            fail(f"is damaged or truncated: decoding failed after {decoded / sample_rate:.1f} s "
                  f"({_reason(exc)})")
        file_format = container.format.name

    if decoded == 0:
        fail("contains no audio samples")
    total = decoded / sample_rate
    if (reached_end and declared is not None and file_format not in _ESTIMATED_DURATION_FORMATS
            and total < declared - max(_TRUNCATION_TOLERANCE, 0.02 * declared)):
        fail(f"is truncated: its header says {declared:.1f} s but only {total:.1f} s could be decoded")
    if first >= decoded:
        fail(f"is {total:.1f} s long, so continuation_start ({start:g} s) is past its end",
              "continuation_start")
    wav = torch.cat(chunks, dim=1)
    return Clip(wav=wav, sample_rate=sample_rate, start=first / sample_rate,
                file_seconds=total if reached_end else None)


def _keep(frame: tp.Any, chunks: tp.List[tp.Any], decoded: int, first: int,
          last: tp.Optional[int], channels: int) -> int:
    """Append the part of ``frame`` inside [first, last) to ``chunks``, as ``channels`` channels;
    return the new count of decoded samples."""
    import torch
    from audiocraft.data.audio_utils import convert_audio_channels

    data = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).T  # packed -> [C, n]
    n = data.shape[1]
    lo, hi = max(first - decoded, 0), n if last is None else min(last - decoded, n)
    if hi > lo:
        chunks.append(convert_audio_channels(torch.from_numpy(data[:, lo:hi].copy()), channels))
    return decoded + n


def _declared_seconds(path: Path, container: tp.Any, stream: tp.Any) -> tp.Optional[float]:
    """The length the file's header claims (None when it says nothing)."""
    if container.format.name == "wav":
        # FFmpeg caps a WAV's length at what the file holds, which hides both truncation and a
        # lying header; the RIFF header itself (read by the standard library) says what was meant.
        try:
            with wave.open(str(path)) as riff:
                frames, rate = riff.getnframes(), riff.getframerate()
                data_bytes = frames * riff.getsampwidth() * riff.getnchannels()
            if 0 < data_bytes < 0xFFFFFF00 and rate > 0:  # 0 / 0xFFFFFFFF: a streamed, unsized WAV
                return frames / rate
        except (wave.Error, EOFError):
            pass  # not plain PCM (float, extensible): FFmpeg's figure below
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc).split(": '")[0] or type(exc).__name__
