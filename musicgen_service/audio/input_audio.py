"""Decoding ``input_audio``: plain audio containers in, the model's rate and channels out, bounded.

PyAV (FFmpeg, already an audiocraft dependency) decodes in-process. Only plain audio containers are
opened (:data:`CONTAINERS`: wav, mp3, flac, ogg (vorbis, opus), m4a/mp4, aac, aiff, webm/mkv: what
recorders, DAWs, phones and browsers write), recognised by their content (:func:`container`), never by
their name, and FFmpeg is told which demuxer to use: left to itself it picks by content *and* name,
and a text file named ``*.m3u8`` is an HLS playlist whose entries (``/etc/...``, ``file://...``) it
opens and decodes, handing back a local file's samples. FFmpeg also never opens a path or URL itself:
it reads the one file through a Python file object, so no protocol (file, concat, subfile, http...)
is ever involved. Playlists, lists, image sequences, network streams and every other format are
refused with a message naming the field.

Each decoded frame is resampled to the model's rate (libswresample) and converted to the
model's channel count with audiocraft's own rule (``convert_audio_channels``: mono is the average of
all channels, stereo from more channels keeps the first two, mono to stereo repeats) *while*
decoding, so memory is bounded by the kept audio at 32 kHz, whatever the file's own rate or channel
count (:func:`blocks` hands it out piece by piece, for callers that keep less). audiocraft's
``audio_read`` is not used: it returns the whole file at its native rate and channel count before any
conversion, which is what a limit must prevent.

Limits, checked as early as possible: the file's size before opening it, the duration its header
claims before decoding, and the decoded length while decoding (a header can lie). Every failure is an
``InputError`` naming ``input_audio`` (or the continuation bounds) in plain words, never a decoder
stack trace.
"""

from __future__ import annotations

import typing as tp
import wave
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError

# The FFmpeg demuxers opened, by what the file starts with (:func:`container`). Users send wav, mp3,
# flac, ogg/opus, m4a (phones, iTunes), aac, aiff (Logic, Pro Tools) and webm (browsers' recorders).
CONTAINERS = ("wav", "mp3", "flac", "ogg", "mp4", "aac", "aiff", "matroska")
EXPECTED = "wav, mp3, flac, ogg, opus, m4a, aac, aiff or webm"
# Source rates a recording has (telephone 8 kHz to 384 kHz studio masters, with room): a header that
# claims 1 Hz makes the resampler multiply every sample 32,000 times (bench/fuzz_audio.py: +1.8 GB).
MIN_SOURCE_RATE = 4000
MAX_SOURCE_RATE = 768000
MAX_BYTES = 100 * 1024 * 1024
MAX_SECONDS = 600.0
FIELD = "input_audio"
# Formats whose header length is only an estimate (mp3 without an exact Xing/Info frame, raw ADTS aac:
# FFmpeg estimates both from the bitrate): a shorter decode there is not evidence of truncation.
_ESTIMATED_DURATION_FORMATS = {"mp3", "aac"}
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


def load(
    path: tp.Union[str, Path],
    sample_rate: int,
    channels: int,
    start: float = 0.0,
    end: tp.Optional[float] = None,
    max_bytes: tp.Optional[int] = None,
    max_seconds: tp.Optional[float] = None,
    field: str = FIELD,
) -> Clip:
    """Decode ``path`` from ``start`` to ``end`` seconds (None: to the end) as float32
    ``[channels, samples]`` at ``sample_rate``.

    Raises InputError (naming ``field``) for a missing, empty, oversized (``max_bytes``), too long
    (``max_seconds``), damaged or non-audio file, or a ``start`` at or past the end of the audio (the
    message gives the clip's real length). Training datasets use their own limits and field.
    """
    import torch

    decoding = Decoding(path, sample_rate, channels, start, end, max_bytes, max_seconds, field)
    pieces = list(decoding)
    return Clip(
        wav=torch.cat(pieces, dim=1),
        sample_rate=sample_rate,
        start=decoding.first / sample_rate,
        file_seconds=decoding.file_seconds,
    )


class Decoding:
    """``path`` decoded as it is read: iterating gives the [channels, n] float32 pieces between ``start``
    and ``end`` at ``sample_rate``, in order (a piece is what one of the file's frames holds); after the
    last piece, the checks that need the whole file (truncation, a start past the end) have run, and
    :attr:`file_seconds` is set. Every problem raises InputError naming ``field``, before the first
    piece where it can (size, container, declared length) and else where it shows: a caller that keeps
    pieces must drop them when iteration raises."""

    def __init__(
        self,
        path: tp.Union[str, Path],
        sample_rate: int,
        channels: int,
        start: float = 0.0,
        end: tp.Optional[float] = None,
        max_bytes: tp.Optional[int] = None,
        max_seconds: tp.Optional[float] = None,
        field: str = FIELD,
    ):
        self.path = Path(path)
        self.sample_rate, self.channels, self.field = sample_rate, channels, field
        self.start = start
        self.max_seconds = MAX_SECONDS if max_seconds is None else max_seconds  # (read now: tests lower it)
        self.max_bytes = max_bytes
        self.first = int(round(start * sample_rate))
        self.last = None if end is None else int(round(end * sample_rate))
        self.file_seconds: tp.Optional[float] = None  # the whole file's length, once decoded to its end

    def fail(self, rule: str, field: tp.Optional[str] = None) -> tp.NoReturn:
        raise InputError([(field or self.field, rule)])

    def _check_rate(self, rate: tp.Optional[int]) -> None:
        if rate is not None and rate and not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
            self.fail(f"is damaged: its sample rate is {rate} Hz (audio is {MIN_SOURCE_RATE} to {MAX_SOURCE_RATE} Hz)")

    def __iter__(self) -> tp.Iterator[tp.Any]:
        import av

        check_size(self.path, self.max_bytes, self.field)
        demuxer = container(self.path, self.field)
        chunk_problem = _chunk_problem(self.path, demuxer)
        if chunk_problem:  # (before FFmpeg, which allocates what a metadata chunk declares)
            self.fail(f"is damaged: {chunk_problem}")
        try:
            source = open(self.path, "rb")
        except OSError as exc:
            self.fail(f"could not be read ({exc.strerror or exc})")
        with source:
            try:
                opened = av.open(source, format=demuxer, metadata_errors="ignore")
            except av.error.FFmpegError as exc:
                self.fail(f"could not be read as audio ({EXPECTED} expected): {_reason(exc)}")
            with opened as media:
                yield from self._pieces(media)

    def _pieces(self, media: tp.Any) -> tp.Iterator[tp.Any]:
        import av

        rate, first, last = self.sample_rate, self.first, self.last
        if not media.streams.audio:
            self.fail("could not be read as audio: the file holds no audio stream")
        stream = media.streams.audio[0]
        if stream.codec_context is None:  # a codec FFmpeg has no decoder for
            self.fail("could not be read as audio: its codec is one FFmpeg has no decoder for")
        self._check_rate(stream.codec_context.sample_rate)
        declared = _declared_seconds(self.path, media, stream)
        if declared is not None and declared > self.max_seconds:
            self.fail(f"is {declared / 60:.1f} minutes long; the limit is {self.max_seconds / 60:.0f} minutes")
        limit = int(self.max_seconds * rate)
        decoded = 0  # samples at the model's rate since the start of the file
        reached_end = True

        def checked(frames: tp.Iterable[tp.Any]) -> tp.Iterator[tp.Any]:
            """Each frame's rate, and the length it resamples to, checked before it is resampled."""
            for frame in frames:
                self._check_rate(frame.sample_rate)
                if decoded + frame.samples * rate // frame.sample_rate > limit + rate:
                    self.fail(f"is longer than {self.max_seconds / 60:.0f} minutes, the limit")
                yield frame

        try:
            for out in _resampled(checked(media.decode(stream)), rate):
                piece, decoded = _kept(out, decoded, first, last, self.channels)
                if piece is not None:
                    yield piece
                if decoded > limit:
                    self.fail(f"is longer than {self.max_seconds / 60:.0f} minutes, the limit")
                if last is not None and decoded >= last:
                    reached_end = False
                    break
        except InputError:
            raise
        except (av.error.FFmpegError, ValueError) as exc:  # (PyAV raises ValueError for some damage too)
            self.fail(f"is damaged or truncated: decoding failed after {decoded / rate:.1f} s ({_reason(exc)})")
        if decoded == 0:
            self.fail("contains no audio samples")
        total = decoded / rate
        if (
            reached_end
            and declared is not None
            and media.format.name not in _ESTIMATED_DURATION_FORMATS
            and total < declared - max(_TRUNCATION_TOLERANCE, 0.02 * declared)
        ):
            self.fail(f"is truncated: its header says {declared:.1f} s but only {total:.1f} s could be decoded")
        if first >= decoded:
            self.fail(
                f"is {total:.1f} s long, so continuation_start ({self.start:g} s) is past its end", "continuation_start"
            )
        self.file_seconds = total if reached_end else None


def _resampled(frames: tp.Iterable[tp.Any], rate: int) -> tp.Iterator[tp.Any]:
    """The decoded frames as float32 at ``rate``, in the source's layout (libswresample). A stream may
    change its rate or layout part way (mp3 and aac streams can): the resampler is then flushed and set
    up again for the new frames."""
    import av

    resampler, setup = None, None
    for frame in frames:
        frame.pts = None  # let the resampler follow sample counts, not damaged timestamps
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if shape != setup:
            if resampler is not None:
                yield from resampler.resample(None)
            resampler, setup = av.AudioResampler(format="flt", rate=rate), shape
        yield from resampler.resample(frame)
    if resampler is not None:
        yield from resampler.resample(None)


def container(path: Path, field: str = FIELD) -> str:
    """The FFmpeg demuxer for ``path``, from its first bytes (an ID3v2 tag skipped): one of
    :data:`CONTAINERS`; anything else raises InputError naming ``field``."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            skipped = 0
            while head[:3] == b"ID3" and len(head) >= 10:  # ID3v2 (mp3, sometimes flac/aac): skip it
                size = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F)
                size += 10 if head[5] & 0x10 else 0  # a footer
                skipped += size
                f.seek(skipped)
                head = f.read(64)
    except OSError as exc:
        raise InputError([(field, f"could not be read ({exc.strerror or exc})")]) from None
    found = _signature(head)
    if found is None and skipped and _mpeg_audio_sync(head):
        found = "mp3"
    if found is None:
        what = _what_else(head)
        raise InputError([(field, f"could not be read as audio: it is not a {EXPECTED} file{what}")])
    return found


def _chunk_problem(path: Path, demuxer: str) -> tp.Optional[str]:
    """For RIFF (wav) and IFF (aiff) files: a chunk that declares more bytes than the file holds (the
    audio data chunk aside: a streamed or cut file's may), inside LIST chunks too. FFmpeg allocates
    and zeroes what a metadata chunk declares before reading it (a 32 KB WAV whose INFO tag claims
    2 GB: +2.1 GB inside ``av.open``, bench/fuzz_audio.py). None: nothing wrong found."""
    if demuxer not in ("wav", "aiff"):
        return None
    little = demuxer == "wav"
    audio_chunk = b"data" if little else b"SSND"
    size = path.stat().st_size

    def walk(f: tp.BinaryIO, start: int, end: int, depth: int) -> tp.Optional[str]:
        at = start
        while at + 8 <= end:
            f.seek(at)
            head = f.read(8)
            if len(head) < 8:
                return None
            chunk, length = head[:4], int.from_bytes(head[4:8], "little" if little else "big")
            body = at + 8
            if chunk != audio_chunk and body + length > end:
                name = chunk.decode("latin-1").strip() or repr(chunk)
                return f"its {name!r} chunk declares {length} bytes, more than the file holds"
            if little and chunk == b"LIST" and depth == 0 and length >= 4:
                inner = walk(f, body + 4, min(body + length, end), depth + 1)
                if inner:
                    return inner
            if chunk == audio_chunk and body + length > end:
                return None  # the audio runs to the end of the file (streamed or cut): nothing after it
            at = body + length + (length & 1)  # chunks are padded to an even length
        return None

    with open(path, "rb") as f:
        return walk(f, 12, size, 0)


def _signature(head: bytes) -> tp.Optional[str]:
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: matroska, webm
        return "matroska"
    if head[4:8] == b"ftyp":  # ISO base media: m4a, mp4
        return "mp4"
    if head[:4] == b"ADIF":
        return "aac"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:  # ADTS: sync, layer 00
        return "aac"
    if _mpeg_audio_sync(head):
        return "mp3"
    return None


def _mpeg_audio_sync(head: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, a valid version and layer, bitrate and rate indices."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 3, (head[1] >> 1) & 3
    bitrate, rate = head[2] >> 4, (head[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate != 15 and rate != 3


def _what_else(head: bytes) -> str:
    """A word on what the file seems to be instead, when it is recognisable."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"#EXTM3U") or text.startswith(b"#EXT"):
        return ": this is a playlist (HLS/m3u), not audio"
    if text[:10].lower().startswith(b"ffconcat") or text.startswith(b"file "):
        return ": this is a list of files, not audio"
    if text.startswith((b"v=0", b"<?xml", b"<", b"{", b"[")) or all(
        32 <= c < 127 or c in (9, 10, 13) for c in head[:32]
    ):
        return ": this is a text file"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or head[:4] in (b"GIF8", b"%PDF"):
        return ": this is an image or document"
    return ""


def _kept(frame: tp.Any, decoded: int, first: int, last: tp.Optional[int], channels: int) -> tp.Tuple[tp.Any, int]:
    """The part of ``frame`` inside [first, last) as ``channels`` channels (None: nothing of it), and the
    new count of decoded samples."""
    import torch
    from audiocraft.data.audio_utils import convert_audio_channels

    data = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).T  # packed -> [C, n]
    n = data.shape[1]
    lo, hi = max(first - decoded, 0), n if last is None else min(last - decoded, n)
    piece = convert_audio_channels(torch.from_numpy(data[:, lo:hi].copy()), channels) if hi > lo else None
    return piece, decoded + n


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
